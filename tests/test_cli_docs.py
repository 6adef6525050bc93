"""The README and docs/cli.md say what the command line does: the trace in the README
is the demo's real output, and every exit status and option they list exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sevsim.cli import build_parser, main
from sevsim.cli_base import EXIT_STATUS_TABLE

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()
CLI_DOC = (ROOT / "docs" / "cli.md").read_text()


def fenced_after(text: str, marker: str) -> str:
    """The first fenced block after ``marker``."""
    start = text.index("```", text.index(marker))
    body = text.index("\n", start) + 1
    return text[body : text.index("```", body)]


def test_the_readme_trace_is_the_demos_real_output(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SEVSIM_PLUGINS", raising=False)
    assert main(["run"]) == 0
    out = capsys.readouterr().out.splitlines()
    claim = re.search(r"\(lines (\d+)-(\d+) of (\d+);", README)
    assert claim is not None
    first, last, total = map(int, claim.groups())
    assert len(out) == total
    shown = fenced_after(README, claim[0]).splitlines()
    assert shown == out[first - 1 : last]


def section(text: str, heading: str) -> str:
    """The text under ``heading`` up to the next heading of the same or a higher level."""
    start = text.index(heading + "\n") + len(heading)
    level = heading.split()[0]
    following = re.search(rf"^#{{1,{len(level)}}} ", text[start:], re.MULTILINE)
    return text[start : start + following.start()] if following else text[start:]


def statuses(text: str) -> set[str]:
    return set(re.findall(r"^\| (\d+|2V\+1) \|", section(text, "## Exit statuses"),
                          re.MULTILINE))  # fmt: skip


def test_every_exit_status_is_documented_in_each_table() -> None:
    table = set(re.findall(r"^  (\d+|2V\+1) ", EXIT_STATUS_TABLE, re.MULTILINE))
    assert table == {"0", "1", "2", "3", "4", "5", "2V+1", "70", "130", "141"}
    assert statuses(README) == table
    assert statuses(CLI_DOC) == table


def test_every_documented_run_option_exists() -> None:
    run = build_parser()._subparsers._group_actions[0].choices["run"]  # type: ignore[union-attr]
    known = {flag for action in run._actions for flag in action.option_strings}
    documented = set(re.findall(r"^\| `(--[a-z-]+)", CLI_DOC, re.MULTILINE))
    assert documented - {"--config", "--strict", "--quiet", "--verbose", "--debug"} <= known
    assert {"--trace-format", "--trace-file", "--trace-filter", "--hypervisor-view", "--vars",
            "--vcpus", "--memory", "--vcpu-type", "--icount", "--max-exits", "--timeout",
            "--uart-input", "--check", "--era"} <= documented  # fmt: skip


def test_the_patch_table_lists_the_33_kvm_patches() -> None:
    patches = section(README, "## The series, patch by patch")
    rows = re.findall(r"^\| (\d\d) \| ", patches, re.MULTILINE)
    assert rows == [f"{n:02}" for n in range(2, 35)]
