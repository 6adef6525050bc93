"""The 8254 programmable interval timer at ports 0x40-0x43, and port 0x61 (speaker, NMI status).

The PC's PIT has three 16-bit down-counters clocked at 1.193182 MHz: counter 0's OUT
is ISA IRQ 0 (the legacy timer tick), counter 1 once paced DRAM refresh, counter 2's
OUT drives the speaker and can be read back, with its GATE set, through port 0x61.
Firmware and kernels use them to tick and to measure time: OVMF's 8254TimerDxe (CSM
builds) writes 0x36 to 0x43 and an LSB-then-MSB count to 0x40 for a mode 3 tick
(11932 for its default 10 ms); Linux calibrates the TSC with counter 2 in mode 0,
raising GATE and polling port 0x61 bit 5, and may use counter 0 as its clockevent
(mode 2 periodic, mode 0 one-shot); both read counts back with latch commands.

Counting is a pure function of the machine clock: ``ticks = floor(elapsed_ns *
1193182 / 10**9)`` since the count was loaded, so every value read back is exact and
repeatable. Counter 0's OUT drives :attr:`I8254.irq` from a MachineClock timer armed
for the first clock ns of the tick where OUT next changes; the tick numbers count
from the load, so a periodic mode never drifts however late the timer runs.

Behaviour (Intel 8254 datasheet, and QEMU's hw/timer/i8254.c and i8254_common.c):

* Control word (0x43): counter select, access (latch, LSB, MSB, LSB then MSB), mode
  (6 and 7 are modes 2 and 3), BCD. Writing a mode stops the counter until a count
  is written (the datasheet; QEMU counts on in the new mode); meanwhile OUT holds
  its level at the start of counting and reads return the value the counter had.
  The read-back command (counter select 3) latches the count and/or status of
  several counters; a second latch before the first is read is ignored. Status is
  OUT, null count (no count loaded since the mode or the first byte of an
  LSB-then-MSB count was written), access, mode and BCD; when both are latched the
  status is read first. Reads of 0x43 return 0, as in QEMU.
* A count is loaded as soon as it is complete (0 means 0x10000, or 10000 in BCD)
  and counting restarts then, in every mode (QEMU; the chip waits for the end of the
  period in modes 2 and 3).
* Mode 0: OUT low until the count has elapsed, then high; the counter wraps on.
  Mode 2: OUT high, low for the last tick of each period (the rising edge at each
  reload is the interrupt; QEMU pulses OUT high for the first tick instead, which
  gives the same interrupt edges but not the same port 0x61 bit 5). Mode 3: square
  wave, high for the first (N + 1) // 2 ticks of each period; the counter reads
  N - (2 * ticks mod N), as in QEMU. Modes 1, 4 and 5 are QEMU's: OUT high while
  counting in mode 1, one tick high at the terminal count in modes 4 and 5.
* BCD counting: counts are four BCD digits, read back in BCD.
* GATE (counter 2 only; 0 and 1 are tied high): a rising edge restarts counting in
  modes 1, 2, 3 and 5 (QEMU). Reset state: every counter in mode 3 with count 0x10000,
  running, so IRQ 0 ticks at 18.2 Hz until firmware reprograms it (QEMU's
  ``pit_reset_common``).

Left out, as in QEMU: GATE low does not pause counting, and a periodic mode's OUT
is not forced high by it. Nothing limits how fast counter 0 may tick (QEMU's
userspace PIT does not either); a tiny count costs the host one timer event per edge.
"""

from __future__ import annotations

from sevsim.errors import SevsimError
from sevsim.vmm.clock import MachineClock
from sevsim.vmm.cmos import bcd_decode, bcd_encode
from sevsim.vmm.irq import IrqLine

PIT_PORT = 0x40
PIT_PORTS = 4
PIT_IRQ = 0
SPEAKER_PORT = 0x61

PIT_HZ = 1_193_182
NS_PER_S = 1_000_000_000

# Access modes (control word bits 5-4), and the read/write state for the second byte
# of an LSB-then-MSB transfer.
_LATCH = 0
_LSB = 1
_MSB = 2
_LSB_MSB = 3
_MSB_OF_WORD = 4

_READ_BACK = 3  # counter select value of the read-back command
_READ_BACK_NO_COUNT = 0x20
_READ_BACK_NO_STATUS = 0x10
_STATUS_OUT = 0x80
_STATUS_NULL_COUNT = 0x40

_BINARY_RANGE = 0x1_0000
_BCD_RANGE = 10_000


class PitError(SevsimError):
    """The VMM named a PIT counter that does not exist."""


def pit_ticks(elapsed_ns: int) -> int:
    """Whole 1.193182 MHz input cycles in ``elapsed_ns``."""
    return elapsed_ns * PIT_HZ // NS_PER_S


