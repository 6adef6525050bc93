"""The 8254 PIT and port 0x61 through the IO bus, on a MachineClock moved by hand."""

from __future__ import annotations

import random

import pytest

from sevsim.vmm.bus import Bus
from sevsim.vmm.clock import MachineClock
from sevsim.vmm.irq import IrqLine
from sevsim.vmm.pic import I8259Pic
from sevsim.vmm.pit import (
    I8254,
    PIT_HZ,
    PIT_IRQ,
    PIT_PORT,
    PIT_PORTS,
    SPEAKER_PORT,
    PcSpeaker,
    PitError,
    pit_ticks,
)


class Machine:
    """A PIT, its IRQ 0 line (with every edge recorded), and port 0x61, on one IO bus."""

    def __init__(self) -> None:
        self.clock = MachineClock()
        self.irq0 = IrqLine("irq0")
        self.edges: list[tuple[int, bool]] = []
        self.irq0.connect(lambda level: self.edges.append((self.clock.now_ns(), level)))
        self.pit = I8254(self.clock, self.irq0)
        self.speaker = PcSpeaker(self.pit)
        self.io = Bus("io", 0x1_0000)
        self.io.insert(self.pit, PIT_PORT, PIT_PORTS)
        self.io.insert(self.speaker, SPEAKER_PORT, 1)

    def outb(self, port: int, value: int) -> None:
        self.io.write(port, bytes([value]))

    def inb(self, port: int) -> int:
        return self.io.read(port, 1)[0]

    def rising(self) -> list[int]:
        return [when for when, level in self.edges if level]


@pytest.fixture
def m() -> Machine:
    return Machine()


