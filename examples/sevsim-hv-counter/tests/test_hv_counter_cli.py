"""The installed distribution, as sevsim's command line sees it.

These run ``python -m sevsim.cli`` in a fresh process, in an empty directory (no
``sevsim.toml``) and without ``SEVSIM_*`` variables, so they check exactly what
``pip install`` put in place: the entry point, its distribution and version.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
from sevsim_hv_counter import NAME, SEVSIM_VMGEXIT_HV_COUNTER

DIST = "sevsim-hv-counter"


def sevsim(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEVSIM_")}
    return subprocess.run(
        [sys.executable, "-m", "sevsim.cli", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def listing(cwd: Path, before: tuple[str, ...] = (), after: tuple[str, ...] = ()) -> dict[str, Any]:
    """This plugin's row of ``sevsim [before] plugins --json [after]``."""
    done = sevsim(cwd, *before, "plugins", "--json", *after)
    assert done.returncode == 0, done.stderr
    rows = {row["name"]: row for row in json.loads(done.stdout)["plugins"]}
    assert NAME in rows, f"{NAME} is not installed: pip install -e examples/{DIST}"
    return rows[NAME]


def test_listed_as_an_active_entry_point_plugin_owning_its_code(tmp_path):
    row = listing(tmp_path)
    assert row["source"] == f"entry point: {DIST}"
    assert row["version"] == version(DIST)
    assert row["status"] == "active"
    assert [(c["kind"], c["code"]) for c in row["owns"]] == [("vmgexit", SEVSIM_VMGEXIT_HV_COUNTER)]
    assert row["contested"] == []


@pytest.mark.parametrize("placement", ["before", "after"])
def test_p_no_disables_it(tmp_path, placement):
    flags = ("-p", f"no:{NAME}")
    row = listing(tmp_path, **{placement: flags})
    assert row["status"] == "disabled"
    assert f"no:{NAME}" in row["why"]
    assert row["owns"] == []


def test_a_disabled_plugin_is_never_imported(tmp_path):
    probe = (
        "import sys; from sevsim.cli import main; "
        f"main(['-p', 'no:{NAME}', 'plugins', 'check']); "
        "print('imported' if 'sevsim_hv_counter' in sys.modules else 'not imported')"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEVSIM_")}
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "not imported"


def test_plugins_check_is_clean_with_it_installed(tmp_path):
    done = sevsim(tmp_path, "plugins", "check")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("ok:")


def test_settings_from_sevsim_toml_reach_it(tmp_path):
    (tmp_path / "sevsim.toml").write_text(f"[plugins.settings.{NAME}]\ncounters = 0\n")
    done = sevsim(tmp_path, "plugins", "check")
    assert done.returncode != 0
    assert f"{NAME}: counters = 0; expected an integer in 1..256" in done.stdout + done.stderr
