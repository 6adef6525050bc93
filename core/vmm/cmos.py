"""The MC146818 real-time clock and its CMOS NVRAM at ports 0x70/0x71, as on QEMU's ``pc``.

Port 0x70 selects one of 128 bytes (bit 7 is the NMI mask, kept apart from the
index; reads of 0x70 return 0xFF as in QEMU), port 0x71 reads or writes it. Bytes
0x00-0x0D are the clock: time and alarm in BCD or binary (status register B's DM
bit), 12- or 24-hour (its 24/12 bit), status A (divider and rate bits, UIP), B (SET,
interrupt enables), C (interrupt flags; a read returns them and clears them) and D
(VRT, always set). The rest is NVRAM, preloaded with what QEMU's ``pc`` machine
writes at reset (hw/i386/pc.c ``pc_cmos_init``, ``set_boot_dev``, x86-common
``x86_rtc_set_cpus_count``, and the century byte of hw/rtc/mc146818rtc.c
``rtc_set_cmos``): see :func:`pc_cmos_layout`. QEMU's ``pc`` decodes only these two
ports, so there is no extended bank at 0x72/0x73.

Guest code that relies on it: OVMF's SEC reads 0x0F (shutdown status: 0 is a normal
boot, 0xFE an S3 resume), PlatformPei reads it and writes 0 back; PlatformPei falls back
to 0x34/0x35 and 0x5B-0x5D for the RAM size when fw_cfg has no ``etc/e820``;
PcatRealTimeClockRuntimeDxe writes A = 0x26, reads B, clears C, checks D's VRT, waits
for UIP to clear, reads the time and the century at 0x32, and sets the time with
SET in B. Linux reads the time the same way and may use the periodic, alarm and
update-ended interrupts on IRQ 8.

Time. The clock's time is ``base_time`` (seconds since the epoch, UTC) plus the
MachineClock's elapsed time, so a run is deterministic. As in QEMU
(``get_guest_rtc_ns``, ``rtc_set_time``), the chip keeps its time as a number of
seconds set at a known clock instant plus a sub-second phase: a guest write of a
time register while the clock runs makes the registers the time at that instant,
clearing SET does the same but keeps the phase of the divider chain, and taking the
divider out of reset starts the first second half a second later. While SET is on
or the divider is stopped the time registers hold what was last written or read.
UIP reads as set during the last 244 us before each second boundary (QEMU's
UIP_HOLD_LENGTH), so a guest that waits for UIP to clear always reads a consistent
time.

Interrupts (QEMU's ``periodic_timer_update``, ``check_update_timer``,
``rtc_update_timer``): while PIE is set, a MachineClock timer sets PF at the rate of
A's rate bits, on the multiples of the period on the 32.768 kHz grid of the machine
clock (so re-arming never drifts); another timer sets UF at each second boundary and
AF at the second the alarm matches (hours, minutes, seconds, each "don't care" when
its two top bits are set; a 12-hour alarm uses its own PM bit, where QEMU looks at
the time's), and sleeps while UF is set and AF cannot change. A flag whose enable
bit in B is set also sets IRQF and raises the IRQ 8 line, which stays high until
the guest reads C.

Left out: the square-wave output (SQWE) and daylight-saving bit (DSE) are only
stored; PF is only set while PIE is on and update-ended flags keep coming while SET
is on (both as QEMU does); QEMU's lost-tick reinjection is not modelled (its default
policy drops them too); the divider's test settings (DV = 1xx but not 11x) only stop
the time, as in QEMU.
"""

from __future__ import annotations

from sevsim.errors import SevsimError
from sevsim.vmm.clock import MachineClock
from sevsim.vmm.irq import IrqLine

RTC_PORT = 0x70
RTC_PORTS = 2
RTC_IRQ = 8

# -- clock registers (MC146818 datasheet; QEMU's mc146818rtc_regs.h) ------------------

SECONDS = 0x00
SECONDS_ALARM = 0x01
MINUTES = 0x02
MINUTES_ALARM = 0x03
HOURS = 0x04
HOURS_ALARM = 0x05
DAY_OF_WEEK = 0x06
DAY_OF_MONTH = 0x07
MONTH = 0x08
YEAR = 0x09
REG_A = 0x0A
REG_B = 0x0B
REG_C = 0x0C
REG_D = 0x0D

