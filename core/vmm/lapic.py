"""The local APIC of each vCPU, and the APIC bus that carries IPIs between them.

sevsim keeps the local APIC in the VMM, as QEMU's userspace ``apic`` device does
(hw/intc/apic.c, apic_common.c); its behaviour follows KVM's in-kernel model
(arch/x86/kvm/lapic.c), which is what an SEV-ES guest meets on a real host.

Guest access. In xAPIC mode the registers are 4 KiB of MMIO at the APIC base (one
device per vCPU at 0xFEE00000; under SEV-ES they arrive as MMIO NAE events, the one
page OVMF's #VC handler accepts with the C-bit set). In x2APIC mode the same registers
are the MSRs 0x800 + (offset >> 4) (:meth:`LocalApic.msr_read`/``msr_write``), the
MMIO page reads all ones and drops writes (KVM's LAPIC_MMIO_HOLE quirk), and so does
a hardware-disabled APIC. IA32_APIC_BASE (0x1B) switches the modes with the
transitions KVM allows (``kvm_apic_set_base``).

Interrupts. Fixed interrupts (IPIs, the timer, the I/O APIC, MSIs) go into IRR
through :meth:`LocalApic.accept`; the CPU takes :meth:`LocalApic.pending_vector`
(the highest IRR vector above the processor priority) with :meth:`acknowledge`
(IRR -> ISR), and the guest's EOI retires the highest ISR vector. The ``intr`` line
is high while there is something for the CPU: an APIC vector, or an ExtINT from the
8259 on LINT0 (then the CPU asks the 8259 for the vector; ExtINT goes first, as in
KVM's ``kvm_cpu_get_interrupt``). NMI, INIT and SIPI go to the vCPU through the
callbacks given at construction.

IPIs. Writing the ICR sends a message on the :class:`ApicBus`, which picks the
destinations (``kvm_apic_match_dest``) and hands it to each. Delivery is immediate,
so the ICR delivery-status bit always reads idle (KVM clears it too); MpInitLib's
``SendIpi`` polls it before and after each IPI. OVMF wakes its APs with INIT and a
start-up IPI broadcast to all-excluding-self (``SendInitSipiSipiAllExcludingSelf``:
one SIPI on AMD, two on Intel), later it and Linux use physical or logical
destinations.

Left out: SMIs are dropped (KVM offers no SMM to SEV-ES guests, and the X64 OVMF
build has none); the thermal, performance-counter and CMCI entries are registers only
(nothing raises them); directed EOI (suppress-EOI-broadcast) is not offered, as in
QEMU's userspace APIC, so an EOI of a level-triggered vector always reaches
:attr:`ApicBus.eoi_listeners` (the I/O APIC); APIC IDs are 8-bit (0-254) as in
QEMU's ``MAX_APICS``; the APIC base may be moved but the device does not move on the
MMIO bus with it (OVMF and Linux keep 0xFEE00000).
"""

from __future__ import annotations

from collections.abc import Callable
from enum import IntEnum

from attrs import frozen

from sevsim.errors import SevsimError
from sevsim.vmm.clock import MachineClock
from sevsim.vmm.irq import IrqLine
from sevsim.vmm.lapic_timer import ApicTimer, TimerMode


class Reg(IntEnum):
    """Register offsets in the xAPIC page; the x2APIC MSR is 0x800 + (offset >> 4)."""

    ID = 0x020
    LVR = 0x030
    TPR = 0x080
    APR = 0x090
    PPR = 0x0A0
    EOI = 0x0B0
    LDR = 0x0D0
    DFR = 0x0E0
    SVR = 0x0F0
    ISR = 0x100  # 8 registers, 0x100-0x170
    TMR = 0x180  # 0x180-0x1F0
    IRR = 0x200  # 0x200-0x270
    ESR = 0x280
    LVT_CMCI = 0x2F0
    ICR_LOW = 0x300
    ICR_HIGH = 0x310
    LVT_TIMER = 0x320
    LVT_THERMAL = 0x330
    LVT_PERF = 0x340
    LVT_LINT0 = 0x350
    LVT_LINT1 = 0x360
    LVT_ERROR = 0x370
    TIMER_INITIAL = 0x380
    TIMER_CURRENT = 0x390
    TIMER_DIVIDE = 0x3E0
    SELF_IPI = 0x3F0  # x2APIC only


