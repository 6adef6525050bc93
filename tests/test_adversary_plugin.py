"""A malicious or broken plugin, from the plugin's seat (issue 11, section 1).

Whatever a plugin's code does (loop, raise any BaseException, call sys.exit, break
the objects it is handed), KVM_RUN returns a typed exit that names the plugin, within
its time limit, and the process goes on running other VMs.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import pytest
from guests import guest

from sevsim import hookimpl
from sevsim.arch.exits import SVM_EXIT_SW
from sevsim.cli import main
from sevsim.errors import PluginError
from sevsim.guest.snippets import TERMINATE, ghcb_vmgexit
from sevsim.kvm.dispatch import ExitHandler, ExitKind
from sevsim.kvm.exits import KvmExit, RunFailed, SystemEvent
from sevsim.kvm.vm import Kvm, Vm
from sevsim.testing import isolated_host
from sevsim.vmm.launch import launch_image

#: The time limit of the runs below, and how much later KVM_RUN may return at most.
LIMIT, GRACE = 0.3, 1.0
#: For runs that must simply finish: far above what they take on a loaded machine.
GENEROUS = 60.0
SW_CODE = SVM_EXIT_SW + 7
#: A guest whose first exit resumes it (a code nobody owns: INVALID_EVENT), so that a
#: failure in that exit's observers is what KVM_RUN reports, then a termination.
RESUMES_FIRST = ghcb_vmgexit(SVM_EXIT_SW + 8) + TERMINATE


class Evil(BaseException):
    """Not an Exception: ``except Exception`` lets it through."""


class Claims:
    """A plugin owning TERM_REQ (MSR protocol) and SW_CODE (a GHCB VMGEXIT) with ``handler``."""

    def __init__(self, handler) -> None:
        self.handler = handler

    @hookimpl
    def sevsim_exit_handlers(self):
        yield ExitHandler(ExitKind.MSR_PROTOCOL, 0x100, self.handler)
        yield ExitHandler(ExitKind.VMGEXIT, SW_CODE, self.handler)


class Watches:
    """A plugin observing every #VMEXIT with ``observer``."""

    def __init__(self, observer) -> None:
        self.observer = observer

    @hookimpl
    def sevsim_vmexit(self, exit_code):
        self.observer()


def _vm(kvm: Kvm, plugins: dict[str, object], source: str = TERMINATE) -> Vm:
    claims = any(isinstance(p, Claims) for p in plugins.values())  # TERM_REQ is theirs
    host = isolated_host(plugins, enable=[] if claims else ["msr_protocol"])
    return launch_image(kvm, guest(source), handlers=host.start(), events=host.events)


def _run_bounded(vm: Vm) -> tuple[KvmExit, float]:
    start = time.monotonic()
    exit_ = vm.vcpus[0].run(LIMIT)
    return exit_, time.monotonic() - start


def _spin() -> None:
    while True:
        pass


def _assert_other_vms_run(kvm: Kvm) -> None:
    assert isinstance(_vm(kvm, {}).vcpus[0].run(GENEROUS), SystemEvent)


@pytest.mark.parametrize("where", ["handler", "observer"])
def test_plugin_code_that_loops_forever_is_stopped_at_the_time_limit(where):
    """KVM_RUN(timeout) returns within its limit while a plugin's handler or observer
    never returns; the exit names the plugin, the VM is ended, the process goes on."""
    kvm = Kvm()
    plugin = Claims(lambda ctx: _spin()) if where == "handler" else Watches(_spin)
    vm = _vm(kvm, {"spinner": plugin}, RESUMES_FIRST)
    exit_, took = _run_bounded(vm)
    assert took < LIMIT + GRACE, f"KVM_RUN took {took:.2f} s"
    assert isinstance(exit_, RunFailed) and exit_.plugin == "spinner", exit_.describe()
    assert "PluginOverran" in exit_.why and vm.dead is not None
    _assert_other_vms_run(kvm)


