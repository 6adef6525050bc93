"""QEMU's fw_cfg on the pc machine's ports, driven the way OVMF's QemuFwCfgLib drives it."""

import random
import re
import struct

import pytest

from sevsim.errors import GuestMemoryError
from sevsim.vmm.bus import Bus
from sevsim.vmm.fw_cfg import (
    FW_CFG_IO_BASE,
    FW_CFG_IO_SIZE,
    DmaControl,
    FwCfg,
    FwCfgError,
    i440fx_ram_ranges,
)

SELECTOR, DATA, DMA_HIGH, DMA_LOW = 0x510, 0x511, 0x514, 0x518
MIB, GIB = 1 << 20, 1 << 30


class Memory:
    """Guest RAM [0, size) as a bytearray; outside it, GuestMemoryError like the VM's."""

    def __init__(self, size: int = 0x10000) -> None:
        self.bytes = bytearray(size)

    def _check(self, gpa: int, size: int) -> None:
        if gpa < 0 or gpa + size > len(self.bytes):
            raise GuestMemoryError(f"[{gpa:#x}, {gpa + size:#x}) is outside RAM")

    def read(self, gpa: int, size: int) -> bytes:
        self._check(gpa, size)
        return bytes(self.bytes[gpa : gpa + size])

    def write(self, gpa: int, data: bytes) -> None:
        self._check(gpa, len(data))
        self.bytes[gpa : gpa + len(data)] = data


def machine(ram_size: int = 512 * MIB, cpus: int = 1, **kwargs) -> tuple[Bus, FwCfg, Memory]:
    memory = Memory()
    fw_cfg = FwCfg(memory, i440fx_ram_ranges(ram_size), cpus, **kwargs)
    io = Bus("io", 0x10000)
    io.insert(fw_cfg, FW_CFG_IO_BASE, FW_CFG_IO_SIZE)
    return io, fw_cfg, memory


def select(io: Bus, key: int) -> None:
    io.write(SELECTOR, key.to_bytes(2, "little"))  # IoWrite16 (FW_CFG_IO_SELECTOR, key)


def read_bytes(io: Bus, count: int) -> bytes:
    """IoReadFifo8 (FW_CFG_IO_DATA, count): one byte-wide IN per byte."""
    return b"".join(io.read(DATA, 1) for _ in range(count))


def directory(io: Bus) -> dict[str, tuple[int, int]]:
    """QemuFwCfgFindFile's walk: name -> (select, size)."""
    select(io, 0x19)
    (count,) = struct.unpack(">I", read_bytes(io, 4))
    files = {}
    for _ in range(count):
        size, key, _reserved, name = struct.unpack(">IHH56s", read_bytes(io, 64))
        files[name.rstrip(b"\0").decode()] = (key, size)
    return files


def read_file(io: Bus, name: str) -> bytes:
    key, size = directory(io)[name]
    select(io, key)
    return read_bytes(io, size)


def e820(io: Bus) -> list[tuple[int, int, int]]:
    table = read_file(io, "etc/e820")
    return list(struct.iter_unpack("<QQI", table))


def test_signature_and_revision_through_the_ports():
    io, _, _ = machine()
    select(io, 0x0000)
    assert read_bytes(io, 4) == b"QEMU"
    assert read_bytes(io, 2) == b"\0\0"  # past the end
    select(io, 0x0001)
    assert struct.unpack("<I", read_bytes(io, 4)) == (0b11,)  # traditional | DMA


def test_selecting_rewinds_and_port_0x510_streams_too():
    io, _, _ = machine()
    select(io, 0)
    assert io.read(DATA, 1) + io.read(DATA, 1) == b"QE"
    assert io.read(SELECTOR, 1) == b"M"  # the data register also answers at 0x510
    select(io, 0)
    assert io.read(DATA, 1) == b"Q"


def test_wide_port_reads_split_as_qemu_does():
    io, _, _ = machine()
    select(io, 0)
    assert io.read(SELECTOR, 2) == b"\0\0"  # rejected width: zeros, stream untouched
    assert io.read(DATA, 2) == b"Q\xff"  # one stream byte, then the unused port 0x512
    assert io.read(DATA, 4) == b"E\xff\xffQ"  # ...0x512-0x513, then the DMA signature
    assert io.read(DATA, 1) == b"M"


def test_data_writes_are_ignored_and_a_32_bit_selector_write_selects():
    io, _, _ = machine()
    select(io, 1)
    io.write(DATA, b"\x55")
    assert io.read(DATA, 1) == b"\x03"
    io.write(SELECTOR, (0xABCD_0000).to_bytes(4, "little"))  # low half: key 0
    assert read_bytes(io, 4) == b"QEMU"


