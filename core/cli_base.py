"""What every ``sevsim`` command shares: its options, exit statuses, output and errors.

Each subcommand module (``sevsim.cli_run``, ``sevsim.cli_trace``, ...) builds its
parsers with :func:`add_command`, so the common options (plugin selection, ``-q``/
``-v``, ``--debug``) are accepted before or after the command's name, and reads the
options back through :func:`plugin_host` and :func:`verbosity`. The exit statuses of
all commands are stated once, in :data:`EXIT_STATUS_TABLE`.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from collections.abc import Mapping, Sequence
from typing import IO, NoReturn

from sevsim.plugin.config import load_config
from sevsim.plugin.host import PluginHost

#: The command succeeded; a run ended normally; an attack's property held.
EXIT_OK = 0
#: The command ran and reports a failure: the VM ended abnormally, ``plugins check``
#: found problems, an attack's property did not hold, ``run --check`` found a mismatch.
EXIT_FAILED = 1
#: A usage or configuration error (as argparse uses).
EXIT_ERROR = 2
#: A bug in sevsim itself: an exception no command expected (``--debug`` shows it).
EXIT_INTERNAL = 70
#: Interrupted with Ctrl-C (128 + SIGINT, as shells report it).
EXIT_INTERRUPTED = 130
#: stdout was closed before the output ended (128 + SIGPIPE).
EXIT_BROKEN_PIPE = 141

#: Every exit status of every command, in one place: ``sevsim --help``, ``sevsim run
#: --help`` and the README show this table. 3, 4 and 5 are the run loop's
#: (:class:`sevsim.vmm.vmm.EndKind`), and isa-debug-exit's statuses are QEMU's.
EXIT_STATUS_TABLE = """\
exit status (every command):
  0    success: the run ended normally (a termination request with reason set 0
       code 0, an ACPI power-off, or every vCPU halted with nothing to wake it);
       an attack scenario's property held
  1    failure: the VM ended any other way (a termination request with a failure
       reason, shutdown, internal error, failed KVM_RUN); `plugins check` found
       problems; an attack's property did not hold; `run --check` found a
       mismatch with the manifest's [expect]. The last line on stderr says why
  2    a usage or configuration error (options, sevsim.toml, manifest, firmware,
       trace file): one line on stderr
  3    the guest asked for a system reset (an SEV-ES VM cannot be reset)
  4    a limit ended the run: --timeout or --max-exits
  5    the user left the console (Ctrl-A x)
  2V+1 the guest wrote V to QEMU's isa-debug-exit port 0x501 (QEMU's rule, so
       these odd statuses can coincide with 1, 3 and 5)
  70   an internal error in sevsim (a bug: --debug shows the traceback)
  130  interrupted (Ctrl-C)
  141  stdout was closed early (a pipe into head): the rest was not written
"""

#: Colour codes (SGR) by role, for :class:`Style`.
_SGR = {"error": "1;31", "warning": "33", "exit": "36", "ok": "32", "bold": "1"}


def colour_wanted(stream: IO[str], env: Mapping[str, str] | None = None) -> bool:
    """Colour only on a terminal, and never when ``NO_COLOR`` is set to anything
    non-empty (https://no-color.org)."""
    environ = os.environ if env is None else env
    if environ.get("NO_COLOR", ""):
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class Style:
    """Wraps text in colour codes for one stream, or leaves it alone."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    @classmethod
    def of(cls, stream: IO[str]) -> Style:
        return cls(colour_wanted(stream))

    def __call__(self, role: str, text: str) -> str:
        if not self.enabled or not text:
            return text
        return f"\x1b[{_SGR[role]}m{text}\x1b[0m"


def say(message: str, role: str = "note") -> None:
    """One line on stderr, prefixed ``sevsim:`` (a role other than note names itself:
    ``sevsim: warning: ...``)."""
    style = Style.of(sys.stderr)
    prefix = "sevsim:" if role == "note" else f"sevsim: {style(role, role + ':')}"
    print(f"{prefix} {' '.join(message.split())}", file=sys.stderr, flush=True)


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (no usage block) and the status of
    :data:`EXIT_ERROR`: ``sevsim run: error: ... (see 'sevsim run --help')``."""

    def error(self, message: str) -> NoReturn:
        style = Style.of(sys.stderr)
        print(f"{self.prog}: {style('error', 'error:')} {message} "
              f"(see '{self.prog} --help')", file=sys.stderr)  # fmt: skip
        raise SystemExit(EXIT_ERROR)


def common_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """Options every command takes, before or after its name. On a subcommand their
    defaults are suppressed, so that they do not reset what was given before it."""
    unset = None if top else argparse.SUPPRESS
    group = parser.add_argument_group("common options")
    group.add_argument(
        "--config", metavar="FILE", default=unset,
        help="read this file instead of ./sevsim.toml",
    )
    group.add_argument(
        "-p", metavar="NAME|no:NAME", action="append",
        dest="plugin_flags" if top else "more_plugin_flags", default=[] if top else unset,
        help="enable (NAME) or disable (no:NAME) a plugin; repeatable, the last one wins",
    )
    group.add_argument(
        "--strict", action="store_true", default=False if top else unset,
        help="a plugin that fails to load stops sevsim instead of being skipped",
    )
    group.add_argument("-q", "--quiet", action="count", default=0 if top else unset,
                       help="say less (run: no trace, only the summary)")
    group.add_argument("-v", "--verbose", action="count", default=0 if top else unset,
                       help="say more (run --firmware: the trace on stderr)")
    group.add_argument("--debug", action="store_true", default=False if top else unset,
                       help="show the traceback of an error")  # fmt: skip


def add_command(
    commands: argparse._SubParsersAction[Parser],
    name: str,
    help: str,
    *,
    description: str | None = None,
    examples: Sequence[str] = (),
    epilog: str | None = None,
) -> Parser:
    """A subcommand parser with the common options, its examples and ``epilog``
    (an exit status table, say) under its help."""
    parts = []
    if examples:
        parts.append("examples:\n" + "\n".join(f"  {line}" for line in examples))
    if epilog:
        parts.append(epilog)
    parser = commands.add_parser(
        name, help=help, description=textwrap.fill(description or help, 79),
        epilog="\n\n".join(parts) or None, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    common_options(parser, top=False)
    return parser


def plugin_host(args: argparse.Namespace) -> PluginHost:
    """The plugin host the command-line options, environment and config file describe."""
    return PluginHost(load_config(args.config, cli=plugin_flags(args), strict=args.strict))


def plugin_flags(args: argparse.Namespace) -> list[str]:
    """Every ``-p`` value, before and after the command's name, in order."""
    return [*args.plugin_flags, *getattr(args, "more_plugin_flags", [])]


def verbosity(args: argparse.Namespace) -> int:
    """-1 and below quiet, 0 normal, 1 and above verbose."""
    return int(args.verbose) - int(args.quiet)


def warn_problems(host: PluginHost) -> None:
    """The plugin host's non-fatal problems, one warning line each."""
    for problem in host.problems():
        say(problem.message, "warning")
