"""The ``sevsim`` command line.

Every subcommand takes the plugin options (``--config FILE``, ``-p NAME`` /
``-p no:NAME``, ``--strict``) before or after its name, so ``sevsim -p no:ioio run``
and ``sevsim run -p no:ioio`` mean the same. A subcommand is a function
``(args) -> exit status`` set with ``set_defaults(func=...)`` on a parser made by
:func:`add_command`; :func:`plugin_host` gives it the host the options describe.
A :class:`~sevsim.errors.SevsimError` ends the command with one line on stderr and
status 2, never a traceback.

Exit statuses: 0 success; 1 ``sevsim plugins check`` found problems, or the VM of
``sevsim run`` did not end normally (the rules are :mod:`sevsim.vmm.runner`'s, and
``sevsim run --help`` lists them), with a last line on stderr saying why; 2 a usage
or configuration error.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections.abc import Sequence
from typing import Any

from sevsim.errors import SevsimError
from sevsim.guest.demo import demo_image
from sevsim.kvm.dispatch import ExitHandler
from sevsim.plugin.config import config_file, load_config
from sevsim.plugin.host import ACTIVE, PluginHost, PluginInfo
from sevsim.vmm.config import load_kvm_settings
from sevsim.vmm.runner import TIMEOUT_EXPECTED, check_timeout, run_image

#: Exit status for a usage or configuration error (as argparse uses).
EXIT_ERROR = 2
#: Exit status of ``sevsim plugins check`` when it found problems.
EXIT_PROBLEMS = 1
#: Exit status of ``sevsim run`` when the VM did not end normally.
EXIT_VM_FAILED = 1


def _plugin_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """The plugin options; on a subcommand they must not reset what was given before it."""
    unset = None if top else argparse.SUPPRESS
    parser.add_argument(
        "--config", metavar="FILE", default=unset,
        help="read this file instead of ./sevsim.toml",
    )
    parser.add_argument(
        "-p", metavar="NAME|no:NAME", action="append",
        dest="plugin_flags" if top else "more_plugin_flags", default=[] if top else unset,
        help="enable (NAME) or disable (no:NAME) a plugin; repeatable, the last one wins",
    )
    parser.add_argument(
        "--strict", action="store_true", default=False if top else unset,
        help="a plugin that fails to load stops sevsim instead of being skipped",
    )  # fmt: skip


def add_command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    help: str,
    epilog: str | None = None,
) -> argparse.ArgumentParser:
    """A subcommand parser that also accepts the plugin options."""
    parser = commands.add_parser(
        name, help=help, description=help, epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    _plugin_options(parser, top=False)
    return parser


def plugin_host(args: argparse.Namespace) -> PluginHost:
    """The plugin host the command-line options, environment and config file describe."""
    flags = [*args.plugin_flags, *getattr(args, "more_plugin_flags", [])]
    return PluginHost(load_config(args.config, cli=flags, strict=args.strict))


# --- sevsim plugins -------------------------------------------------------------------


def _codes(entries: tuple[ExitHandler, ...]) -> list[dict[str, Any]]:
    return [{"kind": e.kind.value, "code": e.code, "name": e.describe()} for e in entries]


def _row(info: PluginInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "version": info.version,
        "source": info.source,
        "status": info.status,
        "why": info.why,
        "owns": _codes(info.owns),
        "contested": _codes(info.contested),
    }


def _owned(info: PluginInfo) -> str:
    codes = [e.describe() for e in info.owns]
    codes += [f"{e.describe()} [conflict]" for e in info.contested]
    return ", ".join(codes) or "-"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[-1]])
        for row in rows
    )


def cmd_plugins(args: argparse.Namespace) -> int:
    """List every plugin: name, version, source, status and the exit codes it owns."""
    host = plugin_host(args)
    infos, problems = host.plugins(), host.problems()
    if args.json:
        document = {
            "plugins": [_row(i) for i in infos],
            "problems": [{"message": p.message, "fatal": p.fatal} for p in problems],
        }
        print(json.dumps(document, indent=2))
        return 0
    rows = [["NAME", "VERSION", "SOURCE", "STATUS", "OWNS"]]
    rows += [[i.name, i.version or "-", i.source, i.status_line, _owned(i)] for i in infos]
    print(_table(rows) if infos else "no sevsim plugins installed")
    if problems:
        print("\nproblems (run `sevsim plugins check`):")
        for problem in problems:
            print(f"  {problem.message}")
    return 0


def cmd_plugins_check(args: argparse.Namespace) -> int:
    """Exit non-zero, saying why, if a plugin failed to load or two claim one code."""
    host = plugin_host(args)
    problems = host.problems()
    if problems:
        print(f"{len(problems)} plugin problem(s):")
        for problem in problems:
            print(f"  {problem.message}")
        return EXIT_PROBLEMS
    active = [i for i in host.plugins() if i.status == ACTIVE]
    owned = sum(len(i.owns) for i in active)
    print(f"ok: {len(active)} plugin(s) active, {owned} exit code(s) owned, no conflicts")
    return 0


def _add_plugins_command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    plugins = add_command(commands, "plugins", "list the installed plugins and their state")
    plugins.add_argument("--json", action="store_true", help="print JSON instead of a table")
    plugins.set_defaults(func=cmd_plugins)
    checks = plugins.add_subparsers(title="subcommands", metavar="check")
    check = add_command(checks, "check", "exit non-zero on load failures or conflicts")
    check.set_defaults(func=cmd_plugins_check)


# --- sevsim run -------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    """Run the bundled demo guest and print its trace and a summary."""
    host = plugin_host(args)
    table = host.start()
    for problem in host.problems():
        print(f"sevsim: warning: {problem.message}", file=sys.stderr)
    echo = None if args.quiet else print
    kvm = load_kvm_settings(config_file(args.config), args.era)
    uart_input = sys.stdin.buffer.read() if args.uart_input == "-" else args.uart_input.encode()
    result = run_image(demo_image(), table, host.events, echo=echo,
                       timeout=args.timeout, uart_input=uart_input, **kvm.vm_args())  # fmt: skip
    for line in result.trace.summary(result.exit, 0):
        print(line)
    failure = result.failure
    if failure is not None:
        print(f"sevsim: run failed: {failure}", file=sys.stderr)
        return EXIT_VM_FAILED
    return 0


def _timeout(text: str) -> float:
    """``--timeout``: a finite number of seconds > 0."""
    try:
        return check_timeout(float(text), "--timeout")
    except (ValueError, SevsimError):
        raise argparse.ArgumentTypeError(f"{text!r}: {TIMEOUT_EXPECTED}") from None


_RUN_EPILOG = textwrap.dedent("""\
    exit status:
      0  the VM ended normally: the guest asked for termination with the general
         reason (SEV_TERM, TERM_REQ set 0 code 0) or halted (HLT)
      1  the VM ended any other way: a termination request with another reason
         (or a halt after such a request nobody handled), shutdown, internal
         error, or a failed KVM_RUN (-EINTR after --timeout;
         -EINVAL for a termination request in the v5.11 era); the last line on
         stderr says why
      2  a usage or configuration error
""")


def _add_run_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = add_command(commands, "run", "run the bundled demo guest and print its trace",
                      epilog=_RUN_EPILOG)  # fmt: skip
    run.add_argument("-q", "--quiet", action="store_true", help="print only the summary")
    run.add_argument("--era", metavar="ERA", help="KVM behaviour: newest (default) or v5.11")
    run.add_argument("--timeout", metavar="SECONDS", type=_timeout, default=60.0,
                     help="stop a guest that runs longer than this (default 60; "
                          "a finite number > 0)")  # fmt: skip
    run.add_argument("--uart-input", metavar="TEXT", default="",
                     help="bytes the guest can read from the UART ('-': read standard input)")
    run.set_defaults(func=cmd_run)


# --- entry point ----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sevsim", description="A simulator of an AMD SEV-ES hypervisor (Linux KVM)."
    )
    _plugin_options(parser, top=True)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    _add_plugins_command(commands)
    _add_run_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SevsimError as e:
        print(f"sevsim: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
