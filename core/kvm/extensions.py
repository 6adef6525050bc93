"""What the plugin host hands kvm: the exit table, and each plugin's state and lifecycle.

A feature area of KVM's SEV-ES support is more than its exit handlers: it keeps
per-VM and per-vCPU state (the AP jump table, the NMI masks, KVM's copy of CR0) and
acts at fixed points of a vCPU's life (its reset, a SIPI, KVM_NMI, just before each
VMRUN). kvm creates each plugin's state when it creates a VM or vCPU and calls the
plugin at those points, each time with a view that holds that plugin's own state
(:class:`sevsim.kvm.context.VcpuView`).

The points, by hook name (``sevsim_<name>`` in :mod:`sevsim.plugin.hookspecs`):

=================  ===================================================================
``vcpu_reset``     the vCPU was set up before launch (``kvm_vcpu_reset``)
``vcpu_sipi``      the VMM delivers a SIPI (``sev_vcpu_deliver_sipi_vector``)
``vcpu_nmi``       the VMM asks for an NMI (KVM_NMI); returns True when taken
``vcpu_events``    before each VMRUN (``inject_pending_event``); returns True to ask
                   for an immediate exit (an event is still waiting)
``vcpu_wakeup``    may a parked vCPU run (``kvm_vcpu_has_events``)?
=================  ===================================================================
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Any

from attrs import field, frozen

from sevsim.kvm.dispatch import ExitHandler, ExitKind, ExitTable

#: The lifecycle hooks a plugin may implement (see the module doc).
LIFECYCLE = ("vcpu_reset", "vcpu_sipi", "vcpu_nmi", "vcpu_events", "vcpu_wakeup")


@frozen
class PluginPart:
    """One active plugin's part in every VM: its state factories and lifecycle hooks."""

    name: str
    #: Called once per VM / per vCPU for the plugin's fresh state (None: no state).
    vm_state: Callable[[], Any] | None = None
    vcpu_state: Callable[[], Any] | None = None
    #: Lifecycle hook name -> the plugin's function, called with keyword arguments.
    lifecycle: Mapping[str, Callable[..., Any]] = field(factory=lambda: MappingProxyType({}))


@frozen
class Extensions:
    """The dispatch table and every active plugin's part, in a fixed order."""

    table: ExitTable = field(factory=ExitTable)
    parts: tuple[PluginPart, ...] = ()
    #: Lifecycle hook -> the parts implementing it, found once: kvm asks before every
    #: VMRUN (``vcpu_events``), and a hook nobody implements then costs one lookup.
    _implementing: Mapping[str, tuple[PluginPart, ...]] = field(init=False, repr=False,
                                                                eq=False)  # fmt: skip

    @_implementing.default
    def _index(self) -> Mapping[str, tuple[PluginPart, ...]]:
        hooks = {*LIFECYCLE, *(hook for part in self.parts for hook in part.lifecycle)}
        return MappingProxyType({hook: tuple(part for part in self.parts if hook in part.lifecycle)
                                 for hook in hooks})  # fmt: skip

    def implementing(self, hook: str) -> tuple[PluginPart, ...]:
        return self._implementing.get(hook, ())

    def lookup(self, kind: ExitKind, code: int) -> ExitHandler | None:
        """The table's row for ``(kind, code)``."""
        return self.table.lookup(kind, code)

    def __iter__(self) -> Iterator[ExitHandler]:
        return iter(self.table)

    def __len__(self) -> int:
        return len(self.table)
