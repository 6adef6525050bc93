"""CR0/CR4/CR8/EFER write traps: the guest's writes retire, KVM's copy follows."""

from typing import Any

import pytest

from sevsim import hookimpl
from sevsim.arch import msr as M
from sevsim.arch.exits import SvmExit
from sevsim.arch.ghcb_msr import term_req
from sevsim.arch.vmcb import VMCB_CONTROL
from sevsim.guest.image import CODE
from sevsim.guest.snippets import TERMINATE, terminate
from sevsim.hw import Platform
from sevsim.kvm.cpuid import CpuidModel
from sevsim.kvm.exits import SystemEvent, SystemEventType
from sevsim.testing import ExitDriver, isolated_host, run_guest

pytest_plugins = ["sevsim.testing"]

ENABLE = ["crtraps", "msr_protocol"]
#: What sevsim.guest.image starts a 64-bit guest with (KVM's copy, SVME masked).
CR0_START = M.CR0_PE | 2 | M.CR0_ET | M.CR0_NE | M.CR0_PG
EFER_START = M.EFER_SCE | M.EFER_LME | M.EFER_LMA | M.EFER_NX
#: The guests' #GP handler (right after the first, 2-byte, jump) terminates with this.
GP_TERM = term_req(1, 13)
GP_HANDLER = f"""
    jmp main
    {terminate(1, 13)}
main:
"""


