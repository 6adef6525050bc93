"""KVM's SEV ASID allocator (``sev_asid_new`` / ``sev_asid_free`` in svm/sev.c).

ASIDs are a scarce hardware resource split between SEV-ES and SEV guests
(:class:`~sevsim.hw.sev_caps.SevCapabilities`). A freed ASID cannot be handed out
again at once: the old guest's data may still sit in caches tagged with it, so it
waits in a reclaim set until a DF_FLUSH. KVM flushes lazily: only when a range has
no free ASID left, once, and then retries.
"""

from __future__ import annotations

from attrs import define, field

from sevsim.errors import SevFirmwareError, SevsimError
from sevsim.hw import SevCapabilities, SevFirmware


class AsidError(SevsimError):
    """No ASID could be allocated (KVM's sev_asid_new returns -EBUSY)."""


@define
class AsidAllocator:
    """Hands out ASIDs per guest kind; flushes reclaimed ones through the firmware."""

    firmware: SevFirmware
    caps: SevCapabilities
    #: ASIDs not available for allocation: bound to a VM or awaiting a flush.
    _used: set[int] = field(factory=set, init=False)
    #: Freed ASIDs that need a DF_FLUSH before reuse (``sev_reclaim_asid_bitmap``).
    _reclaim: set[int] = field(factory=set, init=False)

    def new(self, es: bool) -> int:
        """The lowest free ASID for an SEV-ES (``es``) or SEV guest."""
        asids = self.caps.asids_for(es)
        asid = self._first_free(asids)
        if asid is None and self._recycle(asids):
            asid = self._first_free(asids)
        if asid is None:
            kind = "SEV-ES" if es else "SEV"
            span = f"{asids.start}..{asids.stop - 1}" if asids else "an empty range"
            raise AsidError(
                f"no free {kind} ASID in {span}: every one belongs to a live VM; "
                "destroy a VM or raise max_sev_asid/min_sev_asid"
            )
        self._used.add(asid)
        return asid

    def free(self, asid: int) -> None:
        """Give back an ASID; it becomes reusable after the next flush."""
        if asid not in self._used or asid in self._reclaim:
            raise AsidError(f"ASID {asid} is not allocated; cannot free it")
        self._reclaim.add(asid)

    @property
    def reclaimable(self) -> frozenset[int]:
        return frozenset(self._reclaim)

    def _first_free(self, asids: range) -> int | None:
        return next((a for a in asids if a not in self._used), None)

    def _recycle(self, asids: range) -> bool:
        """``__sev_recycle_asids``: flush only when this range has something to reclaim.

        The flush covers every reclaimable ASID, SEV and SEV-ES alike.
        """
        if not any(a in asids for a in self._reclaim):
            return False
        try:
            self.firmware.df_flush()
        except SevFirmwareError as exc:
            raise AsidError(f"cannot reclaim ASIDs {sorted(self._reclaim)}: {exc}") from exc
        self._used -= self._reclaim
        self._reclaim.clear()
        return True
