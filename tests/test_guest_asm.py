"""sevsim.guest.asm: numbers mean the same in every process.

Keystone 0.9.2 reads unprefixed numbers in a radix copied from an uninitialised
field, unless ``ks_option`` has set it (to 16). A benchmark guest's ``mov rcx, 16384``
once ran as ``mov rcx, 0x16384`` in some processes and touched 355 MiB instead of
64 MiB. ``assemble`` sets the option and writes every radix-dependent number in hex.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from keystone import KS_ARCH_X86, KS_MODE_64, KS_OPT_SYNTAX_INTEL, Ks

from sevsim.arch.disasm import capstone
from sevsim.guest.asm import AssemblyError, assemble, hex_literals


def immediate(code: bytes) -> int:
    (insn,) = capstone(64).disasm(code, 0)
    return int(insn.op_str.split(", ")[1], 16)


def test_keystone_with_its_option_set_reads_decimal_as_hex():
    """The premise: a set radix is 16, so decimal text must not reach keystone."""
    ks = Ks(KS_ARCH_X86, KS_MODE_64)
    ks.syntax = KS_OPT_SYNTAX_INTEL
    assert immediate(bytes(ks.asm("mov rcx, 16384")[0])) == 0x16384


@given(st.integers(min_value=0, max_value=(1 << 63) - 1))
def test_a_decimal_immediate_is_its_value(value):
    code = assemble(f"mov rcx, {value}")
    assert immediate(code) == value
    assert code == assemble(f"mov rcx, {value:#x}")


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("mov rcx, 16384", "mov rcx, 0x4000"),
        ("mov eax, 10h; mov ebx, 0FFh", "mov eax, 0x10; mov ebx, 0xff"),
        (".byte 12, 255, -16", ".byte 0xc, 0xff, -0x10"),
        ("mov eax, [rax + rcx*8 + 4096]", "mov eax, [rax + rcx*8 + 0x1000]"),
        (".equ LIMIT, 100", ".equ LIMIT, 0x64"),
        # Names, prefixed and octal literals, single digits, strings: as they are.
        ("mov r15, r10; jmp loop10", "mov r15, r10; jmp loop10"),
        ("mov eax, 0x1234; mov ebx, 0b1010; mov ecx, 0755; shl eax, 4",
         "mov eax, 0x1234; mov ebx, 0b1010; mov ecx, 0755; shl eax, 4"),
        ('.ascii "room 101"', '.ascii "room 101"'),
        # A quote inside a comment starts no string: what follows is still rewritten.
        ('/* a 3.5" disk */ mov rcx, 16384 # 12" \nmov rdx, 100',
         '/* a 3.5" disk */ mov rcx, 0x4000 # 12" \nmov rdx, 0x64'),
        ("mov al, '\"'; mov rcx, 16384", "mov al, '\"'; mov rcx, 0x4000"),
    ],
)
def test_radix_dependent_numbers_are_written_in_hex(source, expected):
    assert hex_literals(source) == expected


def test_h_suffixed_hex_assembles_as_hex():
    assert immediate(assemble("mov rcx, 1000h")) == 0x1000


def test_bad_source_names_the_problem():
    with pytest.raises(AssemblyError, match="cannot assemble"):
        assemble("mov rcx, nosuchlabel +")
    with pytest.raises(AssemblyError, match="bits must be 16, 32 or 64, got 8"):
        assemble("nop", bits=8)
