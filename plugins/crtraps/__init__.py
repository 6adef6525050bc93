"""CR0/CR4/CR8/EFER write traps (patch "Support CR0/CR4/CR8/EFER update tracking").

KVM cannot intercept an SEV-ES guest's control-register writes the usual way: it
could not read the source register, nor write the result into the encrypted VMSA.
So ``sev_es_init_vmcb`` drops the CR read/write intercepts and arms *trap* intercepts
instead. The write retires in the guest, then the hardware exits with the new value
in ``exit_info_1`` and RIP already past the instruction. These are automatic exits,
not GHCB requests: the guest's #VC handler is not involved.

KVM uses them only to keep its own copy of the registers current: for an ordinary
guest KVM reads them from the VMCB save area, for an SEV-ES guest that is the
encrypted VMSA, so the copy (:class:`ControlRegs`, this plugin's per-vCPU state) is
all it has. It starts from the VMM's state before launch and follows the traps;
KVM_GET_SREGS, the MMU role, LMA and CPUID's OSXSAVE/OSPKE bits come from it. A
value KVM refuses (an EFER bit the guest's CPUID does not offer, LME toggled while
paging) gets a #GP through EVENTINJ, as ``kvm_complete_insn_gp`` does, even though
the write has already happened.

=========  ============  =================================================
exit       KVM handler   what changes in KVM's copy
=========  ============  =================================================
0x08f      efer_trap     EFER (SVME masked, LMA kept as KVM computes it)
0x090      cr_trap       CR0; LMA follows when PG toggles under EFER.LME
0x094      cr_trap       CR4 (and CPUID's OSXSAVE/OSPKE with it)
0x098      cr_trap       CR8 (the TPR; the CPU already refused reserved bits)
=========  ============  =================================================

Without this plugin KVM's copy stays at the launch values: what a KVM without the
patch would believe of the guest. The trace notes what changed, and when KVM would
reset its MMU context.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from attrs import define

from sevsim import hookimpl
from sevsim.arch import msr as M
from sevsim.arch.exits import SvmExit
from sevsim.arch.vectors import Vector
from sevsim.kvm.context import ExitContext, VcpuView
from sevsim.kvm.dispatch import ExitHandler, ExitKind

_CR0_WRITE_TRAP = SvmExit.CR0_WRITE_TRAP  # bound once: cheaper than the Enum attribute
#: Bits whose change makes KVM rebuild its MMU context (KVM_MMU_*_ROLE_BITS).
CR0_ROLE_BITS = M.CR0_PG | M.CR0_WP
CR4_ROLE_BITS = M.CR4_PSE | M.CR4_PAE | M.CR4_SMEP | M.CR4_SMAP | M.CR4_PKE | M.CR4_LA57
EFER_ROLE_BITS = M.EFER_LME | M.EFER_NX
#: EFER bits KVM accepts at all (``efer_reserved_bits`` cleared on an SVM host).
EFER_KNOWN = (M.EFER_SCE | M.EFER_LME | M.EFER_LMA | M.EFER_NX | M.EFER_SVME | M.EFER_FFXSR
              | M.EFER_AUTOIBRS)  # fmt: skip
#: EFER bits and the CPUID bit (leaf 0x80000001 EDX / ECX, leaf 0x80000021 EAX) a guest
#: needs for each (``__kvm_valid_efer``).
_EFER_NEEDS = (
    (M.EFER_LME | M.EFER_LMA, 0x8000_0001, "edx", 29, "LM"),
    (M.EFER_NX, 0x8000_0001, "edx", 20, "NX"),
    (M.EFER_FFXSR, 0x8000_0001, "edx", 25, "FFXSR"),
    (M.EFER_SVME, 0x8000_0001, "ecx", 2, "SVM"),
    (M.EFER_AUTOIBRS, 0x8000_0021, "eax", 8, "AUTOIBRS"),
)


@define
class ControlRegs:
    """The values KVM believes the guest's control registers hold (``vcpu->arch.cr0``...)."""

    #: ``kvm_vcpu_reset``: CD | NW | ET, until the VMM sets its own.
    cr0: int = M.CR0_CD | M.CR0_NW | M.CR0_ET
    cr4: int = 0
    #: The task-priority register (no in-kernel LAPIC: KVM keeps it here).
    cr8: int = 0
    #: Without EFER.SVME, which KVM's copy never shows the guest.
    efer: int = 0

    def load(self, state: Mapping[str, Any]) -> None:
        """KVM_SET_SREGS before launch: the VMM's CR0/CR4/EFER and V_TPR (VMSA names)."""
        fresh = ControlRegs()
        self.cr0 = state.get("cr0", fresh.cr0)
        self.cr4 = state.get("cr4", fresh.cr4)
        self.efer = state.get("efer", fresh.efer) & ~M.EFER_SVME
        self.cr8 = state.get("vintr_ctrl", 0) & 0xF  # V_TPR

    @property
    def paging(self) -> bool:
        """``is_paging``: CR0.PG as KVM last saw it."""
        return bool(self.cr0 & M.CR0_PG)


