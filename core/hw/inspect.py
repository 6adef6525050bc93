"""White-box access to the silicon behind a handle: for the simulator's own seat only.

sevsim's tests (and tools that simulate the hardware itself, such as attack scenarios
that play a malicious host with physical access) sometimes need what no hypervisor
may have: the CPU model of a vCPU, the memory engine, the SEV firmware's internals.
They import these functions explicitly; nothing on the hypervisor side does
(``tests/test_trust_boundary.py`` checks the imports of every layer).
"""

from __future__ import annotations

from sevsim.hw import GuestMemoryView, Platform, VmsaHandle, _behind
from sevsim.hw.cpu import GuestCpu
from sevsim.hw.memory import GuestMemory
from sevsim.hw.psp import Psp


def cpu_of(vmsa: VmsaHandle) -> GuestCpu | None:
    """The CPU model running the VMSA behind ``vmsa`` (None before its first VMRUN)."""
    return _behind(vmsa).cpu


def memory_of(view: GuestMemoryView) -> GuestMemory:
    """The memory engine behind a VM's guest memory."""
    return _behind(view)


def psp_of(platform: Platform) -> Psp:
    """The SEV firmware of a platform, keys and all."""
    return _behind(platform).psp
