"""Issue 10's KVM rules, checked through real guests (native #VC handler, kvm, plugins).

Each test names the kernel function it follows; each would fail on the behaviour the
issue found. One-exit checks of the same rules are in ``test_fidelity_kvm.py``.
"""

from __future__ import annotations

import math
import struct

import pytest
from test_fidelity_kvm import NO_RDTSCP
from test_vc_native import GUEST_DONE, RESULTS, done, results, run

from sevsim.arch.exits import SvmExit
from sevsim.arch.ghcb_msr import GhcbMsr
from sevsim.arch.vmsa import VMSA
from sevsim.errors import VcpuError
from sevsim.guest.asm import assemble
from sevsim.guest.image import CODE, GuestImage
from sevsim.guest.snippets import TERMINATE
from sevsim.guest.vc_native import vc_image_args
from sevsim.hw import Platform, _behind
from sevsim.kvm.cpuid import CpuidModel
from sevsim.kvm.events import TeeSink
from sevsim.kvm.exits import RunFailed, Shutdown
from sevsim.kvm.vcpu import MpState
from sevsim.kvm.vm import Kvm, Vm
from sevsim.testing import GuestRun, isolated_host
from sevsim.trace import Trace
from sevsim.vmm.launch import launch_image
from sevsim.vmm.machine import Devices

ALL = ("ioio", "mmio", "msr_protocol", "crtraps")


def no_rdtscp() -> CpuidModel:
    return CpuidModel.default(Kvm().platform.caps).with_overrides(NO_RDTSCP)


def finished(r: GuestRun, era: str) -> None:
    """The guest reached its TERM_REQ: SEV_TERM, or in 5.11 KVM_RUN's -EINVAL."""
    if era == "v5.11":
        assert isinstance(r.exit, RunFailed) and "requested termination" in r.exit.why, r.exit
    else:
        done(r)


# -- 2. RDTSCP follows the guest's CPUID ----------------------------------------------------


@pytest.mark.parametrize("era", ["newest", "v5.11"])
def test_rdtscp_runs_natively_when_the_guest_cpuid_has_it(era):
    """``svm_recalc_instruction_intercepts`` clears the RDTSCP intercept for a guest whose
    CPUID has RDTSCP (5.11 never set it): ``rdtscp`` runs without a #VC, RCX = TSC_AUX."""
    r = run(f"mov rcx, {0x5A5A}; rdtscp; mov [r15], rax; mov [r15 + 8], rcx",
            vm_args={"era": era})  # fmt: skip
    finished(r, era)
    tsc, aux = results(r, 2)
    assert tsc != 0 and aux == 0
    assert "SVM_EXIT_RDTSCP" not in "\n".join(r.trace.lines)


def test_rdtscp_is_ud_when_the_guest_cpuid_lacks_it():
    """Without RDTSCP in the guest's CPUID the intercept is set: #VC, the GHCB request,
    and ``kvm_handle_invalid_op``'s #UD through EVENTINJ."""
    handler = 0x30200
    on_ud = assemble(f"mov rsi, {RESULTS}; mov qword ptr [rsi + 0x100], 6\n{TERMINATE}", handler)
    r = run("rdtscp", idt={6: handler}, data={handler: on_ud}, vm_args={"cpuid": no_rdtscp()})
    done(r)
    assert results(r, 1, RESULTS + 0x100) == (6,)  # the guest's #UD handler ran
    assert "GHCB SVM_EXIT_RDTSCP" in "\n".join(r.trace.lines)


def test_v5_11_runs_rdtscp_natively_even_without_cpuid():
    """5.11's ``init_vmcb`` never intercepted RDTSCP: the CPUID table does not matter."""
    r = run("rdtscp; mov [r15], rax", vm_args={"era": "v5.11", "cpuid": no_rdtscp()})
    finished(r, "v5.11")
    assert results(r, 1)[0] != 0


# -- 3. OSXSAVE after a CR4 write trap, through the GHCB and the MSR protocol ----------------


def test_osxsave_reads_one_after_the_cr4_write_through_ghcb_and_msr_protocol():
    """``kvm_update_cpuid_runtime`` after ``cr_trap``'s CR4 write: leaf 1 ECX[27] reads 1
    whether the #VC handler asks through the GHCB or the guest uses the MSR protocol."""
    msr_cpuid_ecx = (f"mov ecx, 0xC0010130; mov rax, {1 << 32 | 2 << 30 | GhcbMsr.CPUID_REQ}; "
                     "mov rdx, rax; shr rdx, 32; wrmsr; rep vmmcall; rdmsr; mov [r15 + {at}], rdx")
    r = run(f"""
        mov eax, 1; xor ecx, ecx; cpuid; mov [r15], rcx
        {msr_cpuid_ecx.format(at=8)}
        mov rax, cr4; or eax, {1 << 18}; mov cr4, rax
        mov eax, 1; xor ecx, ecx; cpuid; mov [r15 + 16], rcx
        {msr_cpuid_ecx.format(at=24)}
        mov ecx, 0xC0010130; mov eax, {GHCB_GPA_LOW}; xor edx, edx; wrmsr
    """, enable=ALL)  # fmt: skip
    done(r)
    assert [v >> 27 & 1 for v in results(r, 4)] == [0, 0, 1, 1]


