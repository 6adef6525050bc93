"""The conventions every ``sevsim`` command follows: --version, --help with examples,
one-line errors (--debug for the traceback), exit statuses, colour and NO_COLOR."""

from __future__ import annotations

import argparse
import io
import os
import pty
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

import sevsim
import sevsim.cli_run
from sevsim.cli import build_parser, main
from sevsim.cli_base import EXIT_STATUS_TABLE, Style, colour_wanted


@pytest.fixture(autouse=True)
def clean(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SEVSIM_PLUGINS", raising=False)
    monkeypatch.delenv("SEVSIM_DISABLE_PLUGIN_AUTOLOAD", raising=False)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"sevsim {sevsim.__version__}\n"
    assert sevsim.__version__ == metadata.version("sevsim")


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command and subcommand of the parser, as argv prefixes."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.append((*path, name))
                found += commands(sub, (*path, name))
    return found


ALL_COMMANDS = commands(build_parser())


def test_the_commands_are_all_there() -> None:
    assert set(ALL_COMMANDS) == {
        ("run",), ("guests",), ("measure",), ("trace",), ("trace", "summarize"),
        ("trace", "report"), ("replay",), ("attack",), ("plugins",), ("plugins", "check"),
        ("plugins", "new"),
    }  # fmt: skip


@pytest.mark.parametrize("command", [(), *ALL_COMMANDS], ids=lambda c: " ".join(c) or "sevsim")
def test_every_command_has_help_with_examples(
    command: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "\nexamples:\n  sevsim " in out
    assert "--debug" in out and "-q, --quiet" in out  # the common options


@pytest.mark.parametrize("command", [(), ("run",)])
def test_the_exit_status_table_is_in_the_help(
    command: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    assert EXIT_STATUS_TABLE in capsys.readouterr().out


def test_a_usage_error_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["run", "--no-such-option"])
    assert info.value.code == 2
    assert capsys.readouterr().err == (
        "sevsim: error: unrecognized arguments: --no-such-option (see 'sevsim --help')\n"
    )


def test_an_error_is_one_line_and_debug_adds_the_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["run", "missing.toml"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "sevsim: error: cannot read guest manifest missing.toml: No such file or directory\n"
    )
    assert main(["run", "missing.toml", "--debug"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):")
    assert "sevsim.errors.ConfigError" in err
    assert err.endswith("sevsim: error: cannot read guest manifest missing.toml: No such file "
                        "or directory\n")  # fmt: skip


def test_a_bug_is_one_line_with_status_70(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(path: object) -> object:
        raise TypeError("boom")

    monkeypatch.setattr(sevsim.cli_run, "load_manifest", broken)
    assert main(["guests"]) == 70
    assert capsys.readouterr().err == (
        "sevsim: error: internal error (a bug in sevsim): TypeError: boom "
        "(run with --debug for the traceback)\n"
    )
    assert main(["-q", "guests", "--debug"]) == 70
    assert "Traceback" in capsys.readouterr().err


def test_ctrl_c_is_status_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(path: object) -> object:
        raise KeyboardInterrupt

    monkeypatch.setattr(sevsim.cli_run, "load_manifest", interrupted)
    assert main(["guests"]) == 130
    assert capsys.readouterr().err == "\nsevsim: interrupted\n"


def test_common_options_go_before_or_after_the_command(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["-q", "run"]) == 0
    before = capsys.readouterr().out
    assert main(["run", "-q"]) == 0
    assert capsys.readouterr().out == before
    assert before.startswith("VM ended: ")  # quiet: the summary only


# --- colour ----------------------------------------------------------------------------------


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("stream", "env", "wanted"),
    [(Tty(), {}, True), (Tty(), {"NO_COLOR": "1"}, False), (Tty(), {"NO_COLOR": ""}, True),
     (io.StringIO(), {}, False)],
)  # fmt: skip
def test_colour_only_on_a_terminal_and_never_with_no_color(
    stream: io.StringIO, env: dict[str, str], wanted: bool
) -> None:
    assert colour_wanted(stream, env) is wanted


def test_style_wraps_only_when_enabled() -> None:
    assert Style(True)("error", "error:") == "\x1b[1;31merror:\x1b[0m"
    assert Style(False)("error", "error:") == "error:"


def run_on_a_terminal(argv: list[str], env: dict[str, str]) -> bytes:
    """``sevsim ARGV`` with stdout on a pseudo-terminal: what the terminal shows."""
    master, slave = pty.openpty()
    with subprocess.Popen([sys.executable, "-m", "sevsim.cli", *argv], stdout=slave,
                          stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                          env=env) as process:  # fmt: skip
        os.close(slave)
        shown = bytearray()
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            shown += chunk
        assert process.wait(60) == 0
    os.close(master)
    return bytes(shown)


def test_the_trace_is_coloured_on_a_terminal_unless_no_color(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "SEVSIM_PLUGINS")}
    coloured = run_on_a_terminal(["run", "--guest", "demo"], env)
    assert b"\x1b[36m#1    vcpu0 VMGEXIT" in coloured
    plain = run_on_a_terminal(["run", "--guest", "demo"], {**env, "NO_COLOR": "1"})
    assert b"\x1b[" not in plain and b"#1    vcpu0 VMGEXIT" in plain
