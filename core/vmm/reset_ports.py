"""The PC's small reset and exit ports: System Control Port A, the PIIX reset control register,
and QEMU's isa-debug-exit.

===== ==== =================================================================================
port  size device
===== ==== =================================================================================
0x92  1    :class:`Port92`: System Control Port A (fast A20 gate, fast reset)
0xCF9 1    :class:`ResetControl`: PIIX3 reset control register (RCR); it sits inside the PCI
           CONFADD dword, so :class:`sevsim.vmm.pci.PciHost` routes accesses that start at
           0xCF9 to it instead of the bus holding it directly
0x501 2    :class:`DebugExit`: QEMU's ``isa-debug-exit`` with its default iobase and iosize
===== ==== =================================================================================

None of them stops anything itself: each hands a request to the machine's
:data:`~sevsim.vmm.power.RequestSink`, and the run loop acts on it after the exit.

Wiring them into a ``pc`` machine::

    rcr = reset_ports.attach(io, request)      # 0x92 and 0x501 on the bus
    pci.attach_i440fx(io, pm_block, reset_control=rcr)
"""

from __future__ import annotations

from sevsim.vmm.bus import Bus
from sevsim.vmm.power import DebugExitRequest, RequestSink, ResetRequest

PORT92 = 0x92
DEBUG_EXIT_PORT = 0x501
#: QEMU's default ``iosize`` of isa-debug-exit.
DEBUG_EXIT_SIZE = 2

# Port 0x92 bits.
FAST_RESET = 1 << 0
A20_GATE = 1 << 1

# Reset control register bits (82371SB datasheet, RC register at 0xCF9).
SYS_RST = 1 << 1
RST_CPU = 1 << 2


class Port92:
    """System Control Port A (QEMU ``hw/i386/port92.c``).

    The whole byte is kept and read back. Bit 1 is the fast A20 gate; OVMF's
    PlatformPei sets it with ``IoOr8(0x92, BIT1)``. KVM has no A20 masking, so QEMU's A20
    line changes nothing for a KVM guest and sevsim keeps only the readback. Bit 0 going
    from 0 to 1 resets the machine, as on QEMU; writing it while it is already set does
    not.
    """

    __slots__ = ("_request", "name", "value")

    def __init__(self, request: RequestSink, name: str = "port92") -> None:
        self.name = name
        self._request = request
        self.value = 0

    def read(self, offset: int, size: int) -> bytes:
        return bytes([self.value]) * size

    def write(self, offset: int, data: bytes) -> None:
        for byte in data:
            previous, self.value = self.value, byte
            if byte & FAST_RESET and not previous & FAST_RESET:
                self._request(ResetRequest("port 0x92 fast reset"))


class ResetControl:
    """The PIIX3/PIIX4 reset control register at 0xCF9 (QEMU ``hw/isa/piix.c``, ``rcr_write``).

    Writing RST_CPU (bit 2) resets the machine; OVMF's ``ResetCold``
    (``OvmfPkg/Library/ResetSystemLib``) writes 0x06 there. Any other write keeps only
    SYS_RST (bit 1, which chooses a hard rather than a soft reset on the chip; QEMU
    resets the same way either way), and reads return the kept value. A write that
    resets leaves the kept value as it was, as QEMU does. The register is one byte wide:
    a wider access at 0xCF9 acts on each of its bytes in turn, as QEMU's
    ``impl.max_access_size = 1`` makes it.
    """

    __slots__ = ("_request", "name", "value")

    def __init__(self, request: RequestSink, name: str = "piix-rcr") -> None:
        self.name = name
        self._request = request
        self.value = 0

    def read(self, offset: int, size: int) -> bytes:
        return bytes([self.value]) * size

    def write(self, offset: int, data: bytes) -> None:
        for byte in data:
            if byte & RST_CPU:
                kind = "hard" if byte & SYS_RST else "soft"
                self._request(ResetRequest(f"0xcf9 {kind} reset"))
            else:
                self.value = byte & SYS_RST


class DebugExit:
    """QEMU's ``isa-debug-exit`` (``hw/misc/debugexit.c``): a write of V ends the run.

    QEMU exits with status ``(V << 1) | 1``, V being the whole value written; here the
    write hands ``DebugExitRequest(V)`` to the machine, whose ``status`` is that same
    number. The device covers QEMU's two ports, so sevsim's bus brings it a byte at 0x501
    or 0x502 or a word at 0x501 (QEMU's memory core also passes a dword at 0x501 on,
    sevsim's bus leaves an access that runs past the device unclaimed). Reads return 0,
    as QEMU's ``debug_exit_read`` does: that is how a guest tells the port from an
    unclaimed one.
    """

    __slots__ = ("_request", "name")

    def __init__(self, request: RequestSink, name: str = "isa-debug-exit") -> None:
        self.name = name
        self._request = request

    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        self._request(DebugExitRequest(int.from_bytes(data, "little")))


def attach(io: Bus, request: RequestSink) -> ResetControl:
    """Put port 0x92 and isa-debug-exit on ``io``, and return the 0xCF9 register for the
    PCI host to route (see :func:`sevsim.vmm.pci.attach_i440fx`)."""
    io.insert(Port92(request), PORT92, 1)
    io.insert(DebugExit(request), DEBUG_EXIT_PORT, DEBUG_EXIT_SIZE)
    return ResetControl(request)
