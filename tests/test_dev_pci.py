"""PCI configuration mechanism #1 and the i440FX/PIIX3/PIIX4 functions of the pc machine,
driven through the I/O bus the way OVMF's BasePciCf8Lib drives them."""

from __future__ import annotations

import random

import pytest

from sevsim.vmm import pci, reset_ports
from sevsim.vmm.acpi_pm import AcpiPmBlock
from sevsim.vmm.bus import Bus, BusError
from sevsim.vmm.clock import MachineClock
from sevsim.vmm.pci import (
    PciError,
    PciFunction,
    PciHost,
    Piix4PowerManagement,
    attach_i440fx,
)
from sevsim.vmm.power import MachineRequest, ResetRequest

Bdf = tuple[int, int, int]


def cf8_address(bus: int, device: int, function: int, register: int) -> int:
    """edk2's PCI_TO_CF8_ADDRESS of PCI_LIB_ADDRESS(bus, device, function, register)."""
    return 0x8000_0000 | bus << 16 | device << 11 | function << 8 | (register & 0xFC)


class Cf8:
    """The accesses edk2's BasePciCf8Lib makes: save CONFADD, latch, access CONFDATA at
    the register's byte offset, restore CONFADD."""

    def __init__(self, io: Bus) -> None:
        self.io = io

    def _access(self, bdf: Bdf, register: int, size: int, data: bytes | None) -> int:
        saved = self.io.read(0xCF8, 4)
        self.io.write(0xCF8, cf8_address(*bdf, register).to_bytes(4, "little"))
        port = 0xCFC + (register & 3)
        if data is None:
            result = int.from_bytes(self.io.read(port, size), "little")
        else:
            self.io.write(port, data)
            result = int.from_bytes(data, "little")
        self.io.write(0xCF8, saved)
        return result

    def read(self, bdf: Bdf, register: int, size: int) -> int:
        return self._access(bdf, register, size, None)

    def write(self, bdf: Bdf, register: int, value: int, size: int) -> None:
        self._access(bdf, register, size, value.to_bytes(size, "little"))

    def and_then_or(self, bdf: Bdf, register: int, and_data: int, or_data: int, size: int) -> int:
        value = (self.read(bdf, register, size) & and_data) | or_data
        self.write(bdf, register, value & ((1 << (8 * size)) - 1), size)
        return value


HOST_BRIDGE = (0, 0, 0)
ISA_BRIDGE = (0, 1, 0)
IDE = (0, 1, 1)
PM = (0, 1, 3)


@pytest.fixture
def machine():
    io = Bus("io", 0x10000)
    clock = MachineClock()
    requests: list[MachineRequest] = []
    rcr = reset_ports.attach(io, requests.append)
    block = AcpiPmBlock(clock, requests.append)
    host = attach_i440fx(io, block, rcr)
    return io, clock, requests, block, host


def test_ovmf_sec_acpi_timer_constructor_sequence(machine):
    """BaseRomAcpiTimerLib's constructor, then its timer reads (OVMF.md section 3)."""
    io, clock, _, block, host = machine
    cfg = Cf8(io)
    assert cfg.read(HOST_BRIDGE, 0x02, 2) == 0x1237  # OVMF_HOSTBRIDGE_DID: i440FX
    assert cfg.read(PM, 0x80, 1) & 0x01 == 0  # PMREGMISC.PMIOSE clear at reset
    assert cfg.read(PM, 0x40, 4) == 0x0000_0001  # PMBA: only the I/O-space bit
    cfg.and_then_or(PM, 0x40, ~0xFFC0 & 0xFFFF_FFFF, 0xB000, 4)
    assert cfg.read(PM, 0x40, 4) == 0x0000_B001
    assert host.function(0, 1, 3).mapped_at is None  # not decoded until PMIOSE
    assert io.read(0xB008, 4) == b"\xff" * 4
    cfg.and_then_or(PM, 0x80, 0xFF, 0x01, 1)
    assert cfg.read(PM, 0x80, 1) == 0x01
    assert io.find(0xB000, 0x40) == (block, 0)
    assert io.read(0xCF8, 4) == bytes(4)  # the library put CONFADD back

    # InternalAcpiGetTimerTick: IoRead32((PciRead32(PMBA) & ~PMBA_RTE) + 8).
    pm_tmr = (cfg.read(PM, 0x40, 4) & ~1) + 8
    assert pm_tmr == 0xB008
    times_ns = (0, 1_000, 279_365, 1_000_000, 2_500_000_000, 4_686_000_000, 4_687_000_000)
    readings = []
    for now_ns in times_ns:
        clock.advance(now_ns)
        readings.append(int.from_bytes(io.read(pm_tmr, 4), "little"))
    # floor(ns * 3579545 / 1e9) mod 2**24; the last one has wrapped past 2**24.
    assert readings == [0, 3, 999, 3579, 8948862, 16773747, 111]


