"""NMI injection and NMI_COMPLETE: the guest's NMI handler ends with the VMGEXIT."""

import pytest

from sevsim.arch.exits import VmgExit
from sevsim.guest.image import CODE, GHCB_GPA
from sevsim.guest.snippets import TERMINATE, ghcb_vmgexit
from sevsim.kvm.exits import Hlt, SystemEvent
from sevsim.testing import run_guest

pytest_plugins = ["sevsim.testing"]

COUNT = GHCB_GPA + 0x800  # NMIs the guest handled, in the shared page
#: A 2-byte jump over the NMI handler, which starts at CODE + 2.
GUEST = f"""
    jmp main
    push rax; push rcx; push rdx; push rdi; push rsi
    mov rsi, {COUNT}; inc qword ptr [rsi]
    {ghcb_vmgexit(VmgExit.NMI_COMPLETE)}
    pop rsi; pop rdi; pop rdx; pop rcx; pop rax
    iretq
main:
    hlt
    mov rsi, {COUNT}; cmp qword ptr [rsi], 2
    jb main
    {TERMINATE}
"""


def handled(run) -> int:
    return int.from_bytes(run.vm.memory.read(COUNT, 8), "little")


def test_queued_nmis_are_injected_one_per_nmi_complete():
    run = run_guest(GUEST, enable=["nmi", "msr_protocol"], idt={2: CODE + 2})
    vcpu = run.vm.vcpus[0]
    assert run.exit == Hlt()
    for _ in range(3):
        vcpu.nmi()  # KVM_NMI three times: at most two can be pending
    assert isinstance(vcpu.run(), SystemEvent)
    assert handled(run) == 2
    nmi = vcpu.nmi_state
    assert (nmi.pending, nmi.masked, nmi.window_exits) == (0, False, 2)
    text = "\n".join(run.trace.lines)
    assert text.count("nmi: NMIs unmasked") == 2


def test_without_the_plugin_nmis_stay_masked_after_the_first():
    run = run_guest(GUEST, enable=["msr_protocol"], idt={2: CODE + 2})
    vcpu = run.vm.vcpus[0]
    vcpu.nmi()
    vcpu.nmi()
    assert vcpu.run() == Hlt()  # the guest waits for a second NMI that never comes
    assert handled(run) == 1
    assert (vcpu.nmi_state.pending, vcpu.nmi_state.masked) == (1, True)
    assert "error INVALID_EVENT" in "\n".join(run.trace.lines)


@pytest.mark.parametrize(("queued", "pending"), [(1, 1), (2, 2), (5, 2)])
def test_at_most_two_nmis_wait_while_unmasked(queued, pending):
    """``process_nmi``: one in service plus one latched, whatever KVM_NMI was called."""
    run = run_guest("hlt", enable=["nmi", "msr_protocol"], idt={2: CODE})
    vcpu = run.vm.vcpus[0]
    for _ in range(queued):
        vcpu.nmi()
    vcpu.nmi_state.process()
    assert vcpu.nmi_state.pending == pending
