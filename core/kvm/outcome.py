"""What an exit handler returns: KVM's 1 / 0 / -errno, as values.

``Resume`` is KVM's ``return 1`` (re-enter the guest), ``ExitToUser`` is ``return 0``
with ``kvm_run`` filled, ``Fail`` is a negative errno from KVM_RUN. A handler that
returns ``None`` resumes. Each checks its fields when it is made, so a plugin that
builds a wrong one fails inside its own handler, where kvm names it.
"""

from __future__ import annotations

from attrs import field, frozen
from attrs.validators import instance_of

from sevsim.kvm.exits import KvmExit


@frozen
class Resume:
    """Re-enter the guest."""


@frozen
class ExitToUser:
    """Stop KVM_RUN and hand ``exit`` to the VMM."""

    exit: KvmExit = field(validator=instance_of(KvmExit))


@frozen
class Fail:
    """KVM_RUN fails with ``-errno``; the VM is not runnable until the VMM acts."""

    errno: str = field(validator=instance_of(str))
    why: str = field(validator=instance_of(str))


Outcome = Resume | ExitToUser | Fail
RESUME = Resume()
