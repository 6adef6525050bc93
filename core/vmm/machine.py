"""The VMM's standard machine: which devices sit where, on which bus.

======================  ==========================================
port 0x3F8..0x3FF       16550 UART (COM1): the console
port 0x402              QEMU debug console (OVMF's debug log)
port 0x80               POST codes
MMIO 0xD0000000 (4 KiB) MMIO test device (sevsim.vmm.devices)
======================  ==========================================
"""

from __future__ import annotations

from collections.abc import Callable

from attrs import define, field

from sevsim.kvm.vm import Vm
from sevsim.vmm.bus import Bus, report_accesses
from sevsim.vmm.devices import (
    COM1,
    DEBUG_PORT,
    POST_PORT,
    DebugPort,
    MmioTestDevice,
    PostPort,
    Uart16550,
)

MMIO_TEST_GPA = 0xD000_0000


@define(eq=False)
class Devices:
    """One VM's devices and the two buses they sit on."""

    io: Bus = field(factory=lambda: Bus("io", 0x1_0000))
    mmio: Bus = field(factory=lambda: Bus("mmio", 1 << 52))
    uart: Uart16550 = field(factory=Uart16550)
    debug: DebugPort = field(factory=DebugPort)
    post: PostPort = field(factory=PostPort)
    mmio_test: MmioTestDevice = field(factory=MmioTestDevice)

    @classmethod
    def standard(cls, console: Callable[[bytes], None] | None = None) -> Devices:
        devices = cls()
        devices.uart.sink = console
        devices.io.insert(devices.uart, COM1, 8)
        devices.io.insert(devices.debug, DEBUG_PORT, 1)
        devices.io.insert(devices.post, POST_PORT, 1)
        devices.mmio.insert(devices.mmio_test, MMIO_TEST_GPA, MmioTestDevice.SIZE)
        return devices

    def attach(self, vm: Vm) -> None:
        """Leave the MMIO ranges without RAM and hand both buses to kvm; the VM's one
        vCPU makes every device access its observers hear of."""
        for where, device in self.mmio.devices():
            vm.add_mmio(where.base, where.size, device.name)
        vm.attach_buses(self.io, self.mmio)
        report_accesses(vm, (self.io, self.mmio), lambda: 0)
