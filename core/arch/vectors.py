"""x86 exception and interrupt vectors sevsim names (APM vol. 2, 8.2)."""

from __future__ import annotations

from enum import IntEnum


class Vector(IntEnum):
    NMI = 2
    UD = 6  # invalid opcode
    DF = 8  # double fault
    TS = 10  # invalid TSS
    GP = 13  # general protection
    PF = 14  # page fault
    VC = 29  # VMM communication (SEV-ES)
