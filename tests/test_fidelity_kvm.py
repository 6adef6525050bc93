"""Issue 10's KVM rules, checked one exit or one ioctl at a time (no guest CPU).

Each test names the kernel function it follows; each would fail on the behaviour the
issue found. Guest-level checks of the same rules are in ``test_fidelity_guest.py``.
"""

from __future__ import annotations

import pytest
from test_vmgexit import PLUGINS, page, reply

from sevsim import hookimpl
from sevsim.arch import msr as M
from sevsim.arch.exits import GhcbErr, SvmExit, VmgExit
from sevsim.arch.ghcb_msr import GhcbMsr, cpuid_req, sev_info_resp
from sevsim.arch.vmcb import VMCB_CONTROL
from sevsim.arch.vmsa import VMSA
from sevsim.errors import VcpuError
from sevsim.kvm.cpuid import CpuidModel
from sevsim.kvm.dispatch import ExitHandler, ExitKind
from sevsim.kvm.exits import InternalError, InternalErrorSub, RunFailed
from sevsim.kvm.protected import STATE_IOCTLS
from sevsim.kvm.svm_setup import RDTSCP_BIT
from sevsim.kvm.vm import KVM_CAP_X86_SMM, Kvm
from sevsim.testing import ExitDriver, isolated_host

pytest_plugins = ["sevsim.testing"]

#: The guest's CPUID table with RDTSCP (0x80000001 EDX bit 27) taken out.
NO_RDTSCP = {"0x80000001": [0x0080_0F12, 0, 0x121, 0x2FD3_FBFF & ~(1 << 27)]}
RDPRU_BIT = 142
CR4_OSXSAVE = 1 << 18


def driver(era: str = "newest", **vm_args: object) -> ExitDriver:
    return ExitDriver(isolated_host(enable=(*PLUGINS, "crtraps")).start(), era=era, **vm_args)


def table_without_rdtscp() -> CpuidModel:
    return CpuidModel.default(Kvm().platform.caps).with_overrides(NO_RDTSCP)


def intercepts(d: ExitDriver) -> int:
    return int.from_bytes(VMCB_CONTROL.get(d.vcpu.vmcb, "intercepts"), "little")


# -- 2. intercepts that follow the guest's CPUID ------------------------------------------


@pytest.mark.parametrize(
    ("era", "cpuid", "intercepted"),
    [("newest", None, False), ("newest", NO_RDTSCP, True), ("v5.11", None, False),
     ("v5.11", NO_RDTSCP, False)],
    ids=["newest-has-rdtscp", "newest-lacks-rdtscp", "v5.11-has", "v5.11-lacks"],
)  # fmt: skip
def test_rdtscp_is_intercepted_only_when_the_guest_cpuid_lacks_it(era, cpuid, intercepted):
    """``svm_recalc_instruction_intercepts`` (5.13+): the RDTSCP intercept is set only when
    the guest's CPUID lacks RDTSCP; 5.11's ``init_vmcb`` never set it."""
    table = table_without_rdtscp() if cpuid else None
    d = driver(era, cpuid=table) if table else driver(era)
    assert bool(intercepts(d) >> RDTSCP_BIT & 1) is intercepted


@pytest.mark.parametrize("era", ["newest", "v5.11"])
def test_rdpru_is_always_intercepted(era):
    """``init_vmcb`` sets INTERCEPT_RDPRU unconditionally (KVM never offers RDPRU), so an
    SEV-ES guest's RDPRU is a #VC, not a native instruction."""
    assert intercepts(driver(era)) >> RDPRU_BIT & 1


def test_rdpru_through_the_ghcb_is_an_invalid_event():
    """``sev_es_validate_vmgexit`` has no case for SVM_EXIT_RDPRU: INVALID_EVENT."""
    assert reply(driver().vmgexit(page(SvmExit.RDPRU))) == (2, GhcbErr.INVALID_EVENT)


# -- 3. CPUID's runtime bits through the GHCB and the MSR protocol ---------------------------


