"""``sevsim attack list`` and ``sevsim attack NAME``."""

from __future__ import annotations

import json

import pytest

import sevsim.cli_attack
from sevsim.attack import Scenario, ScenarioResult, list_scenarios
from sevsim.cli import main


def test_list_names_every_scenario_with_its_seat_and_promise(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["attack", "list"]) == 0
    out = capsys.readouterr().out
    for scenario in list_scenarios():
        assert f"{scenario.seat:<6}  tries:     {scenario.tries}" in out
        assert f"must hold: {scenario.must_hold}" in out
        assert scenario.name in out


def test_list_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["attack", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["name"] for row in rows] == [s.name for s in list_scenarios()]
    assert {row["seat"] for row in rows} == {"guest", "host", "plugin"}


def test_a_scenario_that_holds_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    """vmsa-tamper: the hardware's VMSA integrity check (SHUTDOWN on the next VMRUN)."""
    assert main(["attack", "vmsa-tamper"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:3] == [
        "scenario:  vmsa-tamper (host seat)",
        "tried:     flip a bit of a protected VMSA between runs",
        "must hold: the next VMRUN fails with SHUTDOWN (integrity check)",
    ]
    assert out[3].startswith("result:    held: ") and "shutdown" in out[3]


def test_a_scenario_that_does_not_hold_exits_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = Scenario("leaky", "host", "read private memory", "only ciphertext comes out",
                      lambda: ScenarioResult(False, "read b'secret' in plaintext"))  # fmt: skip
    monkeypatch.setattr(sevsim.cli_attack, "list_scenarios", lambda: (broken,))
    assert main(["attack", "leaky", "--json"]) == 1
    assert json.loads(capsys.readouterr().out) == {
        "name": "leaky", "seat": "host", "tries": "read private memory",
        "must_hold": "only ciphertext comes out", "held": False,
        "detail": "read b'secret' in plaintext",
    }  # fmt: skip


def test_an_unknown_scenario_lists_the_known_ones(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["attack", "vmsa-tampr"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sevsim: error: no attack scenario 'vmsa-tampr'; expected list or "
                          "one of gdtr-at-mmio, ")  # fmt: skip
    assert err.count("\n") == 1
