"""The ``sevsim`` command line.

Commands: ``run`` (a guest, a manifest or a firmware image; :mod:`sevsim.cli_run`),
``guests``, ``measure`` (:mod:`sevsim.cli_firmware`), ``trace summarize|report``
(:mod:`sevsim.cli_trace`), ``replay`` (:mod:`sevsim.cli_replay`), ``attack``
(:mod:`sevsim.cli_attack`) and ``plugins``
(:mod:`sevsim.cli_plugins`). Every command takes the common options (``--config
FILE``, ``-p NAME`` / ``-p no:NAME``, ``--strict``, ``-q``, ``-v``, ``--debug``)
before or after its name, so ``sevsim -p no:ioio run`` and ``sevsim run -p no:ioio``
mean the same. A command is a function ``(args) -> exit status`` set with
``set_defaults(func=...)`` on a parser made by :func:`sevsim.cli_base.add_command`.

Errors are one line on stderr, never a traceback: a
:class:`~sevsim.errors.SevsimError` (bad input) ends the command with status 2, an
unexpected exception (a bug) with 70, Ctrl-C with 130; ``--debug`` shows the
traceback. Colour only on a terminal, and never with ``NO_COLOR`` set.

Exit statuses: 0 success; 1 ``sevsim plugins check`` found problems, or the VM of
``sevsim run`` did not end normally, or an attack's property did not hold, with a
last line on stderr saying why; 2 a usage or configuration error; 3, 4 and 5 a run
that ended on a reset request, a limit, or the user leaving the console; the rest
in :data:`sevsim.cli_base.EXIT_STATUS_TABLE`, which ``--help`` shows.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence

import sevsim
from sevsim.cli_attack import add_attack_command
from sevsim.cli_base import (
    EXIT_BROKEN_PIPE,
    EXIT_ERROR,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_STATUS_TABLE,
    Parser,
    common_options,
    say,
)
from sevsim.cli_firmware import add_measure_command
from sevsim.cli_plugins import add_plugins_command
from sevsim.cli_replay import add_replay_command
from sevsim.cli_run import add_guests_command, add_run_command
from sevsim.cli_trace import add_trace_command
from sevsim.errors import SevsimError

_EXAMPLES = """\
examples:
  sevsim run                          run the demo guest and print its trace
  sevsim guests                       the bundled guests
  sevsim run my-guest.toml            a guest of your own (docs/guest-manifests.md)
  sevsim run --guest demo --trace-file run.jsonl && sevsim trace summarize run.jsonl
  sevsim replay run.jsonl             run it again; the first event that differs
  sevsim run --firmware /usr/share/OVMF/OVMF_CODE.fd --vars vars.fd
  sevsim measure --firmware /usr/share/OVMF/OVMF_CODE.fd --vcpus 4 --vcpu-type EPYC-Milan
  sevsim attack list
  sevsim plugins check

'sevsim COMMAND --help' describes each command.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="sevsim",
        description="A simulator of an AMD SEV-ES hypervisor, modelled on Linux KVM's SEV-ES\n"
                    "support: guests run as encrypted VMs and every exit is traced.",
        epilog=_EXAMPLES + "\n" + EXIT_STATUS_TABLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--version", action="version", version=f"sevsim {sevsim.__version__}")
    common_options(parser, top=True)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    add_run_command(commands)
    add_guests_command(commands)
    add_measure_command(commands)
    add_trace_command(commands)
    add_replay_command(commands)
    add_attack_command(commands)
    add_plugins_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except SevsimError as e:
        if args.debug:
            traceback.print_exc()
        say(str(e), "error")
        return EXIT_ERROR
    except BrokenPipeError:
        # stdout went away (``sevsim run | head``): stop quietly, as a process killed by
        # SIGPIPE does, and keep Python from failing again when it flushes stdout.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        print(file=sys.stderr)
        say("interrupted")
        return EXIT_INTERRUPTED
    except Exception as e:
        if args.debug:
            traceback.print_exc()
        say(f"internal error (a bug in sevsim): {type(e).__name__}: {e}"
            + ("" if args.debug else " (run with --debug for the traceback)"), "error")  # fmt: skip
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
