"""One mnemonic -> exit code table (``sevsim.arch.exits.EXIT_BY_MNEMONIC``).

The CPU model (which instructions it stops in front of) and the modeled #VC handler
(whether the instruction at RIP matches the #VC's exit code) both read it, so they
cannot disagree on what an instruction causes.
"""

from __future__ import annotations

import pytest

from sevsim.arch.exits import EXIT_BY_MNEMONIC, SvmExit
from sevsim.guest.asm import assemble
from sevsim.guest.decode import decode, exit_code_of
from sevsim.hw.sites import classify


@pytest.mark.parametrize(
    "source",
    ["cpuid", "rdmsr", "wrmsr", "rdpmc", "rdtscp", "invd", "wbinvd", "monitor", "mwait",
     "vmmcall", "hlt", "in al, dx", "out 0x80, al", "rep insb", "outsd", "clts",
     b"\x0f\x01\xd8"],  # vmrun
)  # fmt: skip
def test_the_cpu_model_and_the_modeled_handler_agree(source):
    code = source if isinstance(source, bytes) else assemble(source)
    insn = decode(code, 0, 64)
    assert insn is not None
    site = classify(code, 64)
    assert site is not None
    assert site.exit_code == exit_code_of(insn) == EXIT_BY_MNEMONIC[insn.mnemonic]


def test_rdtsc_is_in_the_table_but_the_cpu_model_does_not_stop_for_it():
    code = assemble("rdtsc")
    assert EXIT_BY_MNEMONIC["rdtsc"] == SvmExit.RDTSC
    assert classify(code, 64) is None
