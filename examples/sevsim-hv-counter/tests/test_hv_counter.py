"""The hv_counter plugin, one VMGEXIT at a time: no guest CPU, just GHCB in and out.

The plugin is loaded the way a user gets it: through its ``sevsim.plugins`` entry
point (``enable=["hv_counter"]``), not handed to the host as an object.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from sevsim_hv_counter import NAME, SEVSIM_VMGEXIT_HV_COUNTER, SVM_EXIT_SW, U64_MAX

from sevsim.arch.exits import GhcbErr, GhcbResp
from sevsim.errors import PluginError
from sevsim.kvm.dispatch import ExitKind

if TYPE_CHECKING:  # imported for real by pytest, through pytest_plugins below
    from sevsim.testing import Delivered, ExitDriver

# sevsim's pytest plugin: the plugin_host and exit_driver fixtures. Declared in each
# test module rather than in a conftest.py because pytest refuses ``pytest_plugins`` in
# a conftest.py that is not at the top of the run, and in sevsim's own `pytest` run
# this folder is three levels down.
pytest_plugins = ["sevsim.testing"]


def call(driver: ExitDriver, counter: int | None, increment: int | None) -> Delivered:
    """One SEVSIM_VMGEXIT_HV_COUNTER; a register passed as None is left invalid."""
    ghcb = {"sw_exit_code": SEVSIM_VMGEXIT_HV_COUNTER, "sw_exit_info_1": 0, "sw_exit_info_2": 0}
    if counter is not None:
        ghcb["rax"] = counter
    if increment is not None:
        ghcb["rbx"] = increment
    return driver.vmgexit(ghcb)


def reply(delivered: Delivered) -> tuple[int, int]:
    assert delivered.exit is None, "the guest is resumed, never exits to userspace"
    assert delivered.ghcb is not None
    return delivered.ghcb["sw_exit_info_1"], delivered.ghcb["sw_exit_info_2"]


def result(delivered: Delivered) -> tuple[int, int]:
    """(RAX, RBX) of a successful call."""
    assert reply(delivered) == (GhcbResp.NO_ACTION, 0)
    ghcb = delivered.ghcb
    assert ghcb is not None
    assert ghcb.is_valid("rax") and ghcb.is_valid("rbx"), "results come back marked valid"
    return ghcb["rax"], ghcb["rbx"]


@pytest.fixture
def start(plugin_host):
    """start(**settings) -> the dispatch table of a host with only hv_counter."""

    def start(**settings):
        return plugin_host(enable=[NAME], settings={NAME: settings} if settings else None).start()

    return start


@pytest.fixture
def driver(start, exit_driver) -> ExitDriver:
    return exit_driver(start())


def test_the_entry_point_claims_one_code_in_the_software_defined_range(start):
    entry = start().lookup(ExitKind.VMGEXIT, SEVSIM_VMGEXIT_HV_COUNTER)
    assert entry is not None
    assert entry.plugin == NAME
    assert entry.requires == ("rax", "rbx")
    assert SEVSIM_VMGEXIT_HV_COUNTER == 0xF000_0001 > SVM_EXIT_SW


def test_fetch_and_add_returns_the_new_and_the_previous_value(driver):
    assert result(call(driver, 0, 5)) == (5, 0)
    assert result(call(driver, 0, 7)) == (12, 5)
    assert result(call(driver, 0, 0)) == (12, 12), "an increment of 0 reads the counter"


def test_counters_are_independent(driver):
    call(driver, 1, 3)
    assert result(call(driver, 2, 0)) == (0, 0)
    assert result(call(driver, 1, 0)) == (3, 3)
    assert result(call(driver, 3, 1)) == (1, 0), "the last of the 4 default counters"


def test_each_vm_has_its_own_counters(start, exit_driver):
    table = start()
    first, second = exit_driver(table), exit_driver(table)
    assert result(call(first, 0, 10)) == (10, 0)
    assert result(call(second, 0, 1)) == (1, 0)
    assert result(call(first, 0, 0)) == (10, 10)


def test_each_host_start_up_has_its_own_state(start, exit_driver):
    call(exit_driver(start()), 0, 10)
    assert result(call(exit_driver(start()), 0, 0)) == (0, 0)


@pytest.mark.parametrize(
    ("counter", "increment"),
    [(None, 1), (0, None), (None, None)],
    ids=["rax-invalid", "rbx-invalid", "both-invalid"],
)
def test_a_register_not_marked_valid_is_missing_input(driver, counter, increment):
    # kvm checks `requires` before the handler runs: the counter is not touched.
    assert reply(call(driver, counter, increment)) == (GhcbResp.MALFORMED_INPUT,
                                                       GhcbErr.MISSING_INPUT)  # fmt: skip
    assert result(call(driver, 0, 0)) == (0, 0)


@pytest.mark.parametrize(
    ("settings", "counter", "increment"),
    [
        ({}, 4, 1),  # counters 0..3 by default
        ({}, U64_MAX, 1),
        ({}, 0, 0x1_0000_0000),  # default max_increment is 2**32 - 1
        ({"max_increment": 10}, 0, 11),
        ({"start": U64_MAX - 1}, 0, 2),  # would wrap: a monotonic counter never does
    ],
    ids=["no-such-counter", "huge-counter", "above-default-max", "above-max", "overflow"],
)
def test_bad_requests_are_invalid_input_and_change_nothing(
    start, exit_driver, settings, counter, increment
):
    driver = exit_driver(start(**settings))
    refused = call(driver, counter, increment)
    assert reply(refused) == (GhcbResp.MALFORMED_INPUT, GhcbErr.INVALID_INPUT)
    assert refused.ghcb is not None
    assert (refused.ghcb["rax"], refused.ghcb["rbx"]) == (counter, increment), "echoed back"
    base = settings.get("start", 0)
    assert result(call(driver, 0, 0)) == (base, base)


def test_settings_shape_the_service(start, exit_driver):
    driver = exit_driver(start(counters=1, start=100, max_increment=1000))
    assert result(call(driver, 0, 1000)) == (1100, 100)
    assert reply(call(driver, 1, 0)) == (GhcbResp.MALFORMED_INPUT, GhcbErr.INVALID_INPUT)


def test_a_counter_can_reach_the_top_but_not_pass_it(start, exit_driver):
    driver = exit_driver(start(start=U64_MAX - 1))
    assert result(call(driver, 0, 1)) == (U64_MAX, U64_MAX - 1)
    assert reply(call(driver, 0, 1)) == (GhcbResp.MALFORMED_INPUT, GhcbErr.INVALID_INPUT)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"counters": 0}, "hv_counter: counters = 0; expected an integer in 1..256"),
        ({"counters": 257}, "hv_counter: counters = 257; expected an integer in 1..256"),
        ({"counters": "4"}, "hv_counter: counters = '4'; expected an integer in 1..256"),
        ({"counters": True}, "hv_counter: counters = True; expected an integer in 1..256"),
        ({"start": -1}, "hv_counter: start = -1; expected an integer in 0..0xffffffffffffffff"),
        ({"max_increment": 0}, "hv_counter: max_increment = 0; expected an integer in 1.."),
        ({"max_increment": 1 << 64}, f"hv_counter: max_increment = {1 << 64}; expected"),
        ({"count": 4}, "hv_counter: unknown setting(s) ['count']; expected counters, start,"),
    ],
    ids=["zero", "too-many", "string", "bool", "negative-start", "zero-max", "huge-max", "unknown"],
)
def test_bad_settings_stop_start_up_naming_the_value(start, settings, message):
    with pytest.raises(PluginError) as failure:
        start(**settings)
    assert message in str(failure.value)
    assert NAME in str(failure.value)


def test_without_the_plugin_the_guest_gets_invalid_event(plugin_host, exit_driver):
    # -p no:hv_counter: kvm has no handler for the code, as for any unknown exit code.
    driver = exit_driver(plugin_host().start())
    assert reply(call(driver, 0, 1)) == (GhcbResp.MALFORMED_INPUT, GhcbErr.INVALID_EVENT)