MMIO_SIZE = 0x1000
DEFAULT_BASE = 0xFEE0_0000
MASK64 = (1 << 64) - 1

MSR_APIC_BASE = 0x1B
MSR_TSC_DEADLINE = 0x6E0
MSR_X2APIC_FIRST = 0x800
MSR_X2APIC_LAST = 0x8FF
MSR_X2APIC_ICR = MSR_X2APIC_FIRST + (Reg.ICR_LOW >> 4)

# IA32_APIC_BASE
APIC_BASE_BSP = 1 << 8
APIC_BASE_EXTD = 1 << 10  # x2APIC enable
APIC_BASE_EN = 1 << 11  # global enable
APIC_BASE_ADDRESS = ~0xFFF

#: KVM's and QEMU's APIC_VERSION; LVR bits 23:16 hold the highest LVT entry's index.
VERSION = 0x14
SVR_ENABLE = 1 << 8
SVR_MASK = 0x3FF  # spurious vector, software enable, focus checking (KVM)

# LVT entries and the ICR
VECTOR = 0xFF
DELIVERY_MODE = 0x700
DEST_LOGICAL = 1 << 11
POLARITY = 1 << 13
LEVEL_ASSERT = 1 << 14
TRIGGER_LEVEL = 1 << 15
MASKED = 1 << 16
SHORTHAND_SHIFT = 18
ICR_LOW_MASK = 0x000C_CFFF  # vector, mode, dest mode, level, trigger, shorthand
X2APIC_ICR_RESERVED = 0xFFF3_2000  # bits 31:20, 17:16 and 13 (KVM: #GP)
XAPIC_ICR_DEST = 0xFF00_0000

_LVT_MODE = VECTOR | DELIVERY_MODE | MASKED
_LVT_LINT = VECTOR | DELIVERY_MODE | POLARITY | TRIGGER_LEVEL | MASKED
#: The bits a guest may set in each LVT entry (the timer's mode bits are added per
#: CPUID); delivery status and remote IRR read 0, as delivery is immediate.
_LVT_WRITABLE: dict[int, int] = {
    Reg.LVT_CMCI: _LVT_MODE,
    Reg.LVT_TIMER: VECTOR | MASKED,
    Reg.LVT_THERMAL: _LVT_MODE,
    Reg.LVT_PERF: _LVT_MODE,
    Reg.LVT_LINT0: _LVT_LINT,
    Reg.LVT_LINT1: _LVT_LINT,
    Reg.LVT_ERROR: VECTOR | MASKED,
}
_BANKS = (Reg.ISR, Reg.TMR, Reg.IRR)
#: Offsets the xAPIC page implements (an access elsewhere logs an illegal register
#: address in the ESR, as QEMU does); CMCI only when the vCPU has it.
_XAPIC_REGISTERS = frozenset(
    {Reg.ID, Reg.LVR, Reg.TPR, Reg.APR, Reg.PPR, Reg.EOI, Reg.LDR, Reg.DFR, Reg.SVR}
    | {Reg.ESR, Reg.ICR_LOW, Reg.ICR_HIGH}
    | {bank + 0x10 * i for bank in _BANKS for i in range(8)}
    | set(_LVT_WRITABLE) - {Reg.LVT_CMCI}
    | {Reg.TIMER_INITIAL, Reg.TIMER_CURRENT, Reg.TIMER_DIVIDE}
)

# ESR bits (Pentium 4 / Xeon and later; bits 3:0 are P6-only and never set)
ESR_SEND_ILLEGAL_VECTOR = 1 << 5
ESR_RECEIVE_ILLEGAL_VECTOR = 1 << 6
ESR_ILLEGAL_REGISTER = 1 << 7

#: Vectors 0-15 are reserved for exceptions: a fixed interrupt with one is an error.
FIRST_LEGAL_VECTOR = 16


class DeliveryMode(IntEnum):
    """ICR / LVT bits 10:8."""

    FIXED = 0
    LOWEST_PRIORITY = 1
    SMI = 2
    NMI = 4
    INIT = 5
    STARTUP = 6
    EXTINT = 7


class Shorthand(IntEnum):
    """ICR bits 19:18."""

    NONE = 0
    SELF = 1
    ALL_INCLUDING_SELF = 2
    ALL_EXCLUDING_SELF = 3


class LapicError(SevsimError):
    """A local APIC or the APIC bus was configured with a bad value."""


