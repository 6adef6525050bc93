"""Assembling guest code with keystone, with the fixes keystone needs.

Keystone 0.9.2 assembles ``rep vmmcall`` (VMGEXIT) correctly, but:

- it emits a 16-bit offset for ``ljmp sel:imm32`` in 32-bit code; write such jumps
  as ``.byte`` data;
- in 64-bit code it encodes an absolute memory operand (``mov rbx, [0x7010]``) as
  RIP-relative with the same displacement, which addresses the wrong place. We
  refuse such output rather than run it: address memory through a register
  (``mov rcx, 0x7010; mov rbx, [rcx]``) or write ``[rip + ...]`` on purpose;
- its lexer reads unprefixed numbers in a radix it copies from a field nothing
  initialises (keystone PRs #528, #608) unless ``ks_option`` is called, which sets
  it to 16. So ``mov rcx, 16384`` assembled as ``mov rcx, 0x16384`` in some
  processes, depending on what the heap held. We call ``ks_option`` (radix 16,
  every time) and hand keystone every number in hex: multi-digit decimals and
  ``h``-suffixed numbers are rewritten ``0x...`` first (single digits, ``0x``,
  ``0b`` and octal ``0...`` read the same in any radix).
"""

from __future__ import annotations

import re

from keystone import (
    KS_ARCH_X86,
    KS_MODE_16,
    KS_MODE_32,
    KS_MODE_64,
    KS_OPT_SYNTAX_INTEL,
    Ks,
    KsError,
)

from sevsim.arch.disasm import capstone
from sevsim.errors import SevsimError

_MODES = {16: KS_MODE_16, 32: KS_MODE_32, 64: KS_MODE_64}
_ENGINES: dict[int, Ks] = {}


class AssemblyError(SevsimError):
    """Keystone refused the source; the message names the line it stopped at."""


#: A comment, a string or a character literal (left alone: a quote inside a comment
#: starts no string), or a number keystone would read by its radix: a decimal of two
#: digits or more, or hex with an ``h`` suffix. Not part of a name (``r15``,
#: ``label10``), of a ``0x``/``0b`` literal, of a float or a macro argument.
_NUMBER = re.compile(
    r'(/\*.*?\*/|#[^\n]*|"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])\')'
    r"|(?<![\w.$@\\])(?:([1-9][0-9]+)|([0-9][0-9a-fA-F]*)[hH])(?![\w.$])",
    re.DOTALL,
)


def _in_hex(match: re.Match[str]) -> str:
    kept, decimal, suffixed = match.groups()
    if kept is not None:
        return kept
    return hex(int(decimal)) if decimal is not None else hex(int(suffixed, 16))


def hex_literals(source: str) -> str:
    """``source`` with every radix-dependent number written as ``0x...``."""
    return _NUMBER.sub(_in_hex, source)


def _engine(bits: int) -> Ks:
    ks = _ENGINES.get(bits)
    if ks is None:
        ks = _ENGINES[bits] = Ks(KS_ARCH_X86, _MODES[bits])
        ks.syntax = KS_OPT_SYNTAX_INTEL  # ks_option: the lexer's radix is now set (16)
    return ks


def assemble(source: str, address: int = 0, bits: int = 64) -> bytes:
    """Assemble ``source`` (Intel syntax; ``;`` or newlines between instructions)."""
    if bits not in _MODES:
        raise AssemblyError(f"bits must be 16, 32 or 64, got {bits!r}")
    try:
        encoding, _ = _engine(bits).asm(hex_literals(source), address)
    except KsError as err:
        raise AssemblyError(f"cannot assemble ({err}) in:\n{source}") from None
    code = bytes(encoding or b"")
    if bits == 64 and "rip" not in source.lower():
        _refuse_accidental_rip_relative(code, address)
    return code


def _refuse_accidental_rip_relative(code: bytes, address: int) -> None:
    for insn in capstone(64).disasm(code, address):
        if "rip +" in insn.op_str or "rip -" in insn.op_str:
            raise AssemblyError(
                f"keystone encoded an absolute address as RIP-relative at {insn.address:#x} "
                f"({insn.mnemonic} {insn.op_str}); load the address into a register instead"
            )
