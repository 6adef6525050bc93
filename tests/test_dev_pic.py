"""The 8259A pair through the IO bus: OVMF's and Linux's programming, priorities, cascade."""

from __future__ import annotations

import random

import pytest

from sevsim.errors import SevsimError
from sevsim.vmm.bus import Bus
from sevsim.vmm.irq import IrqLine
from sevsim.vmm.pic import I8259Pic, PicError


@pytest.fixture
def pic() -> I8259Pic:
    return I8259Pic()


@pytest.fixture
def io(pic: I8259Pic) -> Bus:
    bus = Bus("io", 0x1_0000)
    pic.insert_into(bus)
    return bus


def outb(io: Bus, port: int, value: int) -> None:
    io.write(port, bytes([value]))


def inb(io: Bus, port: int) -> int:
    return io.read(port, 1)[0]


def isr(io: Bus, command_port: int) -> int:
    outb(io, command_port, 0x0B)  # OCW3: read ISR
    value = inb(io, command_port)
    outb(io, command_port, 0x0A)  # OCW3: back to IRR
    return value


def ovmf_install_8259(io: Bus) -> None:
    """OvmfPkg/8259InterruptControllerDxe Install8259 at edk2-stable202211, port by port."""
    for irq in range(16):  # Interrupt8259EndOfInterrupt for every IRQ
        if irq >= 8:
            outb(io, 0xA0, 0x20)
        outb(io, 0x20, 0x20)
    # Interrupt8259SetVectorBase(0x68, 0x70): slave first, keeping its mask.
    mask = inb(io, 0xA1)
    for port, value in ((0xA0, 0x11), (0xA1, 0x70), (0xA1, 0x02), (0xA1, 0x01), (0xA1, mask)):
        outb(io, port, value)
    mask = inb(io, 0x21)
    for port, value in ((0x20, 0x11), (0x21, 0x68), (0x21, 0x04), (0x21, 0x01), (0x21, mask)):
        outb(io, port, value)
    outb(io, 0xA0, 0x20)
    outb(io, 0x20, 0x20)
    # Interrupt8259WriteMask(mProtectedModeMask 0xFFFF, mProtectedModeEdgeLevel 0x0000)
    for port, value in ((0x21, 0xFF), (0xA1, 0xFF), (0x4D0, 0x00), (0x4D1, 0x00)):
        outb(io, port, value)


def test_power_on_state(io: Bus, pic: I8259Pic) -> None:
    assert [inb(io, port) for port in (0x20, 0x21, 0xA0, 0xA1, 0x4D0, 0x4D1)] == [0] * 6
    assert not pic.intr.level
    assert pic.acknowledge() == 0x07  # vector base 0: spurious IRQ 7


def test_ovmf_sec_masks_both_chips(io: Bus, pic: I8259Pic) -> None:
    outb(io, 0x21, 0xFF)
    outb(io, 0xA1, 0xFF)
    assert (inb(io, 0x21), inb(io, 0xA1)) == (0xFF, 0xFF)
    pic.set_irq(0, True)
    pic.set_irq(12, True)
    assert inb(io, 0x20) == 0x01 and inb(io, 0xA0) == 0x10  # requested, but masked
    assert not pic.intr.level


def test_ovmf_8259_driver_then_timer_tick(io: Bus, pic: I8259Pic) -> None:
    outb(io, 0x21, 0xFF)
    outb(io, 0xA1, 0xFF)
    ovmf_install_8259(io)
    assert (pic.master.irq_base, pic.slave.irq_base) == (0x68, 0x70)
    assert (inb(io, 0x21), inb(io, 0xA1), inb(io, 0x4D0), inb(io, 0x4D1)) == (0xFF, 0xFF, 0, 0)
    assert pic.master.init_state == pic.slave.init_state == 0

    outb(io, 0x21, 0xFE)  # EnableIrq(Irq0)
    pic.set_irq(0, True)
    assert pic.intr.level
    assert pic.acknowledge() == 0x68
    assert not pic.intr.level
    assert isr(io, 0x20) == 0x01 and inb(io, 0x20) == 0x00  # in service, request taken
    pic.set_irq(0, False)
    pic.set_irq(0, True)  # the next tick arrives before the EOI: held in IRR
    assert inb(io, 0x20) == 0x01 and not pic.intr.level
    outb(io, 0x20, 0x20)  # non-specific EOI
    assert isr(io, 0x20) == 0 and pic.intr.level
    assert pic.acknowledge() == 0x68


