"""Port 0x92, the PIIX reset control register at 0xCF9, and isa-debug-exit at 0x501."""

from __future__ import annotations

import random

import pytest

from sevsim.vmm import reset_ports
from sevsim.vmm.acpi_pm import AcpiPmBlock
from sevsim.vmm.bus import Bus
from sevsim.vmm.clock import MachineClock
from sevsim.vmm.pci import attach_i440fx
from sevsim.vmm.power import DebugExitRequest, MachineRequest, ResetRequest


@pytest.fixture
def pc():
    """The ports as the pc machine wires them: 0xCF9 reached through the PCI host."""
    io = Bus("io", 0x10000)
    requests: list[MachineRequest] = []
    rcr = reset_ports.attach(io, requests.append)
    attach_i440fx(io, AcpiPmBlock(MachineClock(), requests.append), rcr)
    return io, requests, rcr


def test_port_map(pc):
    io, _, rcr = pc
    assert isinstance(io.find(0x92, 1)[0], reset_ports.Port92)
    assert isinstance(io.find(0x501, 2)[0], reset_ports.DebugExit)
    assert io.find(0x503, 1) is None
    assert io.find(0x93, 1) is None
    assert rcr.name == "piix-rcr"


def test_port92_a20_readback_as_platform_pei_sets_it(pc):
    io, requests, _ = pc
    assert io.read(0x92, 1) == b"\x00"
    io.write(0x92, bytes([io.read(0x92, 1)[0] | reset_ports.A20_GATE]))  # IoOr8(0x92, BIT1)
    assert io.read(0x92, 1) == b"\x02"
    io.write(0x92, b"\xf2")  # every bit is kept
    assert io.read(0x92, 1) == b"\xf2"
    assert requests == []


def test_port92_fast_reset_on_a_rising_bit_0(pc):
    io, requests, _ = pc
    io.write(0x92, b"\x03")
    assert requests == [ResetRequest("port 0x92 fast reset")]
    io.write(0x92, b"\x03")  # already set: no new edge
    assert len(requests) == 1
    io.write(0x92, b"\x02")
    io.write(0x92, b"\x01")
    assert requests == [ResetRequest("port 0x92 fast reset")] * 2
    assert io.read(0x92, 1) == b"\x01"


def test_rcr_ovmf_reset_cold(pc):
    io, requests, rcr = pc
    io.write(0xCF9, bytes([reset_ports.RST_CPU | reset_ports.SYS_RST]))  # ResetCold: 0x06
    assert requests == [ResetRequest("0xcf9 hard reset")]
    assert io.read(0xCF9, 1) == b"\x00"  # the resetting write is not kept
    io.write(0xCF9, b"\x04")
    assert requests[-1] == ResetRequest("0xcf9 soft reset")
    assert rcr.value == 0


def test_rcr_keeps_only_sys_rst(pc):
    io, requests, _ = pc
    io.write(0xCF9, b"\xfb")  # every bit but RST_CPU
    assert io.read(0xCF9, 1) == b"\x02"
    io.write(0xCF9, b"\x08")
    assert io.read(0xCF9, 1) == b"\x00"
    assert requests == []


def test_rcr_wider_access_acts_byte_by_byte(pc):
    io, requests, _ = pc
    io.write(0xCF9, (0x0402).to_bytes(2, "little"))  # 0x02 stored, then 0x04 resets
    assert requests == [ResetRequest("0xcf9 soft reset")]
    assert io.read(0xCF9, 2) == b"\x02\x02"
    # The PCI latch beside it is untouched.
    assert io.read(0xCF8, 4) == bytes(4)


def test_debug_exit(pc):
    io, requests, _ = pc
    assert io.read(0x501, 1) == b"\x00"
    assert io.read(0x501, 2) == b"\x00\x00"
    io.write(0x501, b"\x31")
    io.write(0x501, (0x1234).to_bytes(2, "little"))
    io.write(0x502, b"\x00")
    assert requests == [DebugExitRequest(0x31), DebugExitRequest(0x1234), DebugExitRequest(0)]
    assert [request.status for request in requests] == [0x63, 0x2469, 1]


def test_sweep_of_guest_accesses_never_raises(pc):
    io, requests, _ = pc
    rng = random.Random(0x92)
    for _ in range(20_000):
        port = rng.choice([0x91, 0x92, 0x93, 0xCF8, 0xCF9, 0xCFA, 0x500, 0x501, 0x502, 0x503])
        size = rng.choice([1, 2, 4])
        if rng.random() < 0.5:
            assert len(io.read(port, size)) == size
        else:
            io.write(port, rng.getrandbits(8 * size).to_bytes(size, "little"))
    assert all(isinstance(request, ResetRequest | DebugExitRequest) for request in requests)
