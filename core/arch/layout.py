"""Byte layouts as data: one table per structure, every accessor derived from it.

A :class:`Layout` is built from ``(name, offset, type)`` rows copied from Linux's
``arch/x86/include/asm/svm.h``. Types are ``u8``/``u16``/``u32``/``u64`` (read and
written as little-endian integers), ``u8[N]`` (raw bytes) or the name of another
layout (a nested struct, raw bytes at this level). Sizes follow from the types, and
the table refuses gaps and overlaps, so a wrong row fails at import time, not as a
silently shifted field.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from itertools import pairwise
from typing import Any

from attrs import field, frozen

from sevsim.errors import LayoutError

_INT_FORMATS = {"u8": "<B", "u16": "<H", "u32": "<I", "u64": "<Q"}
_ARRAY = re.compile(r"^u8\[(\d+)\]$")


@frozen
class Field:
    """One field of a layout: where it is, how big, and how to read it."""

    name: str
    offset: int
    size: int
    type: str
    #: struct format for integer fields, None for byte arrays and nested structs.
    fmt: str | None = field(default=None, repr=False)

    @property
    def is_int(self) -> bool:
        return self.fmt is not None


class FieldGroup:
    """Adjacent integer fields of a layout, read or written together with one compiled
    struct: what a path that runs on every exit uses instead of one :meth:`Layout.get`
    or :meth:`Layout.set` per field. Values are not range-checked beyond what
    ``struct`` checks; :meth:`Layout.set` is the checked way.

    ``get(buf)`` is the struct's own ``unpack_from`` with the offset bound (no Python
    frame); ``set(buf, *values)`` packs them in."""

    __slots__ = ("codec", "get", "names", "offset")

    def __init__(self, names: tuple[str, ...], offset: int, codec: struct.Struct) -> None:
        self.names = names
        self.offset = offset
        self.codec = codec
        self.get: Callable[[bytes | bytearray | memoryview], tuple[int, ...]] = partial(
            codec.unpack_from, offset=offset)  # fmt: skip

    def set(self, buf: bytearray | memoryview, *values: int) -> None:
        self.codec.pack_into(buf, self.offset, *values)

    def __repr__(self) -> str:
        return f"FieldGroup(names={self.names!r}, offset={self.offset:#x})"


class FieldReader:
    """Fields scattered over a buffer, read with one compiled struct that skips the bytes
    between them: what a path that reads a handful of fields on every exit uses instead
    of one call per field. Integer fields come out as integers, byte arrays (and nested
    structs) as bytes. Read-only: packing the same struct would zero the gaps.

    ``get(buf)`` is the struct's own ``unpack_from`` (no Python frame), its values in the
    order of ``names``: the fields' order, which must be their order in the buffer."""

    __slots__ = ("codec", "get", "names")

    def __init__(self, fields: Iterable[Field]) -> None:
        fmt, cursor, names = "<", 0, []
        for f in fields:
            if f.offset < cursor:
                raise LayoutError(f"field reader: {f.name} at {f.offset:#x} does not follow "
                                  f"the field before it, which ends at {cursor:#x}")  # fmt: skip
            if f.offset > cursor:
                fmt += f"{f.offset - cursor}x"
            fmt += f.fmt[1:] if f.fmt is not None else f"{f.size}s"
            cursor = f.offset + f.size
            names.append(f.name)
        self.names = tuple(names)
        self.codec = struct.Struct(fmt)
        self.get: Callable[[bytes | bytearray | memoryview], tuple[Any, ...]] = (
            self.codec.unpack_from)

    def __repr__(self) -> str:
        return f"FieldReader(names={self.names!r})"


