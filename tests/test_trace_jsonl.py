"""The JSON Lines trace: what a real run writes, the filter, and the reader's checks."""

from __future__ import annotations

import io
import json
from datetime import datetime
from enum import Enum, IntEnum
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from trace_runs import TracedRun, ticking_clock, traced_run

from sevsim.errors import ConfigError
from sevsim.kvm.exits import SystemEvent, SystemEventType
from sevsim.kvm.vm import VmInfo
from sevsim.trace_jsonl import JsonlSink, TraceFilter, read_trace


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> TracedRun:
    return traced_run(tmp_path_factory.mktemp("trace") / "run.jsonl")


@pytest.fixture(scope="module")
def events(run: TracedRun) -> list[dict[str, Any]]:
    return list(read_trace(run.path))


def only(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == name]


# -- what a real run writes ------------------------------------------------------------


def test_the_run_ends_with_the_termination_request(run: TracedRun) -> None:
    assert run.exit == SystemEvent(SystemEventType.SEV_TERM, (0x100,))


def test_the_header_comes_first(run: TracedRun) -> None:
    header = json.loads(run.path.read_text().splitlines()[0])
    assert header["schema"] == "sevsim-trace"
    assert header["version"] == 1
    assert header["sevsim"] == metadata.version("sevsim")
    assert datetime.fromisoformat(header["started"]).tzinfo is not None
    assert header["filter"] is None
    assert header["guest_clock"] is False


def test_events_are_numbered_in_order_with_wall_time(events: list[dict[str, Any]]) -> None:
    assert [e["seq"] for e in events] == list(range(len(events)))
    walls = [e["wall_ns"] for e in events]
    assert walls == sorted(walls) and walls[0] >= 0
    assert not any("guest_ns" in e for e in events)  # no guest clock given


def test_an_out_to_port_0x80_is_a_vmgexit_handled_by_ioio(events: list[dict[str, Any]]) -> None:
    enter = only(events, "vmgexit_enter")[0]
    assert enter["exit_reason"] == 0x7B
    assert enter["exit_name"] == "SVM_EXIT_IOIO"
    assert enter["info1"] >> 16 == 0x80  # the port, in IOIO exit info
    assert enter["decoded"] == "out port 0x80 size 1"
    handled = only(events, "exit_handled")[0]
    assert handled | {"wall_ns": 0, "seq": 0} == {
        "seq": 0, "event": "exit_handled", "wall_ns": 0, "vcpu_id": 0, "kind": "vmgexit",
        "code": 0x7B, "plugin": "ioio", "notes": {"ioio": "port 0x80 <- 0x0"},
        "exit_name": "SVM_EXIT_IOIO",
    }  # fmt: skip
    reply = only(events, "vmgexit_exit")[0]
    assert (reply["exit_reason"], reply["info1"], reply["decoded"]) == (0x7B, 0, "ok (info2 0x0)")


def test_one_ghcb_exit_in_the_order_the_summary_pairs(events: list[dict[str, Any]]) -> None:
    first_vc = next(i for i, e in enumerate(events) if e["event"] == "sim_vc")
    names = [e["event"] for e in events[first_vc : first_vc + 7]]
    assert names == ["sim_vc", "sim_exit", "vmexit", "vmgexit_enter", "device_access",
                     "exit_handled", "vmgexit_exit"]  # fmt: skip
    assert events[first_vc + 2]["exit_code"] == 0x403
    assert events[first_vc + 2]["exit_name"] == "SVM_EXIT_VMGEXIT"


def test_the_simulators_view_has_hex_bytes_and_plain_ints(events: list[dict[str, Any]]) -> None:
    vc = only(events, "sim_vc")[0]
    assert vc["exit_code"] == 0x7B and type(vc["exit_code"]) is int  # an IntEnum in sevsim
    assert vc["insn"].startswith("ee") and vc["insn"] == vc["insn"].lower()
    assert bytes.fromhex(vc["insn"])[0] == 0xEE
    assert vc["decoded"].endswith("out dx, al")
    assert (vc["vm"], vc["vcpu"], vc["bits"]) == ("vm", 0, 64)


