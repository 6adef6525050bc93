"""``sevsim plugins [--json]`` and ``sevsim plugins check``, with real installed dists."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sevsim.cli import main

DISTS = Path(__file__).parent / "data" / "plugin_dists"
Run = Callable[..., tuple[int, str, str]]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No stray sevsim.toml, no SEVSIM_* variables, no demo modules left behind."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SEVSIM_PLUGINS", raising=False)
    monkeypatch.delenv("SEVSIM_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    yield
    for module in [m for m in sys.modules if m.startswith("sevsim_demo")]:
        del sys.modules[module]


@pytest.fixture
def install(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """Install tests/data/plugin_dists/<name> (its dist-info and module) via sys.path."""

    def install(*names: str) -> None:
        for name in names:
            monkeypatch.syspath_prepend(str(DISTS / name))

    return install


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Run:
    """``sevsim ARGS`` in-process -> (exit status, stdout, stderr)."""

    def run(*args: str, only: str | None = None) -> tuple[int, str, str]:
        if only is not None:  # keep whatever else is installed (built-ins) out of the test
            monkeypatch.setenv("SEVSIM_PLUGINS", only)
        status = main(list(args))
        out, err = capsys.readouterr()
        return status, out, err

    return run


def rows(table: str) -> dict[str, str]:
    return {line.split()[0]: line for line in table.splitlines()[1:] if line.strip()}


def plugins_json(run: Run, *args: str, only: str | None = None) -> dict[str, Any]:
    status, out, err = run(*args, "plugins", "--json", only=only)
    assert (status, err) == (0, "")
    return json.loads(out)


def by_name(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in document["plugins"]}


def test_table_lists_version_source_status_and_owned_codes(
    install: Callable[..., None], run: Run
) -> None:
    install("good", "broken", "conflict")
    status, out, err = run("plugins", only="demo_good,demo_broken")
    assert (status, err) == (0, "")
    table, _, problems = out.partition("\n\nproblems")
    lines = rows(table)
    assert table.splitlines()[0].split() == [
        "NAME", "VERSION", "SOURCE", "STATUS", "SIM_HOOKS", "OWNS",
    ]  # fmt: skip
    assert lines["demo_good"].split() == [
        "demo_good", "1.2", "entry", "point:", "sevsim-demo-good", "active", "-", "vmgexit",
        "0x80000f00",
    ]  # fmt: skip
    assert "0.3" in lines["demo_broken"]
    assert (
        "failed: ModuleNotFoundError: No module named 'sevsim_demo_missing_dependency'"
        in lines["demo_broken"]
    )
    assert "disabled: not listed in SEVSIM_PLUGINS" in lines["demo_ioio"]
    assert "plugin 'demo_broken' failed to load" in problems


def test_json_listing(install: Callable[..., None], run: Run) -> None:
    install("good", "conflict")
    document = plugins_json(run, only="demo_good,demo_rival")
    plugins = by_name(document)
    assert plugins["demo_good"] == {
        "name": "demo_good",
        "version": "1.2",
        "source": "entry point: sevsim-demo-good",
        "status": "active",
        "why": "listed in SEVSIM_PLUGINS",
        "owns": [{"kind": "vmgexit", "code": 0x8000_0F00, "name": "vmgexit 0x80000f00"}],
        "contested": [],
        "sim_hooks": [],
    }
    assert plugins["demo_rival"]["owns"] == [
        {"kind": "vmgexit", "code": 0x7B, "name": "vmgexit 0x7b (SVM_EXIT_IOIO)"}
    ]
    assert plugins["demo_ioio"]["status"] == "disabled"
    assert plugins["demo_ioio"]["owns"] == []
    assert document["problems"] == []


#: A plugin that reads the simulator's view besides observing kvm, loaded with -p.
SIM_WATCHER = """
from sevsim import hookimpl

@hookimpl
def sevsim_sim_vc(exit_code):
    pass

@hookimpl
def sevsim_sim_exit(exit_code, why):
    pass

@hookimpl
def sevsim_vm_created(vm):
    pass