def test_slave_interrupt_goes_through_the_cascade(io: Bus, pic: I8259Pic) -> None:
    ovmf_install_8259(io)
    outb(io, 0x21, 0xFB)  # unmask the cascade
    outb(io, 0xA1, 0xFE)  # unmask IRQ 8 (RTC)
    pic.set_irq(8, True)
    assert inb(io, 0x20) == 0x04 and pic.intr.level
    assert pic.acknowledge() == 0x70
    assert isr(io, 0xA0) == 0x01 and isr(io, 0x20) == 0x04
    outb(io, 0xA0, 0x20)
    outb(io, 0x20, 0x20)
    assert isr(io, 0xA0) == 0 and isr(io, 0x20) == 0
    assert pic.acknowledge() == 0x6F  # nothing left: the master's spurious IRQ 7


def test_fixed_priority_and_nesting(io: Bus, pic: I8259Pic) -> None:
    ovmf_install_8259(io)
    outb(io, 0x21, 0x00)
    pic.set_irq(3, True)
    pic.set_irq(1, True)
    assert inb(io, 0x20) == 0x0A
    assert pic.acknowledge() == 0x69  # IRQ 1 before IRQ 3
    assert not pic.intr.level  # IRQ 3 waits for IRQ 1's EOI
    pic.set_irq(0, True)
    assert pic.intr.level  # IRQ 0 outranks the one in service
    assert pic.acknowledge() == 0x68
    assert isr(io, 0x20) == 0x03
    outb(io, 0x20, 0x20)  # retires IRQ 0, the highest in service
    assert isr(io, 0x20) == 0x02 and not pic.intr.level
    outb(io, 0x20, 0x61)  # specific EOI for IRQ 1
    assert isr(io, 0x20) == 0 and pic.acknowledge() == 0x6B


def test_edge_triggered_input_latches_once_per_rising_edge(io: Bus, pic: I8259Pic) -> None:
    ovmf_install_8259(io)
    outb(io, 0x21, 0x00)
    line = IrqLine("irq4")
    pic.connect(4, line)
    line.set_level(True)
    assert pic.acknowledge() == 0x6C
    outb(io, 0x20, 0x20)
    assert inb(io, 0x20) == 0 and not pic.intr.level  # still high, but no new edge
    line.set_level(False)
    line.pulse()
    assert inb(io, 0x20) == 0x10 and pic.intr.level


def test_level_triggered_input_follows_the_line(io: Bus, pic: I8259Pic) -> None:
    ovmf_install_8259(io)
    outb(io, 0x21, 0xFB)
    outb(io, 0xA1, 0x00)
    outb(io, 0x4D1, 0x08)  # IRQ 11 level-triggered (a PCI INTx line)
    pic.set_irq(11, True)
    assert pic.acknowledge() == 0x73
    assert inb(io, 0xA0) == 0x08  # a level request stays in IRR through INTA
    outb(io, 0xA0, 0x20)
    outb(io, 0x20, 0x20)
    assert pic.intr.level  # still asserted: interrupts again after the EOI
    assert pic.acknowledge() == 0x73
    pic.set_irq(11, False)
    assert inb(io, 0xA0) == 0x00


def test_elcr_bits_that_cannot_be_level_read_zero(io: Bus) -> None:
    io.write(0x4D0, b"\xff\xff")
    assert io.read(0x4D0, 2) == b"\xf8\xde"


def test_ltim_makes_every_input_level_triggered(io: Bus, pic: I8259Pic) -> None:
    outb(io, 0x20, 0x19)  # ICW1 with LTIM
    for value in (0x20, 0x04, 0x01, 0x00):
        outb(io, 0x21, value)
    pic.set_irq(5, True)
    assert pic.acknowledge() == 0x25
    assert inb(io, 0x20) == 0x20
    pic.set_irq(5, False)
    assert inb(io, 0x20) == 0x00


def test_auto_eoi_leaves_isr_clear(io: Bus, pic: I8259Pic) -> None:
    outb(io, 0x20, 0x11)
    for value in (0x08, 0x04, 0x03):  # ICW4: auto-EOI, 8086 mode
        outb(io, 0x21, value)
    pic.set_irq(6, True)
    assert pic.acknowledge() == 0x0E
    assert isr(io, 0x20) == 0
    pic.set_irq(7, True)
    assert pic.intr.level and pic.acknowledge() == 0x0F


def test_rotation_commands(io: Bus, pic: I8259Pic) -> None:
    ovmf_install_8259(io)
    outb(io, 0x21, 0x00)
    outb(io, 0x20, 0xC4)  # set priority: IRQ 4 lowest, so IRQ 5 highest
    pic.set_irq(3, True)
    pic.set_irq(6, True)
    assert pic.acknowledge() == 0x6E  # IRQ 6 beats IRQ 3 now
    outb(io, 0x20, 0xA0)  # rotate on non-specific EOI: IRQ 6 becomes lowest
    assert pic.master.priority_add == 7
    assert pic.acknowledge() == 0x6B
    outb(io, 0x20, 0xE3)  # rotate on specific EOI 3: IRQ 4 highest
    assert pic.master.priority_add == 4 and isr(io, 0x20) == 0


