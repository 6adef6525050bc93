"""QEMU's ``pc`` machine (i440FX/PIIX, ``-nodefaults``) for an SEV-ES guest.

What sits where, as OVMF finds it:

==========================  ===============================================
RAM                         from 0; above 3.5 GiB split at 3 GiB / 4 GiB
flash unit 0 (CODE)         read-only, ends at 4 GiB; measured at launch
flash unit 1 (VARS)         CFI flash right below CODE; reads from memory
                            until the guest sends a command (romd)
MMIO 0xFEE00000 (4 KiB)     the local APIC of the vCPU that accesses it
port 0x20/0xA0/0x4D0        8259 pair and ELCR
port 0x40-0x43, 0x61        8254 PIT, PC speaker port
port 0x70/0x71              MC146818 RTC and CMOS
port 0x92, 0xCF9, 0x501     fast A20/reset, reset control, isa-debug-exit
port 0x3F8                  16550 UART (the console)
port 0x402, 0x80            QEMU debug console, POST codes
port 0x510-0x51B            fw_cfg (with DMA)
port 0xCF8/0xCFC            PCI: i440FX host bridge, PIIX3, PIIX4 PM
port 0xB000 (PMBA)          ACPI PM block (PM1 event/control, PM timer)
==========================  ===============================================

Interrupts: the PIT drives 8259 IRQ 0 and the RTC IRQ 8; the 8259's INTR goes to
every local APIC's LINT0 (the BSP's is ExtINT after reset). Each vCPU's APIC
raises its ``intr`` line for the run loop (:mod:`sevsim.vmm.vmm`), which injects
the vector with KVM_INTERRUPT, as QEMU does with a userspace irqchip. INIT and
SIPI from one APIC's ICR reach the other vCPUs through KVM (``Vcpu.init``,
``Vcpu.deliver_sipi``).

The devices answer inside KVM_RUN (kvm calls the buses as it would in-kernel
devices), so whatever needs the run loop — a reset, power-off or debug-exit request,
an interrupt line going up, another vCPU woken by an IPI — kicks the running vCPU
(``Vcpu.immediate_exit``, QEMU's ``qemu_cpu_kick``): its KVM_RUN returns -EINTR
after the exit being handled, and the loop acts at once instead of at the end of a
time slice.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from attrs import frozen

from sevsim.errors import ConfigError
from sevsim.hw import CpuidLeaf
from sevsim.kvm.buses import GuestBus
from sevsim.kvm.cpuid import CpuidModel
from sevsim.kvm.vcpu import MpState, Vcpu
from sevsim.kvm.vm import Vm
from sevsim.vmm import reset_ports
from sevsim.vmm.acpi_pm import AcpiPmBlock
from sevsim.vmm.bus import Bus, report_accesses
from sevsim.vmm.clock import MachineClock
from sevsim.vmm.cmos import RTC_IRQ, RTC_PORT, RTC_PORTS, Mc146818Rtc
from sevsim.vmm.devices import COM1, DEBUG_PORT, POST_PORT, DebugPort, PostPort, Uart16550
from sevsim.vmm.firmware import FOUR_GIB, FirmwareImage
from sevsim.vmm.fw_cfg import FW_CFG_IO_BASE, FW_CFG_IO_SIZE, FwCfg, i440fx_ram_ranges
from sevsim.vmm.irq import IrqLine
from sevsim.vmm.lapic import DEFAULT_BASE, MMIO_SIZE, ApicBus, LocalApic, is_apic_msr
from sevsim.vmm.pci import attach_i440fx
from sevsim.vmm.pflash import FlashStorage, PflashCfi01
from sevsim.vmm.pic import I8259Pic
from sevsim.vmm.pit import I8254, PIT_IRQ, PIT_PORT, PIT_PORTS, SPEAKER_PORT, PcSpeaker
from sevsim.vmm.power import MachineRequest, RequestSink

#: The smallest RAM OVMF boots in (its PEI memory comes from the top of low RAM).
MIN_RAM = 32 << 20
#: QEMU's default ``-m``.
DEFAULT_RAM = 512 << 20
#: The TSC frequency the guest is told (TSC-deadline mode of the APIC timer).
TSC_HZ = 2_000_000_000
#: One xAPIC ID each, 0xFF being the broadcast (QEMU's ``MAX_APICS`` is 255).
MAX_VCPUS = 254


@frozen
class PcConfig:
    """What a user chooses about the machine."""

    vcpus: int = 1
    ram_size: int = DEFAULT_RAM

    def __attrs_post_init__(self) -> None:
        if isinstance(self.vcpus, bool) or not isinstance(self.vcpus, int) or not (
            1 <= self.vcpus <= MAX_VCPUS
        ):
            raise ConfigError(f"vCPU count {self.vcpus!r}: expected 1..{MAX_VCPUS} (one APIC "
                              "ID each)")  # fmt: skip
        if isinstance(self.ram_size, bool) or not isinstance(self.ram_size, int) or (
            self.ram_size < MIN_RAM or self.ram_size % (1 << 20)
        ):
            raise ConfigError(f"memory size {self.ram_size!r}: expected a whole number of MiB, "
                              f"at least {MIN_RAM >> 20} MiB")  # fmt: skip


class _SlotStorage:
    """A flash unit's contents: its memory slot, as the host (QEMU) sees it."""

    def __init__(self, vm: Vm, gpa: int) -> None:
        self._memory = vm.memory
        self._gpa = gpa

    def read(self, offset: int, size: int) -> bytes:
        return self._memory.read(self._gpa + offset, size)

    def write(self, offset: int, data: bytes) -> None:
        self._memory.write(self._gpa + offset, data)


