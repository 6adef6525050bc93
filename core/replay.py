"""Deterministic replay: run again what a JSON Lines trace records, and find the first
event that differs.

``sevsim run --trace-file`` writes a :class:`RunRecord` into the trace's header (the
``run`` object, docs/replay.md): everything that decides what the run does — the
guest (a bundled name, a manifest's path) or the firmware, the configuration file and
``-p`` flags, the environment variables sevsim reads, the KVM era, the machine's
vCPUs, memory and clock, the limits and the UART input. :func:`replay` runs the same
thing again through ``sevsim run`` and compares the two traces event by event.

A run is a function of those inputs: guest code runs in a single-threaded CPU model,
the exits are handled in order, and nothing random reaches the trace (the launch keys
are random, but only ciphertext depends on them, and the trace never holds
ciphertext), so there is no seed to record. What does differ between two runs is the
host's clock, and the comparison leaves it out by design: the header's ``started``
and each event's ``wall_ns`` (:data:`WALL_CLOCK_KEYS`). Runs whose course depends on
the host's clock or on a terminal are not replayable, and :meth:`RunRecord.replayable`
says why: a firmware run with guest time from the host's clock (record it with
``--icount``), a UART that read the terminal or stdin, a variable store the run wrote.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
from attrs import field, frozen

from sevsim.errors import ConfigError
from sevsim.plugin.config import ENV_ALLOW, ENV_NO_AUTOLOAD
from sevsim.trace_jsonl import read_header, read_trace

#: The ``run`` object's own format version, raised only for changes an older replay
#: would misread (the trace format's ``version`` is separate: a reader that knows
#: nothing of replay ignores the whole object).
RUN_VERSION = 1
#: Event keys that measure the host's time: never compared.
WALL_CLOCK_KEYS = frozenset({"wall_ns"})
#: The environment variables that change what a run loads (docs/writing-plugins.md).
ENV_KEYS = (ENV_ALLOW, ENV_NO_AUTOLOAD)
CLOCKS = ("none", "host", "icount")


def _sha256(path: str) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def digests(paths: Sequence[str]) -> dict[str, str | None]:
    """Each file's SHA-256 (None if it cannot be read), for :attr:`RunRecord.inputs`."""
    return {path: _sha256(path) for path in paths}


