"""Port IO for SEV-ES guests (patch 17: "Add support for SEV-ES string IO"; SVM_EXIT_IOIO).

An SEV-ES guest's IN/OUT/INS/OUTS becomes a #VC; its handler sends SVM_EXIT_IOIO
through the GHCB with the instruction described in ``sw_exit_info_1`` (KVM's
``io_interception``): port in bits 31:16, data size one-hot in 6:4, address size in
9:7, REP in bit 3, string in bit 2, IN in bit 0. A plain OUT carries its value in
RAX; an IN gets it back in RAX (a 1- or 2-byte IN keeps the rest of RAX, a 4-byte
IN zero-extends it, as the CPU's own IN does in 64-bit mode). KVM takes the size
field as the guest wrote it, whatever it is: it never answers an IOIO request with a
GHCB error. A string operation moves its data through the scratch area, with the
element count in ``sw_exit_info_2``; the 5.11 era reproduces that kernel's bug (fixed
in 5.15, 019057bd73d1): it sized the scratch area as ``sw_exit_info_2`` *bytes*, so
only that many bytes of the elements moved reach the guest.
"""

from __future__ import annotations

from collections.abc import Iterator

from sevsim import hookimpl
from sevsim.arch.exits import SvmExit
from sevsim.arch.ghcb import Ghcb
from sevsim.arch.ioio import IOIO_STR, IOIO_TYPE_IN, IoioInfo
from sevsim.kvm import outcome as O
from sevsim.kvm.context import ExitContext
from sevsim.kvm.dispatch import ExitHandler, ExitKind
from sevsim.kvm.scratch import Scratch

INT_MAX = 0x7FFF_FFFF


def requires(ghcb: Ghcb) -> tuple[str, ...]:
    """``sev_es_validate_vmgexit``: string IO needs sw_scratch, a plain OUT needs RAX.
    (The same tuples every time: kvm checks each answer once.)"""
    info1 = ghcb["sw_exit_info_1"]
    if info1 & IOIO_STR:
        return ("sw_scratch",)
    return () if info1 & IOIO_TYPE_IN else ("rax",)


def io_interception(ctx: ExitContext) -> O.Outcome | None:
    info = IoioInfo.decode(ctx.exit_info_1)
    if info.string:
        return string_io(ctx, info)
    bus = ctx.vm.io_bus
    mask = (1 << (8 * info.size)) - 1
    if info.is_in:
        value = int.from_bytes(bus.read(info.port, info.size), "little")
        # complete_fast_pio_in: a 4-byte IN replaces RAX, as a 32-bit register write does.
        keep = ctx.regs["rax"] & ~mask if info.size < 4 else 0
        ctx.regs["rax"] = keep | value
        ctx.notes["ioio"] = f"port {hex(info.port)} -> {hex(value)}"
    else:
        value = ctx.regs["rax"] & mask
        bus.write(info.port, value.to_bytes(info.size, "little"))
        ctx.notes["ioio"] = f"port {hex(info.port)} <- {hex(value)}"  # hex(): cheaper, same
    return None


def string_io(ctx: ExitContext, info: IoioInfo) -> O.Outcome | None:
    """``sev_es_string_io``: ``count`` elements through the scratch area."""
    count = ctx.exit_info_2
    length = count * info.size
    if count > INT_MAX or length > INT_MAX:
        return O.Fail("EINVAL", f"string IO of {count} x {info.size} bytes is too long")
    if ctx.vm.era == "v5.11":
        length = count  # the element count taken as a byte count (fixed in 5.15)
    scratch = ctx.map_scratch(length, sync=info.is_in)
    if not isinstance(scratch, Scratch):
        return scratch
    bus = ctx.vm.io_bus
    if info.size == 0:
        # A size field with no size bit, used as given: count accesses of no bytes,
        # which reach no device in QEMU (address_space_rw of length 0). Up to 2**31 of
        # them are not replayed one by one: nothing would happen in them.
        count = 0
    if info.is_in:
        moved = b"".join(bus.read(info.port, info.size) for _ in range(count))
        scratch.data[:] = moved[:length].ljust(length, b"\0")
    else:
        data = bytes(scratch.data).ljust(count * info.size, b"\0")
        for i in range(count):
            bus.write(info.port, data[i * info.size : (i + 1) * info.size])
    return None


@hookimpl
def sevsim_exit_handlers() -> Iterator[ExitHandler]:
    yield ExitHandler(ExitKind.VMGEXIT, SvmExit.IOIO, io_interception, requires)
