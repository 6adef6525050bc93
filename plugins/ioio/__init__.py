"""Port IO for SEV-ES guests (patch 17: "Add support for SEV-ES string IO"; SVM_EXIT_IOIO).

An SEV-ES guest's IN/OUT/INS/OUTS becomes a #VC; its handler sends SVM_EXIT_IOIO
through the GHCB with the instruction described in ``sw_exit_info_1`` (KVM's
``io_interception``): port in bits 31:16, data size one-hot in 6:4, address size in
9:7, REP in bit 3, string in bit 2, IN in bit 0. A plain OUT carries its value in
RAX; an IN gets it back in RAX (a 1- or 2-byte IN keeps the rest of RAX, a 4-byte
IN zero-extends it, as the CPU's own IN does in 64-bit mode). A string operation
moves its data through the scratch area, with the element count in ``sw_exit_info_2``
(the 5.15 fix: earlier KVM read that field as a byte count).
"""

from __future__ import annotations

from collections.abc import Iterator

from sevsim import hookimpl
from sevsim.arch.exits import GhcbErr, SvmExit
from sevsim.arch.ghcb import Ghcb
from sevsim.arch.ioio import IOIO_STR, IOIO_TYPE_IN, IoioInfo
from sevsim.kvm import outcome as O
from sevsim.kvm.context import ExitContext
from sevsim.kvm.dispatch import ExitHandler, ExitKind
from sevsim.kvm.scratch import Scratch

INT_MAX = 0x7FFF_FFFF


def requires(ghcb: Ghcb) -> Iterator[str]:
    """``sev_es_validate_vmgexit``: string IO needs sw_scratch, a plain OUT needs RAX."""
    info1 = ghcb["sw_exit_info_1"]
    if info1 & IOIO_STR:
        yield "sw_scratch"
    elif not info1 & IOIO_TYPE_IN:
        yield "rax"


def io_interception(ctx: ExitContext) -> O.Outcome | None:
    info = IoioInfo.decode(ctx.exit_info_1)
    if info is None:
        ctx.bad_input(GhcbErr.INVALID_INPUT)
        return None
    if info.string:
        return string_io(ctx, info)
    bus = ctx.vm.io_bus
    mask = (1 << (8 * info.size)) - 1
    if info.is_in:
        value = int.from_bytes(bus.read(info.port, info.size), "little")
        # complete_fast_pio_in: a 4-byte IN replaces RAX, as a 32-bit register write does.
        keep = ctx.regs["rax"] & ~mask if info.size < 4 else 0
        ctx.regs["rax"] = keep | value
        ctx.notes["ioio"] = f"port {info.port:#x} -> {value:#x}"
    else:
        value = ctx.regs["rax"] & mask
        bus.write(info.port, value.to_bytes(info.size, "little"))
        ctx.notes["ioio"] = f"port {info.port:#x} <- {value:#x}"
    return None


def string_io(ctx: ExitContext, info: IoioInfo) -> O.Outcome | None:
    """``sev_es_string_io``: ``count`` elements through the scratch area."""
    count = ctx.exit_info_2
    length = count * info.size
    if count > INT_MAX or length > INT_MAX:
        return O.Fail("EINVAL", f"string IO of {count} x {info.size} bytes is too long")
    scratch = ctx.map_scratch(length, sync=info.is_in)
    if not isinstance(scratch, Scratch):
        return scratch
    bus = ctx.vm.io_bus
    for i in range(0, length, info.size):
        if info.is_in:
            scratch.data[i : i + info.size] = bus.read(info.port, info.size)
        else:
            bus.write(info.port, bytes(scratch.data[i : i + info.size]))
    return None


@hookimpl
def sevsim_exit_handlers() -> Iterator[ExitHandler]:
    yield ExitHandler(ExitKind.VMGEXIT, SvmExit.IOIO, io_interception, requires)
