"""The MC146818 RTC/CMOS through the IO bus: QEMU's pc NVRAM, OVMF's RTC driver, interrupts."""

from __future__ import annotations

import random

import pytest

from sevsim.vmm.bus import Bus
from sevsim.vmm.clock import MachineClock
from sevsim.vmm.cmos import (
    RTC_PORT,
    RTC_PORTS,
    CmosError,
    Mc146818Rtc,
    bcd_decode,
    bcd_encode,
    civil_from_days,
    days_from_civil,
    pc_cmos_layout,
)
from sevsim.vmm.irq import IrqLine

MIB = 1 << 20
GIB = 1 << 30
#: 2023-11-14 22:13:20 UTC, a Tuesday.
BASE = 1_700_000_000
#: How far into each second UIP comes up: 244140 ns (8 cycles of 32.768 kHz) before its end.
UIP_WINDOW_START = 1_000_000_000 - 244_140


class Machine:
    """An RTC on an IO bus with its IRQ 8 line, every edge of it recorded."""

    def __init__(self, base_time: int = BASE, **layout: int | str) -> None:
        self.clock = MachineClock()
        self.irq8 = IrqLine("irq8")
        self.edges: list[tuple[int, bool]] = []
        self.irq8.connect(lambda level: self.edges.append((self.clock.now_ns(), level)))
        layout.setdefault("ram_below_4g", 512 * MIB)
        self.rtc = Mc146818Rtc(self.clock, self.irq8, base_time=base_time, **layout)  # type: ignore[arg-type]
        self.io = Bus("io", 0x1_0000)
        self.io.insert(self.rtc, RTC_PORT, RTC_PORTS)

    def read(self, index: int) -> int:
        """edk2's IoRtcRead: the index keeps bit 7 as read back from port 0x70."""
        self.io.write(0x70, bytes([index | (self.io.read(0x70, 1)[0] & 0x80)]))
        return self.io.read(0x71, 1)[0]

    def write(self, index: int, value: int) -> None:
        """edk2's IoRtcWrite."""
        self.io.write(0x70, bytes([index | (self.io.read(0x70, 1)[0] & 0x80)]))
        self.io.write(0x71, bytes([value]))

    def time(self) -> tuple[int, ...]:
        """Seconds, minutes, hours, day of week, day, month, year, century, as read."""
        return tuple(self.read(index) for index in (0, 2, 4, 6, 7, 8, 9, 0x32))

    def rising(self) -> list[int]:
        return [when for when, level in self.edges if level]


@pytest.fixture
def m() -> Machine:
    return Machine()


def test_bcd_and_calendar_helpers() -> None:
    assert bcd_encode(59) == 0x59 and bcd_encode(9999) == 0x9999 and bcd_encode(0) == 0
    assert bcd_decode(0x59) == 59 and bcd_decode(0x1000) == 1000 and bcd_decode(0x1A) == 20
    assert days_from_civil(1970, 1, 1) == 0 and days_from_civil(2000, 3, 1) == 11_017
    assert civil_from_days(19_675) == (2023, 11, 14) and civil_from_days(-1) == (1969, 12, 31)
    for days in range(-800_000, 3_000_000, 997):
        assert days_from_civil(*civil_from_days(days)) == days
    assert days_from_civil(2023, 13, 1) == days_from_civil(2024, 1, 1)  # carried, not refused


def test_qemu_pc_nvram_for_512_mib(m: Machine) -> None:
    expected = {
        0x0F: 0x00,  # shutdown status: normal boot
        0x10: 0x00,  # no floppy drives
        0x12: 0x00,  # no IDE disks
        0x14: 0x06,  # equipment: FPU, PS/2 mouse
        0x15: 0x80, 0x16: 0x02,  # 640 KiB base memory
        0x17: 0xFF, 0x18: 0xFF,  # extended memory, capped at 0xFFFF KiB
        0x30: 0xFF, 0x31: 0xFF,
        0x32: 0x20,  # century, BCD
        0x34: 0x00, 0x35: 0x1F,  # (512 - 16) MiB in 64 KiB units = 0x1F00
        0x38: 0x30,  # third boot device CD-ROM, floppy signature check on
        0x3D: 0x12,  # boot order "cad": disk, then floppy
        0x5B: 0x00, 0x5C: 0x00, 0x5D: 0x00,  # nothing above 4 GiB
        0x5F: 0x00,  # one vCPU
    }  # fmt: skip
    assert {index: m.read(index) for index in expected} == expected
    assert (m.read(0x0A), m.read(0x0B), m.read(0x0C), m.read(0x0D)) == (0x26, 0x02, 0x00, 0x80)


