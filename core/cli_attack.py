"""``sevsim attack``: the attack scenarios of :mod:`sevsim.attack` from the command line.

``sevsim attack list`` shows each scenario's seat (guest, host or plugin), what it
tries and what must hold; ``sevsim attack NAME`` runs one and says whether the
property held (exit status 0) or not (1), with what happened.
"""

from __future__ import annotations

import argparse
import json
import sys

from sevsim.attack import Scenario, UnknownScenario, list_scenarios
from sevsim.cli_base import EXIT_FAILED, EXIT_OK, Parser, Style, add_command, verbosity


def _row(scenario: Scenario) -> dict[str, str]:
    return {"name": scenario.name, "seat": scenario.seat, "tries": scenario.tries,
            "must_hold": scenario.must_hold}  # fmt: skip


def cmd_attack_list(args: argparse.Namespace) -> int:
    scenarios = list_scenarios()
    if args.json:
        print(json.dumps([_row(s) for s in scenarios], indent=2))
    elif verbosity(args) < 0:
        print("\n".join(s.name for s in scenarios))
    else:
        width = max(len(s.name) for s in scenarios)
        for s in scenarios:
            print(f"{s.name.ljust(width)}  {s.seat:<6}  tries:     {s.tries}")
            print(f"{'':{width}}  {'':6}  must hold: {s.must_hold}")
    return EXIT_OK


def cmd_attack(args: argparse.Namespace) -> int:
    if args.name == "list":
        return cmd_attack_list(args)
    scenarios = {s.name: s for s in list_scenarios()}
    scenario = scenarios.get(args.name)
    if scenario is None:
        raise UnknownScenario(f"no attack scenario {args.name!r}; expected list or one of "
                              f"{', '.join(scenarios)}")  # fmt: skip
    result = scenario.run()
    if args.json:
        print(json.dumps({**_row(scenario), "held": result.held, "detail": result.detail},
                         indent=2))  # fmt: skip
    else:
        style = Style.of(sys.stdout)
        verdict = style("ok", "held") if result.held else style("error", "did not hold")
        print(f"scenario:  {scenario.name} ({scenario.seat} seat)")
        print(f"tried:     {scenario.tries}")
        print(f"must hold: {scenario.must_hold}")
        print(f"result:    {verdict}: {result.detail}")
    return EXIT_OK if result.held else EXIT_FAILED


def add_attack_command(commands: argparse._SubParsersAction[Parser]) -> None:
    attack = add_command(
        commands, "attack",
        "run an attack scenario (a malicious guest, host or plugin) or list them",
        description="Attack scenarios: each takes a seat (guest, host or plugin), tries one "
                    "thing and checks what SEV-ES or sevsim's design promises. "
                    "`sevsim attack list` lists them; `sevsim attack NAME` runs one: exit "
                    "status 0 if the property held, 1 if not.",
        examples=["sevsim attack list", "sevsim attack list --json",
                  "sevsim attack vmsa-tamper"],
    )  # fmt: skip
    attack.add_argument("name", metavar="list|NAME", help="'list', or a scenario to run")
    attack.add_argument("--json", action="store_true", help="print JSON")
    attack.set_defaults(func=cmd_attack)