def is_apic_msr(index: int) -> bool:
    """Whether an MSR belongs to the local APIC (the CPU side routes these here)."""
    return index in (MSR_APIC_BASE, MSR_TSC_DEADLINE) or (
        MSR_X2APIC_FIRST <= index <= MSR_X2APIC_LAST
    )


def x2apic_ldr(apic_id: int) -> int:
    """The x2APIC logical ID: cluster ID[31:4] in bits 31:16, 1 << ID[3:0] below."""
    return (apic_id >> 4) << 16 | 1 << (apic_id & 0xF)


def _highest(bitmap: int) -> int:
    """The highest set bit of a 256-bit bank, -1 when empty."""
    return bitmap.bit_length() - 1


@frozen
class ApicMessage:
    """An interrupt message on the APIC bus: an IPI from an ICR, or an I/O APIC or MSI
    message (``destination`` is 8 bits from an xAPIC, 32 from an x2APIC)."""

    vector: int
    delivery_mode: int
    destination: int = 0
    logical: bool = False
    shorthand: Shorthand = Shorthand.NONE
    level: bool = True  # "assert"; only a level-triggered INIT de-assert clears it
    level_triggered: bool = False

    @classmethod
    def from_icr(cls, low: int, destination: int) -> ApicMessage:
        return cls(
            vector=low & VECTOR,
            delivery_mode=(low & DELIVERY_MODE) >> 8,
            destination=destination,
            logical=bool(low & DEST_LOGICAL),
            shorthand=Shorthand((low >> SHORTHAND_SHIFT) & 3),
            level=bool(low & LEVEL_ASSERT),
            level_triggered=bool(low & TRIGGER_LEVEL),
        )


class ApicBus:
    """Every vCPU's local APIC, and the routing of messages between them.

    ``eoi_listeners`` are told the vector of each EOI of a level-triggered interrupt
    (the I/O APIC clears its remote IRR on it: QEMU's ``ioapic_eoi_broadcast``).
    """

    __slots__ = ("_apics", "eoi_listeners")

    def __init__(self) -> None:
        self._apics: list[LocalApic] = []
        self.eoi_listeners: list[Callable[[int], None]] = []

    @property
    def apics(self) -> tuple[LocalApic, ...]:
        return tuple(self._apics)

    def attach(self, apic: LocalApic) -> None:
        """Add a vCPU's APIC (LocalApic does this itself); IDs must be unique."""
        for other in self._apics:
            if other.initial_id == apic.initial_id:
                raise LapicError(
                    f"APIC bus: APIC ID {apic.initial_id} is already taken by {other.name!r}"
                )
        self._apics.append(apic)

    def deliver(self, message: ApicMessage, source: LocalApic | None = None) -> int:
        """Deliver ``message`` (from ``source``'s ICR, or from an I/O APIC/MSI when
        None); returns how many APICs it went to.

        Hardware-disabled APICs take nothing. A lowest-priority message goes to one
        software-enabled destination chosen by KVM's vector hashing (the vector
        modulo their number, in attach order); to the physical broadcast it is fixed.
        """
        targets = [
            apic
            for apic in self._apics
            if apic.hw_enabled and apic.matches(message, source)
        ]
        if message.delivery_mode == DeliveryMode.LOWEST_PRIORITY and not (
            message.shorthand is Shorthand.NONE
            and not message.logical
            and message.destination == 0xFF
        ):
            enabled = [apic for apic in targets if apic.sw_enabled]
            targets = [enabled[message.vector % len(enabled)]] if enabled else []
        for apic in targets:
            apic.receive(message)
        return len(targets)

    def level_eoi(self, vector: int) -> None:
        """An APIC retired a level-triggered ``vector``: tell the listeners."""
        for listener in self.eoi_listeners:
            listener(vector)