@pytest.mark.parametrize(
    ("below", "above", "cpus", "boot", "expected"),
    [
        (3 * GIB, 5 * GIB, 4, "dc",
         {0x34: 0x00, 0x35: 0xBF, 0x5B: 0x00, 0x5C: 0x40, 0x5D: 0x01, 0x5F: 3,
          0x3D: 0x23, 0x38: 0x00}),
        (8 * MIB, 0, 255, "n",
         {0x17: 0x00, 0x18: 0x1C, 0x30: 0x00, 0x31: 0x1C, 0x34: 0, 0x35: 0, 0x5F: 0xFE,
          0x3D: 0x04}),
        (512 * 1024, 0, 256, "abc",
         {0x15: 0x00, 0x16: 0x02, 0x17: 0, 0x18: 0, 0x5F: 0x00, 0x3D: 0x11, 0x38: 0x20}),
    ],
)  # fmt: skip
def test_qemu_pc_nvram_follows_the_configuration(
    below: int, above: int, cpus: int, boot: str, expected: dict[int, int]
) -> None:
    machine = Machine(ram_below_4g=below, ram_above_4g=above, cpus=cpus, boot_order=boot)
    assert {index: machine.read(index) for index in expected} == expected
    layout = pc_cmos_layout(below, above, cpus, boot)
    assert {index: layout[index] for index in expected} == expected


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"ram_below_4g": -1}, r"RAM below 4 GiB -1 is not an integer in 0\.\.4294967296"),
        ({"ram_below_4g": 5 * GIB}, "RAM below 4 GiB 5368709120"),
        ({"ram_below_4g": 1.5}, "RAM below 4 GiB 1.5"),
        ({"ram_above_4g": 1 << 40}, "24 bits"),
        ({"cpus": 0}, r"vCPU count 0 is not an integer in 1\.\."),
        ({"cpus": True}, "vCPU count True"),
        ({"boot_order": "cadn"}, "boot order 'cadn' is not 1-3 of the letters abcdn"),
        ({"boot_order": "x"}, "boot order 'x'"),
        ({"boot_order": ""}, "boot order ''"),
        ({"base_time": -1}, r"RTC base time -1 .*seconds since 1970"),
        ({"base_time": 253_402_300_800}, "RTC base time 253402300800"),
    ],
)
def test_configuration_errors_name_the_value(arguments: dict[str, object], message: str) -> None:
    settings: dict[str, object] = {"base_time": BASE, "ram_below_4g": 512 * MIB} | arguments
    with pytest.raises(CmosError, match=message):
        Mc146818Rtc(MachineClock(), IrqLine(), **settings)  # type: ignore[arg-type]


def test_ovmf_shutdown_status_check(m: Machine) -> None:
    """SEC and PlatformPei: OUT 0x70 <- 0x0F, IN 0x71 (0: not S3), written back as 0."""
    m.io.write(0x70, b"\x0f")
    assert m.io.read(0x71, 1) == b"\x00"
    m.io.write(0x71, b"\x00")
    assert m.io.read(0x70, 1) == b"\xff"  # the index port reads all ones, as in QEMU
    assert not m.rtc.nmi_masked


