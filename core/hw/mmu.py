"""Address translation for one vCPU: Unicorn's TLB filled by sevsim's page walk.

Unicorn's own walker treats the C-bit as a reserved bit, so the engine runs in
``UC_TLB_VIRTUAL`` mode and asks :meth:`Mmu.tlb_fill` for every translation it
lacks: the fill walks the guest's tables (:func:`sevsim.hw.paging.walk`), strips the
C-bit, converts the page to the view that C-bit asks for (private under the CPU's
key, or shared), and hands Unicorn the physical page with the permissions the
tables grant. A page with no RAM behind it is MMIO: the fill refuses it and the
access becomes a nested page fault (#VC NPF). A failed walk is a #PF whose exact
address Unicorn does not give the fill hook, so the fill points the page at a
physical page that does not exist; the access then reports its offset there.

The model's own accesses (pushing an exception frame, reading the IDT or the
instruction at RIP) go through the same TLB (``uc_vmem_translate``, :meth:`Mmu.tlb_paddr`),
so they cost one C call when the page is already mapped, and fall back to the Python
walk only to compute the exact fault when there is one.

Guests flush the TLB far more often than they change their page tables (OVMF
reloads CR3 on every exception return), so the fill remembers each successful walk
with the table entries it read. A fill for the same page, access and privilege
re-reads only those entries: if each still holds the same bytes under the same key,
the walk would take the same path to the same result. That keeps flushes exact
(a changed entry is seen at the next fill, as on hardware) at a fraction of a walk.

Pages change behind Unicorn's back (a conversion to the other key, a host write):
translations of a page that may still be in the TLB are flushed, and so is code
translated from it; pages nobody mapped since the last flush cost nothing.

Unicorn's TLB is direct-mapped, and QEMU resizes it at each flush by how full it was
within 100 ms of wall-clock time, down to 64 entries: hot pages keep evicting each
other. Booting OVMF to its Shell fills 0.4 to 1.3 M entries (by the run) for 17 k
pages and 2.7 k flushes. Each successful fill is therefore also kept, until the next
flush, in a *fill cache*: (linear page, access, CPL) -> the physical page and the
permissions it put in the entry. A refill of a page filled since the last flush is a
dictionary lookup and the two stores into the entry, not a walk. That is exact for
the same reason a bigger TLB would be: a CPU may keep a translation until the guest
invalidates it (MOV to CR3, a paging change of CR0 or CR4, INVLPG), and a guest that
rewrites an entry without an invalidation may get the old translation or the new one;
a refill that gives back what the TLB held before the eviction is one of them. It
stays exact only while every invalidation reaches the MMU, so the cache is dropped:

- on every flush (:meth:`Mmu.flush_tlb`: CR3 writes, paging changes of CR0/CR4, a new
  key, a new guest-physical space, a loaded VMSA), a CR3 reload included unless each
  table page the fills since the flush read is still as they all read it
  (:meth:`Mmu.reload_cr3`);
- on INVLPG, which the CPU model hooks without an exit (KVM does not intercept it
  under nested paging) and then lets Unicorn run, and on INVLPGA that a hypervisor
  lets run (:meth:`Mmu.forget_fills`). INVPCID needs nothing: Unicorn's x86
  translator does not implement it, so it raises #UD, as the CPUID of the CPU model
  and of KVM's table (leaf 7, EBX bit 10 clear) promises;
- wherever a fill would give another answer for a reason no TLB keeps: a change of
  the paging mode that does not flush (EFER.NXE, say), a page whose view (key) changes
  while a translation may map it, and whatever marks the TLB stale until the next
  flush (the poison translation of a fault, another CPU running code from a page
  this one may write). Refused fills (MMIO, faults) are never kept.

A cached fill needs none of the full fill's bookkeeping again: its physical page was
marked mapped in this generation when it was filled (and a flush drops the cache),
and the sets of code pages and executed pages only grow. With other CPUs on the same
memory the code-page protocol (:meth:`Mmu._shared_code`) runs on every fill, cached
or not. A read or write entry kept from before its page first ran code lacks EXEC, so
a fetch from it fills once more, as after any eviction.
"""

