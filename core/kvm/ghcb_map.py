"""The guest's GHCB page as KVM maps it (``kvm_vcpu_map``) for one exit.

KVM works on the page itself and writes only the fields it sets (``ghcb_set_*``, the
bitmap clear of ``sev_es_sync_from_ghcb``, a scratch area inside the page); every other
byte stays as the guest, or anyone else with access to the shared page, left it.
sevsim holds a copy of the page, so the copy records which byte ranges KVM wrote and
:meth:`MappedGhcb.flush` copies exactly those into guest memory.
"""

from __future__ import annotations

from collections.abc import Sequence

from sevsim.arch.ghcb import GHCB, GHCB_SAVE_AREA, INT_FIELDS, VALID_BITS, Ghcb
from sevsim.errors import LayoutError
from sevsim.hw import GuestMemoryView

_BITMAP = GHCB_SAVE_AREA.offset("valid_bitmap")
_BITMAP_SIZE = GHCB_SAVE_AREA["valid_bitmap"].size
#: Every field's (offset, size) in the page, a save-area name first (as Ghcb does).
_SPANS = {f.name: (layout.offset(f.name), f.size)
          for layout in (GHCB, GHCB_SAVE_AREA) for f in layout.fields}  # fmt: skip
#: Integer save-area fields, all a write needs in one lookup: (offset, struct, largest
#: value, bitmap byte, bit mask, the field's span, the bitmap byte's span).
_SETTERS = {name: (off, codec, limit, VALID_BITS[name][0], VALID_BITS[name][1], _SPANS[name],
                   (VALID_BITS[name][0], 1))
            for name, (off, codec, limit) in INT_FIELDS.items() if name in VALID_BITS}  # fmt: skip


class MappedGhcb(Ghcb):
    """A GHCB copy that remembers what KVM wrote to it since the last flush."""

    __slots__ = ("_written", "gpa", "snapshot_scratch")

    def __init__(self, raw: bytes, gpa: int) -> None:
        super().__init__(raw)
        self.gpa = gpa
        self._written: set[tuple[int, int]] = set()
        #: ``sw_scratch`` as KVM took it when it synced from the page (newest KVM: 0
        #: unless the guest marked it valid).
        self.snapshot_scratch = 0

    def touch(self, offset: int, length: int) -> None:
        """Bytes ``[offset, offset + length)`` were written (e.g. a scratch area in place)."""
        self._written.add((offset, length))

    def __setitem__(self, name: str, value: int) -> None:
        self.set_fields((name,), (value,))

    def set_fields(self, names: tuple[str, ...], values: Sequence[int]) -> None:
        """``self[name] = value`` for each pair, in order, in one call: ``ghcb_set_*``,
        the value and its valid bit (the base class's work, inline: KVM sets a few
        fields on every exit)."""
        raw, add = self.raw, self._written.add
        for name, value in zip(names, values, strict=True):
            field = _SETTERS.get(name)
            if field is not None and isinstance(value, int) and 0 <= value <= field[2]:
                field[1].pack_into(raw, field[0], value)
                raw[field[3]] |= field[4]
                add(field[5])
                add(field[6])
            else:  # another field, or the base class's error for a bad value
                super().__setitem__(name, value)
                add(_SPANS[name])

    def set_valid(self, name: str, valid: bool = True) -> None:
        super().set_valid(name, valid)
        at = VALID_BITS.get(name)
        if at is None:  # not reached: the base class refused the name
            raise LayoutError(f"{GHCB_SAVE_AREA.name} has no field {name!r}")
        self._written.add((at[0], 1))

    @property
    def valid_bitmap(self) -> int:
        return Ghcb.valid_bitmap.fget(self)  # type: ignore[attr-defined]

    @valid_bitmap.setter
    def valid_bitmap(self, value: int) -> None:
        self.raw[_BITMAP : _BITMAP + _BITMAP_SIZE] = value.to_bytes(_BITMAP_SIZE, "little")
        self._written.add((_BITMAP, _BITMAP_SIZE))

    def flush(self, memory: GuestMemoryView) -> None:
        """Write what KVM wrote into the guest's page, and forget it."""
        written = self._written
        if not written:
            return
        self._written = set()
        raw = self.raw
        parts = []
        start = end = -1
        for offset, length in sorted(written):  # merged: one write per run
            if offset <= end:
                end = max(end, offset + length)
                continue
            if end >= 0:
                parts.append((start, raw[start:end]))
            start, end = offset, offset + length
        parts.append((start, raw[start:end]))
        memory.write_parts(self.gpa, parts)
