"""The PC's two cascaded 8259A interrupt controllers and their edge/level control registers.

Every PC-compatible machine still has them: the master at ports 0x20/0x21 takes ISA
IRQ 0-7 and the slave at 0xA0/0xA1 takes IRQ 8-15, its INT output wired to the
master's IR2; the PIIX3/PIIX4 ELCR at 0x4D0/0x4D1 makes single inputs level-triggered
(PCI interrupts share ISA lines that way). The master's INT output goes to every
local APIC's LINT0; when the CPU takes that ExtINT it runs an INTA cycle
(:meth:`I8259Pic.acknowledge`) and gets the vector from the 8259s.

Guest code that relies on it: OVMF's SEC masks both chips (0xFF to 0x21 and 0xA1)
before it enables anything; its 8259InterruptControllerDxe (CSM builds) sends EOIs,
re-initialises both chips with ICW1 0x11, ICW2 0x68 (master) / 0x70 (slave), ICW3
0x04 / 0x02 and ICW4 0x01, restores the masks it read before, and writes the masks
and ELCR; Linux masks them, probes them through the IMR, and without an I/O APIC
takes its timer tick through them.

The behaviour follows QEMU's hw/intc/i8259.c and i8259_common.c register by register:
ICW1 restarts the chip (IMR, ISR, rotation, modes cleared; requests of level-triggered
inputs survive) and selects single mode, ICW4 and LTIM (every input level-triggered);
ICW2 takes the vector base (bits 7-3); ICW3's value is not used (the wiring is fixed);
ICW4 selects auto-EOI and special fully nested mode. OCW1 is the IMR. OCW2 does
non-specific and specific EOI, rotate on (non-)specific EOI, set priority and
rotate in auto-EOI mode. OCW3 selects IRR or ISR for reads of the command port, the
poll command (the next read of either port acknowledges the highest request and
returns it with bit 7 set, or 0) and special mask mode (which, unlike in QEMU,
re-evaluates INT at once, as the chip does). An INTA with nothing
requested returns the spurious IRQ 7 of the chip asked (vector base + 7).

Left out, as in QEMU: buffered mode and 8080/8085 mode (ICW4 bits 0, 2-3) have no
effect, and ICW3 is not checked against the cascade wiring.
"""

from __future__ import annotations

from sevsim.errors import SevsimError
from sevsim.vmm.bus import Bus
from sevsim.vmm.irq import IrqLine

MASTER_PORT = 0x20
SLAVE_PORT = 0xA0
ELCR_PORT = 0x4D0

#: The master input the slave's INT output drives.
CASCADE_IRQ = 2
#: What a chip answers an INTA cycle with when no request is left (a spurious interrupt).
SPURIOUS_IRQ = 7

#: ELCR bits that can be set (QEMU's elcr_mask): IRQ 0, 1, 2, 8 and 13 are always edge.
MASTER_ELCR_MASK = 0xF8
SLAVE_ELCR_MASK = 0xDE

_ICW1 = 0x10
_ICW1_IC4 = 0x01
_ICW1_SNGL = 0x02
_ICW1_LTIM = 0x08
_OCW3 = 0x08
_OCW3_POLL = 0x04
_OCW3_RR = 0x02
_OCW3_RIS = 0x01
_OCW3_ESMM = 0x40
_OCW3_SMM = 0x20
_ICW4_AEOI = 0x02
_ICW4_SFNM = 0x10

# OCW2 commands (bits 7-5).
_ROTATE_AEOI_CLEAR = 0
_EOI = 1
_SPECIFIC_EOI = 3
_ROTATE_AEOI_SET = 4
_ROTATE_EOI = 5
_SET_PRIORITY = 6
_ROTATE_SPECIFIC_EOI = 7

# Where the data port's writes go: OCW1 (the IMR), or the next ICW of an initialisation.
_READY, _ICW2, _ICW3, _ICW4 = range(4)


class PicError(SevsimError):
    """The VMM named an 8259 input that does not exist."""


