"""The fuzzing campaign: generate, run, compare, keep a reproducer of what went wrong.

``python -m fuzz.campaign --seconds 60 --seed 1 --era newest --out findings`` runs
cases for a minute, prints a summary (cases per second, disagreements, host
exceptions, hangs, plugin failures, simulator faults) and exits 1 if it found
anything. Each finding is written to ``--out`` as JSON with the line that replays it:
``python -m fuzz.campaign --replay findings/<file>.json``.

Every case runs on a VM of its own, destroyed afterwards, so a case is reproducible
alone and a long campaign's memory stays flat (the campaign watches its RSS and stops
with a finding if it grows past ``--max-rss-mb``). A case that runs longer than
``--case-timeout`` is stopped and reported as a hang: nothing a guest sends may keep
the host busy.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from multiprocessing import get_context
from pathlib import Path
from types import FrameType

from attrs import define, evolve, field, frozen

from fuzz import execute, generate
from fuzz.cases import AnyCase, CodeCase, case_from_json
from fuzz.coverage import Coverage
from fuzz.oracle import ERAS, NEWEST
from sevsim.kvm.extensions import Extensions

KINDS = ("disagreement", "plugin-failure", "exception", "hang", "simulator-fault", "memory")
#: Reproducers written per distinct finding; the rest are only counted.
REPRODUCERS_PER_SIGNATURE = 3
_PAGE = os.sysconf("SC_PAGE_SIZE")


class CaseTimeout(BaseException):
    """A case ran past its time limit. A BaseException, so that kvm's containment of
    plugin faults (which catches Exception) lets it through instead of blaming the
    plugin that happened to be running."""


@frozen
class Config:
    era: str = NEWEST
    seed: int = 0
    #: Stop after this long, or after this many cases (whichever comes first).
    seconds: float | None = 60.0
    cases: int | None = None
    #: Where reproducers go (None: nowhere).
    out: Path | None = None
    #: Every n-th exit case goes through a guest (0: never).
    guest_every: int = 25
    #: Every n-th case is random guest code (0: never).
    code_every: int = 50
    case_timeout: float = 5.0
    max_rss_mb: int = 2048
    #: Which worker of a parallel campaign this is (its cases come from its own seed).
    worker: int = 0
    #: Stop once the cases made this many exits (None: no such limit).
    exits: int | None = None


DEFAULTS = Config()


@frozen
class Finding:
    kind: str
    case: AnyCase | None
    detail: str

    @property
    def signature(self) -> str:
        """What makes two findings the same bug: the kind and the first line of detail
        (the oracle's rule and which checks failed, or the exception's type and place)."""
        return f"{self.kind}: {self.detail.splitlines()[0]}"


@define
class Summary:
    config: Config
    seconds: float = 0.0
    counts: Counter[str] = field(factory=Counter)
    findings: list[Finding] = field(factory=list)
    #: Signature -> the reproducer files written for it.
    reproducers: dict[str, list[str]] = field(factory=dict)
    peak_rss_mb: float = 0.0
    coverage: Coverage = field(factory=Coverage)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def merge(self, other: Summary) -> None:
        self.seconds = max(self.seconds, other.seconds)
        self.counts.update(other.counts)
        self.findings += other.findings
        for signature, files in other.reproducers.items():
            self.reproducers.setdefault(signature, []).extend(files)
        self.peak_rss_mb = max(self.peak_rss_mb, other.peak_rss_mb)
        self.coverage.merge(other.coverage)

    def report(self) -> str:
        c = self.config
        rate = self.total / self.seconds if self.seconds else 0.0
        by_kind = Counter(f.kind for f in self.findings)
        lines = [
            f"sevsim fuzz campaign: era {c.era}, seed {c.seed}, {self.seconds:.1f} s",
            f"  {self.total} cases ({rate:.1f}/s): {self.counts['driver']} through ExitDriver, "
            f"{self.counts['guest']} in guests, {self.counts['code']} random programs",
            f"  {self.coverage.exits} exits judged by the oracle "
            f"({self.coverage.exits / self.seconds if self.seconds else 0.0:.1f}/s)",
            *self.coverage.report(),
            "  findings: " + ", ".join(f"{by_kind[k]} {k}" for k in KINDS),
            f"  peak RSS {self.peak_rss_mb:.0f} MiB",
        ]
        seen = Counter(f.signature for f in self.findings)
        for signature, count in seen.most_common():
            lines.append(f"  {count} x {signature}")
            lines += [f"      replay: {replay_command(Path(p))}"
                      for p in self.reproducers.get(signature, [])]  # fmt: skip
        return "\n".join(lines)


def replay_command(path: Path) -> str:
    return f"python -m fuzz.campaign --replay {path}"


# -- one case ------------------------------------------------------------------------------------


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE / 2**20


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`CaseTimeout` in this thread after ``seconds`` (the main thread
    only, where signals arrive; elsewhere the guest runs' own timeouts bound it)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: FrameType | None) -> None:
        raise CaseTimeout(f"the case ran longer than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _exception(case: AnyCase, exc: BaseException) -> Finding:
    where = traceback.extract_tb(exc.__traceback__)
    at = f" at {where[-1].filename}:{where[-1].lineno}" if where else ""
    return Finding("exception", case, f"{type(exc).__name__}{at}\n{exc}")


def _code_kind(problem: str) -> str:
    return "plugin-failure" if problem.startswith("plugin") else "simulator-fault"


def check(
    case: AnyCase, table: Extensions, timeout: float = DEFAULTS.case_timeout,
    coverage: Coverage | None = None,
) -> tuple[list[Finding], str]:
    """Run one case; what it found, and the step results or problems in words. The
    exits it made are counted in ``coverage``, if given."""
    try:
        with time_limit(timeout):
            if isinstance(case, CodeCase):
                problems = execute.run_code(case, table)
                return [Finding(_code_kind(p), case, p) for p in problems], "\n".join(problems)
            results = execute.run_case(case, table)
    except CaseTimeout as exc:
        return [Finding("hang", case, str(exc))], str(exc)
    except Exception as exc:  # a host exception: the finding this campaign exists for
        return [_exception(case, exc)], traceback.format_exc()
    if coverage is not None:
        coverage.record(results)
    findings = []
    for result in results:
        if result.problems:
            kind = "plugin-failure" if result.observed.plugin else "disagreement"
            checks = ", ".join(sorted({p.split(":")[0] for p in result.problems}))
            findings.append(Finding(kind, case, f"{result.expected.rule} ({checks})\n"
                                    + result.describe()))  # fmt: skip
    return findings, "\n".join(r.describe() for r in results)


# -- the campaign ----------------------------------------------------------------------------------


def _cases(config: Config) -> Iterator[AnyCase]:
    """The campaign's cases, in order, from its seed alone."""
    draw = generate.RandomDraw(random.Random(f"{config.seed}:{config.worker}"))
    exits = 0
    for index in range(sys.maxsize):
        if config.code_every and index % config.code_every == config.code_every - 1:
            yield generate.code_case(draw, config.era)
            continue
        case = generate.case(draw, config.era)
        exits += 1
        guest = config.guest_every and exits % config.guest_every == 0
        yield case.with_path("guest") if guest and execute.guest_eligible(case) else case


