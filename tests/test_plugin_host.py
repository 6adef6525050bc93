"""The plugin host: loading, stamping, conflicts, failures, discovery, the event sink."""

from __future__ import annotations

import importlib.metadata
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sevsim.errors import ConfigError, PluginError
from sevsim.hw import SIM_EVENTS
from sevsim.kvm.dispatch import ExitHandler, ExitKind, ExitTable
from sevsim.kvm.events import EVENTS
from sevsim.kvm.extensions import Extensions
from sevsim.kvm.outcome import RESUME
from sevsim.plugin.config import PluginConfig, apply_cli, isolated_config
from sevsim.plugin.hookspecs import hookimpl
from sevsim.plugin.host import ACTIVE, DISABLED, FAILED, PluginHost, PluginInfo

pytest_plugins = ["sevsim.testing"]

DISTS = Path(__file__).parent / "data" / "plugin_dists"
IOIO = 0x7B


def resume(*exit_context: object) -> object:
    return RESUME


class Claims:
    """A plugin object claiming the given (kind, code) pairs."""

    def __init__(self, *codes: tuple[ExitKind, int]) -> None:
        self.codes = codes

    @hookimpl
    def sevsim_exit_handlers(self) -> Iterator[ExitHandler]:
        for kind, code in self.codes:
            yield ExitHandler(kind, code, resume)


def by_name(host: PluginHost) -> dict[str, PluginInfo]:
    return {info.name: info for info in host.plugins()}


# --- ownership, stamping, the table ---------------------------------------------------


def test_records_are_stamped_and_put_in_one_table(
    plugin_host: Callable[..., PluginHost],
) -> None:
    host = plugin_host({
        "ioio": Claims((ExitKind.VMGEXIT, IOIO)),
        "msr_protocol": Claims((ExitKind.MSR_PROTOCOL, 0x002), (ExitKind.MSR_PROTOCOL, 0x004)),
    }, kvm=False)  # fmt: skip
    table = host.start()
    assert isinstance(table, Extensions) and isinstance(table.table, ExitTable)
    assert len(table) == 3
    assert table.lookup(ExitKind.VMGEXIT, IOIO).plugin == "ioio"
    assert table.lookup(ExitKind.MSR_PROTOCOL, 0x004).plugin == "msr_protocol"
    assert table.lookup(ExitKind.MSR_PROTOCOL, 0x006) is None
    assert host.start() is table  # built once
    infos = by_name(host)
    assert [e.describe() for e in infos["ioio"].owns] == ["vmgexit 0x7b (SVM_EXIT_IOIO)"]
    assert [e.describe() for e in infos["msr_protocol"].owns] == [
        "msr_protocol 0x002 (GHCB_MSR_SEV_INFO_REQ)",
        "msr_protocol 0x004 (GHCB_MSR_CPUID_REQ)",
    ]
    assert infos["ioio"] == PluginInfo(
        "ioio", None, "direct", ACTIVE, "registered directly", infos["ioio"].owns
    )
    assert host.problems() == []


def test_a_module_is_a_plugin(
    plugin_host: Callable[..., PluginHost], installed: Callable[[str], None]
) -> None:
    installed("conflict")
    import sevsim_demo_ioio

    table = plugin_host({"ioio": sevsim_demo_ioio}).start()
    assert table.lookup(ExitKind.VMGEXIT, IOIO).requires == ("rax",)


def test_returning_a_list_works_like_yielding(plugin_host: Callable[..., PluginHost]) -> None:
    class AsList:
        @hookimpl
        def sevsim_exit_handlers(self, config: Any) -> list[ExitHandler]:
            return [ExitHandler(ExitKind.VMEXIT, 0x90, resume)]

    table = plugin_host({"crtraps": AsList()}).start()
    assert table.lookup(ExitKind.VMEXIT, 0x90).plugin == "crtraps"


# --- conflicts ------------------------------------------------------------------------


def test_conflict_stops_start_up_naming_code_both_plugins_and_both_fixes(
    plugin_host: Callable[..., PluginHost],
) -> None:
    host = plugin_host({"ioio": Claims((ExitKind.VMGEXIT, IOIO)),
                        "rival": Claims((ExitKind.VMGEXIT, IOIO))})  # fmt: skip
    with pytest.raises(PluginError) as info:
        host.start()
    message = str(info.value)
    assert "0x7b (SVM_EXIT_IOIO)" in message
    assert "'ioio'" in message and "'rival'" in message
    assert "-p no:ioio" in message and "-p no:rival" in message
    assert '[plugins.owners] "0x7b" = "ioio"' in message
    # Loading itself does not raise: the listing still works and shows the contest.
    assert [p.fatal for p in host.problems()] == [True]
    contenders = [i for i in host.plugins() if i.name in ("ioio", "rival")]
    assert {i.status for i in contenders} == {ACTIVE}
    for info in contenders:
        assert info.owns == ()
        assert [e.describe() for e in info.contested] == ["vmgexit 0x7b (SVM_EXIT_IOIO)"]


