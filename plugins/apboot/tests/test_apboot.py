"""AP_JUMP_TABLE, AP_HLT_LOOP and the MSR AP reset hold, with the SIPI that releases."""

import re

import pytest

from sevsim.arch.exits import GhcbErr, VmgExit
from sevsim.arch.ghcb import GHCB_SAVE_AREA
from sevsim.arch.ghcb_msr import GhcbMsr
from sevsim.errors import VcpuError
from sevsim.guest.image import GHCB_GPA
from sevsim.guest.snippets import TERMINATE, ghcb_vmgexit
from sevsim.kvm.exits import ApResetHold, RunFailed, SystemEvent
from sevsim.kvm.vcpu import MpState
from sevsim.testing import ExitDriver, isolated_host, run_guest

pytest_plugins = ["sevsim.testing"]

RESULT = GHCB_GPA + 0x800  # the shared page: the host reads the guest's findings there
INFO2 = GHCB_SAVE_AREA.offset("sw_exit_info_2")
ENABLE = ["apboot", "msr_protocol"]
NMI_HANDLER = 0x30000


def driver(era: str = "newest") -> ExitDriver:
    return ExitDriver(isolated_host(enable=["apboot"]).start(), era=era)


def jump_table(d: ExitDriver, subcode: int, value: int = 0) -> tuple[int, int]:
    out = d.vmgexit({"sw_exit_code": VmgExit.AP_JUMP_TABLE, "sw_exit_info_1": subcode,
                     "sw_exit_info_2": value})  # fmt: skip
    assert out.exit is None and out.ghcb is not None
    return out.ghcb["sw_exit_info_1"], out.ghcb["sw_exit_info_2"]


def test_jump_table_set_then_get_is_per_vm():
    d, other = driver(), driver()
    assert jump_table(d, 0, 0x8_0000) == (0, 0)
    assert jump_table(d, 1) == (0, 0x8_0000)
    assert jump_table(other, 1) == (0, 0)  # another VM has its own
    assert d.vm.plugin_states["apboot"].address == 0x8_0000


@pytest.mark.parametrize(
    ("era", "reply"),
    [("newest", (2, GhcbErr.INVALID_INPUT)), ("v5.11", (1, 0x8000_0306))],
)
def test_unknown_jump_table_subcode(era, reply):
    """Newest KVM: INVALID_INPUT; 5.11 asked the guest to raise #UD."""
    assert jump_table(driver(era), 2) == reply


def hold_loop(park: str, released: str) -> str:
    """Park until the reply says "released" (as Linux's sev_es_ap_hlt_loop does; the
    ``released`` check sets ZF while still held), counting the parks in RESULT + 8,
    then read the jump table back and terminate."""
    return f"""
        {ghcb_vmgexit(VmgExit.AP_JUMP_TABLE, 0, 0x9000)}
    park:
        mov rsi, {RESULT}; inc qword ptr [rsi + 8]
        {park}
        {released}
        jz park
        {ghcb_vmgexit(VmgExit.AP_JUMP_TABLE, 1)}
        mov rax, [rdi + {INFO2}]; mov rsi, {RESULT}; mov [rsi], rax
        {TERMINATE}
    """


NAE = hold_loop(ghcb_vmgexit(VmgExit.AP_HLT_LOOP), f"cmp qword ptr [rdi + {INFO2}], 0")
MSR = hold_loop(
    f"mov ecx, 0xC0010130; mov eax, {GhcbMsr.AP_RESET_HOLD_REQ}; xor edx, edx; wrmsr; "
    "rep vmmcall; rdmsr",
    f"cmp eax, {GhcbMsr.AP_RESET_HOLD_RESP}",  # result 0 in bits 63:12: still held
)


@pytest.mark.parametrize("source", [NAE, MSR], ids=["ap_hlt_loop", "msr_ap_reset_hold"])
def test_a_parked_vcpu_waits_for_its_second_sipi(source):
    """``kvm_emulate_ap_reset_hold`` with the in-kernel LAPIC's mp_state (sevsim's SIPI is
    ``sev_vcpu_deliver_sipi_vector``): a held vCPU's KVM_RUN returns -EINTR where KVM's
    ``vcpu_block`` would wait, until the second SIPI releases it (README, "Known
    differences from KVM")."""
    run = run_guest(source, enable=ENABLE)
    vcpu = run.vm.vcpus[0]
    assert run.exit == ApResetHold() and vcpu.mp_state == MpState.AP_RESET_HOLD
    if source is MSR:  # the reply (result 0) is traced although KVM_RUN exits
        assert "reply        0x0000000000000007  AP_RESET_HOLD_RESP" in "\n".join(run.trace.lines)
    blocked = vcpu.run()
    assert isinstance(blocked, RunFailed) and blocked.errno == "EINTR"
    vcpu.deliver_sipi(0x10)  # the first SIPI: swallowed (the AP started from its VMSA)
    assert vcpu.mp_state == MpState.RUNNABLE
    assert vcpu.run() == ApResetHold()  # not released: the guest parked again
    vcpu.deliver_sipi(0x10)
    assert isinstance(vcpu.run(), SystemEvent)
    parked = int.from_bytes(run.vm.memory.read(RESULT + 8, 8), "little")
    assert parked == 2  # the second park was answered "released"
    assert int.from_bytes(run.vm.memory.read(RESULT, 8), "little") == 0x9000


def test_an_nmi_wakes_a_parked_vcpu_which_parks_again():
    """vcpu_block: a pending NMI makes the vCPU runnable; KVM answered nothing, so
    once its NMI handler returns the guest asks again."""
    run = run_guest(NAE, enable=[*ENABLE, "nmi"], idt={2: NMI_HANDLER},
                    data={NMI_HANDLER: b"\x48\xcf"})  # iretq  # fmt: skip
    vcpu = run.vm.vcpus[0]
    vcpu.nmi()
    assert vcpu.run() == ApResetHold()
    assert int.from_bytes(run.vm.memory.read(RESULT + 8, 8), "little") == 2
    assert vcpu.plugin_states["nmi"].masked  # delivered (the handler did not send NMI_COMPLETE)
    vcpu.nmi()  # a new KVM_NMI wakes it (KVM_REQ_NMI), but cannot be injected: masked
    assert vcpu.run() == ApResetHold() and vcpu.plugin_states["nmi"].pending == 1
    blocked = vcpu.run()  # a pending NMI that is not allowed does not wake it again
    assert isinstance(blocked, RunFailed) and blocked.errno == "EINTR"


def test_sipi_vector_must_be_a_byte():
    run = run_guest("hlt", enable=ENABLE)
    with pytest.raises(VcpuError, match=re.escape("SIPI vector 256 is not in 0..0xff")):
        run.vm.vcpus[0].deliver_sipi(256)
