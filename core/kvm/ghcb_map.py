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

import struct
from collections.abc import Callable, Sequence
from itertools import pairwise

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


class GhcbSetter:
    """``ghcb_set_*`` of a fixed tuple of u64 save-area fields, compiled once: one struct
    call per run of adjacent fields, one OR per valid-bitmap byte, the bytes written
    known in advance. KVM sets the same few fields on every exit (the reply's exit
    info, RAX..RDX), where :meth:`MappedGhcb.set_fields` would look each one up.

    ``names`` are in page order, so that each run's values are a slice of the values.
    """

    __slots__ = ("_bits", "_packs", "names", "written")

    def __init__(self, *names: str) -> None:
        fields = [GHCB_SAVE_AREA[name] for name in names]
        if any(f.type != "u64" for f in fields) or any(
                a.offset >= b.offset for a, b in pairwise(fields)):  # fmt: skip
            raise LayoutError(f"a GHCB setter takes u64 save-area fields in page order: {names}")
        self.names = names
        #: Per run of adjacent fields: (its struct's pack_into, offset, its values' slice).
        packs: list[tuple[Callable[..., None], int, slice]] = []
        first = 0
        for end in range(1, len(fields) + 1):
            if end == len(fields) or fields[end].offset != fields[end - 1].offset + 8:
                codec = struct.Struct("<" + "Q" * (end - first))
                packs.append((codec.pack_into, fields[first].offset, slice(first, end)))
                first = end
        self._packs = tuple(packs)
        bits: dict[int, int] = {}
        for name in names:
            byte, bit = VALID_BITS[name]
            bits[byte] = bits.get(byte, 0) | bit
        self._bits = tuple(bits.items())
        written = 0
        for name in names:
            written |= _SETTERS[name][5]
        #: The bytes a write through this setter changes (a written-bytes mask).
        self.written = written

    def __repr__(self) -> str:
        return f"GhcbSetter{self.names!r}"


#: ``svm_vmgexit_set_return_code``'s two fields.
EXIT_INFO = GhcbSetter("sw_exit_info_1", "sw_exit_info_2")


class MappedGhcb(Ghcb):
    """A GHCB copy that remembers what KVM wrote to it since the last flush."""

    __slots__ = ("_dirty", "gpa", "snapshot_scratch")

    def __init__(self, raw: bytes, gpa: int) -> None:
        # Ghcb.__init__, inline (one page mapped per VMGEXIT).
        self.raw = bytearray(raw)
        if len(self.raw) != GHCB_PAGE_SIZE:
            raise ValueError(f"a GHCB page is {GHCB_PAGE_SIZE} bytes, got {len(self.raw)}")
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

    def set_group(self, setter: GhcbSetter, values: Sequence[int]) -> None:
        """:meth:`set_fields` of ``setter``'s fields, compiled. A value that is not a u64
        takes the field-by-field way, which refuses it exactly as ``self[name] = value``
        does, after writing the fields before it."""
        for value in values:
            if not (isinstance(value, int) and 0 <= value <= _U64):
                self.set_fields(setter.names, values)
                return
        self.put(setter, values)

    def put(self, setter: GhcbSetter, values: Sequence[int]) -> None:
        """:meth:`set_group` of values known to be u64s (KVM's own: its register copy,
        its success reply), unchecked."""
        raw = self.raw
        for pack, offset, part in setter._packs:
            pack(raw, offset, *values[part])
        for byte, bits in setter._bits:
            raw[byte] |= bits
        self._dirty |= setter.written

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
        runs = _RUNS.get(dirty) or _runs(dirty)  # _runs(dirty): seen before, looked up here
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
