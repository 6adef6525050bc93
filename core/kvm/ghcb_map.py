"""The guest's GHCB page as KVM maps it (``kvm_vcpu_map``) for one exit.

KVM works on the page itself and writes only the fields it sets (``ghcb_set_*``, the
bitmap clear of ``sev_es_sync_from_ghcb``, a scratch area inside the page); every other
byte stays as the guest, or anyone else with access to the shared page, left it.
sevsim holds a copy of the page, so the copy records which byte ranges KVM wrote and
:meth:`MappedGhcb.flush` copies exactly those into guest memory.
"""

from __future__ import annotations

from sevsim.arch.ghcb import GHCB, GHCB_SAVE_AREA, Ghcb, valid_bit
from sevsim.hw import GuestMemoryView

_BITMAP = GHCB_SAVE_AREA.offset("valid_bitmap")
_BITMAP_SIZE = GHCB_SAVE_AREA["valid_bitmap"].size


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
        super().__setitem__(name, value)
        layout = GHCB_SAVE_AREA if name in GHCB_SAVE_AREA else GHCB
        self.touch(layout.offset(name), layout[name].size)

    def set_valid(self, name: str, valid: bool = True) -> None:
        super().set_valid(name, valid)
        self.touch(_BITMAP + valid_bit(name) // 8, 1)

    @property
    def valid_bitmap(self) -> int:
        return Ghcb.valid_bitmap.fget(self)  # type: ignore[attr-defined]

    @valid_bitmap.setter
    def valid_bitmap(self, value: int) -> None:
        Ghcb.valid_bitmap.fset(self, value)  # type: ignore[attr-defined]
        self.touch(_BITMAP, _BITMAP_SIZE)

    def flush(self, memory: GuestMemoryView) -> None:
        """Write what KVM wrote into the guest's page, and forget it."""
        spans: list[list[int]] = []
        for offset, length in sorted(self._written):  # merged: one write per run
            if spans and offset <= spans[-1][1]:
                spans[-1][1] = max(spans[-1][1], offset + length)
            else:
                spans.append([offset, offset + length])
        self._written = set()
        for start, end in spans:
            memory.write(self.gpa + start, bytes(self.raw[start:end]))