@frozen
class Layout:
    """A structure's fields, in offset order, with exactly checked sizes."""

    name: str
    size: int
    fields: tuple[Field, ...]
    _by_name: Mapping[str, Field] = field(repr=False, eq=False)
    #: name -> (offset, size, compiled struct or None): what get/set need, looked up
    #: once (they run several times per VMRUN).
    _codecs: Mapping[str, tuple[int, int, struct.Struct | None]] = field(repr=False, eq=False)
    #: Every named (non-reserved) field at once, for :meth:`unpack`.
    _named: FieldReader = field(repr=False, eq=False)

    @classmethod
    def build(
        cls,
        name: str,
        size: int,
        rows: Iterable[tuple[str, int, str]],
        nested: Mapping[str, Layout] | None = None,
    ) -> Layout:
        """Build a layout from ``(name, offset, type)`` rows and check it covers ``size``."""
        nested = nested or {}
        fields: list[Field] = []
        cursor = 0
        for fname, offset, ftype in rows:
            if offset != cursor:
                raise LayoutError(
                    f"{name}.{fname}: offset {offset:#x} leaves a gap or overlap; "
                    f"the previous field ends at {cursor:#x}"
                )
            if ftype in _INT_FORMATS:
                fsize, fmt = struct.calcsize(_INT_FORMATS[ftype]), _INT_FORMATS[ftype]
            elif m := _ARRAY.match(ftype):
                fsize, fmt = int(m.group(1)), None
            elif ftype in nested:
                fsize, fmt = nested[ftype].size, None
            else:
                raise LayoutError(f"{name}.{fname}: unknown type {ftype!r}")
            fields.append(Field(fname, offset, fsize, ftype, fmt))
            cursor = offset + fsize
        if cursor != size:
            raise LayoutError(f"{name}: fields end at {cursor:#x}, expected size {size:#x}")
        codecs = {f.name: (f.offset, f.size, struct.Struct(f.fmt) if f.fmt else None)
                  for f in fields}  # fmt: skip
        named = FieldReader(f for f in fields if not f.name.startswith("reserved"))
        return cls(name, size, tuple(fields), {f.name: f for f in fields}, codecs, named)

    def __getitem__(self, name: str) -> Field:
        try:
            return self._by_name[name]
        except KeyError:
            raise LayoutError(f"{self.name} has no field {name!r}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def offset(self, name: str) -> int:
        return self[name].offset

    def group(self, *names: str) -> FieldGroup:
        """A :class:`FieldGroup` of integer fields that follow each other in this order."""
        fields = [self[name] for name in names]
        for before, after in pairwise(fields):
            if before.offset + before.size != after.offset:
                raise LayoutError(f"{self.name}: {after.name} does not follow {before.name}")
        if not fields or any(f.fmt is None for f in fields):
            raise LayoutError(f"{self.name}: a field group needs integer fields, got {names}")
        fmt = "<" + "".join(f.fmt[1:] for f in fields if f.fmt is not None)
        return FieldGroup(tuple(names), fields[0].offset, struct.Struct(fmt))

    def get(self, buf: bytes | bytearray | memoryview, name: str, base: int = 0) -> Any:
        """Read one field from ``buf`` (the structure starting at ``base``)."""
        codec = self._codecs.get(name)
        if codec is None:
            raise LayoutError(f"{self.name} has no field {name!r}")
        offset, size, packed = codec
        if packed is not None:
            return packed.unpack_from(buf, base + offset)[0]
        return bytes(buf[base + offset : base + offset + size])

    def set(self, buf: bytearray | memoryview, name: str, value: Any, base: int = 0) -> None:
        """Write one field into ``buf``; integers must fit, byte strings must match the size."""
        codec = self._codecs.get(name)
        if codec is None:
            raise LayoutError(f"{self.name} has no field {name!r}")
        offset, size, packed = codec
        if packed is not None:
            if not isinstance(value, int) or value < 0 or value >> (8 * size):
                raise LayoutError(
                    f"{self.name}.{name}: {value!r} does not fit a {self[name].type} "
                    f"(0..{(1 << (8 * size)) - 1:#x})"
                )
            packed.pack_into(buf, base + offset, value)
            return
        data = bytes(value)
        if len(data) != size:
            raise LayoutError(f"{self.name}.{name}: expected {size} bytes, got {len(data)}")
        buf[base + offset : base + offset + size] = data

    def pack(self, values: Mapping[str, Any], size: int | None = None) -> bytearray:
        """A zeroed buffer of ``size`` (default: the layout's size) with ``values`` set."""
        buf = bytearray(size if size is not None else self.size)
        for name, value in values.items():
            self.set(buf, name, value)
        return buf

    def unpack(self, buf: bytes | bytearray | memoryview, base: int = 0) -> dict[str, Any]:
        """Every named (non-reserved) field of the structure at ``base``."""
        named = self._named
        return dict(zip(named.names, named.codec.unpack_from(buf, base), strict=True))
