"""Launching OVMF_CODE.fd: sevsim's LAUNCH_* commands vs sev-snp-measure.

Both sides start from the file and end with the SEV-ES launch digest of the same
number (:data:`VCPUS`) of EPYC-v4 vCPUs. What each timer covers:

- sevsim: read the file and parse its OVMF footer table; create the platform and the
  VM (KVM_CREATE_VM, its ASID, the flash slot), write the image into guest memory,
  create the vCPUs in their reset state; LAUNCH_START (and ACTIVATE),
  LAUNCH_UPDATE_DATA over the whole image (measured, and made private: its
  ciphertext is derived only if the host reads it, as for every private page),
  LAUNCH_UPDATE_VMSA of every vCPU, LAUNCH_MEASURE and LAUNCH_FINISH; read the digest.
- the floor, sev-snp-measure: read the same file and parse its footer table (and SEV
  metadata), SHA-256 over the image, build every vCPU's VMSA page and hash it in.

So both parse the same file and hash the same bytes (the image, then one VMSA page
per vCPU, the same count on both sides); the two digests are checked equal before
anything is timed, or the line is not measuring the same work. What sevsim does on
top (a VM, guest memory, the firmware's guest context) is the overhead the ratio
shows. On both sides a garbage collection runs before the timer starts, so neither
pays for the other's leftovers, and sevsim's VM is destroyed (KVM_DESTROY_VM) after
its timer stops, as the floor's objects are simply dropped.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

from sevsnpmeasure.guest import calc_launch_digest
from sevsnpmeasure.sev_mode import SevMode
from sevsnpmeasure.vcpu_types import CPU_SIGS

from benchmarks.ovmf import OVMF_CODE, missing
from benchmarks.sevsim_guest import BenchError
from benchmarks.table import Row, skipped
from benchmarks.timing import interleaved_medians
from sevsim.kvm.vm import Kvm, Vm
from sevsim.vmm.firmware import load_firmware
from sevsim.vmm.launch import launch_firmware

VCPU_TYPE = "EPYC-v4"
VCPUS = 1
GOAL = 2.0
WHAT = f"launch OVMF_CODE.fd to its digest, {VCPUS} vCPU"


def sevsim_launch(path: Path, vcpus: int = VCPUS) -> tuple[Vm, bytes]:
    """The whole launch of ``path`` through sevsim: the VM and its launch digest."""
    vm = launch_firmware(Kvm(), load_firmware(path), vcpus=vcpus, vcpu_type=VCPU_TYPE)
    vm.launch_measure()
    vm.launch_finish()
    return vm, vm.launch_digest()


def sevsim_digest(path: Path, vcpus: int = VCPUS) -> bytes:
    vm, digest = sevsim_launch(path, vcpus)
    vm.destroy()
    return digest


def oracle_digest(path: Path, vcpus: int = VCPUS) -> bytes:
    return calc_launch_digest(SevMode.SEV_ES, vcpus, CPU_SIGS[VCPU_TYPE], str(path),
                              None, None, None, 0)  # fmt: skip


def sevsim_ms(path: Path) -> float:
    gc.collect()
    start = time.perf_counter()
    vm, _ = sevsim_launch(path)
    elapsed = time.perf_counter() - start
    vm.destroy()
    return elapsed * 1e3


def oracle_ms(path: Path) -> float:
    gc.collect()
    start = time.perf_counter()
    oracle_digest(path)
    return (time.perf_counter() - start) * 1e3


def rows(repeat: int, path: Path = OVMF_CODE) -> list[Row]:
    goal = f"<= {GOAL:g}x sev-snp-measure"
    why = missing(path)
    if why:
        return [skipped(WHAT, goal, why)]
    if sevsim_digest(path) != oracle_digest(path):
        raise BenchError(f"sevsim's launch digest of {path} differs from sev-snp-measure's")
    ours, floor = interleaved_medians(repeat, lambda: sevsim_ms(path), lambda: oracle_ms(path))
    ratio = ours / floor
    return [Row(WHAT, "ms", ours, floor, ratio, goal, ratio <= GOAL)]