class _ApicWindow:
    """0xFEE00000: each vCPU reaches its own local APIC at the same address, so the
    page dispatches on the vCPU the run loop is running (QEMU's ``current_cpu``)."""

    name = "lapic"

    def __init__(self, apics: Sequence[LocalApic], current: Callable[[], int]) -> None:
        self._apics = apics
        self._current = current

    def read(self, offset: int, size: int) -> bytes:
        return self._apics[self._current()].read(offset, size)

    def write(self, offset: int, data: bytes) -> None:
        self._apics[self._current()].write(offset, data)


class _ApicMsrs:
    """APIC_BASE and the x2APIC registers: the VMM's MSRs (KVM's MSR filter exits)."""

    def __init__(self, apics: Sequence[LocalApic]) -> None:
        self._apics = apics

    def read(self, vcpu_id: int, index: int) -> int | None:
        return self._apics[vcpu_id].msr_read(index) if is_apic_msr(index) else None

    def write(self, vcpu_id: int, index: int, value: int) -> bool | None:
        return self._apics[vcpu_id].msr_write(index, value) if is_apic_msr(index) else None


def pc_cpuid(base: CpuidModel, vcpus: int) -> CpuidModel:
    """``base`` with the topology of ``vcpus`` single-thread cores in one package, as
    QEMU describes ``-smp N`` (leaf 1's logical count, leaf 0xB's levels); the APIC ID
    fields are each vCPU's own (``CpuidRuntime.apic_id``)."""
    leaves = dict(base.leaves)
    one = base.lookup(1)
    # HTT says the package has more than one logical processor: clear for one vCPU
    # whatever the base says, as QEMU sets it only for -smp N > 1.
    htt = 1 << 28
    leaves[(1, 0)] = CpuidLeaf(one.eax, one.ebx & 0xFF00_FFFF | min(vcpus, 0xFF) << 16,
                               one.ecx, one.edx & ~htt | (htt if vcpus > 1 else 0))  # fmt: skip
    core_bits = (vcpus - 1).bit_length()
    leaves[(0xB, 0)] = CpuidLeaf(0, 1, 0x100, 0)  # SMT level: one thread per core
    leaves[(0xB, 1)] = CpuidLeaf(core_bits, vcpus, 0x201, 0)  # core level
    leaves[(0xB, 2)] = CpuidLeaf(0, 0, 2, 0)  # invalid level: the end of the list
    zero = base.lookup(0)
    if zero.eax < 0xB:
        leaves[(0, 0)] = CpuidLeaf(0xB, zero.ebx, zero.ecx, zero.edx)
    return CpuidModel(leaves)


