"""``sevsim.testing.run_guest``: its time limit ends a guest that never exits."""

from __future__ import annotations

import inspect
import math
import time

import pytest

from sevsim.errors import ConfigError
from sevsim.guest.snippets import TERMINATE
from sevsim.kvm.exits import RunFailed, SystemEvent, SystemEventType
from sevsim.testing import RUN_GUEST_TIMEOUT, run_guest

pytest_plugins = ["sevsim.testing"]


def test_a_guest_that_loops_forever_ends_with_eintr() -> None:
    start = time.monotonic()
    run = run_guest("spin: jmp spin", timeout=0.2)
    assert time.monotonic() - start < 10
    assert isinstance(run.exit, RunFailed)
    assert run.exit.errno == "EINTR"
    assert run.exit.why == "KVM_RUN interrupted after its 0.2 s limit"
    assert "-> to userspace: KVM_RUN failed: -EINTR" in run.trace.lines[-1]


def test_the_fixture_takes_the_limit_too(run_guest) -> None:  # type: ignore[no-untyped-def]
    assert run_guest("spin: jmp spin", timeout=0.1).exit.errno == "EINTR"


def test_the_limit_does_not_cut_a_guest_that_ends() -> None:
    run = run_guest(TERMINATE, enable=["msr_protocol"], timeout=30)
    assert run.exit == SystemEvent(SystemEventType.SEV_TERM, (0x100,))


def test_there_is_always_a_limit_by_default() -> None:
    default = inspect.signature(run_guest).parameters["timeout"].default
    assert default == RUN_GUEST_TIMEOUT == 60.0


@pytest.mark.parametrize("bad", [0, 0.0, -1, -0.5, math.nan, math.inf, -math.inf, None, True,
                                 "5"])  # fmt: skip
def test_a_limit_must_be_finite_and_positive(bad: object) -> None:
    with pytest.raises(ConfigError) as info:
        run_guest("hlt", timeout=bad)  # type: ignore[arg-type]
    assert str(info.value) == (
        f"run_guest(timeout=...) = {bad!r}: expected a finite number of seconds > 0"
    )