def test_numbered_items_of_a_4_cpu_pc():
    io, _, _ = machine(ram_size=4 * GIB, cpus=4)
    values = {}
    for key, size in ((0x03, 8), (0x04, 2), (0x05, 2), (0x0E, 2), (0x0F, 2), (0x8002, 4)):
        select(io, key)
        values[key] = int.from_bytes(read_bytes(io, size), "little")
    assert values == {0x03: 4 * GIB, 0x04: 1, 0x05: 4, 0x0E: 0, 0x0F: 4, 0x8002: 1}
    select(io, 0x02)
    assert read_bytes(io, 17) == bytes(17)  # the zero UUID, then the end
    select(io, 0x0D)
    assert read_bytes(io, 41) == bytes(41)  # NUMA: no nodes, 4 CPUs, then the end


def test_file_directory():
    io, fw_cfg, _ = machine()
    fw_cfg.add_file("opt/sevsim/test", b"hello")
    files = directory(io)
    assert list(files) == sorted(files)
    assert files == {
        "bios-geometry": (0x20, 0),
        "bootorder": (0x21, 0),
        "etc/boot-fail-wait": (0x22, 4),
        "etc/e820": (0x23, 40),
        "etc/system-states": (0x24, 6),
        "opt/sevsim/test": (0x25, 5),
    }
    assert read_file(io, "opt/sevsim/test") == b"hello"
    assert read_file(io, "etc/boot-fail-wait") == b"\xff\xff\xff\xff"


def test_adding_a_file_moves_the_later_ones_up():
    io, fw_cfg, _ = machine()
    fw_cfg.add_file("etc/a", b"x")
    files = directory(io)
    assert files["etc/a"] == (0x22, 1)
    assert files["etc/boot-fail-wait"] == (0x23, 4)


def test_e820_of_a_512_mib_machine():
    io, _, _ = machine(ram_size=512 * MIB)
    assert e820(io) == [(0xFEFF_C000, 0x4000, 2), (0, 512 * MIB, 1)]


def test_e820_of_a_4_gib_machine():
    io, _, _ = machine(ram_size=4 * GIB)
    assert e820(io) == [(0xFEFF_C000, 0x4000, 2), (0, 3 * GIB, 1), (4 * GIB, 1 * GIB, 1)]


def test_ram_split_edges():
    assert i440fx_ram_ranges(0xDFFF_F000) == ((0, 0xDFFF_F000),)
    assert i440fx_ram_ranges(0xE000_0000) == ((0, 3 * GIB), (4 * GIB, 0x2000_0000))


def test_legacy_e820_and_hpet_items():
    io, _, _ = machine()
    select(io, 0x8003)
    table = read_bytes(io, 4 + 16 * 20)
    assert table[:24] == struct.pack("<IQQI", 1, 0xFEFF_C000, 0x4000, 2)[:24]
    assert table[24:] == bytes(300)
    select(io, 0x8004)
    hpet = read_bytes(io, 121)
    assert hpet[:16] == b"\x01" + struct.pack("<IQHB", 0x8086_A201, 0xFED0_0000, 0, 0)
    assert hpet[16:] == bytes(105)
    io, _, _ = machine(hpet=False)
    select(io, 0x8004)
    assert read_bytes(io, 121) == b"\xff" + bytes(120)


@pytest.mark.parametrize(
    ("kwargs", "states"),
    [
        ({}, b"\x80\x00\x00\x81\x82\x80"),
        ({"disable_s3": True, "disable_s4": True}, b"\x80\x00\x00\x01\x02\x80"),
    ],
)
def test_system_states(kwargs, states):
    io, _, _ = machine(**kwargs)
    assert read_file(io, "etc/system-states") == states


@pytest.mark.parametrize("key", [0x0008, 0x0030, 0x3FFF, 0x7777, 0x8001, 0x8005, 0xFFFF])
def test_unknown_selectors_read_zeros(key):
    io, _, _ = machine()
    select(io, key)
    assert read_bytes(io, 8) == bytes(8)


def test_write_channel_bit_is_ignored_by_the_selector():
    io, _, _ = machine()
    select(io, 0x4000)  # FW_CFG_WRITE_CHANNEL | SIGNATURE: QEMU masks the bit off
    assert read_bytes(io, 4) == b"QEMU"


def test_dma_signature_through_the_ports():
    io, _, _ = machine()
    assert io.read(DMA_HIGH, 4) + io.read(DMA_LOW, 4) == b"QEMU CFG"
    assert io.read(DMA_HIGH + 2, 4) == b"MU C"  # split into two aligned 16-bit reads
    assert io.read(DMA_LOW + 3, 1) == b"G"


def dma(io: Bus, memory: Memory, access: int, control: int, length: int, address: int) -> int:
    """InternalQemuFwCfgDmaBytes: the access structure, then both address halves."""
    memory.write(access, struct.pack(">IIQ", control, length, address))
    io.write(DMA_HIGH, (access >> 32).to_bytes(4, "big"))
    io.write(DMA_LOW, (access & 0xFFFF_FFFF).to_bytes(4, "big"))
    return int.from_bytes(memory.read(access, 4), "big")


