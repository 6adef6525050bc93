"""AP boot and AP reset hold for SEV-ES guests (REFERENCE.md section 6).

KVM cannot reset an SEV-ES AP the usual way: INIT/SIPI would have to rewrite CS:IP
in a VMSA it cannot touch. So the guest manages its own APs with the hypervisor's
help:

==========  ===========================  ===========================================
code        request                      KVM's answer
==========  ===========================  ===========================================
0x80000005  AP_JUMP_TABLE, info_1 = 0    remember info_2 (the jump table's GPA)
            AP_JUMP_TABLE, info_1 = 1    info_2 = the remembered address
0x80000004  AP_HLT_LOOP                  park the vCPU; a later SIPI sets info_2 = 1
MSR 0x006   AP_RESET_HOLD_REQ            park the vCPU; a later SIPI replies 0x007
                                         with result 1 in bits 63:12
==========  ===========================  ===========================================

Parking ends KVM_RUN with KVM_EXIT_AP_RESET_HOLD (sevsim's LAPIC is in the VMM) and
the vCPU stays parked (KVM_RUN: -EINTR) until the VMM's LAPIC delivers an INIT-SIPI
(:meth:`sevsim.kvm.vcpu.Vcpu.deliver_sipi`) or an NMI wakes it. The very first SIPI
of a vCPU is swallowed, since that AP starts from its VMSA: the AP runs on, reads
"not released" and parks again, as Linux's ``sev_es_ap_hlt_loop`` does.
"""

from __future__ import annotations

from collections.abc import Iterator

from sevsim import hookimpl
from sevsim.arch.exits import VmgExit
from sevsim.arch.ghcb_msr import GhcbMsr
from sevsim.kvm import outcome as O
from sevsim.kvm.context import ExitContext
from sevsim.kvm.dispatch import ExitHandler, ExitKind
from sevsim.kvm.pending import ApResetHoldType

JUMP_TABLE_SET = 0
JUMP_TABLE_GET = 1


def ap_jump_table(ctx: ExitContext) -> None:
    """Set or get the per-VM AP jump table address (not copied to mirror VMs)."""
    subcode = ctx.exit_info_1
    if subcode == JUMP_TABLE_SET:
        ctx.vm.ap_jump_table = ctx.exit_info_2
        ctx.notes["jump_table"] = f"set to {ctx.exit_info_2:#x}"
    elif subcode == JUMP_TABLE_GET:
        ctx.success(ctx.vm.ap_jump_table)
        ctx.notes["jump_table"] = f"get: {ctx.vm.ap_jump_table:#x}"
    else:
        ctx.notes["jump_table"] = f"unknown subcode {subcode:#x}"
        ctx.vm.compat.bad_subcode(ctx)


def ap_hlt_loop(ctx: ExitContext) -> O.Outcome:
    """Park; the GHCB stays mapped, and the SIPI answers in it (sw_exit_info_2 = 1)."""
    return ctx.vcpu.ap_reset_hold(ApResetHoldType.NAE)


def ap_reset_hold_msr(ctx: ExitContext) -> O.Outcome:
    """Park through the GHCB MSR: the reply 0x007 is preset with result 0; a SIPI makes
    the result 1."""
    ctx.msr = GhcbMsr.AP_RESET_HOLD_RESP
    return ctx.vcpu.ap_reset_hold(ApResetHoldType.MSR_PROTO)


@hookimpl
def sevsim_exit_handlers() -> Iterator[ExitHandler]:
    yield ExitHandler(ExitKind.VMGEXIT, VmgExit.AP_JUMP_TABLE, ap_jump_table)
    yield ExitHandler(ExitKind.VMGEXIT, VmgExit.AP_HLT_LOOP, ap_hlt_loop)
    yield ExitHandler(ExitKind.MSR_PROTOCOL, GhcbMsr.AP_RESET_HOLD_REQ, ap_reset_hold_msr)
