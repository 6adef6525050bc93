"""What the hypervisor side does to a vCPU on its own account, in both traces: interrupts
and NMIs injected, INIT and SIPI delivered, device accesses, plugin failures.

The bundled guests make them for real: ``smp`` wakes three APs with INIT-SIPI-SIPI
(one twice), takes a LAPIC timer interrupt and an NMI, and reaches its xAPIC and UART
through the VMM's devices; the demo writes its greeting to the UART and uses the MMIO
test device. A tiny plugin whose handler raises makes the plugin failure.
"""

from __future__ import annotations

import contextlib
import io
import re
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from trace_runs import traced_run

from sevsim import hookimpl
from sevsim.cli import main
from sevsim.guest.snippets import TERMINATE
from sevsim.kvm.dispatch import ExitHandler, ExitKind
from sevsim.kvm.events import EVENTS
from sevsim.kvm.exits import RunFailed
from sevsim.kvm.vm import Kvm
from sevsim.testing import ExitDriver, isolated_host, run_guest
from sevsim.trace import Trace
from sevsim.trace_filter import TraceFilter
from sevsim.trace_jsonl import read_trace
from sevsim.trace_schema import KNOWN_EVENTS
from sevsim.vmm.machine import Devices

ROOT = Path(__file__).resolve().parent.parent
#: The events this file is about.
NEW = ("interrupt_injected", "nmi_injected", "init_delivered", "sipi_delivered",
       "device_access", "plugin_failed")  # fmt: skip
#: The four APs' wake-ups of the smp guest, in order: AP 2 is woken twice.
WOKEN = [1, 2, 3, 2]

Event = dict[str, Any]