def test_osxsave_follows_a_cr4_write_trap_through_ghcb_and_msr_protocol():
    """``kvm_update_cpuid_runtime`` (from ``kvm_post_set_cr4`` after ``cr_trap``): leaf 1
    ECX[27] OSXSAVE mirrors CR4.OSXSAVE, whichever way the guest asks."""
    d = driver()
    before = d.vmgexit(page(SvmExit.CPUID, rax=1, rcx=0)).ghcb
    assert before is not None and not before["rcx"] >> 27 & 1
    d.vmexit(SvmExit.CR4_WRITE_TRAP, info1=CR4_OSXSAVE | M.CR4_PAE)
    after = d.vmgexit(page(SvmExit.CPUID, rax=1, rcx=0)).ghcb
    assert after is not None and after["rcx"] >> 27 & 1
    assert d.msr_protocol(cpuid_req(1, 2)).msr >> (32 + 27) & 1  # register 2 = ECX


def test_ospke_follows_cr4_pke_when_the_guest_has_pku():
    """``kvm_update_cpuid_runtime``: leaf 7 ECX[4] OSPKE mirrors CR4.PKE (PKU offered)."""
    kvm = Kvm()
    table = CpuidModel.default(kvm.platform.caps).with_overrides({"0x7": [0, 0x89, 1 << 3, 0]})
    d = driver(cpuid=table)
    assert not d.msr_protocol(cpuid_req(7, 2)).msr >> (32 + 4) & 1
    d.vmexit(SvmExit.CR4_WRITE_TRAP, info1=M.CR4_PKE | M.CR4_PAE)
    assert d.msr_protocol(cpuid_req(7, 2)).msr >> (32 + 4) & 1


def test_apic_bit_follows_apic_base_enable():
    """``kvm_update_cpuid_runtime``: leaf 1 EDX[9] APIC mirrors APIC_BASE's global enable."""
    d = driver()
    assert d.msr_protocol(cpuid_req(1, 3)).msr >> (32 + 9) & 1
    d.vcpu._set_msr(M.MSR_IA32_APICBASE, 0xFEE0_0000)  # the guest's WRMSR, enable cleared
    assert not d.msr_protocol(cpuid_req(1, 3)).msr >> (32 + 9) & 1


def test_leaf_0xd_sizes_follow_xcr0_and_xss():
    """``kvm_update_cpuid_runtime``: 0xD.0 EBX is the XSAVE size of XCR0 (learnt from the
    GHCB), 0xD.1 EBX that of XCR0 | XSS when XSAVES or XSAVEC is offered."""
    kvm = Kvm()
    table = CpuidModel.default(kvm.platform.caps).with_overrides({"0xd.1": [0b1011, 0, 0, 0]})
    d = driver(cpuid=table)
    out = d.vmgexit(page(SvmExit.CPUID, rax=0xD, rcx=0, xcr0=7)).ghcb
    assert out is not None and out["rbx"] == 0x340
    assert d.msr_protocol(cpuid_req(0xD, 1)).msr >> 32 == 0x340  # index 0 over the MSR
    out = d.vmgexit(page(SvmExit.CPUID, rax=0xD, rcx=1, xcr0=3)).ghcb
    assert out is not None and out["rbx"] == 0x240


# -- 4. SEV_INFO's C-bit -------------------------------------------------------------------


def test_sev_info_takes_the_host_c_bit_at_reset_and_in_the_reply():
    """``sev_es_vcpu_reset`` and ``sev_handle_vmgexit_msr_protocol`` both use the host's
    ``sev_enc_bit``, never the guest's CPUID table (here overridden to say 47)."""
    kvm = Kvm()
    caps = kvm.platform.caps
    leaf = caps.cpuid()
    table = CpuidModel.default(caps).with_overrides(
        {"0x8000001f": [leaf.eax, leaf.ebx & ~0x3F | 47, leaf.ecx, leaf.edx]})  # fmt: skip
    d = driver(cpuid=table)
    host = sev_info_resp(2, 1, caps.c_bit)
    assert caps.c_bit != 47
    assert VMCB_CONTROL.get(d.vcpu.vmcb, "ghcb_gpa") == host
    assert d.msr_protocol(GhcbMsr.SEV_INFO_REQ).msr == host


