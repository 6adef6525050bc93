"""Booting a guest on a ``pc`` machine: a firmware image, or a long-mode guest image.

A firmware image boots as QEMU does with ``-bios``/pflash. The CODE image is flash
unit 0, ending at 4 GiB, encrypted and measured with LAUNCH_UPDATE_DATA; a VARS file,
if given, is flash unit 1 right below it, left shared (QEMU never encrypts it). Every
vCPU starts from the x86 reset state: the BSP at the reset vector, the APs at the
firmware's SEV-ES reset block, waiting for INIT and SIPI. The launch measures the
image, then each VMSA in vCPU order: what ``sev-snp-measure --mode seves`` predicts
for the same image, vCPU count and type.

A guest image (:class:`~sevsim.guest.image.GuestImage`, what the manifests build)
sits in RAM, its private pages measured with LAUNCH_UPDATE_DATA as
:func:`~sevsim.vmm.launch.launch_image` measures them. Every vCPU starts in long mode
with the image's registers: the BSP at the image's entry, the APs at ``ap_entry``
with no stack (RSP 0, as after RESET), waiting for INIT and SIPI. As with OVMF's
APs, every AP's VMSA is the same: an AP learns which one it is from its APIC ID and
picks its own stack. A vCPU's first SIPI only lets it run from its VMSA
(``received_first_sipi``); later ones release it from AP_HLT_LOOP or the AP reset
hold, after which it finds its way through the AP jump table it set.
"""

from __future__ import annotations

from typing import Any

from sevsim.errors import ConfigError
from sevsim.guest.image import GuestImage
from sevsim.hw import Policy
from sevsim.hw.vc_model import VcModel
from sevsim.kvm.cpuid import CpuidModel
from sevsim.kvm.vm import Kvm, Vm
from sevsim.vmm.clock import MachineClock
from sevsim.vmm.cpu_types import vcpu_signature
from sevsim.vmm.firmware import FirmwareImage
from sevsim.vmm.launch import DEFAULT_VCPU_TYPE, measure_image
from sevsim.vmm.pc import PcConfig, PcMachine, pc_cpuid
from sevsim.vmm.pflash import FlashStorage
from sevsim.vmm.reset import firmware_reset_states

__all__ = ["DEFAULT_VCPU_TYPE", "launch_pc", "launch_pc_image"]


def launch_pc(
    kvm: Kvm,
    firmware: FirmwareImage,
    config: PcConfig,
    *,
    vcpu_type: str = DEFAULT_VCPU_TYPE,
    vars_store: FlashStorage | None = None,
    vars_size: int = 0,
    clock: MachineClock | None = None,
    policy: int = Policy.ES | Policy.NODBG,
    machine_args: dict[str, Any] | None = None,
    **vm_args: Any,
) -> tuple[Vm, PcMachine]:
    """Create, fill, launch and finish a VM on a new ``pc`` machine; ready to run."""
    signature = vcpu_signature(vcpu_type)
    vm, machine = _pc_vm(kvm, config, signature, clock, machine_args, vm_args)
    machine.attach_flash(vm, firmware, vars_store, vars_size)
    for vcpu, state in zip(vm.vcpus, firmware_reset_states(firmware, config.vcpus, signature),
                           strict=True):  # fmt: skip
        vcpu.set_state(state)
    vm.launch_start(policy)
    vm.launch_update_data(firmware.gpa, firmware.size)
    _finish(vm)
    return vm, machine


def launch_pc_image(
    kvm: Kvm,
    image: GuestImage,
    config: PcConfig,
    *,
    ap_entry: int | None = None,
    vcpu_type: str = DEFAULT_VCPU_TYPE,
    clock: MachineClock | None = None,
    policy: int = Policy.ES | Policy.NODBG,
    vc_model: VcModel | None = None,
    machine_args: dict[str, Any] | None = None,
    **vm_args: Any,
) -> tuple[Vm, PcMachine]:
    """Launch a long-mode guest image on a new ``pc`` machine of ``config.vcpus`` vCPUs
    (the module doc), measured and finished; ready to run.

    ``ap_entry`` is where the APs start (required with more than one vCPU).
    ``vc_model`` runs a Python #VC handler as the guest's; it handles one vCPU, so it
    is refused with more than one.
    """
    if config.vcpus > 1 and ap_entry is None:
        raise ConfigError(f"{config.vcpus} vCPUs: expected an ap_entry, where the APs start")
    if config.vcpus > 1 and vc_model is not None:
        raise ConfigError(f"{config.vcpus} vCPUs: a modeled #VC handler serves one vCPU; "
                          "expected the guest's own #VC handler (native) with several")
    vm, machine = _pc_vm(kvm, config, vcpu_signature(vcpu_type), clock, machine_args, vm_args)
    for gpa, data in image.memory().items():
        vm.memory.write(gpa, data)
    bsp = image.initial_state()
    for index, vcpu in enumerate(vm.vcpus):
        vcpu.set_state(bsp if index == 0 else {**bsp, "rip": ap_entry, "rsp": 0})
        vcpu.vmsa.bind_vc_model(vc_model)  # guest software, chosen before launch
    vm.launch_start(policy)
    measure_image(vm, image)
    _finish(vm)
    return vm, machine


def _pc_vm(kvm: Kvm, config: PcConfig, signature: int, clock: MachineClock | None,
           machine_args: dict[str, Any] | None, vm_args: dict[str, Any]
           ) -> tuple[Vm, PcMachine]:  # fmt: skip
    """A VM with the ``pc`` CPUID topology and a machine attached (RAM, devices, vCPUs)."""
    base = vm_args.pop("cpuid", None) or CpuidModel.default(kvm.platform.caps, signature)
    vm = kvm.create_vm(cpuid=pc_cpuid(base, config.vcpus), **vm_args)
    machine = PcMachine(config, clock or MachineClock(), **(machine_args or {}))
    machine.attach(vm)
    return vm, machine


def _finish(vm: Vm) -> None:
    """Encrypt the VMSAs, measure and finish the launch."""
    vm.launch_update_vmsa()
    vm.launch_measure()
    vm.launch_finish()
