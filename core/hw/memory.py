"""Guest-physical memory and the memory-encryption engine in front of it.

Every RAM region is one host buffer that each vCPU's Unicorn maps directly
(``mem_map_ptr``), so guest code runs at native speed on plaintext. What is in
DRAM follows from a per-page *form*:

- ``SHARED``: DRAM holds the buffer's bytes as they are (the guest wrote them with
  C=0, or the host wrote them);
- ``PRIVATE``: DRAM holds ``AES-XTS(guest key, page address, buffer)``; the buffer is
  the guest's plaintext view through C=1.

Nothing is encrypted until someone looks (performance rule): the host's view of a
private page is computed on each host read, and a host write into a private page
lands in DRAM as written, so the guest sees its decryption. When the guest touches
a page through the other C-bit value than its current form, the page converts:
reading a private page with C=0 shows its ciphertext, reading a shared page with
C=1 shows the decryption of whatever is there. That is what real hardware shows,
because both views are derived from the same DRAM contents.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator
from enum import IntEnum

from attrs import define, field, frozen

from sevsim.errors import GuestMemoryError
from sevsim.hw.crypto import PAGE_SIZE, PageCipher

PAGE_MASK = ~(PAGE_SIZE - 1)


class PageForm(IntEnum):
    SHARED = 0
    PRIVATE = 1


@frozen
class MmioHole:
    """A guest-physical range with no RAM behind it: accesses go to devices."""

    gpa: int
    size: int
    name: str

    @property
    def end(self) -> int:
        return self.gpa + self.size


@define(eq=False)
class RamRegion:
    """One RAM region: a host buffer plus the form of each of its pages."""

    gpa: int
    size: int
    name: str
    buffer: ctypes.Array = field(repr=False)
    forms: bytearray = field(repr=False)

    @classmethod
    def allocate(cls, gpa: int, size: int, name: str) -> RamRegion:
        return cls(gpa, size, name, (ctypes.c_ubyte * size)(), bytearray(size // PAGE_SIZE))

    @property
    def end(self) -> int:
        return self.gpa + self.size

    @property
    def address(self) -> int:
        """Host address of the buffer, for ``Uc.mem_map_ptr``."""
        return ctypes.addressof(self.buffer)

    @property
    def view(self) -> memoryview:
        return memoryview(self.buffer).cast("B")


def _check_range(what: str, gpa: int, size: int) -> None:
    if gpa % PAGE_SIZE or size % PAGE_SIZE or size <= 0:
        raise GuestMemoryError(
            f"{what} at {gpa:#x} size {size:#x}: expected a page-aligned address and a "
            f"non-zero multiple of {PAGE_SIZE:#x} bytes"
        )
    if gpa < 0 or gpa + size > 1 << 52:
        raise GuestMemoryError(
            f"{what} at {gpa:#x} size {size:#x} is outside the 52-bit physical address space"
        )


class GuestMemory:
    """One VM's guest-physical address space: RAM regions, MMIO holes, encryption."""

    def __init__(self) -> None:
        self._ram: list[RamRegion] = []
        self._mmio: list[MmioHole] = []
        self._cipher: PageCipher | None = None
        #: Called with a page's guest-physical address when its form or bytes change
        #: behind the CPUs' backs (conversion, host write into a private page).
        self.on_page_changed: list[Callable[[int], None]] = []

    # -- layout -------------------------------------------------------------------

    def add_ram(self, gpa: int, size: int, name: str = "ram") -> RamRegion:
        _check_range(f"RAM region {name!r}", gpa, size)
        self._refuse_overlap(name, gpa, size)
        region = RamRegion.allocate(gpa, size, name)
        self._ram.append(region)
        self._ram.sort(key=lambda r: r.gpa)
        return region

    def add_mmio(self, gpa: int, size: int, name: str) -> MmioHole:
        _check_range(f"MMIO hole {name!r}", gpa, size)
        self._refuse_overlap(name, gpa, size)
        hole = MmioHole(gpa, size, name)
        self._mmio.append(hole)
        return hole

    def _refuse_overlap(self, name: str, gpa: int, size: int) -> None:
        for other in (*self._ram, *self._mmio):
            if gpa < other.end and other.gpa < gpa + size:
                raise GuestMemoryError(
                    f"{name!r} [{gpa:#x}, {gpa + size:#x}) overlaps {other.name!r} "
                    f"[{other.gpa:#x}, {other.end:#x})"
                )

    @property
    def ram(self) -> tuple[RamRegion, ...]:
        return tuple(self._ram)

    @property
    def mmio(self) -> tuple[MmioHole, ...]:
        return tuple(self._mmio)

    def ram_at(self, gpa: int) -> RamRegion | None:
        for region in self._ram:
            if region.gpa <= gpa < region.end:
                return region
        return None

    def mmio_at(self, gpa: int) -> MmioHole | None:
        for hole in self._mmio:
            if hole.gpa <= gpa < hole.end:
                return hole
        return None

    def _region(self, gpa: int, size: int) -> RamRegion:
        region = self.ram_at(gpa)
        if region is None or gpa + size > region.end:
            raise GuestMemoryError(
                f"[{gpa:#x}, {gpa + size:#x}) is not inside one RAM region; RAM is "
                + (", ".join(f"[{r.gpa:#x}, {r.end:#x})" for r in self._ram) or "empty")
            )
        return region

    # -- the memory controller's key ---------------------------------------------

    def install_key(self, key: bytes | None) -> None:
        """Bind (or, with None, unbind) the guest's encryption key, as ACTIVATE does."""
        self._cipher = PageCipher(key) if key is not None else None

    def _need_cipher(self, what: str) -> PageCipher:
        if self._cipher is None:
            raise GuestMemoryError(
                f"{what}: no guest key is installed (LAUNCH_START/ACTIVATE first)"
            )
        return self._cipher

    # -- page forms ---------------------------------------------------------------

    def _pages(self, gpa: int, size: int) -> Iterator[tuple[RamRegion, int, int, int]]:
        """(region, page gpa, start offset in page, length) for each page touched."""
        end = gpa + size
        while gpa < end:
            region = self._region(gpa, 1)
            page = gpa & PAGE_MASK
            start = gpa - page
            length = min(end, page + PAGE_SIZE) - gpa
            yield region, page, start, length
            gpa += length

    def form(self, gpa: int) -> PageForm:
        region = self._region(gpa, 1)
        return PageForm(region.forms[(gpa - region.gpa) // PAGE_SIZE])

    def _page_view(self, region: RamRegion, page: int) -> memoryview:
        off = page - region.gpa
        return region.view[off : off + PAGE_SIZE]

    def _dram(self, region: RamRegion, page: int) -> bytes:
        """What DRAM holds for a page: the buffer, encrypted if the page is private."""
        data = self._page_view(region, page)
        if region.forms[(page - region.gpa) // PAGE_SIZE] == PageForm.PRIVATE:
            return self._need_cipher(f"page {page:#x}").encrypt(page, data)
        return bytes(data)

    def _store_dram(self, region: RamRegion, page: int, dram: bytes) -> None:
        view = self._page_view(region, page)
        if region.forms[(page - region.gpa) // PAGE_SIZE] == PageForm.PRIVATE:
            view[:] = self._need_cipher(f"page {page:#x}").decrypt(page, dram)
        else:
            view[:] = dram

    def convert(self, gpa: int, form: PageForm) -> bool:
        """Make the buffer show the page through ``form``; True if it changed.

        Called by the CPU's page walk when the guest's translation of a page has the
        other C-bit value. DRAM is unchanged; only the guest's view of it changes.
        """
        region = self._region(gpa, 1)
        page = gpa & PAGE_MASK
        index = (page - region.gpa) // PAGE_SIZE
        if region.forms[index] == form:
            return False
        cipher = self._need_cipher(f"C-bit access to page {page:#x}")
        view = self._page_view(region, page)
        if form == PageForm.SHARED:  # DRAM (ciphertext) shows through as it is
            view[:] = cipher.encrypt(page, view)
        else:  # DRAM bytes are run through the decryption
            view[:] = cipher.decrypt(page, view)
        region.forms[index] = form
        self._changed(page)
        return True

    def _changed(self, page: int) -> None:
        for callback in self.on_page_changed:
            callback(page)

    # -- the host's view ---------------------------------------------------------

    def host_read(self, gpa: int, size: int) -> bytes:
        """What the hypervisor reads: plaintext of shared pages, ciphertext of private ones."""
        out = bytearray()
        for region, page, start, length in self._pages(gpa, size):
            if region.forms[(page - region.gpa) // PAGE_SIZE] == PageForm.PRIVATE:
                out += self._dram(region, page)[start : start + length]
            else:
                off = page + start - region.gpa
                out += region.view[off : off + length]
        return bytes(out)

    def host_write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """A hypervisor write: lands in DRAM as written (the guest decrypts private pages)."""
        data = memoryview(bytes(data))
        done = 0
        for region, page, start, length in self._pages(gpa, len(data)):
            chunk = data[done : done + length]
            if region.forms[(page - region.gpa) // PAGE_SIZE] == PageForm.PRIVATE:
                dram = bytearray(self._dram(region, page))
                dram[start : start + length] = chunk
                self._store_dram(region, page, bytes(dram))
                self._changed(page)
            else:
                off = page + start - region.gpa
                region.view[off : off + length] = chunk
            done += length

    # -- the guest's view (hardware-internal) ------------------------------------------

    def guest_read(self, gpa: int, size: int, private: bool = True) -> bytes:
        """Read as the guest would through a translation with C-bit ``private``."""
        form = PageForm.PRIVATE if private else PageForm.SHARED
        out = bytearray()
        for region, page, start, length in self._pages(gpa, size):
            self.convert(page, form)
            off = page + start - region.gpa
            out += region.view[off : off + length]
        return bytes(out)

    def guest_write(self, gpa: int, data: bytes | bytearray, private: bool = True) -> None:
        form = PageForm.PRIVATE if private else PageForm.SHARED
        done = 0
        for region, page, start, length in self._pages(gpa, len(data)):
            self.convert(page, form)
            off = page + start - region.gpa
            region.view[off : off + length] = data[done : done + length]
            done += length

    # -- the SEV firmware's launch path ----------------------------------------------

    def launch_encrypt(self, gpa: int, length: int, key: bytes) -> bytes:
        """LAUNCH_UPDATE_DATA: return the bytes the host placed there, encrypted in place.

        Only the launched bytes are measured, so only they may reach the guest as
        plaintext. Encryption is modelled per page: in a page launched in part, every
        byte outside the launched ranges shows the guest the decryption of what DRAM
        held, as on hardware, and cannot carry unmeasured code or data.
        """
        self.install_key(key)
        cipher = self._need_cipher("LAUNCH_UPDATE_DATA")
        measured = bytearray()
        for region, page, start, size in self._pages(gpa, length):
            index = (page - region.gpa) // PAGE_SIZE
            view = self._page_view(region, page)
            if region.forms[index] == PageForm.PRIVATE:
                if size == PAGE_SIZE:
                    raise GuestMemoryError(f"page {page:#x} is already encrypted")
                dram = cipher.encrypt(page, view)  # what the host sees there now
                launched = dram[start : start + size]
            else:
                launched = bytes(view[start : start + size])
                if size < PAGE_SIZE:  # the rest of the page: decrypted DRAM, i.e. garbage
                    view[:] = cipher.decrypt(page, view)
            measured += launched
            view[start : start + size] = launched
            region.forms[index] = PageForm.PRIVATE
        return bytes(measured)
