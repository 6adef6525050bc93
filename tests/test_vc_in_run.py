"""What needs no #VMEXIT is finished from the code hook in front of the instruction,
without stopping the engine: the usual #VC (``GuestCpu._raise_vc_in_run``,
``Delivery.deliver_in_run``), and what the CPU answers itself under SEV-ES (RDMSR of
the GHCB MSR and SEV_STATUS, MOV from CR8), retired by writing RIP.

What the guest's handler sees must be what a stop and a delivery between runs give:
the flags the interrupted code left (QEMU still holds the arithmetic ones lazily in
the hook), IF and TF cleared by the interrupt gate, the frame where the IST says, the
error code. The engine really must not stop for it, and the cases that need a stop
must still get one: a counted run (the instruction the hook is in front of would
count as retired), a frame that lands on a page code was translated from, the first
run before Unicorn reports new blocks.

Most guests here take #VC (vector 29, IST1) on CPUID or an intercepted MSR; their
handler records its own RFLAGS, the frame's RFLAGS and RIP, where the frame lies and
the error code into the shared page at ``RECORD``, then skips the 2-byte instruction.
"""

from __future__ import annotations

import struct

import pytest
from guests import guest, launch
from test_vc_native import done
from test_vc_native import run as run_native

from sevsim import hookimpl
from sevsim.arch.exits import SvmExit
from sevsim.arch.msr import MSR_AMD64_SEV_ENABLED, MSR_AMD64_SEV_ES_ENABLED
from sevsim.guest.asm import assemble
from sevsim.guest.image import IST1_TOP, TSS
from sevsim.guest.snippets import TERMINATE
from sevsim.hw import cpu as cpu_module
from sevsim.hw import engine as engine_module
from sevsim.kvm.exits import RunFailed, Shutdown, SystemEvent
from sevsim.testing import GuestRun, run_guest

