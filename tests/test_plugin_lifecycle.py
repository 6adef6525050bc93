"""A plugin's own state and its part in a vCPU's life, end to end.

kvm makes each plugin's per-VM and per-vCPU state (``sevsim_vm_state``,
``sevsim_vcpu_state``) and calls the plugin at fixed points (``sevsim_vcpu_reset``,
``sevsim_vcpu_sipi``, ``sevsim_vcpu_nmi``, ``sevsim_vcpu_events``,
``sevsim_vcpu_wakeup``), always with a view that holds that plugin's own state.
"""

from __future__ import annotations

from typing import Any

import pytest
from guests import guest, launch

from sevsim import hookimpl
from sevsim.errors import PluginError, VcpuError
from sevsim.guest.snippets import TERMINATE
from sevsim.kvm.dispatch import ExitHandler, ExitKind
from sevsim.kvm.exits import ApResetHold, RunFailed, SystemEvent
from sevsim.kvm.vcpu import MpState
from sevsim.kvm.vm import Kvm
from sevsim.testing import ExitDriver, isolated_host

COUNTER = 0xF000_0010  # a software exit code: "count this exit, return the count in RAX"


def counting_request() -> dict[str, int]:
    return {"sw_exit_code": COUNTER, "sw_exit_info_1": 0, "sw_exit_info_2": 0}


class Counting:
    """Counts exits per VM and per vCPU in its own state; logs every lifecycle call."""

    def __init__(self) -> None:
        self.log: list[tuple[str, Any]] = []

    @hookimpl
    def sevsim_vm_state(self, config: Any) -> dict[str, int]:
        return {"vm": int(config.get("start", 0))}

    @hookimpl
    def sevsim_vcpu_state(self) -> dict[str, int]:
        return {"vcpu": 0, "entries": 0}

    @hookimpl
    def sevsim_vcpu_reset(self, vcpu: Any) -> None:
        self.log.append(("reset", (vcpu.id, vcpu.initial_state.get("rip"))))

    @hookimpl
    def sevsim_vcpu_sipi(self, vcpu: Any, vector: int) -> None:
        self.log.append(("sipi", (vcpu.id, vector)))

    @hookimpl
    def sevsim_vcpu_events(self, vcpu: Any) -> bool:
        vcpu.state["entries"] += 1
        return False

    @hookimpl
    def sevsim_vcpu_wakeup(self, vcpu: Any) -> bool:
        self.log.append(("wakeup", vcpu.id))
        return vcpu.state.get("wake", False)

    @hookimpl
    def sevsim_exit_handlers(self) -> Any:
        def count(ctx: Any) -> None:
            ctx.vm.state["vm"] += 1
            ctx.vcpu.state["vcpu"] += 1
            ctx.regs["rax"] = ctx.vm.state["vm"]

        yield ExitHandler(ExitKind.VMGEXIT, COUNTER, count, name="COUNT")


def driver(plugin: Counting, **settings: Any) -> ExitDriver:
    host = isolated_host({"counting": plugin}, settings={"counting": settings})
    return ExitDriver(host.start())


def test_each_vm_and_vcpu_gets_its_own_state_made_from_the_plugins_config():
    plugin = Counting()
    first, second = driver(plugin, start=100), driver(plugin, start=100)
    other = first.vm.create_vcpu()
    for d in (first, first, second):
        assert d.vmgexit(counting_request()).ghcb["rax"] in (101, 102)
    first.vcpu = other
    assert first.vmgexit(counting_request()).ghcb["rax"] == 103  # one VM, shared
    assert first.vm.plugin_states["counting"] == {"vm": 103}
    assert second.vm.plugin_states["counting"] == {"vm": 101}
    assert [v.plugin_states["counting"]["vcpu"] for v in first.vm.vcpus] == [2, 1]


def test_sevsim_vcpu_reset_sees_the_state_the_vmm_gave_before_launch():
    plugin = Counting()
    d = driver(plugin)
    d.vcpu.set_state({"rip": 0x1234})
    assert ("reset", (0, 0x1234)) in plugin.log


def test_sevsim_vcpu_events_runs_before_every_entry_and_sipi_reaches_the_plugin():
    plugin = Counting()
    vm = launch(guest("hlt\nhlt\n" + TERMINATE), table=isolated_host(
        {"counting": plugin}, enable=["msr_protocol"]).start())  # fmt: skip
    vcpu = vm.vcpus[0]
    vcpu.run()
    vcpu.run()
    assert isinstance(vcpu.run(), SystemEvent)
    assert vcpu.plugin_states["counting"]["entries"] >= 3  # one entry per run at least
    vcpu.deliver_sipi(0x9F)
    assert plugin.log[-1] == ("sipi", (0, 0x9F))


