"""The PIIX4 power-management I/O block: PM1a event and control registers and the ACPI PM timer.

The 82371AB (PIIX4) decodes 64 I/O ports at the address its function 3 holds in PMBA,
once PMREGMISC.PMIOSE is set; :class:`sevsim.vmm.pci.Piix4PowerManagement` puts this
block on the I/O bus there and moves or removes it when the guest reprograms those
registers. The registers and their meaning are QEMU's (``hw/acpi/core.c``, used by
``hw/acpi/piix4.c``); OVMF programs PMBA to 0xB000, so on the ``pc`` machine the block
is at 0xB000-0xB03F:

====== ======== ==== ================================================================
offset register size
====== ======== ==== ================================================================
0x00   PM1a_STS 2    status; a bit written as 1 is cleared (TMR_STS, PWRBTN_STS, ...)
0x02   PM1a_EN  2    enables: a status bit whose enable is set raises the SCI
0x04   PM1a_CNT 2    SCI_EN, SLP_TYP; writing SLP_EN starts the sleep state SLP_TYP
0x08   PM_TMR   4    24-bit free-running counter at 3.579545 MHz; writes are ignored
====== ======== ==== ================================================================

Every other port of the block reads all ones, as in QEMU, where the rest of the
64-port container is unassigned I/O. QEMU keeps GPE0 outside this block (at 0xAFE0,
with its hotplug registers), not at PMBA+0x0C as the real PIIX4 does, so it is not
here either.

Each register can be reached a byte at a time or whole, as on the PIIX4: a read
returns the byte lanes it covers and a write changes only the lanes it carries.
QEMU's memory core differs in two corner cases that no guest depends on (an odd-byte
read of PM1a_STS or PM1a_EN returns 0 there, and a byte read of PM_TMR returns the low
byte whatever its offset); sevsim gives the byte the lane holds.

Sleep states, as QEMU's ``acpi_pm_cnt_write`` and QEMU's DSDT define them for this
machine: SLP_TYP 0 is S5 (soft off: ``_S5`` is ``{0, 0}``, and OVMF's ``ResetShutdown``
in ``OvmfPkg/Library/ResetSystemLib`` clears SLP_TYP and then sets SLP_EN at PMBA+4),
SLP_TYP 2 is S4, which QEMU also turns into a power-off, and SLP_TYP 1 is S3, which
sevsim does not model: the write only stores SLP_TYP and the guest runs on, as after
a failed suspend. S5 and S4 hand a :class:`~sevsim.vmm.power.PowerOffRequest` to the
machine.

The PM timer is read by OVMF's ``AcpiTimerLib`` (``IoRead32(PMBA + 8)``) for every
``MicroSecondDelay`` from SEC onwards, and by Linux as a clocksource, so its value is
exact: ``floor(now_ns * 3579545 / 10**9) mod 2**24`` of the machine clock. TMR_STS is
set each time bit 23 of the counter changes, as on the PIIX4, and stays set until the
guest clears it. QEMU computes the same "next multiple of 2**23 ticks" each time the
guest clears the bit, but starts from tick 0, so its TMR_STS reads 1 from reset until
first cleared; sevsim starts with the bit clear, as the chip does. While TMR_EN is set
and TMR_STS is not, the block keeps a machine-clock timer armed for the next change,
so the SCI rises at the right time even if nobody reads the block.
"""

from __future__ import annotations

from sevsim.vmm.clock import MachineClock
from sevsim.vmm.irq import IrqLine
from sevsim.vmm.power import PowerOffRequest, RequestSink

#: Ports the block decodes; PMBA bits 15:6 place it.
SIZE = 0x40

PM1_STS = 0x00
PM1_EN = 0x02
PM1_CNT = 0x04
PM_TMR = 0x08

#: (offset, width) of each register; anything else in the block is unassigned.
_REGISTERS = ((PM1_STS, 2), (PM1_EN, 2), (PM1_CNT, 2), (PM_TMR, 4))

# PM1a_STS / PM1a_EN bits (ACPI 6.x, section 4.8.3.1; the PIIX4 datasheet's PMSTS/PMEN).
TMR_STS = 1 << 0
GBL_STS = 1 << 5
PWRBTN_STS = 1 << 8
SLPBTN_STS = 1 << 9
RTC_STS = 1 << 10
TMR_EN = TMR_STS
PWRBTN_EN = PWRBTN_STS
#: Status bits that raise the SCI when enabled (QEMU's ACPI_BITMASK_PM1_COMMON_ENABLED).
SCI_SOURCES = TMR_STS | GBL_STS | PWRBTN_STS | SLPBTN_STS | RTC_STS

# PM1a_CNT bits.
SCI_EN = 1 << 0
SLP_TYP_SHIFT = 10
SLP_TYP_MASK = 0x7 << SLP_TYP_SHIFT
SLP_EN = 1 << 13

#: SLP_TYP values of QEMU's PIIX4 model (QEMU's ``s4_val`` property defaults to 2).
SLP_TYP_S5 = 0
SLP_TYP_S3 = 1
SLP_TYP_S4 = 2

PM_TIMER_HZ = 3_579_545
NS_PER_S = 1_000_000_000
_TIMER_BITS = 24
#: TMR_STS is set whenever this bit of the counter changes.
_TMR_STS_PERIOD = 1 << (_TIMER_BITS - 1)


