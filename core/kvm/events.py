"""Where kvm reports what happens, for tracing and metrics.

kvm emits named events with KVM's tracepoint fields (REFERENCE.md section 10); the
plugin host's sink forwards each to the matching ``sevsim_<name>`` observer hook.
``wants`` lets kvm skip building an event nobody listens to, so observers cost
nothing when none is installed.
"""

from __future__ import annotations

from typing import Any, Protocol


class EventSink(Protocol):
    def wants(self, name: str) -> bool: ...

    def emit(self, name: str, /, **fields: Any) -> None: ...


class NullSink:
    """No observers: every event is skipped."""

    def wants(self, name: str) -> bool:
        return False

    def emit(self, name: str, /, **fields: Any) -> None:
        return None


#: Event names kvm emits, with their fields; the hookspecs are ``sevsim_<name>``. The
#: VMM reports its devices' accesses through the VM's observers too (``device_access``,
#: QEMU's ``memory_region_ops_read/write``): only it knows which device served one.
EVENTS: dict[str, tuple[str, ...]] = {
    "vm_created": ("vm",),
    "vm_destroyed": ("vm", "why"),
    "launch_command": ("vm", "command", "status", "detail"),
    "vmgexit_enter": ("vcpu_id", "exit_reason", "info1", "info2"),
    "vmgexit_exit": ("vcpu_id", "exit_reason", "info1", "info2"),
    "msr_protocol_enter": ("vcpu_id", "ghcb_gpa"),
    "msr_protocol_exit": ("vcpu_id", "ghcb_gpa", "result"),
    "vmexit": ("vcpu_id", "exit_code", "info1", "info2"),
    "exit_handled": ("vcpu_id", "kind", "code", "plugin", "notes"),
    "plugin_failed": ("vcpu_id", "plugin", "kind", "code", "error", "message"),
    "interrupt_injected": ("vcpu_id", "vector", "how"),
    "nmi_injected": ("vcpu_id", "how"),
    "init_delivered": ("vcpu_id",),
    "sipi_delivered": ("vcpu_id", "vector", "start"),
    "device_access": ("vcpu_id", "device", "bus", "address", "size", "direction", "value"),
}


class TeeSink:
    """Several sinks as one: each event goes to every sink that wants it."""

    def __init__(self, *sinks: EventSink) -> None:
        self._sinks = sinks

    def wants(self, name: str) -> bool:
        return any(sink.wants(name) for sink in self._sinks)

    def emit(self, name: str, /, **fields: Any) -> None:
        for sink in self._sinks:
            if sink.wants(name):
                sink.emit(name, **fields)
