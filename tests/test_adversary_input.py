"""Bad user input, from the user's seat (issue 11, section 1): each case is one line on
stderr and exit status 2, never a traceback, an "internal error" or silence."""

from __future__ import annotations

import os
import time

import pytest
from guests import guest, launch

from sevsim.cli import main
from sevsim.guest.snippets import TERMINATE
from sevsim.hw import watchdog
from sevsim.kvm.exits import Hlt, RunFailed

#: sevsim.toml contents (bytes) and words the one-line error must contain.
BAD_FILES = {
    "BOM of UTF-16": (b"\xff\xfe[plugins]\n", "line 1: byte 0xff is not valid UTF-8"),
    "latin-1 in a string": (b"[plugins]\nautoload = 'caf\xe9'\n", "line 2: byte 0xe9"),
    "truncated sequence": (b"[plugins]\n# \xe2\x82\n", "line 2: byte 0xe2"),
    "lone continuation": (b"\x80", "line 1: byte 0x80"),
    "overlong encoding": (b"a = '\xc0\xaf'", "byte 0xc0"),
    "surrogate": (b"a = '\xed\xa0\x80'", "byte 0xed"),
    "beyond U+10FFFF": (b"a = '\xf4\x90\x80\x80'", "byte 0xf4"),
    "nested 3000 deep": (b"a = " + b"[" * 3000 + b"]" * 3000, "nested too deeply"),
    "integer of 5000 digits": (b"[kvm]\nghcb_version = " + b"9" * 5000,
                               "an integer has more than 4300 digits"),
    "era is an array": (b"[kvm]\nera = ['newest']\n", "[kvm] era = ['newest']: expected one of"),
    "era is a table": (b"[kvm]\nera = {a = 1}\n", "[kvm] era = {'a': 1}: expected one of"),
}  # fmt: skip


def _one_line_error(capsys, *words: str) -> None:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sevsim: error: "), err
    assert "internal error" not in err and "Traceback" not in err
    for word in words:
        assert word in err, err


#: `sevsim plugins` reads the whole file, but checks only its [plugins] table.
_CASES = [(name, command) for name in BAD_FILES
          for command in (("run", "--timeout", "5"), ("plugins",))
          if command == ("run", "--timeout", "5") or not name.startswith("era")]  # fmt: skip


@pytest.mark.parametrize(("name", "command"), _CASES)
def test_a_bad_sevsim_toml_is_one_line_and_status_2(name, command, tmp_path, monkeypatch,
                                                     capsys):  # fmt: skip
    """``read_toml`` turns UnicodeDecodeError, RecursionError and int()'s digit limit
    into ConfigError naming the file; ``kvm_settings`` refuses an era that is no string."""
    content, words = BAD_FILES[name]
    (tmp_path / "sevsim.toml").write_bytes(content)
    monkeypatch.chdir(tmp_path)
    assert main(list(command)) == 2
    _one_line_error(capsys, "sevsim.toml", words)


def test_an_empty_era_on_the_command_line_is_refused(capsys):
    assert main(["run", "--era", "", "--timeout", "5"]) == 2
    _one_line_error(capsys, "--era = '': expected one of ['newest', 'v5.11']")


def test_a_sevsim_toml_symlink_loop_is_an_error_not_ignored(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    os.symlink("sevsim.toml", "sevsim.toml")
    assert main(["plugins"]) == 2
    _one_line_error(capsys, "'sevsim.toml' is a symbolic link that leads to no file")


def test_config_naming_a_directory_says_so(tmp_path, capsys):
    assert main(["plugins", "--config", str(tmp_path)]) == 2
    _one_line_error(capsys, f"'{tmp_path}' (--config) is a directory; expected a TOML file")


def test_a_far_timeout_leaves_the_host_timer_working():
    """``--timeout 1e10`` used to kill the timer thread (OverflowError in its wait),
    after which no KVM_RUN was ever interrupted: the timer waits in bounded steps
    (``watchdog._LONGEST_WAIT``), so a later short limit still stops a looping guest."""
    vm = launch(guest("hlt; spin: jmp spin" + TERMINATE))
    vcpu = vm.vcpus[0]
    assert isinstance(vcpu.run(1e10), Hlt)
    start = time.monotonic()
    exit_ = vcpu.run(0.2)
    assert isinstance(exit_, RunFailed) and exit_.errno == "EINTR", exit_.describe()
    assert time.monotonic() - start < 2.0
    assert watchdog._TIMER._thread is not None and watchdog._TIMER._thread.is_alive()
    vm.destroy()