def test_dma_read_of_a_file():
    io, _, memory = machine(ram_size=4 * GIB)
    key, size = directory(io)["etc/e820"]
    control = key << 16 | DmaControl.SELECT | DmaControl.READ
    assert dma(io, memory, 0x1000, control, size, 0x2000) == 0
    assert memory.read(0x2000, size) == read_file(io, "etc/e820")
    assert memory.read(0x2000 + size, 1) == b"\0"


def test_dma_skip_then_read_past_the_end():
    io, _, memory = machine()
    memory.write(0x3000, b"\xaa" * 8)
    assert dma(io, memory, 0x1000, DmaControl.SELECT | DmaControl.SKIP, 2, 0) == 0
    assert dma(io, memory, 0x1000, DmaControl.READ, 6, 0x3000) == 0
    assert memory.read(0x3000, 8) == b"MU\0\0\0\0\xaa\xaa"  # zeros past the end


def test_dma_continues_the_port_stream():
    io, _, memory = machine()
    select(io, 0)
    assert io.read(DATA, 1) == b"Q"
    assert dma(io, memory, 0x1000, DmaControl.READ, 2, 0x3000) == 0
    assert memory.read(0x3000, 2) == b"EM"
    assert io.read(DATA, 1) == b"U"


def test_dma_errors():
    io, _, memory = machine()
    select(io, 0)
    # writes: every item is read-only
    assert dma(io, memory, 0x1000, DmaControl.WRITE, 4, 0x3000) == DmaControl.ERROR
    # the data lands outside RAM
    assert dma(io, memory, 0x1000, DmaControl.READ, 4, 0xFFF0_0000) == DmaControl.ERROR
    # no operation bit: nothing moves, done
    assert dma(io, memory, 0x1000, 0, 4, 0x3000) == 0
    # the access structure itself is outside RAM: nothing to report it in, no crash
    io.write(DMA_HIGH, b"\0\0\0\x01")
    io.write(DMA_LOW, b"\0\0\0\0")
    select(io, 1)
    assert read_bytes(io, 1) == b"\x03"


def test_dma_address_register_only_takes_aligned_32_bit_halves():
    io, _, memory = machine()
    memory.write(0x1000, struct.pack(">IIQ", DmaControl.SELECT | DmaControl.READ, 4, 0x3000))
    io.write(DMA_LOW, b"\0\0")  # 16-bit: rejected, no transfer
    assert memory.read(0x3000, 4) == bytes(4)
    io.write(DMA_HIGH, b"\0\0\0\0")
    io.write(DMA_LOW, b"\0\0\x10\x00")
    assert memory.read(0x3000, 4) == b"QEMU"
    assert memory.read(0x1000, 4) == bytes(4)


def test_reset_selects_the_signature():
    io, fw_cfg, _ = machine()
    select(io, 1)
    fw_cfg.reset()
    assert read_bytes(io, 4) == b"QEMU"


def test_arbitrary_guest_accesses_never_raise():
    _, fw_cfg, memory = machine()
    rng = random.Random(0x510)
    for _ in range(20000):
        offset, size = rng.randrange(-2, FW_CFG_IO_SIZE + 2), rng.choice((1, 2, 4, 8))
        if rng.random() < 0.5:
            assert len(fw_cfg.read(offset, size)) == size
        else:
            fw_cfg.write(offset, rng.randbytes(size))
        if rng.random() < 0.05:  # a transfer with random fields from a random address
            memory.write(0x1000, rng.randbytes(16))
            fw_cfg.write(4, b"\0\0\0\0")
            fw_cfg.write(8, rng.choice((b"\0\0\x10\0", rng.randbytes(4))))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cpus": 0}, "cpus=0"),
        ({"cpus": 4, "max_cpus": 2}, "max_cpus=2"),
        ({"cpus": 1, "uuid": b"short"}, "UUID b'short' is 5 bytes"),
        ({"cpus": 1, "ram": [(0, 0)]}, "RAM range (0x0, 0x0)"),
        ({"cpus": 1, "ram": [(0, 2 * MIB), (MIB, MIB)]}, "RAM range (0x100000, 0x100000)"),
        ({"cpus": 1, "ram": []}, "no RAM ranges"),
    ],
)
def test_configuration_errors(kwargs, message):
    kwargs.setdefault("ram", i440fx_ram_ranges(512 * MIB))
    with pytest.raises(FwCfgError, match=re.escape(message)):
        FwCfg(Memory(), **kwargs)


def test_file_errors():
    _, fw_cfg, _ = machine()
    with pytest.raises(FwCfgError, match="duplicate fw_cfg file name 'etc/e820'"):
        fw_cfg.add_file("etc/e820", b"")
    with pytest.raises(FwCfgError, match=re.escape("expected 1..55 bytes")):
        fw_cfg.add_file("x" * 56, b"")
    for index in range(27):
        fw_cfg.add_file(f"opt/{index}", b"")
    with pytest.raises(FwCfgError, match="all 32 are taken"):
        fw_cfg.add_file("opt/one-too-many", b"")
    with pytest.raises(FwCfgError, match="RAM size 0x0"):
        i440fx_ram_ranges(0)
