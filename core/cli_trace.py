"""The trace on the command line: ``sevsim run``'s trace options and ``sevsim trace``.

``sevsim run`` writes the human-readable trace (:class:`sevsim.trace.Trace`), the JSON
Lines trace (:class:`sevsim.trace_jsonl.JsonlSink`), or both, from the same events:
:class:`TraceOutput` builds the sinks from the options and hands out the two places
events come from, kvm's events (``create_vm(events=...)``) and the simulator's view
(``Platform(sim=...)``). ``--trace-filter`` selects what both show; the text trace
still hears every event, since the run's verdict needs the termination reason it
records, and only its printed lines are filtered (``Trace(shown=...)``).
``--hypervisor-view`` leaves out the simulator's view (guest RIPs, instructions,
#VCs) from both: what KVM can see. Device accesses are in the JSONL trace; the text
trace shows them only when the filter names them (``event=device_access,...``), since
the handlers' notes already say what each exit read or wrote.

``sevsim trace summarize FILE`` and ``sevsim trace report FILE -o PAGE`` read a JSON
Lines trace back (:mod:`sevsim.trace_summary`, :mod:`sevsim.trace_report`).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO

from sevsim.cli_base import EXIT_OK, Parser, Style, add_command, verbosity
from sevsim.cli_replay import record_of
from sevsim.errors import ConfigError
from sevsim.hw import SimSink
from sevsim.kvm.events import EventSink, TeeSink
from sevsim.trace import Trace
from sevsim.trace_filter import TraceFilter
from sevsim.trace_jsonl import JsonlSink, read_trace
from sevsim.trace_report import render_html
from sevsim.trace_schema import PHASE
from sevsim.trace_summary import summarize

FORMATS = ("text", "jsonl")


def _formats(text: str) -> list[str]:
    """``--trace-format``: one format or several, comma-separated."""
    chosen = [part.strip() for part in text.split(",") if part.strip()]
    bad = [part for part in chosen if part not in FORMATS]
    if bad or not chosen:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected {' or '.join(FORMATS)}, or both as text,jsonl"
        )
    return chosen


def _filter(text: str) -> TraceFilter:
    try:
        return TraceFilter.parse(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_trace_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("trace")
    group.add_argument(
        "--trace-format", metavar="FORMAT", type=_formats, action="extend",
        help="text (the default for --guest and manifests), jsonl (needs --trace-file), "
             "or both: text,jsonl. The text trace goes to stdout, or to stderr with "
             "--firmware (stdout is the console)",
    )
    group.add_argument(
        "--trace-file", metavar="FILE", type=Path,
        help="write the JSON Lines trace here (docs/trace-format.md); implies "
             "--trace-format jsonl when no format is given",
    )
    group.add_argument(
        "--trace-filter", metavar="EXPR", type=_filter,
        help="keep only some events, in both traces: "
             "'event=vmgexit_enter,exit_handled;vcpu=0;plugin=ioio;code=SVM_EXIT_IOIO'",
    )
    group.add_argument(
        "--hypervisor-view", action="store_true",
        help="leave out what only the simulator sees (guest RIP, instruction, #VC): "
             "trace what KVM could see",
    )  # fmt: skip


def chosen_formats(args: argparse.Namespace, *, text_by_default: bool) -> set[str]:
    """The trace formats a run writes, with the rules of ``--trace-format``'s help."""
    if args.trace_format is not None:
        formats = set(args.trace_format)
        if "jsonl" in formats and args.trace_file is None:
            raise ConfigError("--trace-format jsonl needs --trace-file FILE: where to write it")
        if "jsonl" not in formats and args.trace_file is not None:
            given = ",".join(sorted(formats))
            raise ConfigError(f"--trace-file {args.trace_file} holds the jsonl trace, but "
                              f"--trace-format is {given}: add jsonl")  # fmt: skip
        return formats
    formats = {"text"} if text_by_default else set()
    if args.trace_file is not None:
        formats.add("jsonl")
    return formats


def styled_line(style: Style) -> Callable[[str], str]:
    """How a text trace line is coloured: exits, the guest's console, what reaches
    userspace."""

    def colour(line: str) -> str:
        if line.startswith("#"):
            return style("exit", line)
        if line.lstrip().startswith("[uart]"):
            return style("ok", line)
        if line.startswith("      -> "):
            return style("bold", line)
        return line

    return colour