def test_ovmf_pcrtc_init_waits_for_uip_then_reads_the_time(m: Machine) -> None:
    """PcRtcInit and RtcWaitToUpdate (PcAtChipsetPkg, edk2-stable202211), 100 us before
    a second boundary: UIP is up, the driver polls it every 10 us, then reads the time."""
    m.clock.advance(999_900_000)
    m.write(0x0A, 0x26)  # PcdInitialValueRtcRegisterA
    register_b = m.read(0x0B)
    m.read(0x0C)
    m.write(0x0D, 0x00)  # PcdInitialValueRtcRegisterD: ignored, D is read-only
    assert m.read(0x0D) & 0x80  # VRT
    polls = 0
    while m.read(0x0A) & 0x80:  # UIP
        m.clock.advance(m.clock.now_ns() + 10_000)  # MicroSecondDelay (10)
        polls += 1
    assert polls == 10 and m.clock.now_ns() == 1_000_000_000
    assert register_b == 0x02  # BCD, 24-hour
    assert m.time() == (0x21, 0x13, 0x22, 0x03, 0x14, 0x11, 0x23, 0x20)
    assert m.rtc.nmi_masked  # edk2 ORs in bit 7 of what port 0x70 reads: 0xFF
    m.clock.advance(1_000_000_000 + UIP_WINDOW_START - 1)
    assert not m.read(0x0A) & 0x80
    m.clock.advance(1_000_000_000 + UIP_WINDOW_START)
    assert m.read(0x0A) == 0xA6


def test_ovmf_pcrtc_set_time_keeps_the_divider_phase(m: Machine) -> None:
    """PcRtcSetTime: SET, century, time in the format of B, SET cleared."""
    m.clock.advance(300_000_000)
    register_b = m.read(0x0B)
    m.write(0x0B, register_b | 0x80)
    m.clock.advance(2_000_000_000)  # stopped: the registers hold still
    assert m.read(0x00) == 0x20
    for index, value in ((0x32, 0x20), (0x00, 0x30), (0x02, 0x15), (0x04, 0x09), (0x07, 0x01),
                         (0x08, 0x03), (0x09, 0x24)):  # fmt: skip
        m.write(index, value)
    m.clock.advance(5_300_000_000)
    m.write(0x0B, register_b)
    # 2024-03-01 09:15:30, a Friday; seconds still turn on whole seconds of the clock.
    m.clock.advance(5_999_999_999)
    assert m.time() == (0x30, 0x15, 0x09, 0x06, 0x01, 0x03, 0x24, 0x20)
    m.clock.advance(6_000_000_000)
    assert m.read(0x00) == 0x31
    m.clock.advance(96_000_000_000)
    assert m.time()[:3] == (0x01, 0x17, 0x09)


def test_binary_and_12_hour_formats() -> None:
    midnight = Machine(base_time=BASE - (22 * 3600 + 13 * 60 + 20))
    midnight.write(0x0B, 0x00)  # BCD, 12-hour
    assert midnight.read(0x04) == 0x12  # 12 AM
    evening = Machine()
    evening.write(0x0B, 0x00)
    assert evening.read(0x04) == 0x90  # 10 PM: PM bit and BCD 10
    evening.write(0x0B, 0x04)  # binary, 12-hour
    assert evening.read(0x04) == 0x8A
    evening.write(0x0B, 0x06)  # binary, 24-hour
    assert evening.time() == (20, 13, 22, 3, 14, 11, 23, 20)


def test_12_hour_time_written_by_the_guest() -> None:
    machine = Machine()
    machine.write(0x0B, 0x80)  # SET, BCD, 12-hour
    machine.write(0x04, 0x81)  # 1 PM
    machine.write(0x0B, 0x02)  # running again, and 24-hour
    assert machine.read(0x04) == 0x13


def test_guest_time_write_while_running_restarts_the_second(m: Machine) -> None:
    m.clock.advance(400_000_000)
    m.write(0x00, 0x45)
    m.clock.advance(1_399_999_999)
    assert m.time()[:3] == (0x45, 0x13, 0x22)
    m.clock.advance(1_400_000_000)
    assert m.read(0x00) == 0x46


def test_century_rolls_over_and_0x37_aliases_it() -> None:
    machine = Machine(base_time=4_102_444_799)  # 2099-12-31 23:59:59
    assert machine.time()[4:] == (0x31, 0x12, 0x99, 0x20)
    machine.clock.advance(1_000_000_000)
    assert machine.time() == (0x00, 0x00, 0x00, 0x06, 0x01, 0x01, 0x00, 0x21)
    assert machine.read(0x37) == 0x21