@hookimpl
def sevsim_vcpu_state() -> ControlRegs:
    return ControlRegs()


@hookimpl
def sevsim_vcpu_reset(vcpu: VcpuView) -> None:
    """The VMM set the vCPU's registers before launch: KVM's copy starts from them."""
    vcpu.state.load(vcpu.initial_state)


def _changes(name: str, old: int, new: int, role_bits: int) -> str:
    text = f"{name} {old:#x} -> {new:#x}"
    return text + (" (MMU context reset)" if (old ^ new) & role_bits else "")


def _refuse(ctx: ExitContext, why: str) -> None:
    """``kvm_complete_insn_gp`` with an error: #GP through EVENTINJ."""
    ctx.notes["refused"] = why
    ctx.queue_exception(Vector.GP, 0)


def set_cr0(regs: ControlRegs, cr0: int) -> None:
    """``svm_set_cr0``: under EFER.LME, turning paging on or off sets or clears LMA."""
    if regs.efer & M.EFER_LME:
        if not regs.paging and cr0 & M.CR0_PG:
            regs.efer |= M.EFER_LMA
        elif regs.paging and not cr0 & M.CR0_PG:
            regs.efer &= ~M.EFER_LMA
    regs.cr0 = cr0


def cr_trap(ctx: ExitContext) -> None:
    """``cr_trap``: the CR number is the exit code's distance from CR0_WRITE_TRAP."""
    regs: ControlRegs = ctx.vcpu.state
    new = ctx.exit_info_1
    match ctx.code - _CR0_WRITE_TRAP:
        case 0:
            old = regs.cr0
            set_cr0(regs, new)
            ctx.notes["cr0"] = _changes("CR0", old, new, CR0_ROLE_BITS)
        case 4:
            ctx.notes["cr4"] = _changes("CR4", regs.cr4, new, CR4_ROLE_BITS)
            regs.cr4 = new
            ctx.vcpu.set_cpuid_runtime(cr4=new)  # kvm_post_set_cr4: OSXSAVE, OSPKE
        case 8:
            ctx.notes["cr8"] = f"TPR {regs.cr8} -> {new}"
            regs.cr8 = new


def efer_refusal(ctx: ExitContext, efer: int) -> str | None:
    """Why ``set_efer`` would refuse ``efer`` from the guest, or None."""
    unknown = efer & ~EFER_KNOWN
    if unknown:
        return f"EFER {efer:#x} sets bits {unknown:#x} KVM does not support"
    for bits, function, register, bit, feature in _EFER_NEEDS:
        if efer & bits and not getattr(ctx.vcpu.cpuid(function), register) >> bit & 1:
            return f"EFER {efer:#x} needs CPUID {feature}, which the guest does not have"
    regs: ControlRegs = ctx.vcpu.state
    if regs.paging and (regs.efer ^ efer) & M.EFER_LME:
        return "EFER.LME cannot change while paging is on"
    return None


def efer_trap(ctx: ExitContext) -> None:
    """``efer_trap``: a guest-initiated EFER write, SVME masked off (KVM's CPUID may
    not offer SVM to the guest, but the hardware EFER of a guest always has it)."""
    efer = ctx.exit_info_1 & ~M.EFER_SVME
    why = efer_refusal(ctx, efer)
    if why is not None:
        _refuse(ctx, why)
        return
    regs: ControlRegs = ctx.vcpu.state
    new = efer & ~M.EFER_LMA | regs.efer & M.EFER_LMA  # LMA is KVM's to compute
    ctx.notes["efer"] = _changes("EFER", regs.efer, new, EFER_ROLE_BITS)
    regs.efer = new


@hookimpl
def sevsim_exit_handlers() -> Iterator[ExitHandler]:
    kind = ExitKind.VMEXIT
    yield ExitHandler(kind, SvmExit.EFER_WRITE_TRAP, efer_trap)
    for code in (SvmExit.CR0_WRITE_TRAP, SvmExit.CR4_WRITE_TRAP, SvmExit.CR8_WRITE_TRAP):
        yield ExitHandler(kind, code, cr_trap)
