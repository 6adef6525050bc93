"""A trace in numbers, like ``perf kvm stat report``: exits by code, by plugin, by vCPU.

:func:`summarize` reads the events of a trace file (:func:`sevsim.trace_jsonl.read_trace`)
in one pass and keeps only counters, so a long trace costs no memory. Times are
differences between two events of the same vCPU (docs/trace-format.md, "Summaries"):

- an *exit* opens at ``vmexit``. For a VMGEXIT, the ``vmgexit_enter`` or
  ``msr_protocol_enter`` that follows names what the guest asked for (the GHCB's
  ``exit_reason``, or the MSR protocol's GHCBInfo), and the exit is counted under that
  name; in a trace filtered without ``vmexit`` events, those two open the exit. It
  closes at ``vmgexit_exit`` (sent at the next VMRUN, so its time includes whatever
  userspace did before resuming the vCPU), at ``msr_protocol_exit``, or, for an
  automatic exit that a plugin handles (a CR write trap), at its ``exit_handled``.
  An exit that never closes (it ended the run, terminated the guest, or the filter
  dropped its end) is counted but not timed: means are over the *timed* exits;
- a *handler call* lasts from the event that handed the exit over (``vmgexit_enter``,
  ``msr_protocol_enter``, or ``vmexit`` for an automatic exit) to ``exit_handled``.

Wall times come from ``wall_ns``; guest times from ``guest_ns`` when both events
carry one (a trace written with a guest clock).
"""

from __future__ import annotations

import heapq
import json
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
from attrs import define, frozen

from sevsim.arch.exits import SvmExit
from sevsim.kvm.dispatch import ExitKind
from sevsim.trace_schema import VCPU_FIELDS, first_of

Event = Mapping[str, Any]
#: (wall_ns, guest_ns) of an event.
Stamp = tuple[int, int | None]


@frozen
class Row:
    """One line of a table: what was counted, how often, and the summed time of the
    ``timed`` ones (``guest_ns`` None when no guest time was recorded)."""

    key: str
    count: int
    timed: int = 0
    wall_ns: int = 0
    guest_ns: int | None = None


@frozen
class HandlerCall:
    """One call of a plugin's exit handler; ``seq`` is its ``exit_handled`` event's."""

    seq: int
    vcpu: Any
    plugin: str
    code: str
    wall_ns: int
    guest_ns: int | None


@frozen
class ExitSpan:
    """One exit of a vCPU from the event that opened it (``seq``, at ``start_ns``);
    ``wall_ns`` and ``guest_ns`` are None for an exit that never closed."""

    seq: int
    vcpu: Any
    code: str
    plugin: str | None
    start_ns: int
    wall_ns: int | None
    guest_ns: int | None


def format_ns(ns: float | None) -> str:
    """A duration for people: ``850 ns``, ``12.30 us``, ``4.56 ms``, ``1.20 s``; ``-`` for none."""
    if ns is None:
        return "-"
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("us", 1e3)):
        if ns >= scale:
            return f"{ns / scale:.2f} {unit}"
    return f"{ns:.0f} ns"


def _mean(total: int | None, n: int) -> float | None:
    return total / n if total is not None and n else None


def _looks_numeric(text: str) -> bool:
    return text[:1].isdigit() or text == "-"


@frozen
class Table:
    """A table of text cells, the same for the terminal and the HTML report; ``name``
    identifies it (``exits``, ``plugins``, ``vcpus``, ``vcs``, ``events``, ``slowest``)."""

    name: str
    title: str
    head: tuple[str, ...]
    body: tuple[tuple[str, ...], ...]

    def numeric(self, column: int) -> bool:
        """Whether a column holds numbers (aligned right)."""
        return bool(self.body) and all(_looks_numeric(row[column]) for row in self.body)

    def lines(self) -> list[str]:
        """The title, then the columns aligned, two spaces apart."""
        widths = [max(map(len, column)) for column in zip(self.head, *self.body, strict=True)]
        right = [self.numeric(i) for i in range(len(self.head))]

        def line(cells: tuple[str, ...]) -> str:
            aligned = (cell.rjust(width) if r else cell.ljust(width)
                       for cell, width, r in zip(cells, widths, right, strict=True))  # fmt: skip
            return "  ".join(aligned).rstrip()

        return [self.title, *map(line, (self.head, *self.body))]


def _rows_table(name: str, title: str, key: str, rows: tuple[Row, ...], *, timed: bool,
                guest: bool) -> Table:  # fmt: skip
    """Count and share of the table's total; with ``timed``, how many were timed,
    their total and mean time (wall, then guest)."""
    total = sum(row.count for row in rows) or 1
    head = [key, "count", "%"]
    if timed:
        head += ["timed", "total", "mean"] + (["guest total", "guest mean"] if guest else [])
    body = []
    for row in rows:
        cells = [row.key, str(row.count), f"{100 * row.count / total:.2f}"]
        if timed:
            wall = row.wall_ns if row.timed else None
            cells += [str(row.timed), format_ns(wall), format_ns(_mean(wall, row.timed))]
        if timed and guest:
            cells += [format_ns(row.guest_ns), format_ns(_mean(row.guest_ns, row.timed))]
        body.append(tuple(cells))
    return Table(name, title, tuple(head), tuple(body))


