"""A plugin whose handler raises ends only its own VM, and says who and where."""

from guests import guest

from sevsim import hookimpl
from sevsim.guest.snippets import TERMINATE
from sevsim.kvm.dispatch import ExitHandler, ExitKind
from sevsim.kvm.exits import RunFailed, SystemEvent
from sevsim.kvm.vm import Kvm
from sevsim.testing import isolated_host
from sevsim.vmm.launch import launch_image


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
