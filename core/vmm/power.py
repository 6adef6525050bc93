"""What a guest can ask of the machine itself: reset, power off, or end the run with a status.

Devices that can end or restart the machine (the PIIX4 PM block's sleep-enable, the
0xCF9 reset control register, port 0x92's fast reset, QEMU's isa-debug-exit) do not
stop anything themselves: they hand one of these requests to the machine's
``request`` callback, and the run loop acts on it after the current exit.
"""

from __future__ import annotations

from collections.abc import Callable

from attrs import frozen


@frozen
class ResetRequest:
    """The guest asked for a system reset (0xCF9, port 0x92 bit 0, the keyboard controller)."""

    source: str


@frozen
class PowerOffRequest:
    """The guest asked to power off (ACPI S5 through PM1a_CNT SLP_EN)."""

    source: str


@frozen
class DebugExitRequest:
    """QEMU's isa-debug-exit: the guest wrote ``value``; QEMU exits with ``(value << 1) | 1``."""

    value: int

    @property
    def status(self) -> int:
        return (self.value << 1) | 1


MachineRequest = ResetRequest | PowerOffRequest | DebugExitRequest
RequestSink = Callable[[MachineRequest], None]
