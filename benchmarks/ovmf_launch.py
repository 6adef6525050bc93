"""Launching OVMF_CODE.fd: sevsim's LAUNCH_* commands vs sev-snp-measure.

Both sides start from the file and end with the SEV-ES launch digest of one
EPYC-v4 vCPU: sevsim loads the image, creates the VM, and runs LAUNCH_START,
LAUNCH_UPDATE_DATA (encrypting and measuring the 2 MiB), LAUNCH_UPDATE_VMSA and
LAUNCH_MEASURE; sev-snp-measure computes the same digest from the same file. The
two digests must agree, or the line is not measuring the same work.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from sevsnpmeasure.guest import calc_launch_digest
from sevsnpmeasure.sev_mode import SevMode
from sevsnpmeasure.vcpu_types import CPU_SIGS

from benchmarks.ovmf import OVMF_CODE, missing
from benchmarks.sevsim_guest import BenchError
from benchmarks.table import Row, skipped
from benchmarks.timing import interleaved_medians
from sevsim.kvm.vm import Kvm
from sevsim.vmm.firmware import load_firmware
from sevsim.vmm.launch import launch_firmware

VCPU_TYPE = "EPYC-v4"
GOAL = 2.0
WHAT = "launch OVMF_CODE.fd to its digest, 1 vCPU"


def sevsim_digest(path: Path) -> bytes:
    vm = launch_firmware(Kvm(), load_firmware(path), vcpus=1, vcpu_type=VCPU_TYPE)
    vm.launch_measure()
    return vm.launch_digest()


def oracle_digest(path: Path) -> bytes:
    return calc_launch_digest(SevMode.SEV_ES, 1, CPU_SIGS[VCPU_TYPE], str(path),
                              None, None, None, 0)  # fmt: skip


def timed_ms(digest: Callable[[Path], bytes], path: Path) -> float:
    start = time.perf_counter()
    digest(path)
    return (time.perf_counter() - start) * 1e3


def rows(repeat: int, path: Path = OVMF_CODE) -> list[Row]:
    goal = f"<= {GOAL:g}x sev-snp-measure"
    why = missing(path)
    if why:
        return [skipped(WHAT, goal, why)]
    if sevsim_digest(path) != oracle_digest(path):
        raise BenchError(f"sevsim's launch digest of {path} differs from sev-snp-measure's")
    ours, floor = interleaved_medians(repeat, lambda: timed_ms(sevsim_digest, path),
                                      lambda: timed_ms(oracle_digest, path))  # fmt: skip
    ratio = ours / floor
    return [Row(WHAT, "ms", ours, floor, ratio, goal, ratio <= GOAL)]