def ns_for_ticks(ticks: int) -> int:
    """The first ns at which ``ticks`` PIT input cycles have elapsed."""
    return -(-ticks * 1_000_000_000 // PIT_HZ)


def test_tick_arithmetic() -> None:
    assert pit_ticks(1_000_000_000) == PIT_HZ
    assert pit_ticks(999_848) == 1193 and pit_ticks(999_847) == 1192
    assert pit_ticks(ns_for_ticks(11932)) == 11932
    assert pit_ticks(ns_for_ticks(11932) - 1) == 11931


def test_reset_state_ticks_at_18_2_hz(m: Machine) -> None:
    # QEMU's reset: counter 0 in mode 3 with count 0x10000, running from time 0.
    assert m.edges == [(0, True)]  # OUT high for the first half period
    m.clock.advance(60_000_000)
    assert m.edges == [(0, True), (27_462_701, False), (54_925_402, True)]
    m.outb(0x43, 0xE2)  # read-back: status of counter 0
    assert m.inb(0x40) == 0x80 | 0x30 | 0x06  # OUT high, LSB then MSB, mode 3, binary


def test_ovmf_8254_timer_driver_10ms_tick(m: Machine) -> None:
    """8254TimerDxe's SetPitCount for its default 10 ms period (count 11932, mode 3)."""
    m.clock.advance(3_000_000)
    m.edges.clear()
    start = m.clock.now_ns()
    m.outb(0x43, 0x36)
    m.outb(0x40, 11932 & 0xFF)
    m.outb(0x40, 11932 >> 8)
    m.clock.advance(start + 40_000_700)
    # Edges at the first ns of each half period: ceil(ticks * 10**9 / 1193182).
    assert m.edges == [
        (start + 5_000_076, False),
        (start + 10_000_151, True),
        (start + 15_000_227, False),
        (start + 20_000_302, True),
        (start + 25_000_378, False),
        (start + 30_000_453, True),
        (start + 35_000_528, False),
        (start + 40_000_604, True),
    ]
    # Far on, the edges still sit on exact multiples of the period: no drift.
    m.clock.advance(start + 10_000_200_000)
    assert m.rising()[-1] == start + 10_000_150_858 == start + ns_for_ticks(1000 * 11932)
    assert len(m.rising()) == 1000


def test_edges_do_not_depend_on_how_the_clock_is_advanced() -> None:
    one, many = Machine(), Machine()
    for machine in (one, many):
        machine.outb(0x43, 0x34)  # Linux's periodic clockevent: mode 2, HZ=1000
        machine.outb(0x40, 1193 & 0xFF)
        machine.outb(0x40, 1193 >> 8)
    one.clock.advance(50_000_000)
    for now in range(0, 50_000_001, 333_333):
        many.clock.advance(now)
    many.clock.advance(50_000_000)
    assert one.edges == many.edges
    # Mode 2: OUT drops for the last tick of each period; the reload is the rising edge.
    assert one.edges[:5] == [(0, True), (999_010, False), (999_848, True), (1_998_857, False),
                             (1_999_695, True)]  # fmt: skip
    assert len(one.rising()) == 1 + 50


def test_pit_ticks_reach_the_pic_as_irq0_vectors(m: Machine) -> None:
    pic = I8259Pic()
    pic.insert_into(m.io)
    pic.connect(PIT_IRQ, m.irq0)
    m.outb(0x20, 0x11)
    for value in (0x68, 0x04, 0x01, 0xFE):
        m.outb(0x21, value)
    m.outb(0x43, 0x36)
    m.outb(0x40, 0x9C)
    m.outb(0x40, 0x2E)
    vectors = []
    for step in range(1, 6):
        m.clock.advance(step * 10_000_200)
        if pic.intr.level:
            vectors.append(pic.acknowledge())
            m.outb(0x20, 0x20)
    assert vectors == [0x68] * 5


def test_counter_latch_reads_an_exact_count(m: Machine) -> None:
    m.outb(0x43, 0x34)  # mode 2, count 1000
    m.outb(0x40, 0xE8)
    m.outb(0x40, 0x03)
    m.clock.advance(1_000_000)  # 1193 ticks: 193 into the second period
    m.outb(0x43, 0x00)  # latch counter 0
    m.clock.advance(2_500_000)
    m.outb(0x43, 0x00)  # a second latch before the first is read is ignored
    assert (m.inb(0x40), m.inb(0x40)) == (807 & 0xFF, 807 >> 8)
    # Unlatched reads follow the clock: 2982 ticks at 2.5 ms, 982 into a period.
    assert m.inb(0x40) | m.inb(0x40) << 8 == 1000 - 982


def test_mode3_counts_down_by_two(m: Machine) -> None:
    m.outb(0x43, 0x36)
    m.outb(0x40, 0x9C)
    m.outb(0x40, 0x2E)
    m.clock.advance(1_000_000)
    m.outb(0x43, 0x00)
    assert m.inb(0x40) | m.inb(0x40) << 8 == 11932 - 2 * 1193


def test_mode0_one_shot_and_wrap(m: Machine) -> None:
    m.outb(0x43, 0x30)  # Linux's one-shot: mode 0 ...
    assert not m.irq0.level  # ... OUT low as soon as the mode is written
    m.outb(0x40, 0x00)
    m.outb(0x40, 0x10)  # 4096 ticks
    m.clock.advance(10_000_000)
    assert m.edges[-2:] == [(0, False), (ns_for_ticks(4096), True)]
    assert m.irq0.level and m.clock.next_deadline() is None
    m.outb(0x43, 0x00)
    ticks = pit_ticks(10_000_000)
    assert m.inb(0x40) | m.inb(0x40) << 8 == (4096 - ticks) & 0xFFFF  # counts on past 0


def test_lsb_only_and_msb_only_access(m: Machine) -> None:
    m.outb(0x43, 0x54)  # counter 1, LSB only, mode 2
    m.outb(0x41, 0x12)  # the refresh rate BIOSes program: 18 ticks
    assert m.inb(0x41) == 0x12 and m.inb(0x41) == 0x12
    m.outb(0x43, 0x64)  # counter 1, MSB only, mode 2
    m.outb(0x41, 0x03)  # count 0x300
    m.clock.advance(ns_for_ticks(0x100))
    assert m.inb(0x41) == 0x02  # 0x200 left: the MSB


def test_read_back_status_and_null_count(m: Machine) -> None:
    m.outb(0x43, 0xB4)  # counter 2, LSB then MSB, mode 2
    m.outb(0x43, 0xE8)  # read-back: status of counter 2
    assert m.inb(0x42) == 0x80 | 0x40 | 0x34  # OUT high, null count: no count yet
    m.outb(0x42, 0x10)
    m.outb(0x43, 0xE8)
    assert m.inb(0x42) == 0x80 | 0x40 | 0x34  # half a count is still null
    m.outb(0x42, 0x00)
    m.outb(0x43, 0xC8)  # read-back: count and status of counter 2
    assert [m.inb(0x42) for _ in range(3)] == [0x80 | 0x34, 0x10, 0x00]


def test_read_back_latches_several_counters(m: Machine) -> None:
    m.clock.advance(1_000_000)
    m.outb(0x43, 0xDE)  # read-back: latch the counts of counters 0, 1 and 2
    m.clock.advance(5_000_000)
    expected = (0x10000 - 2 * pit_ticks(1_000_000)) & 0xFFFF
    for port in (0x40, 0x41, 0x42):
        assert m.inb(port) | m.inb(port) << 8 == expected


def test_bcd_counting(m: Machine) -> None:
    m.outb(0x43, 0x35)  # mode 2, BCD
    m.outb(0x40, 0x00)
    m.outb(0x40, 0x10)  # 1000 in BCD
    m.clock.advance(1_000_000)
    m.outb(0x43, 0x00)
    assert (m.inb(0x40), m.inb(0x40)) == (0x07, 0x08)  # 807 in BCD
    m.outb(0x43, 0x31)  # mode 0, BCD, count 0 = 10000
    m.outb(0x40, 0x00)
    m.outb(0x40, 0x00)
    m.clock.advance(1_000_000 + ns_for_ticks(10_000))
    assert m.edges[-1] == (1_000_000 + ns_for_ticks(10_000), True)


def test_control_word_holds_the_counter(m: Machine) -> None:
    m.outb(0x43, 0x34)
    m.outb(0x40, 0xE8)
    m.outb(0x40, 0x03)
    m.clock.advance(ns_for_ticks(100))
    m.outb(0x43, 0x34)  # same mode again: the counter waits for a count
    m.clock.advance(ns_for_ticks(5000))
    assert m.inb(0x40) | m.inb(0x40) << 8 == 900
    assert m.irq0.level and m.clock.next_deadline() is None


def test_linux_tsc_calibration_on_counter2(m: Machine) -> None:
    """arch/x86/kernel/tsc.c pit_calibrate_tsc: gate on, mode 0, poll port 0x61 bit 5."""
    m.clock.advance(1_000)
    assert m.inb(0x61) & 0x21 == 0x20  # gate low; OUT in the first half of the reset square wave
    m.outb(0x61, (m.inb(0x61) & ~0x02) | 0x01)
    m.outb(0x43, 0xB0)
    m.outb(0x42, 11931 & 0xFF)
    m.outb(0x42, 11931 >> 8)
    loaded = m.clock.now_ns()
    m.clock.advance(loaded + ns_for_ticks(11931) - 1)
    assert m.inb(0x61) & 0x21 == 0x01
    m.clock.advance(loaded + ns_for_ticks(11931))
    assert m.inb(0x61) & 0x21 == 0x21


def test_port61_refresh_toggle_and_speaker_bits(m: Machine) -> None:
    first, second, third = m.inb(0x61), m.inb(0x61), m.inb(0x61)
    assert (first ^ second, second ^ third) == (0x10, 0x10)
    m.outb(0x61, 0x03)
    assert m.inb(0x61) & 0x0F == 0x03
    m.outb(0x61, 0xFC)  # only bits 0 and 1 are writable
    assert m.inb(0x61) & 0xCF == 0x00


def test_gate_rising_edge_restarts_counter2(m: Machine) -> None:
    m.outb(0x43, 0xB6)  # counter 2, mode 3, count 1000
    m.outb(0x42, 0xE8)
    m.outb(0x42, 0x03)
    m.clock.advance(ns_for_ticks(300))
    m.outb(0x61, 0x01)  # gate up: mode 3 reloads
    m.outb(0x43, 0x80)
    assert m.inb(0x42) | m.inb(0x42) << 8 == 1000
    m.clock.advance(ns_for_ticks(300) + ns_for_ticks(250))
    m.outb(0x61, 0x00)
    m.outb(0x61, 0x01)
    m.outb(0x43, 0x80)
    assert m.inb(0x42) | m.inb(0x42) << 8 == 1000


def test_control_port_reads_zero_and_reset(m: Machine) -> None:
    m.outb(0x43, 0x30)
    assert m.inb(0x43) == 0
    m.clock.advance(5_000_000)
    m.pit.reset()
    m.outb(0x43, 0xE2)
    assert m.inb(0x40) == 0xB6 and m.irq0.level
    assert m.clock.next_deadline() == 5_000_000 + ns_for_ticks(32768)


def test_bad_counter_numbers_are_configuration_errors(m: Machine) -> None:
    for channel in (-1, 3):
        with pytest.raises(PitError, match="counters 0-2"):
            m.pit.set_gate(channel, True)


def test_arbitrary_guest_accesses_never_raise(m: Machine) -> None:
    rng = random.Random(8254)
    for step in range(20_000):
        device = rng.choice((m.pit, m.speaker))
        offset = rng.randrange(0, 6)
        size = rng.choice((1, 2, 4, 8))
        if rng.random() < 0.5:
            assert len(device.read(offset, size)) == size
        else:
            device.write(offset, rng.randbytes(size))
        port = rng.choice((0x40, 0x41, 0x42, 0x43, 0x61))
        if rng.random() < 0.5:
            assert len(m.io.read(port, 1)) == 1
        else:
            m.outb(port, rng.randrange(256))
        if step % 100 == 0:
            # Keep counter 0 slow enough that the sweep does not spend its time in edges.
            m.outb(0x43, 0x34)
            m.outb(0x40, 0x00)
            m.outb(0x40, 0x40)
        m.clock.advance(m.clock.now_ns() + rng.randrange(0, 20_000))
