"""The ``.equ`` prelude of the native #VC handler: every number it takes from elsewhere.

The handler's ``.s`` files name what they use (``GHCB_sw_exit_code``, ``SVM_EXIT_IOIO``,
``MSR_AMD64_SEV_ES_GHCB``, ``X86_TRAP_GP``) and never copy a value: each name is
defined here, from ``sevsim.arch`` or from the build's parameters, when the handler
is assembled. A change in ``sevsim.arch`` reaches the guest code with nothing to
edit, and the guest code cannot drift from what the hypervisor side decodes.

Names follow Linux: a structure's fields as ``STRUCT_field`` (``asm-offsets``), exit
codes, MSRs and register bits by their kernel names. The build's own parameters are
``VC_*``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from enum import IntEnum
from types import ModuleType

from sevsim.arch import ioio, msr
from sevsim.arch.exits import GhcbResp, SvmExit, VmgExit
from sevsim.arch.ghcb import GHCB, GHCB_SAVE_AREA, valid_bit
from sevsim.arch.ghcb_msr import (
    GHCB_MSR_TERM_REASON_POS,
    GHCB_MSR_TERM_REASON_SET_POS,
    TERM_REASON_SET,
    GhcbMsr,
    TermReason,
)
from sevsim.arch.layout import Layout
from sevsim.arch.vectors import ERROR_CODE_VECTORS, Vector
from sevsim.arch.vmcb import EventInj
from sevsim.guest.vc_native.layout import STATE_OFFSET, VC_STATE

#: ``sevsim.arch.msr``'s register bits (single-bit masks), which also get their bit
#: number as ``<NAME>_BIT``, for BT.
_REGISTER_BITS = ("EFER_", "CR0_", "CR4_", "X86_EFLAGS_")
_VALID_BITS = 8 * GHCB_SAVE_AREA["valid_bitmap"].size


def _layout(prefix: str, layout: Layout) -> Iterator[tuple[str, int]]:
    """``PREFIX_field`` = offset for every named integer or byte-array field, and
    ``PREFIX_field_SIZE`` for the arrays (a nested structure has its own table)."""
    for field in layout.fields:
        if field.name.startswith("reserved"):
            continue
        if field.is_int:
            yield f"{prefix}_{field.name}", field.offset
        elif field.type.startswith("u8["):
            yield f"{prefix}_{field.name}", field.offset
            yield f"{prefix}_{field.name}_SIZE", field.size


def _ghcb_valid_bits() -> Iterator[tuple[str, int]]:
    """``GHCB_field_VALID_BYTE`` / ``_VALID_MASK``: where a field's valid bit is, as a
    byte offset in the GHCB and a mask (what ``ghcb_set`` and ``ghcb_require`` test)."""
    bitmap = GHCB_SAVE_AREA.offset("valid_bitmap")
    for field in GHCB_SAVE_AREA.fields:
        bit = valid_bit(field.name)
        if field.is_int and bit < _VALID_BITS:
            yield f"GHCB_{field.name}_VALID_BYTE", bitmap + bit // 8
            yield f"GHCB_{field.name}_VALID_MASK", 1 << bit % 8


def _enum(prefix: str, enum: type[IntEnum]) -> Iterator[tuple[str, int]]:
    return ((f"{prefix}{member.name}", member.value) for member in enum)


def _constants(module: ModuleType) -> Iterator[tuple[str, int]]:
    """A module's upper-case integer constants, under their own names."""
    for name, value in vars(module).items():
        if name.isupper() and not name.startswith("_") and type(value) is int:
            yield name, value


def _with_bit_numbers(flags: Mapping[str, int]) -> dict[str, int]:
    """Single-bit masks, each with its bit number as ``<NAME>_BIT``."""
    assert all(value > 0 and value & (value - 1) == 0 for value in flags.values()), flags
    return {**flags, **{f"{name}_BIT": value.bit_length() - 1 for name, value in flags.items()}}


def _register_constants() -> dict[str, int]:
    """MSR numbers, and the EFER, CR0, CR4 and RFLAGS bits with their bit numbers."""
    constants = dict(_constants(msr))
    flags = {k: v for k, v in constants.items() if k.startswith(_REGISTER_BITS)}
    return constants | _with_bit_numbers(flags)


def _eventinj() -> dict[str, int]:
    """EVENTINJ's fields (what an exception reply carries in ``sw_exit_info_2``)."""
    fields = {f"EVENTINJ_{name}": value for name, value in vars(EventInj).items()
              if name.isupper() and type(value) is int}  # fmt: skip
    return fields | _with_bit_numbers({"EVENTINJ_EV": EventInj.EV,
                                       "EVENTINJ_VALID": EventInj.VALID})  # fmt: skip


@functools.cache
def arch_symbols() -> Mapping[str, int]:
    """Every name the handler may use that does not depend on how it is built."""
    return {
        **dict(_layout("GHCB", GHCB_SAVE_AREA)),
        **dict(_layout("GHCB", GHCB)),
        **dict(_ghcb_valid_bits()),
        **dict(_enum("SVM_EXIT_", SvmExit)),
        **dict(_enum("SVM_VMGEXIT_", VmgExit)),
        **dict(_enum("GHCB_HV_RESP_", GhcbResp)),
        **dict(_enum("GHCB_MSR_", GhcbMsr)),
        "GHCB_MSR_TERM_REASON_SET_POS": GHCB_MSR_TERM_REASON_SET_POS,
        "GHCB_MSR_TERM_REASON_POS": GHCB_MSR_TERM_REASON_POS,
        "TERM_REASON_SET": TERM_REASON_SET,
        **dict(_enum("TERM_", TermReason)),
        **_register_constants(),
        **dict(_constants(ioio)),
        **{f"SEG_{name.upper()}": number for name, number in ioio.SEGMENT_NUMBERS.items()},
        **dict(_enum("X86_TRAP_", Vector)),
        "ERROR_CODE_VECTORS": sum(1 << vector for vector in ERROR_CODE_VECTORS),
        **_eventinj(),
        **dict(_layout("STATE", VC_STATE)),
    }


def build_symbols(
    address: int, *, ghcb: int, ghcb_gpa: int, cbit: int, protocol_version: int
) -> dict[str, int]:
    """The names that depend on where this copy of the handler goes."""
    return {
        "VC_STATE": address + STATE_OFFSET,  # the state page's linear address
        "VC_GHCB": ghcb,  # the GHCB page's linear address (mapped shared)
        "VC_GHCB_GPA": ghcb_gpa,  # ... and its guest-physical address
        "VC_C_BIT": cbit,  # the C-bit position, masked off in page-table entries
        "VC_PROTOCOL_VERSION": protocol_version,
    }


def prelude(symbols: Mapping[str, int]) -> str:
    """The ``.equ`` lines defining ``symbols`` (before any other source)."""
    width = max(map(len, symbols), default=0)
    return "".join(f".equ {name + ',':<{width + 1}} {value:#x}\n"
                   for name, value in symbols.items())  # fmt: skip
