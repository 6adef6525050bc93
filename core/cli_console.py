"""The serial console of ``sevsim run --firmware``: the UART on the user's terminal.

Output bytes go to stdout as the guest writes them. Input comes, as QEMU's
``-serial stdio`` takes it, from ``--uart-input TEXT`` (queued before the run), from a
terminal in raw mode (keys reach the guest as typed, Ctrl-C included; Ctrl-A x
leaves, Ctrl-A Ctrl-A sends a Ctrl-A, Ctrl-A h lists the keys) or from a file or
pipe (read as it comes). Raw mode is undone on every way out of the run: a normal
end, an error, SIGTERM or SIGHUP (turned into an exception for that purpose).
"""

from __future__ import annotations

import io
import os
import select
import signal
import sys
import termios
import tty
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import IO, Any

#: Ctrl-A: the escape key of QEMU's console multiplexer.
ESCAPE = 0x01
ESCAPE_HELP = (
    "\r\nC-a x    leave sevsim (exit status 5)\r\n"
    "C-a C-a  send C-a to the guest\r\n"
    "C-a h    this help\r\n"
)
#: How much to read at once.
READ_SIZE = 4096
#: Signals that end a run at the terminal; raw mode must be undone before they do.
_ENDING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _fileno(stream: IO[Any]) -> int | None:
    """The stream's descriptor, or None for one that has none (a test's stand-in)."""
    try:
        return stream.fileno()
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return None


class EscapeKeys:
    """Finds QEMU's Ctrl-A commands in typed input; what is left goes to the guest."""

    def __init__(self, tell: Callable[[str], None]) -> None:
        self._tell = tell
        self._pending = False
        self.quit = False

    def feed(self, data: bytes) -> bytes:
        out = bytearray()
        for byte in data:
            if self.quit:
                break
            if self._pending:
                self._pending = False
                if byte == ESCAPE:
                    out.append(ESCAPE)
                elif byte in b"xX":
                    self.quit = True
                elif byte in b"hH?":
                    self._tell(ESCAPE_HELP)
            elif byte == ESCAPE:
                self._pending = True
            else:
                out.append(byte)
        return bytes(out)


class SerialConsole:
    """The UART's two ends on the process's stdin and stdout; a context manager that
    puts a terminal in raw mode and restores it.

    ``poll`` is the run loop's ``poll_input``: bytes typed since the last call
    (b"" when none), or None once the user left with Ctrl-A x. ``idle`` tells the run
    loop whether to let real time pass when every vCPU waits (a person is typing).
    """

    def __init__(self, stdin: IO[Any], stdout: IO[Any], *, read_input: bool) -> None:
        self._out = getattr(stdout, "buffer", stdout)
        fd = _fileno(stdin) if read_input else None
        self._fd = fd
        self.interactive = fd is not None and os.isatty(fd)
        self._saved: list[Any] | None = None
        self._handlers: dict[int, Any] = {}
        self._eof = False
        self._keys = EscapeKeys(self._tell)

    @property
    def reads_input(self) -> bool:
        return self._fd is not None

    @property
    def idle(self) -> str:
        return "sleep" if self.interactive else "skip"

    def write(self, data: bytes) -> None:
        self._out.write(data)
        self._out.flush()

    def _tell(self, text: str) -> None:
        sys.stderr.write(text)
        sys.stderr.flush()

    def poll(self) -> bytes | None:
        if self._keys.quit:
            return None
        if self._fd is None or self._eof:
            return b""
        ready, _, _ = select.select([self._fd], [], [], 0)
        if not ready:
            return b""
        data = os.read(self._fd, READ_SIZE)
        if not data:
            self._eof = True
            return b""
        if not self.interactive:
            return data
        typed = self._keys.feed(data)
        return None if self._keys.quit else typed

    # -- raw mode ----------------------------------------------------------------------

    def __enter__(self) -> SerialConsole:
        if self.interactive and self._fd is not None:
            self._saved = termios.tcgetattr(self._fd)
            for number in _ENDING_SIGNALS:
                self._handlers[number] = signal.signal(number, _raise_exit)
            tty.setraw(self._fd, termios.TCSANOW)
            # Keep output processing (LF -> CR LF), as QEMU's stdio backend does, so
            # sevsim's own lines stay readable while the terminal is raw.
            attrs = termios.tcgetattr(self._fd)
            attrs[1] |= termios.OPOST
            termios.tcsetattr(self._fd, termios.TCSANOW, attrs)
            self._tell("sevsim: the console is the guest's serial port; C-a x leaves, "
                       "C-a h for help\r\n")  # fmt: skip
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:  # fmt: skip
        if self._saved is not None and self._fd is not None:
            termios.tcsetattr(self._fd, termios.TCSADRAIN, self._saved)
            self._saved = None
        for number, handler in self._handlers.items():
            signal.signal(number, handler)
        self._handlers.clear()


def _raise_exit(number: int, frame: FrameType | None) -> None:
    """SIGTERM/SIGHUP at the console: leave through the ``finally`` blocks (the
    terminal is restored, the trace file closed) with the shell's status for it."""
    raise SystemExit(128 + number)