class I8259:
    """One 8259A: two ports (command at offset 0, data at offset 1) and an INT output line."""

    __slots__ = (
        "auto_eoi",
        "elcr",
        "elcr_mask",
        "imr",
        "init_state",
        "irq_base",
        "irr",
        "is_master",
        "isr",
        "last_irr",
        "ltim",
        "name",
        "needs_icw4",
        "output",
        "poll",
        "priority_add",
        "read_isr",
        "rotate_on_auto_eoi",
        "single",
        "special_fully_nested",
        "special_mask",
    )

    def __init__(self, name: str, *, is_master: bool, elcr_mask: int) -> None:
        self.name = name
        self.is_master = is_master
        self.elcr_mask = elcr_mask
        self.output = IrqLine(f"{name}.int")
        self.elcr = 0
        self.ltim = False
        self.irr = 0
        self._initialise()

    def reset(self) -> None:
        """Power-on state (QEMU's ``pic_reset``): all inputs edge-triggered, nothing pending."""
        self.elcr = 0
        self.ltim = False
        self._initialise()

    def _initialise(self) -> None:
        """What ICW1 does (``pic_reset_common``); ELCR and LTIM are kept."""
        self.last_irr = 0
        self.irr &= self.elcr
        self.imr = 0
        self.isr = 0
        self.priority_add = 0
        self.irq_base = 0
        self.read_isr = False
        self.poll = False
        self.special_mask = False
        self.init_state = _READY
        self.auto_eoi = False
        self.rotate_on_auto_eoi = False
        self.special_fully_nested = False
        self.needs_icw4 = False
        self.single = False
        self._update()

    # -- the interrupt logic -------------------------------------------------------

    def _level_triggered(self, mask: int) -> bool:
        return self.ltim or bool(self.elcr & mask)

    def _priority(self, mask: int) -> int:
        """Priority (0 highest) of the best input in ``mask`` under the rotation; 8 if none."""
        for priority in range(8):
            if mask & (1 << ((priority + self.priority_add) & 7)):
                return priority
        return 8

    def pending(self) -> int | None:
        """The input the chip would interrupt for now, or None (QEMU's ``pic_get_irq``)."""
        priority = self._priority(self.irr & ~self.imr)
        if priority == 8:
            return None
        in_service = self.isr
        if self.special_mask:
            in_service &= ~self.imr
        if self.special_fully_nested and self.is_master:
            in_service &= ~(1 << CASCADE_IRQ)
        if priority < self._priority(in_service):
            return (priority + self.priority_add) & 7
        return None

    def _update(self) -> None:
        self.output.set_level(self.pending() is not None)

    def set_input(self, irq: int, level: bool) -> None:
        """Input ``irq`` (0-7) changed level: an edge latches IRR, a level follows it."""
        mask = 1 << irq
        if self._level_triggered(mask):
            if level:
                self.irr |= mask
                self.last_irr |= mask
            else:
                self.irr &= ~mask
                self.last_irr &= ~mask
        elif level:
            if not self.last_irr & mask:
                self.irr |= mask
            self.last_irr |= mask
        else:
            self.last_irr &= ~mask
        self._update()

    def intack(self, irq: int) -> None:
        """The INTA cycle for ``irq``: into ISR (unless auto-EOI), out of IRR if edge."""
        if self.auto_eoi:
            if self.rotate_on_auto_eoi:
                self.priority_add = (irq + 1) & 7
        else:
            self.isr |= 1 << irq
        if not self._level_triggered(1 << irq):
            self.irr &= ~(1 << irq)
        self._update()

    # -- guest access ----------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self._read_port(offset + i) for i in range(size))

    def write(self, offset: int, data: bytes) -> None:
        for i, value in enumerate(data):
            self._write_port(offset + i, value)

    def _read_port(self, port: int) -> int:
        if port not in (0, 1):
            return 0xFF
        if self.poll:
            self.poll = False
            irq = self.pending()
            if irq is None:
                return 0
            self.intack(irq)
            return 0x80 | irq
        if port == 1:
            return self.imr
        return self.isr if self.read_isr else self.irr

    def _write_port(self, port: int, value: int) -> None:
        if port == 0:
            if value & _ICW1:
                self._initialise()
                self.init_state = _ICW2
                self.needs_icw4 = bool(value & _ICW1_IC4)
                self.single = bool(value & _ICW1_SNGL)
                self.ltim = bool(value & _ICW1_LTIM)
            elif value & _OCW3:
                self._ocw3(value)
            else:
                self._ocw2(value)
        elif port == 1:
            self._write_data(value)

    def _ocw3(self, value: int) -> None:
        if value & _OCW3_POLL:
            self.poll = True
        if value & _OCW3_RR:
            self.read_isr = bool(value & _OCW3_RIS)
        if value & _OCW3_ESMM:
            self.special_mask = bool(value & _OCW3_SMM)
            self._update()  # QEMU waits for the next event; the chip changes INT at once

    def _ocw2(self, value: int) -> None:
        command = value >> 5
        if command in (_ROTATE_AEOI_CLEAR, _ROTATE_AEOI_SET):
            self.rotate_on_auto_eoi = command == _ROTATE_AEOI_SET
            return
        if command in (_EOI, _ROTATE_EOI):
            priority = self._priority(self.isr)
            if priority == 8:
                return
            irq = (priority + self.priority_add) & 7
            self.isr &= ~(1 << irq)
            if command == _ROTATE_EOI:
                self.priority_add = (irq + 1) & 7
        elif command == _SPECIFIC_EOI:
            self.isr &= ~(1 << (value & 7))
        elif command == _SET_PRIORITY:
            self.priority_add = (value + 1) & 7
        elif command == _ROTATE_SPECIFIC_EOI:
            self.isr &= ~(1 << (value & 7))
            self.priority_add = ((value & 7) + 1) & 7
        else:  # command 2: no operation
            return
        self._update()

    def _write_data(self, value: int) -> None:
        if self.init_state == _READY:
            self.imr = value
            self._update()
        elif self.init_state == _ICW2:
            self.irq_base = value & 0xF8
            if self.single:
                self.init_state = _ICW4 if self.needs_icw4 else _READY
            else:
                self.init_state = _ICW3
        elif self.init_state == _ICW3:
            self.init_state = _ICW4 if self.needs_icw4 else _READY
        else:
            self.special_fully_nested = bool(value & _ICW4_SFNM)
            self.auto_eoi = bool(value & _ICW4_AEOI)
            self.init_state = _READY


