"""The ``pc`` machine: its configuration, CPUID topology, memory map and flash."""

from __future__ import annotations

import struct

import pytest

from sevsim.errors import ConfigError
from sevsim.guest.image import GuestImage
from sevsim.kvm.cpuid import CpuidModel
from sevsim.kvm.vm import Kvm
from sevsim.vmm.boot import launch_pc, launch_pc_image
from sevsim.vmm.clock import MachineClock
from sevsim.vmm.firmware import parse_firmware
from sevsim.vmm.fw_cfg import FW_CFG_IO_BASE
from sevsim.vmm.lapic import DEFAULT_BASE
from sevsim.vmm.pc import PcConfig, PcMachine, pc_cpuid
from sevsim.vmm.pflash import FlashStorage

MIB, GIB = 1 << 20, 1 << 30

# --- PcConfig -------------------------------------------------------------------------------


@pytest.mark.parametrize("vcpus", [0, 255, True, "2", 2.0])
def test_a_vcpu_count_outside_one_apic_id_each_is_refused(vcpus):
    with pytest.raises(ConfigError, match=rf"vCPU count {vcpus!r}: expected 1\.\.254"):
        PcConfig(vcpus=vcpus)


@pytest.mark.parametrize("ram", [16 * MIB, 32 * MIB + 4096, 0, -MIB, True])
def test_a_ram_size_below_32_mib_or_not_whole_mib_is_refused(ram):
    with pytest.raises(ConfigError, match=rf"memory size {ram!r}: expected a whole number of "
                                          "MiB, at least 32 MiB"):  # fmt: skip
        PcConfig(ram_size=ram)


def test_the_limits_themselves_are_accepted():
    assert PcConfig(254, 32 * MIB) == PcConfig(vcpus=254, ram_size=32 * MIB)


# --- CPUID ----------------------------------------------------------------------------------


def test_pc_cpuid_describes_n_single_thread_cores_in_one_package():
    base = CpuidModel.default(Kvm().platform.caps, 0x800F12)
    cpuid = pc_cpuid(base, 6)
    one = cpuid.lookup(1)
    assert (one.ebx >> 16) & 0xFF == 6  # logical processors in the package
    assert one.edx & 1 << 28  # HTT: more than one
    assert one.eax == base.lookup(1).eax  # the signature is kept
    smt, core, end = (cpuid.lookup(0xB, level) for level in range(3))
    assert (smt.eax, smt.ebx, smt.ecx & 0xFF00) == (0, 1, 0x100)  # 1 thread per core
    assert (core.eax, core.ebx, core.ecx & 0xFF00) == (3, 6, 0x200)  # 3 bits of core ID
    assert end.ecx & 0xFF00 == 0  # an invalid level ends the list
    assert cpuid.lookup(0).eax >= 0xB
    assert not pc_cpuid(base, 1).lookup(1).edx & 1 << 28


def test_each_vcpu_reads_its_own_apic_id():
    """Leaf 1 EBX[31:24] and leaf 0xB EDX are the vCPU's APIC ID; the count is shared."""
    vm, _ = launch_pc_image(Kvm(), GuestImage(b"\xf4"), PcConfig(3, 32 * MIB), ap_entry=0x20000)
    for index, vcpu in enumerate(vm.vcpus):
        one = vcpu.cpuid_runtime.apply(vm.cpuid, 1, 0)
        assert (one.ebx >> 24, (one.ebx >> 16) & 0xFF) == (index, 3)
        assert vcpu.cpuid_runtime.apply(vm.cpuid, 0xB, 1).edx == index


# --- memory map and e820 through fw_cfg -------------------------------------------------------


def _fw_cfg_item(machine: PcMachine, key: int, size: int) -> bytes:
    """Select ``key`` on the selector port and read ``size`` bytes from the data port."""
    machine.io.write(FW_CFG_IO_BASE, key.to_bytes(2, "little"))
    return b"".join(machine.io.read(FW_CFG_IO_BASE + 1, 1) for _ in range(size))