#: In the shared GHCB page: a count, then 40 bytes per #VC (room for 44).
RECORD = 0x7800
#: In the same page: what the guest itself stored.
EXPECT = 0x7F00
HANDLER = 0x30000
IF, TF = 1 << 9, 1 << 8
SEV_ES_STATUS = MSR_AMD64_SEV_ENABLED | MSR_AMD64_SEV_ES_ENABLED
#: A 64-bit frame with an error code, below the 16-byte aligned stack top.
FRAME = 6 * 8
HANDLER_SOURCE = f"""
    pushfq                      /* the handler's own RFLAGS, first of all */
    push rax
    push rsi
    mov rsi, {RECORD}
    mov rax, [rsi]
    inc qword ptr [rsi]
    imul rax, rax, 40
    add rsi, rax
    mov rax, [rsp + 16]
    mov [rsi + 8], rax          /* the handler's RFLAGS */
    mov rax, [rsp + 48]
    mov [rsi + 16], rax         /* the frame's RFLAGS */
    mov rax, [rsp + 32]
    mov [rsi + 24], rax         /* the frame's RIP */
    lea rax, [rsp + 24]
    mov [rsi + 32], rax         /* where the frame lies */
    mov rax, [rsp + 24]
    mov [rsi + 40], rax         /* the error code */
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


def _run(body: str, **image_args) -> tuple[GuestRun, list[tuple[int, int, int, int, int]]]:
    result = run_guest(body + TERMINATE, enable=["msr_protocol"], idt={29: HANDLER},
                       ist_vectors=frozenset({29}), data={HANDLER: assemble(HANDLER_SOURCE,
                       HANDLER)}, **image_args)  # fmt: skip
    assert isinstance(result.exit, SystemEvent), result.trace.lines[-8:]
    return result, _records(result)


def _records(result: GuestRun) -> list[tuple[int, int, int, int, int]]:
    """(handler's RFLAGS, frame's RFLAGS, frame's RIP, frame address, error code) per #VC."""
    memory = result.vm.memory
    count = struct.unpack("<Q", memory.read(RECORD, 8))[0]
    return [struct.unpack("<5Q", memory.read(RECORD + 8 + 40 * i, 40)) for i in range(count)]


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
        handler, frame, *_ = records[1 + i]
        assert (name, hex(frame), hex(after)) == (name, hex(before), hex(before))
        assert (name, hex(handler)) == (name, hex(before & ~IF))
    assert flags[2 * list(FLAG_CASES).index("interrupts-on")] & IF
    assert not any(handler & (IF | TF) for handler, *_ in records)


def test_later_vcs_take_no_stop(runs):
    """A loop of CPUIDs: the engine is started as often for 40 #VCs as for 4."""
    started = []
    for count in (4, 40):
        runs["engine"] = 0
        result, records = _run(_cpuid_loop(count))
        assert len(records) == 1 + count
        loop_rip = records[1][2]
        assert [rip for _, _, rip, _, _ in records[1:]] == [loop_rip] * count
        assert {frame for _, _, _, frame, _ in records} == {IST1_TOP - FRAME}
        assert {error for *_, error in records} == {SvmExit.CPUID}
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
        assert {frame for _, _, _, frame, _ in records} == {top - FRAME}
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


def _answered_loop(count: int) -> str:
    """``count`` rounds of what the CPU answers itself (GHCB MSR, SEV_STATUS, CR8),
    each round's values stored at EXPECT (the last round's remain)."""
    return f"""
        mov eax, 9
        mov cr8, rax                /* a CR8 write trap: an exit */
        mov ecx, 0xC0010130
        mov eax, 0x5000
        mov edx, 0x12
        wrmsr                       /* the GHCB MSR, taken in the hook */
        cpuid                       /* a first #VC, before Unicorn reports blocks */
        mov r8d, {count}
        mov rdi, {EXPECT}
    again:
        mov ecx, 0xC0010130
        rdmsr
        mov [rdi], eax
        mov [rdi + 4], edx
        mov ecx, 0xC0010131
        rdmsr
        mov [rdi + 8], eax
        mov [rdi + 12], edx
        mov rbx, cr8
        mov [rdi + 16], rbx
        dec r8d
        jnz again
    """


def test_what_the_cpu_answers_itself_is_retired_without_a_stop(runs):
    """Under SEV-ES the CPU answers RDMSR of the GHCB MSR and SEV_STATUS and MOV from
    CR8 without an exit: the model retires them from the hook (registers set, RIP
    moved on), and the run goes on."""
    started = []
    for count in (4, 40):
        runs["engine"] = 0
        result = run_guest(_answered_loop(count) + TERMINATE,
                           enable=["msr_protocol", "crtraps"], idt={29: HANDLER},
                           ist_vectors=frozenset({29}),
                           data={HANDLER: assemble(HANDLER_SOURCE, HANDLER)})  # fmt: skip
        assert isinstance(result.exit, SystemEvent), result.trace.lines[-8:]
        ghcb, status, cr8 = struct.unpack("<QQQ", result.vm.memory.read(EXPECT, 24))
        assert (hex(ghcb), status, cr8) == (
            hex(0x12_0000_5000),
            MSR_AMD64_SEV_ENABLED | MSR_AMD64_SEV_ES_ENABLED,
            9,
        )
        started.append(runs["engine"])
    assert started[0] == started[1]


def test_an_intercepted_msr_raises_its_vc_without_a_stop(runs):
    """RDMSR and WRMSR of an MSR the permission map intercepts: #VC(MSR) from the
    hook, in front of the instruction, like any other #VC."""
    started = []
    for count in (4, 20):
        runs["engine"] = 0
        _, records = _run(f"""
            cpuid
            mov r8d, {count}
        again:
            mov ecx, 0x1a0
            rdmsr
            wrmsr
            dec r8d
            jnz again
        """)
        assert [error for *_, error in records[1:]] == [SvmExit.MSR] * (2 * count)
        rdmsr_at = records[1][2]
        assert [rip for _, _, rip, _, _ in records[1:]] == [rdmsr_at, rdmsr_at + 2] * count
        started.append(runs["engine"])
    assert started[0] == started[1]


def test_an_observer_failing_on_a_vc_from_the_hook_ends_the_run_naming_that_instruction():
    """The #VC event is emitted from inside the hook: an observer that raises there ends
    the vCPU in a simulator fault, as between runs, and the trace names the CPUID whose
    #VC it was, not the one the run last stopped at."""

    class Loud:
        seen = 0

        @hookimpl
        def sevsim_sim_vc(self, rip: int) -> None:
            self.seen += 1
            if self.seen == 3:
                raise ValueError(f"cannot show {rip:#x}")

    loud = Loud()
    result = run_guest(_cpuid_loop(5) + TERMINATE, {"loud": loud}, enable=["msr_protocol"],
                       idt={29: HANDLER}, ist_vectors=frozenset({29}),
                       data={HANDLER: assemble(HANDLER_SOURCE, HANDLER)})  # fmt: skip
    assert isinstance(result.exit, Shutdown), result.exit
    first, second = (line for line in result.trace.lines if "#VC SVM_EXIT_CPUID" in line)
    loop_cpuid = second.split(" at ")[1].split()[0]  # the loop's CPUID; the first is at CODE
    fault = next(line for line in result.trace.lines if "SHUTDOWN" in line)
    assert f"@{loop_cpuid} " in fault and "cannot show" in fault, fault
    assert loop_cpuid != first.split(" at ")[1].split()[0]
