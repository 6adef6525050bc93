"""``sevsim replay TRACE.jsonl``: run again what a trace records and report the first
event that differs (:mod:`sevsim.replay`).

The trace's header says what ran (:func:`record_of` writes it for every ``sevsim run
--trace-file``); the replay runs it through the very ``run`` command, its trace into
a scratch file and its console output dropped, and compares. Exit status 0: the two
traces are the same, event for event (host times aside); 1: they differ, and the
first event that does is printed with what the trace expected and what the run gave;
2: the trace cannot be read, has no run record, or records a run that cannot be
reproduced (each said on one line).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sevsim.cli_base import (
    EXIT_FAILED,
    EXIT_OK,
    Parser,
    Style,
    add_command,
    common_options,
    plugin_flags,
    say,
)
from sevsim.manifest import find_guest
from sevsim.plugin.config import config_file
from sevsim.replay import ENV_KEYS, ReplayResult, Rerun, RunRecord, digests, replay


def _absolute(path: str | os.PathLike[str] | None) -> str | None:
    return None if path is None else os.path.abspath(path)


def record_of(args: argparse.Namespace, clock: str) -> RunRecord:
    """The run record of the ``sevsim run`` that ``args`` describe; ``clock`` is its
    guest time source ("none", "host" or "icount")."""
    config = _absolute(config_file(args.config))
    manifest, firmware = _absolute(args.manifest), _absolute(args.firmware)
    bundled = None if args.guest is None else str(find_guest(args.guest))
    machine = clock != "none"  # the pc machine; a manifest sets its vCPUs and memory
    return RunRecord(
        guest=args.guest, manifest=manifest, firmware=firmware, vars=_absolute(args.vars),
        config=config, plugins=plugin_flags(args), strict=args.strict,
        env={key: os.environ[key] for key in ENV_KEYS if key in os.environ}, era=args.era,
        vcpus=args.vcpus if firmware else None, memory=args.memory if firmware else None,
        vcpu_type=args.vcpu_type if machine else None, clock=clock, timeout=args.timeout,
        max_exits=args.max_exits, uart_input=args.uart_input,
        trace_filter=None if args.trace_filter is None else str(args.trace_filter),
        hypervisor_view=args.hypervisor_view,
        inputs=digests([p for p in (manifest, bundled, config, firmware) if p is not None]),
    )  # fmt: skip


def _rerun(run: argparse.ArgumentParser) -> Rerun:
    """``sevsim run`` with the recorded options, quietly, its trace to the given file
    (options that do not parse are an error of the trace, reported as ``run``'s)."""
    top = Parser(add_help=False)
    common_options(top, top=True)

    def rerun(argv: Sequence[str], trace_file: Path) -> object:
        args = run.parse_args([*argv, "-q", "--trace-format", "jsonl", "--trace-file",
                               str(trace_file)], namespace=top.parse_args([]))  # fmt: skip
        # Its console and its verdict are the recorded run's business, not the replay's.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return args.func(args)

    return rerun


def _event(event: Mapping[str, Any] | None) -> str:
    return "(the trace ends here)" if event is None else json.dumps(event, separators=(",", ":"))


def _report(result: ReplayResult, as_json: bool) -> None:
    divergence = result.divergence
    if as_json:
        body: dict[str, Any] = {"identical": divergence is None, "events": result.events,
                                "changed_inputs": list(result.changed_inputs)}  # fmt: skip
        if divergence is not None:
            body.update(index=divergence.index, expected=divergence.expected,
                        got=divergence.got)  # fmt: skip
        print(json.dumps(body, indent=2))
        return
    for path in result.changed_inputs:
        say(f"{path} is not the file the run read (changed since, or gone)", "warning")
    if divergence is None:
        print(f"identical: {result.events} events")
        return
    style = Style.of(sys.stdout)
    print(f"{style('error', 'diverged')} at event {divergence.index} (after "
          f"{result.events} identical events)")  # fmt: skip
    print(f"  expected: {_event(divergence.expected)}")
    print(f"  got:      {_event(divergence.got)}")


def cmd_replay(args: argparse.Namespace) -> int:
    result = replay(args.trace, _rerun(args.run_parser))
    _report(result, args.json)
    return EXIT_OK if result.divergence is None else EXIT_FAILED


def add_replay_command(commands: argparse._SubParsersAction[Parser]) -> None:
    """Register ``replay``; it runs traces through ``run``, registered before it."""
    replay_parser = add_command(
        commands, "replay",
        "run again what a JSON Lines trace records; report the first event that differs",
        description="Run again the run a JSON Lines trace records (its header says what "
                    "ran: the guest or firmware, the configuration and plugins, the KVM "
                    "era, the machine and its clock) and compare the two traces event "
                    "by event, host times aside (docs/replay.md). Exit status 0 if they "
                    "are the same, 1 if not (the first event that differs is printed), 2 "
                    "if the trace cannot be replayed.",
        examples=["sevsim run --guest demo -q --trace-file run.jsonl && "
                  "sevsim replay run.jsonl",
                  "sevsim replay boot.jsonl --json"],
    )  # fmt: skip
    replay_parser.add_argument("trace", metavar="TRACE", help="a JSON Lines trace of sevsim run")
    replay_parser.add_argument("--json", action="store_true", help="print JSON")
    replay_parser.set_defaults(func=cmd_replay, run_parser=commands.choices["run"])