def test_three_claimants_are_all_named(plugin_host: Callable[..., PluginHost]) -> None:
    claim = (ExitKind.MSR_PROTOCOL, 0x004)
    host = plugin_host({"a": Claims(claim), "b": Claims(claim), "c": Claims(claim)})
    with pytest.raises(PluginError) as info:
        host.start()
    assert "claimed by 'a', 'b' and 'c'" in str(info.value)
    assert "0x004 (GHCB_MSR_CPUID_REQ)" in str(info.value)
    assert '"msr_protocol:0x004" = "a"' in str(info.value)


@pytest.mark.parametrize("key", ["0x7b", "vmgexit:0x7b", 0x7B, "123"])
def test_owners_settle_a_conflict(plugin_host: Callable[..., PluginHost], key: Any) -> None:
    host = plugin_host(
        {"ioio": Claims((ExitKind.VMGEXIT, IOIO)), "rival": Claims((ExitKind.VMGEXIT, IOIO))},
        owners={key: "rival"},
    )
    assert host.start().lookup(ExitKind.VMGEXIT, IOIO).plugin == "rival"
    assert by_name(host)["ioio"].owns == ()


def test_owner_of_another_kind_does_not_settle(plugin_host: Callable[..., PluginHost]) -> None:
    host = plugin_host(
        {"ioio": Claims((ExitKind.VMGEXIT, IOIO)), "rival": Claims((ExitKind.VMGEXIT, IOIO))},
        owners={"msr_protocol:0x7b": "rival"},
    )
    with pytest.raises(PluginError, match="claimed by both"):
        host.start()


def test_owner_that_does_not_claim_the_code(plugin_host: Callable[..., PluginHost]) -> None:
    host = plugin_host(
        {"ioio": Claims((ExitKind.VMGEXIT, IOIO)), "rival": Claims((ExitKind.VMGEXIT, IOIO)),
         "mmio": Claims()},
        owners={"0x7b": "mmio"},
    )  # fmt: skip
    with pytest.raises(PluginError) as info:
        host.start()
    assert (
        "(isolated_host(): owners '0x7b' = 'mmio' names a plugin that does not claim it)"
        in str(info.value)
    )


def test_owner_name_must_be_a_known_plugin(plugin_host: Callable[..., PluginHost]) -> None:
    host = plugin_host({"ioio": Claims()}, owners={"0x7b": "iooi"})
    with pytest.raises(ConfigError) as info:
        host.start()
    assert str(info.value).startswith("isolated_host(): owners '0x7b' = 'iooi': ")
    message = str(info.value)
    assert "no plugin named 'iooi' is installed; known plugins:" in message
    assert "ioio" in message.rpartition("known plugins:")[2]


def test_unknown_names_in_p_flags_are_refused() -> None:
    config = apply_cli(isolated_config(), ["no:mmoi"])
    with pytest.raises(ConfigError, match="-p no:mmoi: no plugin named 'mmoi'"):
        PluginHost(config, plugins={"ioio": Claims()}).load()


# --- failures: reported with name and error, skipped; fatal under strict ---------------


class TypoHook:
    @hookimpl
    def sevsim_exit_handler(self) -> list[ExitHandler]:
        return []


class Unmarked:
    def sevsim_exit_handlers(self) -> list[ExitHandler]:
        return []


class BadArgument:
    @hookimpl
    def sevsim_exit_handlers(self, vcpu: object) -> list[ExitHandler]:
        return []


class Raises:
    @hookimpl
    def sevsim_exit_handlers(self) -> list[ExitHandler]:
        raise RuntimeError("table on fire")


class NotARecord:
    @hookimpl
    def sevsim_exit_handlers(self) -> list[int]:
        return [0x7B]


class Twice:
    @hookimpl
    def sevsim_exit_handlers(self) -> list[ExitHandler]:
        return [ExitHandler(ExitKind.VMGEXIT, IOIO, resume)] * 2


class BadRequires:
    @hookimpl
    def sevsim_exit_handlers(self) -> Iterator[ExitHandler]:
        yield ExitHandler(ExitKind.VMGEXIT, IOIO, resume, requires=("raxx",))