# -- PC NVRAM bytes --------------------------------------------------------------------

SHUTDOWN_STATUS = 0x0F
S3_RESUME = 0xFE
EQUIPMENT = 0x14
BASE_MEMORY = 0x15  # KiB below 640 KiB, 2 bytes
EXTENDED_MEMORY = 0x17  # KiB above 1 MiB (at most 0xFFFF), 2 bytes
EXTENDED_MEMORY_COPY = 0x30  # the same count again, 2 bytes
CENTURY = 0x32
MEMORY_ABOVE_16M = 0x34  # 64 KiB units between 16 MiB and 4 GiB, 2 bytes
PS2_CENTURY = 0x37  # IBM PS/2 century byte: an alias of 0x32 in QEMU
BOOT_ORDER_3 = 0x38  # third boot device (bits 7-4), floppy signature check off (bit 0)
BOOT_ORDER_12 = 0x3D  # second (bits 7-4) and first (bits 3-0) boot device
MEMORY_ABOVE_4G = 0x5B  # 64 KiB units above 4 GiB, 3 bytes
CPU_COUNT = 0x5F  # vCPUs - 1

REG_A_UIP = 0x80
REG_A_DIVIDER = 0x70
REG_A_RATE = 0x0F
REG_B_SET = 0x80
REG_B_PIE = 0x40
REG_B_AIE = 0x20
REG_B_UIE = 0x10
REG_B_SQWE = 0x08
REG_B_DM = 0x04  # binary (1) or BCD (0)
REG_B_24H = 0x02
REG_C_IRQF = 0x80
REG_C_PF = 0x40
REG_C_AF = 0x20
REG_C_UF = 0x10
REG_C_FLAGS = REG_C_PF | REG_C_AF | REG_C_UF  # same bit positions as the enables in B
REG_D_VRT = 0x80

#: Power-on A: 32.768 kHz divider running (DV = 010), rate 1024 Hz; B: BCD, 24-hour.
RESET_REG_A = 0x26
RESET_REG_B = REG_B_24H

_TIME_REGISTERS = frozenset((SECONDS, MINUTES, HOURS, DAY_OF_WEEK, DAY_OF_MONTH, MONTH, YEAR,
                             CENTURY))  # fmt: skip
_ALARM_REGISTERS = frozenset((SECONDS_ALARM, MINUTES_ALARM, HOURS_ALARM))
_DONT_CARE = 0xC0
_PM = 0x80

NS_PER_S = 1_000_000_000
RTC_HZ = 32_768
#: How long before each update UIP reads as set (244 us: 8 cycles of 32.768 kHz).
UIP_HOLD_NS = 8 * NS_PER_S // RTC_HZ
_SECONDS_PER_DAY = 86_400
#: The latest base time: 9999-12-31 23:59:59 UTC.
MAX_BASE_TIME = 253_402_300_799

_KIB = 1 << 10
_MIB = 1 << 20
_GIB = 1 << 30
#: ``-boot`` letters and their nibbles (QEMU's ``boot_device2nibble``).
BOOT_DEVICES = {"a": 1, "b": 1, "c": 2, "d": 3, "n": 4}


class CmosError(SevsimError):
    """The RTC/CMOS was configured with an impossible value."""


def bcd_encode(value: int) -> int:
    """``value`` (>= 0) in packed BCD: its decimal digits, one per nibble."""
    return int(str(value), 16)


def bcd_decode(raw: int) -> int:
    """Packed BCD ``raw`` (>= 0) to binary; a nibble above 9 counts as its value, as the
    chips' arithmetic would."""
    value, scale = 0, 1
    while raw:
        value += (raw & 0xF) * scale
        raw >>= 4
        scale *= 10
    return value


def days_from_civil(year: int, month: int, day: int) -> int:
    """Days from 1970-01-01 to a proleptic Gregorian date; out-of-range months and days
    are carried arithmetically, never rejected (guest registers can hold anything)."""
    year -= month <= 2
    era = year // 400
    year_of_era = year - era * 400
    day_of_year = (153 * (month - 3 if month > 2 else month + 9) + 2) // 5 + day - 1
    day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
    return era * 146_097 + day_of_era - 719_468


