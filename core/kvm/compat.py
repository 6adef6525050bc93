"""Where KVM's own VMGEXIT entry changed between eras, as one switch (REFERENCE.md §2).

The original 5.11 code was fail-stop: malformed GHCB input ended KVM_RUN with an
error. From 5.16 on, KVM answers the guest with a GHCB error and resumes it. sevsim
follows the newest behaviour and keeps 5.11 selectable (``[kvm] era = "v5.11"``)
for studying how guests fared against the first release.

Only the core's paths live here (validation, the GHCB mapping, the scratch area,
unknown MSR-protocol requests). A plugin's own era differences live in the plugin,
which reads the VM's era (``ctx.vm.era``) and limits its rows with
``ExitHandler(eras=...)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sevsim.arch.exits import GhcbErr
from sevsim.arch.ghcb import Ghcb
from sevsim.errors import ConfigError
from sevsim.kvm import outcome as O
from sevsim.kvm.context import ExitContext
from sevsim.kvm.exits import InternalError, InternalErrorSub, KvmExit, SystemEvent, SystemEventType

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

    def bad_scratch(self, ctx: ExitContext, error: GhcbErr) -> O.Outcome:
        """``setup_vmgexit_scratch`` refused the area: tell the guest, resume."""
        ctx.bad_input(error)
        return O.RESUME

    def unreadable_scratch(self, why: str) -> O.Outcome:
        """The guest's scratch buffer cannot be read (aa9f58415a8e: -EFAULT)."""
        return O.Fail("EFAULT", why)

    #: Whether the scratch GPA KVM works with is the page's ``sw_scratch`` whatever its
    #: valid bit; newest KVM takes the snapshot's, 0 unless marked valid (v6.5+).
    sw_scratch_unchecked = False

    def is_termination(self, exit_: KvmExit) -> bool:
        """Whether an exit ends the guest at its own request (KVM skips the MSR-protocol
        exit tracepoint on that path)."""
        return isinstance(exit_, SystemEvent) and exit_.type is SystemEventType.SEV_TERM


class V5_11(Newest):
    """The original series: every malformed request stops KVM_RUN."""

    name = "v5.11"

    def ghcb_unmapped(self, why: str) -> O.Outcome:
        return O.Fail("EINVAL", why)

    def bad_input(self, ctx: ExitContext, error: GhcbErr, snapshot: Ghcb) -> O.Outcome:
        """KVM_RUN fails with -EINVAL after filling an internal-error exit."""
        # 5.11 validated the live page before syncing from it: a refused request leaves
        # the guest's valid bitmap in place.
        if ctx.ghcb is not None:
            ctx.ghcb.valid_bitmap = snapshot.valid_bitmap
        # data[0] is the exit code, except for a bad usage, caught before it was read.
        code = 0 if error is GhcbErr.INVALID_USAGE else snapshot["sw_exit_code"]
        why = f"GHCB validation failed: {error.name} (v5.11 fail-stop)"
        filled = InternalError(InternalErrorSub.UNEXPECTED_EXIT_REASON, (code, ctx.vcpu.id), why)
        return O.Fail("EINVAL", why, filled)

    def unknown_msr_request(self, vcpu: Vcpu, value: int) -> O.Outcome:
        return O.Fail("EINVAL", f"unknown GHCB MSR protocol request {value:#x}")

    def bad_scratch(self, ctx: ExitContext, error: GhcbErr) -> O.Outcome:
        return O.Fail("EINVAL", f"invalid scratch area ({error.name})")

    def unreadable_scratch(self, why: str) -> O.Outcome:
        return O.Fail("EINVAL", why)

    #: 5.11 read ``sw_scratch`` from the live page, valid bit or not.
    sw_scratch_unchecked = True


ERAS = {era.name: era for era in (Newest(), V5_11())}


def era(name: str) -> Newest:
    try:
        return ERAS[name]
    except KeyError:
        raise ConfigError(f"KVM era {name!r}: expected one of {sorted(ERAS)}") from None
