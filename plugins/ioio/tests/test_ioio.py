"""SVM_EXIT_IOIO through the GHCB, as KVM's io_interception handles it."""

import pytest

from sevsim.arch.exits import GhcbErr, SvmExit
from sevsim.arch.ghcb import GHCB_SCRATCH_AREA_LIMIT, Ghcb
from sevsim.kvm.exits import RunFailed
from sevsim.testing import ExitDriver, isolated_host

pytest_plugins = ["sevsim.testing"]

GHCB = 0x7000
IN, STR, REP = 1 << 0, 1 << 2, 1 << 3


def info1(port: int, size: int, *flags: int) -> int:
    return port << 16 | size << 4 | 4 << 7 | sum(flags)  # 64-bit address size


def driver() -> ExitDriver:
    return ExitDriver(isolated_host(enable=["ioio"]).start())


def ioio(d: ExitDriver, info: int, info2: int = 0, **fields: int):
    return d.vmgexit({"sw_exit_code": SvmExit.IOIO, "sw_exit_info_1": info,
                      "sw_exit_info_2": info2, **fields})  # fmt: skip


def test_out_reaches_the_uart_and_in_reads_its_line_status():
    d = driver()
    reply = ioio(d, info1(0x3F8, 1), rax=0x1234_5648)  # 'H'
    assert reply.ghcb["sw_exit_info_1"] == 0 and d.devices.uart.output == b"H"
    reply = ioio(d, info1(0x3FD, 1, IN), rax=0xAABB_CC00)
    assert reply.ghcb["rax"] == 0xAABB_CC60  # LSR: THR empty; upper bytes kept
    assert reply.ghcb.is_valid("rax")


def test_in_without_rax_starts_from_zero_and_16_32_bit_sizes():
    d = driver()
    assert ioio(d, info1(0x402, 1, IN)).ghcb["rax"] == 0xE9  # debugcon readback
    assert ioio(d, info1(0x80, 1), rax=0xBEEF).ghcb["sw_exit_info_1"] == 0
    assert d.devices.post.codes == [0xEF]
    ioio(d, info1(0x3F8, 2), rax=0x0341)  # a word OUT spans THR ('A') and IER
    assert (bytes(d.devices.uart.output), d.devices.uart.ier) == (b"A", 3)
    assert ioio(d, info1(0x3F8, 4, IN)).ghcb["rax"] == 0x00_01_03_00  # LCR IIR IER RBR


def test_unclaimed_ports_read_all_ones_and_drop_writes():
    d = driver()
    seen = []
    d.devices.io.on_unclaimed.append(lambda bus, op, addr, size: seen.append((op, addr, size)))
    assert ioio(d, info1(0x1234, 4, IN), rax=0).ghcb["rax"] == 0xFFFF_FFFF
    ioio(d, info1(0x1234, 2), rax=5)
    assert seen == [("read", 0x1234, 4), ("write", 0x1234, 2)]


def test_out_needs_rax_in_does_not():
    reply = ioio(driver(), info1(0x3F8, 1))
    assert (reply.ghcb["sw_exit_info_1"], reply.ghcb["sw_exit_info_2"]) == (
        2, GhcbErr.MISSING_INPUT)


def test_string_out_through_the_scratch_area_in_the_ghcb():
    d = driver()
    text = b"Hello, SEV-ES"
    g = Ghcb()
    for k, v in {"sw_exit_code": SvmExit.IOIO, "sw_exit_info_1": info1(0x3F8, 1, STR, REP),
                 "sw_exit_info_2": len(text), "sw_scratch": GHCB + 0x800}.items():  # fmt: skip
        g[k] = v
    g.raw[0x800 : 0x800 + len(text)] = text  # the guest put the bytes in the shared buffer
    reply = d.vmgexit(g)
    assert reply.ghcb is not None and reply.ghcb["sw_exit_info_1"] == 0
    assert bytes(d.devices.uart.output) == text


