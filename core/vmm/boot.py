"""Booting a firmware image on a ``pc`` machine, as QEMU does with ``-bios``/pflash.

The CODE image is flash unit 0, ending at 4 GiB, encrypted and measured with
LAUNCH_UPDATE_DATA; a VARS file, if given, is flash unit 1 right below it, left
shared (QEMU never encrypts it). Every vCPU starts from the x86 reset state: the BSP
at the reset vector, the APs at the firmware's SEV-ES reset block, waiting for INIT
and SIPI. The launch measures the image, then each VMSA in vCPU order: what
``sev-snp-measure --mode seves`` predicts for the same image, vCPU count and type.
"""

from __future__ import annotations

from typing import Any

from sevsim.hw import Policy
from sevsim.kvm.cpuid import CpuidModel
from sevsim.kvm.vm import Kvm, Vm
from sevsim.vmm.clock import MachineClock
from sevsim.vmm.cpu_types import vcpu_signature
from sevsim.vmm.firmware import FirmwareImage
from sevsim.vmm.pc import PcConfig, PcMachine, pc_cpuid
from sevsim.vmm.pflash import FlashStorage
from sevsim.vmm.reset import BSP_RESET_EIP, reset_vmsa_fields

DEFAULT_VCPU_TYPE = "EPYC-v4"


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
    base = vm_args.pop("cpuid", None) or CpuidModel.default(kvm.platform.caps, signature)
    vm = kvm.create_vm(cpuid=pc_cpuid(base, config.vcpus), **vm_args)
    machine = PcMachine(config, clock or MachineClock(), **(machine_args or {}))
    machine.attach(vm, firmware, vars_store, vars_size)
    ap_eip = firmware.sev_es_reset_eip() if config.vcpus > 1 else None
    for index, vcpu in enumerate(vm.vcpus):
        vcpu.set_state(reset_vmsa_fields(BSP_RESET_EIP if index == 0 else ap_eip, signature))
    vm.launch_start(policy)
    vm.launch_update_data(firmware.gpa, firmware.size)
    vm.launch_update_vmsa()
    vm.launch_measure()
    vm.launch_finish()
    return vm, machine
