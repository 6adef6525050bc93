"""The guest page walk: sevsim's, not Unicorn's, because of the C-bit.

Unicorn's own walker treats a PTE with bit 51 set as reserved, so it cannot run an
SEV guest's page tables. This walker handles 4-level long-mode tables with 4 KiB,
2 MiB and 1 GiB pages, PAE and 32-bit legacy paging, strips the C-bit from every
entry and reports whether the final translation was private (C=1) or shared (C=0).
Table reads are always private: the hardware walks guest page tables with the
guest's key whatever their C-bit says.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from attrs import frozen

# Page-fault error code bits (APM vol. 2, 8.4.2).
PF_PRESENT = 1 << 0
PF_WRITE = 1 << 1
PF_USER = 1 << 2
PF_RSVD = 1 << 3
PF_FETCH = 1 << 4

_P, _RW, _US, _PS = 1 << 0, 1 << 1, 1 << 2, 1 << 7
_NX = 1 << 63

ACCESS_READ, ACCESS_WRITE, ACCESS_FETCH = 0, 1, 2


@frozen
class Translation:
    """A successful walk: physical page, C-bit, and the permissions the entries grant."""

    paddr: int
    private: bool
    writable: bool
    executable: bool
    user: bool
    page_size: int


@frozen
class PageFault:
    """A failed walk: the #PF error code the guest will see, with CR2 = ``vaddr``."""

    vaddr: int
    error_code: int


@frozen
class NonCanonical:
    """A long-mode address whose bits 63:47 are not all equal: #GP(0), not #PF."""

    vaddr: int


@frozen
class PagingMode:
    """The control-register state that decides how addresses translate."""

    cr0: int
    cr3: int
    cr4: int
    efer: int
    cbit: int

    @property
    def paging(self) -> bool:
        return bool(self.cr0 & (1 << 31))


ReadPhys = Callable[[int, int], bytes | memoryview]


def walk(
    mode: PagingMode, vaddr: int, access: int, cpl: int, read: ReadPhys
) -> Translation | PageFault | NonCanonical:
    """Translate ``vaddr`` for ``access`` (ACCESS_*) at ``cpl`` using ``read(paddr, n)``."""
    if not mode.paging:
        # Paging off: identity, and every access is private (APM 15.34.5).
        return Translation(vaddr & 0xFFFF_FFFF_FFFF_F000, True, True, True, True, 4096)
    if mode.efer & (1 << 10):  # LMA: 4-level long mode
        return _walk_long(mode, vaddr, access, cpl, read)
    if mode.cr4 & (1 << 5):  # PAE
        return _walk_pae(mode, vaddr, access, cpl, read)
    return _walk_legacy(mode, vaddr, access, cpl, read)


def _fault(vaddr: int, access: int, cpl: int, present: bool, reserved: bool = False) -> PageFault:
    code = (PF_PRESENT if present else 0) | (PF_RSVD if reserved else 0)
    code |= PF_WRITE if access == ACCESS_WRITE else 0
    code |= PF_FETCH if access == ACCESS_FETCH else 0
    code |= PF_USER if cpl == 3 else 0
    return PageFault(vaddr, code)


def _walk_entries(
    mode: PagingMode,
    vaddr: int,
    access: int,
    cpl: int,
    read: ReadPhys,
    levels: tuple[tuple[int, int, bool], ...],
    table: int,
    entry_size: int,
) -> Translation | PageFault:
    """Walk ``levels`` of (index shift, index bits, large pages allowed here)."""
    cbit_mask = 1 << mode.cbit
    addr_mask = ((1 << 52) - 1) & ~0xFFF & ~cbit_mask
    nxe = bool(mode.efer & (1 << 11))
    writable = user = executable = True
    fmt = "<Q" if entry_size == 8 else "<I"
    for depth, (shift, bits, large_ok) in enumerate(levels):
        index = (vaddr >> shift) & ((1 << bits) - 1)
        entry = struct.unpack(fmt, read(table + index * entry_size, entry_size))[0]
        if not entry & _P:
            return _fault(vaddr, access, cpl, present=False)
        if not (entry_size == 8 and bits == 2):  # PAE PDPTEs carry no R/W or U/S bits
            writable &= bool(entry & _RW)
            user &= bool(entry & _US)
        if nxe and entry & _NX:
            executable = False
        last = depth == len(levels) - 1
        if last or (large_ok and entry & _PS):
            size = 1 << shift
            base = entry & addr_mask & ~(size - 1)
            if entry_size == 4 and not last:  # PSE 4 MiB page: bits 20:13 are PA 39:32
                base = (entry & 0xFFC0_0000) | ((entry >> 13) & 0xFF) << 32
            paddr = base | (vaddr & (size - 1) & ~0xFFF)
            private = bool(entry & cbit_mask) if entry_size == 8 else True
            denied = (
                (access == ACCESS_WRITE and not writable and (cpl == 3 or mode.cr0 & (1 << 16)))
                or (access == ACCESS_FETCH and not executable)
                or (cpl == 3 and not user)
            )
            if denied:
                return _fault(vaddr, access, cpl, present=True)
            return Translation(paddr, private, writable, executable, user, size)
        table = entry & addr_mask
    raise AssertionError("unreachable: the last level always returns")


def _walk_long(mode, vaddr, access, cpl, read):  # type: ignore[no-untyped-def]
    if vaddr >> 47 not in (0, (1 << 17) - 1):
        return NonCanonical(vaddr)
    levels = ((39, 9, False), (30, 9, True), (21, 9, True), (12, 9, False))
    pml4 = mode.cr3 & ~0xFFF & ~(1 << mode.cbit)
    return _walk_entries(mode, vaddr, access, cpl, read, levels, pml4, 8)


def _walk_pae(mode, vaddr, access, cpl, read):  # type: ignore[no-untyped-def]
    vaddr &= 0xFFFF_FFFF
    levels = ((30, 2, False), (21, 9, True), (12, 9, False))
    return _walk_entries(mode, vaddr, access, cpl, read, levels, mode.cr3 & 0xFFFF_FFE0, 8)


def _walk_legacy(mode, vaddr, access, cpl, read):  # type: ignore[no-untyped-def]
    vaddr &= 0xFFFF_FFFF
    pse = bool(mode.cr4 & (1 << 4))
    levels = ((22, 10, pse), (12, 10, False))
    return _walk_entries(mode, vaddr, access, cpl, read, levels, mode.cr3 & ~0xFFF, 4)