def test_divider_reset_stops_the_time_and_restarts_half_a_second_late(m: Machine) -> None:
    m.clock.advance(2_300_000_000)
    m.write(0x0A, 0x70)  # DV = 111: divider chain in reset
    m.clock.advance(10_000_000_000)
    assert m.read(0x00) == 0x22 and not m.read(0x0A) & 0x80
    m.write(0x0A, 0x26)
    m.clock.advance(10_499_999_999)
    assert m.read(0x00) == 0x22
    m.clock.advance(10_500_000_000)
    assert m.read(0x00) == 0x23


def test_periodic_interrupt_on_the_32khz_grid(m: Machine) -> None:
    m.clock.advance(100_000)
    m.write(0x0B, 0x42)  # PIE, rate 6 from A: 1024 Hz, every 32 cycles of 32.768 kHz
    m.clock.advance(1_000_000)
    assert m.edges == [(976_563, True)]
    assert m.read(0x0C) == 0xC0  # IRQF | PF, and the read clears them ...
    assert m.edges[-1] == (1_000_000, False) and m.read(0x0C) == 0x00  # ... and lowers IRQ 8
    for _ in range(8):
        m.clock.advance(m.clock.now_ns() + 976_563)
        m.read(0x0C)
    assert m.rising() == [976_563, 1_953_125, 2_929_688, 3_906_250, 4_882_813, 5_859_375,
                          6_835_938, 7_812_500, 8_789_063]  # fmt: skip
    m.write(0x0A, 0x2F)  # rate 15: 2 Hz
    m.clock.advance(2_000_000_000)
    assert m.rising()[9:] == [500_000_000]  # IRQ 8 stays high: C is not read
    m.write(0x0B, 0x02)  # PIE off: IRQ 8 drops, and no more periodic interrupts
    assert not m.irq8.level and m.read(0x0C) == 0x50  # PF and UF were still set
    m.clock.advance(4_000_000_000)
    assert len(m.rising()) == 10 and m.read(0x0C) == 0x10


def test_update_ended_interrupt_every_second(m: Machine) -> None:
    m.clock.advance(250_000_000)
    m.write(0x0B, 0x12)  # UIE
    m.clock.advance(1_000_000_000)
    assert m.rising() == [1_000_000_000]
    assert m.read(0x0C) == 0x90  # IRQF | UF
    m.clock.advance(2_000_000_000)
    assert m.rising() == [1_000_000_000, 2_000_000_000] and m.read(0x0C) == 0x90


def test_update_flag_without_interrupt_and_late_enable(m: Machine) -> None:
    m.clock.advance(1_500_000_000)
    assert m.edges == [] and m.read(0x0C) == 0x10  # UF, but UIE is off: no IRQ
    m.clock.advance(2_500_000_000)
    m.write(0x0B, 0x12)  # UF is already set: enabling UIE interrupts at once
    assert m.edges == [(2_500_000_000, True)] and m.read(0x0C) == 0x90
    m.write(0x0B, 0x92)  # SET drops UIE
    assert m.read(0x0B) == 0x82


def test_alarm_interrupt() -> None:
    machine = Machine()
    for index, value in ((0x05, 0x22), (0x03, 0x13), (0x01, 0x25)):
        machine.write(index, value)  # alarm at 22:13:25, five seconds on
    machine.write(0x0B, 0x22)  # AIE
    machine.clock.advance(10_000_000_000)
    assert machine.rising() == [5_000_000_000]
    assert machine.read(0x0C) == 0xB0  # IRQF | AF | UF
    assert machine.clock.next_deadline() == 11_000_000_000  # UF first ...
    machine.clock.advance(11_000_000_000)
    assert machine.clock.next_deadline() == 86_405_000_000_000  # ... then the alarm tomorrow


