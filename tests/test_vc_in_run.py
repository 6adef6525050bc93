"""The usual #VC is delivered from the code hook in front of the instruction, without
stopping the engine (``GuestCpu._raise_vc_in_run``, ``Delivery.deliver_in_run``).

What the guest's handler sees must be what a stop and a delivery between runs give:
the flags the interrupted code left (QEMU still holds the arithmetic ones lazily in
the hook), IF and TF cleared by the interrupt gate, the frame where the IST says.
The engine really must not stop for it, and the cases that need a stop must still
get one: a counted run (the instruction the hook is in front of would count as
retired), a frame that lands on a page code was translated from, the first run
before Unicorn reports new blocks.

Each guest takes #VC (vector 29, IST1) on CPUID; its handler records its own RFLAGS,
the frame's RFLAGS and RIP and where the frame lies into the shared page at
``RECORD``, then skips the CPUID.
"""

from __future__ import annotations

import struct

import pytest
from guests import guest, launch
from test_vc_native import done
from test_vc_native import run as run_native

from sevsim.guest.asm import assemble
from sevsim.guest.image import IST1_TOP, TSS
from sevsim.guest.snippets import TERMINATE
from sevsim.hw import cpu as cpu_module
from sevsim.hw import engine as engine_module
from sevsim.kvm.exits import RunFailed, SystemEvent
from sevsim.testing import GuestRun, run_guest

RECORD = 0x7800  # in the shared GHCB page: a count, then 32 bytes per #VC
EXPECT = 0x7C00  # the guest's own PUSHFQ before each CPUID, and after it
HANDLER = 0x30000
IF, TF = 1 << 9, 1 << 8
#: A 64-bit frame with an error code, below the 16-byte aligned stack top.
FRAME = 6 * 8
HANDLER_SOURCE = f"""
    pushfq                      /* the handler's own RFLAGS, first of all */
    push rax
    push rsi
    mov rsi, {RECORD}
    mov rax, [rsi]
    inc qword ptr [rsi]
    shl rax, 5
    add rsi, rax
    mov rax, [rsp + 16]
    mov [rsi + 8], rax          /* the handler's RFLAGS */
    mov rax, [rsp + 48]
    mov [rsi + 16], rax         /* the frame's RFLAGS */
    mov rax, [rsp + 32]
    mov [rsi + 24], rax         /* the frame's RIP */
    lea rax, [rsp + 24]
    mov [rsi + 32], rax         /* where the frame lies */
    add qword ptr [rsp + 32], 2 /* past the CPUID */
    pop rsi
    pop rax
    add rsp, 16                 /* the handler's RFLAGS, the error code */
    iretq
"""
#: Instructions the handler retires per #VC.
HANDLER_INSNS = sum(1 for line in HANDLER_SOURCE.splitlines() if line.strip())


