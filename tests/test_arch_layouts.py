"""The layout tables match layouts.json (Linux's svm.h) field by field."""

import json
from pathlib import Path

import pytest

from sevsim.arch import GHCB, GHCB_SAVE_AREA, VMCB_CONTROL, VMCB_SEG, VMSA, Ghcb
from sevsim.arch.exits import SvmExit, VmgExit
from sevsim.arch.ghcb import valid_bit

REFERENCE = json.loads((Path(__file__).parent / "data" / "layouts.json").read_text())

TABLES = {
    "vmcb_seg": VMCB_SEG,
    "ghcb_save_area": GHCB_SAVE_AREA,
    "ghcb": GHCB,
    "sev_es_save_area": VMSA,
    "vmcb_control_area": VMCB_CONTROL,
}


@pytest.mark.parametrize("name", TABLES)
def test_layout_matches_reference(name):
    table, ref = TABLES[name], REFERENCE[name]
    assert table.size == ref["size"]
    ours = [(f.name, f.offset, f.size) for f in table.fields]
    theirs = [(f["name"], f["offset"], f["size"]) for f in ref["fields"]]
    # layouts.json keeps the oldest-era intercept words as one u32[6] array; we hold bytes.
    assert ours == theirs


def test_valid_bits_match_reference():
    for f in REFERENCE["ghcb_save_area"]["fields"]:
        if "valid_bitmap_bit" in f:
            assert valid_bit(f["name"]) == f["valid_bitmap_bit"], f["name"]


@pytest.mark.parametrize(
    ("enum", "key", "prefix"),
    [(SvmExit, "svm_exit_codes", "SVM_EXIT_"), (VmgExit, "svm_vmgexit_codes", "SVM_VMGEXIT_")],
)
def test_exit_codes_match_reference(enum, key, prefix):
    ref = {
        k.removeprefix(prefix): int(v, 16)
        for k, v in REFERENCE[key].items()
        if isinstance(v, str) and v.startswith("0x") and "(" not in k
    }
    for member in enum:
        if member.name in ref:
            assert member.value == ref[member.name], member
    missing = {n for n in ref if "CR" not in n and n not in enum.__members__ and n != "SW"}
    assert not missing


def test_ghcb_set_marks_valid_and_roundtrips():
    g = Ghcb()
    g["rax"] = 0x1234
    g["sw_exit_code"] = VmgExit.MMIO_READ
    assert g.is_valid("rax") and g.is_valid("sw_exit_code") and not g.is_valid("rbx")
    assert g.valid_bitmap == (1 << 63) | (1 << 114)
    assert g["rax"] == 0x1234 and g.get_if_valid("rbx") == 0
    g["ghcb_usage"] = 1
    assert int.from_bytes(g.raw[0xFFC:0x1000], "little") == 1
