"""The attack scenarios of :mod:`sevsim.attack`: each runs, each holds, and the results
are deterministic."""

from __future__ import annotations

import pytest

from sevsim.attack import SEATS, UnknownScenario, list_scenarios, run_all, run_scenario


@pytest.fixture(scope="module")
def results():
    return run_all()


@pytest.mark.parametrize("name", [s.name for s in list_scenarios()])
def test_scenario_holds(name, results):
    result = results[name]
    assert result.held, result.detail


def test_results_are_deterministic(results):
    assert run_all() == results


def test_scenarios_are_described_and_found_by_name(results):
    scenarios = list_scenarios()
    assert len({s.name for s in scenarios}) == len(scenarios) == len(results)
    assert {s.seat for s in scenarios} == set(SEATS)
    assert all(s.tries and s.must_hold for s in scenarios)
    assert run_scenario("vmsa-tamper") == results["vmsa-tamper"]
    with pytest.raises(UnknownScenario, match="no attack scenario 'nope'; expected one of"):
        run_scenario("nope")
