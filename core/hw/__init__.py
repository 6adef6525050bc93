"""The silicon and the SEV firmware: what a hypervisor runs on but cannot look inside.

This module is the hardware's whole interface to the hypervisor (``sevsim.kvm``) and
the VMM: *handles* that can do only what KVM can do on real hardware.

- :class:`Platform`: the host. VMRUN a VMCB, allocate host pages (VMSAs, MSR
  permission maps), create a VM's guest-physical space, and reach the SEV firmware
  (:attr:`Platform.firmware`).
- :class:`SevFirmware`: the PSP's command interface (INIT, ACTIVATE, LAUNCH_*, ...).
  It takes commands and returns their results; no command returns a key.
- :class:`GuestMemoryView`: guest memory as the host sees it, ciphertext for pages
  the guest keeps private.
- :class:`VmsaHandle`: a VMSA page, readable and writable by the host as bytes.

A handle holds no reference to the hardware behind it, only a number, as a file
descriptor does: the hardware objects (the CPU models, the keys, the decrypted
register state) live in a table private to this package. So nothing reachable from
a handle's attributes, properties or method results leads to a key, a plaintext
private page, a register, or a way to install guest code after launch. This package
binds those hardware classes only under private names (``_Psp``, ``_Svm``, ...), and
the guest's side of the hardware (the #VC model interface a Python #VC handler runs
against) is not part of this surface: guest code imports it from
:mod:`sevsim.hw.vc_model`.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Sequence
from typing import Any

from attrs import frozen

from sevsim.arch.vmcb import VMCB_ASID
from sevsim.arch.vmsa import VMSA_PAGE_SIZE
from sevsim.errors import GuestMemoryError
from sevsim.hw.memory import GuestMemory as _GuestMemory
from sevsim.hw.memory import MmioHole
from sevsim.hw.psp import GuestStatus, LaunchMeasurement, LaunchSession, PlatformStatus
from sevsim.hw.psp import Psp as _Psp
from sevsim.hw.sev_api import Policy
from sevsim.hw.sev_caps import CpuidLeaf, SevCapabilities
from sevsim.hw.sim import SIM_EVENTS, NoSim, SimSink
from sevsim.hw.svm import MSRPM_SIZE, Usage, msrpm_bit
from sevsim.hw.svm import HostPages as _HostPages
from sevsim.hw.svm import Svm as _Svm
from sevsim.hw.svm import VmsaPage as _VmsaPage
from sevsim.hw.vc_model import VcModel as _VcModel
from sevsim.hw.watchdog import foreign_time_limit, run_foreign

__all__ = [
    "MSRPM_SIZE",
    "SIM_EVENTS",
    "CpuidLeaf",
    "GuestMemoryView",
    "GuestStatus",
    "LaunchMeasurement",
    "LaunchSession",
    "MmioHole",
    "Platform",
    "PlatformStatus",
    "Policy",
    "RamInfo",
    "SevCapabilities",
    "SevFirmware",
    "SimSink",
    "Usage",
    "VmsaHandle",
    "foreign_time_limit",
    "msrpm_bit",
    "run_foreign",
]

# -- the handle table ----------------------------------------------------------------

_hardware: dict[int, Any] = {}
_numbers = itertools.count(1)


class _Handle:
    """A number that names a hardware object in this package's private table."""

    __slots__ = ("__weakref__", "_number")

    def __init__(self, hardware: object) -> None:
        self._number = next(_numbers)
        _hardware[self._number] = hardware
        weakref.finalize(self, _hardware.pop, self._number, None)


def _behind(handle: _Handle) -> Any:
    return _hardware[handle._number]


# -- the handles -----------------------------------------------------------------------


@frozen
class RamInfo:
    """Where a RAM region is: all the host needs to know of it."""

    gpa: int
    size: int
    name: str
    readonly: bool = False


