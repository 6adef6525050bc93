"""The VMM's run loop end to end: small long-mode guests on the ``pc`` machine.

Each guest runs through the whole path (launch, KVM_RUN, #VC to sevsim's native
handler, the GHCB, kvm, the machine's devices) and ends one of the ways the run loop
knows, each with its exit status (:class:`sevsim.vmm.vmm.EndKind`).
"""

from __future__ import annotations

import struct

import pytest

from sevsim.guest.asm import assemble
from sevsim.guest.snippets import TERMINATE, terminate
from sevsim.guest.vc_native import vc_image_args
from sevsim.hw.inspect import cpu_of
from sevsim.testing import run_pc_guest
from sevsim.trace import Trace
from sevsim.vmm.pc import PcMachine
from sevsim.vmm.vmm import ClockMode, EndKind, RunEnd, Vmm

#: The series' feature plugins, as a default configuration enables them.
FEATURES = ("msr_protocol", "mmio", "ioio", "crtraps", "apboot", "nmi")
#: Where the tests' second piece of code goes: an interrupt handler, or the APs' entry.
SECOND = 0x30000
TIMER_VECTOR = 0x30
#: Shared state of the two-vCPU guests.
COUNTER = 0x50000

#: The timer handler: 'T' on the UART, EOI, return.
TIMER_ISR = """
    push rax
    push rbx
    push rdx
    mov dx, 0x3f8
    mov al, 0x54
    out dx, al
    mov rbx, 0xfee00000
    mov dword ptr [rbx + 0xb0], 0
    pop rdx
    pop rbx
    pop rax
    iretq
"""


def _apic_timer(count: int, periodic: bool = False) -> str:
    """Software-enable the xAPIC and arm its timer (divide by 1: 1 ns a count)."""
    lvt = TIMER_VECTOR | (1 << 17 if periodic else 0)
    return f"""
    mov rbx, 0xfee00000
    mov dword ptr [rbx + 0xf0], 0x1ff
    mov dword ptr [rbx + 0x3e0], 0xb
    mov dword ptr [rbx + 0x320], {lvt:#x}
    mov dword ptr [rbx + 0x380], {count}
"""


def run(source: str, *, second: str | None = None, vcpus: int = 1,
        clock_mode: ClockMode = ClockMode.HOST, timeout: float | None = 20.0,
        max_exits: int | None = None, trace: Trace | None = None,
        ) -> tuple[RunEnd, Vmm, PcMachine]:  # fmt: skip
    """The guest at CODE (the BSP's entry); ``second`` at SECOND is the timer's
    handler on one vCPU, the APs' entry on several."""
    data = {} if second is None else {SECOND: assemble(second, SECOND)}
    idt = {TIMER_VECTOR: SECOND} if second is not None and vcpus == 1 else {}
    done = run_pc_guest(source, enable=FEATURES, vcpus=vcpus,
                        ap_entry=SECOND if vcpus > 1 else None,
                        clock=clock_mode, timeout=timeout, max_exits=max_exits, trace=trace,
                        **vc_image_args(idt=idt, data=data))  # fmt: skip
    return done.end, done.vmm, done.machine


# --- HLT and the LAPIC timer ---------------------------------------------------------------


def test_hlt_with_interrupts_on_waits_for_the_lapic_timer():
    """HLT with IF=1 does not end the run: the vCPU waits, time jumps to the one-shot
    timer's deadline (5 ms), the interrupt wakes it, and its handler runs first."""
    source = _apic_timer(5_000_000) + f"""
    sti
    hlt
    cli
    mov dx, 0x3f8
    mov al, 0x57
    out dx, al
{TERMINATE}
"""
    end, vmm, machine = run(source, second=TIMER_ISR, clock_mode=ClockMode.ICOUNT)
    assert (end.kind, end.status) == (EndKind.TERMINATED, 0)
    assert machine.uart.output == b"TW"
    stats = vmm.stats()
    # The guest's clock moved by the programmed 5 ms, though it ran few instructions.
    assert stats.instructions is not None and stats.instructions < 50_000
    assert 5_000_000 <= stats.guest_ns < 5_000_000 + stats.instructions


def test_hlt_with_interrupts_off_and_no_timer_ends_halted():
    end, _, _ = run("cli\nhlt\n")
    assert (end.kind, end.status) == (EndKind.HALTED, 0)
    assert "every vCPU halted" in end.why


# --- what the guest asks of the machine --------------------------------------------------------

#: After its request the guest spins: only the machine's kick ends the run.
SPIN = "spin:\n    jmp spin\n"


def test_isa_debug_exit_ends_the_run_with_qemus_status():
    end, _, _ = run("mov dx, 0x501\nmov al, 0x21\nout dx, al\n" + SPIN)
    assert (end.kind, end.status) == (EndKind.DEBUG_EXIT, 0x21 << 1 | 1)
    assert "0x21" in end.why