def _fw_cfg_file(machine: PcMachine, name: str) -> bytes:
    """A named file: looked up in the file directory (item 0x19), as firmware does."""
    count = int.from_bytes(_fw_cfg_item(machine, 0x19, 4), "big")
    directory = _fw_cfg_item(machine, 0x19, 4 + 64 * count)[4:]
    for at in range(0, len(directory), 64):
        size, select = struct.unpack_from(">IH", directory, at)
        if directory[at + 8 : at + 64].rstrip(b"\0").decode() == name:
            return _fw_cfg_item(machine, select, size)
    raise AssertionError(f"fw_cfg has no {name}")


def _attached(ram: int, vcpus: int = 1) -> tuple[object, PcMachine]:
    vm = Kvm().create_vm()
    machine = PcMachine(PcConfig(vcpus, ram), MachineClock(), base_time=0)
    machine.attach(vm)
    return vm, machine


@pytest.mark.parametrize(("ram", "entries"), [
    (512 * MIB, [(0, 512 * MIB)]),
    # QEMU's i440FX split: 3.5 GiB or more puts everything above 3 GiB at 4 GiB.
    (3584 * MIB, [(0, 3 * GIB), (4 * GIB, 512 * MIB)]),
    (3583 * MIB, [(0, 3583 * MIB)]),
])  # fmt: skip
def test_e820_through_fw_cfg_follows_the_ram_size(ram, entries):
    vm, machine = _attached(ram)
    table = _fw_cfg_file(machine, "etc/e820")
    parsed = [struct.unpack_from("<QQI", table, at) for at in range(0, len(table), 20)]
    # KVM's identity-map pages, reserved (what QEMU adds for a KVM guest), then the RAM.
    assert parsed == [(0xFEFF_C000, 0x4000, 2)] + [(gpa, size, 1) for gpa, size in entries]
    assert [(r.gpa, r.size) for r in vm.memory.ram] == entries
    assert _fw_cfg_item(machine, 0x00, 4) == b"QEMU"
    assert int.from_bytes(_fw_cfg_item(machine, 0x05, 2), "little") == 1  # CPU count


def test_the_lapic_page_is_mmio_and_each_vcpu_gets_an_apic():
    vm, machine = _attached(32 * MIB, vcpus=2)
    assert [(h.gpa, h.size) for h in vm.memory.mmio] == [(DEFAULT_BASE, 0x1000)]
    assert [apic.initial_id for apic in machine.apics] == [0, 1]
    assert len(vm.vcpus) == 2
    machine.current_vcpu = 1  # the page answers for the vCPU being run
    assert machine.mmio.read(DEFAULT_BASE + 0x20, 4) == bytes((0, 0, 0, 1))  # xAPIC ID 1


# --- flash ---------------------------------------------------------------------------------


class _Vars:
    """A VARS store in memory."""

    def __init__(self, data: bytes) -> None:
        self.data = bytearray(data)

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self.data[offset : offset + size])

    def write(self, offset: int, data: bytes) -> None:
        self.data[offset : offset + len(data)] = data


def test_flash_code_ends_at_4_gib_and_vars_sit_below_it():
    code = bytes(range(256)) * 256  # 64 KiB
    firmware = parse_firmware(code, "code.fd")
    store: FlashStorage = _Vars(b"\xa5" * 0x4000)
    vm, machine = launch_pc(Kvm(), firmware, PcConfig(1, 32 * MIB), vars_store=store,
                            vars_size=0x4000)  # fmt: skip
    slots = {r.name: r for r in vm.memory.ram}
    flash0 = slots["flash0 code.fd"]
    assert (flash0.gpa, flash0.size, flash0.readonly) == (4 * GIB - 0x10000, 0x10000, True)
    flash1 = slots["flash1 vars"]
    assert (flash1.gpa, flash1.size, flash1.readonly) == (4 * GIB - 0x14000, 0x4000, True)
    assert [(unit.name, where.base) for where, unit in machine.mmio.devices()
            if unit in machine.flash] == [("system.flash1", flash1.gpa),
                                          ("system.flash0", flash0.gpa)]  # fmt: skip
    assert vm.launch_digest() != bytes(32)