GHCB_GPA_LOW = 0x7000  # the image's GHCB page (restored before the handler needs it again)


# -- 6. FPU/SSE state goes from the VMSA into the CPU and back -------------------------------

PI = (0xC90F_DAA2_2168_C000, 0x4000)  # pi as an 80-bit extended (mantissa, sign|exponent)


def test_sync_vmsa_fpu_state_reaches_the_guest():
    """Selftest ``sev_smoke_test``'s ``test_sync_vmsa``: the x87/SSE state the VMM set
    before launch (``sev_es_sync_vmsa`` copies it, ST registers in the VMSA's split
    layout) is what the guest's first FXSAVE finds: FCW, MXCSR, ST0 = pi, XMM0."""
    x87 = PI[0].to_bytes(8, "little") + bytes(56) + PI[1].to_bytes(2, "little") + bytes(14)
    xmm0 = bytes(range(16))
    r = run("fxsave64 [r15 + 0x200]", registers={
        "x87_fcw": 0x27F, "mxcsr": 0x1F00 | 0x3F, "x87_ftw": 0x01, "fpreg_x87": x87,
        "fpreg_xmm": xmm0 + bytes(240)})  # fmt: skip
    done(r)
    image = r.vm.memory.read(RESULTS + 0x200, 512)
    fcw, fsw, ftw = struct.unpack_from("<HHB", image, 0)
    assert (fcw, fsw, ftw) == (0x27F, 0, 0x01)
    assert struct.unpack_from("<I", image, 24)[0] == 0x1F3F
    mantissa, exponent = struct.unpack_from("<QH", image, 32)
    assert (mantissa, exponent) == PI
    assert math.isclose(mantissa / (1 << 63) * 2 ** (exponent - 0x3FFF), math.pi)
    assert image[160:176] == xmm0


def test_fpu_state_goes_back_into_the_vmsa_at_vmexit():
    """#VMEXIT saves the guest's x87/SSE state into its (encrypted) VMSA: after the guest
    changed FCW and MXCSR and pushed 1.0, the VMSA holds them (the simulator's view)."""
    r = run("""
        push 0x37b; fldcw [rsp]; pop rax
        push 0x1f40; ldmxcsr [rsp]; pop rax
        fld1
    """)
    done(r)
    # The simulator's own view of the VMSA (no hypervisor can decrypt it).
    state = VMSA.unpack(_behind(r.vm.vcpus[0].vmsa).plaintext())
    assert (state["x87_fcw"], state["mxcsr"]) == (0x37B, 0x1F40)
    assert (state["x87_fsw"] >> 11) & 7 == 7  # TOP after one push
    st0 = bytes(state["fpreg_x87"])
    assert (int.from_bytes(st0[:8], "little"), int.from_bytes(st0[64:66], "little")) == (
        1 << 63, 0x3FFF)  # fmt: skip


# -- svm_can_emulate_instruction: nothing is emulated, the guest gets #VC -------------------


def test_a_write_to_a_read_only_slot_is_a_vc_not_an_emulated_access():
    """KVM emulates a normal guest's write to a KVM_MEM_READONLY slot as MMIO; for SEV-ES
    ``svm_can_emulate_instruction`` refuses, and the NPF reaches the guest as #VC(NPF)
    (MMIO SPTE caching), whose handler sends an MMIO_WRITE request."""
    host = isolated_host(enable=ALL)
    trace = Trace()
    image = GuestImage(assemble(f"mov rax, {ROM}; mov byte ptr [rax], 0x5a\n{TERMINATE}",
                                CODE), **vc_image_args())  # fmt: skip
    vm = launch_image(Kvm(Platform(sim=TeeSink(host.sim, trace))), image,
                      handlers=host.start(), events=TeeSink(host.events, trace),
                      devices=_WithRom())  # type: ignore[arg-type]  # fmt: skip
    assert vm.vcpus[0].run(60) == GUEST_DONE
    lines = "\n".join(trace.lines)
    assert "#VC SVM_EXIT_NPF" in lines and "MMIO_WRITE" in lines
    assert vm.memory.read(ROM, 1) == b"\0"


ROM = 0x0200_0000


class _WithRom:
    """The standard devices, and a read-only RAM slot (KVM_MEM_READONLY) at ROM."""

    def __init__(self) -> None:
        self.devices = Devices.standard()

    def attach(self, vm: Vm) -> None:
        self.devices.attach(vm)
        vm.add_ram(ROM, 0x1000, "rom", readonly=True)


# -- a vCPU that shut down -------------------------------------------------------------------


def test_a_vcpu_after_shutdown_cannot_run_and_ignores_init():
    """``shutdown_interception`` cannot reinitialize an SEV-ES vCPU's encrypted VMSA (no
    ``kvm_vcpu_reset``): KVM_EXIT_SHUTDOWN, and the vCPU stays down."""
    r = run("lidt [r15 + 0x800]; ud2", data={RESULTS + 0x800: bytes(10)})
    assert r.exit == Shutdown()
    vcpu = r.vm.vcpus[0]
    vcpu.init()
    assert vcpu.mp_state is MpState.RUNNABLE
    with pytest.raises(VcpuError, match="cannot run again"):
        vcpu.run()
    assert SvmExit.SHUTDOWN == 0x7F
