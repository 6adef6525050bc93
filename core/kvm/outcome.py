"""What an exit handler returns: KVM's 1 / 0 / -errno, as values.

``Resume`` is KVM's ``return 1`` (re-enter the guest), ``ExitToUser`` is ``return 0``
with ``kvm_run`` filled, ``Fail`` is a negative errno from KVM_RUN. A handler that
returns ``None`` resumes. Each checks its fields when it is made, so a plugin that
builds a wrong one fails inside its own handler, where kvm names it.
"""

from __future__ import annotations

from attrs import field, frozen
from attrs.validators import instance_of, optional

from sevsim.kvm.exits import KvmExit, SystemEvent, SystemEventType


@frozen
class Resume:
    """Re-enter the guest."""


@frozen
class ExitToUser:
    """Stop KVM_RUN and hand ``exit`` to the VMM."""

    exit: KvmExit = field(validator=instance_of(KvmExit))


@frozen
class Fail:
    """KVM_RUN fails with ``-errno``; the VM is not runnable until the VMM acts.
    ``exit`` is what KVM filled in ``struct kvm_run`` before failing, if anything."""

    errno: str = field(validator=instance_of(str))
    why: str = field(validator=instance_of(str))
    exit: KvmExit | None = field(default=None, validator=optional(instance_of(KvmExit)))


Outcome = Resume | ExitToUser | Fail
RESUME = Resume()


def sev_term(era: str, data: int) -> Outcome:
    """The guest asked to be terminated: KVM_EXIT_SYSTEM_EVENT of type SEV_TERM with
    ``data`` (newest KVM); 5.11 logged the request and failed KVM_RUN with -EINVAL
    (SEV_TERM events came in ~5.19)."""
    if era == "v5.11":
        return Fail("EINVAL", f"the guest requested termination ({data:#x})")
    return ExitToUser(SystemEvent(SystemEventType.SEV_TERM, (data,)))