def _strings(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(values)


@frozen(kw_only=True)
class RunRecord:
    """What decides a ``sevsim run``; paths are absolute, as given when it ran.

    ``clock`` is the guest's time source: "none" for a long-mode guest (no machine
    clock), "host" or "icount" on the ``pc`` machine. ``vcpus`` and ``memory`` are
    those of ``--firmware`` (None: a manifest decides them, and its digest is in
    ``inputs``). ``inputs`` maps each file the run read (manifest, configuration,
    firmware) to its SHA-256 (:func:`digests`), so that a replay can say which of them
    changed since.
    """

    guest: str | None = None
    manifest: str | None = None
    firmware: str | None = None
    vars: str | None = None
    config: str | None = None
    plugins: tuple[str, ...] = field(default=(), converter=_strings)
    strict: bool = False
    env: Mapping[str, str] = field(factory=dict)
    era: str | None = None
    vcpus: int | None = None
    memory: int | None = None
    vcpu_type: str | None = None
    clock: str = field(default="none", validator=attrs.validators.in_(CLOCKS))
    timeout: float | None = None
    max_exits: int | None = None
    uart_input: str | None = None
    trace_filter: str | None = None
    hypervisor_view: bool = False
    inputs: Mapping[str, str | None] = field(factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The header's ``run`` object: the fields, and the record's ``version``."""
        return {"version": RUN_VERSION, **attrs.asdict(self, recurse=False)}

    @classmethod
    def from_json(cls, value: object, where: str) -> RunRecord:
        """The record in a trace header's ``run`` object; ConfigError naming ``where``
        if it is missing, newer than this sevsim reads, or not a record."""
        if value is None:
            raise ConfigError(f"{where}: the header has no run record (the trace was not "
                              "written by `sevsim run --trace-file`, or by a sevsim older "
                              "than replay): nothing to replay")  # fmt: skip
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: run record {value!r}: expected a JSON object")
        fields = dict(value)
        version = fields.pop("version", None)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ConfigError(f"{where}: run record version {version!r}: expected an integer >= 1")
        if version > RUN_VERSION:
            raise ConfigError(f"{where}: run record version {version} is newer than this "
                              f"sevsim replays ({RUN_VERSION}); replay it with a newer sevsim")
        try:
            return cls(**fields)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: run record {value!r} is not one sevsim wrote: "
                              f"{exc}") from None  # fmt: skip

    def replayable(self) -> str | None:
        """Why this run cannot be run again with the same result; None if it can."""
        if self.vars is not None:
            return (f"the run wrote its UEFI variable store ({self.vars}): the store it "
                    "started from is gone; record with a copy of it")  # fmt: skip
        if self.clock == "host":
            return ("the guest's time came from the host's clock: timer interrupts land "
                    "elsewhere in every run; record it with --icount")  # fmt: skip
        if self.uart_input == "-":
            return "the guest read its UART from stdin (--uart-input -); record with TEXT"
        if self.clock != "none" and self.uart_input is None:
            return "the guest's UART read the terminal; record with --uart-input TEXT"
        return None

    def argv(self, config: str) -> list[str]:
        """``sevsim run``'s options for this record; ``config`` stands in for a run that
        read no configuration file (an empty one: the defaults, whatever ./sevsim.toml
        the replay finds)."""
        argv = [self.manifest] if self.manifest is not None else []
        options: dict[str, object] = {
            "--guest": self.guest, "--firmware": self.firmware, "--era": self.era,
            "--timeout": self.timeout, "--max-exits": self.max_exits,
            "--uart-input": self.uart_input, "--trace-filter": self.trace_filter,
            "--config": self.config or config,
        }  # fmt: skip
        options.update({"--vcpus": self.vcpus, "--vcpu-type": self.vcpu_type,
                        "--memory": None if self.memory is None else f"{self.memory // 1024}K"})
        for option, value in options.items():
            if value is not None:
                argv += [option, str(value)]
        argv += [arg for flag in self.plugins for arg in ("-p", flag)]
        flags = {"--strict": self.strict, "--icount": self.clock == "icount",
                 "--hypervisor-view": self.hypervisor_view}  # fmt: skip
        return argv + [flag for flag, on in flags.items() if on]

    def changed_inputs(self) -> list[str]:
        """The files the run read that are not what they were (changed or gone)."""
        return [path for path, digest in self.inputs.items() if _sha256(path) != digest]


@frozen
class Divergence:
    """The first event that differs: its index among the events (0 is the first line
    after the header), what the trace holds there and what the new run gave (None
    where one of the two had ended)."""

    index: int
    expected: Mapping[str, Any] | None
    got: Mapping[str, Any] | None


@frozen
class ReplayResult:
    record: RunRecord
    events: int
    divergence: Divergence | None
    changed_inputs: tuple[str, ...] = ()


def comparable(event: Mapping[str, Any]) -> dict[str, Any]:
    """An event without the keys that measure the host's time."""
    return {key: value for key, value in event.items() if key not in WALL_CLOCK_KEYS}


def first_divergence(
    expected: Iterator[Mapping[str, Any]], got: Iterator[Mapping[str, Any]]
) -> tuple[int, Divergence | None]:
    """How many events both traces share, and the first that differs (None if none)."""
    count = 0
    for index, (old, new) in enumerate(itertools.zip_longest(expected, got)):
        old_c = None if old is None else comparable(old)
        new_c = None if new is None else comparable(new)
        if old_c != new_c:
            return index, Divergence(index, old_c, new_c)
        count = index + 1
    return count, None


@contextlib.contextmanager
def _environment(recorded: Mapping[str, str]) -> Iterator[None]:
    """The variables of :data:`ENV_KEYS` as the recorded run had them (set or unset)."""
    before = {key: os.environ.get(key) for key in ENV_KEYS}
    try:
        for key in ENV_KEYS:
            _set_env(key, recorded.get(key))
        yield
    finally:
        for key, value in before.items():
            _set_env(key, value)


def _set_env(key: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value


#: Runs ``sevsim run`` with these options, writing its JSON Lines trace to the path.
Rerun = Callable[[Sequence[str], Path], object]


def replay(path: str | os.PathLike[str], rerun: Rerun) -> ReplayResult:
    """Run the run the trace at ``path`` records again (through ``rerun``) and compare.

    A trace that cannot be read, has no run record or records a run that is not
    replayable raises ConfigError; a run that ends differently is a divergence, not
    an error.
    """
    where = f"trace file {os.fspath(path)}"
    record = RunRecord.from_json(read_header(path).get("run"), where)
    why_not = record.replayable()
    if why_not is not None:
        raise ConfigError(f"{where}: not replayable: {why_not}")
    with tempfile.TemporaryDirectory(prefix="sevsim-replay-") as scratch:
        empty_config = Path(scratch, "empty.toml")
        empty_config.write_text("")
        again = Path(scratch, "replay.jsonl")
        with _environment(record.env):
            rerun(record.argv(str(empty_config)), again)
        count, divergence = first_divergence(read_trace(path), read_trace(again))
    return ReplayResult(record, count, divergence, tuple(record.changed_inputs()))