def test_piix4_s5_is_a_power_off():
    """PMBA at 0xB000 with PMIOSE (PCI 00:01.3), then SLP_TYP S5 with SLP_EN in PM1a_CNT."""
    source = """
    mov dx, 0xcf8
    mov eax, 0x80000b40
    out dx, eax
    mov dx, 0xcfc
    mov eax, 0xb000
    out dx, eax
    mov dx, 0xcf8
    mov eax, 0x80000b80
    out dx, eax
    mov dx, 0xcfc
    mov al, 1
    out dx, al
    mov dx, 0xb004
    mov ax, 0x2000
    out dx, ax
""" + SPIN
    end, _, _ = run(source)
    assert (end.kind, end.status) == (EndKind.POWER_OFF, 0)


def test_a_reset_through_0xcf9_ends_the_run():
    end, _, _ = run("mov dx, 0xcf9\nmov al, 6\nout dx, al\n" + SPIN)
    assert (end.kind, end.status) == (EndKind.RESET, 3)
    assert "cannot be reset" in end.why


# --- limits ----------------------------------------------------------------------------------


def test_max_exits_ends_the_run_with_status_4():
    """A periodic timer wakes the halted guest every millisecond: each wake is a HLT
    exit, and the tenth ends the run."""
    source = _apic_timer(1_000_000, periodic=True) + "again:\n    sti\n    hlt\n    jmp again\n"
    isr = "push rbx\nmov rbx, 0xfee00000\nmov dword ptr [rbx + 0xb0], 0\npop rbx\niretq\n"
    end, vmm, _ = run(source, second=isr, max_exits=10)
    assert (end.kind, end.status) == (EndKind.LIMIT, 4)
    assert vmm.exits == 10
    assert end.why == "--max-exits: 10 exits"


def test_timeout_ends_a_spinning_guest_with_status_4():
    end, _, _ = run(SPIN, timeout=0.3)
    assert (end.kind, end.status) == (EndKind.LIMIT, 4)
    assert end.why == "--timeout: 0.3 s passed"


# --- termination requests ---------------------------------------------------------------------


@pytest.mark.parametrize("traced", [False, True])
def test_the_general_termination_request_is_a_normal_end(traced):
    end, _, _ = run(TERMINATE, trace=Trace() if traced else None)
    assert (end.kind, end.status, end.vcpu) == (EndKind.TERMINATED, 0, 0)


@pytest.mark.parametrize("traced", [False, True])
def test_a_termination_request_with_a_failure_reason_fails(traced):
    end, _, _ = run(terminate(1, 4), trace=Trace() if traced else None)
    assert (end.kind, end.status) == (EndKind.FAILED, 1)
    assert "set 1 code 4" in end.why


# --- several vCPUs ---------------------------------------------------------------------------

ROUNDS = 300_000

#: The BSP wakes AP 1 with INIT-SIPI-SIPI, both add ROUNDS to one counter with LOCK INC,
#: and the BSP waits for the AP's share before it terminates: without time slices the
#: waiting BSP would keep the CPU for ever.
TWO_COUNTERS = f"""
    mov rdi, {COUNTER:#x}
    xor eax, eax
    mov [rdi], rax
    mov rbx, 0xfee00000
    mov dword ptr [rbx + 0x310], 0x1000000
    mov dword ptr [rbx + 0x300], 0x4500
    mov dword ptr [rbx + 0x300], 0x4600
    mov dword ptr [rbx + 0x300], 0x4600
    mov ecx, {ROUNDS}
count:
    lock inc qword ptr [rdi]
    dec ecx
    jnz count
wait:
    pause
    cmp qword ptr [rdi], {2 * ROUNDS}
    jb wait
{TERMINATE}
"""
#: An AP's end: the MSR-protocol AP reset hold, for good.
PARK = """
park:
    mov ecx, 0xc0010130
    mov eax, 6
    xor edx, edx
    wrmsr
    rep vmmcall
    jmp park
"""
#: The AP: its share, then the MSR-protocol AP reset hold, for good.
AP_COUNTER = f"""
    mov rdi, {COUNTER:#x}
    mov ecx, {ROUNDS}
count:
    lock inc qword ptr [rdi]
    dec ecx
    jnz count
{PARK}"""


def _counter(machine: PcMachine) -> int:
    vcpu = machine.vcpus[0]
    return struct.unpack("<Q", cpu_of(vcpu.vmsa).mmu.read(COUNTER, 8))[0]


@pytest.mark.parametrize("clock_mode", list(ClockMode))
def test_two_vcpus_share_the_cpu_and_both_progress(clock_mode):
    end, _, machine = run(TWO_COUNTERS, second=AP_COUNTER, vcpus=2, clock_mode=clock_mode)
    assert (end.kind, end.status, end.vcpu) == (EndKind.TERMINATED, 0, 0)
    assert _counter(machine) == 2 * ROUNDS