# -- 5. the scratch area of a plugin's own exit code ------------------------------------------


class _ScratchReader:
    """A plugin with its own exit code that reads 8 bytes of scratch."""

    CODE = 0x8000_1000

    @hookimpl
    def sevsim_exit_handlers(self):
        def read(ctx):
            scratch = ctx.map_scratch(8, sync=False)
            if hasattr(scratch, "data"):
                ctx.success(int.from_bytes(bytes(scratch.data), "little"))
            return None if hasattr(scratch, "data") else scratch

        yield ExitHandler(ExitKind.VMGEXIT, self.CODE, read)


def test_scratch_without_its_valid_bit_is_zero_for_a_plugin_exit():
    """``sev_es_sync_from_ghcb`` (v6.5+) snapshots ``sw_scratch`` only when valid, and
    ``setup_vmgexit_scratch`` uses the snapshot: 0 is an invalid scratch area, even
    with a good GPA in the page."""
    d = ExitDriver(isolated_host({"reader": _ScratchReader()}).start())
    d.vm.memory.write(0x9000, (0x1122_3344).to_bytes(8, "little"))
    g = page(_ScratchReader.CODE, sw_scratch=0x9000)
    assert reply(d.vmgexit(g)) == (0, 0x1122_3344)
    g.set_valid("sw_scratch", False)
    assert reply(d.vmgexit(g)) == (2, GhcbErr.INVALID_SCRATCH_AREA)


# -- 7. sev_es_sync_vmsa's own adjustments -----------------------------------------------------


def test_sync_vmsa_applies_kvms_setters_to_the_vmms_state():
    """``sev_es_sync_vmsa`` copies the VMCB save area as ``svm_set_efer`` (EFER.SVME),
    ``svm_set_cr0`` (CD/NW cleared) and ``svm_set_cr4`` (the host's CR4.MCE) left it,
    with KVM's XCR0 (1) and DR6 (0xffff0ff0) where the VMM set none."""
    d = driver()
    d.vcpu.set_state({"efer": M.EFER_LME, "cr0": M.CR0_PE | M.CR0_CD | M.CR0_NW, "cr4": 0})
    d.vcpu.sync_vmsa()
    page_ = d.vcpu.vmsa.host_read()
    assert VMSA.get(page_, "efer") == M.EFER_LME | M.EFER_SVME
    assert VMSA.get(page_, "cr0") == M.CR0_PE
    assert VMSA.get(page_, "cr4") == M.CR4_MCE
    assert (VMSA.get(page_, "xcr0"), VMSA.get(page_, "dr6")) == (1, 0xFFFF_0FF0)
    assert (VMSA.get(page_, "x87_fcw"), VMSA.get(page_, "mxcsr")) == (0x37F, 0x1F80)


# -- 8 to 11: the 5.11 era -------------------------------------------------------------------


@pytest.mark.parametrize("code", [SvmExit.XSETBV, VmgExit.HV_FEATURES, VmgExit.TERM_REQUEST],
                         ids=hex)  # fmt: skip
def test_v5_11_validation_failure_fills_the_internal_error_then_fails_with_einval(code):
    """5.11's ``sev_es_validate_vmgexit`` sets KVM_EXIT_INTERNAL_ERROR and returns -EINVAL
    (HV_FEATURES and TERM_REQUEST were unknown codes then)."""
    out = driver("v5.11").vmgexit(page(code))
    assert isinstance(out.exit, RunFailed) and out.exit.errno == "EINVAL"
    assert out.exit.exit == InternalError(InternalErrorSub.UNEXPECTED_EXIT_REASON, (code, 0),
                                          out.exit.exit.why)  # fmt: skip


@pytest.mark.parametrize(("era", "errno"), [("newest", "EFAULT"), ("v5.11", "EINVAL")])
def test_unreadable_scratch_area_fails_kvm_run(era, errno):
    """``setup_vmgexit_scratch``: a scratch buffer ``kvm_read_guest`` cannot read is
    -EFAULT since aa9f58415a8e; 5.11 returned false, and its callers -EINVAL."""
    g = page(VmgExit.MMIO_WRITE, 0xD000_0000, 8, sw_scratch=0x4000_0000)  # beyond RAM
    out = driver(era).vmgexit(g)
    assert isinstance(out.exit, RunFailed) and out.exit.errno == errno


