"""One capstone engine per mode and option (``sevsim.arch.disasm``), shared by every user."""

from __future__ import annotations

import pytest

from sevsim.arch.disasm import capstone


def test_engines_are_made_once_per_mode_and_detail():
    assert capstone(64) is capstone(64)
    assert capstone(64) is not capstone(32)
    assert capstone(64, detail=True) is not capstone(64)
    assert capstone(64, detail=True).detail and not capstone(64).detail


@pytest.mark.parametrize(("bits", "code", "text"), [
    (64, b"\x0f\xa2", "cpuid"), (32, b"\x66\xed", "in ax, dx"), (16, b"\xed", "in ax, dx"),
])  # fmt: skip
def test_each_mode_decodes_its_own_code(bits, code, text):
    insn = next(capstone(bits).disasm(code, 0))
    assert f"{insn.mnemonic} {insn.op_str}".strip() == text


def test_a_mode_that_is_not_x86s_is_refused():
    with pytest.raises(ValueError, match="16, 32 or 64"):
        capstone(8)
