"""Finding the instructions the hardware must stop in front of: the interception seam.

Unicorn cannot hook RDMSR, WRMSR, VMMCALL, RDPMC, ... by instruction type, and its
IN/OUT/CPUID hooks fire mid-instruction. So before a code page first executes (the
page walk sees the first instruction fetch from it), we scan its bytes for the
opcodes of every sensitive instruction and place a single-address code hook on each
position where such an instruction could start, including positions further back
over legacy and REX prefixes. A hook fires only if an instruction really starts
there, so false matches (opcode bytes inside immediates or data) cost nothing until
executed, and then one decode. Interception is exact however the instruction is
reached (fall-through, jumps, calls, RET, IRETQ), because the hook is keyed by the
instruction's address, not by how control arrived.

Cost: one scan per code page per mapping (a regex over 4 KiB plus a few bytes of the
next page), one Unicorn hook per candidate, and a Python call only when a candidate
executes. Unicorn checks code hooks linearly when it translates a block, so very large
guests pay at translation time; the performance issue revisits this seam.
"""

from __future__ import annotations

import re
from enum import Enum

from attrs import frozen
from capstone import CS_ARCH_X86, CS_MODE_16, CS_MODE_32, CS_MODE_64, Cs

from sevsim.arch.exits import SvmExit

_PREFIXES = frozenset(b"\x26\x2e\x36\x3e\x64\x65\x66\x67\xf0\xf2\xf3" + bytes(range(0x40, 0x50)))
MAX_INSN = 15

# Opcode byte sequences that begin a sensitive instruction (after any prefixes).
_OPCODES = re.compile(
    rb"\x0f\x01[\xd8-\xdf\xf9\xc8\xc9]"  # VMRUN..INVLPGA (VMMCALL/VMGEXIT), RDTSCP, MONITOR, MWAIT
    # WRMSR RDMSR RDPMC CPUID INVD WBINVD, MOV from/to DR and CR
    rb"|\x0f[\x30\x32\x33\xa2\x08\x09\x21\x23\x20\x22]"
    rb"|[\xe4-\xe7\xec-\xef\x6c-\x6f]",  # IN, OUT, INS, OUTS
    re.DOTALL,
)


def candidate_offsets(code: bytes, limit: int) -> set[int]:
    """Offsets below ``limit`` where a sensitive instruction could start in ``code``.

    ``code`` may run past ``limit`` (into the next page) so that instructions that
    start before ``limit`` and span the boundary are found.
    """
    found: set[int] = set()
    for match in _OPCODES.finditer(code):
        start = match.start()
        back = start
        while True:
            if back < limit:
                found.add(back)
            if back == 0 or start - back >= MAX_INSN - 1 or code[back - 1] not in _PREFIXES:
                break
            back -= 1
    return found


class Action(Enum):
    """What the hardware does with a sensitive instruction of an SEV-ES guest."""

    NAE = "nae"  # #VC with the exit code as error code (if intercepted)
    AUTOMATIC_EXIT = "automatic_exit"  # #VMEXIT straight to the hypervisor (VMGEXIT)
    HARDWARE_MSR = "hardware_msr"  # RDMSR/WRMSR: hardware, #VC or native, by ECX
    CR_WRITE = "cr_write"  # MOV to CR: native, then a write trap if armed
    CR8_READ = "cr8_read"  # MOV from CR8: the CPU's TPR, which Unicorn does not keep


@frozen
class Sensitive:
    """A decoded sensitive instruction: its exit code, length, and what to do."""

    exit_code: int
    length: int
    action: Action
    mnemonic: str
    #: The GPR of a MOV to CR (its source) or from CR8 (its destination).
    operand: str = ""


_MODES = ((16, CS_MODE_16), (32, CS_MODE_32), (64, CS_MODE_64))
_CS = {bits: Cs(CS_ARCH_X86, mode) for bits, mode in _MODES}

_BY_MNEMONIC: dict[str, tuple[int, Action]] = {
    "cpuid": (SvmExit.CPUID, Action.NAE),
    "rdpmc": (SvmExit.RDPMC, Action.NAE),
    "rdtscp": (SvmExit.RDTSCP, Action.NAE),
    "invd": (SvmExit.INVD, Action.NAE),
    "wbinvd": (SvmExit.WBINVD, Action.NAE),
    "monitor": (SvmExit.MONITOR, Action.NAE),
    "mwait": (SvmExit.MWAIT, Action.NAE),
    "vmmcall": (SvmExit.VMMCALL, Action.NAE),
    "vmrun": (SvmExit.VMRUN, Action.NAE),
    "vmload": (SvmExit.VMLOAD, Action.NAE),
    "vmsave": (SvmExit.VMSAVE, Action.NAE),
    "stgi": (SvmExit.STGI, Action.NAE),
    "clgi": (SvmExit.CLGI, Action.NAE),
    "skinit": (SvmExit.SKINIT, Action.NAE),
    "invlpga": (SvmExit.INVLPGA, Action.NAE),
    "rdmsr": (SvmExit.MSR, Action.HARDWARE_MSR),
    "wrmsr": (SvmExit.MSR, Action.HARDWARE_MSR),
    **{m: (SvmExit.IOIO, Action.NAE) for m in ("in", "out", "insb", "insw", "insd",
                                               "outsb", "outsw", "outsd")},
}  # fmt: skip


def classify(code: bytes, bits: int) -> Sensitive | None:
    """Decode the instruction at the start of ``code`` and say if the hardware cares."""
    insn = next(_CS[bits].disasm(code[:MAX_INSN], 0, 1), None)
    if insn is None:
        return None
    prefixes = code[: insn.size]
    mnemonic = insn.mnemonic
    if mnemonic == "vmmcall" and b"\xf3" in prefixes[: insn.size - 3]:
        return Sensitive(SvmExit.VMGEXIT, insn.size, Action.AUTOMATIC_EXIT, "vmgexit")
    # capstone prints "rep insb" etc.; the exit is the same with or without REP.
    base = mnemonic.split()[-1]
    if base in _BY_MNEMONIC:
        code_, action = _BY_MNEMONIC[base]
        return Sensitive(code_, insn.size, action, mnemonic)
    if base == "mov" and "dr7" in insn.op_str:
        write = insn.op_str.startswith("dr7")
        exit_code = SvmExit.WRITE_DR7 if write else SvmExit.READ_DR7
        return Sensitive(exit_code, insn.size, Action.NAE, mnemonic)
    if base == "mov" and insn.op_str.endswith(", cr8"):
        return Sensitive(SvmExit.READ_CR8, insn.size, Action.CR8_READ, mnemonic,
                         insn.op_str.split(",")[0])  # fmt: skip
    if base == "mov" and insn.op_str.startswith("cr"):
        cr = int(insn.op_str.split(",")[0][2:])
        return Sensitive(SvmExit.CR0_WRITE_TRAP + cr, insn.size, Action.CR_WRITE, mnemonic,
                         insn.op_str.split(",")[1].strip())  # fmt: skip
    return None
