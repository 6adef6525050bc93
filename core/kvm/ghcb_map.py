"""The guest's GHCB page as KVM maps it (``kvm_vcpu_map``) for one exit.

KVM works on the page itself and writes only the fields it sets (``ghcb_set_*``, the
bitmap clear of ``sev_es_sync_from_ghcb``, a scratch area inside the page); every other
byte stays as the guest, or anyone else with access to the shared page, left it.
sevsim holds a copy of the page, so the copy records which bytes KVM wrote and
:meth:`MappedGhcb.flush` copies exactly those into guest memory.

The bytes written are kept as one integer, bit ``n`` for byte ``n`` of the page: a
write records itself with one OR of a mask known in advance, and a flush finds the
runs of written bytes of a mask it has seen before (an exit writes the same few
fields every time) with one lookup.
"""

from __future__ import annotations

from collections.abc import Sequence

from sevsim.arch.ghcb import GHCB, GHCB_PAGE_SIZE, GHCB_SAVE_AREA, INT_FIELDS, VALID_BITS, Ghcb
from sevsim.errors import LayoutError
from sevsim.hw import GuestMemoryView

_BITMAP = GHCB_SAVE_AREA.offset("valid_bitmap")
_BITMAP_END = _BITMAP + GHCB_SAVE_AREA["valid_bitmap"].size
_U64 = (1 << 64) - 1


def _bytes(offset: int, length: int) -> int:
    """The written-bytes mask of ``[offset, offset + length)``."""
    return ((1 << length) - 1) << offset


_BITMAP_BYTES = _bytes(_BITMAP, _BITMAP_END - _BITMAP)
_NO_BITS = bytes(_BITMAP_END - _BITMAP)
#: Every field's written-bytes mask, a save-area name first (as Ghcb looks names up).
_FIELD_BYTES = {f.name: _bytes(layout.offset(f.name), f.size)
                for layout in (GHCB, GHCB_SAVE_AREA) for f in layout.fields}  # fmt: skip
#: Integer save-area fields, all a write needs in one lookup: (offset, struct, largest
#: value, bitmap byte, bit mask, the bytes written: the field's and its bitmap byte).
_SETTERS = {name: (off, codec, limit, VALID_BITS[name][0], VALID_BITS[name][1],
                   _FIELD_BYTES[name] | 1 << VALID_BITS[name][0])
            for name, (off, codec, limit) in INT_FIELDS.items() if name in VALID_BITS}  # fmt: skip
#: The ``(offset, length)`` runs of the written-bytes masks flushed so far (emptied
#: when full).
_RUNS: dict[int, tuple[tuple[int, int], ...]] = {}
_RUNS_KEPT = 256


def _valid_bytes(*names: str) -> tuple[tuple[int, int], ...]:
    """The valid-bitmap bytes (offsets in the page) that ``names`` set bits in, with
    those bits: one OR per byte."""
    bits: dict[int, int] = {}
    for name in names:
        byte, bit = VALID_BITS[name]
        bits[byte] = bits.get(byte, 0) | bit
    return tuple(bits.items())


def _written(*names: str) -> int:
    """The written-bytes mask of ``ghcb_set_*`` of ``names``: the fields and their bits."""
    mask = 0
    for name in names:
        mask |= _SETTERS[name][5]
    return mask


# The two writes KVM makes on every exit, compiled from the layout: one struct call per
# run of adjacent fields, one OR per valid-bitmap byte (unpacking checks the counts).
#: ``svm_vmgexit_set_return_code``: sw_exit_info_1 and sw_exit_info_2, adjacent.
EXIT_INFO = ("sw_exit_info_1", "sw_exit_info_2")
_INFO = GHCB_SAVE_AREA.group(*EXIT_INFO)
_PACK_INFO, _INFO_AT = _INFO.codec.pack_into, _INFO.offset
((_INFO_BYTE, _INFO_BITS),) = _valid_bytes(*EXIT_INFO)
_INFO_WRITTEN = _written(*EXIT_INFO)
#: ``sev_es_sync_to_ghcb``: RAX, then RCX, RDX and RBX, adjacent.
_RAX, _RCX_RDX_RBX = GHCB_SAVE_AREA.group("rax"), GHCB_SAVE_AREA.group("rcx", "rdx", "rbx")
_PACK_RAX, _RAX_AT = _RAX.codec.pack_into, _RAX.offset
_PACK_RCX_RDX_RBX, _RCX_AT = _RCX_RDX_RBX.codec.pack_into, _RCX_RDX_RBX.offset
(_GPR_BYTE_1, _GPR_BITS_1), (_GPR_BYTE_2, _GPR_BITS_2) = _valid_bytes("rax", "rcx", "rdx", "rbx")
_GPRS_WRITTEN = _written("rax", "rcx", "rdx", "rbx")


