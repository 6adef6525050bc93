"""The VMM's devices: a 16550 UART, QEMU's debug port, the POST port, an MMIO test device."""

from __future__ import annotations

from collections.abc import Callable

from attrs import define, field

COM1 = 0x3F8
DEBUG_PORT = 0x402
POST_PORT = 0x80


def _le(value: int, size: int) -> bytes:
    return (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")


@define(eq=False)
class Uart16550:
    """An 8250/16550 UART: enough for a guest to print and read a console line.

    Output bytes go to ``output`` and to ``sink`` (the console); input comes from
    ``input`` (bytes queued by the VMM, from a string or stdin). Line status reports
    the transmitter always empty and data-ready while input is queued.
    """

    name: str = "uart16550"
    sink: Callable[[bytes], None] | None = None
    output: bytearray = field(factory=bytearray)
    input: bytearray = field(factory=bytearray)
    ier: int = 0
    lcr: int = 0
    mcr: int = 0
    scr: int = 0
    divisor: int = 12  # 9600 baud

    THR_EMPTY = 0x20 | 0x40
    DATA_READY = 0x01
    DLAB = 0x80

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self._read_reg(offset + i) for i in range(size))

    def _read_reg(self, reg: int) -> int:
        dlab = self.lcr & self.DLAB
        match reg:
            case 0 if dlab:
                return self.divisor & 0xFF
            case 1 if dlab:
                return self.divisor >> 8
            case 0:
                return self.input.pop(0) if self.input else 0
            case 1:
                return self.ier
            case 2:
                return 0x01  # IIR: no interrupt pending
            case 3:
                return self.lcr
            case 4:
                return self.mcr
            case 5:
                return self.THR_EMPTY | (self.DATA_READY if self.input else 0)
            case 6:
                return 0xB0  # MSR: DCD, DSR, CTS
            case 7:
                return self.scr
        return 0xFF

    def write(self, offset: int, data: bytes) -> None:
        for i, byte in enumerate(data):
            self._write_reg(offset + i, byte)

    def _write_reg(self, reg: int, value: int) -> None:
        dlab = self.lcr & self.DLAB
        match reg:
            case 0 if dlab:
                self.divisor = (self.divisor & 0xFF00) | value
            case 1 if dlab:
                self.divisor = (self.divisor & 0xFF) | value << 8
            case 0:
                self.output.append(value)
                if self.sink is not None:
                    self.sink(bytes([value]))
            case 1:
                self.ier = value & 0x0F
            case 3:
                self.lcr = value
            case 4:
                self.mcr = value & 0x1F
            case 7:
                self.scr = value


@define(eq=False)
class DebugPort:
    """QEMU's isa-debugcon at 0x402 (OVMF's debug log): bytes written are kept."""

    name: str = "debugcon"
    output: bytearray = field(factory=bytearray)
    sink: Callable[[bytes], None] | None = None

    def read(self, offset: int, size: int) -> bytes:
        return b"\xe9" * size  # QEMU's readback value: the guest's presence check

    def write(self, offset: int, data: bytes) -> None:
        self.output += data
        if self.sink is not None:
            self.sink(data)


@define(eq=False)
class PostPort:
    """Port 0x80: firmware progress codes, kept in order."""

    name: str = "post"
    codes: list[int] = field(factory=list)

    def read(self, offset: int, size: int) -> bytes:
        return _le(self.codes[-1] if self.codes else 0, size)

    def write(self, offset: int, data: bytes) -> None:
        self.codes.append(int.from_bytes(data, "little"))


@define(eq=False)
class MmioTestDevice:
    """A small MMIO device for tests and the demo.

    ====== ===== =====================================================
    offset access
    ====== ===== =====================================================
    0x00   R     ID: 0x53455653 ("SEVS")
    0x08   RW    SCRATCH: 64 bits, reads back what was written
    0x10   R     WRITES: number of writes the device has seen
    0x18   RW    ACCUMULATOR: a write adds its value, a read returns the sum
    0x100  RW    BUFFER: 0xF00 bytes of plain storage (string MMIO)
    ====== ===== =====================================================
    """

    name: str = "mmio-test"
    scratch: int = 0
    writes: int = 0
    accumulator: int = 0
    buffer: bytearray = field(factory=lambda: bytearray(0xF00))

    ID = 0x5345_5653
    SIZE = 0x1000
    BUFFER = 0x100

    def read(self, offset: int, size: int) -> bytes:
        if offset >= self.BUFFER:
            start = offset - self.BUFFER
            return bytes(self.buffer[start : start + size]).ljust(size, b"\xff")
        base = offset & ~7
        value = {0x00: self.ID, 0x08: self.scratch, 0x10: self.writes,
                 0x18: self.accumulator}.get(base, 0)  # fmt: skip
        return _le(value >> (8 * (offset - base)), size)

    def write(self, offset: int, data: bytes) -> None:
        self.writes += 1
        value = int.from_bytes(data, "little")
        if offset >= self.BUFFER:
            start = offset - self.BUFFER
            self.buffer[start : start + len(data)] = data[: max(0, len(self.buffer) - start)]
        elif offset & ~7 == 0x08:
            shift = 8 * (offset - 0x08)
            mask = ((1 << (8 * len(data))) - 1) << shift
            self.scratch = (self.scratch & ~mask) | (value << shift & mask)
        elif offset == 0x18:
            self.accumulator = (self.accumulator + value) & 0xFFFF_FFFF_FFFF_FFFF