@contextlib.contextmanager
def clean_cli(where: Path) -> Iterator[None]:
    """No sevsim.toml and no SEVSIM_* variables, for a module-scoped run."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(where)
        for name in ("SEVSIM_PLUGINS", "SEVSIM_DISABLE_PLUGIN_AUTOLOAD", "NO_COLOR"):
            patch.delenv(name, raising=False)
        yield


def cli_run(where: Path, *argv: str) -> tuple[int, list[Event], str]:
    """``sevsim run ARGV`` with both traces: its status, the JSONL events, and the text
    trace (stdout, then stderr: ``--guest smp`` prints it on stderr, its console's bytes
    on stdout)."""
    path = where / "run.jsonl"
    console = io.BytesIO()
    out, err = io.TextIOWrapper(console, encoding="utf-8", write_through=True), io.StringIO()
    with clean_cli(where), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(["run", *argv, "--trace-format", "text,jsonl", "--trace-file", str(path)])
    return status, list(read_trace(path)), console.getvalue().decode() + err.getvalue()


def smp(where: Path, *options: str) -> tuple[list[Event], str]:
    status, events, text = cli_run(where, "--guest", "smp", "--uart-input", "", "--icount",
                                   "-v", *options)  # fmt: skip
    assert status == 0, text[-2000:]
    return events, text


def only(events: list[Event], name: str) -> list[Event]:
    return [e for e in events if e["event"] == name]


def fields(event: Event) -> dict[str, Any]:
    """An event without the keys every event has (and the decoded names)."""
    return {k: v for k, v in event.items() if k not in {"seq", "event", "wall_ns", "guest_ns",
                                                        "exit_name", "decoded"}}  # fmt: skip


@pytest.fixture(scope="module")
def smp_hv(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Event], str]:
    """The smp guest as the hypervisor sees it (``--hypervisor-view``), unfiltered."""
    return smp(tmp_path_factory.mktemp("smp"), "--hypervisor-view")


@pytest.fixture(scope="module")
def smp_named(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Event], str]:
    """The smp guest with a filter that names every new event kind."""
    return smp(tmp_path_factory.mktemp("smp"), "--trace-filter", f"event={','.join(NEW)}")


def test_the_hypervisor_view_keeps_every_delivery_and_access(
    smp_hv: tuple[list[Event], str],
) -> None:
    events, text = smp_hv
    names = {e["event"] for e in events}
    assert not [name for name in names if name.startswith("sim_")]
    assert set(NEW) - {"plugin_failed"} <= names  # what KVM and the VMM themselves know
    assert "(simulator's view)" not in text


# --- INIT and SIPI --------------------------------------------------------------------------


def test_init_and_sipi_reach_each_ap_in_turn(smp_hv: tuple[list[Event], str]) -> None:
    events, text = smp_hv
    deliveries = [(e["event"], e["vcpu_id"]) for e in events
                  if e["event"] in ("init_delivered", "sipi_delivered")]  # fmt: skip
    assert deliveries == [(kind, ap) for ap in WOKEN
                          for kind in ("init_delivered", "sipi_delivered")]  # fmt: skip
    # The second SIPI of each INIT-SIPI-SIPI finds the AP running: not delivered.
    assert [fields(e) for e in only(events, "sipi_delivered")] == [
        {"vcpu_id": ap, "vector": 0, "start": 0} for ap in WOKEN]  # fmt: skip
    assert [fields(e) for e in only(events, "init_delivered")] == [{"vcpu_id": ap}
                                                                   for ap in WOKEN]  # fmt: skip
    lines = text.splitlines()
    assert lines.count("      INIT         vcpu2: waits for a SIPI") == 2
    assert lines.count("      SIPI         vcpu3 vector 0x0 (start 0x0)") == 1
    assert sum(line.startswith("      SIPI         vcpu") for line in lines) == 4


def test_an_init_is_shown_under_the_icr_write_that_sent_it(
    smp_hv: tuple[list[Event], str],
) -> None:
    _, text = smp_hv
    lines = text.splitlines()
    at = lines.index("      INIT         vcpu1: waits for a SIPI")
    assert lines[at - 1] == "      GHCB SVM_VMGEXIT_MMIO_WRITE  4 bytes at 0xfee00300"
    assert lines[at + 1] == "      mmio: wrote 4 bytes at 0xfee00300: 00 45 00 00"


# --- interrupts and NMIs ------------------------------------------------------------------


def test_the_lapic_timer_interrupt_is_injected_into_the_bsp(
    smp_hv: tuple[list[Event], str],
) -> None:
    events, text = smp_hv
    assert [fields(e) for e in only(events, "interrupt_injected")] == [
        {"vcpu_id": 0, "vector": 0x30, "how": "event_inj"}]  # fmt: skip
    assert text.splitlines().count("      interrupt    vcpu0 vector 0x30 (EVENTINJ)") == 1


def test_the_nmi_is_injected_before_the_bsp_completes_it(
    smp_hv: tuple[list[Event], str],
) -> None:
    events, text = smp_hv
    (nmi,) = only(events, "nmi_injected")
    assert fields(nmi) == {"vcpu_id": 0, "how": "event_inj"}
    complete = next(e for e in events if e["event"] == "vmgexit_enter"
                    and e["exit_name"] == "SVM_VMGEXIT_NMI_COMPLETE")  # fmt: skip
    assert nmi["seq"] < complete["seq"] and complete["vcpu_id"] == 0
    lines = text.splitlines()
    at = lines.index("      NMI          vcpu0 (EVENTINJ)")
    assert "GHCB SVM_VMGEXIT_NMI_COMPLETE" in "\n".join(lines[at : at + 3])


# --- device accesses ----------------------------------------------------------------------


def test_device_accesses_are_in_the_jsonl_trace_of_every_run(
    smp_hv: tuple[list[Event], str],
) -> None:
    events, text = smp_hv
    accesses = only(events, "device_access")
    icr = [fields(e) for e in accesses if e["address"] == 0xFEE00300]
    assert icr[0] == {"vcpu_id": 0, "device": "lapic", "bus": "mmio", "address": 0xFEE00300,
                      "size": 4, "direction": "write", "value": 0x4500}  # fmt: skip
    assert accesses[0]["decoded"] == "lapic: mmio 0xfee000f0 <- 0x000001ff (4 bytes)"
    uart = [e for e in accesses if e["device"] == "uart16550" and e["direction"] == "write"]
    assert bytes(e["value"] for e in uart).decode().startswith("AP 1 up\n")
    assert {e["vcpu_id"] for e in uart} == {0, 1, 2, 3}  # each vCPU prints its own line
    # The text trace leaves them out unless the filter names them.
    assert "device " not in text


def test_a_filter_naming_device_access_shows_it_in_the_text_trace(
    smp_named: tuple[list[Event], str],
) -> None:
    events, text = smp_named
    assert {e["event"] for e in events} == set(NEW) - {"plugin_failed"}
    lines = text.splitlines()
    assert "      device       vcpu0 lapic: mmio 0xfee00300 <- 0x00004500 (4 bytes)" in lines
    assert "      device       vcpu1 uart16550: port 0x3f8 <- 0x41 (1 byte)" in lines  # "A"
    shown = sum(line.startswith("      device       vcpu") for line in lines)
    assert shown == len(only(events, "device_access"))
    assert "      INIT         vcpu1: waits for a SIPI" in lines
    assert "GHCB SVM_" not in text  # the filter holds for the text trace's own lines


def test_the_demos_port_io_and_mmio_reach_its_devices(tmp_path: Path) -> None:
    status, events, text = cli_run(tmp_path, "--trace-filter", "event=device_access")
    assert status == 0
    uart = [e for e in events if e["device"] == "uart16550" and e["direction"] == "write"]
    assert bytes(e["value"] for e in uart) == b"Hello from an SEV-ES guest\n"
    assert all((e["bus"], e["address"], e["size"]) == ("io", 0x3F8, 1) for e in uart)
    mmio = [fields(e) for e in events if e["device"] == "mmio-test"]
    assert mmio[0] == {"vcpu_id": 0, "device": "mmio-test", "bus": "mmio",
                       "address": 0xD000_0000, "size": 4, "direction": "read",
                       "value": 0x5345_5653}  # fmt: skip
    assert {
        "      device       vcpu0 uart16550: port 0x3f8 <- 0x48 (1 byte)",  # "H"
        "      device       vcpu0 mmio-test: mmio 0xd0000000 -> 0x53455653 (4 bytes)",
        "      device       vcpu0 mmio-test: mmio 0xd0000008 <- 0x5ec05ec05ec05ec0 (8 bytes)",
    } <= set(text.splitlines())


def test_a_device_access_happens_inside_the_exit_that_made_it(tmp_path: Path) -> None:
    run = traced_run(tmp_path / "run.jsonl")  # OUT then IN at the POST port
    events = list(read_trace(run.path))
    accesses = only(events, "device_access")
    assert [(e["device"], e["direction"], e["address"]) for e in accesses] == [
        ("post", "write", 0x80), ("post", "read", 0x80)]  # fmt: skip
    for access in accesses:
        before = events[access["seq"] - 1]
        assert before["event"] == "vmgexit_enter" and before["exit_name"] == "SVM_EXIT_IOIO"


def test_nobody_listening_leaves_the_buses_unhooked() -> None:
    """A trace that shows no device lines does not want the event: the buses get no
    callback, so an access costs what it did before."""
    for trace, hooked in ((Trace(), False), (Trace(device_accesses=True), True)):
        vm = Kvm().create_vm(events=trace)
        devices = Devices.standard()
        devices.attach(vm)
        assert bool(devices.io.on_access) is hooked
        assert bool(devices.mmio.on_access) is hooked


# --- plugin failures ----------------------------------------------------------------------

BOOM = """
    from sevsim import hookimpl
    from sevsim.arch.exits import SvmExit
    from sevsim.kvm.dispatch import ExitHandler, ExitKind


    def out(ctx):
        raise RuntimeError("the port is on fire")


    @hookimpl
    def sevsim_exit_handlers():
        yield ExitHandler(ExitKind.VMGEXIT, SvmExit.IOIO, out)
