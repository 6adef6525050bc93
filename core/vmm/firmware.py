"""Firmware images as QEMU maps them (pflash / -bios), and OVMF's GUIDed footer table.

QEMU maps the system firmware so that it ends at 4 GiB: the last 16 bytes hold the
reset vector the BSP fetches at 0xfffffff0. OVMF tells the VMM where the rest of its
SEV support lives through a table just before its end: it ends 32 bytes before the
end of the image with a footer entry, and every entry is ``data || u16 size || GUID``
(GUIDs in EFI byte order), read backwards from the footer; ``size`` covers the whole
entry and the footer's ``size`` the whole table. For SEV-ES the VMM needs one entry:
the reset block, which gives the address where APs start (they cannot be sent to
the reset vector, since the hypervisor can no longer set their registers).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from enum import IntEnum
from pathlib import Path
from types import MappingProxyType
from uuid import UUID

from attrs import field, frozen

from sevsim.errors import SevsimError

FOUR_GIB = 1 << 32
#: pflash images must be a whole number of 4 KiB sectors.
FLASH_SECTOR_SIZE = 0x1000
#: QEMU maps at most 8 MiB of flash below 4 GiB (the pc machine's max-fw-size).
MAX_FIRMWARE_SIZE = 8 << 20
#: The table ends this many bytes before the end of the image.
FOOTER_END_OFFSET = 32
#: ``u16 size`` followed by a 16-byte GUID closes every entry.
ENTRY_TRAILER_SIZE = 2 + 16
#: The reset vector: the last 16 bytes of the image, at 0xfffffff0.
RESET_VECTOR_SIZE = 16

OVMF_TABLE_FOOTER_GUID = UUID("96b582de-1fb2-45f7-baea-a366c55a082d")
SEV_ES_RESET_BLOCK_GUID = UUID("00f771de-1a7e-4fcb-890e-68c77e2fb44e")
SEV_METADATA_GUID = UUID("dc886566-984a-4798-a75e-5585a7bf67cc")
SEV_HASH_TABLE_GUID = UUID("7255371f-3a3b-4b04-927b-1da6efa8d454")

#: OVMF's SEV metadata header: "ASEV", total size, version, number of sections.
SEV_METADATA_SIGNATURE = b"ASEV"
SEV_METADATA_HEADER = struct.Struct("<4sIII")
SEV_METADATA_SECTION = struct.Struct("<III")


class FirmwareError(SevsimError):
    """A firmware image is unusable: wrong size, malformed or missing table entries."""


class SevSectionType(IntEnum):
    """Kinds of ranges OVMF's SEV metadata describes (used by SEV-SNP launches)."""

    SNP_SEC_MEM = 1
    SNP_SECRETS = 2
    CPUID = 3
    SVSM_CAA = 4
    SNP_KERNEL_HASHES = 0x10


@frozen
class SevMetadataSection:
    gpa: int
    size: int
    kind: SevSectionType


@frozen
class GpaRange:
    gpa: int
    size: int