def test_launch_commands_carry_the_vm_as_an_object(events: list[dict[str, Any]]) -> None:
    commands = only(events, "launch_command")
    assert [c["command"] for c in commands][:2] == ["LAUNCH_START", "ACTIVATE"]
    assert commands[-1]["command"] == "LAUNCH_FINISH"
    assert commands[0]["vm"] == {"name": "vm", "asid": 1, "era": "newest", "vcpus": 1}
    assert all(c["status"] == "SUCCESS" for c in commands)


def test_msr_protocol_requests_are_named(events: list[dict[str, Any]]) -> None:
    (request,) = only(events, "msr_protocol_enter")
    assert (request["ghcb_gpa"], request["exit_name"]) == (0x100, "GHCB_MSR_TERM_REQ")
    assert request["decoded"].startswith("TERM_REQ set 0 code 0")
    handled = only(events, "exit_handled")[-1]
    assert (handled["kind"], handled["plugin"], handled["exit_name"]) == (
        "msr_protocol", "msr_protocol", "GHCB_MSR_TERM_REQ")  # fmt: skip
    assert not only(events, "msr_protocol_exit")  # KVM skips it on the terminate path


def test_a_guest_clock_stamps_every_event(tmp_path: Path) -> None:
    run = traced_run(tmp_path / "run.jsonl", guest_clock=ticking_clock(1000))
    events = list(read_trace(run.path))
    assert [e["guest_ns"] for e in events] == [1000 * e["seq"] for e in events]
    assert json.loads(run.path.read_text().splitlines()[0])["guest_clock"] is True


# -- any event, any fields ----------------------------------------------------------------


class Vector(IntEnum):
    NMI = 2


class Colour(Enum):
    RED = "red"


class Opaque:
    def __str__(self) -> str:
        return "<opaque thing>"


def test_an_event_nobody_described_is_written_generically() -> None:
    out = io.StringIO()
    sink = JsonlSink(out)
    assert sink.wants("cr_trap_value")
    sink.emit("cr_trap_value", vcpu_id=1, vector=Vector.NMI, colour=Colour.RED,
              payload=b"\x00\xab", vm=VmInfo("vm", 1, "newest", 2), thing=Opaque(),
              nested={"list": [b"\x01", (1, 2)], 7: None, "set": {3}}, ratio=float("nan"),
              flag=True, seq=99, exit_code=0x7C)  # fmt: skip
    _header, line = out.getvalue().splitlines()
    event = json.loads(line)
    assert event == {
        "seq": 0, "event": "cr_trap_value", "wall_ns": event["wall_ns"], "vcpu_id": 1,
        "vector": 2, "colour": "RED", "payload": "00ab",
        "vm": {"name": "vm", "asid": 1, "era": "newest", "vcpus": 2},
        "thing": "<opaque thing>", "nested": {"list": ["01", [1, 2]], "7": None, "set": [3]},
        "ratio": "nan", "flag": True, "seq_": 99, "exit_code": 0x7C, "exit_name": "SVM_EXIT_MSR",
    }  # fmt: skip


def test_decoded_names_never_replace_a_field() -> None:
    out = io.StringIO()
    JsonlSink(out).emit("custom", exit_code=0x7B, exit_name="mine")
    assert json.loads(out.getvalue().splitlines()[1])["exit_name"] == "mine"


def test_every_line_is_on_disk_when_emit_returns(tmp_path: Path) -> None:
    path = tmp_path / "live.jsonl"
    with path.open("w", encoding="utf-8") as file:
        sink = JsonlSink(file)
        sink.emit("phase", name="boot")
        # Read through another handle while the file is still open: nothing waits
        # for a close that a dying run would never reach.
        assert [e["name"] for e in read_trace(path)] == ["boot"]