def test_v5_11_rdtscp_through_the_ghcb_is_an_internal_error():
    """5.11's ``svm_exit_handlers[]`` had no RDTSCP entry: ``svm_invoke_exit_handler``
    fills KVM_EXIT_INTERNAL_ERROR, data [0x87, last vCPU] and returns 0 (exit, no -errno);
    newest KVM's ``kvm_handle_invalid_op`` queues #UD instead."""
    out = driver("v5.11").vmgexit(page(SvmExit.RDTSCP))
    assert isinstance(out.exit, InternalError) and out.exit.data == (0x87, 0)
    assert driver().vmgexit(page(SvmExit.RDTSCP)).exit is None


@pytest.mark.parametrize(("era", "moved"), [("newest", 4), ("v5.11", 2)])
def test_string_in_length(era, moved):
    """``sev_es_string_io``: REP INSW of 2 elements moves 4 bytes; 5.11 sized the scratch
    area as ``exit_info_2`` bytes (fixed by 019057bd73d1), so only 2 reach the guest."""
    d = driver(era)
    info1 = 0x1234 << 16 | 2 << 4 | 4 << 7 | 1 << 3 | 1 << 2 | 1  # rep insw, unclaimed port
    d.vm.memory.write(0x9000, b"\xee" * 8)
    d.vmgexit(page(SvmExit.IOIO, info1, 2, sw_scratch=0x9000))
    assert d.vm.memory.read(0x9000, 8) == (b"\xff" * moved).ljust(8, b"\xee")


def test_v5_11_accepts_0x9000_words_as_a_byte_count():
    """5.11's ``sev_es_string_io`` checked ``exit_info_2`` (0x9000) against the 64 KiB
    limit as bytes; newest KVM sees 0x12000 bytes and refuses the area."""
    info1 = 0x80 << 16 | 2 << 4 | 4 << 7 | 1 << 3 | 1 << 2  # rep outsw to the POST port
    g = page(SvmExit.IOIO, info1, 0x9000, sw_scratch=0x10000)
    assert reply(driver("v5.11").vmgexit(g)) == (0, 0)
    assert reply(driver().vmgexit(g)) == (2, GhcbErr.INVALID_SCRATCH_AREA)


# -- 12. the second SIPI ---------------------------------------------------------------------


@pytest.mark.parametrize(("era", "info"), [("v5.11", (1, 1)), ("newest", (1, 0x8000_030D))])
def test_second_sipi_writes_info_2_into_whatever_ghcb_is_mapped_in_v5_11(era, info):
    """5.11's ``sev_vcpu_deliver_sipi_vector`` had no hold type: a second SIPI set only
    ``sw_exit_info_2`` = 1 in the GHCB still mapped from the last exit (here a refused
    RDMSR, whose #GP reply it spoils); newest KVM answers only a reset hold."""
    d = driver(era)
    d.vcpu.deliver_sipi(0)  # the first SIPI is swallowed: the AP starts from its VMSA
    d.vm.memory.write(0x7000, page(SvmExit.MSR, 0, 0, rcx=0x1234_5678).raw)
    VMCB_CONTROL.set(d.vcpu.vmcb, "exit_code", SvmExit.VMGEXIT)
    VMCB_CONTROL.set(d.vcpu.vmcb, "ghcb_gpa", 0x7000)
    d.vcpu.handle_exit()  # KVM keeps the GHCB mapped until the next entry
    d.vcpu.deliver_sipi(0)
    after = d.vm.memory.read(0x7000 + 0x398, 16)  # sw_exit_info_1, sw_exit_info_2
    assert (int.from_bytes(after[:8], "little"), int.from_bytes(after[8:], "little")) == info


# -- the series' refusals ---------------------------------------------------------------------


