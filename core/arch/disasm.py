"""The capstone engines every layer decodes x86 with, made once per mode and option.

The CPU model (which instructions to stop in front of), the trace (the instruction
behind an exit), the modeled #VC handler (the operands of the faulting instruction)
and the assembler (checking keystone's output) all decode guest code. They share
engines from here instead of each building its own: an engine is costly to make and
holds no state between ``disasm`` calls, so one per (mode, detail) serves everyone.
It lives in ``arch``, the lowest layer all of them may import.

An engine handed out is shared: do not change its options (``detail``, ``skipdata``,
syntax); ask for the variant you need instead.
"""

from __future__ import annotations

import functools

from capstone import CS_ARCH_X86, CS_MODE_16, CS_MODE_32, CS_MODE_64, Cs

_MODES = {16: CS_MODE_16, 32: CS_MODE_32, 64: CS_MODE_64}


@functools.cache
def capstone(bits: int, *, detail: bool = False) -> Cs:
    """The shared engine for ``bits``-bit code (16, 32 or 64); ``detail`` for
    operand details (slower: only the #VC handler's decoder needs them)."""
    if bits not in _MODES:
        raise ValueError(f"bits must be 16, 32 or 64, got {bits!r}")
    engine = Cs(CS_ARCH_X86, _MODES[bits])
    engine.detail = detail
    return engine
