"""The local APIC and the APIC bus: register reset values, the exact sequences OVMF's
BaseXApicX2ApicLib and LocalApicTimerDxe program, the timer on the machine clock,
priorities, IPIs (MpInitLib's INIT-SIPI-SIPI broadcast), x2APIC, and guest accesses
that must never raise."""

from __future__ import annotations

import random
from typing import Any

import pytest
from attrs import define, field

from sevsim.vmm.bus import Bus
from sevsim.vmm.clock import MachineClock
from sevsim.vmm.irq import IrqLine
from sevsim.vmm.lapic import (
    DEFAULT_BASE,
    MSR_APIC_BASE,
    MSR_TSC_DEADLINE,
    ApicBus,
    ApicMessage,
    DeliveryMode,
    LapicError,
    LocalApic,
    Reg,
    is_apic_msr,
)
from sevsim.vmm.lapic_timer import MIN_PERIODIC_NS, divisor

MS = 1_000_000
X2APIC_ENABLED = DEFAULT_BASE | 0xD00  # EN | EXTD | BSP
XAPIC_BSP = DEFAULT_BASE | 0x900
XAPIC_AP = DEFAULT_BASE | 0x800


@define
class Vcpu:
    """What the vCPU side sees of its APIC: the INTR line and the NMI/INIT/SIPI calls."""

    intr: IrqLine = field(factory=IrqLine)
    events: list[tuple[str, int]] = field(factory=list)

    def nmi(self) -> None:
        self.events.append(("nmi", 0))

    def init(self) -> None:
        self.events.append(("init", 0))

    def sipi(self, vector: int) -> None:
        self.events.append(("sipi", vector))


@define
class Machine:
    clock: MachineClock
    bus: ApicBus
    apics: list[LocalApic]
    vcpus: list[Vcpu]


def make_apic(
    apic_id: int, clock: MachineClock, bus: ApicBus, vcpu: Vcpu, **options: Any
) -> LocalApic:
    return LocalApic(
        apic_id,
        clock=clock,
        bus=bus,
        intr=vcpu.intr,
        on_nmi=vcpu.nmi,
        on_init=vcpu.init,
        on_sipi=vcpu.sipi,
        **options,
    )


def machine(cpus: int = 1, **options: Any) -> Machine:
    clock, bus = MachineClock(), ApicBus()
    vcpus = [Vcpu() for _ in range(cpus)]
    apics = [make_apic(n, clock, bus, vcpu, bsp=n == 0, **options) for n, vcpu in enumerate(vcpus)]
    assert bus.apics == tuple(apics)
    return Machine(clock, bus, apics, vcpus)


def rd(apic: LocalApic, reg: int) -> int:
    return int.from_bytes(apic.read(reg, 4), "little")


def wr(apic: LocalApic, reg: int, value: int) -> None:
    apic.write(reg, value.to_bytes(4, "little"))


