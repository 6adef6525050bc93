"""NMIs for SEV-ES guests (REFERENCE.md section 7): NMI_COMPLETE.

KVM injects an NMI through EVENTINJ and then treats NMIs as masked until the guest
is done with it. For an ordinary guest KVM learns that by intercepting IRET; an
SEV-ES guest's IRET cannot be intercepted, so its NMI handler ends with an
NMI_COMPLETE VMGEXIT (0x80000003). This plugin owns that code: NMIs are unmasked at
once (newest KVM; 5.11 waited for the next exit, which a guest cannot tell apart)
and the next entry injects one that was pending (``KVM_REQ_EVENT``).

Without this plugin NMI_COMPLETE is an invalid event, and after the first NMI the
guest receives no other: what a KVM without SEV-ES NMI support would do.
"""

from __future__ import annotations

from collections.abc import Iterator

from sevsim import hookimpl
from sevsim.arch.exits import VmgExit
from sevsim.kvm.context import ExitContext
from sevsim.kvm.dispatch import ExitHandler, ExitKind


def nmi_complete(ctx: ExitContext) -> None:
    """Unmask NMIs and count the window exit (``stat.nmi_window_exits``)."""
    nmi = ctx.vcpu.nmi_state
    nmi.masked = False
    nmi.window_exits += 1
    ctx.notes["nmi"] = f"NMIs unmasked ({nmi.pending} pending)"


@hookimpl
def sevsim_exit_handlers() -> Iterator[ExitHandler]:
    yield ExitHandler(ExitKind.VMGEXIT, VmgExit.NMI_COMPLETE, nmi_complete)