class MappedGhcb(Ghcb):
    """A GHCB copy that remembers what KVM wrote to it since the last flush."""

    __slots__ = ("_dirty", "gpa", "snapshot_scratch")

    def __init__(self, raw: bytes, gpa: int) -> None:
        # Ghcb.__init__, inline (one page mapped per VMGEXIT).
        page = self.raw = bytearray(raw)
        if len(page) != GHCB_PAGE_SIZE:
            raise ValueError(f"a GHCB page is {GHCB_PAGE_SIZE} bytes, got {len(page)}")
        self.gpa = gpa
        #: The bytes written since the last flush, bit n for byte n of the page.
        self._dirty = 0
        #: ``sw_scratch`` as KVM took it when it synced from the page (newest KVM: 0
        #: unless the guest marked it valid).
        self.snapshot_scratch = 0

    @property
    def _written(self) -> tuple[tuple[int, int], ...]:
        """The ``(offset, length)`` runs of bytes written since the last flush, in order."""
        return _runs(self._dirty)

    def touch(self, offset: int, length: int) -> None:
        """Bytes ``[offset, offset + length)`` were written (e.g. a scratch area in place)."""
        if not 0 <= offset <= offset + length <= GHCB_PAGE_SIZE:
            raise LayoutError(f"touch({offset:#x}, {length:#x}): not a span of the GHCB page")
        self._dirty |= _bytes(offset, length)

    def __setitem__(self, name: str, value: int) -> None:
        self.set_fields((name,), (value,))

    def set_fields(self, names: tuple[str, ...], values: Sequence[int]) -> None:
        """``self[name] = value`` for each pair, in order, in one call: ``ghcb_set_*``,
        the value and its valid bit (the base class's work, inline: KVM sets a few
        fields on every exit)."""
        raw = self.raw
        for name, value in zip(names, values, strict=True):
            field = _SETTERS.get(name)
            if field is not None and isinstance(value, int) and 0 <= value <= field[2]:
                field[1].pack_into(raw, field[0], value)
                raw[field[3]] |= field[4]
                self._dirty |= field[5]
            else:  # another field, or the base class's error for a bad value
                super().__setitem__(name, value)
                self._dirty |= _FIELD_BYTES[name]

    def put_exit_info(self, info1: int, info2: int) -> None:
        """``svm_vmgexit_set_return_code``: ``self[name] = value`` of sw_exit_info_1 and
        sw_exit_info_2, compiled, for values known to be u64s (KVM's own replies; a
        plugin's go through :meth:`ExitContext.set_exit_info`, which checks them)."""
        raw = self.raw
        _PACK_INFO(raw, _INFO_AT, info1, info2)
        raw[_INFO_BYTE] |= _INFO_BITS
        self._dirty |= _INFO_WRITTEN

    def put_gprs(self, rax: int, rbx: int, rcx: int, rdx: int) -> None:
        """``sev_es_sync_to_ghcb``: ``self[name] = value`` of RAX..RDX, compiled, for
        values known to be u64s (KVM's register copy, which checks what is stored)."""
        raw = self.raw
        _PACK_RAX(raw, _RAX_AT, rax)
        _PACK_RCX_RDX_RBX(raw, _RCX_AT, rcx, rdx, rbx)
        raw[_GPR_BYTE_1] |= _GPR_BITS_1
        raw[_GPR_BYTE_2] |= _GPR_BITS_2
        self._dirty |= _GPRS_WRITTEN

    def set_valid(self, name: str, valid: bool = True) -> None:
        super().set_valid(name, valid)
        at = VALID_BITS.get(name)
        if at is None:  # not reached: the base class refused the name
            raise LayoutError(f"{GHCB_SAVE_AREA.name} has no field {name!r}")
        self._dirty |= 1 << at[0]

    @property
    def valid_bitmap(self) -> int:
        return Ghcb.valid_bitmap.fget(self)  # type: ignore[attr-defined]

    @valid_bitmap.setter
    def valid_bitmap(self, value: int) -> None:
        self.raw[_BITMAP:_BITMAP_END] = value.to_bytes(_BITMAP_END - _BITMAP, "little")
        self._dirty |= _BITMAP_BYTES

    def clear_valid_bitmap(self) -> None:
        """``valid_bitmap = 0``, as ``sev_es_sync_from_ghcb`` does on every exit."""
        self.raw[_BITMAP:_BITMAP_END] = _NO_BITS
        self._dirty |= _BITMAP_BYTES

    def flush(self, memory: GuestMemoryView) -> None:
        """Write what KVM wrote into the guest's page, and forget it."""
        dirty = self._dirty
        if not dirty:
            return
        self._dirty = 0
        raw = self.raw
        runs = _RUNS.get(dirty) or _runs(dirty)  # _runs(dirty), its table looked up inline
        memory.write_parts(self.gpa, [(offset, raw[offset : offset + length])
                                      for offset, length in runs])  # fmt: skip


def _runs(dirty: int) -> tuple[tuple[int, int], ...]:
    """The ``(offset, length)`` runs of set bits in a written-bytes mask, in order: one
    write per run (fields that touch or overlap merge). Kept for the masks seen before."""
    runs = _RUNS.get(dirty)
    if runs is not None:
        return runs
    found = []
    offset, rest = 0, dirty
    while rest:
        skip = (rest & -rest).bit_length() - 1
        rest >>= skip
        offset += skip
        length = (~rest & (rest + 1)).bit_length() - 1
        found.append((offset, length))
        rest >>= length
        offset += length
    if len(_RUNS) >= _RUNS_KEPT:
        _RUNS.clear()
    runs = _RUNS[dirty] = tuple(found)
    return runs
