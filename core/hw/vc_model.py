"""Guest software the simulator runs in Python: the modeled #VC handler's view of its vCPU.

A guest may bring its #VC handler as Python code (``sevsim.guest.vc``) instead of x86
in its IDT. That handler is guest software: chosen by the guest owner before launch
(bound to the vCPU's VMSA before LAUNCH_UPDATE_VMSA seals it, never afterwards), it
sees the guest's registers and plaintext memory through a :class:`GuestView`, and
reaches the hypervisor only through guest memory, the GHCB MSR and VMGEXIT — which it
performs by ``yield``-ing from its generator.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import TYPE_CHECKING

from unicorn import x86_const as x86

from sevsim.hw.mmu import GuestAccessFault
from sevsim.hw.regs import GPR_IDS

if TYPE_CHECKING:
    from sevsim.hw.cpu import GuestCpu


class GuestFault(Exception):
    """Guest software touched an address its own page tables do not map (or MMIO)."""

    def __init__(self, vaddr: int, mmio: bool = False) -> None:
        what = "is MMIO" if mmio else "is not mapped"
        super().__init__(f"guest address {vaddr:#x} {what}")
        self.vaddr = vaddr
        self.mmio = mmio


class GuestView:
    """The vCPU as guest software sees it: registers, memory through its page tables."""

    __slots__ = ("_cpu",)

    def __init__(self, cpu: GuestCpu) -> None:
        self._cpu = cpu

    def reg(self, name: str) -> int:
        regs = self._cpu.regs
        if name == "rip":
            return regs.rip
        if name == "rflags":
            return regs.rflags
        return regs.read(GPR_IDS[name])

    def set_reg(self, name: str, value: int) -> None:
        regs = self._cpu.regs
        if name == "rip":
            regs.rip = value
        else:
            regs.write(GPR_IDS[name], value)

    @property
    def bits(self) -> int:
        """Operand size of the code segment: 16, 32 or 64."""
        return self._cpu.bits()

    @property
    def cpl(self) -> int:
        return self._cpu.cpl()

    def segment_base(self, name: str) -> int:
        """FS/GS bases (other segments are flat in long mode)."""
        reg = {"fs": x86.UC_X86_REG_FS_BASE, "gs": x86.UC_X86_REG_GS_BASE}.get(name)
        return 0 if reg is None else self._cpu.regs.read(reg)

    def read(self, vaddr: int, size: int) -> bytes:
        """Guest-virtual read; raises GuestFault if the guest's tables do not map it."""
        try:
            return self._cpu.mmu.read(vaddr, size)
        except GuestAccessFault as failed:
            raise GuestFault(failed.fault.vaddr, failed.fault.npf_gpa is not None) from None

    def write(self, vaddr: int, data: bytes) -> None:
        try:
            self._cpu.mmu.write(vaddr, data)
        except GuestAccessFault as failed:
            raise GuestFault(failed.fault.vaddr, failed.fault.npf_gpa is not None) from None

    def translate(self, vaddr: int) -> tuple[int, bool]:
        """(guest-physical address, private) of ``vaddr`` — Linux's slow_virt_to_phys."""
        try:
            return self._cpu.mmu.guest_physical(vaddr)
        except GuestAccessFault:
            raise GuestFault(vaddr) from None

    @property
    def ghcb_msr(self) -> int:
        return self._cpu.ghcb_msr

    @ghcb_msr.setter
    def ghcb_msr(self, value: int) -> None:
        self._cpu.ghcb_msr = value & 0xFFFF_FFFF_FFFF_FFFF


#: The modeled #VC handler: called with the guest's view and the #VC error code; a
#: generator that yields once per VMGEXIT and returns an exception vector to raise
#: in the guest, or None to resume it.
VcModel = Callable[[GuestView, int], Generator[None, None, int | None]]
