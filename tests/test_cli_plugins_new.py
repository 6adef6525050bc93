"""``sevsim plugins new``: the package it writes loads as a plugin and passes its tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from test_cli_plugins import clean_environment  # noqa: F401 (autouse: forgets sevsim_demo*)

from sevsim.cli import main

NAME = "sevsim_demo_scaffold"


def sevsim(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def test_the_package_is_written_where_asked(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = sevsim(capsys, "plugins", "new", NAME, "--dir", "pkg")
    assert (status, err) == (0, "")
    files = ["pyproject.toml", f"{NAME}.py", f"tests/test_{NAME}.py", "README.md"]
    assert out.splitlines()[:-1] == [f"wrote {Path('pkg', name)}" for name in files]
    pyproject = tomllib.loads(Path("pkg/pyproject.toml").read_text())
    assert pyproject["project"]["name"] == "sevsim-demo-scaffold"
    assert pyproject["project"]["entry-points"]["sevsim.plugins"] == {NAME: NAME}
    # without --dir, the folder is the distribution's name
    assert sevsim(capsys, "plugins", "new", "other_plugin")[0] == 0
    assert Path("other-plugin", "other_plugin.py").is_file()


def test_it_loads_with_p_and_owns_its_code(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert sevsim(capsys, "plugins", "new", NAME, "--dir", "pkg")[0] == 0
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))  # nothing installed: -p module.path
    status, out, err = sevsim(capsys, "-p", NAME, "plugins", "--json")
    assert (status, err) == (0, "")
    (row,) = [p for p in json.loads(out)["plugins"] if p["name"] == NAME]
    assert (row["status"], row["source"], row["sim_hooks"]) == ("active", "module", [])
    assert row["owns"] == [{"kind": "vmgexit", "code": 0xF000_0100,
                            "name": f"vmgexit 0xf0000100 ({NAME.upper()}_VMGEXIT)"}]  # fmt: skip


def test_its_tests_pass_as_written(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert sevsim(capsys, "plugins", "new", NAME, "--dir", "pkg")[0] == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SEVSIM_", "PYTEST_"))}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=tmp_path / "pkg", env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 passed" in done.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["My-Plugin"], "plugins new 'My-Plugin': expected a plugin name that is a Python "
                        "module name in lower case"),
        (["class"], "plugins new 'class': expected a plugin name"),
        (["json"], "plugins new 'json': a module named 'json' is already importable here"),
        (["fine", "--dir", "taken"], "plugins new 'fine': taken exists and is not an empty "
                                     "folder; give another with --dir"),
    ],
)  # fmt: skip
def test_bad_names_and_folders_are_one_line_errors(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    Path("taken").mkdir()
    Path("taken", "keep.txt").write_text("mine")
    status, out, err = sevsim(capsys, "plugins", "new", *args)
    assert (status, out) == (2, "")
    assert err.startswith(f"sevsim: error: {message}") and err.count("\n") == 1
    assert Path("taken", "keep.txt").read_text() == "mine"
