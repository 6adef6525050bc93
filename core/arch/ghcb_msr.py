"""The GHCB MSR protocol: GHCBInfo codes and the bit fields of each request/response.

MSR 0xC0010130 carries either a GHCB page GPA (GHCBInfo, bits 11:0, zero) or an MSR
protocol request (GHCBInfo non-zero, data in bits 63:12). Field helpers take and
return the whole 64-bit value so that bits a response does not define keep the
guest's value, as KVM's mask-and-shift helpers do.
"""

from __future__ import annotations

from enum import IntEnum

GHCB_MSR_INFO_MASK = 0xFFF
GHCB_DATA_LOW = 12


class GhcbMsr(IntEnum):
    """GHCBInfo codes (``GHCB_MSR_*``)."""

    SEV_INFO_RESP = 0x001
    SEV_INFO_REQ = 0x002
    CPUID_REQ = 0x004
    CPUID_RESP = 0x005
    AP_RESET_HOLD_REQ = 0x006
    AP_RESET_HOLD_RESP = 0x007
    PREF_GPA_REQ = 0x010
    PREF_GPA_RESP = 0x011
    REG_GPA_REQ = 0x012
    REG_GPA_RESP = 0x013
    PSC_REQ = 0x014
    PSC_RESP = 0x015
    VMPL_REQ = 0x016
    VMPL_RESP = 0x017
    HV_FT_REQ = 0x080
    HV_FT_RESP = 0x081
    TERM_REQ = 0x100

    @property
    def linux_name(self) -> str:
        return f"GHCB_MSR_{self.name}"


#: SNP requests KVM answers an SEV-ES guest by terminating it (others it ignores).
SNP_ONLY_REQUESTS = frozenset({GhcbMsr.PREF_GPA_REQ, GhcbMsr.REG_GPA_REQ, GhcbMsr.PSC_REQ})

#: Hypervisor feature bits (``GHCB_HV_FT_*``) newest KVM advertises: SNP | SNP_AP_CREATION.
GHCB_HV_FT_SNP = 1 << 0
GHCB_HV_FT_SNP_AP_CREATION = 1 << 1
GHCB_HV_FT_SUPPORTED = GHCB_HV_FT_SNP | GHCB_HV_FT_SNP_AP_CREATION


def bits(value: int, high: int, low: int) -> int:
    """Bits ``high:low`` of ``value``."""
    return (value >> low) & ((1 << (high - low + 1)) - 1)


def with_bits(value: int, high: int, low: int, field: int) -> int:
    """``value`` with bits ``high:low`` replaced by ``field`` (which must fit)."""
    width = high - low + 1
    if field < 0 or field >> width:
        raise ValueError(f"{field:#x} does not fit bits {high}:{low}")
    mask = ((1 << width) - 1) << low
    return (value & ~mask) | (field << low)


def info(value: int) -> int:
    """GHCBInfo: bits 11:0."""
    return value & GHCB_MSR_INFO_MASK


def data(value: int) -> int:
    """GHCBData: bits 63:12."""
    return value >> GHCB_DATA_LOW


def sev_info_resp(max_ver: int, min_ver: int, cbit: int) -> int:
    """SEV_INFO response: max[63:48], min[47:32], C-bit position[31:24], code 0x001."""
    return (max_ver << 48) | (min_ver << 32) | (cbit << 24) | GhcbMsr.SEV_INFO_RESP


def cpuid_req(function: int, register: int) -> int:
    """CPUID request: function[63:32], register[31:30] (0 EAX, 1 EBX, 2 ECX, 3 EDX)."""
    return (function << 32) | (register << 30) | GhcbMsr.CPUID_REQ


#: Bit positions of a TERM_REQ's reason set (15:12) and reason code (23:16).
GHCB_MSR_TERM_REASON_SET_POS = 12
GHCB_MSR_TERM_REASON_POS = 16


def term_req(reason_set: int, reason_code: int) -> int:
    """Termination request: reason set[15:12], reason code[23:16], code 0x100."""
    return (
        (reason_code << GHCB_MSR_TERM_REASON_POS)
        | (reason_set << GHCB_MSR_TERM_REASON_SET_POS)
        | GhcbMsr.TERM_REQ
    )


def term_reason(value: int) -> tuple[int, int] | None:
    """(reason set, reason code) of a GHCB MSR value that is a TERM_REQ, else None."""
    if info(value) != GhcbMsr.TERM_REQ:
        return None
    return bits(value, 15, 12), bits(value, 23, 16)


def ghcb_term_reason(info1: int) -> tuple[int, int]:
    """(reason set, reason code) of a GHCB-page TERM_REQUEST: ``sw_exit_info_1`` holds
    the set in bits 3:0 and the code in bits 11:4."""
    return bits(info1, 3, 0), bits(info1, 11, 4)


#: Termination reason names, by (set, code): set 0 general, set 1 Linux.
TERM_REASONS: dict[tuple[int, int], str] = {
    (0, 0): "GHCB_SEV_ES_GEN_REQ",
    (0, 1): "GHCB_SEV_ES_PROT_UNSUPPORTED",
    (0, 2): "GHCB_SNP_UNSUPPORTED",
    **{
        (1, i): name
        for i, name in enumerate(
            ["GHCB_TERM_REGISTER", "GHCB_TERM_PSC", "GHCB_TERM_PVALIDATE",
             "GHCB_TERM_NOT_VMPL0", "GHCB_TERM_CPUID", "GHCB_TERM_CPUID_HV",
             "GHCB_TERM_SECRETS_PAGE", "GHCB_TERM_NO_SVSM", "GHCB_TERM_SVSM_VMPL0",
             "GHCB_TERM_SVSM_CAA", "GHCB_TERM_SECURE_TSC", "GHCB_TERM_SVSM_CA_REMAP_FAIL",
             "GHCB_TERM_SAVIC_FAIL"]
        )
    },
}  # fmt: skip


#: Reason set of sevsim's own #VC handlers' termination requests (0 is the GHCB
#: spec's, 1 Linux's): the guest's handlers send it and the trace names it.
TERM_REASON_SET = 2


class TermReason(IntEnum):
    """Reason codes (set ``TERM_REASON_SET``) of sevsim's #VC handlers' TERM_REQ."""

    #: The #VC error code is an exit code the handler does not handle.
    UNSUPPORTED_EXIT = 1
    #: The instruction at RIP is not a form the handler decodes for that exit code.
    UNSUPPORTED_INSN = 2
    #: The hypervisor's reply was neither success nor a forwardable exception, or a
    #: result register came back without its valid bit.
    VMM_ERROR = 3
    #: The hypervisor asked for an exception the handler may not (or cannot) deliver.
    BAD_EXCEPTION = 4
    #: The MMIO address does not translate through the guest's page tables.
    PAGE_WALK = 5
    #: A #VC arrived while the handler was handling one (e.g. the instruction at RIP
    #: is fetched from MMIO, so reading it raises #VC again): the handler is not
    #: reentrant, as Linux's is not past its backup GHCB.
    NESTED_VC = 6


def term_reason_name(reason_set: int, reason_code: int) -> str:
    return TERM_REASONS.get((reason_set, reason_code), f"set {reason_set} code {reason_code}")
