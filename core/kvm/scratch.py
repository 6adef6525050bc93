"""The GHCB scratch area (``setup_vmgexit_scratch``): bulk data for MMIO and string IO.

The guest names a buffer in ``sw_scratch``. Inside its GHCB page it must lie within
the shared buffer (0x800..0xff0) and KVM works on it in place; anywhere else it may
be up to 64 KiB, KVM copies it in, and writes it back to the guest at the next VM
entry only for operations that produce data (``sync``: MMIO read, string IN).
"""

from __future__ import annotations

from attrs import frozen

from sevsim.arch.exits import GhcbErr
from sevsim.arch.ghcb import GHCB_SCRATCH_AREA_LIMIT, SHARED_BUFFER_END, SHARED_BUFFER_START
from sevsim.errors import GuestMemoryError
from sevsim.hw import GuestMemoryView
from sevsim.kvm.ghcb_map import MappedGhcb


@frozen(eq=False)
class Scratch:
    """A scratch area mapped for one exit."""

    gpa: int
    length: int
    sync: bool
    in_ghcb: bool
    #: The bytes, ``length`` of them, to read and (for a read operation) fill in
    #: place: a view of the mapped GHCB page inside it (KVM works there), else KVM's
    #: copy of the guest's buffer. Assign slices of the same size; a handler that
    #: leaves a different length is a plugin bug, and kvm says so. The area itself
    #: cannot be replaced.
    data: bytearray | memoryview

    def write_back(self, memory: GuestMemoryView) -> None:
        """Hand a copied area back to the guest (``sev_es_unmap_ghcb``'s scratch part);
        one in the GHCB page is already there."""
        if not self.in_ghcb and self.sync:
            memory.write(self.gpa, bytes(self.data))


def setup_scratch(
    ghcb: MappedGhcb,
    scratch_gpa: int,
    length: int,
    sync: bool,
    memory: GuestMemoryView,
) -> Scratch | GhcbErr | str:
    """Map ``length`` bytes at ``scratch_gpa``, or say why not: INVALID_SCRATCH_AREA for
    the guest, or why guest memory cannot be read at all (KVM_RUN fails; the era
    decides with which errno)."""
    ghcb_gpa = ghcb.gpa
    end = scratch_gpa + length
    if scratch_gpa == 0 or length < 0 or end % (1 << 64) < scratch_gpa:  # u64 wrap
        return GhcbErr.INVALID_SCRATCH_AREA
    if scratch_gpa & ~0xFFF == ghcb_gpa:
        lo, hi = ghcb_gpa + SHARED_BUFFER_START, ghcb_gpa + SHARED_BUFFER_END
        if scratch_gpa < lo or end > hi:
            return GhcbErr.INVALID_SCRATCH_AREA
        offset = scratch_gpa - ghcb_gpa
        ghcb.touch(offset, length)  # KVM's pointer into the mapped page: writes land
        view = memoryview(ghcb.raw)[offset : offset + length]
        return Scratch(scratch_gpa, length, sync, True, view)
    if length > GHCB_SCRATCH_AREA_LIMIT:
        return GhcbErr.INVALID_SCRATCH_AREA
    try:
        data = bytearray(memory.read(scratch_gpa, length))
    except GuestMemoryError as err:
        return f"scratch area [{scratch_gpa:#x}, +{length:#x}) unreadable: {err}"
    return Scratch(scratch_gpa, length, sync, False, data)