# -- filters ----------------------------------------------------------------------------


def test_a_filter_has_a_canonical_form() -> None:
    parsed = TraceFilter.parse(" code = SVM_EXIT_IOIO,0x7c ; vcpu=1,0;event=vmexit ;")
    assert str(parsed) == "event=vmexit;vcpu=0,1;code=0x7b,0x7c"
    assert TraceFilter.parse(str(parsed)) == parsed
    assert TraceFilter.parse("") == TraceFilter()
    assert TraceFilter.parse("code=svm_vmgexit_mmio_read").codes == {0x8000_0001}


def test_the_header_records_the_filter_in_force() -> None:
    def header(trace_filter: TraceFilter) -> Any:
        out = io.StringIO()
        JsonlSink(out, trace_filter=trace_filter)
        return json.loads(out.getvalue())["filter"]

    assert header(TraceFilter.parse("vcpu=1; event=vmexit")) == "event=vmexit;vcpu=1"
    assert header(TraceFilter.parse("")) is None  # keeps everything


def test_wants_says_no_to_events_a_filter_can_never_keep() -> None:
    by_name = TraceFilter.parse("event=vmexit,vmgexit_enter")
    assert by_name.wants("vmexit") and not by_name.wants("sim_vc")
    by_plugin = TraceFilter.parse("plugin=ioio")
    assert by_plugin.wants("exit_handled")
    assert not by_plugin.wants("vmexit")  # a known event without a plugin field
    assert not by_plugin.wants("device_access")  # no plugin field either
    assert by_plugin.wants("plugin_failed")
    assert by_plugin.wants("cr_trap_value")  # an unknown event: decided per event


def test_a_code_filter_keeps_everything_about_that_code(tmp_path: Path) -> None:
    run = traced_run(tmp_path / "run.jsonl", trace_filter="code=SVM_EXIT_IOIO")
    events = list(read_trace(run.path))
    assert {e["event"] for e in events} == {"sim_vc", "vmgexit_enter", "exit_handled",
                                           "vmgexit_exit"}  # fmt: skip
    assert len(events) == 8  # two IOIO exits, four events each
    assert [e["seq"] for e in events] == list(range(8))
    assert json.loads(run.path.read_text().splitlines()[0])["filter"] == "code=0x7b"


def test_event_and_plugin_clauses_combine(tmp_path: Path) -> None:
    run = traced_run(tmp_path / "run.jsonl", trace_filter="event=exit_handled;plugin=msr_protocol")
    (event,) = read_trace(run.path)
    assert (event["event"], event["exit_name"]) == ("exit_handled", "GHCB_MSR_TERM_REQ")


