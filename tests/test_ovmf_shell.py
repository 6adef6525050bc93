"""Debian's OVMF boots as an SEV-ES guest to the UEFI Shell, answers ``ver`` and powers
off with ``reset -s`` (issue 13: the proof that sevsim runs firmware nobody here wrote).

Slow: minutes per boot (about 5 on this project's 2-core machine, with 1 vCPU or 4).
``.ci/run`` runs them beside ``make test``; ``pytest -m "not slow"`` skips them.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

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
from sevsim.vmm.vmm import EndKind, Vmm

OVMF = Path("/usr/share/OVMF")
pytestmark = [
    pytest.mark.ovmf,
    pytest.mark.slow,
    pytest.mark.skipif(not (OVMF / "OVMF_CODE.fd").exists(), reason="no Debian ovmf package"),
]
#: What the run may take at most (it ends with the guest's power-off long before).
LIMIT_S = 1800


#: The console's escape sequences (colours, cursor moves) around the Shell's text.
_ESCAPES = re.compile(r"\x1b\[[0-9;=?]*[A-Za-z]")


def _plain(text: str) -> str:
    return _ESCAPES.sub("", text)


class Typist:
    """Types into the console what a person would: a key when the Shell counts down
    to startup.nsh, then each command once the prompt after the last one shows."""

    def __init__(self, commands: list[str]) -> None:
        self.output = bytearray()
        self._todo = [c.encode() + b"\r" for c in commands]
        self.progress = BootProgress()
        self._prompts_seen = 0
        self._skipped = False

    def console(self, data: bytes) -> None:
        self.output += data
        self.progress.console(data)

    def poll(self) -> bytes:
        if not self._skipped and b"any other key to continue" in self.output:
            self._skipped = True
            return b" "
        prompts = self.output.count(b"Shell> ")
        if prompts > self._prompts_seen and self._todo:
            self._prompts_seen = prompts
            return self._todo.pop(0)
        return b""


@pytest.mark.parametrize("vcpus", [1, 4])
def test_ovmf_boots_to_the_shell_answers_ver_and_powers_off(tmp_path, vcpus):
    vars_path = tmp_path / "OVMF_VARS.fd"
    shutil.copy(OVMF / "OVMF_VARS.fd", vars_path)
    store = VarsFile(str(vars_path))
    host = PluginHost(load_config(None, cli=[], strict=True))
    typist = Typist(["ver", "reset -s"])
    vm, machine = launch_pc(
        Kvm(Platform()), load_firmware(str(OVMF / "OVMF_CODE.fd")), PcConfig(vcpus=vcpus),
        vars_store=store, vars_size=store.size, handlers=host.start(),
        events=TeeSink(host.events, typist.progress),
        machine_args={"console": typist.console},
    )  # fmt: skip
    end = Vmm(vm, machine, timeout=LIMIT_S, poll_input=typist.poll).run()
    text = typist.output.decode("latin-1")
    assert end.kind is EndKind.POWER_OFF, (end, text[-2000:])
    assert end.status == 0
    reached = list(typist.progress.reached)
    assert set(reached) == set(MILESTONES)
    ordered = ("MSR-protocol CPUID", "SEV_INFO", "first GHCB exit", "fw_cfg", "BDS", "Shell")
    assert [m for m in reached if m in ordered] == list(ordered)
    after_ver = _plain(text).split("Shell> ver", 1)[1]
    assert "UEFI Interactive Shell v2." in after_ver
    assert "UEFI v2." in after_ver and "(EDK II" in after_ver