def test_platform_pei_skips_programming_when_pmiose_is_set(machine):
    """PlatformPei repeats the check; with PMIOSE set it leaves PMBA alone."""
    io, _, _, block, _ = machine
    cfg = Cf8(io)
    cfg.write(PM, 0x40, 0xB001, 4)
    cfg.write(PM, 0x80, 0x01, 1)
    assert cfg.read(PM, 0x80, 1) & 0x01
    cfg.and_then_or(PM, 0x04, 0xFF, 0x01, 1)  # PCICMD.IOSE, as PlatformPei sets it
    assert cfg.read(PM, 0x04, 2) == 0x0001
    assert io.find(0xB000, 1) == (block, 0)


@pytest.mark.parametrize(
    ("bdf", "ids", "class_rev", "header", "status", "pin"),
    [
        (HOST_BRIDGE, 0x1237_8086, 0x0600_0002, 0x00, 0x0000, 0),
        (ISA_BRIDGE, 0x7000_8086, 0x0601_0000, 0x80, 0x0200, 0),
        (PM, 0x7113_8086, 0x0680_0003, 0x00, 0x0280, 1),
    ],
)
def test_function_headers(machine, bdf, ids, class_rev, header, status, pin):
    io, *_ = machine
    cfg = Cf8(io)
    assert cfg.read(bdf, 0x00, 4) == ids
    assert cfg.read(bdf, 0x08, 4) == class_rev
    assert cfg.read(bdf, 0x0E, 1) == header
    assert cfg.read(bdf, 0x06, 2) == status
    assert cfg.read(bdf, 0x2C, 4) == 0x1100_1AF4  # QEMU's default subsystem
    assert cfg.read(bdf, 0x3D, 1) == pin
    assert all(cfg.read(bdf, bar, 4) == 0 for bar in range(0x10, 0x28, 4))


def test_absent_functions_read_all_ones(machine):
    io, *_ = machine
    cfg = Cf8(io)
    for bdf in (IDE, (0, 1, 2), (0, 2, 0), (0, 31, 7), (1, 0, 0), (255, 1, 3)):
        assert cfg.read(bdf, 0x00, 4) == 0xFFFF_FFFF
        assert cfg.read(bdf, 0x02, 2) == 0xFFFF
        assert cfg.read(bdf, 0x0E, 1) == 0xFF
        cfg.write(bdf, 0x3C, 0x0B, 1)  # dropped, and nothing breaks


def test_enable_bit_clear_reads_ones_and_drops_writes(machine):
    io, *_ = machine
    io.write(0xCF8, (cf8_address(*ISA_BRIDGE, 0x60) & 0x7FFF_FFFF).to_bytes(4, "little"))
    assert io.read(0xCFC, 4) == b"\xff" * 4
    io.write(0xCFC, bytes(4))
    assert Cf8(io).read(ISA_BRIDGE, 0x60, 4) == 0x8080_8080


def test_confadd_latch_and_read_widths(machine):
    io, *_ = machine
    io.write(0xCF8, (0x1234).to_bytes(2, "little"))  # not a dword: no latch write
    io.write(0xCF8, b"\x80")
    io.write(0xCFA, b"\x00\x80")
    assert io.read(0xCF8, 4) == bytes(4)
    io.write(0xCF8, (0x8000_0B40).to_bytes(4, "little"))
    assert io.read(0xCF8, 4) == (0x8000_0B40).to_bytes(4, "little")
    assert io.read(0xCF8, 2) == b"\x40\x0b"
    # QEMU's pci_host_config_read ignores the port: these are the latch's low bytes too.
    assert io.read(0xCFA, 2) == b"\x40\x0b"
    assert io.read(0xCFB, 1) == b"\x40"


