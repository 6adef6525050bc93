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


class MsrBus(Protocol):
    """MSRs the VMM handles itself (its local APIC's x2APIC registers and APIC_BASE),
    as KVM hands MSRs in a userspace filter to the VMM. ``None``: not the VMM's MSR."""

    def read(self, vcpu_id: int, index: int) -> int | None: ...

    def write(self, vcpu_id: int, index: int, value: int) -> bool | None:
        """True: done; False: the write fails (#GP); None: not the VMM's MSR."""
        ...


class EmptyMsrBus:
    """The VMM handles no MSR: KVM answers them all."""

    def read(self, vcpu_id: int, index: int) -> int | None:
        return None

    def write(self, vcpu_id: int, index: int, value: int) -> bool | None:
        return None