class VmsaHandle(_Handle):
    """A VMSA page as host software holds it: an address and its bytes, nothing more.

    Reads give ciphertext once the page is protected; writes are caught by VMRUN's
    integrity check.
    """

    __slots__ = ("pa",)

    def __init__(self, page: _VmsaPage) -> None:
        super().__init__(page)
        self.pa = page.pa

    def host_read(self, offset: int = 0, size: int = VMSA_PAGE_SIZE) -> bytes:
        return _behind(self).host_read(offset, size)

    def host_write(self, offset: int, data: bytes) -> None:
        _behind(self).host_write(offset, data)

    def bind_vc_model(self, model: _VcModel | None) -> None:
        """Choose the guest's #VC handler model (guest software, in Python) before
        LAUNCH_UPDATE_VMSA seals this VMSA; refused afterwards, as guest code cannot
        be replaced behind a launched guest's back."""
        page: _VmsaPage = _behind(self)
        if page.protected:
            raise GuestMemoryError(
                f"VMSA {self.pa:#x} is sealed: its guest's #VC handler was chosen at launch"
            )
        page.vc_model = model


class GuestMemoryView(_Handle):
    """One VM's guest memory, as host software (KVM, the VMM) may touch it."""

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(_GuestMemory())

    def add_ram(self, gpa: int, size: int, name: str = "ram", readonly: bool = False) -> RamInfo:
        """A RAM slot; ``readonly``: a ROM device's memory (guest writes exit as MMIO)."""
        region = _behind(self).add_ram(gpa, size, name, readonly)
        return RamInfo(region.gpa, region.size, region.name, region.readonly)

    def add_mmio(self, gpa: int, size: int, name: str) -> MmioHole:
        return _behind(self).add_mmio(gpa, size, name)

    @property
    def ram(self) -> tuple[RamInfo, ...]:
        return tuple(RamInfo(r.gpa, r.size, r.name, r.readonly) for r in _behind(self).ram)

    @property
    def mmio(self) -> tuple[MmioHole, ...]:
        return _behind(self).mmio

    def read(self, gpa: int, size: int) -> bytes:
        """Host read: plaintext of shared pages, ciphertext of private ones."""
        return _hardware[self._number].host_read(gpa, size)  # _behind(self), inline

    def write(self, gpa: int, data: bytes | bytearray) -> None:
        """Host write: a private page's guest sees the decryption of what was written."""
        _behind(self).host_write(gpa, data)

    def write_parts(self, gpa: int, parts: Sequence[tuple[int, bytes | bytearray]]) -> None:
        """Several host writes near ``gpa``, ``(offset, data)`` each, in order: the same
        as :meth:`write` of each, in one call (KVM's writes into a mapped GHCB page)."""
        _hardware[self._number].host_write_parts(gpa, parts)  # _behind(self), inline

    def set_romd(self, gpa: int, romd: bool) -> None:
        """A read-only slot's ROM mode (reads from memory) or device mode (reads exit)."""
        _behind(self).set_romd(gpa, romd)

    def release(self) -> None:
        """Give the host memory back (the VM is destroyed)."""
        _behind(self).release()


class SevFirmware(_Handle):
    """The SEV firmware's command interface, as the ccp driver offers it to KVM."""

    __slots__ = ()

    def init(self) -> None:
        _behind(self).init()

    def df_flush(self) -> None:
        _behind(self).df_flush()

    def platform_status(self) -> PlatformStatus:
        return _behind(self).platform_status()

    def guest_status(self, handle: int) -> GuestStatus:
        return _behind(self).guest_status(handle)

    def launch_start(self, policy: int, session: LaunchSession | None = None) -> int:
        return _behind(self).launch_start(policy, session)

    def activate(self, handle: int, asid: int) -> None:
        _behind(self).activate(handle, asid)

    def deactivate(self, handle: int) -> None:
        _behind(self).deactivate(handle)

    def decommission(self, handle: int) -> None:
        _behind(self).decommission(handle)

    def launch_update_data(self, handle: int, memory: GuestMemoryView, gpa: int,
                           length: int) -> None:  # fmt: skip
        _behind(self).launch_update_data(handle, _Launch(_behind(memory)), gpa, length)

    def launch_update_vmsa(self, handle: int, vmsa: VmsaHandle) -> None:
        _behind(self).launch_update_vmsa(handle, _behind(vmsa))

    def launch_measure(self, handle: int) -> LaunchMeasurement:
        return _behind(self).launch_measure(handle)

    def launch_finish(self, handle: int) -> None:
        _behind(self).launch_finish(handle)

    def launch_digest(self, handle: int) -> bytes:
        """The launch digest LAUNCH_MEASURE closed (what a guest owner predicts)."""
        return _behind(self).launch_digest(handle)


