"""The benchmarks (``benchmarks/``) still run: each at a tiny size produces rows with
positive numbers. Nothing here is timed against a goal; the OVMF lines need Debian's
firmware and minutes, so only their skip path runs here."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import compute, guest_ram, new_code, out_roundtrip, ovmf_launch
from benchmarks.bench import Plan
from benchmarks.ovmf import missing
from benchmarks.table import SKIP, Row, format_row, header


def check(rows: list[Row]) -> None:
    assert rows
    for row in rows:
        assert row.ours is not None and row.ours > 0, row
        assert row.floor is not None and row.floor > 0, row
        assert row.ratio is not None and row.ratio > 0, row
        assert isinstance(row.passed, bool), row
        assert row.what in format_row(row)


@pytest.mark.parametrize(
    "measure",
    [
        pytest.param(lambda: out_roundtrip.rows(round_trips=20, repeat=1), id="out"),
        pytest.param(lambda: compute.rows(iterations=10_000, repeat=1), id="compute"),
        pytest.param(lambda: new_code.rows(counts=(2, 4), repeat=1), id="new-code"),
        pytest.param(lambda: guest_ram.rows(ram=64 << 20, touched=1 << 20), id="rss"),
    ],
)
def test_benchmark_produces_rows(measure):
    check(measure())


def test_new_code_pages_hold_80_io_looking_bytes_and_end_in_hlt():
    pages = new_code.code_pages(3)
    assert len(pages) == 3 * new_code.PAGE + 1 and pages[-1] == 0xF4
    first = pages[: new_code.PAGE]
    assert sum(byte in new_code.SENSITIVE_LOOKING for byte in first) == 80


def test_ovmf_lines_skip_with_a_note_when_the_firmware_is_missing(tmp_path: Path):
    absent = tmp_path / "OVMF_CODE.fd"
    [row] = ovmf_launch.rows(repeat=1, path=absent)
    assert row.result == SKIP and row.ours is None
    assert str(absent) in row.note and "ovmf" in row.note
    assert missing(absent) == row.note


def test_table_header_and_plans():
    assert header().splitlines()[0].split()[:3] == ["benchmark", "unit", "sevsim"]
    quick, full = Plan.choose(True, None), Plan.choose(False, None)
    assert quick.shell_cap_s < full.shell_cap_s and quick.repeat < full.repeat
    assert Plan.choose(True, 5.0).shell_cap_s == 5.0
    assert set(quick.benchmarks()) == {"out", "compute", "new-code", "rss", "launch", "shell"}