def _write(config: Config, summary: Summary, finding: Finding) -> None:
    files = summary.reproducers.setdefault(finding.signature, [])
    if config.out is None or finding.case is None or len(files) >= REPRODUCERS_PER_SIGNATURE:
        return
    config.out.mkdir(parents=True, exist_ok=True)
    number = sum(len(f) for f in summary.reproducers.values()) + 1
    path = config.out / f"{finding.kind}-w{config.worker}-{number:04d}.json"
    path.write_text(json.dumps({
        "kind": finding.kind, "detail": finding.detail, "replay": replay_command(path),
        "case": finding.case.to_json(),
    }, indent=1) + "\n")  # fmt: skip
    files.append(str(path))


def run(config: Config, table: Extensions | None = None) -> Summary:
    """Run the campaign ``config`` describes; ``table`` defaults to sevsim's full
    hypervisor, started now."""
    table = table if table is not None else execute.kvm_table()
    summary = Summary(config)
    start = time.monotonic()
    for index, case in enumerate(_cases(config)):
        elapsed = time.monotonic() - start
        if (config.cases is not None and index >= config.cases) or (
                config.seconds is not None and elapsed >= config.seconds) or (
                config.exits is not None and summary.coverage.exits >= config.exits):  # fmt: skip
            break
        path = "code" if isinstance(case, CodeCase) else case.path
        summary.counts[path] += 1
        findings, _ = check(case, table, config.case_timeout, summary.coverage)
        for finding in findings:
            summary.findings.append(finding)
            _write(config, summary, finding)
        if index % 100 == 0:
            rss = _rss_mb()
            summary.peak_rss_mb = max(summary.peak_rss_mb, rss)
            if rss > config.max_rss_mb:
                summary.findings.append(Finding("memory", None, f"RSS {rss:.0f} MiB after "
                                                f"{index} cases passed {config.max_rss_mb} MiB"))
                break
    summary.seconds = time.monotonic() - start
    return summary


