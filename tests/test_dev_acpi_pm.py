"""The PIIX4 ACPI PM block at PMBA 0xB000: PM1a event and control registers, PM timer, SCI."""

from __future__ import annotations

import random

import pytest

from sevsim.vmm import acpi_pm, reset_ports
from sevsim.vmm.acpi_pm import AcpiPmBlock
from sevsim.vmm.bus import Bus
from sevsim.vmm.clock import MachineClock
from sevsim.vmm.pci import attach_i440fx
from sevsim.vmm.power import MachineRequest, PowerOffRequest

PMBA = 0xB000
PM1_STS, PM1_EN, PM1_CNT, PM_TMR = PMBA, PMBA + 2, PMBA + 4, PMBA + 8
#: The first nanosecond at which the tick count reaches 2**23 (bit 23 first changes).
FIRST_TOGGLE_NS = -(-(1 << 23) * 1_000_000_000 // 3_579_545)


@pytest.fixture
def pm():
    io = Bus("io", 0x10000)
    clock = MachineClock()
    requests: list[MachineRequest] = []
    block = AcpiPmBlock(clock, requests.append)
    io.insert(block, PMBA, acpi_pm.SIZE)
    return io, clock, requests, block


def in16(io: Bus, port: int) -> int:
    return int.from_bytes(io.read(port, 2), "little")


def out16(io: Bus, port: int, value: int) -> None:
    io.write(port, value.to_bytes(2, "little"))


def in32(io: Bus, port: int) -> int:
    return int.from_bytes(io.read(port, 4), "little")


def test_registers_at_reset(pm):
    io, *_ = pm
    registers = (in16(io, PM1_STS), in16(io, PM1_EN), in16(io, PM1_CNT), in32(io, PM_TMR))
    assert registers == (0, 0, 0, 0)


def test_pm_timer_is_exact_and_wraps_at_24_bits(pm):
    io, clock, *_ = pm
    last = -1
    for now_ns in range(0, 4_000_000, 279):  # 279 ns is just under one tick (279.365 ns)
        clock.advance(now_ns)
        value = in32(io, PM_TMR)
        assert value == now_ns * 3_579_545 // 1_000_000_000
        assert value in (last, last + 1)
        last = value
    # Each read after an advance: reads with no time between them are a busy-wait.
    ten_s = 10_000_000_000
    clock.advance(ten_s)
    assert in32(io, PM_TMR) == 35_795_450 % (1 << 24) == 2_241_018
    clock.advance(ten_s)
    assert io.read(PM_TMR + 3, 1) == b"\x00"  # bits 31:24 read 0
    clock.advance(ten_s)
    assert io.read(PM_TMR, 2) == (2_241_018 & 0xFFFF).to_bytes(2, "little")
    clock.advance(ten_s)
    assert io.read(PM_TMR + 2, 1) == bytes([2_241_018 >> 16])
    io.write(PM_TMR, b"\x00\x00\x00\x00")  # read-only
    clock.advance(ten_s)
    assert in32(io, PM_TMR) == 2_241_018


def test_a_busy_wait_on_the_pm_timer_skips_ahead_but_not_past_a_timer(pm):
    """MicroSecondDelay polls PM_TMR: reads with hardly any guest time between them
    move time on by a step that doubles (1 us, 2 us, ... at most 1 ms), stop at the
    next timer's deadline and ask for the run loop (``on_due``), and the run loop
    gets the skipped time to add to its own."""
    io, clock, *_ = pm
    due: list[int] = []
    clock.on_due = lambda: due.append(clock.now_ns())
    clock.timer(lambda: None, "lapic").arm(40_000_000)
    reads = [in32(io, PM_TMR) for _ in range(60)]
    skipped = clock.take_skipped()
    # No skip before the first read; then 1, 2, 4 ... 512 us, then 1 ms a read up to
    # the timer at 40 ms, where time stays.
    times, now = [0], 0
    for step in [1_000 << i for i in range(10)] + [1_000_000] * 49:
        now = min(now + step, 40_000_000)
        times.append(now)
    assert reads == [acpi_pm.pm_timer_ticks(t) for t in times]
    assert skipped == 40_000_000
    assert due == [40_000_000] * len(due) and len(due) >= 1
    clock.advance(skipped)  # the run loop folds it in: no time goes back
    assert in32(io, PM_TMR) == 40_000_000 * 3_579_545 // 10**9  # a fresh read: no skip


def test_tmr_sts_sets_when_bit_23_changes_and_clears_by_writing_one(pm):
    io, clock, *_ = pm
    clock.advance(FIRST_TOGGLE_NS - 1)
    assert in32(io, PM_TMR) == (1 << 23) - 1
    assert in16(io, PM1_STS) == 0
    clock.advance(FIRST_TOGGLE_NS)
    assert in32(io, PM_TMR) == 1 << 23
    assert in16(io, PM1_STS) == acpi_pm.TMR_STS
    out16(io, PM1_STS, 0xFFFE)  # ones elsewhere clear nothing that is set
    assert in16(io, PM1_STS) == acpi_pm.TMR_STS
    out16(io, PM1_STS, acpi_pm.TMR_STS)
    assert in16(io, PM1_STS) == 0
    second_toggle_ns = -(-(1 << 24) * 1_000_000_000 // 3_579_545)
    clock.advance(second_toggle_ns - 1)
    assert in16(io, PM1_STS) == 0
    clock.advance(second_toggle_ns)  # the counter wraps to 0: bit 23 changes again
    assert in32(io, PM_TMR) == 0
    assert in16(io, PM1_STS) == acpi_pm.TMR_STS


def test_tmr_en_raises_the_sci_at_the_overflow_by_itself(pm):
    io, clock, _, block = pm
    levels: list[bool] = []
    block.sci.connect(levels.append)
    out16(io, PM1_EN, acpi_pm.TMR_EN)
    assert clock.next_deadline() == FIRST_TOGGLE_NS
    assert clock.advance(FIRST_TOGGLE_NS - 1) == 0
    assert not block.sci.level
    assert clock.advance(FIRST_TOGGLE_NS + 1000) == 1  # the block's timer fired
    assert levels == [True]
    assert clock.next_deadline() is None  # nothing to wait for while TMR_STS is set
    clock.advance(FIRST_TOGGLE_NS + 5000)
    out16(io, PM1_STS, acpi_pm.TMR_STS)
    assert levels == [True, False]
    assert clock.next_deadline() == -(-(1 << 24) * 1_000_000_000 // 3_579_545)
    out16(io, PM1_EN, 0)
    assert clock.next_deadline() is None


def test_power_button_status_is_write_one_to_clear(pm):
    io, _, _, block = pm
    block.press_power_button()  # not enabled: ignored, as QEMU does
    assert in16(io, PM1_STS) == 0
    out16(io, PM1_EN, acpi_pm.PWRBTN_EN)
    block.press_power_button()
    assert in16(io, PM1_STS) == acpi_pm.PWRBTN_STS
    assert block.sci.level
    io.write(PM1_STS, b"\x00")  # low byte, zero: nothing cleared
    assert in16(io, PM1_STS) == acpi_pm.PWRBTN_STS
    io.write(PM1_STS + 1, b"\x01")  # the byte lane that holds bit 8
    assert in16(io, PM1_STS) == 0
    assert not block.sci.level


def test_enable_register_byte_lanes(pm):
    io, *_ = pm
    out16(io, PM1_EN, 0x0521)
    io.write(PM1_EN + 1, b"\x01")
    assert in16(io, PM1_EN) == 0x0121
    assert io.read(PM1_EN + 1, 1) == b"\x01"
    assert io.read(PM1_STS, 4) == b"\x00\x00\x21\x01"  # a dword covers STS and EN


def test_ovmf_reset_shutdown_powers_off(pm):
    """PciAcpiInitialization sets SCI_EN; `reset -s` ends in ResetShutdown (DXE flavour):
    IoBitFieldWrite16(PMBA + 4, 10, 13, 0), then IoOr16(PMBA + 4, BIT13)."""
    io, _, requests, block = pm
    out16(io, PM1_CNT, in16(io, PM1_CNT) | acpi_pm.SCI_EN)
    assert in16(io, PM1_CNT) == 0x0001
    out16(io, PM1_CNT, in16(io, PM1_CNT) & ~0x3C00)
    assert requests == []
    out16(io, PM1_CNT, in16(io, PM1_CNT) | 1 << 13)
    assert requests == [PowerOffRequest("piix4-pm: SLP_EN with SLP_TYP 0")]
    assert in16(io, PM1_CNT) == 0x0001  # SLP_EN is not kept
    assert block.cnt == 0x0001


def test_reset_s_through_the_pci_wiring():
    """The whole path on the pc machine: PMBA programmed over CF8/CFC, then PM1a_CNT."""
    io = Bus("io", 0x10000)
    requests: list[MachineRequest] = []
    block = AcpiPmBlock(MachineClock(), requests.append)
    attach_i440fx(io, block, reset_ports.attach(io, requests.append))
    for register, value, size in ((0x40, 0xB001, 4), (0x80, 0x01, 1)):
        io.write(0xCF8, (0x8000_0B00 | register).to_bytes(4, "little"))
        io.write(0xCFC, value.to_bytes(size, "little"))
    out16(io, 0xB004, 0x2001)
    assert requests == [PowerOffRequest("piix4-pm: SLP_EN with SLP_TYP 0")]


@pytest.mark.parametrize(
    ("sleep_type", "powers_off"),
    [
        (acpi_pm.SLP_TYP_S5, True),
        (acpi_pm.SLP_TYP_S3, False),  # no suspend-to-RAM: the guest runs on
        (acpi_pm.SLP_TYP_S4, True),  # QEMU powers off for S4 too
        (3, False),
        (7, False),
    ],
)
def test_sleep_types(pm, sleep_type, powers_off):
    io, _, requests, _ = pm
    out16(io, PM1_CNT, sleep_type << 10 | 1 << 13)
    assert bool(requests) == powers_off
    assert in16(io, PM1_CNT) == sleep_type << 10  # SLP_TYP kept, SLP_EN not


def test_sleep_enable_by_a_byte_write(pm):
    io, _, requests, _ = pm
    io.write(PM1_CNT, b"\x01")
    io.write(PM1_CNT + 1, b"\x20")  # SLP_EN | SLP_TYP 0 in the high byte only
    assert requests == [PowerOffRequest("piix4-pm: SLP_EN with SLP_TYP 0")]
    assert in16(io, PM1_CNT) == 0x0001


def test_unassigned_ports_of_the_block_read_all_ones(pm):
    io, *_ = pm
    assert io.read(PMBA + 6, 2) == b"\xff\xff"
    assert all(io.read(PMBA + offset, 1) == b"\xff" for offset in range(0x0C, 0x40))
    io.write(PMBA + 0x0C, b"\xff\xff\xff\xff")
    assert io.read(PMBA + 0x0C, 4) == b"\xff" * 4
    assert io.read(PM1_CNT, 4) == b"\x00\x00\xff\xff"


def test_sweep_of_guest_accesses_never_raises(pm):
    io, clock, requests, _ = pm
    rng = random.Random(0xB000)
    for step in range(20_000):
        clock.advance(step * 104_729)
        port = PMBA + rng.randrange(acpi_pm.SIZE)
        size = rng.choice([1, 2, 4])
        if rng.random() < 0.5:
            assert len(io.read(port, size)) == size
        else:
            io.write(port, rng.getrandbits(8 * size).to_bytes(size, "little"))
    assert all(isinstance(request, PowerOffRequest) for request in requests)
