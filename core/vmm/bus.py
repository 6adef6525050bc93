"""IO-port and MMIO buses: address ranges to devices, rust-vmm style.

A bus refuses a registration that overlaps an existing one (naming both), answers
an access nobody claims the way QEMU does — reads are all ones, writes are dropped —
and reports it, so the trace shows every access that went nowhere. Accesses a device
served are reported too, when someone listens (:func:`report_accesses`).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Protocol

from attrs import frozen

from sevsim.errors import SevsimError

if TYPE_CHECKING:
    from sevsim.kvm.vm import Vm


class BusError(SevsimError):
    """A registration overlaps another, or an access is malformed."""


class Device(Protocol):
    """A device on a bus; offsets are relative to where it was inserted."""

    name: str

    def read(self, offset: int, size: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...


@frozen
class Range:
    base: int
    size: int

    @property
    def end(self) -> int:
        return self.base + self.size


class Bus:
    """Devices at non-overlapping ranges of one address space (ports or GPAs)."""

    def __init__(self, name: str, limit: int) -> None:
        self.name = name
        self.limit = limit
        self._bases: list[int] = []
        self._entries: list[tuple[Range, Device]] = []
        #: Called as (bus, "read"/"write", address, size) for unclaimed accesses.
        self.on_unclaimed: list[Callable[[Bus, str, int, int], None]] = []
        #: Called as (bus, "read"/"write", address, device, data) for accesses a device
        #: served: a write before the device acts on it, a read once it has answered.
        self.on_access: list[Callable[[Bus, str, int, Device, bytes], None]] = []

    def insert(self, device: Device, base: int, size: int) -> None:
        if size <= 0 or base < 0 or base + size > self.limit:
            raise BusError(
                f"{self.name} bus: {device.name!r} at {base:#x} size {size:#x} is outside "
                f"0..{self.limit:#x} or empty"
            )
        new = Range(base, size)
        for other, dev in self._entries:
            if new.base < other.end and other.base < new.end:
                raise BusError(
                    f"{self.name} bus: {device.name!r} [{base:#x}, {new.end:#x}) overlaps "
                    f"{dev.name!r} [{other.base:#x}, {other.end:#x})"
                )
        at = bisect.bisect(self._bases, base)
        self._bases.insert(at, base)
        self._entries.insert(at, (new, device))

    def remove(self, device: Device, base: int) -> None:
        """Take ``device`` off the range it was inserted at ``base``: a window the guest
        moves or turns off (the PIIX4 PM registers follow PMBA and PMREGMISC)."""
        for at, (where, dev) in enumerate(self._entries):
            if dev is device and where.base == base:
                del self._bases[at]
                del self._entries[at]
                return
        raise BusError(f"{self.name} bus: {device.name!r} is not inserted at {base:#x}")

    def find(self, address: int, size: int) -> tuple[Device, int] | None:
        """The device whose range holds all of [address, address+size), and the offset."""
        at = bisect.bisect(self._bases, address) - 1
        if at < 0:
            return None
        where, device = self._entries[at]
        if address + size > where.base + where.size:  # where.end, without a property call
            return None
        return device, address - where.base

    def read(self, address: int, size: int) -> bytes:
        hit = self.find(address, size)
        if hit is None:
            self._unclaimed("read", address, size)
            return b"\xff" * size
        device, offset = hit
        data = device.read(offset, size)
        if len(data) != size:
            raise BusError(f"{device.name!r} returned {len(data)} bytes for a {size}-byte read")
        for callback in self.on_access:
            callback(self, "read", address, device, data)
        return data

    def write(self, address: int, data: bytes) -> None:
        hit = self.find(address, len(data))
        if hit is None:
            self._unclaimed("write", address, len(data))
            return
        device, offset = hit
        data = bytes(data)
        for callback in self.on_access:
            callback(self, "write", address, device, data)
        device.write(offset, data)

    def _unclaimed(self, access: str, address: int, size: int) -> None:
        for callback in self.on_unclaimed:
            callback(self, access, address, size)

    def devices(self) -> list[tuple[Range, Device]]:
        return list(self._entries)


def report_accesses(vm: Vm, buses: Iterable[Bus], vcpu: Callable[[], int]) -> None:
    """Report each access a device on ``buses`` serves to ``vm``'s observers, as the
    ``device_access`` event of the vCPU ``vcpu()`` names (QEMU's
    ``memory_region_ops_read/write`` trace events: only the VMM knows the device). A VM
    whose observers do not listen gets no callback, so an access costs nothing more."""
    if not vm.wants("device_access"):
        return

    def report(bus: Bus, direction: str, address: int, device: Device, data: bytes) -> None:
        vm.emit("device_access", vcpu_id=vcpu(), device=device.name, bus=bus.name,
                address=address, size=len(data), direction=direction,
                value=int.from_bytes(data, "little"))  # fmt: skip

    for bus in buses:
        bus.on_access.append(report)
