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
the vCPU stays parked until the VMM's LAPIC delivers a SIPI
(:meth:`sevsim.kvm.vcpu.Vcpu.deliver_sipi`) or an event wakes it. The very first
SIPI of a vCPU is swallowed, since that AP starts from its VMSA: the AP runs on, reads
"not released" and parks again, as Linux's ``sev_es_ap_hlt_loop`` does.

State: the VM's jump table (``sev->ap_jump_table``); per vCPU, how it parked
(``ap_reset_hold_type``) and whether its first SIPI came (``received_first_sipi``).
"""

from __future__ import annotations

from collections.abc import Iterator
from enum import Enum

from attrs import define

from sevsim import hookimpl
from sevsim.arch.exits import GhcbErr, VmgExit
from sevsim.arch.ghcb_msr import GhcbMsr
from sevsim.arch.vectors import Vector
from sevsim.kvm import outcome as O
from sevsim.kvm.context import ExitContext, VcpuView
from sevsim.kvm.dispatch import ExitHandler, ExitKind
from sevsim.kvm.exits import ApResetHold

JUMP_TABLE_SET = 0
JUMP_TABLE_GET = 1


class HoldType(Enum):
    """``ap_reset_hold_type``: how the parked AP asked, hence how a SIPI answers."""

    NONE = "none"
    NAE = "nae"  # AP_HLT_LOOP through the GHCB: sw_exit_info_2 = 1
    MSR_PROTO = "msr_proto"  # the GHCB MSR request 0x006: reply 0x007 with result 1


@define
class VmJumpTable:
    """``sev->ap_jump_table``: where the guest said its APs restart (not copied to
    mirror VMs)."""

    address: int = 0


@define
class VcpuHold:
    hold: HoldType = HoldType.NONE
    received_first_sipi: bool = False


@hookimpl
def sevsim_vm_state() -> VmJumpTable:
    return VmJumpTable()


@hookimpl
def sevsim_vcpu_state() -> VcpuHold:
    return VcpuHold()


def ap_jump_table(ctx: ExitContext) -> None:
    """Set or get the per-VM AP jump table address."""
    table: VmJumpTable = ctx.vm.state
    subcode = ctx.exit_info_1
    if subcode == JUMP_TABLE_SET:
        table.address = ctx.exit_info_2
        ctx.notes["jump_table"] = f"set to {ctx.exit_info_2:#x}"
    elif subcode == JUMP_TABLE_GET:
        ctx.success(table.address)
        ctx.notes["jump_table"] = f"get: {table.address:#x}"
    else:
        ctx.notes["jump_table"] = f"unknown subcode {subcode:#x}"
        if ctx.vm.era == "v5.11":  # answered with #UD for the guest to raise
            ctx.inject_exception(Vector.UD)
        else:
            ctx.bad_input(GhcbErr.INVALID_INPUT)


def _park(ctx: ExitContext, how: HoldType) -> O.Outcome:
    """``kvm_emulate_ap_reset_hold``: the vCPU waits for a SIPI; KVM tells the VMM (no
    in-kernel LAPIC: KVM_EXIT_AP_RESET_HOLD)."""
    ctx.vcpu.state.hold = how
    ctx.vcpu.park()
    return O.ExitToUser(ApResetHold())


def ap_hlt_loop(ctx: ExitContext) -> O.Outcome:
    """Park; the GHCB stays mapped, and the SIPI answers in it (sw_exit_info_2 = 1)."""
    return _park(ctx, HoldType.NAE)


def ap_reset_hold_msr(ctx: ExitContext) -> O.Outcome:
    """Park through the GHCB MSR: the reply 0x007 is preset with result 0; a SIPI makes
    the result 1."""
    ctx.msr = GhcbMsr.AP_RESET_HOLD_RESP
    return _park(ctx, HoldType.MSR_PROTO)


@hookimpl
def sevsim_vcpu_sipi(vcpu: VcpuView, vector: int) -> None:
    """``sev_vcpu_deliver_sipi_vector``: the first SIPI is swallowed (the AP starts from
    its VMSA); a later one answers the reset hold (``svm_vmgexit_success(svm, 1)``).
    5.11 knew only the GHCB way and had no hold type: it set only ``sw_exit_info_2``
    to 1 in whatever GHCB page was mapped, whichever request it belonged to."""
    state: VcpuHold = vcpu.state
    if not state.received_first_sipi:
        state.received_first_sipi = True
        return
    ghcb = vcpu.mapped_ghcb
    if vcpu.vm.era == "v5.11":
        if ghcb is not None:
            ghcb["sw_exit_info_2"] = 1
            vcpu.flush_ghcb()
    elif state.hold is HoldType.NAE:
        if ghcb is not None:
            ghcb["sw_exit_info_1"], ghcb["sw_exit_info_2"] = 0, 1
            vcpu.flush_ghcb()
    elif state.hold is HoldType.MSR_PROTO:
        vcpu.set_ghcb_msr(1 << 12 | GhcbMsr.AP_RESET_HOLD_RESP)


@hookimpl
def sevsim_vcpu_events(vcpu: VcpuView) -> bool:
    """Entering the guest ends any reset hold (``sev_es_unmap_ghcb``)."""
    vcpu.state.hold = HoldType.NONE
    return False


@hookimpl
def sevsim_exit_handlers() -> Iterator[ExitHandler]:
    yield ExitHandler(ExitKind.VMGEXIT, VmgExit.AP_JUMP_TABLE, ap_jump_table)
    yield ExitHandler(ExitKind.VMGEXIT, VmgExit.AP_HLT_LOOP, ap_hlt_loop)
    # The MSR-protocol hold came with GHCB v2 support, long after 5.11.
    yield ExitHandler(ExitKind.MSR_PROTOCOL, GhcbMsr.AP_RESET_HOLD_REQ, ap_reset_hold_msr,
                      eras={"newest"})  # fmt: skip