from __future__ import annotations

import ctypes
import struct
from array import array
from typing import Any

from attrs import frozen
from unicorn import (
    UC_CTL_IO_WRITE,
    UC_CTL_TLB_FLUSH,
    UC_MEM_FETCH,
    UC_MEM_READ,
    UC_MEM_WRITE,
    UC_PROT_EXEC,
    UC_PROT_READ,
    UC_PROT_WRITE,
    Uc,
)
from unicorn.unicorn_py3.unicorn import uclib

from sevsim.arch import msr as M
from sevsim.hw.memory import PAGE_MASK, PAGE_SIZE, SHARED, Change, GuestMemory, RamRegion
from sevsim.hw.paging import (
    ACCESS_FETCH,
    ACCESS_READ,
    ACCESS_WRITE,
    NonCanonical,
    PageFault,
    PagingMode,
    Translation,
    walk,
)

#: A physical page no guest has: failed translations point here (see tlb_fill).
POISON = 0xDEAD_0000_0000
_PROT = {ACCESS_READ: UC_PROT_READ, ACCESS_WRITE: UC_PROT_WRITE, ACCESS_FETCH: UC_PROT_EXEC}
#: Bound once: an Enum class attribute costs several times a global (page changes are
#: told on every host write into guest memory).
_EXECUTED, _CODE_WRITTEN, _VIEW = Change.EXECUTED, Change.CODE_WRITTEN, Change.VIEW


@frozen
class Fault:
    """Why a translation failed, as the CPU reports it.

    ``vector`` 14 (#PF, with ``error_code`` and CR2 = ``vaddr``) or 13 (#GP(0): a
    non-canonical address), or ``npf_gpa`` set: the page has no RAM (MMIO), a nested
    page fault that an SEV-ES guest sees as #VC(NPF).
    """

    vaddr: int
    access: int
    vector: int = 0
    error_code: int = 0
    npf_gpa: int | None = None


class GuestAccessFault(Exception):
    """A model-side guest-virtual access faulted; carries the fault."""

    def __init__(self, fault: Fault) -> None:
        super().__init__(repr(fault))
        self.fault = fault


class _TableNpf(Exception):
    """A page table lies in no RAM (the walk itself takes a nested fault)."""

    def __init__(self, gpa: int) -> None:
        super().__init__(f"page table at {gpa:#x} has no RAM")
        self.gpa = gpa


#: ``uc_vmem_translate``, called holding the GIL (a ``PyDLL`` function): on a TLB hit
#: the call is shorter than giving the GIL up and taking it back, and on a miss the
#: fill it runs is Python. Called without a prototype, as Unicorn's binding declares
#: none: ctypes passes a Python int as a C int, so an address from 2 GiB up would
#: reach it sign-extended or cut to 32 bits; those go as a 64-bit value, smaller
#: ones as they are (cheaper).
_vmem_translate = ctypes.PyDLL(uclib._name, handle=uclib._handle).uc_vmem_translate
_INT_ADDRESSES = 1 << 31

#: Remembered walks per paging mode, and fills kept since a flush, at most (a guest
#: touching more pages starts over); paging modes whose walks are kept.
_WALKS_KEPT = _FILLS_KEPT = 1 << 16
_MODES_KEPT = 2
#: An address's offset in its page.
_IN_PAGE = PAGE_SIZE - 1
#: Unicorn's access type -> the walk's.
_KIND = {UC_MEM_READ: ACCESS_READ, UC_MEM_WRITE: ACCESS_WRITE, UC_MEM_FETCH: ACCESS_FETCH}
_ENTRY = {8: struct.Struct("<Q"), 4: struct.Struct("<I")}

#: One table entry a walk read: the region's buffer, the entry's offset there and its
#: format, the page owners' array and the page's index in it, the value read, and the
#: guest-physical address of the table page.
_Read = tuple[memoryview, int, struct.Struct, array, int, int, int]


@frozen
class _Walk:
    """A successful walk and the table entries it read."""

    translation: Translation
    entries: tuple[_Read, ...]


