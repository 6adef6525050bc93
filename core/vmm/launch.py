"""Launching guests as a VMM does it through KVM: firmware images and guest images.

The flash image maps so that it ends at 4 GiB; every vCPU starts from the x86 reset
state — the BSP at the reset vector, the APs at the firmware's SEV-ES reset block —
and the launch measures the image, then each VMSA in vCPU order. That order and
contents are what a guest owner's tooling (sev-snp-measure) predicts.
"""

from __future__ import annotations

from typing import Any

from sevsim.guest.image import GuestImage
from sevsim.hw import Policy
from sevsim.hw.vc_model import VcModel
from sevsim.kvm.vm import Kvm, Vm
from sevsim.vmm.cpu_types import vcpu_signature
from sevsim.vmm.firmware import FirmwareImage
from sevsim.vmm.machine import Devices
from sevsim.vmm.reset import firmware_reset_states

DEFAULT_VCPU_TYPE = "EPYC-v4"


def launch_firmware(
    kvm: Kvm,
    firmware: FirmwareImage,
    *,
    vcpus: int = 1,
    vcpu_type: str = DEFAULT_VCPU_TYPE,
    ram_size: int = 0,
    policy: int = Policy.ES | Policy.NODBG,
    **vm_args: Any,
) -> Vm:
    """Create a VM with ``firmware`` as flash and ``vcpus`` vCPUs, launched up to
    LAUNCH_UPDATE_VMSA; the caller measures and finishes (or inspects first)."""
    if vcpus < 1:
        raise ValueError(f"a VM needs at least one vCPU, got {vcpus}")
    signature = vcpu_signature(vcpu_type)
    vm = kvm.create_vm(**vm_args)
    if ram_size:
        vm.add_ram(0, ram_size, "ram")
    vm.add_ram(firmware.gpa, firmware.size, f"flash {firmware.name}")
    vm.memory.write(firmware.gpa, firmware.data)
    for state in firmware_reset_states(firmware, vcpus, signature):
        vm.create_vcpu().set_state(state)
    vm.launch_start(policy)
    vm.launch_update_data(firmware.gpa, firmware.size)
    vm.launch_update_vmsa()
    return vm


def launch_image(
    kvm: Kvm,
    image: GuestImage,
    *,
    ram_size: int = 16 << 20,
    policy: int = Policy.ES | Policy.NODBG,
    vc_model: VcModel | None = None,
    devices: Devices | None = None,
    **vm_args: Any,
) -> Vm:
    """Launch a 64-bit guest image on one vCPU, measured and finished, ready to run.

    ``vc_model`` runs a Python #VC handler as the guest's (``sevsim.guest.vc``);
    without it #VC goes through the guest's IDT to its own handler. ``devices``
    (default: the standard machine, no console) are attached before launch.
    """
    vm = kvm.create_vm(**vm_args)
    vm.add_ram(0, ram_size, "ram")
    (devices or Devices.standard()).attach(vm)
    for gpa, data in image.memory().items():
        vm.memory.write(gpa, data)
    vcpu = vm.create_vcpu()
    vcpu.set_state(image.initial_state())
    vcpu.vmsa.bind_vc_model(vc_model)  # guest software, chosen before launch
    vm.launch_start(policy)
    measure_image(vm, image)
    vm.launch_update_vmsa()
    vm.launch_measure()
    vm.launch_finish()
    return vm


def measure_image(vm: Vm, image: GuestImage) -> None:
    """LAUNCH_UPDATE_DATA over every private page of ``image`` (already in memory)."""
    for gpa, length in image.launch_ranges():
        vm.launch_update_data(gpa, length)
