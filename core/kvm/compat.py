"""Where KVM's behaviour changed between eras, as one switch (REFERENCE.md section 2).

The original 5.11 code was fail-stop: malformed GHCB input ended KVM_RUN with an
error. From 5.16 on, KVM answers the guest with a GHCB error and resumes it. sevsim
follows the newest behaviour and keeps 5.11 selectable (``[kvm] era = "v5.11"``)
for studying how guests fared against the first release.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sevsim.arch.exits import GhcbErr, VmgExit
from sevsim.arch.ghcb import Ghcb
from sevsim.arch.ghcb_msr import GhcbMsr
from sevsim.arch.vectors import Vector
from sevsim.errors import ConfigError
from sevsim.kvm import outcome as O
from sevsim.kvm.context import ExitContext
from sevsim.kvm.exits import InternalError, InternalErrorSub, SystemEvent, SystemEventType

if TYPE_CHECKING:
    from sevsim.kvm.vcpu import Vcpu


class Newest:
    """KVM from 5.16 on: report bad input to the guest and keep it running."""

    name = "newest"

    def ghcb_unmapped(self, why: str) -> O.Outcome:
        """GHCB GPA 0 or not mappable: re-enter the guest, write nothing."""
        return O.RESUME

    def bad_input(self, ctx: ExitContext, error: GhcbErr, snapshot: Ghcb) -> O.Outcome:
        ctx.bad_input(error)
        return O.RESUME

    def unknown_msr_request(self, vcpu: Vcpu, value: int) -> O.Outcome:
        """An MSR-protocol code nobody handles: leave the MSR as it is and resume."""
        vcpu.vm.emit("msr_protocol_exit", vcpu_id=vcpu.id, ghcb_gpa=value, result=1)
        return O.RESUME

    def knows_msr_request(self, code: int) -> bool:
        """Whether this KVM had the MSR-protocol request ``code`` at all."""
        return True

    def knows_vmgexit(self, code: int) -> bool:
        """Whether this KVM's own switch had the GHCB request ``code``."""
        return True

    def bad_scratch(self, ctx: ExitContext, error: GhcbErr) -> O.Outcome:
        """``setup_vmgexit_scratch`` refused the area: tell the guest, resume."""
        ctx.bad_input(error)
        return O.RESUME

    def bad_subcode(self, ctx: ExitContext) -> None:
        """A request with a subcode KVM does not know (AP_JUMP_TABLE): INVALID_INPUT."""
        ctx.bad_input(GhcbErr.INVALID_INPUT)

    def terminate(self, value: int) -> O.Outcome:
        """The guest asked for termination: KVM_EXIT_SYSTEM_EVENT, SEV_TERM, raw MSR value."""
        return O.ExitToUser(SystemEvent(SystemEventType.SEV_TERM, (value,)))


class V5_11(Newest):
    """The original series: every malformed request stops KVM_RUN."""

    name = "v5.11"

    def ghcb_unmapped(self, why: str) -> O.Outcome:
        return O.Fail("EINVAL", why)

    def bad_input(self, ctx: ExitContext, error: GhcbErr, snapshot: Ghcb) -> O.Outcome:
        # 5.11 validated the live page before syncing from it: a refused request leaves
        # the guest's valid bitmap in place.
        if ctx.ghcb is not None:
            ctx.ghcb.valid_bitmap = snapshot.valid_bitmap
        # data[0] is the exit code, except for a bad usage, caught before it was read.
        code = 0 if error is GhcbErr.INVALID_USAGE else snapshot["sw_exit_code"]
        return O.ExitToUser(InternalError(
            InternalErrorSub.UNEXPECTED_EXIT_REASON, (code, ctx.vcpu.id),
            f"GHCB validation failed: {error.name} (v5.11 fail-stop)",
        ))  # fmt: skip

    def unknown_msr_request(self, vcpu: Vcpu, value: int) -> O.Outcome:
        return O.Fail("EINVAL", f"unknown GHCB MSR protocol request {value:#x}")

    def knows_msr_request(self, code: int) -> bool:
        return code in _V5_11_MSR_REQUESTS

    def knows_vmgexit(self, code: int) -> bool:
        return code not in _GHCB_V2_VMGEXITS

    def bad_scratch(self, ctx: ExitContext, error: GhcbErr) -> O.Outcome:
        return O.Fail("EINVAL", f"invalid scratch area ({error.name})")

    def bad_subcode(self, ctx: ExitContext) -> None:
        """5.11 answered an unknown subcode with #UD for the guest to raise."""
        ctx.inject_exception(Vector.UD)

    def terminate(self, value: int) -> O.Outcome:
        """5.11 logged the request and failed KVM_RUN (SEV_TERM events came in ~5.19)."""
        return O.Fail("EINVAL", f"the guest requested termination ({value:#x})")


#: The MSR-protocol requests of the original series: SEV_INFO, CPUID, TERM_REQ.
_V5_11_MSR_REQUESTS = frozenset({GhcbMsr.SEV_INFO_REQ, GhcbMsr.CPUID_REQ, GhcbMsr.TERM_REQ})

#: GHCB protocol version 2 requests, which KVM's switch gained with its GHCB v2
#: support (the SNP series), long after 5.11.
_GHCB_V2_VMGEXITS = frozenset({VmgExit.HV_FEATURES, VmgExit.TERM_REQUEST})

ERAS = {era.name: era for era in (Newest(), V5_11())}


def era(name: str) -> Newest:
    try:
        return ERAS[name]
    except KeyError:
        raise ConfigError(f"KVM era {name!r} is not one of {sorted(ERAS)}") from None
