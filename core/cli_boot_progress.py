"""Progress of a long firmware boot, for a person watching a terminal.

OVMF's RELEASE builds print nothing on the serial console until BDS, minutes into a
boot under sevsim, so ``sevsim run --firmware`` shows where the boot is from what the
hypervisor sees (no guest state is needed): the milestones below, recognised from
KVM's own events and the UART output, and the exit rate per vCPU, on one status line
of stderr that is redrawn every second. Nothing is shown when stderr is not a
terminal (a log, CI), so redirected output stays clean.

Milestones, in the order OVMF reaches them under SEV-ES (../shared/OVMF.md):

==================  ============================================================
MSR-protocol CPUID  the reset vector's first CPUID request through the GHCB MSR
SEV_INFO            SEC asks for the hypervisor's GHCB protocol range
first GHCB exit     the first VMGEXIT with a GHCB (SEC's #VC handler is up)
fw_cfg              PlatformPei reads QEMU's firmware configuration (port 0x510)
DXE                 the ACPI PM timer is read (port 0xB008): only DXE uses it
flash writes        the first write to the variable store (MMIO above 0xFF000000)
BDS                 the first byte on the serial console
Shell               the UEFI Shell prompt on the serial console
==================  ============================================================
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, TextIO

from sevsim.arch.exits import SvmExit, VmgExit

#: The milestones, in boot order (see the module doc).
MILESTONES = ("MSR-protocol CPUID", "SEV_INFO", "first GHCB exit", "fw_cfg", "DXE",
              "flash writes", "BDS", "Shell")  # fmt: skip
_MSR_CPUID_REQ, _MSR_SEV_INFO_REQ = 0x004, 0x002
_FW_CFG_PORT, _PM_TIMER_PORT = 0x510, 0xB008
_FLASH_BASE = 0xFF00_0000
_SHELL_PROMPT = b"Shell> "


class BootProgress:
    """An event sink and a console tap that track the milestones and exit counts; with
    :meth:`start`, a thread redraws the status line every ``period`` seconds."""

    def __init__(self, stream: TextIO = sys.stderr, *, period: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.stream = stream
        self.period = period
        self._clock = clock
        self.reached: dict[str, float] = {}
        #: VMGEXITs per vCPU since the last redraw, and in all.
        self._recent: Counter[int] = Counter()
        self.vmgexits: Counter[int] = Counter()
        self._start = clock()
        self._tail = b""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._width = 0

    # -- what the run shows -------------------------------------------------------------

    def wants(self, name: str) -> bool:
        return name in ("msr_protocol_enter", "vmgexit_enter")

    def emit(self, name: str, /, **fields: Any) -> None:
        if name == "msr_protocol_enter":
            request = fields["ghcb_gpa"] & 0xFFF
            if request == _MSR_CPUID_REQ:
                self._reach("MSR-protocol CPUID")
            elif request == _MSR_SEV_INFO_REQ:
                self._reach("SEV_INFO")
            return
        vcpu, reason, info1 = fields["vcpu_id"], fields["exit_reason"], fields["info1"]
        self._recent[vcpu] += 1
        self.vmgexits[vcpu] += 1
        self._reach("first GHCB exit")
        if reason == SvmExit.IOIO:
            port = info1 >> 16
            if port == _FW_CFG_PORT:
                self._reach("fw_cfg")
            elif port == _PM_TIMER_PORT:
                self._reach("DXE")
        elif reason == VmgExit.MMIO_WRITE and info1 >= _FLASH_BASE:
            self._reach("flash writes")

    def console(self, data: bytes) -> None:
        """Bytes the guest wrote to the UART (call it beside the real console)."""
        if data:
            self._reach("BDS")
        self._tail = (self._tail + data)[-64:]
        if _SHELL_PROMPT in self._tail:
            self._reach("Shell")

    def _reach(self, milestone: str) -> None:
        if milestone not in self.reached:
            self.reached[milestone] = self._clock() - self._start

    @property
    def phase(self) -> str:
        """The last milestone reached (in boot order), or ``launch``."""
        return next((m for m in reversed(MILESTONES) if m in self.reached), "launch")

    def status(self, interval: float) -> str:
        """The status line: elapsed time, phase, VMGEXITs per second per vCPU over the
        last ``interval`` seconds."""
        rates = " ".join(f"cpu{v} {n / interval:,.0f}/s" for v, n in sorted(self._recent.items()))
        return (f"[{self._clock() - self._start:6.0f} s] {self.phase} · "
                f"VMGEXITs {rates or '-'}")  # fmt: skip

    # -- the status line ----------------------------------------------------------------

    def start(self) -> None:
        """Redraw the status line every ``period`` seconds until :meth:`stop`."""
        self._thread = threading.Thread(target=self._loop, name="sevsim-progress", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._width:  # the status line is still up: leave the milestones instead
            self.stream.write("\r" + f"sevsim: {self.milestones()}".ljust(self._width) + "\n")
            self.stream.flush()
            self._width = 0

    def milestones(self) -> str:
        """Each milestone reached, with the seconds it took to get there."""
        return ", ".join(f"{m} {t:.1f} s" for m, t in self.reached.items())

    def _loop(self) -> None:
        # Once the guest writes to the console (BDS) the console shows the progress: the
        # status line gives way, leaving the milestones so far.
        while not self._stop.wait(self.period) and "BDS" not in self.reached:
            line = self.status(self.period)
            self._recent.clear()
            self.stream.write("\r" + line.ljust(self._width))
            self.stream.flush()
            self._width = max(self._width, len(line))
        if "BDS" in self.reached and self._width:
            self.stream.write("\r" + f"sevsim: {self.milestones()}".ljust(self._width) + "\n")
            self.stream.flush()
            self._width = 0
