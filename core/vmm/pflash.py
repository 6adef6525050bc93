"""QEMU's pflash_cfi01 as the ``pc`` machine uses it for OVMF's variable store.

QEMU maps each ``-drive if=pflash`` as an Intel/Sharp command-set CFI flash ending
where the previous one starts, from 4 GiB down (``pc_system_flash_map``): unit 0
(OVMF_CODE) ends at 4 GiB, unit 1 (OVMF_VARS) right below it, so a 1.875 MiB CODE and
a 128 KiB VARS put the store at 0xffe00000. The pc machine configures each unit with
4 KiB sectors, width 1 (a byte-wide bank) and no device width, and leaves the ID
codes at 0 (``pc_pflash_create``). OVMF programs and erases only inside its
variable store, so OVMF_CODE can be plain read-only memory; this models the VARS unit.

The flash is a ROM device (``memory_region_init_rom_device``). In *read-array* mode
guest reads are served from memory (for an SEV-ES guest: a read-only KVM memory
slot) and only writes reach the device. The first write of a command takes it to
*device mode* (``memory_region_rom_device_set_romd(false)``): reads reach the device
too, and answer with the status register, the CFI table or the ID codes, until a
command returns it to read-array mode. ``on_romd`` is told each change so that the
machine can map and unmap the memory slot.

Commands (``pflash_write``), and what reads return after them (``pflash_read``):

====== ============================================================================
0xFF   read array (0x00 and 0xF0 too): memory contents, ROM mode again
0x10   program (0x40 too): the next write stores its bytes; then status reads
0x20   block erase: fills the sector with 0xFF at once (QEMU does not wait for the
       confirm); 0xD0 confirms, 0xFF cancels into read array; then status reads
0x50   clear status: status = 0, read array
0x60   block lock/unlock: 0xD0 or 0x01 confirms (no locking is modelled)
0x70   read status: status in every byte lane QEMU fills
0x90   read ID: 0 at every offset (manufacturer and device codes are 0 on pc)
0x98   CFI query: the table QEMU builds for this geometry, at offset & 0xFF;
       only 0xFF leaves query mode
0xE8   write to buffer: byte count - 1, the bytes, 0xD0; the buffer reaches the
       flash on the confirm, anything else discards it (QEMU 9.0's update buffer,
       except that a one-byte write works, as the datasheet says, where QEMU
       reports a program error)
====== ============================================================================

Any other command, or a confirm cycle with the wrong byte, is QEMU's
``error_flash``: back to read array, nothing else changes. Status bits: 0x80 ready,
0x20 erase error, 0x10 program error (both only on a read-only flash; they stay
until 0x50). Programming stores the bytes as QEMU does, without the AND a real cell
would apply.

OVMF's QemuFlashFvbServicesRuntimeDxe (edk2-stable202211 QemuFlash.c) issues only
0x10 + data per byte then one 0xFF, and 0x20 + 0xD0 per block. Its flash detection
(0x50, 0x70, then 0x10 + the original byte + 0x70, expecting status 0x80 without
0x10) is skipped under SEV-ES, where ``QemuFlashPtrWrite`` sends every command byte
as a direct MMIO_WRITE VMGEXIT instead of a store (a write to the read-only slot
would fault in a loop, since the hypervisor cannot emulate an encrypted store).

Persistence: every program, erase and buffer confirm writes the bytes it changed
through to ``backing`` at once, as QEMU's ``pflash_update`` writes through to its
block backend. A flush at the end of the run would lose every variable written
before a crash or a kill, and OVMF's fault-tolerant write protocol only recovers if
the file follows the guest's writes in order; a byte program costs a VMGEXIT, so
the extra file write is cheap next to it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

from sevsim.errors import SevsimError

#: pc_sysfw's FLASH_SECTOR_SIZE.
FLASH_SECTOR_SIZE = 0x1000

STATUS_READY = 0x80
STATUS_ERASE_ERROR = 0x20
STATUS_PROGRAM_ERROR = 0x10

#: The widest access QEMU's pflash ops take; wider ones arrive as 4-byte pieces.
_MAX_ACCESS = 4
#: CFI 0x2A for a byte-wide bank: 2^8-byte write buffer.
_WRITE_BUFFER_BITS = 8
_CFI_TABLE_SIZE = 0x52


class FlashError(SevsimError):
    """A flash image or geometry QEMU would refuse."""


class FlashStorage(Protocol):
    """Bytes at offsets into the flash: the guest's memory slot, a file, a bytearray."""

    def read(self, offset: int, size: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...


class VarsFile:
    """A ``--vars`` file as the flash's block backend: it fills the flash at start, and
    every change the guest makes is written through to it.

    A failed write (disk full, file gone) is kept in :attr:`write_error` for the run
    loop to report, and the guest goes on, as QEMU reports "Could not update PFLASH"
    and goes on.
    """

    __slots__ = ("path", "size", "write_error")

    def __init__(
        self, path: str | os.PathLike[str], sector_size: int = FLASH_SECTOR_SIZE
    ) -> None:
        self.path = Path(path)
        try:
            self.size = self.path.stat().st_size
        except OSError as err:
            raise FlashError(f"VARS file {str(self.path)!r}: {err.strerror}") from err
        if not self.path.is_file():
            raise FlashError(f"VARS file {str(self.path)!r} is not a regular file")
        if self.size == 0 or self.size % sector_size:
            raise FlashError(
                f"VARS file {str(self.path)!r} is {self.size} bytes; expected a non-zero "
                f"multiple of the {sector_size:#x}-byte flash sector"
            )
        self.write_error: OSError | None = None

    def read(self, offset: int, size: int) -> bytes:
        with self.path.open("rb") as file:
            file.seek(offset)
            return file.read(size)

    def write(self, offset: int, data: bytes) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY)
            try:
                os.pwrite(fd, data, offset)
            finally:
                os.close(fd)
        except OSError as err:
            self.write_error = err


