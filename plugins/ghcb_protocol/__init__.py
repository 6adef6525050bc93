"""The GHCB-protocol requests ``sev_handle_vmgexit`` answers itself.

Three requests are about the protocol rather than about an instruction: the guest
reports an event it cannot handle (UNSUPPORTED_EVENT, in the protocol from version 1),
asks which hypervisor features exist (HV_FEATURES) or asks to be terminated with a
reason once it has a GHCB page (TERM_REQUEST), both of version 2:

==========  ==================  ================================================
code        request             KVM's answer
==========  ==================  ================================================
0x8000fffd  HV_FEATURES         info_2 = 0x3 (SNP, SNP_AP_CREATION)
0x8000fffe  TERM_REQUEST        KVM_EXIT_SYSTEM_EVENT SEV_TERM, data = the GHCB GPA
0x8000ffff  UNSUPPORTED_EVENT   KVM_RUN fails with -EINVAL
==========  ==================  ================================================

KVM learnt the version-2 pair with its GHCB v2 support (the SNP series): a VM of the
5.11 era meets them as invalid events.
"""

from __future__ import annotations

from collections.abc import Iterator

from sevsim import hookimpl
from sevsim.arch.exits import VmgExit
from sevsim.arch.ghcb_msr import GHCB_HV_FT_SUPPORTED
from sevsim.kvm import outcome as O
from sevsim.kvm.context import ExitContext
from sevsim.kvm.dispatch import ExitHandler, ExitKind


def hv_features(ctx: ExitContext) -> None:
    """The feature bitmap in ``sw_exit_info_2`` (the same one the MSR protocol gives)."""
    ctx.success(GHCB_HV_FT_SUPPORTED)


def term_request(ctx: ExitContext) -> O.Outcome:
    """The reason is in ``sw_exit_info_1`` (set in bits 3:0, code in 11:4; the trace
    decodes it, as KVM logs it); KVM_RUN ends with a SEV_TERM event whose data is the
    GHCB's GPA, where the VMM can read the request."""
    assert ctx.ghcb is not None  # a GHCB-page request always has its page
    return O.sev_term(ctx.vm.era, ctx.ghcb.gpa)


def unsupported_event(ctx: ExitContext) -> O.Outcome:
    """The guest met an event it cannot handle; KVM logs it and fails KVM_RUN."""
    return O.Fail("EINVAL", f"the guest reported an unsupported event (exit_info_1 "
                  f"{ctx.exit_info_1:#x}, exit_info_2 {ctx.exit_info_2:#x})")  # fmt: skip


@hookimpl
def sevsim_exit_handlers() -> Iterator[ExitHandler]:
    newest = {"newest"}
    yield ExitHandler(ExitKind.VMGEXIT, VmgExit.HV_FEATURES, hv_features, eras=newest)
    yield ExitHandler(ExitKind.VMGEXIT, VmgExit.TERM_REQUEST, term_request, eras=newest)
    yield ExitHandler(ExitKind.VMGEXIT, VmgExit.UNSUPPORTED_EVENT, unsupported_event)
