"""The silicon and the SEV firmware: what a hypervisor runs on but cannot look inside.

This module is the hardware's whole interface to the hypervisor (``sevsim.kvm``):

- :class:`Platform`: the SEV firmware (``psp``), host pages for VMSAs and MSR maps,
  and ``vmrun`` — enter a guest through a VMCB, come back with a #VMEXIT in it;
- :class:`GuestMemoryView`: guest memory as the host sees it (ciphertext for private
  pages) plus the registration of RAM regions and MMIO holes;
- :class:`VmsaHandle`: a VMSA page, readable and writable by the host as bytes.

Nothing here hands the hypervisor a guest register or a plaintext private page.
"""

from __future__ import annotations

from attrs import define, field, frozen

from sevsim.arch.vmcb import VMCB_CONTROL
from sevsim.arch.vmsa import VMSA_PAGE_SIZE
from sevsim.hw.cpu import GuestFault, GuestView, HwExit, VcModel
from sevsim.hw.memory import GuestMemory, MmioHole
from sevsim.hw.psp import LaunchMeasurement, LaunchSession, Psp
from sevsim.hw.sev_api import Policy
from sevsim.hw.sev_caps import CpuidLeaf, SevCapabilities
from sevsim.hw.svm import MSRPM_SIZE, HostPages, Svm, VmsaPage, msrpm_bit

__all__ = [
    "MSRPM_SIZE",
    "CpuidLeaf",
    "GuestFault",
    "GuestMemoryView",
    "GuestView",
    "HwExit",
    "LaunchMeasurement",
    "LaunchSession",
    "Platform",
    "Policy",
    "Psp",
    "RamInfo",
    "SevCapabilities",
    "VcModel",
    "VmsaHandle",
    "msrpm_bit",
]


@frozen
class RamInfo:
    """Where a RAM region is: all the host needs to know of it."""

    gpa: int
    size: int
    name: str


class VmsaHandle:
    """A VMSA page as host software holds it: an address and its bytes, nothing more.

    Reads give ciphertext once the page is protected; writes are caught by VMRUN's
    integrity check. The hardware's decrypted copy of the state stays behind it.
    """

    __slots__ = ("_page",)

    def __init__(self, page: VmsaPage) -> None:
        self._page = page

    @property
    def pa(self) -> int:
        return self._page.pa

    def host_read(self, offset: int = 0, size: int = VMSA_PAGE_SIZE) -> bytes:
        return self._page.host_read(offset, size)

    def host_write(self, offset: int, data: bytes) -> None:
        self._page.host_write(offset, data)

    def launch_protect(self, key: bytes) -> bytes:
        """The firmware's path for LAUNCH_UPDATE_VMSA (``hw.psp.VmsaTarget``)."""
        return self._page.launch_protect(key)


class GuestMemoryView:
    """One VM's guest memory, as host software (KVM, the VMM) may touch it."""

    def __init__(self) -> None:
        self._memory = GuestMemory()

    def add_ram(self, gpa: int, size: int, name: str = "ram") -> RamInfo:
        region = self._memory.add_ram(gpa, size, name)
        return RamInfo(region.gpa, region.size, region.name)

    def add_mmio(self, gpa: int, size: int, name: str) -> MmioHole:
        return self._memory.add_mmio(gpa, size, name)

    @property
    def ram(self) -> tuple[RamInfo, ...]:
        return tuple(RamInfo(r.gpa, r.size, r.name) for r in self._memory.ram)

    @property
    def mmio(self) -> tuple[MmioHole, ...]:
        return self._memory.mmio

    def read(self, gpa: int, size: int) -> bytes:
        """Host read: plaintext of shared pages, ciphertext of private ones."""
        return self._memory.host_read(gpa, size)

    def write(self, gpa: int, data: bytes | bytearray) -> None:
        """Host write: a private page's guest sees the decryption of what was written."""
        self._memory.host_write(gpa, data)

    def launch_encrypt(self, gpa: int, length: int, key: bytes) -> bytes:
        """The firmware's path for LAUNCH_UPDATE_DATA (``hw.psp.LaunchMemory``)."""
        return self._memory.launch_encrypt(gpa, length, key)


@define
class Platform:
    """The host: SEV firmware, SVM-capable CPUs, and host memory for the hardware."""

    caps: SevCapabilities = field(factory=SevCapabilities)
    psp: Psp = field(default=None)
    _pages: HostPages = field(factory=HostPages, alias="pages")
    _svm: Svm = field(default=None, alias="svm")

    def __attrs_post_init__(self) -> None:
        if self.psp is None:
            self.psp = Psp(self.caps)
            # What the ccp driver does at boot: INIT, then flush every ASID.
            self.psp.init()
            self.psp.df_flush()
        if self._svm is None:
            self._svm = Svm(self._pages, self.caps.c_bit)

    # -- host memory the hardware reads -----------------------------------------------

    def alloc_vmsa(self) -> VmsaHandle:
        """A VMSA page, plaintext and writable until LAUNCH_UPDATE_VMSA."""
        return VmsaHandle(self._pages.alloc_vmsa())

    def alloc_msrpm(self) -> tuple[int, bytearray]:
        """An MSR permission map: its address (for the VMCB) and its bits."""
        pa = self._pages.alloc_buffer(MSRPM_SIZE)
        buffer = self._pages.buffer(pa)
        assert buffer is not None
        return pa, buffer

    def free(self, pa: int) -> None:
        self._pages.free(pa)

    def cpuid_sev(self) -> CpuidLeaf:
        """CPUID 0x8000001F as reported to guests."""
        return self.caps.cpuid()

    def load_vc_model(self, vmsa: VmsaHandle, model: VcModel | None) -> None:
        """Run ``model`` as the #VC handler of the guest behind ``vmsa``.

        Not a hypervisor operation: this stands for guest software (the guest's own
        #VC handler, written in Python by ``sevsim.guest``) that the simulator runs
        in the guest's place. ``None`` goes back to the guest's IDT.
        """
        page = vmsa._page
        page.vc_model = model
        if page.cpu is not None:
            page.cpu.vc_model = model

    def vmrun(
        self, vmcb: bytearray, memory: GuestMemoryView, deadline: float | None = None
    ) -> HwExit:
        """VMRUN with ``memory`` as the nested page tables; returns the debug record.

        The memory controller encrypts with the key ACTIVATE bound to the VMCB's ASID.
        """
        key = self.psp.key_for_asid(VMCB_CONTROL.get(vmcb, "asid"))
        return self._svm.vmrun(vmcb, memory._memory, key, deadline)