@pytest.fixture
def runs(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How many times the engine was started, and how many VMRUNs ran the CPU."""
    counts = {"engine": 0, "vmrun": 0}
    start, run = engine_module.Engine.start, cpu_module.GuestCpu.run

    def counted_start(self, *args, **kwargs):
        counts["engine"] += 1
        return start(self, *args, **kwargs)

    def counted_run(self):
        counts["vmrun"] += 1
        return run(self)

    monkeypatch.setattr(engine_module.Engine, "start", counted_start)
    monkeypatch.setattr(cpu_module.GuestCpu, "run", counted_run)
    return counts


def _run(body: str, **image_args) -> tuple[GuestRun, list[tuple[int, int, int, int]]]:
    result = run_guest(body + TERMINATE, enable=["msr_protocol"], idt={29: HANDLER},
                       ist_vectors=frozenset({29}), data={HANDLER: assemble(HANDLER_SOURCE,
                       HANDLER)}, **image_args)  # fmt: skip
    assert isinstance(result.exit, SystemEvent), result.trace.lines[-8:]
    return result, _records(result)


def _records(result: GuestRun) -> list[tuple[int, int, int, int]]:
    memory = result.vm.memory
    count = struct.unpack("<Q", memory.read(RECORD, 8))[0]
    return [struct.unpack("<4Q", memory.read(RECORD + 8 + 32 * i, 32)) for i in range(count)]


def _cpuid_loop(count: int) -> str:
    return f"""
        cpuid                   /* before Unicorn reports blocks: a stop */
        mov ecx, {count}
    again:
        cpuid
        dec ecx
        jnz again
    """


#: Flag-setting code before a CPUID: the arithmetic flags are then lazy in QEMU.
FLAG_CASES = {
    "carry-sign": "mov eax, 1; cmp eax, 2",
    "zero-parity": "xor eax, eax",
    "overflow": "mov al, 0x7f; add al, 1",
    "stc": "stc",
    "direction": "std; mov eax, 3; test eax, eax",
    "interrupts-on": "sti; mov eax, 5; sub eax, 5",
    # JMP +0 ends the block: the CPUID's block starts with the flags still lazy.
    "set-in-an-earlier-block": "mov eax, 1; cmp eax, 2; .byte 0xeb, 0x00",
}


def test_the_frame_holds_the_flags_the_code_left_and_the_handler_runs_with_if_tf_clear():
    body = "cpuid\n"  # the first #VC, before Unicorn reports blocks, stops
    for i, code in enumerate(FLAG_CASES.values()):
        body += f"""
            {code}
            pushfq
            pop rax
            mov [{EXPECT + 16 * i}], rax
            {code}
            cpuid
            pushfq
            pop rax
            mov [{EXPECT + 16 * i + 8}], rax
            cld
            cli
        """
    result, records = _run(body)
    assert len(records) == 1 + len(FLAG_CASES)
    flags = struct.unpack(f"<{2 * len(FLAG_CASES)}Q",
                          result.vm.memory.read(EXPECT, 16 * len(FLAG_CASES)))  # fmt: skip
    for i, name in enumerate(FLAG_CASES):
        before, after = flags[2 * i], flags[2 * i + 1]
        handler, frame, _, _ = records[1 + i]
        assert (name, hex(frame), hex(after)) == (name, hex(before), hex(before))
        assert (name, hex(handler)) == (name, hex(before & ~IF))
    assert flags[2 * list(FLAG_CASES).index("interrupts-on")] & IF
    assert not any(handler & (IF | TF) for handler, _, _, _ in records)


def test_later_vcs_take_no_stop(runs):
    """A loop of CPUIDs: the engine is started as often for 40 #VCs as for 4."""
    started = []
    for count in (4, 40):
        runs["engine"] = 0
        result, records = _run(_cpuid_loop(count))
        assert len(records) == 1 + count
        loop_rip = records[1][2]
        assert [rip for _, _, rip, _ in records[1:]] == [loop_rip] * count
        assert {frame for _, _, _, frame in records} == {IST1_TOP - FRAME}
        # Every #VC reached the trace, the ones delivered inside the hook too.
        assert sum("#VC SVM_EXIT_CPUID" in line for line in result.trace.lines) == 1 + count
        started.append(runs["engine"])
    assert started[0] == started[1]


def test_an_out_round_trip_is_one_engine_run_per_vmrun(runs):
    """The native #VC handler's OUTs: #VC from the hook, the GHCB MSR write inside
    the run, the VMGEXIT ends the run; nothing else stops the engine, so 30 more
    round trips are 30 more VMRUNs and as many runs, no more."""
    counted = []
    for count in (10, 40):
        runs.update(engine=0, vmrun=0)
        result = run_native(f"""
            mov ecx, {count}
            mov dx, 0x80
            mov al, 0x40
        again:
            out dx, al
            inc al
            dec ecx
            jnz again
        """)
        done(result)
        assert result.devices.post.codes == list(range(0x40, 0x40 + count))
        counted.append((runs["vmrun"], runs["engine"]))
    (vmruns_10, runs_10), (vmruns_40, runs_40) = counted
    assert vmruns_40 - vmruns_10 == 30
    assert runs_40 - runs_10 == 30


def test_a_frame_on_a_page_code_ran_from_takes_the_stop(runs):
    """IST1 pointed into the handler's own page: a frame written from the hook could
    overwrite code Unicorn has translated, so the CPU stops and delivers between
    runs, where stale code is dropped; the records are the same."""
    top = HANDLER + 0x1000
    started = []
    for count in (4, 40):
        runs["engine"] = 0
        _, records = _run(
            f"""
            mov rax, {top}
            mov rdi, {TSS + 0x24}
            mov [rdi], rax
        """
            + _cpuid_loop(count)
        )
        assert len(records) == 1 + count
        assert {frame for _, _, _, frame in records} == {top - FRAME}
        started.append(runs["engine"])
    assert started[1] - started[0] >= 36  # (and code dropped, translated again)


def test_counted_runs_stop_at_each_vc_and_count_exactly(runs):
    """Under an instruction budget the CPUID a #VC is raised for is not retired:
    each one stops (the hook's instruction would count), and the instructions
    counted per round are the loop's two and the handler's."""
    retired, started = [], []
    for count in (10, 20):
        runs["engine"] = 0
        vm = launch(guest(_cpuid_loop(count) + TERMINATE, idt={29: HANDLER},
                          ist_vectors=frozenset({29}),
                          data={HANDLER: assemble(HANDLER_SOURCE, HANDLER)}))  # fmt: skip
        vcpu = vm.vcpus[0]
        while isinstance(exit_ := vcpu.run(budget=1_000_000), RunFailed):
            assert exit_.errno == "EINTR", exit_
        assert isinstance(exit_, SystemEvent), exit_
        retired.append(vcpu.retired)
        started.append(runs["engine"])
    assert retired[1] - retired[0] == 10 * (2 + HANDLER_INSNS)
    assert started[1] - started[0] == 10


def test_the_first_run_stops_before_unicorn_reports_blocks():
    """A CPUID as the guest's very first instruction: the handler's first block would
    go unreported after a RIP write from the hook, so that #VC takes the stop, and
    the handler's own sensitive instruction (the VMGEXIT of TERM_REQ) is still caught."""
    result = run_guest("cpuid\nhlt", enable=["msr_protocol"], idt={29: HANDLER},
                       data={HANDLER: assemble(f"mov rsi, {RECORD}; mov qword ptr [rsi], 1\n"
                                               + TERMINATE, HANDLER)})  # fmt: skip
    assert isinstance(result.exit, SystemEvent), result.trace.lines[-8:]
    assert struct.unpack("<Q", result.vm.memory.read(RECORD, 8))[0] == 1
    assert any("#VC SVM_EXIT_CPUID" in line for line in result.trace.lines)
