"""The exit path's compiled field access agrees with the layout tables it comes from.

VMCB control fields read and written on every exit go through ``Layout.group`` (one
struct call for adjacent fields) or, for what VMRUN reads, one ``FieldReader``, and
KVM's GHCB writes and valid-bit checks through
precomputed offsets: the bytes must be the ones ``Layout.get``/``Layout.set`` and
``Ghcb``'s per-field methods give.
"""

import random

import pytest

from sevsim.arch import vmcb
from sevsim.arch.ghcb import (
    GHCB_EXIT,
    GHCB_PAGE_SIZE,
    GHCB_SAVE_AREA,
    REGISTER_FIELDS,
    Ghcb,
    page_reader,
    valid_mask,
)
from sevsim.arch.layout import FieldGroup
from sevsim.arch.vmcb import VMCB_CONTROL
from sevsim.errors import LayoutError
from sevsim.kvm.ghcb_map import MappedGhcb

GROUPS = [value for name, value in vars(vmcb).items()
          if name.startswith("VMCB_") and isinstance(value, FieldGroup)]  # fmt: skip


@pytest.mark.parametrize("group", GROUPS, ids=lambda g: "+".join(g.names))
def test_a_vmcb_field_group_reads_and_writes_what_the_layout_does(group):
    rng = random.Random(group.offset)
    buf = bytearray(rng.randbytes(VMCB_CONTROL.size))
    assert group.get(buf) == tuple(VMCB_CONTROL.get(buf, name) for name in group.names)
    values = [rng.getrandbits(8 * VMCB_CONTROL[name].size) for name in group.names]
    expected = bytearray(buf)
    for name, value in zip(group.names, values, strict=True):
        VMCB_CONTROL.set(expected, name, value)
    group.set(buf, *values)
    assert buf == expected


def test_the_vmrun_reader_reads_what_the_layout_does():
    rng = random.Random(11)
    for _ in range(20):
        buf = bytearray(rng.randbytes(VMCB_CONTROL.size))
        expected = tuple(VMCB_CONTROL.get(buf, name) for name in vmcb.VMCB_VMRUN.names)
        assert vmcb.VMCB_VMRUN.get(buf) == expected
    assert "intercepts" in vmcb.VMCB_VMRUN.names and "vmsa_pa" in vmcb.VMCB_VMRUN.names


def test_a_group_must_be_adjacent_integer_fields():
    with pytest.raises(LayoutError, match="does not follow"):
        VMCB_CONTROL.group("exit_code", "exit_info_1")
    with pytest.raises(LayoutError, match="integer fields"):
        VMCB_CONTROL.group("intercepts")


def test_ghcb_bulk_reads_agree_with_the_per_field_ones():
    rng = random.Random(7)
    for _ in range(50):
        g = Ghcb(rng.randbytes(GHCB_PAGE_SIZE))
        names = tuple(rng.sample(REGISTER_FIELDS, 6))
        in_page_order = sorted(names, key=GHCB_SAVE_AREA.offset)
        assert page_reader(*in_page_order).get(g.raw) == tuple(g[n] for n in in_page_order)
        mask = valid_mask(names)
        assert (g.valid_bitmap & mask == mask) == all(g.is_valid(name) for name in names)
        assert GHCB_EXIT.get(g.raw) == (g["sw_exit_code"], g["sw_exit_info_1"],
                                        g["sw_exit_info_2"])  # fmt: skip
    with pytest.raises(LayoutError):
        valid_mask(("no_such_field", "rax"))


def test_mapped_ghcb_writes_are_the_base_class_writes_and_are_recorded():
    rng = random.Random(3)
    raw = rng.randbytes(GHCB_PAGE_SIZE)
    mapped, plain = MappedGhcb(raw, 0x1000), Ghcb(raw)
    names = ("rax", "rbx", "cpl", "sw_exit_info_2", "ghcb_usage")
    values = [5, 1 << 63, 3, 0, 1]
    mapped.set_fields(names, values)
    for name, value in zip(names, values, strict=True):
        plain[name] = value
    assert mapped.raw == plain.raw
    written = mapped._written
    assert (0x1F8, 8) in written and (0xFFC, 4) in written  # RAX, ghcb_usage
    assert (0x3F0 + 0x1F8 // 64, 1) in written  # RAX's valid bit
    with pytest.raises(LayoutError):
        mapped["rax"] = -1
    with pytest.raises(LayoutError):
        mapped["no_such_field"] = 1
