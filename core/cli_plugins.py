"""``sevsim plugins`` and ``sevsim plugins check``: which plugins load, and their problems.

The listing shows, besides the exit codes each plugin owns, the simulator hooks it
implements (``sevsim_sim_*``): those see what no real hypervisor sees (guest RIPs,
the instruction behind an exit), so a user can tell at a glance which plugins are
hypervisor features and which read the simulator's view.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from sevsim.cli_base import EXIT_FAILED, EXIT_OK, Parser, add_command, plugin_host
from sevsim.cli_plugins_new import add_new_command
from sevsim.kvm.dispatch import ExitHandler
from sevsim.plugin.host import ACTIVE, PluginInfo


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
        "sim_hooks": list(info.sim_hooks),
    }


def _owned(info: PluginInfo) -> str:
    codes = [e.describe() for e in info.owns]
    codes += [f"{e.describe()} [conflict]" for e in info.contested]
    return ", ".join(codes) or "-"


def table(rows: list[list[str]]) -> str:
    """Rows of cells in columns two spaces apart (the last column is not padded)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[-1]])
        for row in rows
    )


def cmd_plugins(args: argparse.Namespace) -> int:
    """List every plugin: name, version, source, status, the simulator hooks it
    implements and the exit codes it owns."""
    host = plugin_host(args)
    infos, problems = host.plugins(), host.problems()
    if args.json:
        document = {
            "plugins": [_row(i) for i in infos],
            "problems": [{"message": p.message, "fatal": p.fatal} for p in problems],
        }
        print(json.dumps(document, indent=2))
        return EXIT_OK
    rows = [["NAME", "VERSION", "SOURCE", "STATUS", "SIM_HOOKS", "OWNS"]]
    rows += [[i.name, i.version or "-", i.source, i.status_line, ",".join(i.sim_hooks) or "-",
              _owned(i)] for i in infos]  # fmt: skip
    print(table(rows) if infos else "no sevsim plugins installed")
    if problems:
        print("\nproblems (run `sevsim plugins check`):")
        for problem in problems:
            print(f"  {problem.message}")
    return EXIT_OK


def cmd_plugins_check(args: argparse.Namespace) -> int:
    """Exit non-zero, saying why, if a plugin failed to load or two claim one code."""
    host = plugin_host(args)
    problems = host.problems()
    if problems:
        print(f"{len(problems)} plugin problem(s):")
        for problem in problems:
            print(f"  {problem.message}")
        return EXIT_FAILED
    active = [i for i in host.plugins() if i.status == ACTIVE]
    owned = sum(len(i.owns) for i in active)
    print(f"ok: {len(active)} plugin(s) active, {owned} exit code(s) owned, no conflicts")
    return EXIT_OK


def add_plugins_command(commands: argparse._SubParsersAction[Parser]) -> None:
    plugins = add_command(
        commands, "plugins", "list the installed plugins and their state",
        examples=["sevsim plugins", "sevsim plugins --json", "sevsim -p no:mmio plugins",
                  "sevsim plugins check", "sevsim plugins new my_plugin"],
    )  # fmt: skip
    plugins.add_argument("--json", action="store_true", help="print JSON instead of a table")
    plugins.set_defaults(func=cmd_plugins)
    checks = plugins.add_subparsers(title="subcommands", metavar="{check,new}")
    check = add_command(checks, "check", "exit non-zero on load failures or conflicts",
                        examples=["sevsim plugins check --strict"])  # fmt: skip
    check.set_defaults(func=cmd_plugins_check)
    add_new_command(checks)