class LocalApic:
    """One vCPU's local APIC: the register file, interrupt acceptance and priority,
    the timer, LINT0/LINT1 and the ICR.

    The vCPU side gives ``intr`` (high while :meth:`pending_vector` or
    :meth:`extint_pending` has something) and is called back with ``on_nmi()``,
    ``on_init()`` (after this APIC has done its own INIT reset) and
    ``on_sipi(vector)``; it links CR8 to :attr:`cr8`. ``tsc_hz`` offers TSC-deadline
    mode (CPUID.1:ECX[24]), ``x2apic`` the x2APIC enable (CPUID.1:ECX[21]), ``cmci``
    the CMCI LVT entry (an Intel MCG_CMCI_P feature; an AMD guest has 6 LVT entries);
    ``phys_addr_bits`` is CPUID's MAXPHYADDR, above which APIC base bits are reserved.
    """

    __slots__ = (
        "_apic_base", "_dfr", "_esr", "_esr_pending", "_icr_high", "_icr_low", "_irr",
        "_isr", "_ldr", "_lint0", "_lint1", "_lvt", "_svr", "_timer", "_tmr", "_tpr",
        "_xapic_id", "bsp", "bus", "cmci", "initial_id", "intr", "name", "on_init",
        "on_nmi", "on_sipi", "phys_addr_bits", "x2apic",
    )  # fmt: skip

    def __init__(
        self,
        apic_id: int,
        *,
        clock: MachineClock,
        bus: ApicBus,
        intr: IrqLine,
        on_nmi: Callable[[], None],
        on_init: Callable[[], None],
        on_sipi: Callable[[int], None],
        bsp: bool = False,
        tsc_hz: int | None = None,
        x2apic: bool = True,
        cmci: bool = False,
        phys_addr_bits: int = 52,
    ) -> None:
        if not isinstance(apic_id, int) or not 0 <= apic_id < 0xFF:
            raise LapicError(f"APIC ID {apic_id!r} is not in 0..254 (0xFF is the broadcast)")
        if tsc_hz is not None and (not isinstance(tsc_hz, int) or tsc_hz <= 0):
            raise LapicError(f"TSC frequency {tsc_hz!r} is not a positive number of Hz")
        if not isinstance(phys_addr_bits, int) or not 32 <= phys_addr_bits <= 52:
            raise LapicError(f"physical address width {phys_addr_bits!r} is not in 32..52")
        #: The APIC ID the vCPU was created with: the x2APIC ID, and the xAPIC ID at RESET.
        self.initial_id = apic_id
        self.name = f"lapic{apic_id}"
        self.bus = bus
        self.intr = intr
        self.on_nmi = on_nmi
        self.on_init = on_init
        self.on_sipi = on_sipi
        self.bsp = bsp
        self.x2apic = x2apic
        self.cmci = cmci
        self.phys_addr_bits = phys_addr_bits
        self._timer = ApicTimer(
            clock, self._timer_expired, tsc_hz=tsc_hz, name=f"{self.name}-timer"
        )
        self._lint0 = self._lint1 = False
        self._apic_base = 0
        self.reset()  # sets every other register
        bus.attach(self)

    # -- state ------------------------------------------------------------------------

    def reset(self, init: bool = False) -> None:
        """RESET, or with ``init`` an INIT: KVM's ``kvm_lapic_reset``. RESET also sets
        the APIC base (0xFEE00000, enabled, BSP flag) and the xAPIC ID; INIT keeps
        them, and the x2APIC mode. All LVTs are masked, except that the BSP's LINT0 is
        ExtINT so the 8259 reaches it (KVM's LINT0_REENABLED quirk, QEMU's
        ``apic_reset_common``)."""
        if not init:
            self._apic_base = DEFAULT_BASE | APIC_BASE_EN | (APIC_BASE_BSP if self.bsp else 0)
            self._xapic_id = self.initial_id
        self._timer.reset()
        self._lvt: dict[int, int] = dict.fromkeys(_LVT_WRITABLE, MASKED)
        if self.bsp:
            self._lvt[Reg.LVT_LINT0] = DeliveryMode.EXTINT << 8
        self._dfr = 0xFFFF_FFFF
        self._svr = 0xFF
        self._tpr = 0
        self._ldr = x2apic_ldr(self.initial_id) if self.x2apic_mode else 0
        self._esr = self._esr_pending = 0
        self._icr_low = self._icr_high = 0
        self._irr = self._isr = self._tmr = 0
        self._update_intr()

    @property
    def apic_base(self) -> int:
        """IA32_APIC_BASE."""
        return self._apic_base

    @property
    def base_address(self) -> int:
        """Where the guest wants the xAPIC page (IA32_APIC_BASE bits 51:12)."""
        return self._apic_base & APIC_BASE_ADDRESS

    @property
    def hw_enabled(self) -> bool:
        return bool(self._apic_base & APIC_BASE_EN)

    @property
    def x2apic_mode(self) -> bool:
        return bool(self._apic_base & APIC_BASE_EXTD)

    @property
    def sw_enabled(self) -> bool:
        return bool(self._svr & SVR_ENABLE)

    @property
    def version(self) -> int:
        """The LVR: 6 LVT entries (highest index 5), 7 with CMCI."""
        return VERSION | (6 if self.cmci else 5) << 16

    @property
    def tpr(self) -> int:
        """The task-priority register (bits 7:0)."""
        return self._tpr

    @tpr.setter
    def tpr(self, value: int) -> None:
        self._tpr = value & 0xFF
        self._update_intr()

    @property
    def cr8(self) -> int:
        """CR8 is TPR[7:4] (KVM's ``kvm_lapic_get_cr8``/``kvm_lapic_set_tpr``)."""
        return self._tpr >> 4

    @cr8.setter
    def cr8(self, value: int) -> None:
        self.tpr = (value & 0xF) << 4

    @property
    def ppr(self) -> int:
        """Processor priority: TPR, or the class of the highest in-service vector if
        that is higher (``__apic_update_ppr``)."""
        isrv = max(_highest(self._isr), 0)
        if (self._tpr & 0xF0) >= (isrv & 0xF0):
            return self._tpr
        return isrv & 0xF0

    def _set_apic_base(self, value: int) -> bool:
        """IA32_APIC_BASE write; False (#GP) for reserved bits, x2APIC without global
        enable, x2APIC -> xAPIC and disabled -> x2APIC (``kvm_apic_set_base``).
        Enabling reloads the xAPIC ID; the LDR follows the x2APIC ID in x2APIC mode
        and is 0 again when it is left."""
        old = self._apic_base
        if value == old:
            return True
        reserved = (MASK64 & ~((1 << self.phys_addr_bits) - 1)) | 0x2FF
        if not self.x2apic:
            reserved |= APIC_BASE_EXTD
        if value & reserved or (value & APIC_BASE_EXTD and not value & APIC_BASE_EN):
            return False
        if old & APIC_BASE_EXTD and value & (APIC_BASE_EXTD | APIC_BASE_EN) == APIC_BASE_EN:
            return False
        if not old & APIC_BASE_EN and value & APIC_BASE_EXTD:
            return False
        self._apic_base = value
        changed = old ^ value
        if changed & APIC_BASE_EN and value & APIC_BASE_EN:
            self._xapic_id = self.initial_id
        if changed & APIC_BASE_EXTD:
            self._ldr = x2apic_ldr(self.initial_id) if value & APIC_BASE_EXTD else 0
        self._update_intr()
        return True

    # -- interrupts -------------------------------------------------------------------

    def accept(self, vector: int, level_triggered: bool = False) -> bool:
        """A fixed interrupt into IRR (TMR records the trigger mode); False when it was
        dropped: the APIC is hardware- or software-disabled (KVM's
        ``__apic_accept_irq``), or the vector is 0-15 (then ESR bit 6 is logged)."""
        if not (self.hw_enabled and self.sw_enabled):
            return False
        vector &= VECTOR
        if vector < FIRST_LEGAL_VECTOR:
            self._log_error(ESR_RECEIVE_ILLEGAL_VECTOR)
            return False
        bit = 1 << vector
        self._irr |= bit
        self._tmr = self._tmr | bit if level_triggered else self._tmr & ~bit
        self._update_intr()
        return True

    def pending_vector(self) -> int | None:
        """The vector the CPU would take now: the highest in IRR whose priority class is
        above PPR; None if there is none or the APIC is disabled."""
        if not (self.hw_enabled and self.sw_enabled) or not self._irr:
            return None
        vector = _highest(self._irr)
        if (vector & 0xF0) <= self.ppr:
            return None
        return vector

    def extint_pending(self) -> bool:
        """The 8259's INTR on LINT0 goes to the CPU: LINT0 is high and either the APIC
        is hardware-disabled or LVT LINT0 is unmasked ExtINT
        (``kvm_apic_accept_pic_intr``). The CPU then takes the vector from the 8259,
        before any APIC vector (KVM's ``kvm_cpu_get_interrupt``)."""
        if not self._lint0:
            return False
        return not self.hw_enabled or self._lvt[Reg.LVT_LINT0] & (DELIVERY_MODE | MASKED) == (
            DeliveryMode.EXTINT << 8
        )

    def acknowledge(self) -> int:
        """The CPU's interrupt acknowledge: the pending vector moves from IRR to ISR
        and is returned; with nothing pending (masked by TPR since, or the APIC
        software-disabled) it is the spurious vector, with no ISR change."""
        vector = self.pending_vector()
        if vector is None:
            return self._svr & VECTOR
        self._irr &= ~(1 << vector)
        self._isr |= 1 << vector
        self._update_intr()
        return vector

    def eoi(self) -> None:
        """End of interrupt: retire the highest in-service vector; a level-triggered
        one is broadcast to the I/O APIC."""
        vector = _highest(self._isr)
        if vector < 0:
            return
        self._isr &= ~(1 << vector)
        self._update_intr()
        if self._tmr >> vector & 1:
            self.bus.level_eoi(vector)

    def _update_intr(self) -> None:
        self.intr.set_level(self.pending_vector() is not None or self.extint_pending())

    def _log_error(self, bit: int) -> None:
        """Record an error for the next ESR write; a new one raises the LVT error
        interrupt (a repeated one does not, which also ends the loop of an error
        vector that is itself illegal)."""
        if self._esr_pending & bit:
            return
        self._esr_pending |= bit
        self._local_deliver(Reg.LVT_ERROR)

    def _local_deliver(self, entry: Reg) -> None:
        """Raise the interrupt an LVT entry describes (``kvm_apic_local_deliver``).
        ExtINT is LINT0's wire to the 8259 (:meth:`extint_pending`); SMI is dropped."""
        lvt = self._lvt[entry]
        if not self.hw_enabled or lvt & MASKED:
            return
        match (lvt & DELIVERY_MODE) >> 8:
            case DeliveryMode.FIXED:
                lint = entry in (Reg.LVT_LINT0, Reg.LVT_LINT1)
                self.accept(lvt & VECTOR, lint and bool(lvt & TRIGGER_LEVEL))
            case DeliveryMode.NMI:
                self.on_nmi()
            case DeliveryMode.INIT:
                self.reset(init=True)
                self.on_init()

    def _timer_expired(self) -> None:
        self._local_deliver(Reg.LVT_TIMER)

    def set_lint0(self, level: bool) -> None:
        """LINT0, wired to the 8259's INTR output (connect it to the PIC's IrqLine)."""
        rising = level and not self._lint0
        self._lint0 = bool(level)
        if rising:
            self._local_deliver(Reg.LVT_LINT0)
        self._update_intr()

    def set_lint1(self, level: bool) -> None:
        """LINT1, the external NMI input (virtual wire mode programs it as NMI)."""
        rising = level and not self._lint1
        self._lint1 = bool(level)
        if rising:
            self._local_deliver(Reg.LVT_LINT1)

    # -- the APIC bus -----------------------------------------------------------------

    def matches(self, message: ApicMessage, source: LocalApic | None) -> bool:
        """Whether this APIC is a destination of ``message`` (``kvm_apic_match_dest``)."""
        match message.shorthand:
            case Shorthand.SELF:
                return self is source
            case Shorthand.ALL_INCLUDING_SELF:
                return True
            case Shorthand.ALL_EXCLUDING_SELF:
                return self is not source
        dest = message.destination
        if dest == (0xFFFF_FFFF if self.x2apic_mode else 0xFF):
            return True
        if not message.logical:
            if self.x2apic_mode or dest > 0xFF:
                return dest == self.initial_id
            return dest == self._xapic_id
        if self.x2apic_mode:
            return self._ldr >> 16 == dest >> 16 and bool(self._ldr & dest & 0xFFFF)
        logical_id = self._ldr >> 24
        match self._dfr >> 28:
            case 0xF:  # flat: a bit per APIC
                return bool(logical_id & dest)
            case 0x0:  # cluster: ID[7:4] is the cluster, ID[3:0] a bit per APIC
                return logical_id >> 4 == dest >> 4 and bool(logical_id & dest & 0xF)
        return False

    def receive(self, message: ApicMessage) -> None:
        """A message for this APIC, taken as KVM's ``__apic_accept_irq`` takes it."""
        match message.delivery_mode:
            case DeliveryMode.FIXED | DeliveryMode.LOWEST_PRIORITY:
                if message.level or not message.level_triggered:
                    self.accept(message.vector, message.level_triggered)
            case DeliveryMode.NMI:
                self.on_nmi()
            case DeliveryMode.INIT:
                # A level-triggered de-assert is ignored, as on every CPU since the P4.
                if message.level or not message.level_triggered:
                    self.reset(init=True)
                    self.on_init()
            case DeliveryMode.STARTUP:
                self.on_sipi(message.vector)
            # SMI is dropped (no SMM for SEV-ES); modes 3 and 7 are reserved in an IPI.

    def _send(self, low: int, destination: int) -> None:
        """The ICR was written: send, unless a fixed or lowest-priority IPI carries a
        vector 0-15 (then ESR bit 5 is logged and nothing is sent)."""
        message = ApicMessage.from_icr(low, destination)
        fixed = message.delivery_mode in (DeliveryMode.FIXED, DeliveryMode.LOWEST_PRIORITY)
        if fixed and message.vector < FIRST_LEGAL_VECTOR:
            self._log_error(ESR_SEND_ILLEGAL_VECTOR)
            return
        self.bus.deliver(message, self)

    # -- registers --------------------------------------------------------------------

    def _bank(self, bank: Reg) -> int:
        return {Reg.ISR: self._isr, Reg.TMR: self._tmr, Reg.IRR: self._irr}[bank]

    def _read(self, reg: int) -> int | None:
        """A 32-bit register in the current mode, or None if it cannot be read there
        (reserved, write-only, or xAPIC-only in x2APIC mode)."""
        x2 = self.x2apic_mode
        if reg in self._lvt and (reg != Reg.LVT_CMCI or self.cmci):
            mode = self._timer.mode << 17 if reg == Reg.LVT_TIMER else 0
            return self._lvt[reg] | mode
        bank = reg & ~0x70
        if bank in _BANKS:
            return self._bank(Reg(bank)) >> ((reg - bank) >> 4) * 32 & 0xFFFF_FFFF
        match reg:
            case Reg.ID:
                return self.initial_id if x2 else self._xapic_id << 24
            case Reg.LVR:
                return self.version
            case Reg.TPR:
                return self._tpr
            case Reg.APR if not x2:
                return 0  # arbitration priority: not modelled, as in KVM and QEMU
            case Reg.PPR:
                return self.ppr
            case Reg.LDR:
                return self._ldr
            case Reg.DFR if not x2:
                return self._dfr
            case Reg.SVR:
                return self._svr
            case Reg.ESR:
                return self._esr
            case Reg.ICR_LOW:
                return self._icr_low
            case Reg.ICR_HIGH if not x2:
                return self._icr_high
            case Reg.TIMER_INITIAL:
                return self._timer.initial_count
            case Reg.TIMER_CURRENT:
                return self._timer.current_count()
            case Reg.TIMER_DIVIDE:
                return self._timer.divide_config
        return None

    def _write(self, reg: int, value: int) -> bool:
        """A 32-bit register write in the current mode; False if the register cannot
        be written there or the value is one x2APIC refuses (the MSR write #GPs)."""
        x2 = self.x2apic_mode
        if reg in self._lvt and (reg != Reg.LVT_CMCI or self.cmci):
            self._write_lvt(reg, value)
            return True
        match reg:
            case Reg.ID if not x2:
                self._xapic_id = value >> 24
            case Reg.TPR:
                self.tpr = value
            case Reg.EOI if not (x2 and value):
                self.eoi()
            case Reg.LDR if not x2:
                self._ldr = value & 0xFF00_0000
            case Reg.DFR if not x2:
                self._dfr = value | 0x0FFF_FFFF
            case Reg.SVR:
                self._write_svr(value & SVR_MASK)
            case Reg.ESR if not (x2 and value):
                self._esr, self._esr_pending = self._esr_pending, 0
            case Reg.ICR_LOW if not x2:
                self._icr_low = value & ICR_LOW_MASK
                self._send(self._icr_low, self._icr_high >> 24)
            case Reg.ICR_HIGH if not x2:
                self._icr_high = value & XAPIC_ICR_DEST
            case Reg.TIMER_INITIAL:
                self._timer.write_initial_count(value)
            case Reg.TIMER_DIVIDE:
                self._timer.write_divide_config(value)
            case Reg.SELF_IPI if x2 and not value & ~VECTOR:
                self._send(value | Shorthand.SELF << SHORTHAND_SHIFT, 0)
            case _:
                return False
        return True

    def _write_lvt(self, reg: int, value: int) -> None:
        """LVT entries keep their defined bits; while the APIC is software-disabled
        they stay masked. The timer's mode bits go to the timer."""
        if not self.sw_enabled:
            value |= MASKED
        self._lvt[reg] = value & _LVT_WRITABLE[reg]
        if reg == Reg.LVT_TIMER:
            self._timer.set_mode(TimerMode((value & self._timer.mode_mask) >> 17))
        self._update_intr()

    def _write_svr(self, value: int) -> None:
        """Clearing the software enable masks every LVT entry."""
        self._svr = value
        if not value & SVR_ENABLE:
            for reg in self._lvt:
                self._lvt[reg] |= MASKED
        self._update_intr()

    def _write_x2apic_icr(self, value: int) -> bool:
        """The 64-bit x2APIC ICR: destination in bits 63:32, reserved bits #GP."""
        if value & X2APIC_ICR_RESERVED:
            return False
        self._icr_low = value & ICR_LOW_MASK
        self._icr_high = value >> 32
        self._send(self._icr_low, self._icr_high)
        return True

    # -- guest access -----------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        """xAPIC MMIO read. 1, 2 or 4 bytes within the first dword of a 16-byte
        register return those bytes; wider or straddling reads return zeros (KVM's
        ``kvm_lapic_reg_read``). A reserved offset reads 0 and logs an illegal
        register address; EOI (write-only) reads 0."""
        if not self.hw_enabled or self.x2apic_mode:
            return b"\xff" * size
        reg, within = offset & 0xFF0, offset & 0xF
        if size not in (1, 2, 4) or within + size > 4:
            return bytes(size)
        if not 0 <= offset < MMIO_SIZE or not self._implemented(reg):
            self._log_error(ESR_ILLEGAL_REGISTER)
            return bytes(size)
        value = self._read(reg) or 0
        return (value >> 8 * within).to_bytes(4, "little")[:size]

    def write(self, offset: int, data: bytes) -> None:
        """xAPIC MMIO write: only aligned 4-byte stores count (SDM 10.4.1, KVM's
        ``apic_mmio_write``); writes to read-only registers are ignored, writes to
        reserved offsets log an illegal register address."""
        if not self.hw_enabled or self.x2apic_mode or len(data) != 4 or offset & 0xF:
            return
        if not 0 <= offset < MMIO_SIZE or not self._implemented(offset):
            self._log_error(ESR_ILLEGAL_REGISTER)
            return
        self._write(offset, int.from_bytes(data, "little"))

    def _implemented(self, reg: int) -> bool:
        return reg in _XAPIC_REGISTERS or (reg == Reg.LVT_CMCI and self.cmci)

    def msr_read(self, index: int) -> int | None:
        """RDMSR of an APIC MSR; None means #GP (x2APIC registers outside x2APIC mode,
        write-only or xAPIC-only registers, anything that is not an APIC MSR)."""
        if index == MSR_APIC_BASE:
            return self._apic_base
        if index == MSR_TSC_DEADLINE:
            return self._timer.tsc_deadline
        if not (MSR_X2APIC_FIRST <= index <= MSR_X2APIC_LAST and self.x2apic_mode):
            return None
        if index == MSR_X2APIC_ICR:
            return self._icr_high << 32 | self._icr_low
        return self._read((index - MSR_X2APIC_FIRST) << 4)

    def msr_write(self, index: int, value: int) -> bool:
        """WRMSR of an APIC MSR; False means #GP: an illegal APIC base transition, or
        in x2APIC mode a read-only, reserved or xAPIC-only register, bits 63:32 set
        (all but the ICR), a non-zero EOI or ESR, reserved ICR or SELF IPI bits."""
        value &= MASK64
        if index == MSR_APIC_BASE:
            return self._set_apic_base(value)
        if index == MSR_TSC_DEADLINE:
            self._timer.write_tsc_deadline(value)
            return True
        if not (MSR_X2APIC_FIRST <= index <= MSR_X2APIC_LAST and self.x2apic_mode):
            return False
        if index == MSR_X2APIC_ICR:
            return self._write_x2apic_icr(value)
        if value >> 32:
            return False
        return self._write((index - MSR_X2APIC_FIRST) << 4, value)
