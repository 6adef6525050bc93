"""The VMM's run loop: launch a guest with the plugins a host loaded, run to the end.

This is what ``sevsim run`` does: create the VM with the host's exit table and its
observers plus a :class:`~sevsim.trace.Trace`, launch the image, then call
``Vcpu.run()`` until an exit this VMM cannot continue from. With no devices yet,
every exit to userspace ends the run; a HLT does too, since nothing could wake
the vCPU.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from attrs import frozen

from sevsim.guest.image import GuestImage
from sevsim.kvm.dispatch import ExitTable
from sevsim.kvm.events import EventSink, TeeSink
from sevsim.kvm.exits import KvmExit
from sevsim.kvm.vm import Kvm, Vm
from sevsim.trace import Trace
from sevsim.vmm.launch import launch_image
from sevsim.vmm.machine import Devices


@frozen
class RunResult:
    exit: KvmExit
    trace: Trace
    vm: Vm


def run_image(
    image: GuestImage,
    table: ExitTable,
    events: EventSink,
    *,
    echo: Callable[[str], None] | None = None,
    plugin_settings: Mapping[str, Mapping[str, Any]] | None = None,
    kvm: Kvm | None = None,
    timeout: float | None = None,
    uart_input: bytes = b"",
    **vm_args: Any,
) -> RunResult:
    """Launch ``image`` on one vCPU and run it until it stops (or ``timeout`` seconds
    have passed: a spinning guest cannot hang the VMM); trace every exit, device
    output and unclaimed access. ``uart_input`` is what the guest can read from COM1."""
    trace = Trace(echo)
    console = LineConsole(lambda line: trace.note(f"      [uart] {line}"))
    devices = Devices.standard(console=console.write)
    devices.uart.input += uart_input
    for bus in (devices.io, devices.mmio):
        bus.on_unclaimed.append(
            lambda bus, access, address, size: trace.note(
                f"      [{bus.name}] unclaimed {size}-byte {access} at {address:#x}: "
                + ("all ones" if access == "read" else "dropped")
            )
        )
    vm = launch_image(
        kvm or Kvm(), image, handlers=table, events=TeeSink(events, trace),
        plugin_settings={k: dict(v) for k, v in (plugin_settings or {}).items()},
        devices=devices, **vm_args,
    )  # fmt: skip
    trace.note(f"launch digest {vm.launch_digest().hex()}")
    vcpu = vm.vcpus[0]
    exit_ = vcpu.run(timeout)
    console.flush()
    trace.record_exit(vcpu, exit_)
    return RunResult(exit_, trace, vm)


class LineConsole:
    """Collects a device's output bytes and hands on whole lines."""

    def __init__(self, emit: Callable[[str], None]) -> None:
        self._emit = emit
        self._pending = bytearray()

    def write(self, data: bytes) -> None:
        self._pending += data
        while b"\n" in self._pending:
            line, _, rest = self._pending.partition(b"\n")
            self._emit(line.decode("latin-1"))
            self._pending = bytearray(rest)

    def flush(self) -> None:
        if self._pending:
            self._emit(self._pending.decode("latin-1"))
            self._pending.clear()
