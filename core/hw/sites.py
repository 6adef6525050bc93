"""Which guest instructions the hardware must stop in front of, decoded with capstone.

An SEV-ES guest's sensitive instructions (CPUID, IN/OUT/INS/OUTS, RDMSR/WRMSR, MOV
to a control register, VMGEXIT, HLT, ...) each end in a #VC, an automatic exit, or
a write the CPU model must retire itself. This module only decides *what* an
instruction is; :mod:`sevsim.hw.intercept` decides where to look (at the exact
instruction boundaries of every block Unicorn translates) and stops the CPU there.

:func:`candidates` gives a cheap byte filter: a run of code in which it finds nothing
holds no sensitive instruction, so most translated blocks are never decoded.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from enum import Enum
from typing import Any

from attrs import frozen

from sevsim.arch.disasm import capstone
from sevsim.arch.exits import EXIT_BY_MNEMONIC, SvmExit

MAX_INSN = 15

#: Every opcode byte sequence a sensitive instruction contains after its prefixes:
#: 0F 01 xx (VMRUN..INVLPGA, VMMCALL/VMGEXIT, MONITOR(X), MWAIT(X), RDTSCP, RDPRU,
#: LMSW), RDMSR/WRMSR/RDPMC/CPUID/INVD/WBINVD/CLTS, MOV to/from CR and DR, and the
#: one-byte IN/OUT/INS/OUTS and HLT.
_OPCODES = rb"\x0f[\x01\x06\x08\x09\x20-\x23\x30\x32\x33\xa2]|[\x6c-\x6f\xe4-\xe7\xec-\xef\xf4"
CANDIDATE = re.compile(_OPCODES + rb"]", re.DOTALL)
#: 16-bit code also holds IRET (CF), which the model retires in real mode (see
#: :attr:`Action.REAL_MODE_IRET`); other code never needs it decoded.
CANDIDATE_16 = re.compile(_OPCODES + rb"\xcf]", re.DOTALL)


def candidates(bits: int) -> re.Pattern[bytes]:
    """The byte filter for code of this operand size."""
    return CANDIDATE_16 if bits == 16 else CANDIDATE


class Action(Enum):
    """What the hardware does with a sensitive instruction of an SEV-ES guest."""

    NAE = "nae"  # #VC with the exit code as error code (if intercepted)
    AUTOMATIC_EXIT = "automatic_exit"  # #VMEXIT straight to the hypervisor (VMGEXIT, HLT)
    HARDWARE_MSR = "hardware_msr"  # RDMSR/WRMSR: hardware, #VC or native, by ECX
    CR_WRITE = "cr_write"  # MOV to CRn, LMSW, CLTS: retired by the model, then a trap if armed
    CR8_READ = "cr8_read"  # MOV from CR8: the CPU's TPR, which Unicorn does not keep
    #: IRET in real mode with a 32-bit stack (SS.B set, as after a return from
    #: protected mode): the CPU pops through ESP, Unicorn's QEMU through SP alone
    #: (helper_iret_real), so the model retires it. Not an intercept.
    REAL_MODE_IRET = "real_mode_iret"


@frozen
class Sensitive:
    """A decoded sensitive instruction: its exit code, length, and what to do."""

    exit_code: int
    length: int
    action: Action
    mnemonic: str
    #: The GPR of a MOV to CR (its source) or from CR8 (its destination); the CR0
    #: image source of LMSW (a register name, or "" for a memory operand).
    operand: str = ""


#: What the hardware does for an exit code other than a plain #VC.
_ACTIONS = {SvmExit.HLT: Action.AUTOMATIC_EXIT, SvmExit.MSR: Action.HARDWARE_MSR,
            SvmExit.CR0_WRITE_TRAP: Action.CR_WRITE}  # fmt: skip
#: Instructions the model never stops in front of: KVM does not intercept RDTSC, and
#: :data:`CANDIDATE` does not look for it.
_NEVER_INTERCEPTED = frozenset({SvmExit.RDTSC})

_BY_MNEMONIC: dict[str, tuple[int, Action]] = {
    mnemonic: (code, _ACTIONS.get(code, Action.NAE))
    for mnemonic, code in EXIT_BY_MNEMONIC.items()
    if code not in _NEVER_INTERCEPTED
}

#: 16-bit code only: IRET with 16- and 32-bit operands.
_BY_MNEMONIC_16: dict[str, tuple[int, Action]] = {
    "iret": (SvmExit.IRET, Action.REAL_MODE_IRET),
    "iretd": (SvmExit.IRET, Action.REAL_MODE_IRET),
}

VMGEXIT = b"\xf3\x0f\x01\xd9"
#: RDPRU, which capstone 5 does not decode (its disassembly stops there): read here.
RDPRU = b"\x0f\x01\xfd"


class _Rdpru:
    """RDPRU where capstone would have given an instruction."""

    mnemonic = "rdpru"
    size = len(RDPRU)
    op_str = ""

    def __init__(self, address: int) -> None:
        self.address = address


def _decode(code: bytes, address: int, bits: int) -> Iterator[Any]:
    """Capstone's instructions through ``code`` from ``address``, going on past each
    RDPRU (which capstone stops at) and ending at the first byte nothing decodes."""
    offset = 0
    while offset < len(code):
        for insn in capstone(bits).disasm(code[offset:], address + offset):
            yield insn
            offset = insn.address - address + insn.size
        if code[offset : offset + len(RDPRU)] != RDPRU:
            return
        yield _Rdpru(address + offset)
        offset += len(RDPRU)


def classify(code: bytes, bits: int) -> Sensitive | None:
    """Decode the instruction at the start of ``code`` and say if the hardware cares."""
    insn = next(_decode(code[:MAX_INSN], 0, bits), None)
    return None if insn is None else _sensitive(insn, code, bits)


def sensitive_in(code: bytes, address: int, bits: int) -> list[tuple[int, Sensitive]]:
    """Every sensitive instruction among the instructions that start at ``address``
    and follow one another through ``code`` (one translated block)."""
    found = []
    for insn in _decode(code, address, bits):
        offset = insn.address - address
        site = _sensitive(insn, code[offset : offset + MAX_INSN], bits)
        if site is not None:
            found.append((insn.address, site))
    return found


def _sensitive(insn: object, code: bytes, bits: int) -> Sensitive | None:
    mnemonic: str = insn.mnemonic  # type: ignore[attr-defined]
    size: int = insn.size  # type: ignore[attr-defined]
    op_str: str = insn.op_str  # type: ignore[attr-defined]
    if mnemonic == "vmmcall" and code[:size].endswith(b"\x0f\x01\xd9") and b"\xf3" in code[
            : size - 3]:  # fmt: skip
        return Sensitive(SvmExit.VMGEXIT, size, Action.AUTOMATIC_EXIT, "vmgexit")
    # capstone prints "rep insb" etc.; the exit is the same with or without REP.
    base = mnemonic.split()[-1]
    known = _BY_MNEMONIC.get(base) or (_BY_MNEMONIC_16.get(base) if bits == 16 else None)
    if known is not None:
        return Sensitive(known[0], size, known[1], mnemonic)
    if base == "lmsw":
        operand = op_str if op_str in _WORD_GPRS else ""
        return Sensitive(SvmExit.CR0_WRITE_TRAP, size, Action.CR_WRITE, mnemonic, operand)
    if base != "mov":
        return None
    if "dr7" in op_str:
        write = op_str.startswith("dr7")
        return Sensitive(SvmExit.WRITE_DR7 if write else SvmExit.READ_DR7, size, Action.NAE,
                         mnemonic)  # fmt: skip
    if op_str.endswith(", cr8"):
        return Sensitive(SvmExit.READ_CR8, size, Action.CR8_READ, mnemonic,
                         op_str.split(",")[0])  # fmt: skip
    if op_str.startswith("cr") and not op_str.startswith("cr2"):
        # CR2 is plain storage, written natively; every other write the model retires.
        target, source = (part.strip() for part in op_str.split(","))
        return Sensitive(SvmExit.CR0_WRITE_TRAP + int(target[2:]), size, Action.CR_WRITE,
                         mnemonic, source)  # fmt: skip
    return None


_WORD_GPRS = frozenset(("ax", "bx", "cx", "dx", "sp", "bp", "si", "di",
                        *(f"r{i}w" for i in range(8, 16))))  # fmt: skip

#: Instructions after which a translated block ends: a decode of a block that
#: Unicorn has not told us about (the very first one an engine runs) stops there.
BLOCK_ENDS = frozenset((
    "jmp", "ljmp", "call", "lcall", "ret", "retf", "retfq", "iret", "iretd", "iretq",
    "int", "int1", "int3", "into", "syscall", "sysret", "sysretq", "sysenter", "sysexit",
    "hlt", "loop", "loope", "loopne", "jrcxz", "jecxz", "jcxz",
))  # fmt: skip


def first_block(code: bytes, address: int, bits: int) -> list[tuple[int, Sensitive]]:
    """The sensitive instructions of the block that starts at ``address``: the
    instructions up to the first one that ends a block (a jump, call, return,
    interrupt, ...), as far as ``code`` goes."""
    found = []
    for insn in _decode(code, address, bits):
        offset = insn.address - address
        site = _sensitive(insn, code[offset : offset + MAX_INSN], bits)
        if site is not None:
            found.append((insn.address, site))
        base = insn.mnemonic.split()[-1]
        if base in BLOCK_ENDS or base.startswith("j"):
            break
    return found