def test_data_port_offset_is_latch_or_port(machine):
    io, *_ = machine
    io.write(0xCF8, (0x8000_0002).to_bytes(4, "little"))  # low bits set in the latch
    assert io.read(0xCFC, 2) == b"\x37\x12"  # register 2 | 0
    assert io.read(0xCFE, 2) == b"\x37\x12"  # register 2 | 2, not 4
    io.write(0xCF8, (0x8000_0000).to_bytes(4, "little"))
    assert io.read(0xCFC, 1) == b"\x86"
    assert io.read(0xCFD, 1) == b"\x80"
    assert io.read(0xCFE, 1) == b"\x37"
    assert io.read(0xCFF, 1) == b"\x12"


def test_unaligned_data_accesses_read_zero_and_write_nothing(machine):
    io, *_ = machine
    io.write(0xCF8, cf8_address(*ISA_BRIDGE, 0x60).to_bytes(4, "little"))
    assert io.read(0xCFD, 2) == b"\x00\x00"
    io.write(0xCFD, b"\x0b\x0b")
    assert io.read(0xCFC, 4) == b"\x80\x80\x80\x80"


def test_access_past_offset_ff_is_cut_short(machine):
    io, *_ = machine
    Cf8(io).write(HOST_BRIDGE, 0xFF, 0xAB, 1)
    io.write(0xCF8, (0x8000_00FF).to_bytes(4, "little"))  # register 0xFF, dword access
    assert io.read(0xCFC, 4) == b"\xab\x00\x00\x00"
    io.write(0xCFC, b"\xcd\xee\xee\xee")
    assert Cf8(io).read(HOST_BRIDGE, 0xFC, 4) == 0xCD00_0000


def test_header_write_masks(machine):
    io, *_ = machine
    cfg = Cf8(io)
    for bdf in (HOST_BRIDGE, ISA_BRIDGE, PM):
        before = [cfg.read(bdf, offset, 4) for offset in range(0, 0x40, 4)]
        for offset in range(0, 0x40, 4):
            cfg.write(bdf, offset, 0xFFFF_FFFF, 4)
        after = [cfg.read(bdf, offset, 4) for offset in range(0, 0x40, 4)]
        assert after[0] == before[0]  # IDs
        assert after[1] == before[1] & 0xFFFF_0000 | 0x0507  # COMMAND bits, status kept
        assert after[2] == before[2]  # revision and class
        assert after[3] == before[3] | 0xFF  # cache line size only
        assert after[4:15] == before[4:15]  # BARs, subsystem, ROM BAR, capabilities
        assert after[15] == before[15] | 0xFF  # interrupt line; pin read-only
    assert cfg.read(ISA_BRIDGE, 0x04, 2) == 0x0507
    cfg.write(ISA_BRIDGE, 0x04, 0x0003, 2)
    assert cfg.read(ISA_BRIDGE, 0x04, 2) == 0x0003


def test_status_error_bits_are_write_one_to_clear():
    function = PciFunction(
        "test", vendor_id=0x8086, device_id=0x1234, class_code=0xFF0000, status=0xA200
    )
    function.write(pci.STATUS, (0x0200).to_bytes(2, "little"))  # DEVSEL is read-only
    assert function.register(pci.STATUS, 2) == 0xA200
    function.write(pci.STATUS, (0x2000).to_bytes(2, "little"))  # clears master abort only
    assert function.register(pci.STATUS, 2) == 0x8200
    function.write(pci.STATUS + 1, b"\xff")
    assert function.register(pci.STATUS, 2) == 0x0200


def test_host_bridge_pam_and_smram_are_storage(machine):
    io, *_ = machine
    cfg = Cf8(io)
    assert cfg.read(HOST_BRIDGE, 0x72, 1) == 0x02
    assert [cfg.read(HOST_BRIDGE, pam, 1) for pam in range(0x59, 0x60)] == [0] * 7
    for pam in range(0x59, 0x60):
        cfg.write(HOST_BRIDGE, pam, 0x30 + pam, 1)
    cfg.write(HOST_BRIDGE, 0x72, 0x0A, 1)
    assert [cfg.read(HOST_BRIDGE, pam, 1) for pam in range(0x59, 0x60)] == [
        0x89, 0x8A, 0x8B, 0x8C, 0x8D, 0x8E, 0x8F
    ]  # fmt: skip
    assert cfg.read(HOST_BRIDGE, 0x58, 4) == 0x8B8A_8900
    assert cfg.read(HOST_BRIDGE, 0x72, 1) == 0x0A


