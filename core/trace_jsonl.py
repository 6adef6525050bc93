"""The machine-readable trace: one JSON object per line (docs/trace-format.md).

:class:`JsonlSink` is an event sink for kvm and for the simulator alike (both speak
``wants``/``emit``): give it to ``Kvm(Platform(sim=...))`` and to ``create_vm(events=...)``
(through a ``TeeSink`` beside other observers) and every event becomes a line.
:func:`read_trace` reads such a file back, checking it as it goes.

Every line is written and flushed before ``emit`` returns. The alternatives (flush on
close, or at exit) lose the end of the trace exactly when it matters: a run that
dies in native code (Unicorn), is killed, or never reaches its ``close``. One
``write`` + ``flush`` per event costs a few microseconds, small beside the VMGEXIT
round trip that produced the event, and a filter cuts the volume where it is not.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from importlib import metadata
from typing import IO, Any

import sevsim
from sevsim.errors import ConfigError
from sevsim.trace_filter import TraceFilter
from sevsim.trace_schema import SCHEMA, VERSION, encode_fields

__all__ = ["JsonlSink", "TraceFilter", "read_header", "read_trace"]


def _sevsim_version() -> str:
    try:
        return metadata.version("sevsim")
    except metadata.PackageNotFoundError:  # running from a source tree
        return sevsim.__version__


class JsonlSink:
    """Writes each event it wants to ``file`` as a JSON line, after a header line.

    ``trace_filter`` keeps a subset (``wants`` says no to the event names it leaves
    out, so kvm does not even build them); ``guest_clock`` returns the guest's time in
    ns, recorded as ``guest_ns`` on every event (omitted without one). Without
    ``host_times`` the host's clock is left out (``started`` null, ``wall_ns`` 0), so
    that a reproducible run (``--icount``) writes the same file every time. ``run``
    is what decides the run (:class:`sevsim.replay.RunRecord`), for ``sevsim replay``;
    the header leaves it out when there is none. The sink does not own ``file``:
    whoever opened it closes it.
    """

    def __init__(
        self,
        file: IO[str],
        *,
        trace_filter: TraceFilter | None = None,
        guest_clock: Callable[[], int] | None = None,
        host_times: bool = True,
        run: Mapping[str, Any] | None = None,
    ) -> None:
        self._file = file
        self._host_times = host_times
        self._filter = trace_filter
        self._guest_clock = guest_clock
        self._seq = 0
        self._start = time.perf_counter_ns()
        kept = str(trace_filter) if trace_filter is not None else ""
        self._write({
            "schema": SCHEMA,
            "version": VERSION,
            "sevsim": _sevsim_version(),
            "started": (datetime.now(UTC).isoformat(timespec="milliseconds")
                        if host_times else None),
            "filter": kept or None,  # an empty filter keeps everything
            "guest_clock": guest_clock is not None,
            **({"run": run} if run is not None else {}),
        })  # fmt: skip

    def _write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._file.flush()

    def wants(self, name: str) -> bool:
        return self._filter is None or self._filter.wants(name)

    def emit(self, name: str, /, **fields: Any) -> None:
        """Write one event. ``name`` is positional-only so that an event may have a
        field called ``name`` (the ``phase`` marker has)."""
        if self._filter is not None and not self._filter.matches(name, fields):
            return
        record: dict[str, Any] = {
            "seq": self._seq,
            "event": name,
            "wall_ns": time.perf_counter_ns() - self._start if self._host_times else 0,
        }
        if self._guest_clock is not None:
            record["guest_ns"] = self._guest_clock()
        record.update(encode_fields(name, fields))
        self._seq += 1
        self._write(record)


def _parse(line: bytes, where: str) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ConfigError(f"{where}: not a JSON line ({exc}); a run that died while writing "
                          "can leave its last line cut short") from None  # fmt: skip
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(value).__name__}")
    return value


def _check_header(header: dict[str, Any], where: str) -> None:
    if header.get("schema") != SCHEMA:
        raise ConfigError(f"{where}: not a sevsim trace: the first line must be a header "
                          f'with "schema": "{SCHEMA}", got {header.get("schema")!r}')  # fmt: skip
    version = header.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ConfigError(f"{where}: header version {version!r}: expected an integer >= 1")
    if version > VERSION:
        raise ConfigError(f"{where}: trace format version {version} is newer than this sevsim "
                          f"reads ({VERSION}); read it with a newer sevsim")  # fmt: skip


#: What every event line must carry, with its type.
_REQUIRED = {"seq": int, "event": str, "wall_ns": int}


def _check_event(event: dict[str, Any], where: str) -> None:
    for key, kind in _REQUIRED.items():
        if not isinstance(event.get(key), kind) or isinstance(event.get(key), bool):
            raise ConfigError(f"{where}: event line without a valid {key!r} "
                              f"(expected {kind.__name__}, got {event.get(key)!r})")  # fmt: skip


def read_trace(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """The events of the trace file at ``path``, in order, without its header.

    The header is checked at once (a missing or unreadable file, another format or
    a newer version raise ConfigError here); each event line as it is reached, with
    ``file:line`` in the error. Blank lines are skipped.
    """
    file, _ = _open_checked(path)
    return _events(file, os.fspath(path))


def read_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The header of the trace file at ``path``, checked as :func:`read_trace` checks it."""
    file, header = _open_checked(path)
    file.close()
    return header


def _open_checked(path: str | os.PathLike[str]) -> tuple[IO[bytes], dict[str, Any]]:
    """The file, open after its header line, and the header (checked)."""
    name = os.fspath(path)
    try:
        file = open(path, "rb")  # closed by _events, or here if the header is bad
    except OSError as exc:
        raise ConfigError(f"trace file {name}: cannot open it: {exc.strerror}") from None
    try:
        first = file.readline()
        if not first.strip():
            raise ConfigError(f"{name}:1: empty; expected a sevsim trace header")
        header = _parse(first, f"{name}:1")
        _check_header(header, f"{name}:1")
    except BaseException:
        file.close()
        raise
    return file, header


def _events(file: IO[bytes], name: str) -> Iterator[dict[str, Any]]:
    with file:
        for number, line in enumerate(file, 2):
            if not line.strip():
                continue
            where = f"{name}:{number}"
            event = _parse(line, where)
            _check_event(event, where)
            yield event
