"""The VARS pflash, driven with the command sequences OVMF's QemuFlash.c issues."""

import random
import re
import shutil
from pathlib import Path

import pytest

from sevsim.vmm.bus import Bus
from sevsim.vmm.pflash import FlashError, PflashCfi01, VarsFile, cfi_table

OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS.fd")
VARS_SIZE = 0x20000
VARS_GPA = 0xFFE0_0000  # below a 1.875 MiB OVMF_CODE.fd


class Storage:
    """The flash contents as a bytearray (the machine uses the guest's memory slot)."""

    def __init__(self, data: bytes) -> None:
        self.bytes = bytearray(data)

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self.bytes[offset : offset + size])

    def write(self, offset: int, data: bytes) -> None:
        self.bytes[offset : offset + len(data)] = data


class Flash:
    """A flash on an MMIO bus, recording romd changes and write-throughs."""

    def __init__(self, data: bytes | None = None, **kwargs) -> None:
        initial = bytes(range(256)) * (VARS_SIZE // 256) if data is None else data
        self.storage = Storage(initial)
        self.romd: list[bool] = []
        self.updates: list[tuple[int, bytes]] = []
        kwargs.setdefault("backing", self)
        self.device = PflashCfi01(self.storage, len(initial), on_romd=self.romd.append, **kwargs)
        self.mmio = Bus("mmio", 1 << 52)
        self.mmio.insert(self.device, VARS_GPA, len(initial))

    def write(self, offset: int, data: bytes) -> None:  # the backing's side
        self.updates.append((offset, data))

    def poke(self, lba: int, offset: int, value: int) -> None:
        """QemuFlashPtrWrite: one byte (under SEV-ES a direct MMIO_WRITE VMGEXIT)."""
        self.mmio.write(VARS_GPA + lba * 0x1000 + offset, bytes((value,)))

    def peek(self, lba: int, offset: int, size: int = 1) -> bytes:
        return self.mmio.read(VARS_GPA + lba * 0x1000 + offset, size)


def qemu_flash_write(flash: Flash, lba: int, offset: int, data: bytes) -> None:
    """QemuFlashWrite: 0x10 + the byte at each address, then read array at the last."""
    for index, byte in enumerate(data):
        flash.poke(lba, offset + index, 0x10)
        flash.poke(lba, offset + index, byte)
    flash.poke(lba, offset + len(data) - 1, 0xFF)


def qemu_flash_erase_block(flash: Flash, lba: int) -> None:
    flash.poke(lba, 0, 0x20)
    flash.poke(lba, 0, 0xD0)


def test_program_sequence_as_qemu_flash_write():
    flash = Flash()
    qemu_flash_write(flash, 3, 0x10, b"\x12\x34\x56")
    assert flash.storage.bytes[0x3010:0x3013] == b"\x12\x34\x56"
    assert flash.storage.bytes[0x3013] == 0x13  # the neighbours are untouched
    assert flash.updates == [(0x3010, b"\x12"), (0x3011, b"\x34"), (0x3012, b"\x56")]
    assert flash.romd == [False, True]  # device mode from the first 0x10 to the 0xFF
    assert flash.peek(3, 0x10, 4) == b"\x12\x34\x56\x13"


def test_status_reads_while_programming():
    flash = Flash()
    flash.poke(0, 0x40, 0x10)
    assert flash.peek(0, 0x40) == b"\x80"  # status, not the array, in device mode
    flash.poke(0, 0x40, 0xAB)
    assert flash.peek(0, 0x99) == b"\x80"  # the status register answers everywhere
    assert flash.peek(0, 0x98, 2) == b"\x80\x00"
    assert flash.peek(0, 0x98, 4) == b"\x80\x00\x80\x00"  # QEMU's 32-bit status lanes
    assert flash.peek(0, 0x98, 8) == b"\x80\x00\x80\x00" * 2
    assert flash.peek(0, 0x99, 2) == b"\x80\x80"  # unaligned: two byte-wide reads
    flash.poke(0, 0x40, 0xFF)
    assert flash.peek(0, 0x40) == b"\xab"
    assert flash.device.romd


def test_erase_sequence_as_qemu_flash_erase_block():
    flash = Flash()
    qemu_flash_erase_block(flash, 5)
    assert flash.storage.bytes[0x5000:0x6000] == b"\xff" * 0x1000
    assert flash.storage.bytes[0x4FFF] == 0xFF and flash.storage.bytes[0x6000] == 0x00
    assert flash.updates == [(0x5000, b"\xff" * 0x1000)]
    # OVMF leaves the flash in the erase command: reads return the status
    assert flash.romd == [False]
    assert flash.peek(5, 0x123) == b"\x80"
    qemu_flash_write(flash, 5, 0x123, b"\x5a")
    assert flash.romd == [False, True]
    assert flash.peek(5, 0x122, 3) == b"\xff\x5a\xff"


def test_erase_takes_effect_before_the_confirm_and_0xff_cancels_into_read_array():
    flash = Flash()
    flash.poke(1, 0x80, 0x20)  # anywhere in the sector
    assert flash.storage.bytes[0x1000:0x2000] == b"\xff" * 0x1000  # QEMU erases at once
    flash.poke(1, 0, 0xFF)
    assert flash.device.romd and flash.peek(1, 0, 1) == b"\xff"


def non_sev_es_flash_detection(flash: Flash) -> tuple[int, int]:
    """QemuFlashDetected's probe (skipped under SEV-ES): (probe offset, last status)."""
    offset = next(
        at for at in range(0x1000) if flash.peek(0, at)[0] not in (0x50, 0x70, 0x00)
    )
    original = flash.peek(0, offset)[0]
    flash.poke(0, offset, 0x50)
    assert flash.peek(0, offset)[0] == original  # not RAM: the array reads back
    flash.poke(0, offset, 0x70)
    assert flash.peek(0, offset)[0] == 0x00  # CLEARED_ARRAY_STATUS: it is a flash
    flash.poke(0, offset, 0x10)
    flash.poke(0, offset, original)
    flash.poke(0, offset, 0x70)
    status = flash.peek(0, offset)[0]
    flash.poke(0, offset, 0xFF)
    return offset, status


def test_flash_detection_finds_a_writable_flash():
    flash = Flash()
    offset, status = non_sev_es_flash_detection(flash)
    assert (offset, status) == (1, 0x80)  # byte 0 is 0x00 in this pattern
    assert flash.storage.bytes[:0x100] == bytes(range(256))
    assert flash.device.romd


def test_flash_detection_sees_a_write_protected_flash():
    flash = Flash(read_only=True)
    _, status = non_sev_es_flash_detection(flash)
    assert status == 0x90  # programming error: "FD behaves as FLASH, write-protected"
    assert flash.updates == []
    flash.poke(2, 0, 0x20)
    assert flash.peek(2, 0) == b"\xb0"  # and an erase error
    flash.poke(2, 0, 0xD0)
    assert flash.peek(2, 0) == b"\xb0"
    assert flash.storage.bytes[0x2000] == 0x00


def test_clear_status():
    flash = Flash(read_only=True)
    flash.poke(0, 0, 0x10)
    flash.poke(0, 0, 0x42)
    assert flash.peek(0, 0) == b"\x90"
    flash.poke(0, 0, 0x50)
    assert flash.device.romd and flash.peek(0, 0) == b"\x00"  # back in read array
    flash.poke(0, 0, 0x70)
    assert flash.peek(0, 0) == b"\x00"


def test_cfi_query_table():
    flash = Flash()
    flash.poke(0, 0x55, 0x98)
    table = b"".join(flash.peek(0, at) for at in range(0x52))
    assert table[0x10:0x13] == b"QRY"
    assert table[0x13:0x17] == b"\x01\x00\x31\x00"  # Intel command set, PRI at 0x31
    assert table[0x27] == 17  # 2^17 = 128 KiB
    assert table[0x28:0x2D] == b"\x02\x00\x08\x00\x01"  # x8/x16, 256-byte buffer, 1 region
    assert table[0x2D:0x31] == b"\x1f\x00\x10\x00"  # 32 blocks of 0x10 * 256 bytes
    assert table[0x31:0x36] == b"PRI10"
    assert table == cfi_table(VARS_SIZE, 0x1000)
    assert flash.peek(7, 0x110) == b"Q"  # the table repeats every 256 bytes
    assert flash.peek(0, 0x52) == b"\x00" and flash.peek(0, 0xFF) == b"\x00"
    assert flash.peek(0, 0x10, 4) == b"Q\x00\x00\x00"  # one table byte per access
    flash.poke(0, 0, 0x00)  # only read array leaves query mode
    assert flash.peek(0, 0x11) == b"R"
    flash.poke(0, 0, 0xFF)
    assert flash.peek(0, 0x11) == b"\x11"
    assert flash.romd == [False, True]


def test_read_id_is_zero_on_pc():
    flash = Flash()
    flash.poke(0, 0, 0x90)
    assert flash.peek(0, 0, 4) == bytes(4)
    assert flash.peek(0, 1) == b"\x00"
    flash.poke(0, 0, 0xFF)
    assert flash.peek(0, 1) == b"\x01"


def test_bad_command_sequences_return_to_read_array():
    flash = Flash()
    flash.poke(0, 0, 0x42)  # unknown command: device mode and back within one write
    assert flash.romd == [] and flash.peek(0, 3) == b"\x03"
    flash.poke(2, 0, 0x20)
    flash.poke(2, 0, 0x42)  # erase without its confirm: the erase already happened
    assert flash.device.romd and flash.peek(2, 0) == b"\xff"
    flash.poke(2, 0, 0x20)
    flash.poke(2, 0, 0x70)  # a command in a confirm cycle is wrong too
    assert flash.romd == [False, True, False, True]


def test_block_lock_commands_are_accepted():
    flash = Flash()
    flash.poke(0, 0, 0x60)
    flash.poke(0, 0, 0xD0)
    assert flash.peek(0, 0) == b"\x80"
    flash.poke(0, 0, 0xFF)
    assert flash.storage.bytes[:4] == b"\x00\x01\x02\x03"


def test_write_to_buffer():
    flash = Flash()
    flash.poke(1, 0x20, 0xE8)
    assert flash.peek(1, 0x20) == b"\x80"
    flash.poke(1, 0x20, 3)  # four bytes
    for index, byte in enumerate(b"\xde\xad\xbe\xef"):
        flash.poke(1, 0x20 + index, byte)
        assert flash.storage.bytes[0x1020 + index] == 0x20 + index  # buffered
    flash.poke(1, 0x20, 0xD0)
    assert flash.storage.bytes[0x1020:0x1024] == b"\xde\xad\xbe\xef"
    assert flash.updates == [(0x1000, bytes(flash.storage.bytes[0x1000:0x1100]))]
    assert flash.peek(1, 0x20) == b"\x80"


def test_write_to_buffer_of_one_byte():
    flash = Flash()
    for value in (0xE8, 0, 0x77, 0xD0):  # count - 1 = 0: one byte
        flash.poke(2, 0x105, value)
    assert flash.storage.bytes[0x2104:0x2107] == b"\x04\x77\x06"
    assert flash.updates == [(0x2100, bytes(flash.storage.bytes[0x2100:0x2200]))]


def test_write_to_buffer_without_confirm_is_discarded():
    flash = Flash()
    for value in (0xE8, 0, 0x77, 0xFF):
        flash.poke(1, 0, value)
    assert flash.storage.bytes[0x1000] == 0x00
    assert flash.updates == [] and flash.device.romd


def test_reset_returns_to_read_array():
    flash = Flash()
    flash.poke(0, 0, 0x70)
    flash.device.reset()
    assert flash.romd == [False, True]
    assert flash.peek(0, 2) == b"\x02"


@pytest.mark.skipif(not OVMF_VARS.exists(), reason="needs Debian's ovmf package")
def test_persistence_to_a_vars_file(tmp_path):
    path = tmp_path / "vars.fd"
    shutil.copyfile(OVMF_VARS, path)
    vars_file = VarsFile(path)
    assert vars_file.size == VARS_SIZE
    flash = Flash(vars_file.read(0, vars_file.size), backing=vars_file)
    assert flash.peek(0, 0x28, 8) == b"_FVH\xff\xfe\x04\x00"  # the varstore's FV header
    qemu_flash_erase_block(flash, 0x1F)
    qemu_flash_write(flash, 0x1F, 0x800, b"sevsim")
    assert path.read_bytes() == bytes(flash.storage.bytes)
    contents = path.read_bytes()
    assert contents[0x1F800:0x1F806] == b"sevsim"
    assert contents[0x1F000:0x1F800] == b"\xff" * 0x800
    assert contents[:0x1F000] == OVMF_VARS.read_bytes()[:0x1F000]
    assert vars_file.write_error is None


def test_vars_file_write_errors_are_kept_not_raised(tmp_path):
    path = tmp_path / "vars.fd"
    path.write_bytes(bytes(0x1000))
    vars_file = VarsFile(path)
    path.unlink()
    vars_file.write(0, b"x")
    assert isinstance(vars_file.write_error, FileNotFoundError)


def test_vars_file_size_must_be_whole_sectors(tmp_path):
    path = tmp_path / "odd.fd"
    path.write_bytes(bytes(0x1800))
    with pytest.raises(FlashError, match=re.escape(f"VARS file {str(path)!r} is 6144 bytes")):
        VarsFile(path)
    path.write_bytes(b"")
    with pytest.raises(FlashError, match="is 0 bytes"):
        VarsFile(path)
    with pytest.raises(FlashError, match=re.escape("missing.fd")):
        VarsFile(tmp_path / "missing.fd")
    with pytest.raises(FlashError, match="not a regular file"):
        VarsFile(tmp_path)


@pytest.mark.parametrize(
    ("size", "sector_size", "message"),
    [
        (0x1800, 0x1000, "flash size 0x1800"),
        (0, 0x1000, "flash size 0x0"),
        (0x3000, 0x3000, "sector size 0x3000"),
        (0x80, 0x80, "sector size 0x80"),
    ],
)
def test_geometry_errors(size, sector_size, message):
    with pytest.raises(FlashError, match=message):
        PflashCfi01(Storage(bytes(size)), size, sector_size=sector_size)


def test_arbitrary_guest_accesses_never_raise():
    flash = Flash()
    device = flash.device
    rng = random.Random(0xCF1)
    commands = (0x00, 0x01, 0x10, 0x20, 0x40, 0x50, 0x60, 0x70, 0x90, 0x98, 0xD0, 0xE8, 0xFF)
    for _ in range(20000):
        offset = rng.choice((rng.randrange(VARS_SIZE), rng.randrange(-8, VARS_SIZE + 8)))
        size = rng.choice((1, 2, 4, 8))
        if rng.random() < 0.5:
            assert len(device.read(offset, size)) == size
        else:
            data = bytes((rng.choice(commands),)) + rng.randbytes(size - 1)
            device.write(offset, rng.choice((data, rng.randbytes(size))))
    assert len(flash.storage.bytes) == VARS_SIZE
