"""Where kvm sends port IO and MMIO: the buses the VMM attaches to a VM.

kvm completes a guest's IO and MMIO requests against these without a trip to
userspace, as KVM does for in-kernel devices and ioeventfds; the devices themselves
are the VMM's (``sevsim.vmm``). A VM without buses answers like an empty bus.
"""

from __future__ import annotations

from typing import Protocol


class GuestBus(Protocol):
    def read(self, address: int, size: int) -> bytes: ...

    def write(self, address: int, data: bytes) -> None: ...


class EmptyBus:
    """No devices: reads return all ones, writes are dropped (QEMU's unassigned access)."""

    def read(self, address: int, size: int) -> bytes:
        return b"\xff" * size

    def write(self, address: int, data: bytes) -> None:
        return None
