"""KVM's sev_smoke_test and test_sev_es_shutdown, on sevsim."""

import pytest
from guests import guest, launch, watched_kvm

from sevsim.errors import VcpuError
from sevsim.guest.snippets import TERMINATE
from sevsim.kvm.exits import KvmExitReason, RunFailed, Shutdown, SystemEvent, SystemEventType

SMOKE = """
    mov ecx, 0xC0010131      /* MSR_AMD64_SEV */
    rdmsr
    test eax, 1              /* SEV enabled */
    jz fail
    test eax, 2              /* SEV-ES enabled */
    jz fail
""" + TERMINATE + """
fail:
    ud2
"""


def test_sev_es_guest_terminates_with_sev_term_0x100():
    vcpu = launch(guest(SMOKE)).vcpus[0]
    exit_ = vcpu.run()
    assert isinstance(exit_, SystemEvent)
    assert exit_.reason == KvmExitReason.SYSTEM_EVENT
    assert exit_.type == SystemEventType.SEV_TERM
    assert exit_.data == (0x100,)


def test_zeroed_idt_and_ud2_is_a_shutdown_and_the_vcpu_stays_dead():
    # The guest wipes its IDT, as the selftest does, then raises #UD: #UD cannot be
    # delivered (#GP), nor #GP (#DF), nor #DF: a triple fault.
    kvm, sim = watched_kvm()
    vcpu = launch(guest("""
        mov rdi, 0x6000
        xor eax, eax
        mov ecx, 512
        rep stosq
        ud2
    """, idt={6: 0x20000, 13: 0x20000, 8: 0x20000}), kvm).vcpus[0]
    exit_ = vcpu.run()
    assert isinstance(exit_, Shutdown)
    assert exit_.reason == KvmExitReason.SHUTDOWN
    assert "triple fault" in sim.why()  # the simulator's view: KVM only sees SHUTDOWN
    with pytest.raises(VcpuError, match="cannot run again"):
        vcpu.run()


def test_ud2_with_a_handler_is_delivered_through_the_idt():
    # #UD reaches the guest's own handler, which terminates: delivery works.
    vcpu = launch(guest("""
        ud2
    handler:
    """ + TERMINATE, idt={6: 0x20002})).vcpus[0]
    assert vcpu.run() == SystemEvent(SystemEventType.SEV_TERM, (0x100,))


def test_a_spinning_guest_is_interrupted_and_can_run_on():
    vcpu = launch(guest("spin: jmp spin")).vcpus[0]
    exit_ = vcpu.run(timeout=0.2)
    assert exit_ == RunFailed("EINTR", "KVM_RUN interrupted after its 0.2 s limit")
    assert isinstance(vcpu.run(timeout=0.1), RunFailed)  # still runnable
