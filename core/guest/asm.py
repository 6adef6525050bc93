"""Assembling guest code with keystone, with the fixes keystone needs.

Keystone 0.9.2 assembles ``rep vmmcall`` (VMGEXIT) correctly, but:

- it emits a 16-bit offset for ``ljmp sel:imm32`` in 32-bit code; write such jumps
  as ``.byte`` data;
- in 64-bit code it encodes an absolute memory operand (``mov rbx, [0x7010]``) as
  RIP-relative with the same displacement, which addresses the wrong place. We
  refuse such output rather than run it: address memory through a register
  (``mov rcx, 0x7010; mov rbx, [rcx]``) or write ``[rip + ...]`` on purpose.
"""

from __future__ import annotations

from keystone import KS_ARCH_X86, KS_MODE_16, KS_MODE_32, KS_MODE_64, Ks, KsError

from sevsim.arch.disasm import capstone
from sevsim.errors import SevsimError

_MODES = {16: KS_MODE_16, 32: KS_MODE_32, 64: KS_MODE_64}
_ENGINES: dict[int, Ks] = {}


class AssemblyError(SevsimError):
    """Keystone refused the source; the message names the line it stopped at."""


def assemble(source: str, address: int = 0, bits: int = 64) -> bytes:
    """Assemble ``source`` (Intel syntax; ``;`` or newlines between instructions)."""
    if bits not in _MODES:
        raise AssemblyError(f"bits must be 16, 32 or 64, got {bits!r}")
    ks = _ENGINES.get(bits)
    if ks is None:
        ks = _ENGINES[bits] = Ks(KS_ARCH_X86, _MODES[bits])
    try:
        encoding, _ = ks.asm(source, address)
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
