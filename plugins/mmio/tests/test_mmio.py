"""SVM_VMGEXIT_MMIO_READ / MMIO_WRITE through the scratch area."""

import struct

import pytest

from sevsim.arch.exits import GhcbErr, VmgExit
from sevsim.arch.ghcb import Ghcb
from sevsim.testing import ExitDriver, isolated_host
from sevsim.vmm.machine import MMIO_TEST_GPA

pytest_plugins = ["sevsim.testing"]

GHCB = 0x7000
BUF = GHCB + 0x800


def driver() -> ExitDriver:
    return ExitDriver(isolated_host(enable=["mmio"]).start())


def mmio(d: ExitDriver, code: int, gpa: int, length: int, scratch: int = BUF, data: bytes = b""):
    g = Ghcb()
    for k, v in {"sw_exit_code": code, "sw_exit_info_1": gpa, "sw_exit_info_2": length,
                 "sw_scratch": scratch}.items():  # fmt: skip
        g[k] = v
    g.raw[scratch - GHCB : scratch - GHCB + len(data)] = data if scratch & ~0xFFF == GHCB else b""
    return d.vmgexit(g)


@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_read_the_id_register_in_every_size(size):
    reply = mmio(driver(), VmgExit.MMIO_READ, MMIO_TEST_GPA, size)
    assert reply.ghcb["sw_exit_info_1"] == 0
    assert reply.ghcb.raw[0x800 : 0x800 + size] == struct.pack("<Q", 0x5345_5653)[:size]


def test_write_then_read_scratch_register():
    d = driver()
    mmio(d, VmgExit.MMIO_WRITE, MMIO_TEST_GPA + 8, 8, data=struct.pack("<Q", 0x1122334455667788))
    assert d.devices.mmio_test.scratch == 0x1122334455667788
    reply = mmio(d, VmgExit.MMIO_READ, MMIO_TEST_GPA + 8, 4)
    assert reply.ghcb.raw[0x800:0x804] == struct.pack("<I", 0x55667788)


def test_long_accesses_go_in_8_byte_pieces_through_an_outside_scratch():
    d = driver()
    payload = bytes(range(40))
    d.vm.memory.write(0x9000, payload)
    mmio(d, VmgExit.MMIO_WRITE, MMIO_TEST_GPA + 0x100, 40, scratch=0x9000)
    assert bytes(d.devices.mmio_test.buffer[:40]) == payload
    assert d.devices.mmio_test.writes == 5
    d.vm.memory.write(0x9000, bytes(40))
    mmio(d, VmgExit.MMIO_READ, MMIO_TEST_GPA + 0x100, 40, scratch=0x9000)
    assert d.vm.memory.read(0x9000, 40) == payload


def test_unclaimed_mmio_reads_all_ones():
    reply = mmio(driver(), VmgExit.MMIO_READ, 0xE000_0000, 4)
    assert reply.ghcb.raw[0x800:0x804] == b"\xff" * 4


def test_missing_scratch_valid_bit_and_bad_scratch():
    d = driver()
    reply = d.vmgexit({"sw_exit_code": VmgExit.MMIO_READ, "sw_exit_info_1": MMIO_TEST_GPA,
                       "sw_exit_info_2": 4})  # fmt: skip
    assert reply.ghcb is not None and reply.ghcb["sw_exit_info_2"] == GhcbErr.MISSING_INPUT
    reply = mmio(d, VmgExit.MMIO_READ, MMIO_TEST_GPA, 4, scratch=GHCB + 0xFEE)
    assert reply.ghcb["sw_exit_info_2"] == GhcbErr.INVALID_SCRATCH_AREA
