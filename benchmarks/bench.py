"""sevsim's benchmarks, each beside its fair floor measured in the same run.

    python -m benchmarks.bench            (or: make bench; BENCH_QUICK=1 for a short run)

Prints one table row per line as it is measured: what is measured, sevsim's number,
the floor's, their ratio, the goal and whether it is met. The floors do the same
work with nothing of sevsim (bare Unicorn with the same image and the hooks and
stops the work needs; sev-snp-measure for the launch digest); docs/benchmarks.md
says what each line measures and why its floor is fair. Ratios, not absolute
numbers, are what to compare across machines.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from functools import partial

from attrs import evolve, frozen

from benchmarks import compute, guest_ram, new_code, out_roundtrip, ovmf_boot, ovmf_launch
from benchmarks.table import Row, format_row, header


@frozen
class Plan:
    """How long each benchmark runs: the full run, or BENCH_QUICK's short one."""

    repeat: int
    round_trips: int
    iterations: int
    shell_cap_s: float

    @classmethod
    def choose(cls, quick: bool, shell_cap_s: float | None) -> Plan:
        plan = cls(3, 1_000, 20_000_000, 30.0) if quick else cls(7, 5_000, 20_000_000, 600.0)
        return plan if shell_cap_s is None else evolve(plan, shell_cap_s=shell_cap_s)

    def benchmarks(self) -> dict[str, Callable[[], list[Row]]]:
        return {
            "out": partial(out_roundtrip.rows, self.round_trips, self.repeat),
            "compute": partial(compute.rows, self.iterations, self.repeat),
            "new-code": partial(new_code.rows, (256, 1024, 4096), self.repeat // 2),
            "rss": guest_ram.rows,
            "launch": partial(ovmf_launch.rows, self.repeat * 3),
            "shell": partial(ovmf_boot.rows, self.shell_cap_s),
        }


def quick_from_env() -> bool:
    return os.environ.get("BENCH_QUICK", "") not in ("", "0")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", default=quick_from_env(),
                        help="fewer repetitions and a shorter Shell cap (BENCH_QUICK=1)")
    parser.add_argument("--shell-cap", type=float, metavar="SECONDS",
                        help="give up on reaching the UEFI Shell after this long "
                             "(default 600, quick 30)")  # fmt: skip
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="run only these lines: out compute new-code rss launch shell")
    args = parser.parse_args()
    benchmarks = Plan.choose(args.quick, args.shell_cap).benchmarks()
    unknown = set(args.only or ()) - set(benchmarks)
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(sorted(unknown))}; "
                     f"choose from {', '.join(benchmarks)}")  # fmt: skip
    start = time.perf_counter()
    print(header(), flush=True)
    for name, measure in benchmarks.items():
        if args.only and name not in args.only:
            continue
        for row in measure():
            print(format_row(row), flush=True)
    print(f"({'quick' if args.quick else 'full'} run, {time.perf_counter() - start:.0f} s; "
          f"python {sys.version.split()[0]})")


if __name__ == "__main__":
    main()