@pytest.mark.parametrize(
    ("plugin", "why"),
    [
        (TypoHook(), "implements unknown hook sevsim_exit_handler "
                     "(did you mean sevsim_exit_handlers?)"),
        (Unmarked(), "sevsim_exit_handlers is not marked @hookimpl"),
        (BadArgument(), "PluginValidationError: Plugin 'broken' for hook 'sevsim_exit_handlers'"),
        (Raises(), "RuntimeError: table on fire"),
        (NotARecord(), "sevsim_exit_handlers gave 123; expected sevsim.kvm.dispatch.ExitHandler"),
        (Twice(), "sevsim_exit_handlers claims vmgexit 0x7b (SVM_EXIT_IOIO) twice"),
        (BadRequires(), "ExitHandler requires unknown GHCB field(s) ['raxx']"),
    ],
)  # fmt: skip
def test_broken_plugin_is_reported_and_skipped(
    plugin_host: Callable[..., PluginHost], plugin: object, why: str
) -> None:
    host = plugin_host({"broken": plugin, "ioio": Claims((ExitKind.VMGEXIT, IOIO))},
                       strict=False)  # fmt: skip
    table = host.start()  # not strict: the run goes on without it
    assert table.lookup(ExitKind.VMGEXIT, IOIO).plugin == "ioio"
    info = by_name(host)["broken"]
    assert info.status == FAILED
    assert info.why.startswith(why)
    assert "\n" not in info.why
    assert info.status_line == f"failed: {info.why}"
    [problem] = host.problems()
    assert problem.message == f"plugin 'broken' failed to load: {info.why}"
    assert not problem.fatal
    assert not host.plugin_manager.has_plugin("broken")


def test_strict_makes_a_failure_fatal(plugin_host: Callable[..., PluginHost]) -> None:
    host = plugin_host({"broken": Raises()})  # isolated hosts are strict by default
    with pytest.raises(PluginError) as info:
        host.start()
    assert str(info.value) == (
        "plugin 'broken' failed to load: RuntimeError: table on fire "
        "(fatal in strict mode: isolated host)"
    )


def test_failed_plugins_observers_are_not_called(plugin_host: Callable[..., PluginHost]) -> None:
    calls = []

    class HalfBroken:
        @hookimpl
        def sevsim_vm_created(self, vm: object) -> None:
            calls.append(vm)

        @hookimpl
        def sevsim_exit_handlers(self) -> list[ExitHandler]:
            raise RuntimeError("no")

    host = plugin_host({"half": HalfBroken()}, strict=False)
    assert not host.events.wants("vm_created")
    host.events.emit("vm_created", vm="vm0")
    assert calls == []


def test_rejected_settings_are_fatal_even_without_strict(
    plugin_host: Callable[..., PluginHost],
) -> None:
    class Picky:
        @hookimpl
        def sevsim_configure(self, settings: Any) -> None:
            if "ports" in settings:
                raise ConfigError(f"ports = {settings['ports']!r}: expected a list")

    host = plugin_host({"picky": Picky()}, settings={"picky": {"ports": 3}}, strict=False)
    with pytest.raises(PluginError) as info:
        host.start()
    assert str(info.value) == (
        "isolated_host(): [plugins.settings.picky]: plugin 'picky' rejected its settings: "
        "ports = 3: expected a list"
    )
    assert by_name(host)["picky"].status == FAILED


# --- configure: each plugin its own table, its return value is its config ---------------


def test_each_plugin_gets_only_its_own_settings(plugin_host: Callable[..., PluginHost]) -> None:
    seen: dict[str, Any] = {}

    class Configured:
        def __init__(self, name: str) -> None:
            self.name = name

        @hookimpl
        def sevsim_configure(self, settings: Any) -> Any:
            seen[self.name] = dict(settings)
            return {"parsed": settings.get("level", 0) * 10}

        @hookimpl
        def sevsim_exit_handlers(self, config: Any) -> list[ExitHandler]:
            seen[self.name + ".config"] = config
            return []

    class RawTable:
        @hookimpl
        def sevsim_exit_handlers(self, config: Any) -> list[ExitHandler]:
            seen["raw.config"] = dict(config)
            return []

    plugin_host(
        {"a": Configured("a"), "b": Configured("b"), "raw": RawTable()},
        settings={"a": {"level": 1}, "raw": {"level": 3}},
    ).start()
    assert seen == {
        "a": {"level": 1},
        "a.config": {"parsed": 10},
        "b": {},
        "b.config": {"parsed": 0},
        "raw.config": {"level": 3},
    }


def test_register_before_loading_only(plugin_host: Callable[..., PluginHost]) -> None:
    host = plugin_host()
    host.register("ioio", Claims((ExitKind.VMGEXIT, IOIO)))
    with pytest.raises(PluginError, match="already used"):
        host.register("ioio", Claims())
    assert host.start().lookup(ExitKind.VMGEXIT, IOIO).plugin == "ioio"
    with pytest.raises(PluginError, match="already loaded"):
        host.register("late", Claims())


def test_disabled_direct_plugin_is_blocked_in_pluggy() -> None:
    config = apply_cli(isolated_config(), ["no:ioio"])
    host = PluginHost(config, plugins={"ioio": Claims((ExitKind.VMGEXIT, IOIO))})
    assert len(host.start()) == 0
    assert by_name(host)["ioio"].status_line == "disabled: -p no:ioio"
    assert host.plugin_manager.is_blocked("ioio")