def test_a_plugin_that_catches_the_interruption_is_interrupted_again():
    """The host timer repeats the interruption while the thread is in plugin code."""
    caught = []

    def stubborn(ctx):
        while len(caught) < 3:
            try:
                _spin()
            except BaseException as exc:
                caught.append(type(exc).__name__)
        _spin()

    exit_, took = _run_bounded(_vm(Kvm(), {"stubborn": Claims(stubborn)}))
    assert caught == ["PluginOverran"] * 3
    assert isinstance(exit_, RunFailed) and exit_.plugin == "stubborn"
    assert took < LIMIT + GRACE


def test_plugin_code_is_bounded_on_a_thread_other_than_the_main_one():
    """The mechanism works off the main thread (where no signal arrives)."""
    results: list[tuple[KvmExit, float]] = []
    vm = _vm(Kvm(), {"spinner": Claims(lambda ctx: _spin())})
    worker = threading.Thread(target=lambda: results.append(_run_bounded(vm)))
    worker.start()
    worker.join(LIMIT + GRACE + 5)
    assert not worker.is_alive()
    ((exit_, took),) = results
    assert isinstance(exit_, RunFailed) and exit_.plugin == "spinner" and took < LIMIT + GRACE


def test_a_handler_blocked_in_a_c_call_is_stopped_when_it_returns_to_python():
    """The documented limit of the mechanism (sevsim.hw.watchdog): a thread inside one
    C call (time.sleep) cannot be taken back, but the interruption is raised as soon as
    the call returns, before the plugin's next line (its result is discarded)."""
    after = []

    def sleeper(ctx):
        time.sleep(LIMIT * 2)
        after.append("ran on")

    exit_, took = _run_bounded(_vm(Kvm(), {"sleeper": Claims(sleeper)}))
    assert isinstance(exit_, RunFailed) and exit_.plugin == "sleeper", exit_.describe()
    assert after == [] and LIMIT * 2 <= took < LIMIT * 2 + GRACE


@pytest.mark.parametrize("seat", ["handler", "observer", "requires"])
def test_a_base_exception_subclass_from_a_plugin_is_contained(seat):
    """``class Evil(BaseException)`` raised by a handler, an observer or a requires()
    callable: KVM_RUN returns an exit naming the plugin (it used to escape)."""

    def evil(*args):
        raise Evil("boom")

    if seat == "handler":
        plugin, source = Claims(evil), TERMINATE
    elif seat == "observer":
        plugin, source = Watches(evil), RESUMES_FIRST
    else:

        class Requires:
            @hookimpl
            def sevsim_exit_handlers(self):
                yield ExitHandler(ExitKind.VMGEXIT, SW_CODE, lambda ctx: None, requires=evil)

        plugin, source = Requires(), ghcb_vmgexit(SW_CODE)
    kvm = Kvm()
    exit_ = _vm(kvm, {"evil": plugin}, source).vcpus[0].run(GENEROUS)
    assert isinstance(exit_, RunFailed) and exit_.plugin == "evil", exit_.describe()
    assert "Evil: boom" in exit_.why
    _assert_other_vms_run(kvm)


def test_an_observer_calling_sys_exit_is_named_in_the_run_failure():
    """``RunFailed.plugin`` names a failing observer as it names a failing handler."""
    vm = _vm(Kvm(), {"leaver": Watches(lambda: sys.exit(4))}, RESUMES_FIRST)
    exit_ = vm.vcpus[0].run(GENEROUS)
    assert isinstance(exit_, RunFailed) and exit_.plugin == "leaver", exit_.describe()
    assert "SystemExit" in exit_.why and "'leaver'" in exit_.why


def _del_rax(ctx):
    del ctx.regs["rax"]


def _set(target: str, name: str, value: object):
    def mutate(ctx):
        setattr(eval(target, {"ctx": ctx}), name, value)

    mutate.__name__ = f"{target}.{name} = {value!r}"
    return mutate


MUTATIONS = [
    _del_rax,
    _set("ctx", "regs", None),
    _set("ctx.vcpu", "regs", None),
    _set("ctx.vcpu", "vm", None),
    _set("ctx.vcpu", "state", None),
    _set("ctx.vm", "memory", None),
    _set("ctx.vm", "io_bus", None),
    _set("ctx", "msr", "0x100"),
    _set("ctx", "ghcb", None),
    _set("ctx", "code", -1),
    lambda ctx: ctx.regs.update(rax=1 << 64),
]


