"""sevsim's side of the guest benchmarks: a guest image launched through KVM's API.

Every benchmark guest starts with a HLT: the first KVM_RUN, untimed, creates the
CPU engine and maps the entry page, so the timed run that follows measures the
guest's work, not the fixed cost of a first VMRUN. The bare-Unicorn floors
(:mod:`benchmarks.bare`) create their engine outside the timer too.
"""

from __future__ import annotations

import time

from sevsim.guest.image import GuestImage
from sevsim.kvm.exits import Hlt
from sevsim.kvm.vcpu import Vcpu
from sevsim.kvm.vm import Kvm
from sevsim.testing import isolated_host
from sevsim.vmm.launch import launch_image
from sevsim.vmm.machine import Devices

#: The feature plugins a benchmark guest exercises (KVM's own rows come with them).
PLUGINS = ("msr_protocol", "ioio", "mmio")
#: Assembled first in every benchmark guest: where the untimed warm-up run ends.
WARM_UP = "hlt\n"


class BenchError(RuntimeError):
    """A benchmark guest did not do what it was built to do."""


def launch(image: GuestImage, ram_size: int = 16 << 20, devices: Devices | None = None) -> Vcpu:
    """Launch ``image`` on one vCPU with ``devices`` (the standard ones by default) and
    run it to its warm-up HLT; the vCPU is then ready for the timed run."""
    table = isolated_host(enable=PLUGINS).start()
    vm = launch_image(Kvm(), image, ram_size=ram_size, handlers=table,
                      devices=devices or Devices.standard())  # fmt: skip
    vcpu = vm.vcpus[0]
    run_to_hlt(vcpu)
    return vcpu


def run_to_hlt(vcpu: Vcpu) -> float:
    """Seconds one KVM_RUN takes to reach the guest's next HLT."""
    start = time.perf_counter()
    exit_ = vcpu.run()
    elapsed = time.perf_counter() - start
    if not isinstance(exit_, Hlt):
        raise BenchError(f"the guest was to reach a HLT, it exited with {exit_!r}")
    return elapsed