# --- the event sink -------------------------------------------------------------------


class Observer:
    """Implements every observer hook and records what it saw."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    @hookimpl
    def sevsim_vm_created(self, vm: Any) -> None:
        self.calls.append(("vm_created", {"vm": vm}))

    @hookimpl
    def sevsim_vm_destroyed(self, vm: Any, why: str) -> None:
        self.calls.append(("vm_destroyed", {"vm": vm, "why": why}))

    @hookimpl
    def sevsim_launch_command(self, vm: Any, command: str, status: str, detail: str) -> None:
        self.calls.append(
            ("launch_command", {"vm": vm, "command": command, "status": status, "detail": detail})
        )

    @hookimpl
    def sevsim_vmgexit_enter(self, vcpu_id: int, exit_reason: int, info1: int, info2: int) -> None:
        self.calls.append(("vmgexit_enter", {"vcpu_id": vcpu_id, "exit_reason": exit_reason,
                                             "info1": info1, "info2": info2}))  # fmt: skip

    @hookimpl
    def sevsim_vmgexit_exit(self, vcpu_id: int, exit_reason: int, info1: int, info2: int) -> None:
        self.calls.append(("vmgexit_exit", {"vcpu_id": vcpu_id, "exit_reason": exit_reason,
                                            "info1": info1, "info2": info2}))  # fmt: skip

    @hookimpl
    def sevsim_msr_protocol_enter(self, vcpu_id: int, ghcb_gpa: int) -> None:
        self.calls.append(("msr_protocol_enter", {"vcpu_id": vcpu_id, "ghcb_gpa": ghcb_gpa}))

    @hookimpl
    def sevsim_msr_protocol_exit(self, vcpu_id: int, ghcb_gpa: int, result: Any) -> None:
        self.calls.append(("msr_protocol_exit", {"vcpu_id": vcpu_id, "ghcb_gpa": ghcb_gpa,
                                                 "result": result}))  # fmt: skip

    @hookimpl
    def sevsim_vmexit(self, vcpu_id: int, exit_code: int, info1: int, info2: int) -> None:
        self.calls.append(("vmexit", {"vcpu_id": vcpu_id, "exit_code": exit_code,
                                      "info1": info1, "info2": info2}))  # fmt: skip

    @hookimpl
    def sevsim_exit_handled(
        self, vcpu_id: int, kind: str, code: int, plugin: str, notes: dict[str, Any]
    ) -> None:
        self.calls.append(("exit_handled", {"vcpu_id": vcpu_id, "kind": kind, "code": code,
                                            "plugin": plugin, "notes": notes}))  # fmt: skip

    @hookimpl
    def sevsim_plugin_failed(self, vcpu_id: int, plugin: str, kind: str, code: int,
                             error: str | None, message: str) -> None:  # fmt: skip
        self.calls.append(("plugin_failed", {"vcpu_id": vcpu_id, "plugin": plugin, "kind": kind,
                                             "code": code, "error": error,
                                             "message": message}))  # fmt: skip

    @hookimpl
    def sevsim_interrupt_injected(self, vcpu_id: int, vector: int, how: str) -> None:
        self.calls.append(("interrupt_injected", {"vcpu_id": vcpu_id, "vector": vector,
                                                  "how": how}))  # fmt: skip

    @hookimpl
    def sevsim_nmi_injected(self, vcpu_id: int, how: str) -> None:
        self.calls.append(("nmi_injected", {"vcpu_id": vcpu_id, "how": how}))

    @hookimpl
    def sevsim_init_delivered(self, vcpu_id: int) -> None:
        self.calls.append(("init_delivered", {"vcpu_id": vcpu_id}))

    @hookimpl
    def sevsim_sipi_delivered(self, vcpu_id: int, vector: int, start: int) -> None:
        self.calls.append(("sipi_delivered", {"vcpu_id": vcpu_id, "vector": vector,
                                              "start": start}))  # fmt: skip

    @hookimpl
    def sevsim_device_access(self, vcpu_id: int, device: str, bus: str, address: int,
                             size: int, direction: str, value: int) -> None:  # fmt: skip
        self.calls.append(("device_access", {"vcpu_id": vcpu_id, "device": device, "bus": bus,
                                             "address": address, "size": size,
                                             "direction": direction, "value": value}))  # fmt: skip


def test_every_event_reaches_its_observer_hook(plugin_host: Callable[..., PluginHost]) -> None:
    observer = Observer()
    sink = plugin_host({"observer": observer}).events
    expected = []
    for n, (event, fields) in enumerate(EVENTS.items()):
        assert sink.wants(event)
        values = {field: f"{event}.{field}" if field in ("vm", "why") else n for field in fields}
        sink.emit(event, **values)
        expected.append((event, values))
    assert observer.calls == expected


def test_nobody_listening_means_no_event_is_wanted(
    plugin_host: Callable[..., PluginHost],
) -> None:
    sink = plugin_host({"ioio": Claims((ExitKind.VMGEXIT, IOIO))}).events
    assert not any(sink.wants(event) for event in EVENTS)


def test_wants_only_what_is_implemented(plugin_host: Callable[..., PluginHost]) -> None:
    class ExitsOnly:
        @hookimpl
        def sevsim_vmexit(self, exit_code: int) -> None:
            pass

    sink = plugin_host({"exitsonly": ExitsOnly()}).events
    assert {event for event in EVENTS if sink.wants(event)} == {"vmexit"}


def test_the_simulators_view_goes_only_to_the_sim_hooks(
    plugin_host: Callable[..., PluginHost],
) -> None:
    class Watcher:
        def __init__(self) -> None:
            self.seen: list[tuple[str, int]] = []

        @hookimpl
        def sevsim_sim_vc(self, exit_code: int, rip: int) -> None:
            self.seen.append(("vc", rip))

        @hookimpl
        def sevsim_sim_exit(self, exit_code: int, why: str) -> None:
            self.seen.append(("exit", exit_code))

    watcher = Watcher()
    host = plugin_host({"watcher": watcher})
    assert not any(host.events.wants(event) for event in EVENTS)  # kvm's events: none
    assert {event for event in SIM_EVENTS if host.sim.wants(event)} == set(SIM_EVENTS)
    host.sim.emit("sim_vc", vm="vm", vcpu=0, exit_code=0x72, rip=0x1000, insn=b"", bits=64)
    host.sim.emit("sim_exit", vm="vm", vcpu=0, exit_code=0x403, rip=0x1004, insn=b"", bits=64,
                  why="")  # fmt: skip
    assert watcher.seen == [("vc", 0x1000), ("exit", 0x403)]


def test_a_raising_observer_is_named(plugin_host: Callable[..., PluginHost]) -> None:
    class Quiet:
        @hookimpl
        def sevsim_vmexit(self, info1: int) -> None:
            pass

    class Loud:
        @hookimpl
        def sevsim_vmexit(self, info1: int) -> None:
            raise ValueError(f"cannot trace {info1:#x}")

    sink = plugin_host({"quiet": Quiet(), "loud": Loud()}).events
    with pytest.raises(PluginError) as info:
        sink.emit("vmexit", vcpu_id=0, exit_code=0x72, info1=0x1000, info2=0)
    assert str(info.value) == (
        "plugin 'loud' failed in observer hook sevsim_vmexit: ValueError: cannot trace 0x1000"
    )


# --- discovery through importlib.metadata ---------------------------------------------


@pytest.fixture
def installed(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], None]]:
    """Put tests/data/plugin_dists/<name> on sys.path: its dist-info is then installed
    as far as importlib.metadata knows. Demo modules are forgotten afterwards."""
    monkeypatch.delenv("SEVSIM_PLUGINS", raising=False)
    monkeypatch.delenv("SEVSIM_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    yield lambda name: monkeypatch.syspath_prepend(str(DISTS / name))
    for module in [m for m in sys.modules if m.startswith("sevsim_demo")]:
        del sys.modules[module]


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the entry points the host imported, in order."""
    names: list[str] = []
    real = importlib.metadata.EntryPoint.load

    def spy(self: importlib.metadata.EntryPoint) -> Any:
        names.append(self.name)
        return real(self)

    monkeypatch.setattr(importlib.metadata.EntryPoint, "load", spy)
    return names