def pm_timer_ticks(now_ns: int) -> int:
    """PM-timer ticks since the machine started (not yet reduced to 24 bits)."""
    return now_ns * PM_TIMER_HZ // NS_PER_S


class AcpiPmBlock:
    """PM1a_EVT, PM1a_CNT and PM_TMR of a PIIX4, timed by the machine clock.

    ``sci`` is the SCI output (IRQ 9 on the ``pc`` machine); it is high while a status
    bit and its enable are both set. ``request`` receives the power-off request of an
    S5 (or S4) sleep.
    """

    __slots__ = (
        "_clock",
        "_overflow_tick",
        "_request",
        "_timer",
        "cnt",
        "en",
        "name",
        "sci",
        "sts",
    )

    def __init__(self, clock: MachineClock, request: RequestSink, name: str = "piix4-pm") -> None:
        self.name = name
        self._clock = clock
        self._request = request
        self.sci = IrqLine(f"{name}.sci")
        self.sts = 0
        self.en = 0
        self.cnt = 0
        self._overflow_tick = self._next_overflow()
        self._timer = clock.timer(self._update_sci, f"{name}.tmr")

    # -- what the guest sees -------------------------------------------------------------

    def timer_value(self) -> int:
        """PM_TMR: the 24-bit tick count at the machine clock's present time (a read
        the guest repeats at once is a busy-wait: :meth:`MachineClock.polled`)."""
        self._clock.polled()
        return pm_timer_ticks(self._clock.now_ns()) % (1 << _TIMER_BITS)

    def status(self) -> int:
        """PM1a_STS, with TMR_STS set if bit 23 of the counter changed since it was cleared."""
        if pm_timer_ticks(self._clock.now_ns()) >= self._overflow_tick:
            self.sts |= TMR_STS
        return self.sts

    def read(self, offset: int, size: int) -> bytes:
        out = bytearray(b"\xff" * size)
        for base, width, lo, hi in _lanes(offset, size):
            value = self._register(base).to_bytes(width, "little")
            out[lo - offset : hi - offset] = value[lo - base : hi - base]
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        for base, _, lo, hi in _lanes(offset, len(data)):
            shift = 8 * (lo - base)
            value = int.from_bytes(data[lo - offset : hi - offset], "little") << shift
            mask = ((1 << (8 * (hi - lo))) - 1) << shift
            self._store(base, value, mask)

    # -- the host side -------------------------------------------------------------------

    def press_power_button(self) -> None:
        """The power button (QEMU's ``system_powerdown``): PWRBTN_STS is set, and the
        SCI raised, only if the guest enabled the event, as QEMU's
        ``acpi_pm1_evt_power_down`` does; a guest without ACPI ignores the button."""
        if self.en & PWRBTN_EN:
            self.sts |= PWRBTN_STS
            self._update_sci()

    # -- internals -----------------------------------------------------------------------

    def _register(self, base: int) -> int:
        if base == PM1_STS:
            return self.status()
        if base == PM1_EN:
            return self.en
        if base == PM1_CNT:
            return self.cnt
        return self.timer_value()

    def _store(self, base: int, value: int, mask: int) -> None:
        if base == PM1_STS:
            cleared = value & mask & self.status()
            if cleared & TMR_STS:
                self._overflow_tick = self._next_overflow()
            self.sts &= ~cleared
            self._update_sci()
        elif base == PM1_EN:
            self.en = (self.en & ~mask) | (value & mask)
            self._update_sci()
        elif base == PM1_CNT:
            self._write_cnt((self.cnt & ~mask) | (value & mask))
        # PM_TMR ignores writes.

    def _write_cnt(self, value: int) -> None:
        self.cnt = value & ~SLP_EN
        if not value & SLP_EN:
            return
        sleep_type = (value & SLP_TYP_MASK) >> SLP_TYP_SHIFT
        if sleep_type in (SLP_TYP_S5, SLP_TYP_S4):
            self._request(PowerOffRequest(f"{self.name}: SLP_EN with SLP_TYP {sleep_type}"))

    def _next_overflow(self) -> int:
        """The tick at which bit 23 of the counter next changes."""
        ticks = pm_timer_ticks(self._clock.now_ns())
        return (ticks + _TMR_STS_PERIOD) & ~(_TMR_STS_PERIOD - 1)

    def _update_sci(self) -> None:
        """Drive the SCI from status and enables, and keep the overflow timer armed while
        TMR_EN is set and TMR_STS is not (QEMU's ``acpi_update_sci``)."""
        sts = self.status()
        self.sci.set_level(bool(sts & self.en & SCI_SOURCES))
        if self.en & TMR_EN and not sts & TMR_STS:
            # The first nanosecond at which the tick count reaches the overflow tick.
            self._timer.arm(-(-self._overflow_tick * NS_PER_S // PM_TIMER_HZ))
        else:
            self._timer.cancel()


def _lanes(offset: int, size: int) -> list[tuple[int, int, int, int]]:
    """The registers an access touches: (base, width, first port, end port) of each."""
    lanes = []
    for base, width in _REGISTERS:
        lo, hi = max(offset, base), min(offset + size, base + width)
        if lo < hi:
            lanes.append((base, width, lo, hi))
    return lanes