def test_piix3_reset_values_and_ovmf_pirq_routing(machine):
    io, *_ = machine
    cfg = Cf8(io)
    assert cfg.read(ISA_BRIDGE, 0x04, 2) == 0x0007
    assert cfg.read(ISA_BRIDGE, 0x60, 4) == 0x8080_8080
    assert cfg.read(ISA_BRIDGE, 0x4C, 4) == 0x0003_004D
    assert cfg.read(ISA_BRIDGE, 0x68, 4) == 0x0000_0200
    assert cfg.read(ISA_BRIDGE, 0x70, 1) == 0x80
    assert cfg.read(ISA_BRIDGE, 0x74, 4) == 0x0C0C_0000
    assert cfg.read(ISA_BRIDGE, 0x78, 4) == 0x0000_0002
    assert cfg.read(ISA_BRIDGE, 0xA0, 1) == 0x08
    assert cfg.read(ISA_BRIDGE, 0xA8, 1) == 0x0F
    for offset, irq in zip(range(0x60, 0x64), (0x0A, 0x0A, 0x0B, 0x0B), strict=True):
        cfg.write(ISA_BRIDGE, offset, irq, 1)  # PciAcpiInitialization's LNK targets
    assert cfg.read(ISA_BRIDGE, 0x60, 4) == 0x0B0B_0A0A


def test_pm_function_register_masks_and_reset_values(machine):
    io, *_ = machine
    cfg = Cf8(io)
    assert cfg.read(PM, 0x58, 4) == 0x0200_0000  # DEVACTB: SMM marked initialised
    assert cfg.read(PM, 0x5C, 4) == 0x1000_0000
    assert cfg.read(PM, 0x60, 4) == 0x6000_0000
    assert cfg.read(PM, 0x64, 4) == 0x0800_0000
    assert cfg.read(PM, 0x90, 4) == 0x0000_B101  # SMBus base, I/O space
    assert cfg.read(PM, 0xD2, 1) == 0x09
    cfg.write(PM, 0x40, 0xFFFF_FFFF, 4)
    assert cfg.read(PM, 0x40, 4) == 0x0000_FFC1
    cfg.write(PM, 0x40, 0x0000_0000, 4)
    assert cfg.read(PM, 0x40, 4) == 0x0000_0001
    cfg.write(PM, 0x80, 0xFE, 1)
    assert cfg.read(PM, 0x80, 1) == 0x00
    cfg.write(PM, 0x58, 0x1234_5678, 4)  # DEVACTB and SMBus stay plain storage
    cfg.write(PM, 0x90, 0x0000_C001, 4)
    assert (cfg.read(PM, 0x58, 4), cfg.read(PM, 0x90, 4)) == (0x1234_5678, 0x0000_C001)


def test_pm_block_follows_pmba_and_pmiose(machine):
    io, _, _, block, host = machine
    cfg = Cf8(io)
    pm_function = host.function(0, 1, 3)
    assert isinstance(pm_function, Piix4PowerManagement)
    cfg.write(PM, 0x40, 0xB000, 4)
    cfg.write(PM, 0x80, 0x01, 1)
    assert pm_function.mapped_at == 0xB000
    cfg.write(PM, 0x41, 0xC0, 1)  # byte write of PMBA[15:8]: the block moves
    assert pm_function.mapped_at == 0xC000
    assert io.find(0xC004, 2) == (block, 4)
    assert io.find(0xB004, 2) is None
    assert io.read(0xB004, 2) == b"\xff\xff"
    cfg.write(PM, 0x40, 0xC07F, 4)  # bits 5:0 are not part of the base
    assert pm_function.mapped_at == 0xC040
    cfg.write(PM, 0x80, 0x00, 1)
    assert pm_function.mapped_at is None
    assert io.find(0xC040, 1) is None
    cfg.write(PM, 0x40, 0xD000, 4)  # moved while off: still off
    assert io.find(0xD000, 1) is None
    cfg.write(PM, 0x80, 0x01, 1)
    assert io.find(0xD000, 0x40) == (block, 0)
    assert [entry[1] for entry in io.devices()].count(block) == 1


