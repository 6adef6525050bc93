"""The GHCB page: ``struct ghcb_save_area`` plus shared buffer, version and usage.

The GHCB is the one place where an SEV-ES guest hands register values to the
hypervisor. A field counts only if its bit in ``valid_bitmap`` is set; the bit index
is the field's offset within the save area divided by 8 (Linux's ``GHCB_BITMAP_IDX``).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from sevsim.arch.layout import FieldReader, Layout
from sevsim.errors import LayoutError

GHCB_PAGE_SIZE = 4096

# fmt: off
GHCB_SAVE_AREA = Layout.build("ghcb_save_area", 1032, [
    ("reserved_0x0", 0x0, "u8[203]"), ("cpl", 0xcb, "u8"), ("reserved_0xcc", 0xcc, "u8[116]"),
    ("xss", 0x140, "u64"), ("reserved_0x148", 0x148, "u8[24]"), ("dr7", 0x160, "u64"),
    ("reserved_0x168", 0x168, "u8[16]"), ("rip", 0x178, "u64"),
    ("reserved_0x180", 0x180, "u8[88]"), ("rsp", 0x1d8, "u64"),
    ("reserved_0x1e0", 0x1e0, "u8[24]"), ("rax", 0x1f8, "u64"),
    ("reserved_0x200", 0x200, "u8[264]"),
    ("rcx", 0x308, "u64"), ("rdx", 0x310, "u64"), ("rbx", 0x318, "u64"),
    ("reserved_0x320", 0x320, "u8[8]"),
    ("rbp", 0x328, "u64"), ("rsi", 0x330, "u64"), ("rdi", 0x338, "u64"),
    ("r8", 0x340, "u64"), ("r9", 0x348, "u64"), ("r10", 0x350, "u64"), ("r11", 0x358, "u64"),
    ("r12", 0x360, "u64"), ("r13", 0x368, "u64"), ("r14", 0x370, "u64"), ("r15", 0x378, "u64"),
    ("reserved_0x380", 0x380, "u8[16]"),
    ("sw_exit_code", 0x390, "u64"), ("sw_exit_info_1", 0x398, "u64"),
    ("sw_exit_info_2", 0x3a0, "u64"), ("sw_scratch", 0x3a8, "u64"),
    ("reserved_0x3b0", 0x3b0, "u8[56]"), ("xcr0", 0x3e8, "u64"),
    ("valid_bitmap", 0x3f0, "u8[16]"), ("x87_state_gpa", 0x400, "u64"),
])

GHCB = Layout.build("ghcb", GHCB_PAGE_SIZE, [
    ("save", 0x0, "ghcb_save_area"), ("reserved_save", 0x408, "u8[1016]"),
    ("shared_buffer", 0x800, "u8[2032]"), ("reserved_0xff0", 0xff0, "u8[10]"),
    ("protocol_version", 0xffa, "u16"), ("ghcb_usage", 0xffc, "u32"),
], nested={"ghcb_save_area": GHCB_SAVE_AREA})
# fmt: on

SHARED_BUFFER_START = GHCB.offset("shared_buffer")
SHARED_BUFFER_END = SHARED_BUFFER_START + GHCB["shared_buffer"].size  # exclusive, 0xff0
GHCB_SCRATCH_AREA_LIMIT = 16 * 4096
GHCB_USAGE_DEFAULT = 0
_BITMAP = GHCB_SAVE_AREA.offset("valid_bitmap")

#: Save-area fields that may carry a value: every integer field except the bitmap itself.
REGISTER_FIELDS = tuple(f.name for f in GHCB_SAVE_AREA.fields if f.is_int)


#: Integer fields of the page by name (a save-area name first, as :class:`Ghcb` looks
#: them up): (offset in the page, compiled struct, largest value). Derived from the
#: layouts once: a field access is one dict lookup and one struct call.
INT_FIELDS: dict[str, tuple[int, struct.Struct, int]] = {
    f.name: (layout.offset(f.name), struct.Struct(f.fmt), (1 << (8 * f.size)) - 1)
    for layout in (GHCB, GHCB_SAVE_AREA) for f in layout.fields if f.fmt is not None
}  # fmt: skip
#: Save-area field -> (byte of the valid bitmap in the page, bit mask in that byte).
VALID_BITS: dict[str, tuple[int, int]] = {
    f.name: (_BITMAP + f.offset // 8 // 8, 1 << (f.offset // 8 % 8)) for f in GHCB_SAVE_AREA.fields
}


#: The request's exit code and info, read with one struct call.
GHCB_EXIT = GHCB_SAVE_AREA.group("sw_exit_code", "sw_exit_info_1", "sw_exit_info_2")
#: Every field of the page by name, a save-area name first (the save area is at offset
#: 0, so each field's offset is its offset in the page).
_PAGE_FIELDS = {f.name: f for layout in (GHCB, GHCB_SAVE_AREA) for f in layout.fields}


def page_reader(*names: str) -> FieldReader:
    """A :class:`~sevsim.arch.layout.FieldReader` of fields anywhere in the page (the
    valid bitmap comes out as its 16 bytes): what KVM reads of each request, in one
    struct call."""
    unknown = [name for name in names if name not in _PAGE_FIELDS]
    if unknown:
        raise LayoutError(f"{GHCB.name} has no field(s) {unknown}")
    return FieldReader(_PAGE_FIELDS[name] for name in names)


def valid_bit(name: str) -> int:
    """The valid-bitmap bit index of a save-area field (``GHCB_BITMAP_IDX``)."""
    return GHCB_SAVE_AREA.offset(name) // 8


def valid_mask(names: Iterable[str]) -> int:
    """The bits of ``names`` in the valid bitmap read as one little-endian integer: a
    set of fields checked with one AND."""
    mask = 0
    for name in names:
        mask |= 1 << valid_bit(name)
    return mask


class Ghcb:
    """A GHCB page held as bytes: typed fields, valid bits, and the raw page.

    The hypervisor side builds one from the bytes it reads at the guest's GHCB GPA
    (a shared page) and writes ``raw`` back; guest-side code does the same from the
    guest's view. Reading a field does not check its valid bit: callers that must
    honour the bitmap (KVM's ``sev_es_sync_from_ghcb``) use :meth:`get_if_valid`.
    """

    __slots__ = ("raw",)

    def __init__(self, raw: bytes | bytearray | None = None) -> None:
        self.raw = bytearray(raw if raw is not None else GHCB_PAGE_SIZE)
        if len(self.raw) != GHCB_PAGE_SIZE:
            raise ValueError(f"a GHCB page is {GHCB_PAGE_SIZE} bytes, got {len(self.raw)}")

    def __getitem__(self, name: str) -> int:
        codec = INT_FIELDS.get(name)
        if codec is not None:
            return codec[1].unpack_from(self.raw, codec[0])[0]
        if name in GHCB_SAVE_AREA:
            return GHCB_SAVE_AREA.get(self.raw, name)
        return GHCB.get(self.raw, name)

    def __setitem__(self, name: str, value: int) -> None:
        """Write a field; save-area fields also get their valid bit, as ``ghcb_set_*`` does."""
        codec = INT_FIELDS.get(name)
        if codec is not None and isinstance(value, int) and 0 <= value <= codec[2]:
            codec[1].pack_into(self.raw, codec[0], value)
            if name in VALID_BITS:
                self.set_valid(name)
        elif name in GHCB_SAVE_AREA:  # and the layout's errors for a bad name or value
            GHCB_SAVE_AREA.set(self.raw, name, value)
            self.set_valid(name)
        else:
            GHCB.set(self.raw, name, value)

    def is_valid(self, name: str) -> bool:
        at = VALID_BITS.get(name)
        if at is None:
            valid_bit(name)  # the layout's error for an unknown name
            return False
        return bool(self.raw[at[0]] & at[1])

    def set_valid(self, name: str, valid: bool = True) -> None:
        at = VALID_BITS.get(name)
        if at is None:
            raise LayoutError(f"{GHCB_SAVE_AREA.name} has no field {name!r}")
        if valid:
            self.raw[at[0]] |= at[1]
        else:
            self.raw[at[0]] &= ~at[1] & 0xFF

    def get_if_valid(self, name: str) -> int:
        """The field's value if its valid bit is set, else 0 (KVM's ``kvm_ghcb_get_*_if_valid``)."""
        return self[name] if self.is_valid(name) else 0

    @property
    def valid_bitmap(self) -> int:
        return int.from_bytes(self.raw[_BITMAP : _BITMAP + 16], "little")

    @valid_bitmap.setter
    def valid_bitmap(self, value: int) -> None:
        self.raw[_BITMAP : _BITMAP + 16] = value.to_bytes(16, "little")

    def valid_fields(self) -> tuple[str, ...]:
        return tuple(name for name in REGISTER_FIELDS if self.is_valid(name))
