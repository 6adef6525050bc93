"""The local APIC timer: one-shot, periodic and TSC-deadline, counted on the machine clock.

The timer counts down the initial count (0x380) at the APIC bus clock divided by the
divide configuration (0x3E0). KVM's APIC bus runs at 1 GHz (``apic_bus_cycle_ns`` = 1
in arch/x86/kvm/lapic.c, ``tmict_to_ns``), and OVMF relies on exactly that:
OvmfPkgX64.dsc sets ``PcdFSBClock`` to 1000000000, and LocalApicTimerDxe programs a
periodic timer, divide by 1, with ``TimerPeriod * PcdFSBClock / 10^7`` counts (10 ms
for its 100 000 x 100 ns default), on vector 32.

Nothing here polls: the next expiry is a :class:`~sevsim.vmm.clock.Timer` on the
machine clock, and the current count (0x390) is computed from the clock when it is
read. A periodic timer re-arms from its previous deadline, not from "now", so it does
not drift. As KVM does (``limit_periodic_timer_frequency``), a periodic timer fires
at most every 200 us, so a guest cannot make the host spin on an initial count of 1.

In TSC-deadline mode (LVT timer bits 18:17 = 10b, only when the vCPU's CPUID offers
it, i.e. a TSC frequency was given) the guest writes an absolute TSC value to
IA32_TSC_DEADLINE; the guest TSC counts ``tsc_hz`` ticks per second of machine time
from 0 at machine creation. The MSR reads 0 once the deadline has passed, and reads 0
and ignores writes in the other modes (KVM's ``kvm_get/set_lapic_tscdeadline_msr``).
"""

from __future__ import annotations

from collections.abc import Callable
from enum import IntEnum

from sevsim.vmm.clock import MachineClock

#: One APIC bus cycle: KVM's default APIC bus frequency, 1 GHz.
APIC_BUS_CYCLE_NS = 1
#: KVM's ``min_timer_period_us`` default: the shortest period a periodic timer fires at.
MIN_PERIODIC_NS = 200_000
#: Writable bits of the divide configuration register (bits 0, 1 and 3).
DCR_MASK = 0xB
NS_PER_S = 1_000_000_000


class TimerMode(IntEnum):
    """LVT timer bits 18:17."""

    ONE_SHOT = 0
    PERIODIC = 1
    TSC_DEADLINE = 2
    RESERVED = 3


def divisor(dcr: int) -> int:
    """The divide value a DCR encodes: bits 3,1,0 = 000 -> 2, 001 -> 4 ... 110 -> 128, 111 -> 1."""
    code = (dcr & 3) | ((dcr & 8) >> 1)
    return 1 << ((code + 1) & 7)


