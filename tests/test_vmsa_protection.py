"""After LAUNCH_UPDATE_VMSA the host sees ciphertext and cannot change the state."""

import pytest
from guests import guest, launch, watched_kvm

from sevsim.arch.vmsa import VMSA, VMSA_PAGE_SIZE
from sevsim.errors import VcpuError
from sevsim.guest.snippets import TERMINATE
from sevsim.kvm.exits import Shutdown, SystemEvent

LOOP = """
    rep vmmcall                /* GHCB MSR holds SEV_INFO: an MSR request nobody handles */
""" + TERMINATE


def test_vmsa_reads_as_ciphertext():
    vm = launch(guest(LOOP))
    vcpu = vm.vcpus[0]
    page = vcpu.vmsa.host_read()
    assert len(page) == VMSA_PAGE_SIZE
    assert VMSA.get(page, "rip") != 0x20000
    with pytest.raises(VcpuError, match="protected"):
        vcpu.set_state({"rip": 0x1234})


@pytest.mark.parametrize("after_a_run", [False, True])
def test_one_changed_vmsa_byte_makes_the_next_run_a_shutdown(after_a_run):
    kvm, sim = watched_kvm()
    vm = launch(guest("hlt\n" + LOOP), kvm)
    vcpu = vm.vcpus[0]
    if after_a_run:
        vcpu.run()  # stops at HLT; the state now lives in the hardware
    offset = VMSA.offset("rip")
    byte = vcpu.vmsa.host_read(offset, 1)
    vcpu.vmsa.host_write(offset, bytes([byte[0] ^ 1]))
    exit_ = vcpu.run()
    assert isinstance(exit_, Shutdown)
    assert "integrity" in sim.why()


def test_writing_back_the_same_bytes_is_harmless():
    vm = launch(guest("hlt\n" + LOOP))
    vcpu = vm.vcpus[0]
    vcpu.run()
    vcpu.vmsa.host_write(0, vcpu.vmsa.host_read())
    assert isinstance(vcpu.run(), SystemEvent)


def test_launch_update_vmsa_runs_once():
    vm = launch(guest(LOOP))
    with pytest.raises(VcpuError, match="runs once"):
        vm.launch_update_vmsa()