def civil_from_days(days: int) -> tuple[int, int, int]:
    """(year, month, day) of the date ``days`` after 1970-01-01 (any sign)."""
    days += 719_468
    era = days // 146_097
    day_of_era = days - era * 146_097
    year_of_era = (
        day_of_era - day_of_era // 1460 + day_of_era // 36_524 - day_of_era // 146_096
    ) // 365
    day_of_year = day_of_era - (365 * year_of_era + year_of_era // 4 - year_of_era // 100)
    shifted_month = (5 * day_of_year + 2) // 153
    day = day_of_year - (153 * shifted_month + 2) // 5 + 1
    month = shifted_month + 3 if shifted_month < 10 else shifted_month - 9
    return year_of_era + era * 400 + (month <= 2), month, day


def _check_int(what: str, value: object, low: int, high: int | None, unit: str = "") -> int:
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or value < low
        or (high is not None and value > high)
    ):
        bounds = f"{low}.." if high is None else f"{low}..{high}"
        raise CmosError(f"{what} {value!r} is not an integer in {bounds}{unit}")
    return value


def pc_cmos_layout(
    ram_below_4g: int, ram_above_4g: int, cpus: int, boot_order: str = "cad"
) -> dict[int, int]:
    """The NVRAM bytes QEMU's ``pc`` machine sets at reset, by index.

    Memory sizes come from the RAM below and above 4 GiB (``pc_cmos_init``), 0x5F is
    the vCPU count - 1 (0 beyond 255: ``x86_rtc_set_cpus_count``), the boot bytes
    encode ``boot_order`` as QEMU's ``-boot order=`` does (default "cad": disk,
    floppy, CD-ROM, with the floppy boot-signature check on), the equipment byte says
    FPU and PS/2 mouse. The floppy (0x10) and IDE disk bytes (0x12, 0x19-0x2C, 0x39)
    stay 0: the machine has no legacy drives.
    """
    _check_int("RAM below 4 GiB", ram_below_4g, 0, 4 * _GIB, " bytes")
    _check_int("RAM above 4 GiB", ram_above_4g, 0, (1 << 40) - 1,
               " bytes (CMOS 0x5B-0x5D count 64 KiB units in 24 bits)")  # fmt: skip
    _check_int("vCPU count", cpus, 1, None)
    if (
        not isinstance(boot_order, str)
        or not 1 <= len(boot_order) <= 3
        or any(letter not in BOOT_DEVICES for letter in boot_order)
    ):
        raise CmosError(
            f"boot order {boot_order!r} is not 1-3 of the letters {''.join(BOOT_DEVICES)}"
        )
    base = min(ram_below_4g // _KIB, 640)
    extended = min(max(ram_below_4g - _MIB, 0) // _KIB, 0xFFFF)
    above_16m = min(max(ram_below_4g - 16 * _MIB, 0) // (64 * _KIB), 0xFFFF)
    above_4g = ram_above_4g // (64 * _KIB)
    boot = [BOOT_DEVICES[letter] for letter in boot_order] + [0, 0]
    layout = {
        EQUIPMENT: 0x02 | 0x04,  # FPU present, PS/2 mouse installed
        BOOT_ORDER_12: boot[1] << 4 | boot[0],
        BOOT_ORDER_3: boot[2] << 4,
        CPU_COUNT: 0 if cpus > 0xFF else cpus - 1,
    }
    for index, value, length in (
        (BASE_MEMORY, base, 2),
        (EXTENDED_MEMORY, extended, 2),
        (EXTENDED_MEMORY_COPY, extended, 2),
        (MEMORY_ABOVE_16M, above_16m, 2),
        (MEMORY_ABOVE_4G, above_4g, 3),
    ):
        for i in range(length):
            layout[index + i] = (value >> (8 * i)) & 0xFF
    return layout


class Mc146818Rtc:
    """The RTC and CMOS NVRAM device (2 ports, normally at 0x70); IRQ 8 on ``irq``."""

    __slots__ = (
        "_base_clock",
        "_base_seconds",
        "_clock",
        "_index",
        "_next_alarm_ns",
        "_offset_ns",
        "_periodic",
        "_periodic_tick",
        "_update",
        "irq",
        "name",
        "nmi_masked",
        "ram",
    )

    def __init__(
        self,
        clock: MachineClock,
        irq: IrqLine,
        *,
        base_time: int,
        ram_below_4g: int,
        ram_above_4g: int = 0,
        cpus: int = 1,
        boot_order: str = "cad",
    ) -> None:
        self.name = "rtc"
        self._clock = clock
        self.irq = irq
        self.ram = bytearray(128)
        for index, value in pc_cmos_layout(ram_below_4g, ram_above_4g, cpus, boot_order).items():
            self.ram[index] = value
        self.ram[REG_A] = RESET_REG_A
        self.ram[REG_B] = RESET_REG_B
        self.ram[REG_D] = REG_D_VRT
        #: Bit 7 of the last write to port 0x70: set means NMIs are to be held off.
        self.nmi_masked = False
        self._index = 0
        self._base_seconds = _check_int("RTC base time", base_time, 0, MAX_BASE_TIME,
                                        " (seconds since 1970-01-01 UTC)")  # fmt: skip
        self._base_clock = clock.now_ns()
        self._offset_ns = 0
        self._periodic = clock.timer(self._on_periodic, "rtc-periodic")
        self._periodic_tick = 0
        self._update = clock.timer(self._on_update, "rtc-update")
        self._next_alarm_ns: int | None = None
        self._store_time(self._base_seconds)
        self._schedule_update()

    def reset(self) -> None:
        """System reset (QEMU's ``rtc_reset_enter``): the time and NVRAM are kept, a
        shutdown status other than S3 resume is cleared, interrupts are disabled."""
        if self.ram[SHUTDOWN_STATUS] != S3_RESUME:
            self.ram[SHUTDOWN_STATUS] = 0
        self.ram[REG_B] &= ~(REG_B_PIE | REG_B_AIE | REG_B_SQWE)
        self.ram[REG_C] &= ~(REG_C_UF | REG_C_IRQF | REG_C_PF | REG_C_AF)
        self.irq.set_level(False)
        self._restart_periodic()
        self._schedule_update()

    # -- guest access ------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self._read_data() if offset + i == 1 else 0xFF for i in range(size))

    def write(self, offset: int, data: bytes) -> None:
        for i, value in enumerate(data):
            if offset + i == 0:
                self._index = value & 0x7F
                self.nmi_masked = bool(value & 0x80)
            elif offset + i == 1:
                self._write_data(value)

    def _register(self) -> int:
        return CENTURY if self._index == PS2_CENTURY else self._index

    def _read_data(self) -> int:
        index = self._register()
        if index in _TIME_REGISTERS:
            if self._running():
                self._store_time(self._guest_ns() // NS_PER_S)
            return self.ram[index]
        if index == REG_A:
            return self.ram[REG_A] | (REG_A_UIP if self._update_in_progress() else 0)
        if index == REG_C:
            flags = self.ram[REG_C]
            self.ram[REG_C] = 0
            self.irq.set_level(False)
            if flags & (REG_C_UF | REG_C_AF):
                self._schedule_update()
            return flags
        return self.ram[index]

    def _write_data(self, value: int) -> None:
        index = self._register()
        if index in _TIME_REGISTERS:
            running = self._running()
            if running:  # the other fields must be current before one of them changes
                self._store_time(self._guest_ns() // NS_PER_S)
            self.ram[index] = value
            if running:
                self._set_time()
                self._schedule_update()
        elif index in _ALARM_REGISTERS:
            self.ram[index] = value
            self._schedule_update()
        elif index == REG_A:
            self._write_a(value)
        elif index == REG_B:
            self._write_b(value)
        elif index not in (REG_C, REG_D):  # C and D are read-only
            self.ram[index] = value

    def _write_a(self, value: int) -> None:
        old = self.ram[REG_A]
        if value & 0x60 == 0x60:  # divider reset: the time stops where it is
            if self._running():
                self._store_time(self._guest_ns() // NS_PER_S)
        elif old & 0x60 == 0x60 and value & REG_A_DIVIDER <= 0x20:
            # Divider out of reset: the first update comes half a second later.
            if not self.ram[REG_B] & REG_B_SET:
                self._offset_ns = NS_PER_S // 2
                self._set_time()
        self.ram[REG_A] = value & ~REG_A_UIP
        if (old ^ value) & REG_A_RATE:
            self._restart_periodic()
        self._schedule_update()

    def _write_b(self, value: int) -> None:
        old = self.ram[REG_B]
        if value & REG_B_SET:
            if self._running():
                self._store_time(self._guest_ns() // NS_PER_S)
            value &= ~REG_B_UIE
        elif old & REG_B_SET and self.ram[REG_A] & REG_A_DIVIDER <= 0x20:
            # SET cleared: the registers become the time, the divider keeps its phase.
            self._offset_ns = self._guest_ns() % NS_PER_S
            self._set_time()
        if value & self.ram[REG_C] & REG_C_FLAGS:
            self.ram[REG_C] |= REG_C_IRQF
            self.irq.set_level(True)
        else:
            self.ram[REG_C] &= ~REG_C_IRQF
            self.irq.set_level(False)
        self.ram[REG_B] = value
        if (old ^ value) & REG_B_PIE:
            self._restart_periodic()
        self._schedule_update()

    # -- time ------------------------------------------------------------------------

    def _running(self) -> bool:
        """The time registers follow the time: SET is off and the divider runs."""
        return not self.ram[REG_B] & REG_B_SET and self.ram[REG_A] & REG_A_DIVIDER <= 0x20

    def _guest_ns(self) -> int:
        """The RTC's time in ns since the epoch (QEMU's ``get_guest_rtc_ns``)."""
        elapsed = self._clock.now_ns() - self._base_clock
        return self._base_seconds * NS_PER_S + elapsed + self._offset_ns

    def _update_in_progress(self) -> bool:
        return self._running() and self._guest_ns() % NS_PER_S >= NS_PER_S - UIP_HOLD_NS

    def _encode(self, value: int) -> int:
        return (value if self.ram[REG_B] & REG_B_DM else bcd_encode(value)) & 0xFF

    def _decode(self, raw: int) -> int:
        return raw if self.ram[REG_B] & REG_B_DM else bcd_decode(raw)

    def _decode_hour(self, raw: int) -> int:
        hour = self._decode(raw & 0x7F)
        if not self.ram[REG_B] & REG_B_24H:
            hour = hour % 12 + (12 if raw & _PM else 0)
        return hour

    def _store_time(self, seconds: int) -> None:
        """Write the date and time of ``seconds`` since the epoch into the registers."""
        days, second_of_day = divmod(seconds, _SECONDS_PER_DAY)
        year, month, day = civil_from_days(days)
        hour, rest = divmod(second_of_day, 3600)
        minute, second = divmod(rest, 60)
        ram = self.ram
        ram[SECONDS] = self._encode(second)
        ram[MINUTES] = self._encode(minute)
        if ram[REG_B] & REG_B_24H:
            ram[HOURS] = self._encode(hour)
        else:
            ram[HOURS] = self._encode(hour % 12 or 12) | (_PM if hour >= 12 else 0)
        ram[DAY_OF_WEEK] = self._encode((days + 4) % 7 + 1)  # Sunday = 1; 1970-01-01: Thursday
        ram[DAY_OF_MONTH] = self._encode(day)
        ram[MONTH] = self._encode(month)
        ram[YEAR] = self._encode(year % 100)
        ram[CENTURY] = self._encode(year // 100 % 100)

    def _set_time(self) -> None:
        """The registers become the time from now on (QEMU's ``rtc_set_time``)."""
        ram = self.ram
        year = self._decode(ram[YEAR]) + 100 * self._decode(ram[CENTURY])
        days = days_from_civil(year, self._decode(ram[MONTH]), self._decode(ram[DAY_OF_MONTH]))
        self._base_seconds = (
            days * _SECONDS_PER_DAY
            + self._decode_hour(ram[HOURS]) * 3600
            + self._decode(ram[MINUTES]) * 60
            + self._decode(ram[SECONDS])
        )
        self._base_clock = self._clock.now_ns()

    # -- periodic interrupt --------------------------------------------------------

    def _period(self) -> int:
        """32.768 kHz cycles between periodic interrupts, 0 when they are off."""
        rate = self.ram[REG_A] & REG_A_RATE
        if not self.ram[REG_B] & REG_B_PIE or not rate:
            return 0
        if rate <= 2:  # rates 1 and 2 repeat 8 and 9 with a 32.768 kHz time base
            rate += 7
        return 1 << (rate - 1)

    def _restart_periodic(self) -> None:
        period = self._period()
        if not period:
            self._periodic.cancel()
            return
        tick = self._clock.now_ns() * RTC_HZ // NS_PER_S
        self._periodic_tick = (tick // period + 1) * period
        self._periodic.arm(_rtc_tick_ns(self._periodic_tick))

    def _on_periodic(self) -> None:
        self.ram[REG_C] |= REG_C_PF | REG_C_IRQF  # the timer only runs while PIE is set
        self.irq.set_level(True)
        self._periodic_tick += self._period()
        self._periodic.arm(_rtc_tick_ns(self._periodic_tick))

    # -- update-ended and alarm interrupts ---------------------------------------------

    def _schedule_update(self) -> None:
        """Arm the update timer for the next second boundary, or for the alarm when UF
        is already set, or not at all (QEMU's ``check_update_timer``)."""
        if self.ram[REG_A] & 0x60 == 0x60:  # divider in reset: no updates
            self._update.cancel()
            self._next_alarm_ns = None
            return
        guest = self._guest_ns()
        deadline = self._clock.now_ns() + NS_PER_S - guest % NS_PER_S
        delay = self._alarm_delay(guest // NS_PER_S)
        self._next_alarm_ns = None if delay is None else deadline + (delay - 1) * NS_PER_S
        if self.ram[REG_C] & REG_C_UF:
            if self._next_alarm_ns is None or self.ram[REG_C] & REG_C_AF:
                self._update.cancel()
                return
            deadline = self._next_alarm_ns
        self._update.arm(deadline)

    def _alarm_delay(self, now_seconds: int) -> int | None:
        """Seconds from the current one to the next whose time matches the alarm
        registers (1..86400), or None when no time can (SET on, or a value out of range)."""
        if self.ram[REG_B] & REG_B_SET:
            return None
        wanted: list[int | None] = []
        for index, limit in ((HOURS_ALARM, 24), (MINUTES_ALARM, 60), (SECONDS_ALARM, 60)):
            raw = self.ram[index]
            if raw & _DONT_CARE == _DONT_CARE:
                wanted.append(None)
                continue
            value = self._decode_hour(raw) if index == HOURS_ALARM else self._decode(raw)
            if value >= limit:
                return None
            wanted.append(value)
        hour, minute, second = wanted
        start = now_seconds % _SECONDS_PER_DAY
        candidate = start + 1
        while candidate <= start + _SECONDS_PER_DAY:
            h, rest = divmod(candidate % _SECONDS_PER_DAY, 3600)
            m, s = divmod(rest, 60)
            if hour is not None and h != hour:
                candidate += 3600 - rest  # to the next hour
            elif minute is not None and m != minute:
                candidate += 60 - s  # to the next minute
            elif second is not None and s != second:
                candidate += 1
            else:
                return candidate - start
        return None

    def _on_update(self) -> None:
        flags = REG_C_UF
        if self._next_alarm_ns is not None and self._clock.now_ns() >= self._next_alarm_ns:
            flags |= REG_C_AF
        new = flags & ~self.ram[REG_C]
        self.ram[REG_C] |= flags
        if new & self.ram[REG_B]:
            self.ram[REG_C] |= REG_C_IRQF
            self.irq.set_level(True)
        self._schedule_update()


def _rtc_tick_ns(tick: int) -> int:
    """The first machine-clock ns at or after 32.768 kHz cycle ``tick``."""
    return -(-tick * NS_PER_S // RTC_HZ)
