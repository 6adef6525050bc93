"""The native #VC handler's source: ``.s`` files plus a prelude generated from ``sevsim.arch``.

The handler was a Python f-string until it became assembly files; the digests below
were taken from the f-string version's output, so they pin the bytes every build
configuration produced then. A change to the handler's code changes them on purpose
(update them with the change); a change anywhere else must not.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from fnmatch import fnmatch
from importlib import resources
from pathlib import Path

import pytest

from sevsim.arch.exits import SvmExit, VmgExit
from sevsim.arch.ghcb import GHCB, GHCB_SAVE_AREA, valid_bit
from sevsim.arch.ghcb_msr import TermReason
from sevsim.arch.ioio import IOIO_ADDR_64, IOIO_STR
from sevsim.arch.msr import CR4_OSXSAVE, MSR_AMD64_SEV_ES_GHCB
from sevsim.arch.vectors import Vector
from sevsim.guest import vc_native
from sevsim.guest.asm import assemble
from sevsim.guest.vc_native import SOURCES, build_vc_handler, handler_source
from sevsim.guest.vc_native.layout import STATE_DR7, STATE_OFFSET
from sevsim.guest.vc_native.symbols import arch_symbols, build_symbols, prelude

ROOT = Path(__file__).resolve().parent.parent

#: sha256 of ``build_vc_handler(*args, **kwargs)[0]`` (code, padding and state page),
#: as the f-string handler produced it.
DIGESTS = {
    "default": ((), {}, "654a542a687f7d11200544cd08514713fe9e63c366fae82104bdb2531d8c04a5"),
    "at_0x60000": (
        (0x60000,), {}, "818db3bbe6a74aace8fe18ceff48e4d174d7a9c5206f2dabeb7e9e646e4c7e17"),
    "at_0x60000_ghcb_0x51000": (
        (0x60000,), {"ghcb": 0x51000},
        "ed4ed6ab56ac9283c19a184ce2c38904bcb237a5a9bb20fb7a3507caf0a46239"),
    "ghcb_gpa_above_4g": (
        (), {"ghcb": 0x51000, "ghcb_gpa": 0x1_2345_6000},
        "9dbb1cb596e4071b1b89a199cb66199c96cbfe9c00e6f28d746a1e24f268babd"),
    "cbit_47": (
        (), {"cbit": 47}, "ff93f9821aba02d2c328055adc62a09f4ae655b03098f0fb49ce5925e44c2a2a"),
    "cbit_13": (
        (), {"cbit": 13}, "9dd71e5343b535150724dab71910fe488821003bb24316ad845e952be70a8827"),
    "protocol_version_2": (
        (), {"protocol_version": 2},
        "c0ffbad2e96a871b6d53bd661ddc6d2d027043ccd2a73a00b68e75653657574c"),
    "high_address": (
        (0x7FFF_F000_0000,), {"ghcb": 0x7FFF_E000_0000},
        "c07fc12dad6af399752418c4b234824039633044724539bbc60ddf2e82e24aa5"),
}  # fmt: skip


@pytest.mark.parametrize(("args", "kwargs", "digest"), DIGESTS.values(), ids=DIGESTS.keys())
def test_the_handler_is_byte_identical_to_the_f_string_version(args, kwargs, digest):
    code, _ = build_vc_handler(*args, **kwargs)
    assert hashlib.sha256(code).hexdigest() == digest


def _package_files() -> dict[str, str]:
    folder = resources.files(vc_native)
    return {p.name: p.read_text() for p in folder.iterdir() if p.name.endswith(".s")}


def test_every_source_file_is_assembled_and_read_as_package_data():
    assert sorted(SOURCES) == sorted(_package_files())
    source = handler_source()
    for name, text in _package_files().items():
        assert text in source, name


def test_the_packaging_config_ships_the_source_files():
    # `pip install .` copies only what package-data names: a .s file it misses would
    # leave an installed sevsim unable to build its handler.
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "sevsim.guest.vc_native" in config["packages"]
    patterns = config["package-data"]["sevsim.guest.vc_native"]
    assert all(any(fnmatch(name, p) for p in patterns) for name in _package_files())


def test_the_source_names_its_numbers_and_the_prelude_defines_them_from_arch():
    symbols = arch_symbols()
    assert symbols["SVM_EXIT_IOIO"] == SvmExit.IOIO
    assert symbols["SVM_VMGEXIT_MMIO_WRITE"] == VmgExit.MMIO_WRITE
    assert symbols["GHCB_sw_exit_info_1"] == GHCB_SAVE_AREA.offset("sw_exit_info_1")
    assert symbols["GHCB_shared_buffer"] == GHCB.offset("shared_buffer")
    bit = valid_bit("rax")
    assert (symbols["GHCB_rax_VALID_BYTE"], symbols["GHCB_rax_VALID_MASK"]) == (
        GHCB_SAVE_AREA.offset("valid_bitmap") + bit // 8, 1 << bit % 8)  # fmt: skip
    assert symbols["MSR_AMD64_SEV_ES_GHCB"] == MSR_AMD64_SEV_ES_GHCB
    assert 1 << symbols["CR4_OSXSAVE_BIT"] == CR4_OSXSAVE
    assert (symbols["IOIO_STR"], symbols["IOIO_ADDR_64"]) == (IOIO_STR, IOIO_ADDR_64)
    assert symbols["X86_TRAP_VC"] == Vector.VC
    assert symbols["TERM_NESTED_VC"] == TermReason.NESTED_VC
    assert symbols["STATE_dr7"] == STATE_DR7
    built = build_symbols(0x40000, ghcb=0x7000, ghcb_gpa=0x7000, cbit=51, protocol_version=1)
    assert built["VC_STATE"] == 0x40000 + STATE_OFFSET


def test_no_exit_code_or_ghcb_offset_is_written_as_a_number_in_the_source():
    # The instructions that carry an exit code or a GHCB offset name it: the hex
    # literals left are instruction encodings, masks and the frame's own offsets.
    code = re.sub(r"#.*", "", "".join(_package_files().values()))
    literals = {int(x, 16) for x in re.findall(r"\b0x[0-9a-fA-F]+\b", code)}
    named = {int(SvmExit.IOIO), int(SvmExit.CPUID), int(SvmExit.MSR), int(VmgExit.MMIO_READ),
             MSR_AMD64_SEV_ES_GHCB, GHCB_SAVE_AREA.offset("sw_exit_code"),
             GHCB_SAVE_AREA.offset("valid_bitmap"), GHCB.offset("ghcb_usage")}  # fmt: skip
    assert literals & named == set()


def test_a_changed_arch_value_reaches_the_assembled_code():
    # The prelude is the only place the numbers come from: change one and the code
    # follows, in each place that names it (the dispatch's `cmp rax, SVM_EXIT_CPUID`
    # and the CPUID request's `mov r8d, SVM_EXIT_CPUID`), and nowhere else.
    symbols = {**arch_symbols(), **build_symbols(0x40000, ghcb=0x7000, ghcb_gpa=0x7000,
                                                 cbit=51, protocol_version=1)}  # fmt: skip
    source = handler_source()
    assert source.startswith(prelude(symbols))
    body = source[len(prelude(symbols)) :]
    before = assemble(source, 0x40000)
    after = assemble(prelude({**symbols, "SVM_EXIT_CPUID": 0x7E}) + body, 0x40000)
    cmp_rax = b"\x48\x83\xf8"
    assert cmp_rax + bytes([SvmExit.CPUID]) in before and cmp_rax + b"\x7e" not in before
    assert cmp_rax + b"\x7e" in after and b"\x41\xb8\x7e\x00\x00\x00" in after
    assert len(after) == len(before)
    assert [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b] == [
        before.index(cmp_rax + bytes([SvmExit.CPUID])) + 3,
        before.index(b"\x41\xb8" + bytes([SvmExit.CPUID]) + b"\x00\x00\x00") + 2,
    ]
