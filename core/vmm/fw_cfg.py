"""QEMU's fw_cfg device, as the x86 ``pc`` machine puts it on IO ports 0x510-0x51B.

fw_cfg is how QEMU hands a firmware the facts of the machine it built: the CPU count,
the RAM map, the boot order, ACPI tables, files. OVMF depends on it from PlatformPei
on: without the "QEMU" signature it falls back to CMOS for the RAM size, and it sizes
memory, S3 support and the CPU count from the items below (see ../shared/OVMF.md).

The ports are laid out as QEMU's ``fw_cfg_init_io_dma`` maps them (and as its DSDT's
FWCF device declares them, 12 ports from 0x510):

====== ====== =====================================================================
port   access
====== ====== =====================================================================
0x510  W16    selector: picks an item and rewinds its stream
0x510  R8     the selected item's next byte (the 8-bit data port overlaps the
0x511  R8     selector's upper half, so both ports stream); past the end: 0
0x510  W8     data writes: ignored (QEMU removed them in v2.4)
0x512  --     nothing (all ones, writes dropped)
0x514  W32    DMA address, bits 63..32, big-endian
0x518  W32    DMA address, bits 31..0, big-endian: starts the transfer
0x514  R      "QEMU CFG" (the DMA interface's signature), any width
====== ====== =====================================================================

Accesses QEMU's memory core would split are split the same way here
(``memory_access_size``: never across a region, never wider than the region takes,
never unaligned within it), and the pieces QEMU's ``valid.accepts`` rejects read as
zeros and are dropped on write: a 16-bit read of 0x510 is 0 and does not advance the
stream, a 16-bit read of 0x511 is one stream byte followed by 0xFF.

A DMA transfer reads a ``FWCfgDmaAccess`` {be32 control, be32 length, be64 address}
from guest memory, and writes the control word back as 0 (done) or 1 (error), as
``fw_cfg_dma_transfer``. OVMF's PEI phase never uses DMA under SEV (it has no IOMMU
protocol yet); its DXE phase does, with the access structure and the data in shared
pages that the VMM reads and writes in plaintext through :class:`DmaMemory`.

Items, as QEMU 7.2 (Debian bookworm's, of edk2-stable202211's time) offers them to a
``-machine pc -nodefaults -nographic`` guest under KVM with no ``-kernel``:

- numbered: signature, ID (traditional | DMA), UUID (zeros without ``-uuid``),
  RAM size, nographic, boot CPUs, NUMA (no nodes), boot menu (off), APIC ID limit;
- x86 (``fw_cfg_arch_create``): IRQ0 override, the legacy reserved-only E820 table
  (0x8003, dropped by QEMU 8.2), HPET. The ACPI-tables item (0x8000) is empty without
  ``-acpitable`` and reads exactly like an absent one; SMBIOS entries (0x8001) exist
  only for pre-2.1 machine types. OVMF reads none of the x86 items;
- the kernel, initrd and command-line items exist only with ``-kernel``: absent, they
  read as zeros, which OVMF's QemuKernelLoaderFsDxe takes for "no kernel";
- files, sorted by name as ``fw_cfg_add_file`` sorts them for machine types newer
  than 2.5, from selector 0x20: ``bios-geometry`` and ``bootorder`` (empty: no
  bootindex devices; QEMU adds them at reset, OVMF treats empty as absent),
  ``etc/boot-fail-wait``, ``etc/e820``, ``etc/system-states``.

Files a QEMU ``pc`` has that this machine does not: ``etc/acpi/*`` and
``etc/table-loader`` (with edk2-stable202211 AcpiPlatformDxe then installs no ACPI
tables at all: its built-in fallback tables are gone, and only the loader script is
looked for; the UEFI Shell does not need them, and ``reset -s`` writes PIIX4's
PM1a_CNT directly), ``etc/smbios/*`` (SmbiosPlatformDxe then installs nothing),
``genroms/kvmvapic.bin``. Absent as in QEMU for this configuration:
``etc/reserved-memory-end`` (no ``maxmem``), ``etc/msr_feature_control`` (AMD: no
VMX, LMCE or SGX), ``opt/ovmf/*``. :meth:`FwCfg.add_file` offers more.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from enum import IntEnum, IntFlag
from typing import Protocol

from sevsim.errors import GuestMemoryError, SevsimError
from sevsim.vmm.firmware import FOUR_GIB

FW_CFG_IO_BASE = 0x510
#: Selector/data (2 ports), a 2-port gap, the 8-byte DMA address register.
FW_CFG_IO_SIZE = 12

#: The DMA interface's signature, readable from its address register.
DMA_SIGNATURE = b"QEMU CFG"
#: Item 1: bit 0 the traditional (port) interface, bit 1 DMA.
FW_CFG_VERSION = 0x01
FW_CFG_VERSION_DMA = 0x02

ARCH_LOCAL = 0x8000
#: Selector bits that index an item (bit 14 is the long-gone write channel).
ENTRY_MASK = 0x3FFF
#: QEMU's default number of file slots: selectors 0x20..0x3F.
FILE_SLOTS = 0x20
#: A directory entry's name field, NUL included.
FILE_NAME_SIZE = 56
_DIR_ENTRY = struct.Struct(">IHH56s")

#: KVM's EPT identity map and TSS pages that QEMU's ``kvm_arch_init`` reserves in the
#: E820 map before the machine adds its RAM (``identity_base`` = 0xfeffc000), on AMD
#: hosts as well.
KVM_IDENTITY_MAP = (0xFEFF_C000, 0x4000)
#: The i440fx split (``pc_init1``): RAM up to 3.5 GiB stays below 4 GiB; more moves
#: everything above 3 GiB (gigabyte-aligned) to 4 GiB and up.
_LOWMEM_MAX = 0xE000_0000
_LOWMEM_SPLIT = 0xC000_0000

#: QEMU's HPET as the pc machine creates it: 3 timers, ``capability`` low half
#: 0x8086a001 | (timers - 1) << 8, at 0xfed00000.
_HPET_BLOCK_ID = 0x8086_A201
_HPET_BASE = 0xFED0_0000
_HPET_SLOTS = 8
_HPET_ENTRY = struct.Struct("<IQHB")
#: ``hpet_cfg.count`` while no HPET exists.
_HPET_NONE = 0xFF
_E820_LEGACY_SLOTS = 16
_E820_ENTRY = struct.Struct("<QQI")
#: Largest zero-fill a DMA read past an item's end writes at once.
_FILL_CHUNK = 1 << 16

# The port window as QEMU's IO address space has it: (start, end, widest access).
_COMB, _GAP, _DMA = (0, 2, 4), (2, 4, 4), (4, 12, 8)
_REGIONS = (_COMB, _GAP, _DMA)


class FwCfgError(SevsimError):
    """The machine configured fw_cfg with something QEMU would refuse."""


class FwCfgKey(IntEnum):
    """The selectors this machine offers (QEMU's ``FW_CFG_*``)."""

    SIGNATURE = 0x00
    ID = 0x01
    UUID = 0x02
    RAM_SIZE = 0x03
    NOGRAPHIC = 0x04
    NB_CPUS = 0x05
    NUMA = 0x0D
    BOOT_MENU = 0x0E
    MAX_CPUS = 0x0F
    FILE_DIR = 0x19
    FILE_FIRST = 0x20
    IRQ0_OVERRIDE = 0x8002
    E820_TABLE = 0x8003
    HPET = 0x8004


class DmaControl(IntFlag):
    """``FWCfgDmaAccess.control`` bits; the selector rides in bits 31..16."""

    ERROR = 0x01
    READ = 0x02
    SKIP = 0x04
    SELECT = 0x08
    WRITE = 0x10


class E820Type(IntEnum):
    RAM = 1
    RESERVED = 2


class DmaMemory(Protocol):
    """Guest-physical memory as the VMM sees it (plaintext of shared pages).

    Both raise :class:`~sevsim.errors.GuestMemoryError` for a range outside RAM; the
    transfer then reports an error to the guest, as QEMU's ``dma_memory_*`` do.
    """

    def read(self, gpa: int, size: int) -> bytes: ...

    def write(self, gpa: int, data: bytes) -> None: ...


def i440fx_ram_ranges(ram_size: int) -> tuple[tuple[int, int], ...]:
    """Where QEMU's i440fx ``pc`` puts ``ram_size`` bytes: (gpa, size) pairs."""
    if ram_size <= 0:
        raise FwCfgError(f"RAM size {ram_size:#x} is not a positive number of bytes")
    if ram_size < _LOWMEM_MAX:
        return ((0, ram_size),)
    return ((0, _LOWMEM_SPLIT), (FOUR_GIB, ram_size - _LOWMEM_SPLIT))


def system_states(disable_s3: bool = False, disable_s4: bool = False) -> bytes:
    """``etc/system-states`` as QEMU's ``acpi_pm1_cnt_init`` builds it for PIIX4.

    One byte per state S0..S5: bit 7 set if the state is offered, bits 2..0 the
    SLP_TYP value PM1a_CNT takes for it (PIIX4: S3 = 1, S4 = 2). PIIX4_PM's defaults
    offer S3 and S4; OVMF's PlatformPei supports S3 resume when byte 3 has bit 7.
    """
    return bytes((0x80, 0, 0, 1 | (not disable_s3) << 7, 2 | (not disable_s4) << 7, 0x80))


def _le(value: int, size: int) -> bytes:
    return value.to_bytes(size, "little")


def _e820_table(ram: Sequence[tuple[int, int]]) -> tuple[bytes, bytes]:
    """``etc/e820`` (every entry) and item 0x8003 (count, then the reserved ones)."""
    reserved = [_E820_ENTRY.pack(*KVM_IDENTITY_MAP, E820Type.RESERVED)]
    usable = [_E820_ENTRY.pack(gpa, size, E820Type.RAM) for gpa, size in ram]
    legacy = _le(len(reserved), 4) + b"".join(reserved)
    legacy = legacy.ljust(4 + _E820_LEGACY_SLOTS * _E820_ENTRY.size, b"\0")
    return b"".join(reserved + usable), legacy


def _hpet_config(hpet: bool) -> bytes:
    """Item 0x8004, QEMU's ``struct hpet_fw_config``: a count, then 8 timer blocks."""
    if hpet:
        config = b"\x01" + _HPET_ENTRY.pack(_HPET_BLOCK_ID, _HPET_BASE, 0, 0)
    else:
        config = bytes((_HPET_NONE,))
    return config.ljust(1 + _HPET_SLOTS * _HPET_ENTRY.size, b"\0")


def _check_ram(ram: Sequence[tuple[int, int]]) -> None:
    end = 0
    for gpa, size in ram:
        if size <= 0 or gpa < end:
            raise FwCfgError(
                f"RAM range ({gpa:#x}, {size:#x}) is empty or overlaps/precedes the one "
                f"before it; expected ascending, disjoint (gpa, size) pairs"
            )
        end = gpa + size
    if not ram:
        raise FwCfgError("no RAM ranges: expected at least one (gpa, size) pair")


def _access_pieces(offset: int, size: int) -> Iterator[tuple[tuple[int, int, int], int, int]]:
    """The accesses QEMU's memory core makes of one port access: (region, offset, size)."""
    while size:
        region = next(r for r in _REGIONS if r[0] <= offset < r[1])
        start, end, widest = region
        length = min(size, end - offset, widest)
        if offset != start:
            length = min(length, (offset - start) & -(offset - start))
        length = 1 << (length.bit_length() - 1)
        yield region, offset, length
        offset += length
        size -= length


class FwCfg:
    """The fw_cfg items of one machine and the port/DMA interface that serves them."""

    __slots__ = ("_data", "_dma_address", "_files", "_items", "_offset", "memory", "name")

    def __init__(
        self,
        memory: DmaMemory,
        ram: Sequence[tuple[int, int]],
        cpus: int,
        *,
        max_cpus: int | None = None,
        uuid: bytes = bytes(16),
        disable_s3: bool = False,
        disable_s4: bool = False,
        hpet: bool = True,
        name: str = "fw_cfg",
    ) -> None:
        """``ram``: the machine's RAM as ascending (gpa, size) pairs (see
        :func:`i440fx_ram_ranges`); ``cpus`` boot vCPUs, ``max_cpus`` the APIC ID limit
        (APIC IDs are CPU indexes here); ``hpet``: whether the machine has QEMU's HPET."""
        max_cpus = cpus if max_cpus is None else max_cpus
        if not 1 <= cpus <= max_cpus <= 0xFFFF:
            raise FwCfgError(
                f"cpus={cpus}, max_cpus={max_cpus}: expected 1 <= cpus <= max_cpus <= 65535"
            )
        if len(uuid) != 16:
            raise FwCfgError(f"UUID {uuid!r} is {len(uuid)} bytes; expected 16")
        _check_ram(ram)
        e820, e820_legacy = _e820_table(ram)
        self.name = name
        self.memory = memory
        self._items: dict[int, bytes] = {
            FwCfgKey.SIGNATURE: b"QEMU",
            FwCfgKey.ID: _le(FW_CFG_VERSION | FW_CFG_VERSION_DMA, 4),
            FwCfgKey.UUID: bytes(uuid),
            FwCfgKey.RAM_SIZE: _le(sum(size for _, size in ram), 8),
            FwCfgKey.NOGRAPHIC: _le(1, 2),  # no display: as -nographic
            FwCfgKey.NB_CPUS: _le(cpus, 2),
            FwCfgKey.NUMA: bytes(8 * (1 + max_cpus)),
            FwCfgKey.BOOT_MENU: _le(0, 2),
            FwCfgKey.MAX_CPUS: _le(max_cpus, 2),
            FwCfgKey.IRQ0_OVERRIDE: _le(1, 4),
            FwCfgKey.E820_TABLE: e820_legacy,
            FwCfgKey.HPET: _hpet_config(hpet),
        }
        self._files: dict[bytes, bytes] = {}
        for file, data in {
            "bios-geometry": b"",
            "bootorder": b"",
            "etc/boot-fail-wait": _le(0xFFFF_FFFF, 4),  # no -boot reboot-timeout: -1
            "etc/e820": e820,
            "etc/system-states": system_states(disable_s3, disable_s4),
        }.items():
            self.add_file(file, data)
        self._dma_address = 0
        self.reset()

    def add_file(self, name: str, data: bytes) -> None:
        """Offer ``data`` as file ``name``; the directory stays sorted by name, so the
        files after it move up one selector (as in QEMU, add files before the guest
        runs)."""
        raw = name.encode()
        if not raw or len(raw) >= FILE_NAME_SIZE or b"\0" in raw:
            raise FwCfgError(
                f"fw_cfg file name {name!r}: expected 1..{FILE_NAME_SIZE - 1} bytes, no NUL"
            )
        if raw in self._files:
            raise FwCfgError(f"duplicate fw_cfg file name {name!r}")
        if len(self._files) == FILE_SLOTS:
            raise FwCfgError(f"no slot for fw_cfg file {name!r}: all {FILE_SLOTS} are taken")
        if len(data) >= 1 << 32:
            raise FwCfgError(f"fw_cfg file {name!r} is {len(data)} bytes; at most 4 GiB - 1")
        self._files[raw] = bytes(data)
        directory = bytearray(len(self._files).to_bytes(4, "big"))
        for index, file in enumerate(sorted(self._files)):
            selector = FwCfgKey.FILE_FIRST + index
            self._items[selector] = self._files[file]
            directory += _DIR_ENTRY.pack(len(self._files[file]), selector, 0, file)
        self._items[FwCfgKey.FILE_DIR] = bytes(
            directory.ljust(4 + FILE_SLOTS * _DIR_ENTRY.size, b"\0")
        )

    def reset(self) -> None:
        """System reset: QEMU's ``fw_cfg_reset`` selects the signature."""
        self._select(FwCfgKey.SIGNATURE)

    # -- ports ------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        if size == 1 and 0 <= offset < _COMB[1]:
            return self._stream_byte()  # the hot path: one byte of OVMF's rep insb
        if offset < 0 or offset + size > FW_CFG_IO_SIZE:
            return b"\xff" * size
        return b"".join(self._read_piece(r, o, n) for r, o, n in _access_pieces(offset, size))

    def write(self, offset: int, data: bytes) -> None:
        if offset < 0 or offset + len(data) > FW_CFG_IO_SIZE:
            return
        for region, at, length in _access_pieces(offset, len(data)):
            piece = data[at - offset : at - offset + length]
            if region is _COMB and length == 2:
                self._select(int.from_bytes(piece, "little"))
            elif region is _DMA:
                self._dma_register_write(at - _DMA[0], int.from_bytes(piece, "big"), length)

    def _read_piece(self, region: tuple[int, int, int], offset: int, size: int) -> bytes:
        if region is _COMB:
            return self._stream_byte() if size == 1 else bytes(size)
        if region is _GAP:
            return b"\xff" * size
        return DMA_SIGNATURE[offset - _DMA[0] : offset - _DMA[0] + size]

    def _select(self, key: int) -> None:
        self._offset = 0
        if key & ENTRY_MASK >= FwCfgKey.FILE_FIRST + FILE_SLOTS:
            self._data = b""
        else:
            self._data = self._items.get(key & (ARCH_LOCAL | ENTRY_MASK), b"")

    def _stream_byte(self) -> bytes:
        offset = self._offset
        if offset < len(self._data):
            self._offset = offset + 1
            return self._data[offset : offset + 1]
        return b"\0"

    # -- DMA --------------------------------------------------------------------------

    def _dma_register_write(self, offset: int, value: int, size: int) -> None:
        if size == 4 and offset == 0:
            self._dma_address = value << 32
        elif size == 4 and offset == 4:
            self._dma_address |= value
            self._dma_transfer()
        elif size == 8 and offset == 0:
            self._dma_address = value
            self._dma_transfer()

    def _dma_transfer(self) -> None:
        access, self._dma_address = self._dma_address, 0
        try:
            control, length, address = struct.unpack(">IIQ", self.memory.read(access, 16))
        except GuestMemoryError:
            self._dma_finish(access, DmaControl.ERROR)
            return
        if control & DmaControl.SELECT:
            self._select(control >> 16)
        if control & DmaControl.READ:
            mode = DmaControl.READ
        elif control & DmaControl.WRITE:
            mode = DmaControl.WRITE
        else:
            mode = DmaControl.SKIP
            length = length if control & DmaControl.SKIP else 0
        status = DmaControl(0)
        while length and not status:
            chunk = self._data[self._offset : self._offset + length]
            count = len(chunk) or length
            if mode is DmaControl.WRITE:
                status = DmaControl.ERROR  # every item here is read-only, as QEMU adds them
            elif mode is DmaControl.READ:
                status = self._dma_store(address, chunk or None, count)
            self._offset += len(chunk)
            address += count
            length -= count
        self._dma_finish(access, status)

    def _dma_store(self, gpa: int, data: bytes | None, count: int) -> DmaControl:
        """Write ``data``, or ``count`` zeros (reading past the item's end)."""
        try:
            if data is not None:
                self.memory.write(gpa, data)
            else:
                for at in range(0, count, _FILL_CHUNK):
                    self.memory.write(gpa + at, bytes(min(_FILL_CHUNK, count - at)))
        except GuestMemoryError:
            return DmaControl.ERROR
        return DmaControl(0)

    def _dma_finish(self, access: int, status: DmaControl) -> None:
        try:
            self.memory.write(access, int(status).to_bytes(4, "big"))
        except GuestMemoryError:
            pass  # QEMU's stl_be_dma ignores a failed write-back too
