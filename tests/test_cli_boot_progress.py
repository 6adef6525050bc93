"""The boot progress of ``sevsim run --firmware`` on a terminal (sevsim.cli_boot_progress)."""

import io
import shutil
from pathlib import Path

import pytest

from sevsim.arch.exits import SvmExit, VmgExit
from sevsim.cli_boot_progress import MILESTONES, BootProgress
from sevsim.hw import Platform
from sevsim.kvm.events import TeeSink
from sevsim.kvm.vm import Kvm
from sevsim.plugin.config import load_config
from sevsim.plugin.host import PluginHost
from sevsim.vmm.boot import launch_pc
from sevsim.vmm.firmware import load_firmware
from sevsim.vmm.pc import PcConfig
from sevsim.vmm.pflash import VarsFile
from sevsim.vmm.vmm import Vmm

OVMF = Path("/usr/share/OVMF")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_milestones_follow_what_the_hypervisor_sees():
    clock = Clock()
    progress = BootProgress(io.StringIO(), clock=clock)
    assert progress.phase == "launch"
    clock.now = 100.5
    progress.emit("msr_protocol_enter", vcpu_id=0, ghcb_gpa=0x8000_0000_4000_0004)
    progress.emit("msr_protocol_enter", vcpu_id=0, ghcb_gpa=0x002)
    clock.now = 102
    progress.emit("vmgexit_enter", vcpu_id=0, exit_reason=SvmExit.CPUID, info1=0, info2=0)
    progress.emit("vmgexit_enter", vcpu_id=0, exit_reason=SvmExit.IOIO, info1=0x510 << 16,
                  info2=0)  # fmt: skip
    assert progress.phase == "fw_cfg"
    progress.emit("vmgexit_enter", vcpu_id=1, exit_reason=SvmExit.IOIO, info1=0xB008 << 16 | 1,
                  info2=0)  # fmt: skip
    progress.emit("vmgexit_enter", vcpu_id=0, exit_reason=VmgExit.MMIO_WRITE,
                  info1=0xFEE000B0, info2=4)  # an APIC EOI is not the flash  # fmt: skip
    assert "flash writes" not in progress.reached
    progress.emit("vmgexit_enter", vcpu_id=0, exit_reason=VmgExit.MMIO_WRITE,
                  info1=0xFFE00064, info2=1)  # fmt: skip
    clock.now = 130
    progress.console(b"BdsDxe: loading Boot0001\r\n")
    progress.console(b"\x1b[1mShell")
    assert progress.phase == "BDS"
    progress.console(b"> \x1b[0m")
    assert list(progress.reached) == list(MILESTONES)
    assert progress.reached["SEV_INFO"] == 0.5 and progress.reached["Shell"] == 30
    assert progress.vmgexits == {0: 4, 1: 1}
    assert progress.milestones().startswith("MSR-protocol CPUID 0.5 s, SEV_INFO 0.5 s, ")


def test_the_status_line_shows_the_phase_and_rates_then_leaves_the_milestones():
    clock = Clock()
    stream = io.StringIO()
    progress = BootProgress(stream, clock=clock)
    for _ in range(30):
        progress.emit("vmgexit_enter", vcpu_id=0, exit_reason=SvmExit.CPUID, info1=0, info2=0)
    clock.now = 112
    assert progress.status(2.0) == "[    12 s] first GHCB exit · VMGEXITs cpu0 15/s"
    progress._width = 40  # as if a status line were up
    progress.stop()
    assert stream.getvalue().startswith("\rsevsim: first GHCB exit 0.0 s")
    assert stream.getvalue().endswith("\n")


@pytest.mark.ovmf
@pytest.mark.skipif(not (OVMF / "OVMF_CODE.fd").exists(), reason="no Debian ovmf package")
def test_ovmf_passes_the_first_milestones_in_order(tmp_path):
    shutil.copy(OVMF / "OVMF_VARS.fd", tmp_path / "vars.fd")
    store = VarsFile(str(tmp_path / "vars.fd"))
    host = PluginHost(load_config(None, cli=[], strict=True))
    progress = BootProgress(io.StringIO())
    vm, machine = launch_pc(
        Kvm(Platform()), load_firmware(str(OVMF / "OVMF_CODE.fd")), PcConfig(vcpus=1),
        vars_store=store, vars_size=store.size, handlers=host.start(),
        events=TeeSink(host.events, progress),
    )  # fmt: skip
    Vmm(vm, machine, max_exits=60).run()  # SEC's #VC handler is up; DXE is far
    reached = list(progress.reached)
    assert reached[:3] == list(MILESTONES[:3]) and "DXE" not in reached