def run_parallel(config: Config, workers: int) -> Summary:
    """``workers`` processes, each on its own seed stream, merged into one summary."""
    if workers <= 1:
        return run(config)
    configs = [evolve(config, worker=i) for i in range(workers)]
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        parts = list(pool.map(run, configs))
    total = Summary(config)
    for part in parts:
        total.merge(part)
    return total


# -- replay and the command line -----------------------------------------------------------------


def replay(path: Path, table: Extensions | None = None) -> tuple[int, str]:
    """Run a reproducer's case again: (1 if it still finds something else 0, the report)."""
    data = json.loads(path.read_text())
    case = case_from_json(data.get("case", data))
    findings, text = check(case, table if table is not None else execute.kvm_table())
    verdict = "\n".join(f"FOUND {f.kind}: {f.detail.splitlines()[0]}" for f in findings)
    return (1 if findings else 0), f"{text}\n{verdict or 'agrees with the oracle'}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fuzz.campaign",
        description="Fuzz sevsim's VMGEXIT handling against an independent oracle of KVM.",
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="run this long (60)")
    parser.add_argument("--cases", type=int, help="stop after this many cases (deterministic)")
    parser.add_argument("--exits", type=int,
                        help="stop once the cases made this many exits (per worker)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--era", choices=ERAS, default=NEWEST)
    parser.add_argument("--out", type=Path, default=Path("fuzz-findings"),
                        help="where reproducers go (fuzz-findings)")  # fmt: skip
    parser.add_argument("--workers", type=int, default=1, help="processes, one seed stream each")
    parser.add_argument("--guest-every", type=int, default=DEFAULTS.guest_every, metavar="N",
                        help="send every N-th case from a real guest (0: never)")  # fmt: skip
    parser.add_argument("--code-every", type=int, default=DEFAULTS.code_every, metavar="N",
                        help="make every N-th case random guest code (0: never)")  # fmt: skip
    parser.add_argument("--case-timeout", type=float, default=DEFAULTS.case_timeout)
    parser.add_argument("--max-rss-mb", type=int, default=DEFAULTS.max_rss_mb)
    parser.add_argument("--replay", type=Path, metavar="FILE", help="run one reproducer again")
    args = parser.parse_args(argv)
    if args.replay is not None:
        status, text = replay(args.replay)
        print(text)
        return status
    if args.seconds <= 0 or args.workers < 1 or any(
            n is not None and n <= 0 for n in (args.cases, args.exits)):  # fmt: skip
        parser.error("--seconds, --cases, --exits and --workers must be positive")
    config = Config(args.era, args.seed, args.seconds, args.cases, args.out, args.guest_every,
                    args.code_every, args.case_timeout, args.max_rss_mb,
                    exits=args.exits)  # fmt: skip
    summary = run_parallel(config, args.workers)
    print(summary.report())
    return 1 if summary.findings else 0


if __name__ == "__main__":
    sys.exit(main())