def test_poll_command_acknowledges_the_highest_request(io: Bus, pic: I8259Pic) -> None:
    ovmf_install_8259(io)
    outb(io, 0x21, 0x00)
    outb(io, 0x20, 0x0C)  # OCW3 poll
    assert inb(io, 0x20) == 0x00  # nothing pending
    pic.set_irq(2, False)
    pic.set_irq(5, True)
    outb(io, 0x20, 0x0C)
    assert inb(io, 0x21) == 0x85  # either port answers a poll
    assert isr(io, 0x20) == 0x20
    assert inb(io, 0x21) == 0x00  # the poll is over: the IMR again


def test_spurious_interrupt_from_the_slave(io: Bus, pic: I8259Pic) -> None:
    ovmf_install_8259(io)
    outb(io, 0x21, 0x00)
    outb(io, 0xA1, 0x00)
    pic.set_irq(9, True)  # the slave raises INT, the master latches IR2
    outb(io, 0xA1, 0x02)  # then the request is masked away before INTA
    assert inb(io, 0x20) == 0x04
    assert pic.acknowledge() == 0x77
    assert isr(io, 0xA0) == 0 and isr(io, 0x20) == 0x04


def test_special_mask_mode_lets_lower_priorities_in(io: Bus, pic: I8259Pic) -> None:
    ovmf_install_8259(io)
    outb(io, 0x21, 0x00)
    pic.set_irq(1, True)
    assert pic.acknowledge() == 0x69
    pic.set_irq(5, True)
    assert not pic.intr.level
    outb(io, 0x21, 0x02)  # mask the in-service IRQ 1 ...
    outb(io, 0x20, 0x68)  # ... and enter special mask mode
    assert pic.intr.level and pic.acknowledge() == 0x6D
    outb(io, 0x20, 0x48)  # leave special mask mode
    assert isr(io, 0x20) == 0x22


def test_special_fully_nested_mode_passes_higher_slave_requests(io: Bus, pic: I8259Pic) -> None:
    outb(io, 0x20, 0x11)
    for value in (0x68, 0x04, 0x11):  # ICW4: special fully nested
        outb(io, 0x21, value)
    pic.set_irq(9, True)
    assert pic.acknowledge() == 0x01  # the slave was not initialised: vector base 0
    pic.set_irq(8, True)  # outranks IRQ 9 on the slave, but IR2 is in service
    assert pic.intr.level
    assert pic.acknowledge() == 0x00
    assert isr(io, 0xA0) == 0x03


def test_icw1_restarts_the_chip(io: Bus, pic: I8259Pic) -> None:
    ovmf_install_8259(io)
    outb(io, 0x21, 0x00)
    pic.set_irq(3, True)
    pic.acknowledge()
    outb(io, 0x20, 0x11)
    assert pic.master.init_state == 1
    assert (inb(io, 0x21), isr(io, 0x20), inb(io, 0x20)) == (0, 0, 0)
    outb(io, 0x21, 0x20)  # ICW2 ...
    outb(io, 0x21, 0x04)
    outb(io, 0x21, 0x01)
    outb(io, 0x21, 0xAA)  # ... and OCW1 afterwards
    assert pic.master.irq_base == 0x20 and inb(io, 0x21) == 0xAA


def test_reset_returns_to_power_on(io: Bus, pic: I8259Pic) -> None:
    ovmf_install_8259(io)
    outb(io, 0x4D0, 0x20)
    pic.reset()
    assert (pic.master.irq_base, pic.slave.irq_base) == (0, 0)
    assert [inb(io, port) for port in (0x21, 0xA1, 0x4D0, 0x4D1)] == [0, 0, 0, 0]


def test_bad_input_numbers_are_configuration_errors(pic: I8259Pic) -> None:
    for irq in (-1, 16, "3"):
        with pytest.raises(PicError, match=r"IRQ 0-15"):
            pic.set_irq(irq, True)  # type: ignore[arg-type]
    with pytest.raises(SevsimError):
        pic.connect(99, IrqLine())


def test_arbitrary_guest_accesses_never_raise(io: Bus, pic: I8259Pic) -> None:
    rng = random.Random(8259)
    devices = (pic.master, pic.slave, pic.elcr)
    for _ in range(20_000):
        device = rng.choice(devices)
        offset = rng.randrange(0, 8)
        size = rng.choice((1, 2, 4, 8))
        if rng.random() < 0.5:
            assert len(device.read(offset, size)) == size
        else:
            device.write(offset, rng.randbytes(size))
        port = rng.choice((0x20, 0x21, 0xA0, 0xA1, 0x4D0, 0x4D1))
        size = rng.choice((1, 2, 4))
        if rng.random() < 0.5:
            assert len(io.read(port, size)) == size
        else:
            io.write(port, rng.randbytes(size))
        pic.set_irq(rng.randrange(16), rng.random() < 0.5)
        vector = pic.acknowledge()
        assert 0 <= vector <= 0xFF
