"""A plugin whose handler raises ends only its own VM, and says who and where."""

import sys

import pytest
from guests import guest

from sevsim import hookimpl
from sevsim.arch.exits import SVM_EXIT_SW, SvmExit
from sevsim.guest.snippets import TERMINATE
from sevsim.guest.vc import VcHandler
from sevsim.kvm import outcome as O
from sevsim.kvm.dispatch import ExitHandler, ExitKind
from sevsim.kvm.exits import RunFailed, SystemEvent, SystemEventType
from sevsim.kvm.vm import Kvm
from sevsim.testing import ExitDriver, isolated_host, run_guest
from sevsim.vmm.launch import launch_image

SW_CODE = SVM_EXIT_SW + 1


class Buggy:
    @hookimpl
    def sevsim_exit_handlers(self, config):
        def broken(ctx):
            raise KeyError("no such thing")

        yield ExitHandler(ExitKind.MSR_PROTOCOL, 0x100, broken)


def test_raising_handler_ends_that_vm_only():
    kvm = Kvm()
    table = isolated_host({"buggy": Buggy()}).start()
    buggy_vm = launch_image(kvm, guest(TERMINATE), handlers=table)
    exit_ = buggy_vm.vcpus[0].run()
    assert isinstance(exit_, RunFailed)
    assert exit_.plugin == "buggy"
    assert "0x100 (GHCB_MSR_TERM_REQ)" in exit_.why and "KeyError" in exit_.why
    assert buggy_vm.dead == exit_.why
    # Another VM on the same host runs on, with a working plugin.
    good = isolated_host(enable=["msr_protocol"]).start()
    other = launch_image(kvm, guest(TERMINATE), handlers=good)
    assert isinstance(other.vcpus[0].run(), SystemEvent)


class Quitter:
    """A plugin that calls sys.exit() from its handler, its requires() or an observer."""

    def __init__(self, where: str) -> None:
        self.where = where

    @hookimpl
    def sevsim_exit_handlers(self, config):
        def handler(ctx):
            if self.where == "handler":
                sys.exit(3)

        def requires(ghcb):
            if self.where == "requires":
                sys.exit("bye")
            return ()

        yield ExitHandler(ExitKind.MSR_PROTOCOL, 0x100, handler)
        yield ExitHandler(ExitKind.VMGEXIT, SvmExit.CPUID, handler, requires)

    @hookimpl
    def sevsim_vmexit(self, exit_code):
        if self.where == "observer":
            sys.exit(0)


@pytest.mark.parametrize("where", ["handler", "requires", "observer"])
def test_sys_exit_in_plugin_code_ends_only_that_vm(where):
    host = isolated_host({"quitter": Quitter(where)}, owners={SvmExit.CPUID: "quitter"})
    vm = launch_image(Kvm(), guest("cpuid\n" + TERMINATE), handlers=host.start(),
                      events=host.events, vc_model=VcHandler())  # fmt: skip
    exit_ = vm.vcpus[0].run()  # must return, not raise SystemExit
    assert isinstance(exit_, RunFailed)
    assert "SystemExit" in (exit_.why if where != "observer" else vm.dead)
    assert vm.dead is not None


@pytest.mark.parametrize(
    "make",
    [lambda: O.ExitToUser(42), lambda: O.ExitToUser(None), lambda: O.Fail(5, None),
     lambda: O.ExitToUser(SystemEvent(SystemEventType.SEV_TERM, (None,))),
     lambda: O.ExitToUser(SystemEvent(6, (1,))), lambda: O.ExitToUser(RunFailed("EIO", 3))],
    ids=["exit-int", "exit-none", "fail-types", "data-none", "type-int", "why-int"],
)  # fmt: skip
def test_a_malformed_outcome_is_the_plugins_failure_not_a_crash(make):
    """Each outcome and exit checks its fields when made: the plugin's handler raises,
    kvm names it, and the trace of the run still completes."""

    class Malformed:
        @hookimpl
        def sevsim_exit_handlers(self):
            yield ExitHandler(ExitKind.MSR_PROTOCOL, 0x100, lambda ctx: make())

    run = run_guest(TERMINATE, {"malformed": Malformed()})
    assert isinstance(run.exit, RunFailed) and run.exit.plugin == "malformed"
    assert "raised TypeError" in run.exit.why
    assert run.trace.lines[-1].startswith("      -> to userspace: KVM_RUN failed: -EIO")


@pytest.mark.parametrize(
    ("spoil", "why"),
    [(lambda s: s.data.extend(b"\0" * 8), "left a scratch area of 16 bytes where it mapped 8"),
     (lambda s: setattr(s, "data", None), "raised FrozenInstanceError")],
    ids=["grown", "replaced"],
)
def test_a_scratch_area_left_spoiled_is_the_plugins_failure(spoil, why):
    """kvm writes a scratch area back at the next entry: one a handler grew would write
    past the guest's buffer, so it is refused at once; its data cannot be replaced."""

    class Spoiler:
        @hookimpl
        def sevsim_exit_handlers(self):
            def handler(ctx):
                spoil(ctx.map_scratch(8, sync=True))

            yield ExitHandler(ExitKind.VMGEXIT, SW_CODE, handler, ("sw_scratch",))

    d = ExitDriver(isolated_host({"spoiler": Spoiler()}).start())
    d.vm.memory.write(0x9000, bytes(32))
    out = d.vmgexit({"sw_exit_code": SW_CODE, "sw_exit_info_1": 0, "sw_exit_info_2": 8,
                     "sw_scratch": 0x9000})  # fmt: skip
    assert isinstance(out.exit, RunFailed) and out.exit.plugin == "spoiler"
    assert why in out.exit.why
    assert d.vm.memory.read(0x9000, 32) == bytes(32)  # nothing written past the area
