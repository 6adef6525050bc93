"""Small guests and a launcher shared by the core tests."""

from __future__ import annotations

from sevsim import hookimpl
from sevsim.guest.asm import assemble
from sevsim.guest.image import CODE, GuestImage
from sevsim.hw import Platform
from sevsim.kvm import outcome as O
from sevsim.kvm.dispatch import ExitHandler, ExitKind, ExitTable
from sevsim.kvm.exits import SystemEvent, SystemEventType
from sevsim.kvm.extensions import Extensions
from sevsim.kvm.vm import Kvm, Vm
from sevsim.testing import SimLog, isolated_host
from sevsim.vmm.launch import launch_image

#: Terminate through the GHCB MSR protocol: GHCB MSR = 0x100, VMGEXIT.


def terminate_handler(ctx):
    """What KVM does for TERM_REQ: a SEV_TERM system event carrying the raw MSR value."""
    return O.ExitToUser(SystemEvent(SystemEventType.SEV_TERM, (ctx.msr,)))


class _Terminate:
    """A plugin owning only TERM_REQ (beside KVM's own rows)."""

    @hookimpl
    def sevsim_exit_handlers(self):
        yield ExitHandler(ExitKind.MSR_PROTOCOL, 0x100, terminate_handler)


def term_table() -> Extensions:
    return isolated_host({"term": _Terminate()}).start()


def launch(image: GuestImage, kvm: Kvm | None = None,
           table: ExitTable | Extensions | None = None) -> Vm:  # fmt: skip
    """Launch the image as an SEV-ES guest with one vCPU; TERM_REQ ends the run."""
    return launch_image(kvm or Kvm(), image, handlers=table if table is not None else term_table())


def watched_kvm() -> tuple[Kvm, SimLog]:
    """A KVM on a platform whose simulator's view a test can read."""
    sim = SimLog()
    return Kvm(Platform(sim=sim)), sim


def guest(source: str, **image_args) -> GuestImage:
    return GuestImage(assemble(source, CODE), **image_args)