class Spy(JsonlSink):
    """Records which events the emitters built at all."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.built: set[str] = set()

    def emit(self, name: str, /, **fields: Any) -> None:
        self.built.add(name)
        super().emit(name, **fields)


def test_kvm_and_the_simulator_do_not_build_filtered_out_events(tmp_path: Path) -> None:
    run = traced_run(tmp_path / "run.jsonl", trace_filter="event=vmexit,exit_handled",
                     sink_type=Spy)  # fmt: skip
    assert isinstance(run.sink, Spy)
    assert run.sink.built == {"vmexit", "exit_handled"}


@pytest.mark.parametrize(("text", "problem"), [
    ("event=vmexti", "event 'vmexti' is not valid; expected a known event (device_access, "
                     "exit_handled, "),
    ("event=", "event '' is not valid; expected a known event"),
    ("vcpu=one", "vcpu 'one' is not valid; expected a vCPU index (0, 1, ...)"),
    ("vcpu=-1", "vcpu '-1' is not valid; expected a vCPU index"),
    ("colour=red", "unknown key 'colour'; expected one of event, vcpu, plugin, code"),
    ("event", "'event' is not KEY=VALUE[,VALUE...]"),
    ("code=SVM_EXIT_NOPE", "code 'SVM_EXIT_NOPE' is not valid; expected an exit code: a number "
                           "(0x7b, 123) or Linux's name (SVM_EXIT_IOIO)"),
    ("code=-5", "code '-5' is not valid; expected an exit code"),
    ("vcpu=0;vcpu=1", "'vcpu' appears twice; list its values in one clause (vcpu=A,B)"),
    ("plugin=my plugin", "plugin 'my plugin' is not valid; expected a plugin name"),
])  # fmt: skip
def test_a_bad_filter_names_the_bad_part(text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        TraceFilter.parse(text)
    assert str(info.value).startswith(f"trace filter {text!r}: {problem}")


# -- reading a trace back ---------------------------------------------------------------


def test_what_is_read_is_what_was_written(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    with path.open("w", encoding="utf-8") as file:
        sink = JsonlSink(file, guest_clock=ticking_clock(5))
        sink.emit("vmexit", vcpu_id=0, exit_code=0x78, info1=0, info2=0)
        sink.emit("phase", name="run")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert list(read_trace(path)) == lines[1:]
    assert lines[1]["exit_name"] == "SVM_EXIT_HLT" and lines[2]["guest_ns"] == 5


HEADER = '{"schema": "sevsim-trace", "version": 1}\n'
EVENT = '{"seq": 0, "event": "phase", "wall_ns": 5, "name": "boot"}\n'


@pytest.mark.parametrize(("text", "problem"), [
    ("", ":1: empty; expected a sevsim trace header"),
    ("\n" + EVENT, ":1: empty; expected a sevsim trace header"),
    ('{"hello": 1}\n', ':1: not a sevsim trace: the first line must be a header with '
                       '"schema": "sevsim-trace", got None'),
    ("schema,version\n", ":1: not a JSON line"),
    ('{"schema": "sevsim-trace", "version": 2}\n', ":1: trace format version 2 is newer than "
                                                   "this sevsim reads (1)"),
    ('{"schema": "sevsim-trace", "version": "1"}\n', ":1: header version '1': expected an "
                                                     "integer >= 1"),
    ('{"schema": "sevsim-trace"}\n', ":1: header version None"),
])  # fmt: skip
def test_a_bad_header_is_refused_before_any_event(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(text + (EVENT if text else ""))
    with pytest.raises(ConfigError) as info:
        read_trace(path)  # at once, not on the first next()
    assert str(info.value).startswith(f"{path}{problem}")


@pytest.mark.parametrize(("line", "problem"), [
    ('{"seq": 1, "event": "phase", "wall_ns": 9, "name": "ru', ":3: not a JSON line"),
    ("[1, 2]", ":3: expected a JSON object, got list"),
    ('{"event": "phase", "wall_ns": 9}', ":3: event line without a valid 'seq' (expected int, "
                                         "got None)"),
    ('{"seq": 1, "event": 7, "wall_ns": 9}', ":3: event line without a valid 'event'"),
    ('{"seq": 1, "event": "x", "wall_ns": "9"}', ":3: event line without a valid 'wall_ns'"),
    (b'{"seq": 1, "event": "\xff", "wall_ns": 9}', ":3: not a JSON line"),
])  # fmt: skip
def test_a_malformed_line_is_reported_with_file_and_line(
    tmp_path: Path, line: str | bytes, problem: str
) -> None:
    path = tmp_path / "bad.jsonl"
    tail = line if isinstance(line, bytes) else line.encode()
    path.write_bytes((HEADER + EVENT).encode() + tail + b"\n")
    events = read_trace(path)
    assert next(events)["name"] == "boot"  # what came before is read
    with pytest.raises(ConfigError) as info:
        next(events)
    assert str(info.value).startswith(f"{path}{problem}")


def test_blank_lines_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(HEADER + "\n" + EVENT + "  \n")
    assert [e["name"] for e in read_trace(path)] == ["boot"]


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"trace file .*nothing\.jsonl: cannot open it: No such"):
        read_trace(tmp_path / "nothing.jsonl")