@frozen
class TraceSummary:
    """What :func:`summarize` found: tables of :class:`Row` and the slowest handler calls."""

    events: int
    #: ``wall_ns`` of the first and last event (None for an empty trace).
    first_ns: int | None
    last_ns: int | None
    #: Whether the trace carries guest time (``guest_ns``).
    guest_clock: bool
    by_event: tuple[Row, ...]
    exits: tuple[Row, ...]
    plugins: tuple[Row, ...]
    vcpus: tuple[Row, ...]
    #: #VCs the guest took, by exit code (the simulator's ``sim_vc``).
    vcs: tuple[Row, ...]
    slowest: tuple[HandlerCall, ...]

    @property
    def span_ns(self) -> int | None:
        """Wall time from the first event to the last."""
        if self.first_ns is None or self.last_ns is None:
            return None
        return self.last_ns - self.first_ns

    def headline(self) -> str:
        """One line: how many events and exits, over how much time."""
        exits = sum(row.count for row in self.exits)
        return (f"{self.events} events, {exits} exits, {format_ns(self.span_ns)} of wall time"
                f"{', with guest time' if self.guest_clock else ''}")  # fmt: skip

    def tables(self) -> list[Table]:
        """Every table of the summary that has rows, in the order they are shown."""
        guest = self.guest_clock
        tables = [
            _rows_table("exits", "Exits by code (exit time)", "exit code", self.exits,
                        timed=True, guest=guest),
            _rows_table("plugins", "Handler calls by plugin (handler time)", "plugin",
                        self.plugins, timed=True, guest=guest),
            _rows_table("vcpus", "Exits by vCPU (exit time)", "vCPU", self.vcpus, timed=True,
                        guest=guest),
            _rows_table("vcs", "#VCs the guest took, by code", "exit code", self.vcs,
                        timed=False, guest=guest),
            _rows_table("events", "Events", "event", self.by_event, timed=False, guest=guest),
            self._slowest_table(),
        ]  # fmt: skip
        return [table for table in tables if table.body]

    def _slowest_table(self) -> Table:
        guest = self.guest_clock
        head = ("plugin", "exit code", "wall") + (("guest",) if guest else ()) + ("vCPU", "seq")
        body = tuple((c.plugin, c.code, format_ns(c.wall_ns))
                     + ((format_ns(c.guest_ns),) if guest else ()) + (str(c.vcpu), str(c.seq))
                     for c in self.slowest)  # fmt: skip
        return Table("slowest", f"Slowest handler calls (top {len(body)})", head, body)

    def render(self) -> str:
        """The headline and the tables as aligned text, for a terminal."""
        out = [self.headline()]
        for table in self.tables():
            out += ["", *table.lines()]
        return "\n".join(out)

    def to_json(self) -> str:
        """The summary as a JSON document (the same fields as the attributes)."""
        return json.dumps(attrs.asdict(self), indent=2)


@define
class _Tally:
    count: int = 0
    timed: int = 0
    wall_ns: int = 0
    guest_ns: int | None = None

    def add(self, wall: int | None, guest: int | None) -> None:
        self.count += 1
        if wall is None:
            return
        self.timed += 1
        self.wall_ns += wall
        if guest is not None:
            self.guest_ns = (self.guest_ns or 0) + guest

    def row(self, key: str) -> Row:
        return Row(key, self.count, self.timed, self.wall_ns, self.guest_ns)


@define
class _Open:
    """An exit of one vCPU that has not closed yet."""

    seq: int
    code: str
    start: Stamp
    handler_start: Stamp
    #: A VMGEXIT whose request (``vmgexit_enter``/``msr_protocol_enter``) is still to come.
    unnamed: bool
    plugin: str | None = None


def _stamp(event: Event) -> Stamp:
    return event["wall_ns"], event.get("guest_ns")


def _delta(start: Stamp, end: Stamp) -> Stamp:
    guest = end[1] - start[1] if end[1] is not None and start[1] is not None else None
    return end[0] - start[0], guest


def _code(event: Event) -> str:
    return str(event.get("exit_name", "unknown"))


def _by_count(tally: Mapping[str, _Tally]) -> tuple[Row, ...]:
    return tuple(t.row(k) for k, t in sorted(tally.items(), key=lambda kt: (-kt[1].count, kt[0])))


def vcpu_order(vcpu: Any) -> tuple[int, int, str]:
    """Sort key: vCPU indexes in numeric order, anything else after them."""
    return (0, vcpu, "") if isinstance(vcpu, int) else (1, 0, str(vcpu))