def test_sevsim_vcpu_wakeup_decides_whether_a_parked_vcpu_runs():
    plugin = Counting()
    park = "mov ecx, 0xC0010130; mov eax, 6; xor edx, edx; wrmsr; rep vmmcall\n"  # AP_RESET_HOLD
    vm = launch(guest(park + TERMINATE), table=isolated_host(
        {"counting": plugin}, enable=["msr_protocol", "apboot"]).start())  # fmt: skip
    vcpu = vm.vcpus[0]
    assert vcpu.run() == ApResetHold() and vcpu.mp_state is MpState.AP_RESET_HOLD
    failed = vcpu.run()
    assert isinstance(failed, RunFailed) and failed.errno == "EINTR"
    assert ("wakeup", 0) in plugin.log
    vcpu.plugin_states["counting"]["wake"] = True
    assert isinstance(vcpu.run(), SystemEvent)  # woken, it runs on to its TERM_REQ


def test_kvm_nmi_without_the_nmi_plugin_fails_naming_it():
    """Disabling the feature plugin removes the feature: sevsim_vcpu_nmi has no taker."""
    d = ExitDriver(isolated_host().start())
    with pytest.raises(VcpuError, match="KVM_NMI needs the 'nmi' plugin"):
        d.vcpu.nmi()


def test_a_lifecycle_hook_that_fails_ends_only_its_vm_naming_the_plugin():
    class Broken:
        @hookimpl
        def sevsim_vcpu_events(self, vcpu: Any) -> bool:
            raise RuntimeError("boom")

    kvm = Kvm()
    broken = launch(guest("hlt"), kvm, isolated_host({"broken": Broken()}).start())
    fine = launch(guest("hlt"), kvm, isolated_host().start())
    exit_ = broken.vcpus[0].run()
    assert isinstance(exit_, RunFailed) and exit_.errno == "EIO"
    assert "plugin 'broken' failed in sevsim_vcpu_events: RuntimeError: boom" in exit_.why
    assert fine.vcpus[0].run().describe() == "Hlt"


@pytest.mark.parametrize(
    ("spoil", "what"),
    [(lambda ctx: ctx.regs.__delitem__("rax"), "del regs['rax']"),
     (lambda ctx: ctx.regs.__setitem__("rax", -1), "expected a u64"),
     (lambda ctx: ctx.regs.__setitem__("cr3", 1), "no such register"),
     (lambda ctx: setattr(ctx, "msr", "0x1"), "expected a u64"),
     (lambda ctx: setattr(ctx.vcpu, "vm", None), "AttributeError"),
     (lambda ctx: setattr(ctx.vm, "io_bus", None), "FrozenInstanceError"),
     (lambda ctx: setattr(ctx, "scratch", None), "AttributeError")],
    ids=["del-reg", "negative", "unknown-reg", "msr-str", "vcpu-vm", "vm-bus", "scratch"],
)  # fmt: skip
def test_a_plugin_cannot_break_the_vcpu_for_others(spoil, what):
    """What a handler can reach is either checked or cannot be changed: each attempt is
    that plugin's failure, named, and the next request to another plugin still works."""

    class Vandal:
        @hookimpl
        def sevsim_exit_handlers(self) -> Any:
            yield ExitHandler(ExitKind.VMGEXIT, COUNTER, spoil)

    d = ExitDriver(isolated_host({"vandal": Vandal()}, enable=["ioio"]).start())
    out = d.vmgexit(counting_request())
    assert isinstance(out.exit, RunFailed) and out.exit.plugin == "vandal"
    assert what in out.exit.why
    out = d.vmgexit({"sw_exit_code": 0x7B, "sw_exit_info_1": 0x80 << 16 | 1 << 4,
                     "sw_exit_info_2": 0, "rax": 0x42})  # fmt: skip
    assert out.ghcb["sw_exit_info_1"] == 0 and d.devices.post.codes == [0x42]


def test_settings_for_a_plugin_that_reads_them_only_in_a_state_hook_are_accepted():
    host = isolated_host({"counting": Counting()}, settings={"counting": {"start": 5}})
    d = ExitDriver(host.start())
    assert d.vm.plugin_states["counting"] == {"vm": 5}


def test_settings_for_a_plugin_that_reads_none_are_refused():
    class Deaf:
        @hookimpl
        def sevsim_vcpu_state(self) -> dict:
            return {}

    with pytest.raises(PluginError, match="takes no settings"):
        isolated_host({"deaf": Deaf()}, settings={"deaf": {"x": 1}}).start()