def test_pm_block_over_another_device_stays_undecoded(machine):
    io, _, _, block, host = machine
    cfg = Cf8(io)
    io.insert(reset_ports.DebugExit(lambda request: None), 0xB010, 2)
    cfg.write(PM, 0x40, 0xB000, 4)
    cfg.write(PM, 0x80, 0x01, 1)
    assert host.function(0, 1, 3).mapped_at is None
    assert io.read(0xB000, 2) == b"\xff\xff"
    cfg.write(PM, 0x40, 0xB040, 4)
    assert io.find(0xB040, 0x40) == (block, 0)


def test_reset_control_layered_over_confadd(machine):
    io, _, requests, *_ = machine
    io.write(0xCF8, (0x8000_0800).to_bytes(4, "little"))
    io.write(0xCF9, b"\x02")  # the RCR, not the latch
    assert io.read(0xCF9, 1) == b"\x02"
    assert io.read(0xCF8, 4) == (0x8000_0800).to_bytes(4, "little")
    assert io.read(0xCFC, 2) == b"\x86\x80"  # PIIX3 vendor ID: the latch still works
    io.write(0xCF9, b"\x06")  # OVMF's ResetCold
    assert requests == [ResetRequest("0xcf9 hard reset")]


def test_cf9_without_reset_control_is_part_of_confadd():
    io = Bus("io", 0x10000)
    host = PciHost()
    host.attach(io)
    io.write(0xCF8, (0x8000_1234).to_bytes(4, "little"))
    assert io.read(0xCF9, 1) == b"\x34"  # low byte of the latch, as QEMU
    assert io.read(0xCF9, 2) == b"\x00\x00"  # unaligned: refused
    io.write(0xCF9, b"\x06")
    assert host.config_address == 0x8000_1234


def test_configuration_errors_name_the_value():
    host = PciHost()
    host.add(0, 0, pci.i440fx_host_bridge())
    with pytest.raises(PciError, match=r"00:00\.0 holds 'i440fx' already; cannot add 'piix3'"):
        host.add(0, 0, pci.piix3_isa_bridge())
    with pytest.raises(PciError, match=r"32\.0 is not a device 0-31"):
        host.add(32, 0, pci.piix3_isa_bridge())
    with pytest.raises(PciError, match=r"vendor ID 65536 does not fit in 16 bits"):
        PciFunction("x", vendor_id=0x10000, device_id=0, class_code=0)
    with pytest.raises(PciError, match=r"interrupt pin 5"):
        PciFunction("x", vendor_id=0, device_id=0, class_code=0, interrupt_pin=5)
    with pytest.raises(PciError, match=r"register at 255 size 2 is outside"):
        pci.i440fx_host_bridge().init_register(0xFF, 0, 2)


def test_bus_remove():
    io = Bus("io", 0x10000)
    one, two = reset_ports.DebugExit(lambda r: None), reset_ports.DebugExit(lambda r: None)
    io.insert(one, 0x100, 2)
    io.insert(two, 0x200, 2)
    io.remove(one, 0x100)
    assert io.find(0x100, 1) is None
    assert io.find(0x200, 1) == (two, 0)
    io.insert(one, 0x102, 2)  # inserted elsewhere after removal
    assert io.find(0x103, 1) == (one, 1)
    with pytest.raises(BusError, match=r"'isa-debug-exit' is not inserted at 0x100"):
        io.remove(one, 0x100)
    with pytest.raises(BusError, match=r"not inserted at 0x200"):
        io.remove(one, 0x200)  # another device is there


def test_sweep_of_guest_accesses_never_raises(machine):
    io, clock, requests, *_ = machine
    rng = random.Random(0x1237)
    latches = [cf8_address(0, 1, 3, reg) for reg in (0x40, 0x80)]
    for step in range(20_000):
        clock.advance(step * 997)
        port = rng.choice([0xCF8, 0xCF9, 0xCFA, 0xCFB, 0xCFC, 0xCFD, 0xCFE, 0xCFF, 0xB000,
                           0xB004, 0xB008, 0xB03E, 0x92, 0x501])  # fmt: skip
        port = port if rng.random() < 0.9 else rng.randrange(0x10000)
        size = rng.choice([1, 2, 4])
        if rng.random() < 0.2:
            latch = rng.choice(latches) if rng.random() < 0.5 else rng.getrandbits(32)
            io.write(0xCF8, latch.to_bytes(4, "little"))
        if rng.random() < 0.5:
            assert len(io.read(port, size)) == size
        else:
            io.write(port, rng.getrandbits(8 * size).to_bytes(size, "little"))
    assert all(isinstance(request, MachineRequest) for request in requests)
