"""The floors' engine: bare Unicorn holding the same guest image, nothing of sevsim.

Guest memory is mapped flat (the images are identity mapped, so Unicorn's own
flat 64-bit mode translates every address as the guest's page tables do, with no
TLB-fill hook); the GDT is loaded and CS/SS hold the image's selectors so a
native IRETQ works. Like sevsim's side, the engine is created, and the guest run
to its warm-up HLT, before any timer starts.
"""

from __future__ import annotations

import time

from unicorn import UC_ARCH_X86, UC_MODE_64, UC_PROT_ALL, Uc
from unicorn import x86_const as x86

from sevsim.guest.image import CODE64_SEL, DATA_SEL, GDT, STACK_TOP, GuestImage

#: emu_start's "until": an address no benchmark guest executes.
NEVER = 0xFFFF_FFFF_FFFF_F000


def engine(image: GuestImage, ram_size: int, host_address: int | None = None) -> Uc:
    """A bare engine with ``image``'s memory and registers, stopped after the
    warm-up HLT at the image's entry; its RAM is Unicorn's own, or the host
    memory at ``host_address`` (``ram_size`` bytes) when given."""
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    if host_address is None:
        uc.mem_map(0, ram_size)
    else:
        uc.mem_map_ptr(0, ram_size, UC_PROT_ALL, host_address)
    for gpa, data in image.memory().items():
        uc.mem_write(gpa, data)
    uc.reg_write(x86.UC_X86_REG_GDTR, (0, GDT, 0xFFFF, 0))
    uc.reg_write(x86.UC_X86_REG_CS, CODE64_SEL)
    uc.reg_write(x86.UC_X86_REG_SS, DATA_SEL)
    uc.reg_write(x86.UC_X86_REG_RSP, STACK_TOP)
    uc.emu_start(image.entry, NEVER)
    return uc


def resume(uc: Uc) -> float:
    """Seconds one ``emu_start`` from the current RIP takes (to a HLT or a stop)."""
    pc = uc.reg_read(x86.UC_X86_REG_RIP)
    start = time.perf_counter()
    uc.emu_start(pc, NEVER)
    return time.perf_counter() - start