@frozen
class FirmwareImage:
    """A firmware image and its footer table (empty when the image has none)."""

    name: str
    data: bytes = field(repr=False)
    table: Mapping[UUID, bytes] = field(repr=False)

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def gpa(self) -> int:
        """Where the image starts: it ends at 4 GiB."""
        return FOUR_GIB - self.size

    def entry(self, guid: UUID, what: str) -> bytes:
        """The data of the footer entry ``guid``; ``what`` names it in the error."""
        data = self.table.get(guid)
        if data is None:
            if not self.table:
                why = f"has no OVMF footer table (GUID {OVMF_TABLE_FOOTER_GUID})"
            else:
                why = f"has no {what} entry (GUID {guid}) in its footer table"
            raise FirmwareError(f"firmware {self.name} {why}; use an OVMF build with SEV support")
        return data

    def sev_es_reset_eip(self) -> int:
        """Where QEMU starts SEV-ES APs: the first 4 bytes of the SEV-ES reset block."""
        data = self._sized_entry(SEV_ES_RESET_BLOCK_GUID, "SEV-ES reset block", 4)
        eip = int.from_bytes(data[:4], "little")
        if eip == 0:
            raise FirmwareError(f"firmware {self.name}: the SEV-ES reset block holds address 0")
        return eip

    def sev_hash_table(self) -> GpaRange:
        """Where the VMM may place kernel/initrd/cmdline hashes (0, 0 when not reserved)."""
        data = self._sized_entry(SEV_HASH_TABLE_GUID, "SEV hash table", 8)
        return GpaRange(*struct.unpack_from("<II", data))

    def sev_metadata(self) -> tuple[SevMetadataSection, ...]:
        """The sections of OVMF's SEV metadata (located by its offset from the image end)."""
        what = "SEV metadata"
        offset = int.from_bytes(self._sized_entry(SEV_METADATA_GUID, what, 4)[:4], "little")
        start = self.size - offset
        if not 0 <= start <= self.size - SEV_METADATA_HEADER.size:
            raise FirmwareError(
                f"firmware {self.name}: {what} offset {offset:#x} from the end points "
                f"outside the {self.size:#x}-byte image"
            )
        signature, total, version, count = SEV_METADATA_HEADER.unpack_from(self.data, start)
        if signature != SEV_METADATA_SIGNATURE or version != 1:
            raise FirmwareError(
                f"firmware {self.name}: {what} at {start:#x} has signature {signature!r} "
                f"version {version}, expected {SEV_METADATA_SIGNATURE!r} version 1"
            )
        needed = SEV_METADATA_HEADER.size + count * SEV_METADATA_SECTION.size
        if total < needed or start + total > self.size:
            raise FirmwareError(
                f"firmware {self.name}: {what} size {total:#x} cannot hold {count} sections "
                f"(needs {needed:#x}) within the image"
            )
        sections = []
        for i in range(count):
            pos = start + SEV_METADATA_HEADER.size + i * SEV_METADATA_SECTION.size
            gpa, size, kind = SEV_METADATA_SECTION.unpack_from(self.data, pos)
            try:
                sections.append(SevMetadataSection(gpa, size, SevSectionType(kind)))
            except ValueError:
                raise FirmwareError(
                    f"firmware {self.name}: {what} section {i} has unknown type {kind:#x}"
                ) from None
        return tuple(sections)

    def _sized_entry(self, guid: UUID, what: str, min_size: int) -> bytes:
        data = self.entry(guid, what)
        if len(data) < min_size:
            raise FirmwareError(
                f"firmware {self.name}: {what} entry has {len(data)} bytes, expected {min_size}"
            )
        return data


def _check_size(name: str, size: int) -> None:
    if size == 0 or size % FLASH_SECTOR_SIZE:
        raise FirmwareError(
            f"firmware {name} is {size:#x} bytes; it must be a non-zero multiple of "
            f"{FLASH_SECTOR_SIZE:#x} (QEMU maps it as 4 KiB flash sectors)"
        )
    if size > MAX_FIRMWARE_SIZE:
        raise FirmwareError(
            f"firmware {name} is {size:#x} bytes; at most {MAX_FIRMWARE_SIZE:#x} fit below 4 GiB"
        )


def parse_footer_table(name: str, data: bytes) -> dict[UUID, bytes]:
    """The entries of OVMF's footer table by GUID; {} when the image has no footer.

    QEMU also silently accepts images without the table; where an entry is needed,
    :meth:`FirmwareImage.entry` says it is missing. A GUID that appears twice keeps
    the entry nearest the footer, the one QEMU's backwards search finds.
    """
    footer_end = len(data) - FOOTER_END_OFFSET
    footer_start = footer_end - ENTRY_TRAILER_SIZE
    if footer_start < 0:
        return {}
    table_size, guid = _trailer(data, footer_end)
    if guid != OVMF_TABLE_FOOTER_GUID:
        return {}
    if not ENTRY_TRAILER_SIZE <= table_size <= footer_end:
        raise FirmwareError(
            f"firmware {name}: footer table size {table_size:#x} must be "
            f"{ENTRY_TRAILER_SIZE:#x}..{footer_end:#x}"
        )
    table_start = footer_end - table_size
    entries: dict[UUID, bytes] = {}
    end = footer_start
    while end > table_start:
        if end - table_start < ENTRY_TRAILER_SIZE:
            raise FirmwareError(
                f"firmware {name}: {end - table_start} stray bytes at {table_start:#x} "
                "at the start of the footer table"
            )
        size, guid = _trailer(data, end)
        if not ENTRY_TRAILER_SIZE <= size <= end - table_start:
            raise FirmwareError(
                f"firmware {name}: footer entry {guid} ending at {end:#x} has size {size:#x}, "
                f"expected {ENTRY_TRAILER_SIZE:#x}..{end - table_start:#x}"
            )
        entries.setdefault(guid, bytes(data[end - size : end - ENTRY_TRAILER_SIZE]))
        end -= size
    return entries