def cfi_table(size: int, sector_size: int) -> bytes:
    """The CFI query table ``pflash_cfi01_fill_cfi_table`` builds for a byte-wide bank."""
    blocks = size // sector_size
    table = bytearray(_CFI_TABLE_SIZE)
    # "QRY", Intel command set (1), its extended table at 0x31, no alternate set,
    # Vcc 4.5-5.5 V, no Vpp
    table[0x10:0x1F] = b"QRY" + bytes((0x01, 0x00, 0x31, 0x00, 0, 0, 0, 0, 0x45, 0x55, 0, 0))
    # typical and maximum timeouts (2^n us / ms), as QEMU fills them
    table[0x1F:0x27] = bytes((0x07, 0x07, 0x0A, 0x00, 0x04, 0x04, 0x04, 0x00))
    table[0x27] = (size & -size).bit_length() - 1  # 2^n bytes: QEMU's ctz32(size)
    # x8/x16 interface, 2^8-byte write buffer, one uniform erase region...
    table[0x28:0x2D] = bytes((0x02, 0x00, _WRITE_BUFFER_BITS, 0x00, 0x01))
    # ...of (blocks - 1) + 1 blocks of 256 * n bytes
    table[0x2D:0x31] = ((blocks - 1) | (sector_size >> 8) << 16).to_bytes(4, "little")
    table[0x31:0x36] = b"PRI10"  # extended table version 1.0
    table[0x3F] = 0x01  # one protection field
    return bytes(table)


def _access_pieces(offset: int, size: int) -> Iterator[tuple[int, int]]:
    """(offset, size) of the accesses QEMU's memory core makes of one access: at most
    4 bytes, naturally aligned (``memory_access_size``, ``access_with_adjusted_size``)."""
    while size:
        length = min(size, _MAX_ACCESS, offset & -offset or _MAX_ACCESS)
        length = 1 << (length.bit_length() - 1)
        yield offset, length
        offset += length
        size -= length


