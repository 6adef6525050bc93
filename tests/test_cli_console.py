"""The serial console of ``run --firmware``: Ctrl-A keys, raw mode on a real terminal
(a pseudo-terminal here) restored on every way out, and input from a pipe."""

from __future__ import annotations

import io
import os
import pty
import termios
import time
from collections.abc import Iterator

import pytest

from sevsim.cli_console import ESCAPE_HELP, EscapeKeys, SerialConsole


def test_plain_keys_pass_through() -> None:
    assert EscapeKeys(print).feed(b"ver\r") == b"ver\r"


def test_ctrl_a_x_quits_and_drops_what_follows() -> None:
    keys = EscapeKeys(print)
    assert keys.feed(b"ab\x01xcd") == b"ab"
    assert keys.quit


def test_ctrl_a_ctrl_a_sends_one_ctrl_a_even_across_reads() -> None:
    keys = EscapeKeys(print)
    assert keys.feed(b"a\x01") == b"a"
    assert keys.feed(b"\x01b") == b"\x01b"
    assert not keys.quit


def test_ctrl_a_h_prints_the_keys_and_other_escapes_are_dropped() -> None:
    told: list[str] = []
    keys = EscapeKeys(told.append)
    assert keys.feed(b"\x01h\x01zq") == b"q"
    assert told == [ESCAPE_HELP]


@pytest.fixture
def terminal() -> Iterator[tuple[int, io.FileIO]]:
    """A pseudo-terminal: the master end (what a person types into) and the slave as
    sevsim's stdin."""
    master, slave = pty.openpty()
    stdin = io.FileIO(slave, "r", closefd=True)
    yield master, stdin
    stdin.close()
    os.close(master)


def lflag(fd: int) -> int:
    return termios.tcgetattr(fd)[3]


def test_a_terminal_is_raw_during_the_run_and_restored_after(
    terminal: tuple[int, io.FileIO], capsys: pytest.CaptureFixture[str]
) -> None:
    master, stdin = terminal
    before = termios.tcgetattr(stdin.fileno())
    console = SerialConsole(stdin, io.BytesIO(), read_input=True)
    assert console.interactive and console.idle == "sleep"
    with console:
        raw = termios.tcgetattr(stdin.fileno())
        assert not raw[3] & (termios.ICANON | termios.ECHO | termios.ISIG)
        assert raw[1] & termios.OPOST  # sevsim's own lines keep their line ends
        os.write(master, b"ver\r\x03")  # Ctrl-C goes to the guest, as a byte
        assert _poll(console, 5) == b"ver\r\x03"
        os.write(master, b"\x01x")
        assert _poll(console, 1) is None  # Ctrl-A x: the user left
    assert termios.tcgetattr(stdin.fileno()) == before
    assert "C-a x leaves" in capsys.readouterr().err


def test_the_terminal_is_restored_when_the_run_fails(terminal: tuple[int, io.FileIO]) -> None:
    _, stdin = terminal
    before = termios.tcgetattr(stdin.fileno())
    with pytest.raises(RuntimeError), SerialConsole(stdin, io.BytesIO(), read_input=True):
        assert lflag(stdin.fileno()) != before[3]
        raise RuntimeError("the run loop failed")
    assert termios.tcgetattr(stdin.fileno()) == before


def test_sigterm_at_the_console_restores_the_terminal(terminal: tuple[int, io.FileIO]) -> None:
    import signal

    _, stdin = terminal
    before = termios.tcgetattr(stdin.fileno())
    with pytest.raises(SystemExit) as info, SerialConsole(stdin, io.BytesIO(), read_input=True):
        signal.raise_signal(signal.SIGTERM)
    assert info.value.code == 128 + signal.SIGTERM
    assert termios.tcgetattr(stdin.fileno()) == before
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def _poll(console: SerialConsole, size: int) -> bytes | None:
    """Poll until ``size`` bytes came or the user left (the pty delivers asynchronously)."""
    got = b""
    deadline = time.monotonic() + 5
    while len(got) < size and time.monotonic() < deadline:
        data = console.poll()
        if data is None:
            return None
        got += data
        time.sleep(0.002)
    return got


def test_a_pipe_is_read_as_it_comes_then_eof_is_quiet() -> None:
    read_end, write_end = os.pipe()
    with io.FileIO(read_end, "r") as stdin:
        console = SerialConsole(stdin, io.BytesIO(), read_input=True)
        assert not console.interactive and console.idle == "skip"
        assert console.poll() == b""  # nothing yet
        os.write(write_end, b"reset -s\r\x01x")  # no escape keys off a terminal
        assert console.poll() == b"reset -s\r\x01x"
        os.close(write_end)
        assert console.poll() == b"" and console.poll() == b""


def test_output_goes_to_stdout_as_written() -> None:
    out = io.BytesIO()
    console = SerialConsole(io.BytesIO(), out, read_input=False)
    console.write(b"Shell> ")
    assert out.getvalue() == b"Shell> "
    assert not console.reads_input


def test_a_stdin_without_a_descriptor_gives_no_input() -> None:
    console = SerialConsole(io.StringIO("typed"), io.BytesIO(), read_input=True)
    assert not console.reads_input and console.poll() == b""