def _trailer(data: bytes, end: int) -> tuple[int, UUID]:
    """The ``u16 size || GUID`` that ends an entry at ``end``."""
    size = int.from_bytes(data[end - ENTRY_TRAILER_SIZE : end - 16], "little")
    return size, UUID(bytes_le=bytes(data[end - 16 : end]))


def parse_firmware(data: bytes, name: str = "<bytes>") -> FirmwareImage:
    """A firmware image from its bytes; ``name`` labels it in error messages."""
    _check_size(name, len(data))
    table = parse_footer_table(name, data)
    return FirmwareImage(name, bytes(data), MappingProxyType(table))


def load_firmware(path: str | Path) -> FirmwareImage:
    """Read a firmware file (e.g. OVMF_CODE.fd) as QEMU would map it."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FirmwareError(f"cannot read firmware {path}: {exc.strerror}") from exc
    return parse_firmware(data, str(path))


def _entry(guid: UUID, data: bytes) -> bytes:
    return data + (len(data) + ENTRY_TRAILER_SIZE).to_bytes(2, "little") + guid.bytes_le


def build_firmware_image(
    ap_reset_eip: int,
    reset_vector: bytes,
    *,
    size: int = 0x10000,
    code: Mapping[int, bytes] = MappingProxyType({}),
    entries: Sequence[tuple[UUID, bytes]] = (),
) -> bytes:
    """A synthetic firmware image with OVMF's footer table, for tests and demos.

    The table holds ``entries`` and an SEV-ES reset block for ``ap_reset_eip``;
    ``reset_vector`` (at most 16 bytes) lands at 0xfffffff0 and each ``code`` blob at
    its guest-physical address inside the image. Everything else is zero.
    """
    name = "synthetic image"
    _check_size(name, size)
    if len(reset_vector) > RESET_VECTOR_SIZE:
        raise FirmwareError(
            f"{name}: reset vector is {len(reset_vector)} bytes; only "
            f"{RESET_VECTOR_SIZE} fit between 0xfffffff0 and 4 GiB"
        )
    if not 0 < ap_reset_eip < FOUR_GIB:
        raise FirmwareError(f"{name}: AP reset address {ap_reset_eip:#x} must be 1..4 GiB-1")
    body = b"".join(_entry(guid, data) for guid, data in entries)
    body += _entry(SEV_ES_RESET_BLOCK_GUID, ap_reset_eip.to_bytes(4, "little"))
    table = _entry(OVMF_TABLE_FOOTER_GUID, body)  # the footer's size covers the whole table
    reserved_start = size - FOOTER_END_OFFSET - len(table)
    if len(table) > 0xFFFF or reserved_start < 0:
        raise FirmwareError(f"{name}: a {len(table):#x}-byte footer table does not fit")
    image = bytearray(size)
    image[reserved_start : size - FOOTER_END_OFFSET] = table
    image[size - RESET_VECTOR_SIZE : size - RESET_VECTOR_SIZE + len(reset_vector)] = reset_vector
    base = FOUR_GIB - size
    for gpa, blob in code.items():
        offset = gpa - base
        if offset < 0 or offset + len(blob) > reserved_start:
            raise FirmwareError(
                f"{name}: code at {gpa:#x} (+{len(blob):#x}) must lie within "
                f"[{base:#x}, {base + reserved_start:#x}), below the footer table"
            )
        image[offset : offset + len(blob)] = blob
    return bytes(image)