class Elcr:
    """The edge/level control registers at 0x4D0 (IRQ 0-7) and 0x4D1 (IRQ 8-15).

    A set bit makes that input level-triggered. Bits for IRQ 0, 1, 2, 8 and 13 are
    read-only zeros; a write does not re-evaluate pending requests (as in QEMU).
    """

    __slots__ = ("_chips", "name")

    def __init__(self, master: I8259, slave: I8259) -> None:
        self.name = "elcr"
        self._chips = (master, slave)

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self._read_port(offset + i) for i in range(size))

    def _read_port(self, port: int) -> int:
        return self._chips[port].elcr if port in (0, 1) else 0xFF

    def write(self, offset: int, data: bytes) -> None:
        for i, value in enumerate(data):
            if offset + i in (0, 1):
                chip = self._chips[offset + i]
                chip.elcr = value & chip.elcr_mask


class I8259Pic:
    """The master/slave pair as a PC wires it (QEMU's ``isa-i8259-pic``).

    Inputs are ISA IRQ 0-15 (:meth:`set_irq`, or an :class:`IrqLine` given to
    :meth:`connect`); the output is :attr:`intr`, the master's INT pin, meant for the
    local APICs' LINT0. The three bus devices are :attr:`master`, :attr:`slave` and
    :attr:`elcr` (:meth:`insert_into` puts them at their ports).
    """

    __slots__ = ("elcr", "intr", "master", "slave")

    def __init__(self) -> None:
        self.master = I8259("pic-master", is_master=True, elcr_mask=MASTER_ELCR_MASK)
        self.slave = I8259("pic-slave", is_master=False, elcr_mask=SLAVE_ELCR_MASK)
        self.slave.output.connect(lambda level: self.master.set_input(CASCADE_IRQ, level))
        self.elcr = Elcr(self.master, self.slave)
        self.intr = self.master.output

    def insert_into(self, bus: Bus) -> None:
        """Claim 0x20-0x21, 0xA0-0xA1 and 0x4D0-0x4D1 on an IO-port bus."""
        bus.insert(self.master, MASTER_PORT, 2)
        bus.insert(self.slave, SLAVE_PORT, 2)
        bus.insert(self.elcr, ELCR_PORT, 2)

    def reset(self) -> None:
        """System reset: both chips back to their power-on state."""
        self.slave.reset()
        self.master.reset()

    def set_irq(self, irq: int, level: bool) -> None:
        """Drive ISA input ``irq`` (0-15) to ``level``."""
        if not isinstance(irq, int) or not 0 <= irq < 16:
            raise PicError(f"8259 input {irq!r} does not exist; the pair has IRQ 0-15")
        chip = self.master if irq < 8 else self.slave
        chip.set_input(irq & 7, bool(level))

    def connect(self, irq: int, line: IrqLine) -> None:
        """Feed ISA input ``irq`` from ``line``; a line that is already high counts as an edge."""
        self.set_irq(irq, line.level)
        line.connect(lambda level: self.set_irq(irq, level))

    def acknowledge(self) -> int:
        """The CPU's INTA cycle: the vector of the request being serviced (QEMU's
        ``pic_read_irq``), or a spurious IRQ 7 / 15 vector when none is left."""
        irq = self.master.pending()
        if irq is None:
            return self.master.irq_base + SPURIOUS_IRQ
        if irq != CASCADE_IRQ:
            self.master.intack(irq)
            return self.master.irq_base + irq
        slave_irq = self.slave.pending()
        if slave_irq is None:
            slave_irq = SPURIOUS_IRQ
        else:
            self.slave.intack(slave_irq)
        self.master.intack(CASCADE_IRQ)
        return self.slave.irq_base + slave_irq