"""


def test_the_simulator_hooks_a_plugin_implements_are_listed_apart(
    install: Callable[..., None], run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # sevsim_sim_* see what no hypervisor sees (guest RIPs): the listing says who reads
    # them, in their own column; kvm's observer hooks (sevsim_vm_created) are not there
    install("good")
    (tmp_path / "sevsim_demo_watcher.py").write_text(SIM_WATCHER)
    monkeypatch.syspath_prepend(str(tmp_path))
    only = "demo_good,sevsim_demo_watcher"
    status, out, err = run("-p", "sevsim_demo_watcher", "plugins", only=only)
    assert (status, err) == (0, "")
    lines = rows(out)
    assert lines["sevsim_demo_watcher"].split() == [
        "sevsim_demo_watcher", "-", "module", "active", "sevsim_sim_exit,sevsim_sim_vc", "-",
    ]  # fmt: skip
    assert lines["demo_good"].split()[-3:] == ["-", "vmgexit", "0x80000f00"]
    plugins = by_name(plugins_json(run, "-p", "sevsim_demo_watcher", only=only))
    assert plugins["sevsim_demo_watcher"]["sim_hooks"] == ["sevsim_sim_exit", "sevsim_sim_vc"]
    assert plugins["demo_good"]["sim_hooks"] == []


def test_check_passes_on_a_clean_installation(install: Callable[..., None], run: Run) -> None:
    install("good")
    status, out, _ = run("plugins", "check", only="demo_good")
    assert status == 0
    assert out == "ok: 1 plugin(s) active, 1 exit code(s) owned, no conflicts\n"


def test_check_fails_on_a_broken_plugin_and_says_why(
    install: Callable[..., None], run: Run
) -> None:
    install("good", "broken")
    status, out, _ = run("plugins", "check", only="demo_good,demo_broken")
    assert status == 1
    assert out.splitlines() == [
        "1 plugin problem(s):",
        "  plugin 'demo_broken' failed to load: ModuleNotFoundError: "
        "No module named 'sevsim_demo_missing_dependency'",
    ]


def test_check_fails_on_a_conflict_naming_both(install: Callable[..., None], run: Run) -> None:
    install("conflict")
    status, out, _ = run("plugins", "check", only="demo_ioio,demo_rival")
    assert status == 1
    assert "exit code conflict: vmgexit 0x7b (SVM_EXIT_IOIO)" in out
    assert "'demo_ioio' and 'demo_rival'" in out
    assert "-p no:demo_ioio or -p no:demo_rival" in out
    # ... and the listing still works, showing the contested code and the problem.
    status, out, _ = run("plugins", only="demo_ioio,demo_rival")
    assert status == 0 and "claimed by both" in out
    row = " ".join(rows(out.partition("\n\n")[0])["demo_rival"].split())
    assert row.endswith("active - vmgexit 0x7b (SVM_EXIT_IOIO) [conflict]")
    plugins = by_name(plugins_json(run, only="demo_ioio,demo_rival"))
    assert plugins["demo_ioio"]["owns"] == []
    assert plugins["demo_ioio"]["contested"] == [
        {"kind": "vmgexit", "code": 0x7B, "name": "vmgexit 0x7b (SVM_EXIT_IOIO)"}
    ]


def test_owners_in_sevsim_toml_settle_the_conflict(
    install: Callable[..., None], run: Run, tmp_path: Path
) -> None:
    install("conflict")
    (tmp_path / "sevsim.toml").write_text('[plugins.owners]\n"0x7b" = "demo_rival"\n')
    status, out, _ = run("plugins", "check", only="demo_ioio,demo_rival")
    assert (status, out) == (0, "ok: 2 plugin(s) active, 1 exit code(s) owned, no conflicts\n")


def test_p_no_blocks_and_last_flag_wins_before_or_after_the_command(
    install: Callable[..., None], run: Run
) -> None:
    install("broken", "good")
    only = "demo_good,demo_broken"
    status, out, _ = run("plugins", "check", "-p", "no:demo_broken", only=only)
    assert status == 0, out
    plugins = by_name(plugins_json(run, "-p", "no:demo_good", only=only))
    assert plugins["demo_good"]["why"] == "-p no:demo_good"
    status, out, _ = run("-p", "no:demo_good", "plugins", "--json", "-p", "demo_good", only=only)
    assert by_name(json.loads(out))["demo_good"]["status"] == "active"
    status, out, _ = run("-p", "demo_good", "plugins", "--json", "-p", "no:demo_good", only=only)
    assert by_name(json.loads(out))["demo_good"]["why"] == "-p no:demo_good"


def test_p_enables_a_plugin_when_autoload_is_off(
    install: Callable[..., None], run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    install("good", "broken")
    monkeypatch.setenv("SEVSIM_DISABLE_PLUGIN_AUTOLOAD", "1")
    plugins = by_name(plugins_json(run, "-p", "demo_good"))
    assert plugins["demo_good"]["status"] == "active"
    assert plugins["demo_broken"]["why"] == "autoload off (SEVSIM_DISABLE_PLUGIN_AUTOLOAD=1)"


def test_strict_makes_check_fail_but_listing_still_works(
    install: Callable[..., None], run: Run
) -> None:
    install("broken")
    status, out, _ = run("--strict", "plugins", only="demo_broken")
    assert status == 0 and "failed: ModuleNotFoundError" in out
    status, out, _ = run("plugins", "check", "--strict", only="demo_broken")
    assert status == 1 and "demo_broken" in out


def test_config_file_option(install: Callable[..., None], run: Run, tmp_path: Path) -> None:
    install("good")
    config = tmp_path / "lab.toml"
    config.write_text('[plugins]\ndisable = ["demo_good"]\n')
    plugins = by_name(plugins_json(run, "--config", str(config)))
    assert plugins["demo_good"]["why"] == f"disabled in {config}"
    # The option after the command works the same.
    status, out, _ = run("plugins", "--json", "--config", str(config))
    assert status == 0
    assert by_name(json.loads(out))["demo_good"]["status"] == "disabled"


def test_settings_rejected_by_a_plugin_fail_the_check(
    install: Callable[..., None], run: Run, tmp_path: Path
) -> None:
    """The file in the working directory is named as the user would type it."""
    install("good")
    (tmp_path / "sevsim.toml").write_text("[plugins.settings.demo_good]\ngreeting = 5\n")
    status, out, _ = run("plugins", "check", only="demo_good")
    assert status == 1
    assert (
        "  sevsim.toml: [plugins.settings.demo_good]: plugin 'demo_good' "
        "rejected its settings: greeting = 5: expected a string"
    ) in out.splitlines()


@pytest.mark.parametrize(
    ("args", "toml", "message"),
    [
        (["-p", "no:nosuch", "plugins"], None,
         "sevsim: error: -p no:nosuch: no plugin named 'nosuch' is installed; known plugins: "),
        (["--config", "missing.toml", "plugins"], None,
         "sevsim: error: config file 'missing.toml' (--config) does not exist"),
        (["plugins", "check"], "[plugins]\nautoload = 'no'\n",
         "sevsim: error: sevsim.toml: [plugins] autoload = 'no': expected true or false"),
        (["plugins", "-p", "no:"], None,
         "sevsim: error: -p 'no:': expected NAME or no:NAME"),
    ],
)  # fmt: skip
def test_errors_are_one_line_with_status_2(
    run: Run, tmp_path: Path, args: list[str], toml: str | None, message: str
) -> None:
    if toml is not None:
        (tmp_path / "sevsim.toml").write_text(toml)
    status, out, err = run(*args)
    assert (status, out) == (2, "")
    assert err.startswith(message)
    assert err.count("\n") == 1 and "Traceback" not in err


def test_console_command_works_with_a_broken_plugin_installed() -> None:
    """The real process: entry points found by a fresh interpreter, no traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEVSIM_")}
    env |= {"PYTHONPATH": str(DISTS / "broken"), "SEVSIM_PLUGINS": "demo_broken"}

    def sevsim(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "sevsim.cli", *args],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

    listing = sevsim("plugins", "--json")
    assert (listing.returncode, listing.stderr) == (0, "")
    assert by_name(json.loads(listing.stdout))["demo_broken"]["status"] == "failed"
    check = sevsim("plugins", "check")
    assert check.returncode == 1
    assert "plugin 'demo_broken' failed to load: ModuleNotFoundError" in check.stdout
    assert "Traceback" not in check.stderr
