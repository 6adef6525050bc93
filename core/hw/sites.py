"""Which guest instructions the hardware must stop in front of, decoded with capstone.

An SEV-ES guest's sensitive instructions (CPUID, IN/OUT/INS/OUTS, RDMSR/WRMSR, MOV
to a control register, VMGEXIT, HLT, ...) each end in a #VC, an automatic exit, or
a write the CPU model must retire itself. INVLPG ends in none of these, but the model
must see it before Unicorn runs it (:attr:`Action.TLB_INVALIDATION`). This module only
decides *what* an instruction is; :mod:`sevsim.hw.intercept` decides where to look (at
the exact instruction boundaries of every block Unicorn translates) and stops the CPU
there.

:func:`candidates` gives a cheap byte filter: a run of code in which it finds nothing
holds no sensitive instruction, so most translated blocks are never decoded.
"""

from __future__ import annotations

import ctypes
import re
import struct
from collections.abc import Iterable, Iterator
from enum import Enum

from attrs import frozen
from capstone import _cs, _cs_insn

from sevsim.arch.disasm import capstone
from sevsim.arch.exits import EXIT_BY_MNEMONIC, SvmExit

MAX_INSN = 15

#: Every opcode byte sequence a sensitive instruction contains after its prefixes:
#: 0F 01 xx (VMRUN..INVLPGA, VMMCALL/VMGEXIT, MONITOR(X), MWAIT(X), RDTSCP, RDPRU,
#: LMSW, INVLPG), RDMSR/WRMSR/RDPMC/CPUID/INVD/WBINVD/CLTS, MOV to/from CR and DR,
#: and the one-byte IN/OUT/INS/OUTS and HLT.
_CANDIDATE_BYTES = (
    rb"\x0f[\x01\x06\x08\x09\x20-\x23\x30\x32\x33\xa2]|[\x6c-\x6f\xe4-\xe7\xec-\xef\xf4"
)
CANDIDATE = re.compile(_CANDIDATE_BYTES + rb"]", re.DOTALL)
#: 16-bit code also holds IRET (CF), which the model retires in real mode (see
#: :attr:`Action.REAL_MODE_IRET`); other code never needs it decoded.
CANDIDATE_16 = re.compile(_CANDIDATE_BYTES + rb"\xcf]", re.DOTALL)


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
    #: INVLPG: the TLB forgets a page. KVM does not intercept it under nested paging
    #: (which SEV requires), so it never exits; Unicorn runs it, and the model first
    #: drops the translations it keeps beside Unicorn's TLB (:mod:`sevsim.hw.mmu`).
    #: INVPCID is not here: Unicorn raises #UD for it, as the CPUID promises.
    TLB_INVALIDATION = "tlb_invalidation"


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

#: SVM_EXIT_INVLPG, the exit INVLPG would cause if intercepted: recorded with the
#: site, never raised (:attr:`Action.TLB_INVALIDATION`).
SVM_EXIT_INVLPG = 0x079

_BY_MNEMONIC: dict[str, tuple[int, Action]] = {
    **{mnemonic: (code, _ACTIONS.get(code, Action.NAE))
       for mnemonic, code in EXIT_BY_MNEMONIC.items()
       if code not in _NEVER_INTERCEPTED},
    "invlpg": (SVM_EXIT_INVLPG, Action.TLB_INVALIDATION),
}  # fmt: skip

#: 16-bit code only: IRET with 16- and 32-bit operands.
_BY_MNEMONIC_16: dict[str, tuple[int, Action]] = {
    "iret": (SvmExit.IRET, Action.REAL_MODE_IRET),
    "iretd": (SvmExit.IRET, Action.REAL_MODE_IRET),
}

VMGEXIT = b"\xf3\x0f\x01\xd9"
#: RDPRU, which capstone 5 does not decode (its disassembly stops there): read here.
RDPRU = b"\x0f\x01\xfd"


#: A decoded instruction: (address, size, mnemonic, operands).
_Insn = tuple[int, int, str, str]

#: Legacy prefixes, and REX in 64-bit code: what comes before an opcode byte.
_PREFIXES = frozenset((0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65, 0x66, 0x67, 0xF0, 0xF2, 0xF3))
_REX = frozenset(range(0x40, 0x50))
#: The first opcode byte of every sensitive instruction (0F: the two-byte ones).
_OPCODES = frozenset((0x0F, 0xF4, *range(0x6C, 0x70), *range(0xE4, 0xE8),
                      *range(0xEC, 0xF0)))  # fmt: skip
_OPCODES_16 = _OPCODES | {0xCF}