def test_string_in_is_written_back_outside_the_ghcb():
    d = driver()
    d.devices.uart.input += b"abcd"
    reply = ioio(d, info1(0x3F8, 1, IN, STR, REP), 4, sw_scratch=0x9000)
    assert reply.ghcb["sw_exit_info_1"] == 0
    assert d.vm.memory.read(0x9000, 4) == b"abcd"  # synced at the next VM entry


@pytest.mark.parametrize(
    ("scratch", "count"),
    [(0, 1), (GHCB + 0x7F0, 16), (GHCB + 0xFE0, 32), (0x9000, GHCB_SCRATCH_AREA_LIMIT + 1)],
    ids=["zero", "below-shared-buffer", "past-shared-buffer", "over-64k"],
)
def test_bad_scratch_areas_get_invalid_scratch_area(scratch, count):
    reply = ioio(driver(), info1(0x3F8, 1, STR), count, sw_scratch=scratch)
    assert (reply.ghcb["sw_exit_info_1"], reply.ghcb["sw_exit_info_2"]) == (
        2, GhcbErr.INVALID_SCRATCH_AREA)


@pytest.mark.parametrize("flags", [(STR, REP), (IN, STR, REP)], ids=["out", "in"])
def test_a_string_of_int_max_zero_byte_elements_moves_nothing_and_returns(flags):
    """``sev_es_string_io`` with size 0: bytes = 0, accepted; the 2**31 - 1 accesses
    of no bytes change nothing (a fuzzed request made sevsim loop over them)."""
    d = driver()
    reply = ioio(d, info1(0x3F8, 0, *flags), 0x7FFF_FFFF, sw_scratch=GHCB + 0x800)
    assert (reply.ghcb["sw_exit_info_1"], reply.ghcb["sw_exit_info_2"]) == (0, 0)
    assert d.devices.uart.output == b""


def test_string_io_count_beyond_int_max_fails_kvm_run():
    reply = ioio(driver(), info1(0x3F8, 4, STR), 0x8000_0000, sw_scratch=0x9000)
    assert isinstance(reply.exit, RunFailed) and reply.exit.errno == "EINVAL"


@pytest.mark.parametrize("size", [3, 0, 7])
def test_a_size_field_that_is_not_one_hot_is_used_as_given(size):
    """``io_interception`` takes ``(exit_info_1 & SVM_IOIO_SIZE_MASK) >> 4`` as the size in
    bytes and never answers an IOIO request with a GHCB error: a 3-byte OUT to COM1
    writes THR, IER and IIR/FCR; a 0-byte IN reads nothing and leaves RAX's low bytes."""
    d = driver()
    reply = ioio(d, 0x3F8 << 16 | size << 4, rax=0x0F_0241)
    assert (reply.ghcb["sw_exit_info_1"], reply.ghcb["sw_exit_info_2"]) == (0, 0)
    assert bytes(d.devices.uart.output) == (b"A" if size else b"")
    assert d.devices.uart.ier == (0x02 if size else 0)
    reply = ioio(d, 0x3FD << 16 | size << 4 | IN, rax=0xAABB_CCDD)
    assert reply.ghcb["sw_exit_info_1"] == 0
    if size == 0:
        assert reply.ghcb["rax"] == 0xAABB_CCDD  # merged: nothing was read


@pytest.mark.parametrize(
    ("size", "rax", "expected"),
    [(1, 0xAAAA_BBBB_CCCC_DD00, 0xAAAA_BBBB_CCCC_DDE9),  # debugcon reads back 0xe9
     (2, 0xAAAA_BBBB_CCCC_DD00, 0xAAAA_BBBB_CCCC_FFFF),  # wider: unclaimed, all ones
     (4, 0xAAAA_BBBB_CCCC_DD00, 0x0000_0000_FFFF_FFFF)],
    ids=["byte", "word", "dword"],
)  # fmt: skip
def test_in_keeps_the_rest_of_rax_below_4_bytes_and_zero_extends_at_4(size, rax, expected):
    """complete_fast_pio_in: RAX is the starting value only for sizes below 4."""
    d = driver()
    assert ioio(d, info1(0x402, size, IN), rax=rax).ghcb["rax"] == expected
