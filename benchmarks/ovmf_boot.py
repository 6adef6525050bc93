"""OVMF from the reset vector to the UEFI Shell, in each clock mode, 1 vCPU.

Debian's OVMF_CODE.fd (with a scratch copy of OVMF_VARS.fd) boots on sevsim's
``pc`` machine through the public API: :func:`sevsim.vmm.boot.launch_pc` then
:class:`sevsim.vmm.vmm.Vmm`. It has reached the Shell when the UART has printed
``Shell>``; the benchmark then powers the machine off, as a user would. The wall
time counts from the first KVM_RUN (the launch has its own line). A run that
does not get there within the cap is reported as such, not as an error: the row
says how far it got in exits and why it ended.

Each mode runs in a child process, so its peak RSS is that boot's alone and a
crash in one cannot take the table with it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from attrs import asdict, define, frozen

from benchmarks.ovmf import OVMF_CODE, OVMF_VARS, missing
from benchmarks.rss import peak_rss_mib
from benchmarks.table import Row, skipped
from sevsim.kvm.vm import Kvm
from sevsim.testing import isolated_host
from sevsim.vmm.boot import launch_pc
from sevsim.vmm.firmware import load_firmware
from sevsim.vmm.pc import PcConfig
from sevsim.vmm.pflash import VarsFile
from sevsim.vmm.power import PowerOffRequest
from sevsim.vmm.vmm import ClockMode, Vmm

PROMPT = b"Shell>"
FEATURES = ("msr_protocol", "ioio", "mmio", "crtraps", "apboot", "nmi")
GOAL_S = 30.0
ROOT = Path(__file__).resolve().parent.parent


@frozen
class Boot:
    """What one boot got to: ``shell_s`` is None if the Shell never came."""

    shell_s: float | None
    wall_s: float
    exits: int
    peak_rss_mib: float
    end: str


@define
class ShellWatch:
    """The UART's console: notes when ``Shell>`` first appears and ends the run."""

    vmm: Vmm
    start: float
    tail: bytes = b""
    shell_s: float | None = None
    exits: int = 0

    def output(self, data: bytes) -> None:
        if self.shell_s is not None:
            return
        seen = self.tail + data
        if PROMPT in seen:
            self.shell_s = time.perf_counter() - self.start
            self.exits = self.vmm.exits
            self.vmm.machine.requests.append(PowerOffRequest("benchmark: the Shell is up"))
        self.tail = seen[1 - len(PROMPT) :]


def boot(mode: ClockMode, cap_s: float) -> Boot:
    """Boot OVMF in ``mode`` until the Shell or ``cap_s`` seconds."""
    with tempfile.TemporaryDirectory() as scratch:
        vars_copy = VarsFile(shutil.copyfile(OVMF_VARS, Path(scratch) / OVMF_VARS.name))
        vm, machine = launch_pc(
            Kvm(), load_firmware(OVMF_CODE), PcConfig(vcpus=1), vars_store=vars_copy,
            vars_size=vars_copy.size, handlers=isolated_host(enable=FEATURES).start(),
        )  # fmt: skip
        vmm = Vmm(vm, machine, clock_mode=mode, timeout=cap_s)
        watch = ShellWatch(vmm, time.perf_counter())
        machine.uart.sink = watch.output
        end = vmm.run()
        wall = time.perf_counter() - watch.start
    exits = watch.exits if watch.shell_s is not None else vmm.exits
    return Boot(watch.shell_s, wall, exits, peak_rss_mib(), end.why)


def boot_in_child(mode: ClockMode, cap_s: float) -> Boot:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.ovmf_boot", mode.value, str(cap_s)],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return Boot(**json.loads(out))


def rows(cap_s: float, modes: tuple[ClockMode, ...] = (ClockMode.HOST, ClockMode.ICOUNT)
         ) -> list[Row]:  # fmt: skip
    out: list[Row] = []
    for mode in modes:
        what = f"OVMF reset to Shell, 1 vCPU, {mode.value} clock"
        why = missing(OVMF_CODE, OVMF_VARS)
        if why:
            out.append(skipped(what, f"< {GOAL_S:g} s", why))
            continue
        run = boot_in_child(mode, cap_s)
        seconds = run.shell_s if run.shell_s is not None else run.wall_s
        note = "" if run.shell_s is not None else (
            f"did not reach the Shell in {run.wall_s:.0f} s (cap {cap_s:g} s): {run.end}")
        out += [
            Row(what, "s wall", seconds, None, None, f"< {GOAL_S:g} s",
                run.shell_s is not None and run.shell_s < GOAL_S, note),
            Row(f"  exits per second ({mode.value} clock)", "exits/s", run.exits / seconds,
                None, None, "-", None, f"{run.exits:,} exits"),
            Row(f"  peak RSS ({mode.value} clock)", "MiB", run.peak_rss_mib, None, None, "-",
                None),
        ]  # fmt: skip
    return out


def main() -> None:
    run = boot(ClockMode(sys.argv[1]), float(sys.argv[2]))
    print(json.dumps(asdict(run)))


if __name__ == "__main__":
    main()
