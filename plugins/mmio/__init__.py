"""MMIO for SEV-ES guests (patch 18: SVM_VMGEXIT_MMIO_READ / MMIO_WRITE).

The hypervisor cannot decode an SEV-ES guest's instructions, so MMIO cannot be
emulated the usual way: the guest's #VC handler decodes the access itself and asks
with a GHCB exit. ``sw_exit_info_1`` is the guest-physical address, ``sw_exit_info_2``
the length, and the data travels through the scratch area (``sw_scratch``): written
back to the guest for a read (KVM's ``kvm_sev_es_mmio_read`` / ``_write``). Accesses
reach the VM's MMIO bus at most 8 bytes at a time, as KVM splits them.
"""

from __future__ import annotations

from collections.abc import Iterator

from sevsim import hookimpl
from sevsim.arch.exits import VmgExit
from sevsim.kvm.context import ExitContext
from sevsim.kvm.dispatch import ExitHandler, ExitKind
from sevsim.kvm.outcome import Outcome
from sevsim.kvm.scratch import Scratch

#: KVM hands MMIO to devices (or to userspace) in pieces of at most this size.
MMIO_CHUNK = 8


#: Bytes of a long (string) access the trace shows before eliding the rest.
SHOWN_BYTES = 16


def describe(gpa: int, data: bytes | bytearray | memoryview) -> str:
    """``4 bytes at 0xd0000000: 78 56 34 12``, for the trace (long moves elided)."""
    shown = bytes(data[:SHOWN_BYTES]).hex(" ")
    more = " ..." if len(data) > SHOWN_BYTES else ""
    return f"{len(data)} bytes at {gpa:#x}: {shown}{more}"


def mmio_read(ctx: ExitContext) -> Outcome | None:
    scratch = ctx.map_scratch(ctx.exit_info_2, sync=True)
    if not isinstance(scratch, Scratch):
        return scratch
    gpa, bus = ctx.exit_info_1, ctx.vm.mmio_bus
    for offset in range(0, scratch.length, MMIO_CHUNK):
        size = min(MMIO_CHUNK, scratch.length - offset)
        scratch.data[offset : offset + size] = bus.read(gpa + offset, size)
    ctx.notes["mmio"] = f"read {describe(gpa, scratch.data)}"
    return None


def mmio_write(ctx: ExitContext) -> Outcome | None:
    scratch = ctx.map_scratch(ctx.exit_info_2, sync=False)
    if not isinstance(scratch, Scratch):
        return scratch
    gpa, bus = ctx.exit_info_1, ctx.vm.mmio_bus
    for offset in range(0, scratch.length, MMIO_CHUNK):
        bus.write(gpa + offset, bytes(scratch.data[offset : offset + MMIO_CHUNK]))
    ctx.notes["mmio"] = f"wrote {describe(gpa, scratch.data)}"
    return None


@hookimpl
def sevsim_exit_handlers() -> Iterator[ExitHandler]:
    yield ExitHandler(ExitKind.VMGEXIT, VmgExit.MMIO_READ, mmio_read, ("sw_scratch",))
    yield ExitHandler(ExitKind.VMGEXIT, VmgExit.MMIO_WRITE, mmio_write, ("sw_scratch",))