@pytest.mark.parametrize("mutate", MUTATIONS, ids=lambda m: m.__name__)
@pytest.mark.parametrize("kind", ["msr", "ghcb"])
def test_mutating_what_a_plugin_is_handed_fails_only_that_plugin(mutate, kind):
    """Objects a handler gets are views it cannot break for others: any attempt is the
    plugin's own failure (named), never an untyped exception out of KVM_RUN."""
    kvm = Kvm()
    # A guest its hypervisor resumes halts: past its code lies private memory never
    # written, the decryption of whatever was there under a fresh key, which ran into
    # a loop now and then instead of a fault.
    source = (TERMINATE if kind == "msr" else ghcb_vmgexit(SW_CODE)) + "\n    hlt\n"
    exit_ = _vm(kvm, {"mutator": Claims(mutate)}, source).vcpus[0].run(GENEROUS)
    if isinstance(exit_, RunFailed):
        assert exit_.plugin == "mutator", exit_.describe()
    _assert_other_vms_run(kvm)


@pytest.mark.parametrize(
    ("kind", "code", "expected"),
    [("msr_protocol", 0x100, "ExitHandler kind 'msr_protocol': expected an ExitKind"),
     (ExitKind.VMGEXIT, "0x7b", "ExitHandler code '0x7b' for vmgexit: expected an integer"),
     (ExitKind.VMGEXIT, -1, "ExitHandler code -1 for vmgexit: expected an integer in 0.."),
     (ExitKind.VMGEXIT, 2**80, f"ExitHandler code {2**80} for vmgexit: expected an integer"),
     (ExitKind.MSR_PROTOCOL, 0x1000, "expected an integer in 0..0xfff")],
)  # fmt: skip
def test_bad_exit_handler_records_are_refused_with_a_clear_error(kind, code, expected):
    """String kinds and codes, negative codes and codes past 64 bits (12 for the MSR
    protocol's GHCBInfo) are refused when the record is made; at start-up the error
    names the plugin and is one line."""
    with pytest.raises(PluginError, match=expected):
        ExitHandler(kind, code, lambda ctx: None)

    class Bad:
        @hookimpl
        def sevsim_exit_handlers(self):
            yield ExitHandler(kind, code, lambda ctx: None)

    with pytest.raises(PluginError) as info:
        isolated_host({"bad": Bad()}).start()
    assert str(info.value).startswith("plugin 'bad' failed to load: ") and expected in str(
        info.value) and "\n" not in str(info.value)  # fmt: skip


@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
    """Write a plugin module that does ``body`` at import and put it on sys.path."""

    def make(name: str, body: str) -> str:
        (tmp_path / f"{name}.py").write_text(body)
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.delitem(sys.modules, name, raising=False)
        monkeypatch.chdir(tmp_path)
        return name

    return make


def test_a_plugin_printing_at_import_does_not_corrupt_plugins_json(plugin_module, capsys):
    """``sevsim plugins --json`` stays one JSON document: the plugin host sends what
    plugin code prints while it loads to stderr (``PluginHost._activate``)."""
    name = plugin_module("noisy_plugin", 'print("hello from noisy_plugin")\n')
    assert main(["plugins", "--json", "-p", name]) == 0
    out, err = capsys.readouterr()
    rows = {row["name"]: row for row in json.loads(out)["plugins"]}
    assert rows[name]["status"] == "active"
    assert "hello from noisy_plugin" in err


def test_a_base_exception_at_import_is_a_failed_plugin_not_a_traceback(plugin_module, capsys):
    name = plugin_module("evil_plugin", "class Evil(BaseException):\n    pass\n"
                                        "raise Evil('at import')\n")  # fmt: skip
    assert main(["plugins", "--json", "-p", name]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)["plugins"]}
    assert rows[name]["status"] == "failed" and rows[name]["why"] == "Evil: at import"
    assert Path(name + ".py").exists()