def only(*names: str) -> PluginConfig:
    """Installed plugins other than ``names`` (the built-ins, say) stay out of the test."""
    return PluginConfig(allow=frozenset(names))


def test_entry_point_plugin_is_found_loaded_and_listed(
    installed: Callable[[str], None], loads: list[str]
) -> None:
    installed("good")
    host = PluginHost(only("demo_good"))
    table = host.start()
    assert table.lookup(ExitKind.VMGEXIT, 0x8000_0F00).plugin == "demo_good"
    info = by_name(host)["demo_good"]
    assert (info.version, info.source, info.status, info.why) == (
        "1.2", "entry point: sevsim-demo-good", ACTIVE, "listed in SEVSIM_PLUGINS",
    )  # fmt: skip
    assert [e.describe() for e in info.owns] == ["vmgexit 0x80000f00"]
    assert loads == ["demo_good"]
    import sevsim_demo_good

    host.events.emit("vmgexit_enter", vcpu_id=0, exit_reason=0x8000_0F00, info1=0, info2=0)
    assert sevsim_demo_good.seen == [0x8000_0F00]


def test_autoload_loads_installed_entry_points(
    installed: Callable[[str], None], loads: list[str]
) -> None:
    installed("good")
    host = PluginHost(PluginConfig())
    assert by_name(host)["demo_good"].why == "autoloaded"
    assert "demo_good" in loads