"""


@pytest.fixture
def boom(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """``sevsim run`` options that load a plugin (a module, ``-p boomplug``) whose IOIO
    handler raises, in place of the ``ioio`` plugin."""
    (tmp_path / "boomplug.py").write_text(textwrap.dedent(BOOM))
    monkeypatch.syspath_prepend(str(tmp_path))
    return ["-p", "no:ioio", "-p", "boomplug"]


def test_a_raising_handler_is_a_plugin_failed_event_in_both_traces(
    tmp_path: Path, boom: list[str]
) -> None:
    status, events, text = cli_run(tmp_path, *boom)
    assert status == 1  # the run failed, it did not crash
    (failed,) = only(events, "plugin_failed")
    assert fields(failed) == {"vcpu_id": 0, "plugin": "boomplug", "kind": "vmgexit",
                              "code": 0x7B, "error": "RuntimeError",
                              "message": "the port is on fire"}  # fmt: skip
    assert failed["exit_name"] == "SVM_EXIT_IOIO"
    # The trace goes on to the end of the run: nothing is lost.
    assert [e["event"] for e in events[failed["seq"] + 1 :]] == ["phase", "vm_destroyed"]
    assert "boomplug" in events[-1]["why"]
    lines = text.splitlines()
    line = ("      plugin error vcpu0 boomplug: handler for vmgexit 0x7b (SVM_EXIT_IOIO): "
            "RuntimeError: the port is on fire")  # fmt: skip
    at = lines.index(line)
    assert lines[at + 1].startswith("      -> to userspace: KVM_RUN failed: -EIO")
    assert "run failed: the VM did not end normally" in text


def test_a_plugin_filter_keeps_the_plugins_failure(tmp_path: Path, boom: list[str]) -> None:
    status, events, text = cli_run(tmp_path, *boom, "--trace-filter", "plugin=boomplug")
    assert status == 1
    assert [e["event"] for e in events] == ["plugin_failed"]
    assert "      plugin error vcpu0 boomplug: handler for vmgexit 0x7b" in text


class Broken:
    """Its TERM_REQ handler returns what no outcome is: a broken contract, not a raise."""

    @hookimpl
    def sevsim_exit_handlers(self) -> Iterator[ExitHandler]:
        yield ExitHandler(ExitKind.MSR_PROTOCOL, 0x100, lambda ctx: "done")


class Failures:
    def __init__(self) -> None:
        self.heard: list[dict[str, Any]] = []

    @hookimpl
    def sevsim_plugin_failed(self, vcpu_id: int, plugin: str, kind: str, code: int,
                             error: str | None, message: str) -> None:  # fmt: skip
        self.heard.append({"vcpu_id": vcpu_id, "plugin": plugin, "kind": kind, "code": code,
                           "error": error, "message": message})  # fmt: skip


def test_a_broken_contract_is_a_failure_without_an_exception_type() -> None:
    failures = Failures()
    run = run_guest(TERMINATE, {"broken": Broken(), "failures": failures})
    assert isinstance(run.exit, RunFailed) and run.exit.plugin == "broken"
    assert failures.heard == [{
        "vcpu_id": 0, "plugin": "broken", "kind": "msr_protocol", "code": 0x100, "error": None,
        "message": "returned 'done', expected an outcome (RESUME, ExitToUser, Fail) or None",
    }]  # fmt: skip
    assert ("      plugin error vcpu0 broken: handler for msr_protocol 0x100 "
            "(GHCB_MSR_TERM_REQ): returned 'done', expected an outcome") in "\n".join(
        run.trace.lines)  # fmt: skip


# --- observers ------------------------------------------------------------------------------


class Recorder:
    """Hears every new event through its observer hook."""

    def __init__(self) -> None:
        self.heard: list[tuple[str, dict[str, Any]]] = []

    @hookimpl
    def sevsim_interrupt_injected(self, vcpu_id: int, vector: int, how: str) -> None:
        self.heard.append(("interrupt_injected", {"vcpu_id": vcpu_id, "vector": vector}))

    @hookimpl
    def sevsim_nmi_injected(self, vcpu_id: int, how: str) -> None:
        self.heard.append(("nmi_injected", {"vcpu_id": vcpu_id, "how": how}))

    @hookimpl
    def sevsim_init_delivered(self, vcpu_id: int) -> None:
        self.heard.append(("init_delivered", {"vcpu_id": vcpu_id}))

    @hookimpl
    def sevsim_sipi_delivered(self, vcpu_id: int, vector: int, start: int) -> None:
        self.heard.append(("sipi_delivered", {"vector": vector, "start": start}))

    @hookimpl
    def sevsim_device_access(self, device: str, bus: str, direction: str, value: int) -> None:
        self.heard.append(("device_access", {"device": device, "bus": bus, "value": value}))


def test_observer_hooks_hear_each_delivery_and_access() -> None:
    recorder = Recorder()
    host = isolated_host({"recorder": recorder}, enable=["ioio", "nmi"])
    table = host.start()
    # Nothing plays VMRUN here to take an event out of EVENTINJ: a VM for each event.
    irq = ExitDriver(table, events=host.events)
    irq.vcpu.interrupt(0x41)
    irq.vmexit(0x78)  # an exit (HLT); the next entry injects the interrupt
    driver = ExitDriver(table, events=host.events)
    driver.vcpu.nmi()
    driver.vmexit(0x78)
    driver.vcpu.init()
    driver.vcpu.deliver_sipi(0x9F)
    driver.vmgexit({"sw_exit_code": 0x7B, "sw_exit_info_1": 0x3F8 << 16 | 0x10,
                    "sw_exit_info_2": 0, "rax": 0x21})  # OUT of "!" to COM1  # fmt: skip
    assert recorder.heard == [
        ("interrupt_injected", {"vcpu_id": 0, "vector": 0x41}),
        ("nmi_injected", {"vcpu_id": 0, "how": "event_inj"}),
        ("init_delivered", {"vcpu_id": 0}),
        ("sipi_delivered", {"vector": 0x9F, "start": 0x9F000}),
        ("device_access", {"device": "uart16550", "bus": "io", "value": 0x21}),
    ]


# --- the format: schema, filter and documentation -----------------------------------------


def test_every_new_kind_is_a_known_event_a_filter_accepts() -> None:
    for name in NEW:
        assert KNOWN_EVENTS[name] == EVENTS[name]
        assert TraceFilter.parse(f"event={name}").wants(name)
        assert TraceFilter.parse("vcpu=0").wants(name)  # each names its vCPU
    by_plugin = TraceFilter.parse("plugin=ioio")
    assert [name for name in NEW if by_plugin.wants(name)] == ["plugin_failed"]
    by_code = TraceFilter.parse("code=SVM_EXIT_IOIO")
    assert [name for name in NEW if by_code.wants(name)] == ["plugin_failed"]


def documented_events() -> dict[str, tuple[str, ...]]:
    """Event -> fields, from the tables of docs/trace-format.md's "Known events"."""
    doc = (ROOT / "docs" / "trace-format.md").read_text()
    section = doc[doc.index("## Known events") : doc.index("### Events not listed here")]
    rows = re.findall(r"^\| `(\w+)` \| ([^|]*) \|", section, re.MULTILINE)
    return {name: tuple(re.findall(r"`(\w+)`", cells)) for name, cells in rows}


def test_every_event_kind_is_documented_with_its_fields() -> None:
    assert documented_events() == dict(KNOWN_EVENTS)


def test_the_text_trace_has_a_line_for_every_kvm_event() -> None:
    trace = Trace(device_accesses=True)
    assert [name for name in EVENTS if not trace.wants(name)] == []


def test_vv_adds_the_device_lines_to_the_text_trace(tmp_path: Path) -> None:
    """The demo's text trace leaves device accesses to the handlers' notes; ``-vv``
    adds a line per access, as many as the JSONL trace holds."""
    _, events, quiet = cli_run(tmp_path, "--guest", "demo", "-v")
    _, _, verbose = cli_run(tmp_path, "--guest", "demo", "-vv")
    assert "      device       vcpu" not in quiet
    shown = [line for line in verbose.splitlines() if line.startswith("      device       vcpu")]
    assert shown and len(shown) == len(only(events, "device_access"))
    assert "      device       vcpu0 uart16550: port 0x3f8 <- 0x48 (1 byte)" in shown  # "H"