class _Launch:
    """Guest memory as LAUNCH_UPDATE_DATA reaches it (``hw.psp.LaunchMemory``)."""

    def __init__(self, memory: _GuestMemory) -> None:
        self._memory = memory

    def launch_encrypt(self, gpa: int, length: int, key: bytes) -> bytes | memoryview:
        return self._memory.launch_encrypt(gpa, length, key)


class _Silicon:
    """The host's hardware: the SEV firmware, the SVM unit, host memory for both."""

    def __init__(self, caps: SevCapabilities, sim: SimSink) -> None:
        self.caps = caps
        self.psp = _Psp(caps)
        # What the ccp driver does at boot: INIT, then flush every ASID.
        self.psp.init()
        self.psp.df_flush()
        self.pages = _HostPages()
        self.svm = _Svm(self.pages, caps.c_bit, sim)


class Platform(_Handle):
    """The host: SEV firmware, SVM-capable CPUs, and host memory for the hardware.

    ``sim`` receives the simulator's own view of every guest that runs here
    (:mod:`sevsim.hw.sim`); pass it when the platform is created, as only the one
    who builds the simulated machine may see it.
    """

    __slots__ = ("caps", "firmware")

    def __init__(self, caps: SevCapabilities | None = None, *, sim: SimSink | None = None) -> None:
        caps = caps or SevCapabilities()
        silicon = _Silicon(caps, sim or NoSim())
        super().__init__(silicon)
        self.caps = caps
        self.firmware = SevFirmware(silicon.psp)

    def new_memory(self) -> GuestMemoryView:
        """An empty guest-physical address space (one VM's nested page tables)."""
        return GuestMemoryView()

    def alloc_vmsa(self, label: tuple[str, int]) -> VmsaHandle:
        """A VMSA page, plaintext and writable until LAUNCH_UPDATE_VMSA. ``label``
        (VM name, vCPU id) names it in the simulator's view."""
        return VmsaHandle(_behind(self).pages.alloc_vmsa(label))

    def alloc_msrpm(self) -> tuple[int, bytearray]:
        """An MSR permission map: its address (for the VMCB) and its bits."""
        pages = _behind(self).pages
        pa = pages.alloc_buffer(MSRPM_SIZE)
        buffer = pages.buffer(pa)
        assert buffer is not None
        return pa, buffer

    def free(self, pa: int) -> None:
        _behind(self).pages.free(pa)

    def vmrun(
        self, vmcb: bytearray, memory: GuestMemoryView, deadline: float | None = None,
        budget: int | None = None, *, guest_ns: int | None = None,
    ) -> Usage:  # fmt: skip
        """VMRUN with ``memory`` as the nested page tables; the #VMEXIT is in ``vmcb``.

        The memory controller encrypts with the key ACTIVATE bound to the VMCB's ASID;
        the host's timer takes the CPU back at ``deadline`` (time.monotonic), after
        ``budget`` instructions (a counted, reproducible slice) or once the guest has
        run ``guest_ns`` (its own time: :mod:`sevsim.hw.run_clock`). Returns the time
        and instructions the guest used, as the host's performance counters see them.
        """
        silicon: _Silicon = _hardware[self._number]  # _behind(self), inline: every VMRUN
        key = silicon.psp.key_for_asid(VMCB_ASID.get(vmcb)[0])
        return silicon.svm.vmrun(vmcb, _hardware[memory._number], key, deadline, budget,
                                 guest_ns)  # fmt: skip