class PflashCfi01:
    """One CFI flash unit on the MMIO bus (inserted at its base, ``size`` bytes)."""

    __slots__ = ("_buffer", "_buffer_base", "_cfi", "_cmd", "_counter", "_romd", "_status",
                 "_wcycle", "backing", "name", "on_romd", "read_only", "sector_size", "size",
                 "storage")  # fmt: skip

    def __init__(
        self,
        storage: FlashStorage,
        size: int,
        *,
        sector_size: int = FLASH_SECTOR_SIZE,
        backing: FlashStorage | None = None,
        read_only: bool = False,
        on_romd: Callable[[bool], None] | None = None,
        name: str = "system.flash1",
    ) -> None:
        """``storage`` holds the contents the guest sees (its memory slot);
        ``backing`` receives every change (a :class:`VarsFile`); ``on_romd(True)``
        means "map the slot, reads come from memory", ``on_romd(False)`` the reverse."""
        if sector_size < 0x100 or sector_size & (sector_size - 1) or sector_size > 1 << 24:
            raise FlashError(
                f"sector size {sector_size:#x}: expected a power of two from 0x100 to 16 MiB"
            )
        if not 0 < size < 1 << 32 or size % sector_size or size // sector_size > 0x10000:
            raise FlashError(
                f"flash size {size:#x}: expected 1..65536 whole {sector_size:#x}-byte "
                f"sectors, below 4 GiB"
            )
        self.name = name
        self.storage = storage
        self.size = size
        self.sector_size = sector_size
        self.backing = backing
        self.read_only = read_only
        self.on_romd = on_romd
        self._cfi = cfi_table(size, sector_size)
        self._romd = True
        self._status = STATUS_READY
        self._cmd = 0
        self._wcycle = 0
        self._counter = 0
        self._buffer = bytearray(1 << _WRITE_BUFFER_BITS)
        self._buffer_base: int | None = None

    @property
    def romd(self) -> bool:
        """True in read-array mode: reads may be served from memory."""
        return self._romd

    def reset(self) -> None:
        """System reset (``pflash_cfi01_system_reset``): read array, status ready."""
        romd = self._romd
        self._status = STATUS_READY
        self._buffer_base = None
        self._read_array()
        self._tell_romd(romd)

    # -- reads ------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        if offset < 0 or offset + size > self.size:
            return b"\xff" * size
        if self._cmd == 0:
            return self.storage.read(offset, size)
        return b"".join(self._read_piece(at, n) for at, n in _access_pieces(offset, size))

    def _read_piece(self, offset: int, size: int) -> bytes:
        match self._cmd:
            case 0x90:
                return bytes(size)
            case 0x98:
                index = offset & 0xFF
                value = self._cfi[index] if index < _CFI_TABLE_SIZE else 0
            case _:  # every other command reads the status register
                value = self._status | (self._status << 16 if size == 4 else 0)
        return value.to_bytes(size, "little")

    # -- writes -----------------------------------------------------------------------

    def write(self, offset: int, data: bytes) -> None:
        if offset < 0 or offset + len(data) > self.size:
            return
        romd = self._romd
        for at, length in _access_pieces(offset, len(data)):
            self._write_piece(at, data[at - offset : at - offset + length])
        self._tell_romd(romd)

    def _tell_romd(self, before: bool) -> None:
        if self._romd != before and self.on_romd is not None:
            self.on_romd(self._romd)

    def _write_piece(self, offset: int, data: bytes) -> None:
        cmd = data[0]
        if self._wcycle == 0:
            self._romd = False
            self._command(offset, cmd)
        elif self._wcycle == 1:
            self._second_cycle(offset, data)
        elif self._wcycle == 2:
            self._buffer_data(offset, data)
        elif cmd == 0xD0 and not self._status & STATUS_PROGRAM_ERROR:
            self._buffer_confirm()
        else:
            self._buffer_base = None
            self._read_array()

    def _command(self, offset: int, cmd: int) -> None:
        """The first cycle of a command, in read-array or a status/ID mode."""
        match cmd:
            case 0x00 | 0xF0 | 0xFF:
                self._read_array()
                return
            case 0x50:
                self._status = 0
                self._read_array()
                return
            case 0x70 | 0x90:
                self._cmd = cmd
                return
            case 0x20:
                base = offset & ~(self.sector_size - 1)
                if self.read_only:
                    self._status |= STATUS_ERASE_ERROR
                else:
                    self._update(base, b"\xff" * self.sector_size)
                self._status |= STATUS_READY
            case 0xE8:
                self._status |= STATUS_READY
            case 0x10 | 0x40 | 0x60 | 0x98:
                pass
            case _:
                self._read_array()
                return
        self._cmd = cmd
        self._wcycle = 1

    def _second_cycle(self, offset: int, data: bytes) -> None:
        cmd = data[0]
        match self._cmd:
            case 0x10 | 0x40:
                if self.read_only:
                    self._status |= STATUS_PROGRAM_ERROR
                else:
                    self._update(offset, data)
                self._status |= STATUS_READY
                self._wcycle = 0
            case 0x20 if cmd == 0xD0:
                self._status |= STATUS_READY
                self._wcycle = 0
            case 0x60 if cmd in (0xD0, 0x01):
                self._status |= STATUS_READY
                self._wcycle = 0
            case 0x98 if cmd != 0xFF:
                pass  # anything but read array stays in query mode
            case 0xE8:
                self._counter = cmd  # the byte count - 1 (the bank is one byte wide)
                self._wcycle = 2
            case _:
                self._read_array()

    def _buffer_data(self, offset: int, data: bytes) -> None:
        size = len(self._buffer)
        if self._buffer_base is None and not self.read_only:
            self._buffer_base = offset & ~(size - 1)
            self._buffer[:] = self.storage.read(self._buffer_base, size)
        base = self._buffer_base
        if base is None or not base <= offset <= base + size - len(data):
            self._status |= STATUS_PROGRAM_ERROR
        else:
            self._buffer[offset - base : offset - base + len(data)] = data
        self._status |= STATUS_READY
        if self._counter == 0:
            self._wcycle = 3
        else:
            self._counter -= 1

    def _buffer_confirm(self) -> None:
        if self._buffer_base is not None:
            self._update(self._buffer_base, bytes(self._buffer))
            self._buffer_base = None
        self._status |= STATUS_READY
        self._wcycle = 0

    def _read_array(self) -> None:
        self._cmd = 0
        self._wcycle = 0
        self._romd = True

    def _update(self, offset: int, data: bytes) -> None:
        """Change the flash contents and write them through (``pflash_update``)."""
        self.storage.write(offset, data)
        if self.backing is not None:
            self.backing.write(offset, data)