class SummaryBuilder:
    """Takes events one at a time (:meth:`add`) and makes a :class:`TraceSummary`.

    ``on_exit`` is called with each :class:`ExitSpan` as it closes (the report draws
    its timeline from them); ``top`` is how many of the slowest handler calls to keep.
    """

    def __init__(self, top: int = 10, on_exit: Callable[[ExitSpan], None] | None = None) -> None:
        self._top = top
        self._on_exit = on_exit
        self._events: Counter[str] = Counter()
        self._first: int | None = None
        self._last: int | None = None
        self._guest = False
        self._open: dict[Any, _Open] = {}
        self._exits: defaultdict[str, _Tally] = defaultdict(_Tally)
        self._plugins: defaultdict[str, _Tally] = defaultdict(_Tally)
        self._vcpus: defaultdict[Any, _Tally] = defaultdict(_Tally)
        self._vcs: defaultdict[str, _Tally] = defaultdict(_Tally)
        #: A min-heap of (wall_ns, seq, call): the slowest ``top`` handler calls so far.
        self._slowest: list[tuple[int, int, HandlerCall]] = []
        self._on: dict[str, Callable[[Any, Event], None]] = {
            "vmexit": self._vmexit, "vmgexit_enter": self._enter,
            "msr_protocol_enter": self._enter, "exit_handled": self._handled,
            "vmgexit_exit": self._close, "msr_protocol_exit": self._close,
            "sim_vc": lambda vcpu, event: self._vcs[_code(event)].add(None, None),
        }  # fmt: skip

    def add(self, event: Event) -> None:
        name, wall = event["event"], event["wall_ns"]
        self._events[name] += 1
        if self._first is None or wall < self._first:
            self._first = wall
        if self._last is None or wall > self._last:
            self._last = wall
        if not self._guest and "guest_ns" in event:
            self._guest = True
        on = self._on.get(name)
        if on is not None:
            on(first_of(event, VCPU_FIELDS), event)

    def _vmexit(self, vcpu: Any, event: Event) -> None:
        self._close(vcpu, None)
        unnamed = event.get("exit_code") == SvmExit.VMGEXIT
        self._open[vcpu] = _Open(event["seq"], _code(event), _stamp(event), _stamp(event), unnamed)

    def _enter(self, vcpu: Any, event: Event) -> None:
        exit_ = self._open.get(vcpu)
        if exit_ is None or not exit_.unnamed:
            self._close(vcpu, None)
            stamp = _stamp(event)
            self._open[vcpu] = _Open(event["seq"], _code(event), stamp, stamp, unnamed=False)
            return
        exit_.code, exit_.handler_start, exit_.unnamed = _code(event), _stamp(event), False

    def _handled(self, vcpu: Any, event: Event) -> None:
        plugin = str(event.get("plugin"))
        exit_ = self._open.get(vcpu)
        if exit_ is None:
            self._plugins[plugin].add(None, None)
            return
        wall, guest = _delta(exit_.handler_start, _stamp(event))
        self._plugins[plugin].add(wall, guest)
        exit_.plugin = plugin
        call = HandlerCall(event["seq"], vcpu, plugin, exit_.code, wall, guest)
        heapq.heappush(self._slowest, (wall, call.seq, call))
        if len(self._slowest) > self._top:
            heapq.heappop(self._slowest)
        if event.get("kind") == ExitKind.VMEXIT.value:
            self._close(vcpu, event)

    def _close(self, vcpu: Any, end: Event | None) -> None:
        exit_ = self._open.pop(vcpu, None)
        if exit_ is None:
            return
        wall, guest = _delta(exit_.start, _stamp(end)) if end is not None else (None, None)
        self._exits[exit_.code].add(wall, guest)
        self._vcpus[vcpu].add(wall, guest)
        if self._on_exit is not None:
            self._on_exit(ExitSpan(exit_.seq, vcpu, exit_.code, exit_.plugin, exit_.start[0],
                                   wall, guest))  # fmt: skip

    def finish(self) -> TraceSummary:
        """The summary of everything added; exits still open are counted untimed."""
        for vcpu in list(self._open):
            self._close(vcpu, None)
        events = {name: _Tally(count=n) for name, n in self._events.items()}
        return TraceSummary(
            events=sum(self._events.values()),
            first_ns=self._first,
            last_ns=self._last,
            guest_clock=self._guest,
            by_event=_by_count(events),
            exits=_by_count(self._exits),
            plugins=_by_count(self._plugins),
            vcpus=tuple(
                self._vcpus[v].row(f"vCPU {v}") for v in sorted(self._vcpus, key=vcpu_order)
            ),
            vcs=_by_count(self._vcs),
            slowest=tuple(call for _, _, call in sorted(self._slowest, reverse=True)),
        )


def summarize(events: Iterable[Event], top: int = 10) -> TraceSummary:
    """The summary of a trace's events (as :func:`~sevsim.trace_jsonl.read_trace`
    yields them), with the ``top`` slowest handler calls."""
    builder = SummaryBuilder(top)
    for event in events:
        builder.add(event)
    return builder.finish()
