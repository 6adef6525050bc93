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
from sevsim.arch.exits import GhcbErr, VmgExit
from sevsim.kvm.context import ExitContext
from sevsim.kvm.dispatch import ExitHandler, ExitKind
from sevsim.kvm.scratch import setup_scratch

#: KVM hands MMIO to devices (or to userspace) in pieces of at most this size.
MMIO_CHUNK = 8


def _scratch(ctx: ExitContext, sync: bool):  # type: ignore[no-untyped-def]
    ghcb = ctx.ghcb
    assert ghcb is not None
    scratch = setup_scratch(ghcb, ctx.vcpu.ghcb_gpa, ghcb["sw_scratch"], ctx.exit_info_2, sync,
                            ctx.vm.memory)  # fmt: skip
    if isinstance(scratch, GhcbErr):
        ctx.bad_input(scratch)
        return None
    ctx.scratch = scratch
    return scratch


def mmio_read(ctx: ExitContext) -> None:
    scratch = _scratch(ctx, sync=True)
    if scratch is None:
        return
    gpa, bus = ctx.exit_info_1, ctx.vm.mmio_bus
    for offset in range(0, scratch.length, MMIO_CHUNK):
        size = min(MMIO_CHUNK, scratch.length - offset)
        scratch.data[offset : offset + size] = bus.read(gpa + offset, size)
    ctx.notes["mmio"] = f"read {scratch.length} bytes at {gpa:#x}"


def mmio_write(ctx: ExitContext) -> None:
    scratch = _scratch(ctx, sync=False)
    if scratch is None:
        return
    gpa, bus = ctx.exit_info_1, ctx.vm.mmio_bus
    for offset in range(0, scratch.length, MMIO_CHUNK):
        bus.write(gpa + offset, bytes(scratch.data[offset : offset + MMIO_CHUNK]))
    ctx.notes["mmio"] = f"wrote {scratch.length} bytes at {gpa:#x}"


@hookimpl
def sevsim_exit_handlers(config: object) -> Iterator[ExitHandler]:
    yield ExitHandler(ExitKind.VMGEXIT, VmgExit.MMIO_READ, mmio_read, ("sw_scratch",))
    yield ExitHandler(ExitKind.VMGEXIT, VmgExit.MMIO_WRITE, mmio_write, ("sw_scratch",))