def launched(era: str = "newest") -> ExitDriver:
    d = driver(era)
    d.vm.launch_start()
    d.vm.launch_update_vmsa()
    return d


@pytest.mark.parametrize("era", ["newest", "v5.11"])
def test_set_guest_debug_is_refused_once_protected(era):
    """``kvm_arch_vcpu_ioctl_set_guest_debug``: -EINVAL when ``guest_state_protected``
    (8d4846b9b150, in every SEV-ES era); set before launch, LAUNCH_UPDATE_VMSA refuses."""
    with pytest.raises(VcpuError, match="KVM_SET_GUEST_DEBUG refused"):
        launched(era).vcpu.set_guest_debug(1)
    d = driver(era)
    d.vcpu.set_guest_debug(1)
    d.vm.launch_start()
    with pytest.raises(VcpuError, match="LAUNCH_UPDATE_VMSA"):
        d.vm.launch_update_vmsa()


@pytest.mark.parametrize("ioctl", STATE_IOCTLS)
def test_state_ioctls_fail_for_a_protected_vcpu_of_an_sev_es_vm(ioctl):
    """``kvm_arch_vcpu_ioctl`` checks ``vcpu->kvm->arch.has_protected_state`` (a
    KVM_X86_SEV_ES_VM) with ``guest_state_protected``: -EINVAL for each state ioctl."""
    d = launched()
    with pytest.raises(VcpuError, match="-EINVAL"):
        if ioctl.startswith("KVM_GET_"):
            d.vcpu.get_state(ioctl)
        else:
            d.vcpu.set_state({}, ioctl)


def test_v5_11_state_ioctls_answer_from_kvms_stale_copy():
    """A 5.11 VM (KVM_SEV_ES_INIT, no ``has_protected_state``) accepts the ioctls: GET_REGS
    gives ``vcpu->arch.regs`` as ``sev_es_sync_from_ghcb`` left them, SET_REGS changes
    that copy (RAX..RDX reach the GHCB at ``sev_es_sync_to_ghcb``), never the VMSA."""
    d = launched("v5.11")
    before = d.vcpu.vmsa.host_read()
    d.vcpu.set_state({"rip": 0x1234, "rbx": 7}, "KVM_SET_REGS")
    assert d.vcpu.vmsa.host_read() == before
    state = d.vcpu.get_state("KVM_GET_REGS")
    assert (state["rip"], state["rbx"]) == (0x1234, 7)
    out = d.vmgexit(page(SvmExit.CPUID, rax=0, rcx=0, rbx=5))
    assert out.ghcb is not None
    assert d.vcpu.get_state("KVM_GET_REGS")["rax"] == 0xD == out.ghcb["rax"]


def test_state_ioctls_before_launch_and_their_checks():
    """Before LAUNCH_UPDATE_VMSA the ioctls work on the state ``sev_es_sync_vmsa`` will
    copy; a field outside the ioctl's group, or an unknown ioctl, is the VMM's error."""
    d = driver()
    d.vcpu.set_state({"x87_fcw": 0x27F}, "KVM_SET_FPU")
    assert d.vcpu.get_state("KVM_GET_FPU")["x87_fcw"] == 0x27F
    assert d.vcpu.get_state("KVM_GET_DEBUGREGS")["dr6"] == 0xFFFF_0FF0
    with pytest.raises(VcpuError, match="does not set"):
        d.vcpu.set_state({"rip": 1}, "KVM_SET_FPU")
    with pytest.raises(VcpuError, match="KVM_GET_REGS"):
        d.vcpu.get_state("KVM_GET_MSRS")


def test_smm_is_not_offered_to_an_sev_es_vm():
    """KVM_CAP_X86_SMM asks ``svm_has_emulated_msr(kvm, MSR_IA32_SMBASE)``: false for an
    SEV-ES VM (both eras), true for /dev/kvm with no VM."""
    kvm = Kvm()
    assert kvm.check_extension(KVM_CAP_X86_SMM) == 1
    for era in ("newest", "v5.11"):
        assert kvm.create_vm(era=era).check_extension(KVM_CAP_X86_SMM) == 0