class Mmu:
    """One vCPU's translations: the TLB fill, the model's accesses, page tracking.

    ``mode`` (CR0/CR3/CR4/EFER) and ``kid`` (the memory key of the ASID the CPU runs
    under) are kept current by the CPU, which sees every write to them.
    """

    def __init__(self, uc: Uc, memory: GuestMemory, cbit: int, cpl: Any) -> None:
        self.uc = uc
        self.memory = memory
        #: Walks in the current paging mode, by (page, access, CPL 3); those of the
        #: last modes, kept per mode (OVMF clears CR0.WP around each page-table write
        #: and sets it again: two modes, back and forth, thousands of times a boot).
        self._walks: dict[tuple[int, int, bool], _Walk] = {}
        self._walks_by_mode: dict[PagingMode, dict[tuple[int, int, bool], _Walk]] = {}
        #: Each table page the fills since the last flush read, as it was at the first
        #: of them: while every one is unchanged, the TLB holds no stale translation.
        self._tables: dict[int, tuple[memoryview, int, bytes]] = {}
        #: A fill since the last flush read a table entry other than the one that first
        #: copy holds: the TLB may hold translations from two versions of the table.
        self._tables_changed = False
        #: The fill cache (module doc): (linear page | access << 2 | CPL) -> (physical
        #: page, permissions before the code-page protocol), since the last flush.
        self._filled: dict[int, tuple[int, int]] = {}
        self._mode = PagingMode(0, 0, 0, 0, cbit)
        self._walks_by_mode[self._mode] = self._walks
        self.kid = SHARED
        #: Reads the current privilege level (the CPU knows how).
        self._cpl = cpl
        #: The fault of the last refused fill, taken by the CPU when the access stops.
        self.fault: Fault | None = None
        #: A translation failed at the poison page: the access will report its offset.
        self._pending: Fault | None = None
        self._probing = False
        #: Physical page -> TLB generation of its last fill; a page filled in the current
        #: generation may still be mapped. Code pages: filled for an instruction fetch.
        self._mapped: dict[int, int] = {}
        self._generation = 0
        self._code_pages: set[int] = set()
        #: Physical page -> TLB generation of a fill that granted write access.
        self._writable: dict[int, int] = {}
        #: Telling the other CPUs: our own callback ignores what we tell them.
        self._telling = False
        self.tlb_stale = False
        self.code_stale = False
        self._handle = uc._uch
        self._paddr = ctypes.c_uint64()
        self._paddr_ref = ctypes.byref(self._paddr)
        memory.on_page_changed.append(self._page_changed)

    @property
    def mode(self) -> PagingMode:
        return self._mode

    @mode.setter
    def mode(self, mode: PagingMode) -> None:
        if mode != self._mode:
            # A walk is remembered for the mode it ran in, and used again only in that
            # mode with every table entry it read unchanged (_remembered).
            walks = self._walks_by_mode.get(mode)
            if walks is None:
                if len(self._walks_by_mode) >= _MODES_KEPT:
                    self._walks_by_mode.clear()
                walks = self._walks_by_mode[mode] = {}
            self._walks = walks
            # Also for changes that do not flush (EFER.NXE, CR0.TS): refills walk
            # under the new mode, as they did before fills were kept.
            self._filled.clear()
        self._mode = mode

    def forget_walks(self) -> None:
        """Another guest-physical space: remembered walks and fills name regions of the
        old one."""
        for walks in self._walks_by_mode.values():
            walks.clear()
        self._filled.clear()

    def forget_fills(self) -> None:
        """INVLPG (or INVLPGA) is about to run: Unicorn drops its own entries for the
        page, and refills must walk again. All fills kept are dropped: the instruction
        is rare, and which page it names is not decoded."""
        self._filled.clear()

    def close(self) -> None:
        if self._page_changed in self.memory.on_page_changed:
            self.memory.on_page_changed.remove(self._page_changed)

    # -- the TLB ------------------------------------------------------------------

    def flush_tlb(self) -> None:
        self.uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)
        self._generation += 1
        self._tables.clear()
        self._tables_changed = False
        self._filled.clear()
        self.tlb_stale = False

    def reload_cr3(self) -> None:
        """A MOV to CR3 that keeps the paging mode: the TLB must drop translations the
        tables no longer give. When no table page a fill read since the last flush has
        changed since, the TLB already holds exactly what refilling it would give, and
        flushing would only cost refills (OVMF reloads CR3 on every exception return);
        otherwise flush. A table page's bytes also change when it converts to another
        key, so comparing bytes covers both. A page that changed and changed back
        still flushes if a fill read it in between (``_tables_changed``): a PTE
        mapped, used and cleared again before the reload must not stay in the TLB."""
        if self._tables_changed:
            self.flush_tlb()
            return
        for view, off, seen in self._tables.values():
            if view[off : off + PAGE_SIZE].tobytes() != seen:
                self.flush_tlb()
                return

    def _page_changed(self, page: int, change: Change) -> None:
        if change is _EXECUTED:
            # Another CPU runs code from the page: a write of ours must fill again, so
            # that it can tell that CPU (its translated code would go stale unseen).
            if not self._telling and self._writable.get(page) == self._generation:
                self._stale()
            return
        if change is _CODE_WRITTEN:
            if not self._telling and page in self._code_pages:
                self.code_stale = True
            return
        if page in self._code_pages:
            self.code_stale = True
        if change is _VIEW and self._mapped.get(page) == self._generation:
            self._stale()

    def _stale(self) -> None:
        """The TLB may hold a translation a fill would no longer give: it is flushed
        before the guest runs again, and until then fills walk (and convert the page
        back to the view they ask for) instead of repeating what they gave."""
        self.tlb_stale = True
        self._filled.clear()

    def _others(self) -> bool:
        """Whether other CPUs (engines with code of their own) share this memory."""
        return len(self.memory.on_page_changed) > 1

    def _tell(self, page: int, change: Change) -> None:
        self._telling = True
        try:
            self.memory.cpus_changed(page, change)
        finally:
            self._telling = False

    def tlb_fill(self, uc: Uc, vaddr: int, access: int, entry: Any, _: Any) -> bool:
        # The fill cache's key: the page's address, its low 12 bits holding the
        # access (16..18) and the CPL.
        cpl = self._cpl()
        fill_key = vaddr & PAGE_MASK | access << 2 | cpl
        filled = self._filled.get(fill_key)
        if filled is not None:  # filled since the last flush: the same again
            paddr, perms = filled
            if len(self.memory.on_page_changed) > 1:  # self._others(), inline
                perms = self._shared_code(paddr, _KIND[access], perms)
            entry.paddr = paddr
            entry.perms = perms
            return True
        kind = _KIND[access]
        key = (vaddr & PAGE_MASK, kind, cpl == 3)
        t = self._remembered(key)
        if t is None:
            try:
                walked = self._walk_and_remember(vaddr, kind, cpl, key)
            except _TableNpf as table:
                return self._refuse(Fault(vaddr, kind, npf_gpa=table.gpa & PAGE_MASK), entry)
            if isinstance(walked, NonCanonical):
                return self._refuse(Fault(vaddr, kind, vector=13), entry)
            if isinstance(walked, PageFault):
                return self._refuse(Fault(vaddr, kind, vector=14, error_code=walked.error_code),
                                    entry)  # fmt: skip
            t = walked
        region = self.memory.ram_at(t.paddr)
        if region is None or (region.readonly and (kind == ACCESS_WRITE or not region.romd)):
            # MMIO: the #VC handler decodes the access itself and needs only the page;
            # refusing the fill leaves the TLB as it is (no flush per MMIO access).
            if not self._probing:
                self.fault = Fault(vaddr, kind, npf_gpa=t.paddr)
            return False
        # Instruction fetches are always private; data follows the C-bit.
        kid = self.kid if t.private or kind == ACCESS_FETCH else SHARED
        if self.memory.convert(region, t.paddr, kid) and self.tlb_stale:
            self.flush_tlb()  # another translation may still show the old view
        self._mapped[t.paddr] = self._generation
        writable = t.writable or (cpl == 0 and not self.mode.cr0 & M.CR0_WP)
        perms = UC_PROT_READ | (UC_PROT_WRITE if writable and not region.readonly else 0)
        if kind == ACCESS_FETCH or t.paddr in self._code_pages:
            self._code_pages.add(t.paddr)
            perms |= UC_PROT_EXEC if t.executable else 0
        if kind == ACCESS_FETCH:
            self.memory.executed.add(t.paddr)
        kept = self._filled
        if len(kept) >= _FILLS_KEPT:
            kept.clear()
        kept[fill_key] = (t.paddr, perms)
        if self._others():
            perms = self._shared_code(t.paddr, kind, perms)
        entry.paddr = t.paddr
        entry.perms = perms
        return True

    def _shared_code(self, page: int, kind: int, perms: int) -> int:
        """Several CPUs, each translating code on its own: a page one runs code from is
        writable in the others' TLBs only after a fill for a write, which tells the CPUs
        running it that their translations are stale (QEMU's vCPUs share one code
        cache; sevsim's engines do not). OVMF's MpInitLib rewrites the APs' start code
        between wake-ups."""
        executed = self.memory.executed
        if kind == ACCESS_FETCH:
            self._tell(page, Change.EXECUTED)
        elif kind == ACCESS_WRITE:
            if page in executed:
                self._tell(page, Change.CODE_WRITTEN)
        elif page in executed:
            perms &= ~UC_PROT_WRITE  # a later write fills again
        if perms & UC_PROT_WRITE:
            self._writable[page] = self._generation
        return perms

    def _remembered(self, key: tuple[int, int, bool]) -> Translation | None:
        """The translation of an earlier walk whose table entries are all unchanged."""
        known = self._walks.get(key)
        if known is None:
            return None
        kid = self.kid
        for view, off, entry, owner, index, value, _ in known.entries:
            if owner[index] != kid or entry.unpack_from(view, off)[0] != value:
                return None
        self._note_tables(known.entries)
        return known.translation

    def _note_tables(self, entries: tuple[_Read, ...]) -> None:
        """Keep a copy of each table page a fill read, as the first fill since the last
        flush found it; a later fill that read an entry other than that copy holds
        marks the tables changed (:meth:`reload_cr3`)."""
        noted = self._tables
        for view, off, entry, _, _, value, page in entries:
            first = noted.get(page)
            if first is None:
                start = off & PAGE_MASK
                noted[page] = (view, start, view[start : start + PAGE_SIZE].tobytes())
            elif entry.unpack_from(first[2], off & _IN_PAGE)[0] != value:
                self._tables_changed = True

    def _walk_and_remember(
        self, vaddr: int, kind: int, cpl: int, key: tuple[int, int, bool]
    ) -> Translation | PageFault | NonCanonical:
        entries: list[_Read] = []

        def read(paddr: int, size: int) -> memoryview:
            region, off = self._table_at(paddr)
            raw = region.view[off : off + size]
            entry = _ENTRY[size]
            entries.append((region.view, off, entry, region.owner, off // PAGE_SIZE,
                            entry.unpack(raw)[0], paddr & PAGE_MASK))  # fmt: skip
            return raw

        t = walk(self.mode, vaddr, kind, cpl, read)
        if isinstance(t, Translation):
            if len(self._walks) >= _WALKS_KEPT:
                self._walks.clear()
            known = self._walks[key] = _Walk(t, tuple(entries))
            self._note_tables(known.entries)
        return t

    def _refuse(self, fault: Fault, entry: Any) -> bool:
        """A fault: map the page to a page that does not exist, so that the access
        reports its exact offset (:meth:`unmapped`); a probe just fails."""
        if self._probing:
            return False
        self._pending = fault
        entry.paddr = POISON
        entry.perms = UC_PROT_READ | UC_PROT_WRITE | UC_PROT_EXEC
        return True

    def take_fault(self) -> Fault | None:
        """The fault of the last fill that was refused (an MMIO page), once."""
        fault, self.fault = self.fault, None
        return fault

    def unmapped(self, access_write: bool, access_fetch: bool, address: int) -> Fault:
        """The access that reached the poison page (or an address nothing maps): the
        fault is exact now. The poison translation must leave the TLB afterwards."""
        pending, self._pending = self._pending, None
        self._stale()
        if pending is None or address & PAGE_MASK != POISON:
            return Fault(address, ACCESS_READ, vector=13)
        exact = pending.vaddr | (address & 0xFFF)
        if pending.npf_gpa is not None:
            return Fault(exact, pending.access, npf_gpa=pending.npf_gpa | (address & 0xFFF))
        return Fault(exact, pending.access, pending.vector, pending.error_code)

    def read_table(self, paddr: int, size: int) -> memoryview:
        """Page-table reads: always private; a table outside RAM is a nested fault."""
        region, off = self._table_at(paddr)
        return region.view[off : off + size]

    def _table_at(self, paddr: int) -> tuple[RamRegion, int]:
        """The region and offset of a page-table entry, its page in the CPU's view."""
        region = self.memory.ram_at(paddr)
        if region is None:
            raise _TableNpf(paddr)
        self.memory.convert(region, paddr & PAGE_MASK, self.kid)
        return region, paddr - region.gpa

    # -- the model's own guest-virtual accesses ------------------------------------

    def translate(self, vaddr: int, access: int) -> tuple[RamRegion, int]:
        """(region, physical address) of a supervisor access, through the TLB; raises
        GuestAccessFault with the exact fault the CPU would take."""
        if self._mode.efer & M.EFER_LMA and vaddr >> 47 not in (0, (1 << 17) - 1):
            # The TLB probe would see the address truncated; the CPU raises #GP(0).
            raise GuestAccessFault(Fault(vaddr, access, vector=13))
        paddr = self.tlb_paddr(vaddr, _PROT[access])
        if paddr >= 0 and self._cpl() == 0:
            region = self.memory.ram_at(paddr)
            if region is not None:
                return region, paddr
        return self._walk(vaddr, access)

    def tlb_paddr(self, vaddr: int, prot: int) -> int:
        """The physical address Unicorn's TLB gives an access of ``prot`` (UC_PROT_*)
        to ``vaddr`` at the CPU's current privilege level, filled on a miss as the
        access itself would fill it; -1 when the fill refuses (a fault, or no RAM:
        :meth:`translate` says which). ``vaddr`` must be canonical in long mode."""
        self._probing = True
        try:
            failed = _vmem_translate(self._handle, vaddr if vaddr < _INT_ADDRESSES else
                                     ctypes.c_uint64(vaddr), prot, self._paddr_ref)  # fmt: skip
        finally:
            self._probing = False
        return -1 if failed else self._paddr.value

    def tlb_maps(self, pages: tuple[tuple[int, int], ...]) -> bool:
        """Whether the TLB, filled on a miss, still maps each (linear page, physical
        page) of ``pages`` so for a read (:meth:`tlb_paddr` for each, in one call: an
        exception delivery checks the pages it read the last time)."""
        handle, paddr, ref = self._handle, self._paddr, self._paddr_ref
        self._probing = True
        try:
            for linear, physical in pages:
                if _vmem_translate(handle, linear if linear < _INT_ADDRESSES else
                                   ctypes.c_uint64(linear), UC_PROT_READ, ref) or (
                        paddr.value != physical):  # fmt: skip
                    return False
        finally:
            self._probing = False
        return True

    def _walk(self, vaddr: int, access: int) -> tuple[RamRegion, int]:
        """The slow path: sevsim's walk at CPL 0, converting the page as a fill would."""
        try:
            t = walk(self.mode, vaddr, access, 0, self.read_table)
        except _TableNpf as table:
            raise GuestAccessFault(Fault(vaddr, access, npf_gpa=table.gpa)) from None
        if isinstance(t, NonCanonical):
            raise GuestAccessFault(Fault(vaddr, access, vector=13))
        if isinstance(t, PageFault):
            raise GuestAccessFault(Fault(vaddr, access, vector=14, error_code=t.error_code))
        paddr = t.paddr | (vaddr & 0xFFF)
        region = self.memory.ram_at(paddr)
        if region is None or (region.readonly and (access == ACCESS_WRITE or not region.romd)):
            raise GuestAccessFault(Fault(vaddr, access, npf_gpa=paddr))
        kid = self.kid if t.private or access == ACCESS_FETCH else SHARED
        if self.memory.convert(region, t.paddr, kid) and self.tlb_stale:
            self.flush_tlb()
        return region, paddr

    def _access(self, vaddr: int, size: int, access: int, data: bytes | None) -> bytes:
        va = vaddr & 0xFFFF_FFFF_FFFF_FFFF
        if 0 < size and (va & 0xFFF) + size <= 0x1000:  # one page (a gate, a frame)
            region, pa = self.translate(va, access)
            off = pa - region.gpa
            if data is None:
                return region.view[off : off + size].tobytes()
            region.view[off : off + size] = data
            self.written(pa & PAGE_MASK)
            return b""
        out = bytearray()
        done = 0
        while done < size:
            va = (vaddr + done) & 0xFFFF_FFFF_FFFF_FFFF
            chunk = min(size - done, 0x1000 - (va & 0xFFF))
            region, pa = self.translate(va, access)
            off = pa - region.gpa
            if data is None:
                out += region.view[off : off + chunk]
            else:
                region.view[off : off + chunk] = data[done : done + chunk]
                self.written(pa & PAGE_MASK)
            done += chunk
        return bytes(out)

    def holds_code(self, page: int) -> bool:
        """Whether code may have been translated from physical ``page``: a write by the
        model there makes that code stale (:meth:`written`)."""
        return page in self._code_pages

    def written(self, page: int) -> None:
        """The model wrote guest memory in ``page``: code translated from it is stale."""
        if page in self._code_pages:
            self.code_stale = True
        if self._others() and page in self.memory.executed:
            self._tell(page, Change.CODE_WRITTEN)

    def read(self, vaddr: int, size: int) -> bytes:
        va = vaddr & 0xFFFF_FFFF_FFFF_FFFF
        if 0 < size and (va & 0xFFF) + size <= 0x1000:  # one page (_access, inline)
            region, pa = self.translate(va, ACCESS_READ)
            off = pa - region.gpa
            return region.view[off : off + size].tobytes()
        return self._access(vaddr, size, ACCESS_READ, None)

    def write(self, vaddr: int, data: bytes) -> None:
        va = vaddr & 0xFFFF_FFFF_FFFF_FFFF
        size = len(data)
        if 0 < size and (va & 0xFFF) + size <= 0x1000:  # one page (_access, inline)
            region, pa = self.translate(va, ACCESS_WRITE)
            off = pa - region.gpa
            region.view[off : off + size] = data
            self.written(pa & PAGE_MASK)
            return
        self._access(vaddr, size, ACCESS_WRITE, data)

    def fetch(self, vaddr: int, size: int) -> bytes:
        """Instruction bytes as the CPU fetches them (always private)."""
        return self._access(vaddr, size, ACCESS_FETCH, None)

    def code_at(self, vaddr: int, size: int) -> bytes:
        """The bytes of code Unicorn just translated (its pages are in the TLB), as far
        as they can be read; empty if not even the first page can."""
        try:
            return self.fetch(vaddr, size)
        except GuestAccessFault:
            first = 0x1000 - (vaddr & 0xFFF)
            if first >= size:
                return b""
            try:
                return self.fetch(vaddr, first)
            except GuestAccessFault:
                return b""

    def guest_physical(self, vaddr: int) -> tuple[int, bool]:
        """(guest-physical address, private) of ``vaddr`` — Linux's slow_virt_to_phys."""
        t = walk(self.mode, vaddr & PAGE_MASK, ACCESS_READ, 0, self.read_table)
        if isinstance(t, PageFault | NonCanonical):
            raise GuestAccessFault(Fault(vaddr, ACCESS_READ, vector=14))
        return t.paddr | (vaddr & 0xFFF), t.private


__all__ = ["POISON", "Fault", "GuestAccessFault", "Mmu", "Translation"]