class PcMachine:
    """The devices of one ``pc`` machine and how they are wired.

    Build it, :meth:`attach` it to a VM (RAM, flash, buses, one local APIC per vCPU),
    and let the run loop drive :attr:`clock`, read :meth:`interrupt_vector` and set
    :attr:`current_vcpu` before it runs one. What the guest asks of the machine
    (reset, power-off, debug-exit) waits in :attr:`requests` for the run loop;
    ``console`` receives the UART's output.
    """

    def __init__(
        self,
        config: PcConfig,
        clock: MachineClock,
        *,
        console: Callable[[bytes], None] | None = None,
        debug_console: Callable[[bytes], None] | None = None,
        base_time: int | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        clock.on_due = self.kick
        self.requests: list[MachineRequest] = []
        request: RequestSink = self._request
        self.io = Bus("io", 0x1_0000)
        self.mmio = Bus("mmio", 1 << 52)
        self.ram = i440fx_ram_ranges(config.ram_size)
        #: The vCPU whose access the devices are serving.
        self.current_vcpu = 0
        self.uart = Uart16550(sink=console)
        self.debug = DebugPort(sink=debug_console)
        self.post = PostPort()
        self.io.insert(self.uart, COM1, 8)
        self.io.insert(self.debug, DEBUG_PORT, 1)
        self.io.insert(self.post, POST_PORT, 1)
        self.pm = AcpiPmBlock(clock, request)
        self.pci = attach_i440fx(self.io, self.pm, reset_ports.attach(self.io, request))
        self.pic = I8259Pic()
        self.pic.insert_into(self.io)
        self.pit = I8254(clock, IrqLine("irq0"))
        self.pic.connect(PIT_IRQ, self.pit.irq)
        self.io.insert(self.pit, PIT_PORT, PIT_PORTS)
        self.io.insert(PcSpeaker(self.pit), SPEAKER_PORT, 1)
        below = sum(size for gpa, size in self.ram if gpa < FOUR_GIB)
        self.rtc = Mc146818Rtc(
            clock, IrqLine("irq8"), base_time=int(time.time()) if base_time is None else base_time,
            ram_below_4g=below, ram_above_4g=config.ram_size - below, cpus=config.vcpus,
        )  # fmt: skip
        self.pic.connect(RTC_IRQ, self.rtc.irq)
        self.io.insert(self.rtc, RTC_PORT, RTC_PORTS)
        self.apic_bus = ApicBus()
        self.apics: list[LocalApic] = []
        self.vcpus: list[Vcpu] = []
        self.flash: list[PflashCfi01] = []
        self.fw_cfg: FwCfg | None = None

    # -- building ---------------------------------------------------------------------

    def attach(self, vm: Vm) -> None:
        """Give ``vm`` this machine's RAM and devices, and create its vCPUs, each with a
        local APIC (vCPU 0 is the BSP; the APs wait for INIT and SIPI). What the guest
        boots from comes next: flash (:meth:`attach_flash`) or an image written into
        RAM; :mod:`sevsim.vmm.boot` launches either."""
        for index, (gpa, size) in enumerate(self.ram):
            vm.add_ram(gpa, size, "ram" if index == 0 else "ram-above-4g")
        self.fw_cfg = FwCfg(vm.memory, self.ram, self.config.vcpus, hpet=False)
        self.io.insert(self.fw_cfg, FW_CFG_IO_BASE, FW_CFG_IO_SIZE)
        vm.add_mmio(DEFAULT_BASE, MMIO_SIZE, "lapic")
        self.mmio.insert(_ApicWindow(self.apics, lambda: self.current_vcpu), DEFAULT_BASE,
                         MMIO_SIZE)  # fmt: skip
        vm.attach_buses(self.io, self.mmio, _ApicMsrs(self.apics))
        report_accesses(vm, (self.io, self.mmio), lambda: self.current_vcpu)
        for index in range(self.config.vcpus):
            self._add_vcpu(vm, index)

    def attach_flash(self, vm: Vm, firmware: FirmwareImage, vars_store: FlashStorage | None,
                     vars_size: int) -> None:  # fmt: skip
        """QEMU's pflash: ``firmware`` as unit 0 (read-only, ending at 4 GiB) and, with
        ``vars_store``, unit 1 right below it. The image is written to its slot but not
        launched (:func:`sevsim.vmm.boot.launch_pc`)."""
        code_gpa = firmware.gpa
        vm.add_ram(code_gpa, firmware.size, f"flash0 {firmware.name}", readonly=True)
        vm.memory.write(code_gpa, firmware.data)
        self.flash.append(self._flash(vm, code_gpa, firmware.size, "system.flash0", None, True))
        if vars_store is not None:
            vars_gpa = code_gpa - vars_size
            vm.add_ram(vars_gpa, vars_size, "flash1 vars", readonly=True)
            vm.memory.write(vars_gpa, vars_store.read(0, vars_size))
            self.flash.append(
                self._flash(vm, vars_gpa, vars_size, "system.flash1", vars_store, False)
            )

    def _flash(self, vm: Vm, gpa: int, size: int, name: str, backing: FlashStorage | None,
               read_only: bool) -> PflashCfi01:  # fmt: skip
        unit = PflashCfi01(
            _SlotStorage(vm, gpa), size, backing=backing, read_only=read_only, name=name,
            on_romd=lambda romd: vm.memory.set_romd(gpa, romd),
        )  # fmt: skip
        self.mmio.insert(unit, gpa, size)
        return unit

    def _add_vcpu(self, vm: Vm, index: int) -> None:
        vcpu = vm.create_vcpu()
        vcpu.cpuid_runtime.update(apic_id=index)

        def nmi() -> None:
            vcpu.nmi()
            self._kick_for(index)

        def init() -> None:
            vcpu.init()
            self._kick_for(index)

        def sipi(vector: int) -> None:
            # Only a vCPU waiting for one takes a SIPI (QEMU's ``wait_for_sipi``, KVM's
            # INIT_RECEIVED check): the second SIPI of INIT-SIPI-SIPI finds the AP
            # running and must not release the reset hold it may have entered since.
            if vcpu.mp_state is MpState.INIT_RECEIVED:
                vcpu.deliver_sipi(vector)
                self._kick_for(index)

        apic = LocalApic(
            index, clock=self.clock, bus=self.apic_bus, intr=IrqLine(f"intr{index}"),
            on_nmi=nmi, on_init=init, on_sipi=sipi, bsp=index == 0, tsc_hz=TSC_HZ,
        )  # fmt: skip
        # An interrupt is injected by the run loop (KVM_INTERRUPT), for whichever vCPU.
        apic.intr.connect(self._kick_on_raise)
        self.pic.intr.connect(apic.set_lint0)
        if index:
            # An AP waits for INIT and SIPI (KVM_MP_STATE_INIT_RECEIVED).
            vcpu.mp_state = MpState.INIT_RECEIVED
        self.apics.append(apic)
        self.vcpus.append(vcpu)

    # -- kicking the running vCPU -------------------------------------------------------

    def kick(self) -> None:
        """End the running vCPU's KVM_RUN after the exit being handled (QEMU's
        ``qemu_cpu_kick``): the run loop has something to do. Harmless between runs:
        the loop clears it before each one."""
        if self.vcpus:
            self.vcpus[self.current_vcpu].immediate_exit = True

    def _kick_on_raise(self, level: bool) -> None:
        """An interrupt line went up: the loop injects the interrupt between runs."""
        if level:
            self.kick()

    def _kick_for(self, index: int) -> None:
        """vCPU ``index`` changed state (NMI, INIT, SIPI): KVM handles that for the vCPU
        that is running at its next entry; any other must be scheduled by the loop."""
        if index != self.current_vcpu:
            self.kick()

    def _request(self, request: MachineRequest) -> None:
        self.requests.append(request)
        self.kick()

    # -- what the run loop asks -------------------------------------------------------

    def interrupt_pending(self, index: int) -> bool:
        """Whether vCPU ``index`` has an external interrupt to take (its APIC's INTR)."""
        return self.apics[index].intr.level

    def interrupt_vector(self, index: int) -> int:
        """The CPU's INTA cycle for vCPU ``index``: the 8259's vector when LINT0 brings
        ExtINT (it comes first), else the APIC's highest pending one."""
        apic = self.apics[index]
        if apic.extint_pending():
            return self.pic.acknowledge()
        return apic.acknowledge()

    @property
    def buses(self) -> tuple[GuestBus, GuestBus]:
        return self.io, self.mmio
