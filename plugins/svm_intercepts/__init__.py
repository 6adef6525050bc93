"""KVM's ordinary SVM intercept handlers, reused for SEV-ES NAE events.

For codes that pass ``sev_es_validate_vmgexit`` but that no SEV-ES-specific case
handles, ``sev_handle_vmgexit`` falls through to ``svm_invoke_exit_handler``: the
same CPUID, MSR, RDPMC, DR7, ... handlers a normal guest's exits reach, working on
the registers the guest put in the GHCB. This plugin is those rows, with the valid
bits REFERENCE.md section 1.2 lists as their ``requires``:

==========  ==========================  ===========================================
code        KVM handler                 what the guest gets
==========  ==========================  ===========================================
0x027/037   ``dr_interception``         nothing: DR7 is the guest's (SEV-ES)
0x06e       none (RDTSC)                KVM_EXIT_INTERNAL_ERROR (never intercepted)
0x06f       ``kvm_emulate_rdpmc``       RAX/RDX, #GP for a bad counter
0x072       ``kvm_emulate_cpuid``       RAX..RDX
0x076/089   INVD, WBINVD                nothing
0x07c       ``msr_interception``        RAX/RDX, or #GP in the GHCB reply
0x081       ``kvm_emulate_hypercall``   RAX
0x087       RDTSCP                      #UD (since 5.13; intercepted only when the
                                        guest CPUID lacks it); 5.11: internal error
0x08a/08b   MONITOR, MWAIT              nothing
==========  ==========================  ===========================================

Disabling it (``-p no:svm_intercepts``) leaves an SEV-ES guest meeting a hypervisor
that answers none of these: each is an invalid event.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from sevsim import hookimpl
from sevsim.arch.exits import SvmExit
from sevsim.arch.ghcb import Ghcb
from sevsim.arch.vectors import Vector
from sevsim.kvm import outcome as O
from sevsim.kvm.context import ExitContext
from sevsim.kvm.dispatch import ExitHandler, ExitKind
from sevsim.kvm.exits import InternalError, InternalErrorSub

#: AMD's legacy PMU: four counters (``kvm_emulate_rdpmc`` on a PMU v1 guest).
PMC_COUNT = 4
#: KVM hypercall numbers and errors (``include/uapi/linux/kvm_para.h``).
KVM_HC_VAPIC_POLL_IRQ = 1
KVM_HC_KICK_CPU = 5
KVM_HC_SCHED_YIELD = 11
KVM_ENOSYS = 1000
KVM_EPERM = 1
_NO_OP_HYPERCALLS = frozenset({KVM_HC_VAPIC_POLL_IRQ, KVM_HC_KICK_CPU, KVM_HC_SCHED_YIELD})
_U64 = (1 << 64) - 1


def _set_result(ctx: ExitContext, eax: int, ebx: int, ecx: int, edx: int) -> None:
    ctx.regs.update(rax=eax, rbx=ebx, rcx=ecx, rdx=edx)


def cpuid(ctx: ExitContext) -> None:
    """``kvm_emulate_cpuid``: function RAX, index RCX, with the vCPU's runtime bits."""
    leaf = ctx.vcpu.cpuid(ctx.regs["rax"] & 0xFFFF_FFFF, ctx.regs["rcx"] & 0xFFFF_FFFF)
    _set_result(ctx, leaf.eax, leaf.ebx, leaf.ecx, leaf.edx)


def cpuid_requires(ghcb: Ghcb) -> Iterable[str]:
    yield from ("rax", "rcx")
    if ghcb["rax"] == 0xD:  # KVM compares the whole synced RAX
        yield "xcr0"


def msr(ctx: ExitContext) -> None:
    """``msr_interception``: exit_info_1 0 = RDMSR, 1 = WRMSR; failure -> #GP."""
    index = ctx.regs["rcx"] & 0xFFFF_FFFF
    if ctx.exit_info_1:
        value = (ctx.regs["rdx"] & 0xFFFF_FFFF) << 32 | ctx.regs["rax"] & 0xFFFF_FFFF
        if not ctx.vcpu.set_msr(index, value):
            ctx.inject_exception(Vector.GP)
        return
    read = ctx.vcpu.get_msr(index)
    if read is None:
        ctx.inject_exception(Vector.GP)
        return
    ctx.regs.update(rax=read & 0xFFFF_FFFF, rdx=read >> 32)


def msr_requires(ghcb: Ghcb) -> Iterable[str]:
    yield "rcx"
    if ghcb["sw_exit_info_1"]:
        yield from ("rax", "rdx")


def rdpmc(ctx: ExitContext) -> None:
    """``kvm_emulate_rdpmc``: counters 0..3 read zero here; others #GP via EVENTINJ."""
    if ctx.regs["rcx"] & 0xFFFF_FFFF >= PMC_COUNT:
        ctx.queue_exception(Vector.GP, 0)
        return
    ctx.regs.update(rax=0, rdx=0)


def read_dr7(ctx: ExitContext) -> None:
    """``dr_interception`` for SEV-ES: nothing to do; RAX goes back as it came."""


def write_dr7(ctx: ExitContext) -> None:
    """``dr_interception`` for SEV-ES: the value is the guest's business (DR7 lives in
    the VMSA); KVM drops it."""


def nop(ctx: ExitContext) -> None:
    """INVD, WBINVD, MONITOR, MWAIT: KVM emulates them as no-ops."""


def vmmcall(ctx: ExitContext) -> None:
    """``kvm_emulate_hypercall``: number in RAX, result in RAX, CPL 0 only."""
    if ctx.vcpu.cpl != 0:
        ctx.regs["rax"] = -KVM_EPERM & _U64
        return
    number = ctx.regs["rax"]
    ctx.regs["rax"] = 0 if number in _NO_OP_HYPERCALLS else -KVM_ENOSYS & _U64


def rdtscp(ctx: ExitContext) -> O.Outcome | None:
    """The exit table sends RDTSCP to ``kvm_handle_invalid_op`` since 5.13: #UD via
    EVENTINJ. 5.11's table had no entry for it: an internal error (``no_handler``)."""
    if ctx.vm.era == "v5.11":
        return no_handler(ctx)
    ctx.queue_exception(Vector.UD)
    return None


def no_handler(ctx: ExitContext) -> O.Outcome:
    """A code that passes validation but has no ``svm_exit_handlers[]`` entry
    (``svm_handle_invalid_exit``): KVM_EXIT_INTERNAL_ERROR, data = [code, host CPU]."""
    return O.ExitToUser(InternalError(
        InternalErrorSub.UNEXPECTED_EXIT_REASON, (ctx.code, ctx.vcpu.id),
        f"no handler for exit {ctx.code:#x}",
    ))  # fmt: skip


_ROWS = (
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
    (SvmExit.RDTSC, no_handler, ()),
    (SvmExit.RDTSCP, rdtscp, ()),
)


@hookimpl
def sevsim_exit_handlers() -> Iterator[ExitHandler]:
    for code, handler, requires in _ROWS:
        yield ExitHandler(ExitKind.VMGEXIT, code, handler, requires)