def test_12_hour_alarm_uses_its_own_pm_bit() -> None:
    machine = Machine()
    machine.write(0x0B, 0x00)  # BCD, 12-hour: the time reads 10:13:20 PM
    for index, value in ((0x05, 0x10), (0x03, 0x13), (0x01, 0x22)):
        machine.write(index, value)  # 10:13:22 AM: not today's evening
    machine.write(0x0B, 0x20)
    machine.clock.advance(3_000_000_000)
    assert machine.edges == []
    machine.write(0x05, 0x90)  # 10:13:22 PM
    machine.clock.advance(3_000_000_001)
    assert machine.edges == [] and machine.clock.next_deadline() == 86_402_000_000_000
    machine.write(0x01, 0x24)
    machine.clock.advance(5_000_000_000)
    assert machine.rising() == [4_000_000_000]


def test_alarm_dont_care_fields_and_impossible_alarms() -> None:
    every_second = Machine()
    for index in (0x01, 0x03, 0x05):
        every_second.write(index, 0xC0)
    every_second.write(0x0B, 0x22)
    for second in range(1, 4):
        every_second.clock.advance(second * 1_000_000_000)
        assert every_second.read(0x0C) == 0xB0
    assert every_second.rising() == [1_000_000_000, 2_000_000_000, 3_000_000_000]

    every_hour = Machine()
    every_hour.write(0x05, 0xFF)  # any hour, minute 14, second 0: 46 s on
    every_hour.write(0x03, 0x14)
    every_hour.write(0x01, 0x00)
    every_hour.write(0x0B, 0x22)
    every_hour.clock.advance(3_700_000_000_000)
    assert every_hour.rising() == [40_000_000_000]

    never = Machine()
    never.write(0x01, 0x61)  # second 61 never comes
    never.write(0x0B, 0x22)
    never.clock.advance(2 * 86_400_000_000_000)
    assert never.edges == [] and never.clock.next_deadline() is None


def test_plain_nvram_and_read_only_registers(m: Machine) -> None:
    m.write(0x40, 0x5A)
    m.write(0x7F, 0xA5)
    assert (m.read(0x40), m.read(0x7F)) == (0x5A, 0xA5)
    m.clock.advance(1_200_000_000)
    m.write(0x0C, 0xFF)
    m.write(0x0D, 0x00)
    assert (m.read(0x0C), m.read(0x0D)) == (0x10, 0x80)
    m.io.write(0x70, b"\x8f")  # NMI masked, index 0x0F
    assert m.rtc.nmi_masked and m.io.read(0x71, 1) == b"\x00"
    assert m.io.read(0x70, 2) == b"\xff\x00"  # a word read: index port, then data


def test_reset_keeps_the_time_and_clears_interrupts(m: Machine) -> None:
    m.write(0x0F, 0x05)
    m.write(0x0B, 0x7A)  # PIE, AIE, UIE, SQWE, BCD, 24-hour
    m.clock.advance(1_000_000_000)
    m.rtc.reset()
    assert (m.read(0x0F), m.read(0x0B), m.read(0x0C)) == (0x00, 0x12, 0x00)
    assert not m.irq8.level and m.read(0x00) == 0x21
    m.write(0x0F, 0xFE)  # S3 resume survives a reset
    m.rtc.reset()
    assert m.read(0x0F) == 0xFE


def test_arbitrary_guest_accesses_never_raise(m: Machine) -> None:
    rng = random.Random(146818)
    for step in range(20_000):
        offset = rng.randrange(0, 4)
        size = rng.choice((1, 2, 4, 8))
        if rng.random() < 0.5:
            assert len(m.rtc.read(offset, size)) == size
        else:
            m.rtc.write(offset, rng.randbytes(size))
        index = rng.choice((rng.randrange(0x100), rng.randrange(0x0E), 0x32, 0x37))
        m.io.write(0x70, bytes([index]))
        if rng.random() < 0.5:
            assert len(m.io.read(0x71, 1)) == 1
        else:
            m.io.write(0x71, bytes([rng.randrange(0x100)]))
        if step % 50 == 0:
            m.write(0x0B, rng.randrange(0x100) & 0x3F)  # keep SET off half the time
        m.clock.advance(m.clock.now_ns() + rng.randrange(0, 300_000_000))