class ApicTimer:
    """The counter behind LVT timer, initial count, current count, divide config and
    IA32_TSC_DEADLINE; ``expired`` is called at each expiry (the LAPIC then delivers
    the LVT timer entry, unless it is masked: masking never stops the count)."""

    __slots__ = (
        "_clock",
        "_dcr",
        "_expired",
        "_initial",
        "_mode",
        "_target",
        "_timer",
        "_tsc_deadline",
        "tsc_hz",
    )

    def __init__(
        self,
        clock: MachineClock,
        expired: Callable[[], None],
        *,
        tsc_hz: int | None,
        name: str,
    ) -> None:
        self._clock = clock
        self._expired = expired
        #: Guest TSC frequency; None when CPUID does not offer TSC-deadline mode.
        self.tsc_hz = tsc_hz
        self._timer = clock.timer(self._fire, name)
        self._mode = TimerMode.ONE_SHOT
        self._initial = 0
        self._dcr = 0
        #: The next expiry (ns) in one-shot/periodic mode, None when not counting.
        self._target: int | None = None
        self._tsc_deadline = 0

    def reset(self) -> None:
        """The RESET/INIT state: stopped, one-shot, count 0, divide by 2."""
        self._stop()
        self._mode = TimerMode.ONE_SHOT
        self._initial = 0
        self._dcr = 0

    @property
    def mode(self) -> TimerMode:
        return self._mode

    @property
    def mode_mask(self) -> int:
        """The LVT timer mode bits the guest may set (bit 18 only with TSC-deadline)."""
        return (3 if self.tsc_hz is not None else 1) << 17

    def set_mode(self, mode: TimerMode) -> None:
        """An LVT timer write changed bits 18:17. Entering or leaving TSC-deadline
        mode stops the timer and clears the initial count (``apic_update_lvtt``);
        one-shot <-> periodic takes effect at the next expiry."""
        if (mode is TimerMode.TSC_DEADLINE) != (self._mode is TimerMode.TSC_DEADLINE):
            self._stop()
            self._initial = 0
        self._mode = mode

    @property
    def initial_count(self) -> int:
        return self._initial

    @property
    def divide_config(self) -> int:
        return self._dcr

    def _tick_ns(self) -> int:
        return APIC_BUS_CYCLE_NS * divisor(self._dcr)

    def _interval_ns(self) -> int:
        """Time from one expiry to the next."""
        period = self._initial * self._tick_ns()
        if self._mode is TimerMode.PERIODIC:
            return max(period, MIN_PERIODIC_NS)
        return period

    def write_initial_count(self, count: int) -> None:
        """Start counting down from ``count`` (0 stops the timer); ignored in
        TSC-deadline mode."""
        if self._mode is TimerMode.TSC_DEADLINE:
            return
        self._stop()
        self._initial = count & 0xFFFF_FFFF
        if self._initial and self._mode in (TimerMode.ONE_SHOT, TimerMode.PERIODIC):
            self._arm(self._clock.now_ns() + self._interval_ns())

    def write_divide_config(self, dcr: int) -> None:
        """A new divider scales the time left to the next expiry, as KVM's
        ``update_target_expiration`` does; later periods use the new divider."""
        old = divisor(self._dcr)
        self._dcr = dcr & DCR_MASK
        new = divisor(self._dcr)
        if new != old and self._target is not None:
            now = self._clock.now_ns()
            left = max(0, self._target - now)
            self._arm(now + left * new // old)

    def current_count(self) -> int:
        """The count now: what is left of this period in bus ticks (rounded up, so it
        reads the initial count at the start of a period and 0 once a one-shot
        expired); always 0 in TSC-deadline mode."""
        if self._target is None or self._mode not in (TimerMode.ONE_SHOT, TimerMode.PERIODIC):
            return 0
        left = max(0, self._target - self._clock.now_ns())
        return min(self._initial, -(-left // self._tick_ns()))

    @property
    def tsc_deadline(self) -> int:
        """IA32_TSC_DEADLINE as the guest reads it."""
        return self._tsc_deadline if self._mode is TimerMode.TSC_DEADLINE else 0

    def write_tsc_deadline(self, value: int) -> None:
        """Arm (or, with 0, disarm) the deadline; a deadline already passed fires now."""
        if self._mode is not TimerMode.TSC_DEADLINE or self.tsc_hz is None:
            return
        self._stop()
        self._tsc_deadline = value & 0xFFFF_FFFF_FFFF_FFFF
        if not self._tsc_deadline:
            return
        # The first instant at which now_ns * tsc_hz // 10^9 >= deadline.
        due = -(-self._tsc_deadline * NS_PER_S // self.tsc_hz)
        if due <= self._clock.now_ns():
            self._tsc_deadline = 0
            self._expired()
        else:
            self._timer.arm(due)

    def _arm(self, deadline: int) -> None:
        self._target = deadline
        self._timer.arm(deadline)

    def _stop(self) -> None:
        self._timer.cancel()
        self._target = None
        self._tsc_deadline = 0

    def _fire(self) -> None:
        if self._mode is TimerMode.PERIODIC and self._target is not None and self._initial:
            self._arm(self._target + self._interval_ns())
        else:
            self._target = None
            self._tsc_deadline = 0
        self._expired()