class Handled:
    """Records every handled exit with the handler's notes."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, str, dict[str, Any]]] = []

    @hookimpl
    def sevsim_exit_handled(self, code: int, plugin: str, notes: dict[str, Any]) -> None:
        self.seen.append((code, plugin, dict(notes)))


def term_value(exit_: Any) -> int | None:
    """The GHCB MSR value of a SEV_TERM exit, else None."""
    if isinstance(exit_, SystemEvent) and exit_.type is SystemEventType.SEV_TERM:
        return exit_.data[0]
    return None


def run(source: str, handled: Handled, **vm_args: Any):
    """Run ``source`` (after the #GP handler) with crtraps, msr_protocol and ``handled``."""
    return run_guest(GP_HANDLER + source, {"handled": handled}, enable=ENABLE,
                     idt={13: CODE + 2}, **vm_args)  # fmt: skip


WRITES = f"""
    mov rax, cr0; or rax, 0x10000; mov cr0, rax        /* WP: an MMU role bit */
    mov rax, cr4; or rax, 0x80; mov cr4, rax           /* PGE: not a role bit */
    mov eax, 5; mov cr8, rax                           /* TPR */
    mov ecx, 0xC0000080; rdmsr; and eax, ~1; wrmsr     /* EFER.SCE off */
    {TERMINATE}
"""


def test_each_trap_updates_kvms_copy_and_the_trace_says_what_changed():
    handled = Handled()
    result = run(WRITES, handled)
    assert term_value(result.exit) == 0x100
    regs = result.vm.vcpus[0].plugin_states["crtraps"]
    assert regs.cr0 == CR0_START | M.CR0_WP
    # The guest read CR4 with MCE, which svm_set_cr4 added to the VMSA's CR4 at launch
    # (the host's), and wrote it back: KVM's copy now has it too.
    assert regs.cr4 == M.CR4_PAE | M.CR4_OSFXSR | M.CR4_OSXMMEXCPT | M.CR4_MCE | 0x80
    assert regs.cr8 == 5
    assert regs.efer == EFER_START & ~M.EFER_SCE  # no SVME, though the hardware has it
    traps = [(code, notes) for code, plugin, notes in handled.seen if plugin == "crtraps"]
    assert traps == [
        (0x90, {"cr0": f"CR0 {CR0_START:#x} -> {CR0_START | M.CR0_WP:#x} (MMU context reset)"}),
        (0x94, {"cr4": "CR4 0x620 -> 0x6e0"}),
        (0x98, {"cr8": "TPR 0 -> 5"}),
        (0x8F, {"efer": "EFER 0xd01 -> 0xd00"}),
    ]
    text = "\n".join(result.trace.lines)
    assert "CR0_WRITE_TRAP info1 0x80010033" in text
    assert "crtraps: TPR 0 -> 5" in text


def test_without_the_plugin_a_trap_is_an_internal_error():
    result = run_guest("mov rax, cr0; mov cr0, rax", enable=["msr_protocol"])
    assert "no handler for exit 0x90 (SVM_EXIT_CR0_WRITE_TRAP)" in result.exit.describe()


def test_paging_off_and_on_under_lme_moves_lma_in_kvms_copy():
    """``svm_set_cr0``: PG off clears LMA, PG on sets it, while EFER.LME is set. The
    traps are delivered directly (leaving long mode from a guest takes a detour
    through compatibility mode that adds nothing to KVM's rule)."""
    d = ExitDriver(isolated_host(enable=["crtraps"]).start())
    d.vcpu.set_state({"cr0": CR0_START, "efer": EFER_START})  # KVM's copy starts there
    assert d.vmexit(SvmExit.CR0_WRITE_TRAP, CR0_START & ~M.CR0_PG).exit is None
    assert d.vcpu.plugin_states["crtraps"].efer == EFER_START & ~M.EFER_LMA
    assert d.vmexit(SvmExit.CR0_WRITE_TRAP, CR0_START).exit is None
    assert d.vcpu.plugin_states["crtraps"].efer == EFER_START
    # LME may not change while paging is on: KVM refuses and queues #GP.
    assert d.vmexit(SvmExit.EFER_WRITE_TRAP, M.EFER_SVME | M.EFER_SCE).exit is None
    assert d.vcpu.plugin_states["crtraps"].efer == EFER_START
    assert VMCB_CONTROL.get(d.vcpu.vmcb, "event_inj") == 0x8000_0B0D  # #GP, error code 0


def test_efer_bit_the_guest_cpuid_lacks_is_refused_with_gp():
    """The silicon has NX; the guest's CPUID (KVM's model) does not: KVM injects #GP
    after the write retired, and its copy keeps the old EFER."""
    model = CpuidModel.default(Platform().caps)
    leaf = model.lookup(0x8000_0001)
    no_nx = model.with_overrides(
        {"0x80000001": [leaf.eax, leaf.ebx, leaf.ecx, leaf.edx & ~(1 << 20)]}
    )
    handled = Handled()
    source = """
        mov ecx, 0xC0000080; rdmsr; and eax, ~0x800; wrmsr   /* NX off: accepted */
        mov ecx, 0xC0000080; rdmsr; or eax, 0x800; wrmsr     /* NX on: refused */
        hlt
    """
    result = run(source, handled, vm_args={"cpuid": no_nx})
    notes = [n for code, _, n in handled.seen if code == SvmExit.EFER_WRITE_TRAP]
    assert notes == [
        {"efer": "EFER 0xd01 -> 0x501 (MMU context reset)"},
        {"refused": "EFER 0xd01 needs CPUID NX, which the guest does not have"},
    ]
    assert term_value(result.exit) == GP_TERM  # the #GP reached the guest's handler
    assert result.vm.vcpus[0].plugin_states["crtraps"].efer == 0x501


@pytest.mark.parametrize(
    ("source", "what"),
    [
        ("mov ecx, 0xC0000080; rdmsr; or eax, 0x10000; wrmsr", "reserved EFER bit 16"),
        ("mov ecx, 0xC0000080; rdmsr; and eax, ~0x100; wrmsr", "LME cleared while paging"),
        ("mov rax, 0x10; mov cr8, rax", "reserved CR8 bit"),
    ],
)
def test_writes_the_cpu_refuses_fault_and_never_reach_kvm(source: str, what: str):
    handled = Handled()
    result = run(source + "; hlt", handled)
    assert term_value(result.exit) == GP_TERM, what
    assert not [code for code, plugin, _ in handled.seen if plugin == "crtraps"], what
    kvm_copy = result.vm.vcpus[0].plugin_states["crtraps"]
    assert kvm_copy.efer == EFER_START and kvm_copy.cr8 == 0