def bank_bit(apic: LocalApic, bank: Reg, vector: int) -> bool:
    return bool(rd(apic, bank + 0x10 * (vector // 32)) >> (vector % 32) & 1)


def enable(apic: LocalApic, spurious: int = 0xFF) -> None:
    wr(apic, Reg.SVR, 0x100 | spurious)


# -- reset state --------------------------------------------------------------------


def test_reset_values_as_qemu_and_kvm() -> None:
    m = machine(cpus=3)
    bsp, ap = m.apics[0], m.apics[2]
    assert bsp.msr_read(MSR_APIC_BASE) == XAPIC_BSP
    assert ap.msr_read(MSR_APIC_BASE) == XAPIC_AP
    assert rd(ap, Reg.ID) == 0x0200_0000
    assert rd(ap, Reg.LVR) == 0x0005_0014  # version 0x14, highest LVT entry 5
    expected = {
        Reg.TPR: 0, Reg.APR: 0, Reg.PPR: 0, Reg.EOI: 0, Reg.LDR: 0, Reg.DFR: 0xFFFF_FFFF,
        Reg.SVR: 0xFF, Reg.ESR: 0, Reg.ICR_LOW: 0, Reg.ICR_HIGH: 0,
        Reg.LVT_TIMER: 0x1_0000, Reg.LVT_THERMAL: 0x1_0000, Reg.LVT_PERF: 0x1_0000,
        Reg.LVT_LINT0: 0x1_0000, Reg.LVT_LINT1: 0x1_0000, Reg.LVT_ERROR: 0x1_0000,
        Reg.TIMER_INITIAL: 0, Reg.TIMER_CURRENT: 0, Reg.TIMER_DIVIDE: 0,
    }  # fmt: skip
    assert {reg: rd(ap, reg) for reg in expected} == expected
    for bank in (Reg.ISR, Reg.TMR, Reg.IRR):
        assert [rd(ap, bank + 0x10 * i) for i in range(8)] == [0] * 8
    # The BSP's LINT0 is ExtINT, unmasked, so the 8259 gets through from reset.
    assert rd(bsp, Reg.LVT_LINT0) == 0x700
    assert not ap.sw_enabled and ap.pending_vector() is None


def test_cmci_adds_an_lvt_entry() -> None:
    with_cmci = machine(cmci=True).apics[0]
    assert rd(with_cmci, Reg.LVR) == 0x0006_0014
    assert rd(with_cmci, Reg.LVT_CMCI) == 0x1_0000
    without = machine().apics[0]
    assert rd(without, Reg.LVT_CMCI) == 0  # reserved: logs an illegal register address
    wr(without, Reg.ESR, 0)
    assert rd(without, Reg.ESR) == 0x80


def test_bad_configuration_is_reported() -> None:
    clock, bus, vcpu = MachineClock(), ApicBus(), Vcpu()
    with pytest.raises(LapicError, match="APIC ID 255"):
        make_apic(255, clock, bus, vcpu)
    with pytest.raises(LapicError, match="TSC frequency 0"):
        make_apic(0, clock, bus, vcpu, tsc_hz=0)
    with pytest.raises(LapicError, match="physical address width 60"):
        make_apic(0, clock, bus, vcpu, phys_addr_bits=60)
    make_apic(3, clock, bus, vcpu)
    with pytest.raises(LapicError, match="APIC ID 3 is already taken by 'lapic3'"):
        make_apic(3, clock, bus, vcpu)


# -- OVMF's timer programming -------------------------------------------------------


def ovmf_initialize_apic_timer(
    apic: LocalApic, divide: int, count: int, periodic: bool, vector: int
) -> None:
    """BaseXApicX2ApicLib's InitializeApicTimer, access for access (xAPIC mode)."""
    svr = rd(apic, Reg.SVR)  # InitializeLocalApicSoftwareEnable (TRUE)
    if not svr & 0x100:
        wr(apic, Reg.SVR, svr | 0x100)
    if divide:
        code = (divide.bit_length() - 2) & 7  # (HighBitSet32 (DivideValue) - 1) & 0x7
        dcr = rd(apic, Reg.TIMER_DIVIDE) & ~0xB | (code & 3) | (code >> 2) << 3
        wr(apic, Reg.TIMER_DIVIDE, dcr)
    lvt = rd(apic, Reg.LVT_TIMER) & ~(0x3 << 17 | 0x1_0000 | 0xFF)
    wr(apic, Reg.LVT_TIMER, lvt | (1 << 17 if periodic else 0) | vector)
    wr(apic, Reg.TIMER_INITIAL, count)


def test_sec_timer_setup_stays_masked() -> None:
    """SEC: InitializeApicTimer (0, MAX_UINT32, TRUE, 5) then DisableApicTimerInterrupt.
    Vector 5 is illegal, but masked it never fires, so no error is logged."""
    m = machine()
    apic = m.apics[0]
    ovmf_initialize_apic_timer(apic, 0, 0xFFFF_FFFF, True, 5)
    wr(apic, Reg.LVT_TIMER, rd(apic, Reg.LVT_TIMER) | 0x1_0000)
    assert rd(apic, Reg.SVR) == 0x1FF
    assert rd(apic, Reg.LVT_TIMER) == 0x3_0005
    period = 0xFFFF_FFFF * 2  # divide configuration 0 is divide by 2
    m.clock.advance(period // 2)
    assert rd(apic, Reg.TIMER_CURRENT) == 0xFFFF_FFFF // 2 + 1
    m.clock.advance(period + 1)
    assert rd(apic, Reg.IRR) == 0 and apic.pending_vector() is None
    wr(apic, Reg.ESR, 0)
    assert rd(apic, Reg.ESR) == 0


def test_local_apic_timer_dxe_ticks_every_10_ms() -> None:
    """LocalApicTimerDxe: TimerPeriod 100000 (100 ns units), PcdFSBClock 10^9, divide 1:
    10 000 000 counts, periodic, vector 32; its handler EOIs each tick."""
    m = machine()
    apic, vcpu = m.apics[0], m.vcpus[0]
    ovmf_initialize_apic_timer(apic, 1, 100_000 * 1_000_000_000 // 10_000_000, True, 32)
    assert rd(apic, Reg.TIMER_DIVIDE) == 0xB and divisor(0xB) == 1
    assert rd(apic, Reg.LVT_TIMER) == 0x2_0020
    assert rd(apic, Reg.TIMER_INITIAL) == 10_000_000
    assert rd(apic, Reg.TIMER_CURRENT) == 10_000_000

    m.clock.advance(4 * MS)
    assert rd(apic, Reg.TIMER_CURRENT) == 6_000_000
    assert not vcpu.intr.level and apic.pending_vector() is None

    m.clock.advance(10 * MS)
    assert bank_bit(apic, Reg.IRR, 32) and not bank_bit(apic, Reg.TMR, 32)
    assert apic.pending_vector() == 32 and vcpu.intr.level
    assert rd(apic, Reg.TIMER_CURRENT) == 10_000_000  # reloaded

    assert apic.acknowledge() == 32
    assert not bank_bit(apic, Reg.IRR, 32) and bank_bit(apic, Reg.ISR, 32)
    assert rd(apic, Reg.PPR) == 0x20 and not vcpu.intr.level

    m.clock.advance(15 * MS)
    assert rd(apic, Reg.TIMER_CURRENT) == 5_000_000 and not bank_bit(apic, Reg.IRR, 32)
    m.clock.advance(20 * MS)  # a tick while 32 is in service: IRR, but not deliverable
    assert bank_bit(apic, Reg.IRR, 32) and apic.pending_vector() is None
    wr(apic, Reg.EOI, 0)
    assert rd(apic, Reg.ISR) == 0 and rd(apic, Reg.PPR) == 0
    assert apic.pending_vector() == 32 and vcpu.intr.level


def test_periodic_timer_does_not_drift() -> None:
    m = machine()
    apic, vcpu = m.apics[0], m.vcpus[0]
    enable(apic)
    fired: list[int] = []
    vcpu.intr.connect(lambda level: fired.append(m.clock.now_ns()) if level else None)
    wr(apic, Reg.TIMER_DIVIDE, 0x1)  # divide by 4
    wr(apic, Reg.LVT_TIMER, 0x2_0040)
    wr(apic, Reg.TIMER_INITIAL, 333_333)  # 1 333 332 ns
    for now in range(1, 10 * MS, 777_777):  # odd steps, each firing at most once
        m.clock.advance(now)
        if apic.pending_vector() is not None:
            apic.acknowledge()
            apic.eoi()
    assert fired == [1_333_332 * k for k in range(1, 8)]


def test_one_shot_timer_and_divide_change() -> None:
    m = machine()
    apic = m.apics[0]
    enable(apic)
    wr(apic, Reg.TIMER_DIVIDE, 0x3)  # divide by 16
    wr(apic, Reg.LVT_TIMER, 0x31)
    wr(apic, Reg.TIMER_INITIAL, 1000)  # 16 us
    m.clock.advance(4_000)
    assert rd(apic, Reg.TIMER_CURRENT) == 750
    wr(apic, Reg.TIMER_DIVIDE, 0x0)  # divide by 2: the 12 us left become 1.5 us
    assert rd(apic, Reg.TIMER_CURRENT) == 750
    m.clock.advance(5_499)
    assert apic.pending_vector() is None
    m.clock.advance(5_500)
    assert apic.pending_vector() == 0x31
    assert rd(apic, Reg.TIMER_CURRENT) == 0
    apic.acknowledge()
    apic.eoi()
    m.clock.advance(100 * MS)  # one-shot: no second expiry
    assert rd(apic, Reg.IRR + 0x10) == 0
    assert [divisor(d) for d in (0, 1, 2, 3, 8, 9, 0xA, 0xB)] == [2, 4, 8, 16, 32, 64, 128, 1]


def test_masked_timer_keeps_counting_and_tiny_periods_are_limited() -> None:
    m = machine()
    apic = m.apics[0]
    enable(apic)
    wr(apic, Reg.TIMER_DIVIDE, 0xB)
    wr(apic, Reg.LVT_TIMER, 0x3_0050)  # periodic, masked
    wr(apic, Reg.TIMER_INITIAL, 1)  # a 1 ns period fires every 200 us, as in KVM
    assert m.clock.advance(10 * MS) == 10 * MS // MIN_PERIODIC_NS
    assert rd(apic, Reg.IRR + 0x20) == 0
    wr(apic, Reg.LVT_TIMER, 0x2_0050)
    m.clock.advance(10 * MS + MIN_PERIODIC_NS)
    assert apic.pending_vector() == 0x50


def test_tsc_deadline_timer() -> None:
    m = machine(tsc_hz=2_000_000_000)
    apic = m.apics[0]
    enable(apic)
    assert apic.msr_read(MSR_TSC_DEADLINE) == 0
    assert apic.msr_write(MSR_TSC_DEADLINE, 1000)  # not in deadline mode: ignored
    wr(apic, Reg.TIMER_INITIAL, 500)
    wr(apic, Reg.LVT_TIMER, 0x4_00EF)  # TSC-deadline mode stops the count
    assert rd(apic, Reg.LVT_TIMER) == 0x4_00EF
    assert rd(apic, Reg.TIMER_INITIAL) == 0 and rd(apic, Reg.TIMER_CURRENT) == 0
    wr(apic, Reg.TIMER_INITIAL, 500)  # ignored in TSC-deadline mode
    assert rd(apic, Reg.TIMER_INITIAL) == 0
    m.clock.advance(1000)  # TSC 2000
    assert apic.msr_write(MSR_TSC_DEADLINE, 2_000_001)
    assert apic.msr_read(MSR_TSC_DEADLINE) == 2_000_001
    m.clock.advance(1_000_000)  # TSC 2 000 000
    assert apic.pending_vector() is None
    m.clock.advance(1_000_001)
    assert apic.pending_vector() == 0xEF
    assert apic.msr_read(MSR_TSC_DEADLINE) == 0  # disarmed once it fired
    apic.acknowledge()
    apic.eoi()
    assert apic.msr_write(MSR_TSC_DEADLINE, 5)  # already passed: fires at once
    assert apic.pending_vector() == 0xEF
    # Without a TSC frequency (no CPUID TSC-deadline), bit 18 is not writable.
    plain = machine().apics[0]
    enable(plain)
    wr(plain, Reg.LVT_TIMER, 0x4_00EF)
    assert rd(plain, Reg.LVT_TIMER) == 0xEF


# -- priorities ---------------------------------------------------------------------


def test_tpr_masks_by_priority_class() -> None:
    m = machine()
    apic, vcpu = m.apics[0], m.vcpus[0]
    enable(apic, spurious=0xF7)
    assert apic.accept(0x45) and apic.accept(0x32)
    wr(apic, Reg.TPR, 0x40)
    assert rd(apic, Reg.PPR) == 0x40
    assert apic.pending_vector() is None and not vcpu.intr.level
    assert apic.acknowledge() == 0xF7  # spurious: nothing above the priority
    assert bank_bit(apic, Reg.IRR, 0x45)
    apic.cr8 = 3  # CR8 = TPR[7:4]
    assert rd(apic, Reg.TPR) == 0x30 and apic.cr8 == 3
    assert apic.pending_vector() == 0x45 and vcpu.intr.level
    assert apic.acknowledge() == 0x45
    assert rd(apic, Reg.PPR) == 0x40  # the in-service class beats the TPR
    apic.tpr = 0
    assert apic.pending_vector() is None  # 0x32 is below the in-service 0x45
    wr(apic, Reg.EOI, 0)
    assert apic.pending_vector() == 0x32
    assert apic.acknowledge() == 0x32 and apic.acknowledge() == 0xF7


def test_software_disabled_apic_drops_fixed_and_masks_lvts() -> None:
    m = machine()
    apic = m.apics[0]
    assert not apic.accept(0x40)  # software-disabled at reset
    enable(apic)
    wr(apic, Reg.LVT_ERROR, 0xFE)
    assert apic.accept(0x40)
    wr(apic, Reg.SVR, 0xFF)
    assert rd(apic, Reg.LVT_ERROR) == 0x1_00FE
    assert apic.pending_vector() is None and apic.acknowledge() == 0xFF
    wr(apic, Reg.LVT_ERROR, 0xFE)  # stays masked while disabled
    assert rd(apic, Reg.LVT_ERROR) == 0x1_00FE


def test_level_triggered_eoi_reaches_the_io_apic() -> None:
    m = machine()
    apic = m.apics[0]
    enable(apic)
    eois: list[int] = []
    m.bus.eoi_listeners.append(eois.append)
    apic.accept(0x61, level_triggered=True)
    apic.accept(0x51)
    assert bank_bit(apic, Reg.TMR, 0x61) and not bank_bit(apic, Reg.TMR, 0x51)
    assert apic.acknowledge() == 0x61
    wr(apic, Reg.EOI, 0)
    assert apic.acknowledge() == 0x51
    wr(apic, Reg.EOI, 0)
    assert eois == [0x61]


def test_illegal_vectors_and_esr_write_then_read() -> None:
    m = machine(cpus=2)
    apic = m.apics[0]
    enable(apic)
    enable(m.apics[1])
    wr(apic, Reg.ICR_HIGH, 0x0100_0000)
    wr(apic, Reg.ICR_LOW, 0x0000_0005)  # fixed, vector 5: not sent
    assert rd(m.apics[1], Reg.IRR) == 0
    assert rd(apic, Reg.ESR) == 0  # errors show only after an ESR write
    wr(apic, Reg.ESR, 0)
    assert rd(apic, Reg.ESR) == 0x20  # send illegal vector
    assert not apic.accept(3)
    wr(apic, Reg.ESR, 0)
    assert rd(apic, Reg.ESR) == 0x40  # receive illegal vector
    wr(apic, Reg.ESR, 0)
    assert rd(apic, Reg.ESR) == 0
    # An unmasked LVT error entry raises its vector on a new error.
    wr(apic, Reg.LVT_ERROR, 0xFE)
    rd(apic, 0x400)
    assert apic.pending_vector() == 0xFE


def test_lint0_extint_and_lint1_nmi() -> None:
    m = machine(cpus=2)
    bsp, ap = m.apics
    pic = IrqLine("pic-intr")
    pic.connect(bsp.set_lint0)
    pic.set_level(True)
    assert bsp.extint_pending() and m.vcpus[0].intr.level  # the BSP's reset LINT0
    wr(bsp, Reg.LVT_LINT0, 0x1_0700)
    assert not bsp.extint_pending() and not m.vcpus[0].intr.level
    # ProgramVirtualWireMode: SVR vector 0xF, LINT0 ExtINT, LINT1 NMI.
    wr(bsp, Reg.SVR, 0x10F)
    wr(bsp, Reg.LVT_LINT0, 0x700)
    wr(bsp, Reg.LVT_LINT1, 0x400)
    assert m.vcpus[0].intr.level
    bsp.set_lint1(True)
    bsp.set_lint1(False)
    assert m.vcpus[0].events == [("nmi", 0)]
    # A hardware-disabled APIC passes the 8259 straight through.
    ap.set_lint0(True)
    assert not ap.extint_pending()
    assert ap.msr_write(MSR_APIC_BASE, DEFAULT_BASE)
    assert ap.extint_pending() and m.vcpus[1].intr.level


# -- IPIs ---------------------------------------------------------------------------


def test_init_sipi_sipi_broadcast_wakes_the_three_aps() -> None:
    """MpInitLib's SendInitSipiSipiAllExcludingSelf through SendIpi, in xAPIC mode."""
    m = machine(cpus=4)
    bsp = m.apics[0]
    for ap in m.apics[1:]:
        enable(ap)
        wr(ap, Reg.LVT_TIMER, 0x20)
    start = 0x9F000

    def send_ipi(icr_low: int, apic_id: int) -> None:
        saved_high = rd(bsp, Reg.ICR_HIGH)
        assert rd(bsp, Reg.ICR_LOW) & 0x1000 == 0  # delivery status idle
        wr(bsp, Reg.ICR_HIGH, apic_id << 24)
        wr(bsp, Reg.ICR_LOW, icr_low)
        assert rd(bsp, Reg.ICR_LOW) & 0x1000 == 0
        wr(bsp, Reg.ICR_HIGH, saved_high)

    send_ipi(0xC4500, 0)  # INIT, assert, all excluding self
    send_ipi(0xC4600 | start >> 12, 0)  # start-up
    send_ipi(0xC4600 | start >> 12, 0)  # the second SIPI (Intel)
    assert m.vcpus[0].events == []
    for vcpu, ap in zip(m.vcpus[1:], m.apics[1:], strict=True):
        assert vcpu.events == [("init", 0), ("sipi", 0x9F), ("sipi", 0x9F)]
        assert rd(ap, Reg.SVR) == 0xFF and rd(ap, Reg.LVT_TIMER) == 0x1_0000  # INIT reset
        assert rd(ap, Reg.ID) == ap.initial_id << 24
    assert rd(bsp, Reg.ICR_LOW) == 0xC469F
    # A level-triggered INIT de-assert is ignored.
    send_ipi(0xC8500, 0)
    assert all(len(vcpu.events) == 3 for vcpu in m.vcpus[1:])


def test_physical_logical_and_lowest_priority_destinations() -> None:
    m = machine(cpus=4)
    for apic in m.apics:
        enable(apic)
    bsp = m.apics[0]

    def irr(vector: int) -> list[bool]:
        found = [bank_bit(apic, Reg.IRR, vector) for apic in m.apics]
        for apic in m.apics:  # clear for the next send
            while apic.pending_vector() is not None:
                apic.acknowledge()
                apic.eoi()
        return found

    wr(bsp, Reg.ICR_HIGH, 0x0200_0000)
    wr(bsp, Reg.ICR_LOW, 0x0041)  # fixed, physical, to APIC 2
    assert irr(0x41) == [False, False, True, False]
    wr(bsp, Reg.ICR_LOW, 0x4_0042)  # self
    assert irr(0x42) == [True, False, False, False]
    wr(bsp, Reg.ICR_LOW, 0x8_0043)  # all including self
    assert irr(0x43) == [True, True, True, True]
    # Flat logical: Linux gives each CPU one bit of the 8-bit logical ID.
    for n, apic in enumerate(m.apics):
        wr(apic, Reg.LDR, (1 << n) << 24)
    wr(bsp, Reg.ICR_HIGH, 0x0A00_0000)
    wr(bsp, Reg.ICR_LOW, 0x0844)  # logical, bits 1 and 3
    assert irr(0x44) == [False, True, False, True]
    # Cluster logical: cluster 1, members 0 and 1.
    for n, apic in enumerate(m.apics):
        wr(apic, Reg.DFR, 0x0FFF_FFFF)
        wr(apic, Reg.LDR, (0x10 | 1 << (n % 2)) << 24 if n >= 2 else 0x21 << 24)
    assert rd(bsp, Reg.DFR) == 0x0FFF_FFFF
    wr(bsp, Reg.ICR_HIGH, 0x1300_0000)
    wr(bsp, Reg.ICR_LOW, 0x0845)
    assert irr(0x45) == [False, False, True, True]
    # Lowest priority, all including self: KVM's vector hashing picks 0x46 % 4 = 2.
    wr(bsp, Reg.ICR_LOW, 0x8_0146)
    assert irr(0x46) == [False, False, True, False]
    # NMI to APIC 3; an SMI goes nowhere.
    wr(bsp, Reg.ICR_HIGH, 0x0300_0000)
    wr(bsp, Reg.ICR_LOW, 0x0400)
    wr(bsp, Reg.ICR_LOW, 0x0200)
    assert m.vcpus[3].events == [("nmi", 0)]
    # I/O APIC message: physical broadcast, level-triggered.
    assert m.bus.deliver(ApicMessage(0x47, DeliveryMode.FIXED, 0xFF, level_triggered=True)) == 4
    assert all(bank_bit(apic, Reg.TMR, 0x47) for apic in m.apics)


# -- x2APIC -------------------------------------------------------------------------


def test_apic_base_transitions_as_kvm() -> None:
    apic = machine(phys_addr_bits=40).apics[0]
    assert not apic.msr_write(MSR_APIC_BASE, (XAPIC_BSP | 0x400) & ~0x800)  # x2APIC, not EN
    assert not apic.msr_write(MSR_APIC_BASE, XAPIC_BSP | 1 << 40)  # above MAXPHYADDR
    assert not apic.msr_write(MSR_APIC_BASE, XAPIC_BSP | 0x200)  # reserved bit 9
    assert apic.msr_write(MSR_APIC_BASE, X2APIC_ENABLED)
    assert apic.x2apic_mode
    assert not apic.msr_write(MSR_APIC_BASE, XAPIC_BSP)  # x2APIC -> xAPIC: #GP
    assert apic.msr_write(MSR_APIC_BASE, DEFAULT_BASE | 0x100)  # -> disabled
    assert not apic.msr_write(MSR_APIC_BASE, X2APIC_ENABLED)  # disabled -> x2APIC: #GP
    assert apic.read(Reg.ID, 4) == b"\xff" * 4  # a disabled APIC's page reads all ones
    assert apic.msr_write(MSR_APIC_BASE, XAPIC_BSP)
    assert rd(apic, Reg.ID) == 0 and rd(apic, Reg.LDR) == 0
    assert apic.msr_write(MSR_APIC_BASE, 0xFEC0_0900) and apic.base_address == 0xFEC0_0000
    no_x2apic = machine(x2apic=False).apics[0]
    assert not no_x2apic.msr_write(MSR_APIC_BASE, X2APIC_ENABLED)
    assert is_apic_msr(0x1B) and is_apic_msr(0x6E0) and is_apic_msr(0x83F)
    assert not is_apic_msr(0x900)


def test_x2apic_registers_and_ipis() -> None:
    m = machine(cpus=4)
    for apic in m.apics:
        assert apic.msr_read(0x802) is None  # x2APIC MSRs #GP in xAPIC mode
        assert apic.msr_write(MSR_APIC_BASE, apic.apic_base | 0x400)
        assert apic.msr_write(0x80F, 0x1FF)
    bsp, ap3 = m.apics[0], m.apics[3]
    assert ap3.msr_read(0x802) == 3
    assert ap3.msr_read(0x80D) == 0x8  # LDR derived: cluster 0, bit 3
    assert bsp.msr_read(0x803) == 0x0005_0014
    assert ap3.read(Reg.ID, 4) == b"\xff" * 4  # the MMIO page is a hole in x2APIC mode
    assert not ap3.msr_write(0x802, 5)  # ID, LDR, version, PPR: read-only
    assert not ap3.msr_write(0x80D, 1)
    assert not ap3.msr_write(0x803, 0)
    assert ap3.msr_read(0x80E) is None and not ap3.msr_write(0x80E, 0)  # no DFR
    assert ap3.msr_read(0x831) is None  # no ICR high
    assert ap3.msr_read(0x80B) is None and ap3.msr_read(0x83F) is None  # write-only
    assert not ap3.msr_write(0x80B, 1) and ap3.msr_write(0x80B, 0)  # EOI must be 0
    assert not ap3.msr_write(0x828, 1) and ap3.msr_write(0x828, 0)  # ESR must be 0
    assert not ap3.msr_write(0x808, 1 << 32)  # bits 63:32 reserved
    assert ap3.msr_write(0x808, 0x20) and ap3.msr_read(0x808) == 0x20
    # ICR: one 64-bit MSR with a 32-bit destination.
    assert bsp.msr_write(0x830, 3 << 32 | 0x51)
    assert bank_bit_x2(ap3, 0x51) and bsp.msr_read(0x830) == 3 << 32 | 0x51
    assert not bsp.msr_write(0x830, 1 << 13 | 0x51)  # reserved bit
    assert bsp.msr_write(0x830, 0xC << 32 | 0x852)  # logical: cluster 0, IDs 2 and 3
    assert [bank_bit_x2(apic, 0x52) for apic in m.apics] == [False, False, True, True]
    # SELF IPI: vector only.
    assert not bsp.msr_write(0x83F, 0x100 | 0x53)
    assert bsp.msr_write(0x83F, 0x53) and bsp.pending_vector() == 0x53


def bank_bit_x2(apic: LocalApic, vector: int) -> bool:
    irr = apic.msr_read(0x820 + vector // 32)
    assert irr is not None
    return bool(irr >> (vector % 32) & 1)


# -- guest accesses that must not raise ---------------------------------------------


def test_mmio_sizes_and_offsets() -> None:
    m = machine(cpus=2)
    ap = m.apics[1]
    mmio = Bus("mmio", 1 << 52)
    mmio.insert(ap, DEFAULT_BASE, 0x1000)
    assert mmio.read(DEFAULT_BASE + Reg.ID + 3, 1) == b"\x01"
    assert mmio.read(DEFAULT_BASE + Reg.LVR, 2) == b"\x14\x00"
    assert mmio.read(DEFAULT_BASE + Reg.LVR + 2, 2) == b"\x05\x00"
    assert mmio.read(DEFAULT_BASE + Reg.ID, 8) == bytes(8)  # wider than a dword
    assert mmio.read(DEFAULT_BASE + Reg.ID + 4, 4) == bytes(4)  # not the first dword
    mmio.write(DEFAULT_BASE + Reg.TPR, b"\x40\x00")  # only aligned dwords count
    mmio.write(DEFAULT_BASE + Reg.TPR + 4, b"\x40\x00\x00\x00")
    mmio.write(DEFAULT_BASE + Reg.TPR, (0x1_0040).to_bytes(8, "little"))
    assert ap.tpr == 0
    mmio.write(DEFAULT_BASE + Reg.LVR, b"\0\0\0\0")  # read-only: ignored
    wr(ap, Reg.ESR, 0)
    assert rd(ap, Reg.ESR) == 0 and rd(ap, Reg.LVR) == 0x5_0014


def test_arbitrary_guest_accesses_never_raise() -> None:
    rng = random.Random(0x1A91C)
    m = machine(cpus=3, tsc_hz=3_000_000_000)
    for step in range(20_000):
        apic = rng.choice(m.apics)
        value = rng.choice((0, 0xFFFF_FFFF, 1 << 63, rng.getrandbits(64), rng.getrandbits(20)))
        match rng.randrange(6):
            case 0:
                size = rng.choice((1, 2, 4, 8))
                assert len(apic.read(rng.randrange(0x1000 - size + 1), size)) == size
            case 1:
                size = rng.choice((1, 2, 4, 8))
                offset = rng.randrange(0x1000 - size + 1) & rng.choice((~0, ~0xF))
                apic.write(offset, (value & (1 << 8 * size) - 1).to_bytes(size, "little"))
            case 2:
                index = rng.choice((0x1B, 0x6E0, rng.randrange(0x800, 0x900)))
                assert apic.msr_write(index, value) in (True, False)
            case 3:
                result = apic.msr_read(rng.randrange(0x800, 0x900))
                assert result is None or 0 <= result < 1 << 64
            case 4:
                apic.accept(rng.randrange(256), rng.random() < 0.5)
                apic.acknowledge()
                apic.set_lint0(rng.random() < 0.5)
                apic.set_lint1(rng.random() < 0.5)
            case 5:
                m.clock.advance(m.clock.now_ns() + rng.randrange(MS))
                apic.cr8 = rng.randrange(16)
        if step % 1000 == 0:
            apic.reset(init=rng.random() < 0.5)
    for apic, vcpu in zip(m.apics, m.vcpus, strict=True):
        pending = apic.pending_vector() is not None or apic.extint_pending()
        assert vcpu.intr.level == pending