# Capstone's ``cs_insn`` records, read in bulk: a block's instructions come from one
# ``cs_disasm`` call, and only the few that may be sensitive have their text decoded
# (the binding's per-instruction objects and strings cost more than the decoding).
_RECORD = ctypes.sizeof(_cs_insn)
#: A whole record, of which only the address and the size are read.
_ADDRESS_SIZE = struct.Struct(
    f"<{_cs_insn.address.offset}xQ{_cs_insn.size.offset - _cs_insn.address.offset - 8}xH"
    f"{_RECORD - _cs_insn.size.offset - 2}x")
_TEXT = ((_cs_insn.mnemonic.offset, _cs_insn.mnemonic.size),
         (_cs_insn.op_str.offset, _cs_insn.op_str.size))  # fmt: skip


def _records(code: bytes, address: int, bits: int) -> bytes:
    """``cs_disasm`` of ``code`` at ``address``: its records, copied out."""
    insns = ctypes.POINTER(_cs_insn)()
    count = _cs.cs_disasm(capstone(bits).csh, code, len(code), address, 0, ctypes.byref(insns))
    if count <= 0:
        return b""
    try:
        return ctypes.string_at(insns, count * _RECORD)
    finally:
        _cs.cs_free(insns, count)


#: (address, size, where its record is: the records and an offset, or None for RDPRU).
_Span = tuple[int, int, tuple[bytes, int] | None]


def _decode(code: bytes, address: int, bits: int) -> list[_Span]:
    """The instructions through ``code`` from ``address``, going on past each RDPRU
    (which capstone stops at) and ending at the first byte nothing decodes."""
    spans: list[_Span] = []
    offset = 0
    while offset < len(code):
        records = _records(code[offset:] if offset else code, address + offset, bits)
        spans += [(insn_address, size, (records, index * _RECORD)) for index, (insn_address, size)
                  in enumerate(_ADDRESS_SIZE.iter_unpack(records))]  # fmt: skip
        if spans:
            offset = spans[-1][0] - address + spans[-1][1]
        if code[offset : offset + len(RDPRU)] != RDPRU:
            break
        spans.append((address + offset, len(RDPRU), None))
        offset += len(RDPRU)
    return spans


def _text(span: _Span) -> _Insn:
    """The instruction with its mnemonic and operands, as capstone prints them."""
    insn_address, size, where = span
    if where is None:
        return insn_address, size, "rdpru", ""
    records, at = where
    mnemonic, op_str = (records[at + o : at + o + n].split(b"\0", 1)[0].decode("ascii")
                        for o, n in _TEXT)  # fmt: skip
    return insn_address, size, mnemonic, op_str


#: By operand size: the bytes that may come before an opcode, and the first opcode
#: bytes of sensitive instructions.
_SKIP = {16: _PREFIXES, 32: _PREFIXES, 64: _PREFIXES | _REX}
_FIRST = {16: _OPCODES_16, 32: _OPCODES, 64: _OPCODES}


def _may_be_sensitive(code: bytes, offset: int, size: int, bits: int) -> bool:
    """Whether the instruction at ``code[offset:offset + size]`` has the opcode byte of
    a sensitive one (most instructions of a block are ruled out here, their text never
    decoded)."""
    skip, end = _SKIP[bits], offset + size
    while offset < end and code[offset] in skip:
        offset += 1
    return offset < end and code[offset] in _FIRST[bits]


def classify(code: bytes, bits: int) -> Sensitive | None:
    """Decode the instruction at the start of ``code`` and say if the hardware cares."""
    spans = _decode(code[:MAX_INSN], 0, bits)
    return _sensitive(_text(spans[0]), code, bits) if spans else None


def sensitive_in(code: bytes, address: int, bits: int) -> list[tuple[int, Sensitive]]:
    """Every sensitive instruction among the instructions that start at ``address``
    and follow one another through ``code`` (one translated block)."""
    return _sites(_decode(code, address, bits), code, address, bits)


def _sites(spans: Iterable[_Span], code: bytes, address: int,
           bits: int) -> list[tuple[int, Sensitive]]:  # fmt: skip
    """The sensitive ones among ``spans``, decoded from ``code`` (at ``address``)."""
    found = []
    first, skip = _FIRST[bits], _SKIP[bits]
    for span in spans:
        offset = span[0] - address
        byte = code[offset]  # most instructions are ruled out by their first byte
        if byte not in first and byte not in skip:
            continue
        if _may_be_sensitive(code, offset, span[1], bits):
            site = _sensitive(_text(span), code[offset : offset + MAX_INSN], bits)
            if site is not None:
                found.append((span[0], site))
    return found


def _sensitive(insn: _Insn, code: bytes, bits: int) -> Sensitive | None:
    _, size, mnemonic, op_str = insn
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
    return _sites(_to_block_end(_decode(code, address, bits)), code, address, bits)


def _to_block_end(spans: Iterable[_Span]) -> Iterator[_Span]:
    for span in spans:
        yield span
        base = _text(span)[2].split()[-1]
        if base in BLOCK_ENDS or base.startswith("j"):
            return