class TraceOutput:
    """The traces one ``sevsim run`` writes; a context manager that closes the file.

    ``text_stream`` is where the text trace is printed; without the text format the
    :class:`Trace` is still kept, silent: it decodes the run's end. ``guest_clock``
    gives the JSONL trace guest time (a machine's clock); ``host_times`` False leaves
    the host's clock out of it (a reproducible ``--icount`` run). Device accesses get
    text lines when a filter names them or with ``-vv`` (they repeat the handlers'
    notes, naming the device).
    """

    def __init__(
        self,
        args: argparse.Namespace,
        *,
        text_stream: IO[str],
        text_by_default: bool,
        guest_clock: Callable[[], int] | None = None,
        host_times: bool = True,
    ) -> None:
        formats = chosen_formats(args, text_by_default=text_by_default)
        if verbosity(args) < 0:
            formats.discard("text")
        self.hypervisor_view: bool = args.hypervisor_view
        trace_filter: TraceFilter | None = args.trace_filter
        self._file: IO[str] | None = None
        self.jsonl: JsonlSink | None = None
        if "jsonl" in formats:
            try:
                self._file = open(args.trace_file, "w", encoding="utf-8")
            except OSError as e:
                raise ConfigError(f"--trace-file {args.trace_file}: cannot write it: "
                                  f"{e.strerror}") from None  # fmt: skip
            clock = "none" if guest_clock is None else "icount" if args.icount else "host"
            self.jsonl = JsonlSink(self._file, trace_filter=trace_filter,
                                   guest_clock=guest_clock, host_times=host_times,
                                   run=record_of(args, clock).to_json())  # fmt: skip
        echo: Callable[[str], None] | None = None
        if "text" in formats:
            echo = _printer(text_stream)
        self.trace = Trace(
            echo, hypervisor_view=self.hypervisor_view,
            shown=trace_filter.matches if trace_filter else None,
            device_accesses=(trace_filter is not None and trace_filter.names("device_access"))
            or verbosity(args) >= 2,
        )  # fmt: skip

    def events(self, *others: EventSink) -> EventSink:
        """What kvm reports to besides the text trace: ``others`` (the plugins'
        observers), then the JSONL trace."""
        sinks: list[EventSink] = [*others]
        if self.jsonl is not None:
            sinks.append(self.jsonl)
        return TeeSink(*sinks)

    def sim(self, *others: SimSink) -> SimSink:
        """The simulator's view besides the text trace: ``others`` (plugin observers)
        and, unless ``--hypervisor-view``, the JSONL trace."""
        sinks: list[SimSink] = [*others]
        if self.jsonl is not None and not self.hypervisor_view:
            sinks.append(self.jsonl)
        return TeeSink(*sinks)

    def phase(self, name: str) -> None:
        """A phase marker (docs/trace-format.md) in the JSONL trace."""
        if self.jsonl is not None and self.jsonl.wants(PHASE):
            self.jsonl.emit(PHASE, name=name)

    def __enter__(self) -> TraceOutput:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:  # fmt: skip
        if self._file is not None:
            self._file.close()


def _printer(stream: IO[str]) -> Callable[[str], None]:
    colour = styled_line(Style.of(stream))

    def echo(line: str) -> None:
        print(colour(line), file=stream, flush=True)

    return echo


# --- sevsim trace --------------------------------------------------------------------------


def cmd_summarize(args: argparse.Namespace) -> int:
    """Exits by code, plugin and vCPU of a JSON Lines trace, like ``perf kvm stat``."""
    summary = summarize(read_trace(args.file), top=args.top)
    print(summary.to_json() if args.json else summary.render())
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    """One self-contained HTML page of a JSON Lines trace."""
    title = args.title or f"sevsim trace {Path(args.file).name}"
    page = render_html(read_trace(args.file), title)
    output: Path = args.output
    try:
        output.write_text(page, encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"-o {output}: cannot write the report: {e.strerror}") from None
    if verbosity(args) >= 0:
        print(f"wrote {output} ({len(page.encode()) // 1024 + 1} KiB)", file=sys.stderr)
    return EXIT_OK


def _top(text: str) -> int:
    with contextlib.suppress(ValueError):
        if int(text) >= 1:
            return int(text)
    raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number >= 1")


def add_trace_command(commands: argparse._SubParsersAction[Parser]) -> None:
    trace = add_command(
        commands, "trace", "read a JSON Lines trace: summarize it, or make a report",
        examples=["sevsim run --guest demo --trace-file run.jsonl",
                  "sevsim trace summarize run.jsonl",
                  "sevsim trace report run.jsonl -o report.html"],
    )  # fmt: skip
    subcommands = trace.add_subparsers(title="subcommands", metavar="COMMAND", required=True)
    summary = add_command(
        subcommands, "summarize",
        "exits by code, by plugin and by vCPU, with the time spent (like perf kvm stat)",
        examples=["sevsim trace summarize run.jsonl",
                  "sevsim trace summarize run.jsonl --json | jq .exits"],
    )  # fmt: skip
    summary.add_argument("file", metavar="FILE", help="a trace from sevsim run --trace-file")
    summary.add_argument("--json", action="store_true", help="print JSON instead of tables")
    summary.add_argument("--top", type=_top, default=10, metavar="N",
                         help="how many of the slowest handler calls to list (default 10)")
    summary.set_defaults(func=cmd_summarize)
    report = add_command(
        subcommands, "report",
        "one self-contained HTML page: exits over time per vCPU, phases, top exits, "
        "slowest handlers",
        examples=["sevsim trace report run.jsonl -o report.html"],
    )  # fmt: skip
    report.add_argument("file", metavar="FILE", help="a trace from sevsim run --trace-file")
    report.add_argument("-o", "--output", type=Path, required=True, metavar="PAGE",
                        help="where to write the page")
    report.add_argument("--title", help="the page's title (default: the trace's file name)")
    report.set_defaults(func=cmd_report)