def test_disabled_plugin_is_blocked_before_import(
    installed: Callable[[str], None], loads: list[str]
) -> None:
    installed("good")
    host = PluginHost(apply_cli(PluginConfig(), ["no:demo_good"]))
    host.start()
    assert by_name(host)["demo_good"].status_line == "disabled: -p no:demo_good"
    assert "demo_good" not in loads
    assert "sevsim_demo_good" not in sys.modules
    assert host.plugin_manager.is_blocked("demo_good")


def test_no_autoload_keeps_entry_points_unimported_unless_enabled(
    installed: Callable[[str], None], loads: list[str]
) -> None:
    installed("good")
    installed("conflict")
    host = PluginHost(isolated_config(enable=["demo_good"]))
    infos = by_name(host)
    assert infos["demo_good"].status == ACTIVE
    assert infos["demo_ioio"].status_line == "disabled: autoload off (isolated host)"
    assert loads == ["demo_good"]
    assert "sevsim_demo_ioio" not in sys.modules


def test_import_error_is_reported_and_skipped(
    installed: Callable[[str], None], loads: list[str]
) -> None:
    installed("broken")
    installed("good")
    host = PluginHost(only("demo_broken", "demo_good"))
    table = host.start()
    assert table.lookup(ExitKind.VMGEXIT, 0x8000_0F00).plugin == "demo_good"
    info = by_name(host)["demo_broken"]
    assert (info.version, info.source, info.status) == (
        "0.3", "entry point: sevsim-demo-broken", FAILED,
    )  # fmt: skip
    assert info.why == "ModuleNotFoundError: No module named 'sevsim_demo_missing_dependency'"
    [problem] = host.problems()
    assert problem.message == f"plugin 'demo_broken' failed to load: {info.why}"
    assert loads == ["demo_broken", "demo_good"]


def test_import_error_is_fatal_under_strict(installed: Callable[[str], None]) -> None:
    installed("broken")
    host = PluginHost(
        PluginConfig(allow=frozenset({"demo_broken"}), strict=True, strict_source="--strict")
    )
    with pytest.raises(PluginError) as info:
        host.start()
    assert str(info.value) == (
        "plugin 'demo_broken' failed to load: ModuleNotFoundError: No module named "
        "'sevsim_demo_missing_dependency' (fatal in strict mode: --strict)"
    )


def test_a_disabled_broken_plugin_is_never_imported(
    installed: Callable[[str], None], loads: list[str]
) -> None:
    installed("broken")
    host = PluginHost(apply_cli(PluginConfig(strict=True), ["no:demo_broken"]))
    host.start()  # strict, yet fine: the broken import never ran
    assert by_name(host)["demo_broken"].status == DISABLED
    assert "demo_broken" not in loads


def test_entry_point_may_name_an_object(installed: Callable[[str], None]) -> None:
    installed("conflict")
    host = PluginHost(only("demo_rival"))
    assert host.start().lookup(ExitKind.VMGEXIT, IOIO).plugin == "demo_rival"


def test_entry_point_conflict(installed: Callable[[str], None]) -> None:
    installed("conflict")
    host = PluginHost(only("demo_ioio", "demo_rival"))
    with pytest.raises(PluginError) as info:
        host.start()
    assert "'demo_ioio' and 'demo_rival'" in str(info.value)
    assert "0x7b (SVM_EXIT_IOIO)" in str(info.value)


def test_builtin_source_is_the_sevsim_distribution(installed: Callable[[str], None]) -> None:
    installed("builtin")  # a dist-info named "sevsim", standing for our own
    info = by_name(PluginHost(only("demo_builtin")))["demo_builtin"]
    assert (info.source, info.version, info.status) == ("builtin", "9.9", ACTIVE)


def test_a_name_declared_by_two_distributions_is_not_guessed(
    installed: Callable[[str], None], loads: list[str]
) -> None:
    installed("good")
    installed("twice")
    host = PluginHost(only("demo_good"), plugins={})
    info = by_name(host)["demo_good"]
    assert info.status == FAILED
    assert info.why == (
        "entry point 'demo_good' is declared by several distributions "
        "(sevsim-demo-twice, sevsim-demo-good); uninstall all but one"
    )
    assert loads == []


def test_direct_plugin_shadows_an_entry_point(
    installed: Callable[[str], None], loads: list[str]
) -> None:
    installed("good")
    host = PluginHost(only("demo_good"), plugins={"demo_good": Claims((ExitKind.VMEXIT, 0x90))})
    info = by_name(host)["demo_good"]
    assert (info.source, [e.describe() for e in info.owns]) == (
        "direct", ["vmexit 0x90 (SVM_EXIT_CR0_WRITE_TRAP)"],
    )  # fmt: skip
    assert loads == []


