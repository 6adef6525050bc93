"""Guest-physical memory and the memory-encryption engine in front of it.

Every RAM region is one anonymous host mapping (``mmap``), committed by the host
kernel only where it is touched, that each vCPU's Unicorn maps directly
(``mem_map_ptr``): guest code runs at native speed on its plaintext. What DRAM holds
follows from each page's *owner*:

- ``SHARED`` (0): DRAM holds the buffer's bytes as they are (the guest wrote them
  with C=0, the host wrote them, or nobody touched the page yet);
- a key id: DRAM holds ``AES-XTS(that key, page address, buffer)``; the buffer is
  the plaintext a guest running under that key sees through C=1.

Nothing is encrypted until someone looks (performance rule): the host's view of a
private page is computed on each host read, and a host write into a private page
lands in DRAM as written, so the guest sees its decryption. When a CPU touches a
page with another key than its owner's (the other C-bit value, or another guest's
key), the page converts: DRAM is unchanged, the buffer is re-derived from it. Reading
a private page with C=0 shows its ciphertext; reading another guest's page through
C=1 shows the decryption of its ciphertext under the wrong key; reading a fresh page
through C=1 shows the decryption of zeros. That is what real hardware shows, because
every view is derived from the same DRAM contents.

A region may be a read-only memory slot (a flash chip's ROM view, as QEMU maps
pflash for an SEV-ES guest): guest reads are served from memory, guest writes exit
as MMIO. In "device mode" (a flash command in progress) reads exit too.

CPUs register :attr:`GuestMemory.on_page_changed` callbacks: the buffer of a page
changed behind their backs (its owner, or host-written bytes), so translations and
translated code of that page may be stale.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import sys
from array import array
from collections.abc import Callable, Iterator, Sequence
from enum import IntEnum

from attrs import frozen

from sevsim.errors import GuestMemoryError
from sevsim.hw.crypto import PAGE_SIZE, PageCipher

PAGE_MASK = ~(PAGE_SIZE - 1)
#: madvise(MADV_POPULATE_WRITE) (Linux 5.14): the host kernel commits a range of a
#: mapping in one call instead of one page fault per page touched.
_MADV_POPULATE_WRITE: int | None = getattr(
    mmap, "MADV_POPULATE_WRITE", 23 if sys.platform == "linux" else None
)
#: Host writes at least this large commit their range first (an image being placed).
POPULATE_MIN = 64 << 10
#: Owner of a page whose DRAM holds the buffer's bytes unencrypted.
SHARED = 0


class Change(IntEnum):
    """What changed about a page, for :attr:`GuestMemory.on_page_changed`."""

    BYTES = 1  # the host wrote into it: translated code there is stale
    VIEW = 2  # its owner changed (or it left ROM mode): translations are stale too
    # Between the CPUs of one guest, each with its own engine and translated code:
    EXECUTED = 3  # a CPU runs code from it: the others must not write it unseen
    CODE_WRITTEN = 4  # a CPU wrote into it: the others' code translated from it is stale


_BYTES = Change.BYTES  # bound once: an Enum class attribute costs more than a global


@frozen
class MmioHole:
    """A guest-physical range with no RAM behind it: accesses go to devices."""

    gpa: int
    size: int
    name: str

    @property
    def end(self) -> int:
        return self.gpa + self.size


class RamRegion:
    """One RAM region: a lazily committed host mapping plus each page's owner."""

    __slots__ = ("_anchor", "_map", "address", "gpa", "name", "owner", "readonly", "romd",
                 "size", "view")  # fmt: skip

    def __init__(self, gpa: int, size: int, name: str, readonly: bool = False) -> None:
        self.gpa, self.size, self.name = gpa, size, name
        #: Guest writes exit as MMIO (a ROM device); ``romd`` False: reads exit too.
        self.readonly = readonly
        self.romd = True
        self._map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
        self._anchor = ctypes.c_char.from_buffer(self._map)
        #: Host address of the mapping, for ``Uc.mem_map_ptr``.
        self.address = ctypes.addressof(self._anchor)
        self.view = memoryview(self._map)
        #: Key id of each page (``SHARED`` for plaintext DRAM).
        self.owner = array("I", bytes(4 * (size // PAGE_SIZE)))

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def page_view(self, page: int) -> memoryview:
        off = page - self.gpa
        return self.view[off : off + PAGE_SIZE]

    def populate(self, off: int, length: int) -> None:
        """Commit ``[off, off+length)`` of the mapping at once, before a write fills all
        of it: one call rather than a page fault per host page. Only what the write is
        about to touch is committed, so RSS stays what has been touched. A host that
        cannot (Linux before 5.14, other systems) lets the write fault the pages in."""
        if _MADV_POPULATE_WRITE is None or length < POPULATE_MIN:
            return
        start = off - off % mmap.PAGESIZE
        try:
            self._map.madvise(_MADV_POPULATE_WRITE, start, off + length - start)
        except OSError:  # EINVAL on an older kernel
            pass

    def release(self) -> None:
        """Give the host memory back (the region is unusable afterwards)."""
        self.view.release()
        del self._anchor
        self._map.close()


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
        self._starts: list[int] = []
        self._mmio: list[MmioHole] = []
        #: Key id -> cipher (index 0, SHARED, has none).
        self._ciphers: list[PageCipher | None] = [None]
        self._key_ids: dict[bytes, int] = {}
        self.on_page_changed: list[Callable[[int, Change], None]] = []
        #: Pages some CPU has run code from.
        self.executed: set[int] = set()

    # -- layout -------------------------------------------------------------------

    def add_ram(self, gpa: int, size: int, name: str = "ram", readonly: bool = False) -> RamRegion:
        _check_range(f"RAM region {name!r}", gpa, size)
        self._refuse_overlap(name, gpa, size)
        region = RamRegion(gpa, size, name, readonly)
        at = bisect.bisect(self._starts, gpa)
        self._ram.insert(at, region)
        self._starts.insert(at, gpa)
        return region

    def add_mmio(self, gpa: int, size: int, name: str) -> MmioHole:
        _check_range(f"MMIO hole {name!r}", gpa, size)
        self._refuse_overlap(name, gpa, size)
        hole = MmioHole(gpa, size, name)
        self._mmio.append(hole)
        return hole

    def _refuse_overlap(self, name: str, gpa: int, size: int) -> None:
        others: tuple[RamRegion | MmioHole, ...] = (*self._ram, *self._mmio)
        for other in others:
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
        at = bisect.bisect(self._starts, gpa) - 1
        if at >= 0:
            region = self._ram[at]
            if gpa < region.gpa + region.size:  # region.end, without a property call
                return region
        return None

    def _region(self, gpa: int, size: int) -> RamRegion:
        region = self.ram_at(gpa)
        if region is None or gpa + size > region.end:
            raise GuestMemoryError(
                f"[{gpa:#x}, {gpa + size:#x}) is not inside one RAM region; RAM is "
                + (", ".join(f"[{r.gpa:#x}, {r.end:#x})" for r in self._ram) or "empty")
            )
        return region

    def set_romd(self, gpa: int, romd: bool) -> None:
        """Put a read-only region in ROM mode (reads from memory) or device mode (reads
        exit as MMIO too), as QEMU's ``memory_region_rom_device_set_romd``."""
        region = self._region(gpa, 1)
        if not region.readonly:
            raise GuestMemoryError(f"{region.name!r} is RAM, not a ROM device's memory slot")
        if region.romd != romd:
            region.romd = romd
            for page in range(region.gpa, region.end, PAGE_SIZE):
                self._changed(page, Change.VIEW)

    def release(self) -> None:
        """Return every region's host memory (the VM is gone)."""
        for region in self._ram:
            region.release()
        self._ram.clear()
        self._starts.clear()

    # -- keys -----------------------------------------------------------------------

    def key_id(self, key: bytes | None) -> int:
        """The small number pages record for ``key`` (None: SHARED), assigned on first use."""
        if key is None:
            return SHARED
        kid = self._key_ids.get(key)
        if kid is None:
            kid = self._key_ids[key] = len(self._ciphers)
            self._ciphers.append(PageCipher(key))
        return kid

    def _cipher(self, kid: int) -> PageCipher:
        cipher = self._ciphers[kid]
        assert cipher is not None
        return cipher

    # -- page owners ------------------------------------------------------------------

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

    @staticmethod
    def _all_shared(region: RamRegion, start: int, stop: int) -> bool:
        """Whether every page overlapping ``[start, stop)`` (inside ``region``) is SHARED."""
        first = (start - region.gpa) // PAGE_SIZE
        last = (stop - 1 - region.gpa) // PAGE_SIZE + 1
        return region.owner[first:last].count(SHARED) == last - first

    def _changed_range(self, start: int, stop: int, change: Change) -> None:
        """:meth:`_changed` for every page overlapping ``[start, stop)``."""
        if self.on_page_changed:
            for page in range(start & PAGE_MASK, stop, PAGE_SIZE):
                self._changed(page, change)

    def owner(self, gpa: int) -> int:
        region = self._region(gpa, 1)
        return region.owner[(gpa - region.gpa) // PAGE_SIZE]

    def _dram(self, region: RamRegion, page: int, owner: int) -> bytes:
        data = region.page_view(page)
        return bytes(data) if owner == SHARED else self._cipher(owner).encrypt(page, data)

    def convert(self, region: RamRegion, page: int, kid: int) -> bool:
        """Make the buffer show ``page`` as a CPU with key ``kid`` (SHARED: C=0) sees it;
        True if it changed. DRAM is unchanged; only the view of it is re-derived."""
        index = (page - region.gpa) // PAGE_SIZE
        owner = region.owner[index]
        if owner == kid:
            return False
        view = region.page_view(page)
        dram = bytes(view) if owner == SHARED else self._cipher(owner).encrypt(page, view)
        view[:] = dram if kid == SHARED else self._cipher(kid).decrypt(page, dram)
        region.owner[index] = kid
        self._changed(page, Change.VIEW)
        return True

    def _changed(self, page: int, change: Change) -> None:
        for callback in self.on_page_changed:
            callback(page, change)

    def cpus_changed(self, page: int, change: Change) -> None:
        """A CPU tells the others what it did to ``page`` (EXECUTED, CODE_WRITTEN)."""
        self._changed(page, change)

    # -- the host's view ---------------------------------------------------------

    def host_read(self, gpa: int, size: int) -> bytes:
        """What the hypervisor reads: plaintext of shared pages, ciphertext of private ones."""
        region = self.ram_at(gpa)
        if region is not None and 0 < size <= PAGE_SIZE - (gpa & ~PAGE_MASK):
            index = (gpa - region.gpa) // PAGE_SIZE
            if index < len(region.owner) and region.owner[index] == SHARED:  # one shared page
                off = gpa - region.gpa
                return region.view[off : off + size].tobytes()
        out = bytearray()
        for region, page, start, length in self._pages(gpa, size):
            owner = region.owner[(page - region.gpa) // PAGE_SIZE]
            if owner == SHARED:
                off = page + start - region.gpa
                out += region.view[off : off + length]
            else:
                out += self._dram(region, page, owner)[start : start + length]
        return bytes(out)

    def host_write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """A hypervisor write: lands in DRAM as written (the guest decrypts private pages)."""
        data = memoryview(bytes(data))
        if len(data) > PAGE_SIZE and self._host_write_shared(gpa, data):
            return
        done = 0
        for region, page, start, length in self._pages(gpa, len(data)):
            chunk = data[done : done + length]
            owner = region.owner[(page - region.gpa) // PAGE_SIZE]
            if owner == SHARED:
                off = page + start - region.gpa
                region.view[off : off + length] = chunk
            else:
                cipher = self._cipher(owner)
                dram = bytearray(cipher.encrypt(page, region.page_view(page)))
                dram[start : start + length] = chunk
                region.page_view(page)[:] = cipher.decrypt(page, dram)
            self._changed(page, Change.BYTES)
            done += length

    def _host_write_shared(self, gpa: int, data: memoryview) -> bool:
        """:meth:`host_write` of a range inside one region whose pages are all SHARED (the
        VMM placing an image before launch): one copy into the buffer. False, with
        nothing written, for any other range (it goes page by page)."""
        region = self.ram_at(gpa)
        end = gpa + len(data)
        if region is None or end > region.end or not self._all_shared(region, gpa, end):
            return False
        off = gpa - region.gpa
        region.populate(off, len(data))
        region.view[off : off + len(data)] = data
        self._changed_range(gpa, end, Change.BYTES)
        return True

    def host_write_parts(self, gpa: int, parts: Sequence[tuple[int, bytes | bytearray]]) -> None:
        """Host writes of ``data`` at ``gpa + offset`` for each ``(offset, data)``, in
        order: the same as :meth:`host_write` of each. Parts that all lie in one shared
        page (what KVM wrote into a GHCB) are copied in, and the page's change told once."""
        page = gpa & PAGE_MASK
        region = self.ram_at(page)
        if region is not None and parts:
            first = page - region.gpa  # the page's offset in the region
            inside = first + PAGE_SIZE <= region.size and region.owner[first // PAGE_SIZE] == SHARED
            base = gpa - page
            for off, data in parts:
                if not (inside and 0 <= base + off and base + off + len(data) <= PAGE_SIZE):
                    inside = False
                    break
            if inside:
                view, base = region.view, gpa - region.gpa
                for off, data in parts:
                    view[base + off : base + off + len(data)] = data
                self._changed(page, _BYTES)
                return
        for off, data in parts:
            self.host_write(gpa + off, data)

    # -- a CPU's view (hardware-internal) ----------------------------------------------

    def guest_read(self, gpa: int, size: int, kid: int) -> bytes:
        """Read as a CPU with key ``kid`` (SHARED for a C=0 translation) would."""
        out = bytearray()
        for region, page, start, length in self._pages(gpa, size):
            self.convert(region, page, kid)
            off = page + start - region.gpa
            out += region.view[off : off + length]
        return bytes(out)

    def guest_write(self, gpa: int, data: bytes | bytearray, kid: int) -> None:
        done = 0
        for region, page, start, length in self._pages(gpa, len(data)):
            self.convert(region, page, kid)
            off = page + start - region.gpa
            region.view[off : off + length] = data[done : done + length]
            done += length

    # -- the SEV firmware's launch path ----------------------------------------------

    def launch_encrypt(self, gpa: int, length: int, key: bytes) -> bytes | memoryview:
        """LAUNCH_UPDATE_DATA: return the bytes the host placed there, encrypted in place.

        Only the launched bytes are measured, so only they may reach the guest as
        plaintext. Encryption is modelled per page: in a page launched in part, every
        byte outside the launched ranges shows the guest the decryption of what DRAM
        held, as on hardware, and cannot carry unmeasured code or data.

        Whole SHARED pages need no cipher at all: DRAM will hold their encryption, which
        is derived only if the host reads them (lazily), and the buffer keeps the
        plaintext the guest sees. So a range of them in one region (a firmware image)
        costs one store of its owners, and its bytes come back as a view of the buffer
        (no copy): the firmware measures them before anything runs.
        """
        kid = self.key_id(key)
        whole = self._launch_shared(gpa, length, kid)
        if whole is not None:
            return whole
        cipher = self._cipher(kid)
        measured = bytearray()
        for region, page, start, size in self._pages(gpa, length):
            index = (page - region.gpa) // PAGE_SIZE
            view = region.page_view(page)
            owner = region.owner[index]
            if owner != SHARED:
                if size == PAGE_SIZE:
                    raise GuestMemoryError(f"page {page:#x} is already encrypted")
                launched = self._dram(region, page, owner)[start : start + size]
                view[:] = cipher.decrypt(page, self._dram(region, page, owner))
            else:
                launched = bytes(view[start : start + size])
                if size < PAGE_SIZE:  # the rest of the page: decrypted DRAM, i.e. garbage
                    view[:] = cipher.decrypt(page, view)
            measured += launched
            view[start : start + size] = launched
            region.owner[index] = kid
            self._changed(page, Change.VIEW)
        return bytes(measured)

    def _launch_shared(self, gpa: int, length: int, kid: int) -> memoryview | None:
        """:meth:`launch_encrypt` of whole pages, inside one region and all SHARED, at
        once: the launched bytes. None, with nothing done, for any other range (it goes
        page by page)."""
        region = self.ram_at(gpa)
        end = gpa + length
        if (region is None or end > region.end or (gpa | length) & ~PAGE_MASK
                or not self._all_shared(region, gpa, end)):  # fmt: skip
            return None
        first, count = (gpa - region.gpa) // PAGE_SIZE, length // PAGE_SIZE
        launched = region.view[gpa - region.gpa : end - region.gpa].toreadonly()
        region.owner[first : first + count] = array("I", (kid,)) * count
        self._changed_range(gpa, end, Change.VIEW)
        return launched
