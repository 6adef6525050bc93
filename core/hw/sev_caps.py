"""What the silicon offers for SEV: the C-bit position and the split of ASIDs.

The numbers come from the BIOS on real parts and reach software through CPUID
0x8000001F. Everything that hands out or checks ASIDs (KVM's allocator, the
firmware's ACTIVATE) derives its ranges from one :class:`SevCapabilities`, so a
test that shrinks the ASID space sees the same ranges everywhere.
"""

from __future__ import annotations

from attrs import frozen

from sevsim.errors import ConfigError

CPUID_FN_SEV = 0x8000_001F
#: CPUID 0x8000001F EAX feature bits.
CPUID_SEV = 1 << 1
CPUID_SEV_ES = 1 << 3


@frozen
class CpuidLeaf:
    """The four registers one CPUID function returns."""

    eax: int
    ebx: int
    ecx: int
    edx: int


@frozen
class SevCapabilities:
    """C-bit position and ASID ranges (REFERENCE.md §9).

    SEV-ES guests use ASIDs ``1 .. min_sev_asid-1``, SEV guests without ES use
    ``min_sev_asid .. max_sev_asid``; ``min_sev_asid == 1`` leaves no ASID for
    SEV-ES, which KVM reads as "SEV-ES disabled". ``min_sev_asid == max_sev_asid+1``
    is the opposite: every ASID is an SEV-ES one.
    """

    max_sev_asid: int = 15
    min_sev_asid: int = 5
    c_bit: int = 51

    def __attrs_post_init__(self) -> None:
        if not 1 <= self.max_sev_asid <= 0xFFFF_FFFF:
            raise ConfigError(f"max_sev_asid {self.max_sev_asid} must be 1..0xffffffff")
        if not 1 <= self.min_sev_asid <= self.max_sev_asid + 1:
            raise ConfigError(
                f"min_sev_asid {self.min_sev_asid} must be 1..max_sev_asid+1 "
                f"({self.max_sev_asid + 1})"
            )
        if not 32 <= self.c_bit <= 63:
            raise ConfigError(f"C-bit position {self.c_bit} must be 32..63 (EBX[5:0])")

    @property
    def sev_es_enabled(self) -> bool:
        return self.min_sev_asid > 1

    @property
    def es_asids(self) -> range:
        """ASIDs an SEV-ES guest may use."""
        return range(1, self.min_sev_asid)

    @property
    def sev_asids(self) -> range:
        """ASIDs an SEV guest without ES may use."""
        return range(self.min_sev_asid, self.max_sev_asid + 1)

    def asids_for(self, es: bool) -> range:
        return self.es_asids if es else self.sev_asids

    def cpuid(self) -> CpuidLeaf:
        """CPUID 0x8000001F as KVM reports it to guests.

        EAX: SEV, plus SEV-ES when it has ASIDs; EBX[5:0]: C-bit position (KVM
        clears EBX[31:6], the VMPL count and physical-address reduction); ECX: the
        number of encrypted guests (max_sev_asid); EDX: min_sev_asid.
        """
        eax = CPUID_SEV | (CPUID_SEV_ES if self.sev_es_enabled else 0)
        return CpuidLeaf(eax=eax, ebx=self.c_bit, ecx=self.max_sev_asid, edx=self.min_sev_asid)
