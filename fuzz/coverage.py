"""What a campaign exercised: exit codes, oracle rules, replies and ends.

A campaign that finds nothing is only worth its coverage: zero disagreements over a
million exits that all hit the same rule would prove little. :class:`Coverage`
counts, for every exit a case made (each :class:`~fuzz.execute.StepResult`), the
request it carried (an MSR-protocol code, or the GHCB page's ``sw_exit_code``), the
reference rule the oracle judged it by, the reply kind the guest found in the GHCB
page or MSR, and how KVM_RUN ended. The names come from sevsim.arch, so the report
reads like REFERENCE.md; the counts come from what was observed, not from what the
generator meant to send.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from attrs import define, field

from fuzz.execute import StepResult
from fuzz.oracle import Errno
from sevsim.arch.exits import GhcbErr, exit_name
from sevsim.arch.ghcb import Ghcb
from sevsim.arch.ghcb_msr import GhcbMsr

#: The reply kinds of ``sw_exit_info_1`` (GHCB spec: 0 ok, 1 exception, 2 bad input).
_INFO1 = {0: "success", 1: "exception"}
#: The dimensions of a report, in print order.
DIMENSIONS = ("requests", "rules", "replies", "ends")
#: How many entries of a dimension a report names before it only counts the rest.
SHOWN = 12


def _msr_name(code: int) -> str:
    """A GHCBInfo code by its Linux name; unknown codes count as one kind."""
    try:
        return f"msr {GhcbMsr(code).linux_name}"
    except ValueError:
        return "msr unknown code"


def request_of(result: StepResult) -> str:
    """The request of one exit: an MSR-protocol code, or the page's sw_exit_code."""
    code = result.step.msr & 0xFFF
    if code:
        return _msr_name(code)
    sw = result.step.page.fields.get("sw_exit_code")
    if sw is None:
        return "ghcb without sw_exit_code"
    name = exit_name(sw)
    return "ghcb unknown code" if name.startswith("0x") else f"ghcb {name}"


def reply_of(result: StepResult) -> str:
    """What the guest found: the MSR response code, or the GHCB reply kind."""
    if result.expected.reply is None:
        return _msr_name(result.observed.msr & 0xFFF) if result.step.msr & 0xFFF else "none"
    page = Ghcb(result.observed.page)
    info1, info2 = page["sw_exit_info_1"] & 0xFFFF_FFFF, page["sw_exit_info_2"]
    if info1 == 2:
        try:
            return f"bad input {GhcbErr(info2).name}"
        except ValueError:
            return f"bad input {info2:#x}"
    return _INFO1.get(info1, f"info_1 {info1:#x}")


def end_of(result: StepResult) -> str:
    """How KVM_RUN ended, without the values (-EINVAL, SEV_TERM, resume, ...)."""
    end = result.observed.end
    if isinstance(end, Errno):
        return f"-{end.errno}"
    return str(end).split(" [")[0]


@define
class Coverage:
    """Counts per dimension (:data:`DIMENSIONS`); merged across a sharded campaign."""

    exits: int = 0
    counts: dict[str, Counter[str]] = field(factory=lambda: {d: Counter() for d in DIMENSIONS})

    def record(self, results: Iterable[StepResult]) -> None:
        for result in results:
            self.exits += 1
            self.counts["requests"][request_of(result)] += 1
            self.counts["rules"][result.expected.rule] += 1
            self.counts["replies"][reply_of(result)] += 1
            self.counts["ends"][end_of(result)] += 1

    def merge(self, other: Coverage) -> None:
        self.exits += other.exits
        for name in DIMENSIONS:
            self.counts[name].update(other.counts[name])

    def report(self, shown: int = SHOWN) -> list[str]:
        """One line per dimension with its distinct values, the most common first."""
        lines = [f"  coverage over {self.exits} exits:"]
        for name in DIMENSIONS:
            seen = self.counts[name]
            top = ", ".join(f"{key} {count}" for key, count in seen.most_common(shown))
            rest = f", and {len(seen) - shown} more" if len(seen) > shown else ""
            lines.append(f"    {len(seen)} {name}: {top}{rest}")
        return lines