def test_icount_runs_give_the_same_exits_every_time():
    def once() -> tuple[list[str], tuple[int, int, int | None]]:
        trace = Trace()
        end, vmm, _ = run(TWO_COUNTERS, second=AP_COUNTER, vcpus=2, trace=trace,
                          clock_mode=ClockMode.ICOUNT)  # fmt: skip
        assert end.kind is EndKind.TERMINATED
        stats = vmm.stats()
        return trace.lines, (stats.exits, stats.guest_ns, stats.instructions)

    first = once()
    assert len(first[0]) > 20
    assert once() == first


#: Code the BSP runs, then the AP rewrites: ``mov eax, 1; ret`` (a page of its own).
FUNC = 0x52000
FLAG = 0x53000
#: The BSP runs FUNC (its engine translates it), wakes AP 1, waits for the AP to
#: rewrite FUNC into ``mov eax, 2; ret``, and runs it again: it must see the new code.
CALLS_REWRITTEN = f"""
    mov rsi, {FUNC:#x}
    call rsi
    cmp eax, 1
    jne wrong
    mov rbx, 0xfee00000
    mov dword ptr [rbx + 0x310], 0x1000000
    mov dword ptr [rbx + 0x300], 0x4500
    mov dword ptr [rbx + 0x300], 0x4600
    mov dword ptr [rbx + 0x300], 0x4600
    mov rdi, {FLAG:#x}
wait:
    pause
    cmp qword ptr [rdi], 1
    jne wait
    call rsi
    cmp eax, 2
    jne wrong
{TERMINATE}
wrong:
{terminate(1, 4)}
"""
REWRITES = f"""
    mov rdi, {FUNC:#x}
    mov dword ptr [rdi], 0x000002b8
    mov word ptr [rdi + 4], 0xc300
    mov rdi, {FLAG:#x}
    mov qword ptr [rdi], 1
{PARK}"""


@pytest.mark.parametrize("clock_mode", list(ClockMode))
def test_code_one_vcpu_rewrites_runs_new_on_another(clock_mode):
    """Each vCPU has its own engine and translated code: a write by one vCPU to code
    another has run must reach the other's next run, as on hardware (OVMF's
    MpInitLib rewrites the AP start code between wake-ups)."""
    done = run_pc_guest(
        CALLS_REWRITTEN, enable=FEATURES, vcpus=2, ap_entry=SECOND, clock=clock_mode,
        timeout=60, **vc_image_args(data={SECOND: assemble(REWRITES, SECOND),
                                          FUNC: b"\xb8\x01\x00\x00\x00\xc3",
                                          FLAG: bytes(8)}),
    )  # fmt: skip
    assert (done.end.kind, done.end.status) == (EndKind.TERMINATED, 0), done.end.why


#: The BSP wakes AP 1, waits until it is about to halt (IF=0) and some slices more (an
#: INIT-SIPI before the HLT would be used up, as on hardware), wakes it again with
#: INIT-SIPI-SIPI and waits for it to go on after its HLT.
WAKES_A_HALTED_AP = f"""
    mov rbx, 0xfee00000
    mov rdi, {FLAG:#x}
    mov dword ptr [rbx + 0x310], 0x1000000
    mov dword ptr [rbx + 0x300], 0x4500
    mov dword ptr [rbx + 0x300], 0x4600
    mov dword ptr [rbx + 0x300], 0x4600
halted:
    pause
    cmp qword ptr [rdi], 1
    jne halted
    mov ecx, 200000                 /* time slices enough for the AP to reach its HLT */
slices:
    loop slices
    mov dword ptr [rbx + 0x300], 0x4500
    mov dword ptr [rbx + 0x300], 0x4600
    mov dword ptr [rbx + 0x300], 0x4600
again:
    pause
    cmp qword ptr [rdi], 2
    jne again
{TERMINATE}
"""
HALTS = f"""
    mov rdi, {FLAG:#x}
    mov qword ptr [rdi], 1
    cli
    hlt
    mov qword ptr [rdi], 2
{PARK}"""


def test_init_sipi_wakes_an_ap_halted_with_interrupts_off():
    """QEMU's do_cpu_sipi ends a halt; KVM's INIT-SIPI makes an SEV-ES AP runnable
    where it was (it cannot reset the sealed registers): OVMF's APs halt in their
    SEV-ES reset code between wake-ups and go on after the HLT."""
    done = run_pc_guest(
        WAKES_A_HALTED_AP, enable=FEATURES, vcpus=2, ap_entry=SECOND, timeout=60,
        clock=ClockMode.ICOUNT,
        **vc_image_args(data={SECOND: assemble(HALTS, SECOND), FLAG: bytes(8)}),
    )  # fmt: skip
    assert (done.end.kind, done.end.status) == (EndKind.TERMINATED, 0), done.end.why
