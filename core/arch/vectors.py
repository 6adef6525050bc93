"""x86 exception and interrupt vectors sevsim names (APM vol. 2, 8.2)."""

from __future__ import annotations

from enum import IntEnum


class Vector(IntEnum):
    DE = 0  # divide error
    DB = 1  # debug
    NMI = 2
    BP = 3  # breakpoint
    OF = 4  # overflow
    BR = 5  # bound range
    UD = 6  # invalid opcode
    NM = 7  # device not available
    DF = 8  # double fault
    TS = 10  # invalid TSS
    NP = 11  # segment not present
    SS = 12  # stack fault
    GP = 13  # general protection
    PF = 14  # page fault
    MF = 16  # x87 floating point
    AC = 17  # alignment check
    MC = 18  # machine check
    XM = 19  # SIMD floating point
    CP = 21  # control protection
    HV = 28  # hypervisor injection (SEV-SNP)
    VC = 29  # VMM communication (SEV-ES)
    SX = 30  # security exception


#: Exceptions whose frame carries an error code (APM vol. 2, 8.2 and table 8-8).
ERROR_CODE_VECTORS = frozenset(
    {Vector.DF, Vector.TS, Vector.NP, Vector.SS, Vector.GP, Vector.PF, Vector.AC, Vector.CP,
     Vector.VC, Vector.SX}
)  # fmt: skip
