"""``sevsim.testing.run_guest(exits=N)``: a guest run past its first exit to userspace."""

from __future__ import annotations

import pytest

from sevsim.errors import ConfigError
from sevsim.guest.image import GHCB_GPA
from sevsim.guest.snippets import TERMINATE
from sevsim.kvm.exits import Hlt, RunFailed, SystemEvent, SystemEventType
from sevsim.testing import run_guest

#: Three halts, each after a store the host can see in the shared GHCB page, then the
#: normal end: five exits to userspace were there to run through, four in all.
_STEPS = f"mov rdi, {GHCB_GPA + 0x900:#x}\n" + "".join(
    f"mov byte ptr [rdi + {i}], {i + 1}; hlt\n" for i in range(3))
_END = SystemEvent(SystemEventType.SEV_TERM, (0x100,))


def test_runs_through_every_exit_up_to_the_end() -> None:
    run = run_guest(_STEPS + TERMINATE, enable=["msr_protocol"], exits=10)
    assert run.exits == (Hlt(), Hlt(), Hlt(), _END)
    assert run.exit == _END
    assert run.vm.memory.read(GHCB_GPA + 0x900, 4) == b"\x01\x02\x03\x00"
    assert sum("-> to userspace" in line for line in run.trace.lines) == 4


def test_stops_after_the_exits_asked_for() -> None:
    run = run_guest(_STEPS + TERMINATE, enable=["msr_protocol"], exits=2)
    assert run.exits == (Hlt(), Hlt())
    # The guest stopped at its second HLT: the third store has not happened.
    assert run.vm.memory.read(GHCB_GPA + 0x900, 3) == b"\x01\x02\x00"


def test_the_first_exit_alone_by_default() -> None:
    run = run_guest(_STEPS + TERMINATE, enable=["msr_protocol"])
    assert run.exits == (Hlt(),) and run.exit == Hlt()


def test_the_time_limit_covers_all_the_exits() -> None:
    run = run_guest("hlt; spin: jmp spin", exits=5, timeout=0.3)
    assert run.exits[0] == Hlt()
    assert isinstance(run.exit, RunFailed) and run.exit.errno == "EINTR"
    assert len(run.exits) == 2


@pytest.mark.parametrize("exits", [0, -1, 1.5, True, "2"])
def test_a_bad_count_is_refused_naming_it(exits: object) -> None:
    with pytest.raises(ConfigError, match=rf"run_guest\(exits={exits!r}\): expected a whole "
                                          r"number of exits >= 1"):  # fmt: skip
        run_guest("hlt", exits=exits)  # type: ignore[arg-type]
