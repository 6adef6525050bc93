"""Small guests and a launcher shared by the core tests."""

from __future__ import annotations

from sevsim.guest.asm import assemble
from sevsim.guest.image import CODE, GuestImage
from sevsim.kvm import outcome as O
from sevsim.kvm.dispatch import ExitHandler, ExitKind, ExitTable
from sevsim.kvm.exits import SystemEvent, SystemEventType
from sevsim.kvm.vm import Kvm, Vm

RAM_SIZE = 16 << 20

#: Terminate through the GHCB MSR protocol: GHCB MSR = 0x100, VMGEXIT.
TERMINATE = """
    mov ecx, 0xC0010130
    mov eax, 0x100
    xor edx, edx
    wrmsr
    rep vmmcall
"""


def terminate_handler(ctx):
    """What KVM does for TERM_REQ: a SEV_TERM system event carrying the raw MSR value."""
    return O.ExitToUser(SystemEvent(SystemEventType.SEV_TERM, (ctx.msr,)))


def term_table() -> ExitTable:
    return ExitTable([ExitHandler(ExitKind.MSR_PROTOCOL, 0x100, terminate_handler)])


def launch(image: GuestImage, kvm: Kvm | None = None, table: ExitTable | None = None) -> Vm:
    """Place the image, launch it as an SEV-ES guest with one vCPU, and finish the launch."""
    vm = (kvm or Kvm()).create_vm(handlers=table if table is not None else term_table())
    vm.add_ram(0, RAM_SIZE)
    for gpa, data in image.memory().items():
        vm.memory.write(gpa, data)
    vcpu = vm.create_vcpu()
    vcpu.set_state(image.initial_state())
    vm.launch_start()
    private = [gpa for gpa in range(0, 0x200000, 0x1000) if gpa not in image.shared]
    for gpa in private:
        vm.launch_update_data(gpa, 0x1000)
    vm.launch_update_vmsa()
    vm.launch_measure()
    vm.launch_finish()
    return vm


def guest(source: str, **image_args) -> GuestImage:
    return GuestImage(assemble(source, CODE), **image_args)