def test_plugin_host_fixture_is_isolated_and_strict(
    plugin_host: Callable[..., PluginHost],
) -> None:
    host = plugin_host({"ioio": Claims()})
    assert host.config.strict and not host.config.autoload
    assert host.config.allow is None and host.config.origin == "isolated_host()"


# --- a plugin calling sys.exit() is one broken plugin, not the end of sevsim ----------


def _exiting_dist(root: Path) -> Path:
    """An installed distribution whose plugin module calls sys.exit(3) when imported."""
    info = root / "sevsim_demo_exits-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sevsim-demo-exits\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[sevsim.plugins]\ndemo_exits = sevsim_demo_exits\n")
    (root / "sevsim_demo_exits.py").write_text("import sys\n\nsys.exit(3)\n")
    return root


def test_sys_exit_at_import_is_reported_and_skipped(
    installed: Callable[[str], None], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    installed("good")
    monkeypatch.syspath_prepend(str(_exiting_dist(tmp_path)))
    host = PluginHost(only("demo_exits", "demo_good"))
    table = host.start()  # not strict: the run goes on without it
    assert table.lookup(ExitKind.VMGEXIT, 0x8000_0F00).plugin == "demo_good"
    info = by_name(host)["demo_exits"]
    assert (info.status, info.why) == (FAILED, "SystemExit: the plugin called sys.exit(3)")
    [problem] = host.problems()
    assert problem.message == "plugin 'demo_exits' failed to load: " + info.why
    assert not problem.fatal


def test_sys_exit_at_import_is_fatal_under_strict(
    installed: Callable[[str], None], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    installed("good")  # for the fixture's clean-up of sevsim_demo_* modules
    monkeypatch.syspath_prepend(str(_exiting_dist(tmp_path)))
    host = PluginHost(
        PluginConfig(allow=frozenset({"demo_exits"}), strict=True, strict_source="--strict")
    )
    with pytest.raises(PluginError) as info:
        host.start()
    assert str(info.value) == (
        "plugin 'demo_exits' failed to load: SystemExit: the plugin called sys.exit(3) "
        "(fatal in strict mode: --strict)"
    )


class ExitsInConfigure:
    @hookimpl
    def sevsim_configure(self, settings: Any) -> None:
        sys.exit()


class ExitsInExitHandlers:
    @hookimpl
    def sevsim_exit_handlers(self) -> list[ExitHandler]:
        raise SystemExit("no handlers today")


@pytest.mark.parametrize(
    ("plugin", "why"),
    [
        (ExitsInConfigure(), "SystemExit: the plugin called sys.exit()"),
        (ExitsInExitHandlers(), "SystemExit: the plugin called sys.exit('no handlers today')"),
    ],
)
def test_sys_exit_in_a_start_up_hook_is_a_load_failure(
    plugin_host: Callable[..., PluginHost], plugin: object, why: str
) -> None:
    host = plugin_host({"quitter": plugin, "ioio": Claims((ExitKind.VMGEXIT, IOIO))},
                       strict=False)  # fmt: skip
    assert host.start().lookup(ExitKind.VMGEXIT, IOIO).plugin == "ioio"
    assert by_name(host)["quitter"].status_line == f"failed: {why}"
    assert not host.plugin_manager.has_plugin("quitter")
    with pytest.raises(PluginError, match="fatal in strict mode"):
        plugin_host({"quitter": plugin}).start()


def test_keyboard_interrupt_in_a_plugin_still_stops_sevsim(
    plugin_host: Callable[..., PluginHost],
) -> None:
    class Interrupted:
        @hookimpl
        def sevsim_exit_handlers(self) -> list[ExitHandler]:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        plugin_host({"ctrl_c": Interrupted()}, strict=False).start()


# --- settings nobody reads ------------------------------------------------------------


def test_settings_for_a_plugin_that_takes_none_are_refused(
    plugin_host: Callable[..., PluginHost],
) -> None:
    host = plugin_host(
        {"deaf": Claims((ExitKind.VMGEXIT, IOIO))}, settings={"deaf": {"ports": 3}}, strict=False
    )
    with pytest.raises(PluginError) as info:
        host.start()
    assert str(info.value) == (
        "isolated_host(): [plugins.settings.deaf]: plugin 'deaf' takes no settings (it "
        "implements neither sevsim_configure nor a hook taking config), so this table "
        "would be ignored; remove it"
    )
    assert by_name(host)["deaf"].status == FAILED
    assert [p.fatal for p in host.problems()] == [True]
    # Without the table the same plugin is fine.
    assert plugin_host({"deaf": Claims((ExitKind.VMGEXIT, IOIO))}).start()


def test_settings_reach_a_plugin_through_configure_or_exit_handlers_config(
    plugin_host: Callable[..., PluginHost],
) -> None:
    class ConfigureOnly:
        @hookimpl
        def sevsim_configure(self, settings: Any) -> None:
            assert dict(settings) == {"x": 1}

    class ConfigArgument:
        @hookimpl
        def sevsim_exit_handlers(self, config: Any) -> list[ExitHandler]:
            assert dict(config) == {"y": 2}
            return []

    host = plugin_host(
        {"c": ConfigureOnly(), "h": ConfigArgument()}, settings={"c": {"x": 1}, "h": {"y": 2}}
    )
    host.start()
    assert host.problems() == []


def test_settings_for_a_disabled_plugin_are_not_checked() -> None:
    config = apply_cli(isolated_config(settings={"deaf": {"ports": 3}}), ["no:deaf"])
    host = PluginHost(config, plugins={"deaf": Claims((ExitKind.VMGEXIT, IOIO))})
    host.start()
    assert by_name(host)["deaf"].status == DISABLED


# --- owner rules that settle nothing --------------------------------------------------


def test_owner_rule_naming_a_plugin_that_does_not_claim_the_code_is_fatal(
    plugin_host: Callable[..., PluginHost],
) -> None:
    host = plugin_host(
        {"ioio": Claims((ExitKind.VMGEXIT, IOIO)), "mmio": Claims((ExitKind.VMGEXIT, 0x8000_0001))},
        owners={"0x7b": "mmio"}, strict=False,
    )  # fmt: skip
    with pytest.raises(PluginError) as info:
        host.start()
    assert str(info.value) == (
        "isolated_host(): owners '0x7b' = 'mmio': plugin 'mmio' does not claim exit code "
        "0x7b (it claims vmgexit 0x80000001 (SVM_VMGEXIT_MMIO_READ)), so the rule can never "
        "apply; fix the code or the plugin name, or remove the rule"
    )
    [problem] = host.problems()
    assert problem.fatal


def test_owner_rule_of_the_wrong_kind_names_the_kind(
    plugin_host: Callable[..., PluginHost],
) -> None:
    host = plugin_host({"ioio": Claims((ExitKind.VMGEXIT, IOIO))},
                       owners={"msr_protocol:0x7b": "ioio"}, strict=False)  # fmt: skip
    with pytest.raises(PluginError, match="does not claim exit code msr_protocol 0x7b"):
        host.start()


def test_owner_rule_for_an_uncontested_code_is_reported(
    plugin_host: Callable[..., PluginHost],
) -> None:
    plugins = {"ioio": Claims((ExitKind.VMGEXIT, IOIO)), "mmio": Claims()}
    host = plugin_host(plugins, owners={"0x7b": "ioio"}, strict=False)
    assert host.start().lookup(ExitKind.VMGEXIT, IOIO).plugin == "ioio"
    [problem] = host.problems()
    assert problem == (
        problem.__class__(
            "isolated_host(): owners '0x7b' = 'ioio' settles nothing: 'ioio' is the only "
            "active plugin claiming vmgexit 0x7b (SVM_EXIT_IOIO); remove the rule unless a "
            "rival claimant is enabled again",
            fatal=False,
        )
    )
    with pytest.raises(PluginError, match=r"settles nothing.*fatal in strict mode"):
        plugin_host(plugins, owners={"0x7b": "ioio"}).start()


def test_owner_rule_shadowed_by_a_kind_specific_one_is_reported(
    plugin_host: Callable[..., PluginHost],
) -> None:
    claim = (ExitKind.VMGEXIT, IOIO)
    host = plugin_host({"ioio": Claims(claim), "rival": Claims(claim)},
                       owners={"0x7b": "ioio", "vmgexit:0x7b": "rival"}, strict=False)  # fmt: skip
    assert host.start().lookup(ExitKind.VMGEXIT, IOIO).plugin == "rival"
    [problem] = host.problems()
    assert problem.message == (
        "isolated_host(): owners '0x7b' = 'ioio' settles nothing: isolated_host(): owners "
        "'vmgexit:0x7b' = 'rival' decides vmgexit 0x7b (SVM_EXIT_IOIO) instead"
    )


def test_owner_rule_naming_a_disabled_plugin_is_not_checked() -> None:
    config = apply_cli(isolated_config(owners={"0x7b": "rival"}), ["no:rival"])
    host = PluginHost(config, plugins={"ioio": Claims((ExitKind.VMGEXIT, IOIO)),
                                       "rival": Claims((ExitKind.VMGEXIT, IOIO))})  # fmt: skip
    assert host.start().lookup(ExitKind.VMGEXIT, IOIO).plugin == "ioio"
    assert host.problems() == []


def test_owner_rule_naming_a_failed_plugin_is_not_checked_again(
    plugin_host: Callable[..., PluginHost],
) -> None:
    host = plugin_host({"ioio": Claims((ExitKind.VMGEXIT, IOIO)), "broken": Raises()},
                       owners={"0x7b": "broken"}, strict=False)  # fmt: skip
    host.start()
    assert [p.message for p in host.problems()] == [
        "plugin 'broken' failed to load: RuntimeError: table on fire"
    ]
