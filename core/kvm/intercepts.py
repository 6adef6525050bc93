"""KVM's ordinary SVM intercept handlers, reused for SEV-ES NAE events.

For codes that pass ``sev_es_validate_vmgexit`` but that no SEV-ES-specific case
handles, ``sev_handle_vmgexit`` falls through to ``svm_invoke_exit_handler``: the
same CPUID, MSR, RDPMC, DR7, ... handlers a normal guest's exits reach, working on
the registers the guest put in the GHCB. These are those handlers, with the valid
bits REFERENCE.md section 1.2 lists as their ``requires``. They are core KVM, not a
plugin: a plugin may still claim one of these codes, and then its handler wins.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from sevsim.arch.exits import SvmExit
from sevsim.arch.ghcb import Ghcb
from sevsim.arch.vectors import Vector
from sevsim.hw import CpuidLeaf
from sevsim.kvm import outcome as O
from sevsim.kvm.context import ExitContext
from sevsim.kvm.dispatch import ExitHandler, ExitKind

if TYPE_CHECKING:
    from sevsim.kvm.vcpu import Vcpu

GP_VECTOR, UD_VECTOR = Vector.GP, Vector.UD
#: AMD's legacy PMU: four counters (``kvm_emulate_rdpmc`` on a PMU v1 guest).
PMC_COUNT = 4
#: KVM hypercall numbers and errors (``include/uapi/linux/kvm_para.h``).
KVM_HC_VAPIC_POLL_IRQ = 1
KVM_HC_KICK_CPU = 5
KVM_HC_SCHED_YIELD = 11
KVM_ENOSYS = 1000
KVM_EPERM = 1
_NO_OP_HYPERCALLS = frozenset({KVM_HC_VAPIC_POLL_IRQ, KVM_HC_KICK_CPU, KVM_HC_SCHED_YIELD})
#: XSAVE area size for each XCR0 component set, for CPUID 0xD.0 EBX.
_XSAVE_SIZES = ((1 << 2, 0x340), (1 << 1, 0x240), (1 << 0, 0x240))


def _set_result(ctx: ExitContext, eax: int, ebx: int, ecx: int, edx: int) -> None:
    ctx.regs.update(rax=eax, rbx=ebx, rcx=ecx, rdx=edx)


def cpuid_leaf(vcpu: Vcpu, function: int, index: int) -> CpuidLeaf:
    """``kvm_cpuid``: the table's leaf, with leaf 0xD sized by the vCPU's XCR0."""
    leaf = vcpu.vm.cpuid.lookup(function, index)
    if function == 0xD and index == 0:  # size of the XSAVE area XCR0 enables
        ebx = next(size for bit, size in _XSAVE_SIZES if vcpu.xcr0 & bit or bit == 1)
        leaf = CpuidLeaf(leaf.eax, ebx, leaf.ecx, leaf.edx)
    return leaf


def cpuid(ctx: ExitContext) -> None:
    """``kvm_emulate_cpuid``: function RAX, index RCX."""
    leaf = cpuid_leaf(ctx.vcpu, ctx.regs["rax"] & 0xFFFF_FFFF, ctx.regs["rcx"] & 0xFFFF_FFFF)
    _set_result(ctx, leaf.eax, leaf.ebx, leaf.ecx, leaf.edx)


def cpuid_requires(ghcb: Ghcb) -> Iterable[str]:
    yield from ("rax", "rcx")
    if ghcb["rax"] == 0xD:  # KVM compares the whole synced RAX
        yield "xcr0"


def msr(ctx: ExitContext) -> None:
    """``msr_interception``: exit_info_1 0 = RDMSR, 1 = WRMSR; failure -> #GP."""
    index = ctx.regs["rcx"] & 0xFFFF_FFFF
    model = ctx.vcpu.msrs
    if ctx.exit_info_1:
        value = (ctx.regs["rdx"] & 0xFFFF_FFFF) << 32 | ctx.regs["rax"] & 0xFFFF_FFFF
        if not model.write(index, value):
            ctx.inject_exception(GP_VECTOR)
        return
    value = model.read(index)
    if value is None:
        ctx.inject_exception(GP_VECTOR)
        return
    ctx.regs.update(rax=value & 0xFFFF_FFFF, rdx=value >> 32)


def msr_requires(ghcb: Ghcb) -> Iterable[str]:
    yield "rcx"
    if ghcb["sw_exit_info_1"]:
        yield from ("rax", "rdx")


def rdpmc(ctx: ExitContext) -> None:
    """``kvm_emulate_rdpmc``: counters 0..3 read zero here; others #GP via EVENTINJ."""
    if ctx.regs["rcx"] & 0xFFFF_FFFF >= PMC_COUNT:
        ctx.queue_exception(GP_VECTOR, 0)
        return
    ctx.regs.update(rax=0, rdx=0)


def read_dr7(ctx: ExitContext) -> None:
    """``dr_interception`` for SEV-ES: nothing to do; RAX goes back as it came."""


def write_dr7(ctx: ExitContext) -> None:
    """Tracked (KVM keeps the value for debugging), with no effect on the guest."""
    ctx.vcpu.dr7 = ctx.regs["rax"]


def nop(ctx: ExitContext) -> None:
    """INVD, WBINVD, MONITOR, MWAIT: KVM emulates them as no-ops."""


def vmmcall(ctx: ExitContext) -> None:
    """``kvm_emulate_hypercall``: number in RAX, result in RAX, CPL 0 only."""
    if ctx.vcpu.cpl != 0:
        ctx.regs["rax"] = -KVM_EPERM & 0xFFFF_FFFF_FFFF_FFFF
        return
    number = ctx.regs["rax"]
    ctx.regs["rax"] = 0 if number in _NO_OP_HYPERCALLS else -KVM_ENOSYS & 0xFFFF_FFFF_FFFF_FFFF


def rdtscp(ctx: ExitContext) -> None:
    """The newest exit table sends RDTSCP to ``kvm_handle_invalid_op``: #UD via EVENTINJ."""
    ctx.queue_exception(UD_VECTOR)


def rdtsc(ctx: ExitContext) -> O.Outcome:
    """RDTSC passes validation but has no handler: KVM_EXIT_INTERNAL_ERROR."""
    return ctx.vcpu.invalid_exit(ctx.code)


def core_handlers() -> tuple[ExitHandler, ...]:
    """KVM's reused intercepts, as table rows owned by "kvm"."""
    rows = (
        (SvmExit.CPUID, cpuid, cpuid_requires),
        (SvmExit.MSR, msr, msr_requires),
        (SvmExit.RDPMC, rdpmc, ("rcx",)),
        (SvmExit.READ_DR7, read_dr7, ()),
        (SvmExit.WRITE_DR7, write_dr7, ("rax",)),
        (SvmExit.INVD, nop, ()),
        (SvmExit.WBINVD, nop, ()),
        (SvmExit.MONITOR, nop, ("rax", "rcx", "rdx")),
        (SvmExit.MWAIT, nop, ("rax", "rcx")),
        (SvmExit.VMMCALL, vmmcall, ("rax", "cpl")),
        (SvmExit.RDTSCP, rdtscp, ()),
        (SvmExit.RDTSC, rdtsc, ()),
    )
    return tuple(
        ExitHandler(ExitKind.VMGEXIT, code, handler, requires, plugin="kvm")
        for code, handler, requires in rows
    )
