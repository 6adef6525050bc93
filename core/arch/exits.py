"""SVM and VMGEXIT exit codes, with Linux's names (``SVM_EXIT_*``, ``SVM_VMGEXIT_*``)."""

from __future__ import annotations

from collections.abc import Mapping
from enum import IntEnum
from types import MappingProxyType


class SvmExit(IntEnum):
    """Automatic exit codes (APM vol. 2 appendix C) that an SEV-ES guest can cause."""

    READ_CR8 = 0x008
    READ_DR7 = 0x027
    WRITE_DR7 = 0x037
    EXCP_BASE = 0x040
    INTR = 0x060
    NMI = 0x061
    VINTR = 0x064
    RDTSC = 0x06E
    RDPMC = 0x06F
    CPUID = 0x072
    IRET = 0x074
    INVD = 0x076
    HLT = 0x078
    INVLPGA = 0x07A
    IOIO = 0x07B
    MSR = 0x07C
    SHUTDOWN = 0x07F
    VMRUN = 0x080
    VMMCALL = 0x081
    VMLOAD = 0x082
    VMSAVE = 0x083
    STGI = 0x084
    CLGI = 0x085
    SKINIT = 0x086
    RDTSCP = 0x087
    WBINVD = 0x089
    MONITOR = 0x08A
    MWAIT = 0x08B
    XSETBV = 0x08D
    RDPRU = 0x08E
    EFER_WRITE_TRAP = 0x08F
    CR0_WRITE_TRAP = 0x090
    CR4_WRITE_TRAP = 0x094
    CR8_WRITE_TRAP = 0x098
    INVPCID = 0x0A2
    NPF = 0x400
    AVIC_INCOMPLETE_IPI = 0x401
    AVIC_UNACCELERATED_ACCESS = 0x402
    VMGEXIT = 0x403
    ERR = 0xFFFF_FFFF_FFFF_FFFF  # VMRUN failed: invalid guest state

    @property
    def linux_name(self) -> str:
        return f"SVM_EXIT_{self.name}"


class VmgExit(IntEnum):
    """Software exit codes an SEV-ES guest puts in the GHCB's ``sw_exit_code``."""

    MMIO_READ = 0x8000_0001
    MMIO_WRITE = 0x8000_0002
    NMI_COMPLETE = 0x8000_0003
    AP_HLT_LOOP = 0x8000_0004
    AP_JUMP_TABLE = 0x8000_0005
    PSC = 0x8000_0010
    GUEST_REQUEST = 0x8000_0011
    EXT_GUEST_REQUEST = 0x8000_0012
    AP_CREATION = 0x8000_0013
    SNP_RUN_VMPL = 0x8000_0018
    SAVIC = 0x8000_001A
    HV_FEATURES = 0x8000_FFFD
    TERM_REQUEST = 0x8000_FFFE
    UNSUPPORTED_EVENT = 0x8000_FFFF

    @property
    def linux_name(self) -> str:
        return f"SVM_VMGEXIT_{self.name}"


#: Start of the software-defined range: codes a hypervisor may define for itself.
SVM_EXIT_SW = 0xF000_0000

#: SNP codes ``sev_es_validate_vmgexit`` lists: an SEV-ES guest sending one fails the
#: SNP check with the default reason, MISSING_INPUT (other unknown codes: INVALID_EVENT).
SNP_ONLY_VMGEXITS = frozenset(
    {VmgExit.PSC, VmgExit.GUEST_REQUEST, VmgExit.EXT_GUEST_REQUEST, VmgExit.AP_CREATION}
)


#: The exit code each intercepted instruction causes, by its mnemonic as capstone prints
#: it without prefixes (``insb``, not ``rep insb``): the intercept table of APM vol. 2,
#: 15.9-15.13, for the instructions whose mnemonic alone decides the exit. Not here,
#: because their operands decide: MOV to/from CRn and DRn (the CR write traps,
#: READ_DR7/WRITE_DR7), LMSW, and VMGEXIT (``rep vmmcall``). Which of these a CPU
#: actually intercepts is the hypervisor's choice (KVM never asks for RDTSC).
EXIT_BY_MNEMONIC: Mapping[str, SvmExit] = MappingProxyType({
    "cpuid": SvmExit.CPUID,
    "rdpmc": SvmExit.RDPMC,
    "rdtsc": SvmExit.RDTSC,
    "rdtscp": SvmExit.RDTSCP,
    "rdpru": SvmExit.RDPRU,
    "invd": SvmExit.INVD,
    "wbinvd": SvmExit.WBINVD,
    "monitor": SvmExit.MONITOR,
    "monitorx": SvmExit.MONITOR,
    "mwait": SvmExit.MWAIT,
    "mwaitx": SvmExit.MWAIT,
    "vmmcall": SvmExit.VMMCALL,
    "vmrun": SvmExit.VMRUN,
    "vmload": SvmExit.VMLOAD,
    "vmsave": SvmExit.VMSAVE,
    "stgi": SvmExit.STGI,
    "clgi": SvmExit.CLGI,
    "skinit": SvmExit.SKINIT,
    "invlpga": SvmExit.INVLPGA,
    "hlt": SvmExit.HLT,
    "rdmsr": SvmExit.MSR,
    "wrmsr": SvmExit.MSR,
    "clts": SvmExit.CR0_WRITE_TRAP,
    **dict.fromkeys(("in", "out", "insb", "insw", "insd", "outsb", "outsw", "outsd"),
                    SvmExit.IOIO),
})  # fmt: skip


def exit_name(code: int) -> str:
    """Linux's symbolic name for an exit code, or its hex value if it has none."""
    for enum in (SvmExit, VmgExit):
        try:
            return enum(code).linux_name
        except ValueError:
            pass
    if SvmExit.CR0_WRITE_TRAP <= code <= SvmExit.CR0_WRITE_TRAP + 15:
        return f"SVM_EXIT_CR{code - SvmExit.CR0_WRITE_TRAP}_WRITE_TRAP"
    if SvmExit.EXCP_BASE <= code < SvmExit.EXCP_BASE + 32:
        return f"SVM_EXIT_EXCP_BASE+{code - SvmExit.EXCP_BASE}"
    if SVM_EXIT_SW <= code <= 0xFFFF_FFFF:  # hypervisor-defined (software) exit codes
        return f"SVM_EXIT_SW+{code - SVM_EXIT_SW:#x}"
    return f"{code:#x}"


class GhcbResp(IntEnum):
    """``sw_exit_info_1[31:0]`` response codes (``GHCB_HV_RESP_*``)."""

    NO_ACTION = 0
    ISSUE_EXCEPTION = 1
    MALFORMED_INPUT = 2


class GhcbErr(IntEnum):
    """``sw_exit_info_2`` when ``sw_exit_info_1`` is MALFORMED_INPUT (``GHCB_ERR_*``)."""

    NOT_REGISTERED = 1
    INVALID_USAGE = 2
    INVALID_SCRATCH_AREA = 3
    MISSING_INPUT = 4
    INVALID_INPUT = 5
    INVALID_EVENT = 6