def _tick_ns(ticks: int) -> int:
    """The first ns at which ``ticks`` cycles have elapsed: pit_ticks of it is exactly ``ticks``."""
    return -(-ticks * NS_PER_S // PIT_HZ)


class _Counter:
    """One counter: its programming, its count, and when that count was loaded."""

    __slots__ = (
        "access",
        "bcd",
        "count",
        "frozen",
        "gate",
        "latch_state",
        "latched",
        "load_ns",
        "mode",
        "read_state",
        "status",
        "write_latch",
        "write_state",
    )

    def __init__(self, now: int, gate: bool) -> None:
        self.latched = 0
        self.write_latch = 0
        self.frozen = 0
        self.reset(now, gate)

    def reset(self, now: int, gate: bool) -> None:
        self.mode = 3
        self.bcd = False
        self.access = self.read_state = self.write_state = _LSB_MSB
        self.count = _BINARY_RANGE
        self.load_ns: int | None = now  # None: a mode was written, the count not yet
        self.gate = gate
        self.latch_state = 0  # bytes of ``latched`` still to read, as an access mode
        self.status: int | None = None

    @property
    def kind(self) -> int:
        """The mode that counts: 6 and 7 are 2 and 3 (bit 3 is "don't care" there)."""
        return self.mode - 4 if self.mode >= 6 else self.mode

    def _elapsed(self, now: int) -> int:
        return 0 if self.load_ns is None else pit_ticks(now - self.load_ns)

    def value(self, now: int) -> int:
        """What the counter reads (16 bits; four BCD digits in BCD mode)."""
        if self.load_ns is None:
            return self.frozen
        ticks, count, kind = self._elapsed(now), self.count, self.kind
        if kind == 2:
            value = count - ticks % count
        elif kind == 3:
            value = count - (2 * ticks) % count
        else:
            value = count - ticks
        if self.bcd:
            return bcd_encode(value % _BCD_RANGE)
        return value % _BINARY_RANGE

    def _out_at(self, ticks: int) -> bool:
        count, kind = self.count, self.kind
        if kind == 0:
            return ticks >= count
        if kind == 1:
            return ticks < count
        if kind == 2:
            return ticks % count != count - 1
        if kind == 3:
            return ticks % count < (count + 1) // 2
        return ticks == count

    def out(self, now: int) -> bool:
        return self._out_at(self._elapsed(now))

    def _next_change(self, ticks: int) -> int | None:
        """The first tick after ``ticks`` where OUT differs, or None if it never will."""
        count, kind = self.count, self.kind
        if kind in (0, 1):
            return count if ticks < count else None
        if kind in (4, 5):
            if ticks < count:
                return count
            return count + 1 if ticks == count else None
        if count == 1:  # mode 2 stays low, mode 3 stays high
            return None
        phase = ticks % count
        start = ticks - phase
        if kind == 2:
            return ticks + 1 if phase == count - 1 else start + count - 1
        half = (count + 1) // 2
        return start + half if phase < half else start + count

    def next_edge(self, now: int) -> int | None:
        """The clock ns at which OUT next changes, or None."""
        if self.load_ns is None:
            return None
        change = self._next_change(self._elapsed(now))
        return None if change is None else self.load_ns + _tick_ns(change)

    def status_byte(self, now: int) -> int:
        null_count = self.load_ns is None or self.write_state == _MSB_OF_WORD
        return (
            (_STATUS_OUT if self.out(now) else 0)
            | (_STATUS_NULL_COUNT if null_count else 0)
            | self.access << 4
            | self.mode << 1
            | self.bcd
        )

    def program(self, control: int, now: int) -> None:
        """A control word for this counter with a non-latch access mode."""
        self.frozen = self.value(now)
        self.access = self.read_state = self.write_state = (control >> 4) & 3
        self.mode = (control >> 1) & 7
        self.bcd = bool(control & 1)
        self.load_ns = None

    def latch(self, now: int) -> None:
        if not self.latch_state:
            self.latched = self.value(now)
            self.latch_state = self.access

    def latch_status(self, now: int) -> None:
        if self.status is None:
            self.status = self.status_byte(now)

    def read_byte(self, now: int) -> int:
        if self.status is not None:
            status, self.status = self.status, None
            return status
        if self.latch_state:
            state = self.latch_state
            self.latch_state = _MSB if state == _LSB_MSB else 0
            return self.latched >> 8 if state == _MSB else self.latched & 0xFF
        value = self.value(now)
        state = self.read_state
        if state == _LSB_MSB:
            self.read_state = _MSB_OF_WORD
        elif state == _MSB_OF_WORD:
            self.read_state = _LSB_MSB
        return value & 0xFF if state in (_LSB, _LSB_MSB) else value >> 8

    def write_byte(self, value: int, now: int) -> bool:
        """A byte of a count; True when the count is complete and loaded."""
        if self.write_state == _LSB_MSB:
            self.write_latch = value
            self.write_state = _MSB_OF_WORD
            return False
        if self.write_state == _MSB_OF_WORD:
            raw = self.write_latch | value << 8
            self.write_state = _LSB_MSB
        else:
            raw = value if self.write_state == _LSB else value << 8
        count = bcd_decode(raw) if self.bcd else raw
        self.count = count or (_BCD_RANGE if self.bcd else _BINARY_RANGE)
        self.load_ns = now
        return True

    def set_gate(self, level: bool, now: int) -> bool:
        """GATE changed; True when a rising edge restarted counting."""
        rising = level and not self.gate
        self.gate = level
        if rising and self.kind in (1, 2, 3, 5) and self.load_ns is not None:
            self.load_ns = now
            return True
        return False


class I8254:
    """The PIT device (4 ports, normally at 0x40); counter 0's OUT drives ``irq``."""

    __slots__ = ("_clock", "_counters", "_timer", "irq", "name")

    def __init__(self, clock: MachineClock, irq: IrqLine) -> None:
        self.name = "pit"
        self._clock = clock
        self.irq = irq
        now = clock.now_ns()
        self._counters = tuple(_Counter(now, gate=index != 2) for index in range(3))
        self._timer = clock.timer(self._update_irq, "pit-counter0")
        self._update_irq()

    def reset(self) -> None:
        now = self._clock.now_ns()
        for index, counter in enumerate(self._counters):
            counter.reset(now, gate=index != 2)
        self._update_irq()

    def _counter(self, channel: int) -> _Counter:
        if not isinstance(channel, int) or not 0 <= channel <= 2:
            raise PitError(f"PIT counter {channel!r} does not exist; there are counters 0-2")
        return self._counters[channel]

    def gate(self, channel: int) -> bool:
        return self._counter(channel).gate

    def set_gate(self, channel: int, level: bool) -> None:
        if self._counter(channel).set_gate(bool(level), self._clock.now_ns()) and channel == 0:
            self._update_irq()

    def output(self, channel: int) -> bool:
        """The counter's OUT pin now."""
        return self._counter(channel).out(self._clock.now_ns())

    def _update_irq(self) -> None:
        """Drive IRQ 0 from counter 0's OUT and arm the timer for its next change."""
        now = self._clock.now_ns()
        counter = self._counters[0]
        self.irq.set_level(counter.out(now))
        edge = counter.next_edge(now)
        if edge is None:
            self._timer.cancel()
        else:
            self._timer.arm(edge)

    # -- guest access ------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        now = self._clock.now_ns()
        return bytes(self._read_port(offset + i, now) for i in range(size))

    def _read_port(self, port: int, now: int) -> int:
        if port == 3:
            return 0
        if 0 <= port < 3:
            return self._counters[port].read_byte(now)
        return 0xFF

    def write(self, offset: int, data: bytes) -> None:
        now = self._clock.now_ns()
        for i, value in enumerate(data):
            port = offset + i
            if port == 3:
                self._control(value, now)
            elif 0 <= port < 3 and self._counters[port].write_byte(value, now) and port == 0:
                self._update_irq()

    def _control(self, value: int, now: int) -> None:
        select = value >> 6
        if select == _READ_BACK:
            for index, counter in enumerate(self._counters):
                if value & (2 << index):
                    if not value & _READ_BACK_NO_COUNT:
                        counter.latch(now)
                    if not value & _READ_BACK_NO_STATUS:
                        counter.latch_status(now)
            return
        counter = self._counters[select]
        if (value >> 4) & 3 == _LATCH:
            counter.latch(now)
            return
        counter.program(value, now)
        if select == 0:
            self._update_irq()


class PcSpeaker:
    """Port 0x61 as QEMU's ``pcspk`` answers it (PIIX4's NMI status and control register).

    Writes: bit 0 is counter 2's GATE, bit 1 the speaker data enable. Reads: bit 0
    GATE, bit 1 speaker data, bit 4 the refresh toggle (QEMU flips it on every read,
    which is what BIOS and kernel delay loops that wait for it to change need), bit 5
    counter 2's OUT; the NMI enables (bits 2-3) and NMI sources (bits 6-7) read 0.
    No sound is produced.
    """

    __slots__ = ("_pit", "_refresh", "name", "speaker_data")

    def __init__(self, pit: I8254) -> None:
        self.name = "pcspk"
        self._pit = pit
        self._refresh = False
        self.speaker_data = False

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self._read_port() if offset + i == 0 else 0xFF for i in range(size))

    def _read_port(self) -> int:
        self._refresh = not self._refresh
        return (
            self._pit.gate(2)
            | self.speaker_data << 1
            | self._refresh << 4
            | self._pit.output(2) << 5
        )

    def write(self, offset: int, data: bytes) -> None:
        for i, value in enumerate(data):
            if offset + i == 0:
                self.speaker_data = bool(value & 2)
                self._pit.set_gate(2, bool(value & 1))
