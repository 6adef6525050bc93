"""``summarize``: exits by code, plugin and vCPU from a trace, and how times are paired."""

from __future__ import annotations

import json
from typing import Any

import pytest
from trace_runs import ticking_clock, traced_run

from sevsim.trace_jsonl import read_trace
from sevsim.trace_summary import Row, TraceSummary, summarize


@pytest.fixture(scope="module")
def summary(tmp_path_factory: pytest.TempPathFactory) -> TraceSummary:
    """The IOIO guest, traced with a guest clock that ticks 1000 ns per event."""
    path = tmp_path_factory.mktemp("trace") / "run.jsonl"
    traced_run(path, guest_clock=ticking_clock(1000))
    return summarize(read_trace(path))


def rows(table: tuple[Row, ...]) -> dict[str, Row]:
    return {row.key: row for row in table}


# -- a real run ---------------------------------------------------------------------------


def test_exits_are_counted_by_what_the_guest_asked_for(summary: TraceSummary) -> None:
    exits = rows(summary.exits)
    assert list(exits) == ["SVM_EXIT_IOIO", "GHCB_MSR_TERM_REQ"]  # busiest first
    ioio = exits["SVM_EXIT_IOIO"]
    assert (ioio.count, ioio.timed) == (2, 2)
    assert ioio.wall_ns > 0
    # vmexit -> vmgexit_enter -> device_access (the POST port) -> exit_handled ->
    # vmgexit_exit: four ticks per exit.
    assert ioio.guest_ns == 2 * 4000
    # The termination request has no msr_protocol_exit: counted, not timed.
    assert exits["GHCB_MSR_TERM_REQ"] == Row("GHCB_MSR_TERM_REQ", 1, 0, 0, None)


def test_handler_calls_are_counted_by_plugin(summary: TraceSummary) -> None:
    plugins = rows(summary.plugins)
    assert set(plugins) == {"ioio", "msr_protocol"}
    # vmgexit_enter -> device_access -> exit_handled: two ticks per call.
    assert (plugins["ioio"].count, plugins["ioio"].timed, plugins["ioio"].guest_ns) == (2, 2, 4000)
    msr = plugins["msr_protocol"]
    assert (msr.count, msr.timed, msr.guest_ns) == (1, 1, 1000)  # enter -> handled


def test_exits_by_vcpu_and_vcs_by_code(summary: TraceSummary) -> None:
    assert [(r.key, r.count, r.timed) for r in summary.vcpus] == [("vCPU 0", 3, 2)]
    assert [(r.key, r.count) for r in summary.vcs] == [("SVM_EXIT_IOIO", 2)]


def test_every_event_is_counted_by_name(summary: TraceSummary) -> None:
    counts = {row.key: row.count for row in summary.by_event}
    assert counts["vmexit"] == 3
    assert counts["vmgexit_enter"] == counts["vmgexit_exit"] == 2
    assert counts["exit_handled"] == 3
    assert counts["device_access"] == 2  # the OUT and the IN reach the POST port
    assert counts["launch_command"] >= 5
    assert summary.events == sum(counts.values())
    assert summary.guest_clock


def test_the_slowest_handler_calls_come_first(summary: TraceSummary) -> None:
    calls = summary.slowest
    assert len(calls) == 3
    assert [c.wall_ns for c in calls] == sorted((c.wall_ns for c in calls), reverse=True)
    expected = {("ioio", "SVM_EXIT_IOIO"), ("msr_protocol", "GHCB_MSR_TERM_REQ")}
    assert {(c.plugin, c.code) for c in calls} == expected


def test_render_prints_aligned_tables(summary: TraceSummary) -> None:
    text = summary.render()
    assert text.startswith(f"{summary.events} events, 3 exits, ")
    block = text.split("\n\n")[1].splitlines()
    assert block[0] == "Exits by code (exit time)"
    head, ioio, term = block[1:]
    assert head.split() == ["exit", "code", "count", "%", "timed", "total", "mean", "guest",
                            "total", "guest", "mean"]  # fmt: skip
    assert len(head) == len(ioio) == len(term)  # numbers right-aligned to the same edge
    assert ioio.split()[:4] == ["SVM_EXIT_IOIO", "2", "66.67", "2"]
    assert ioio.endswith("4.00 us") and term.endswith("-")
    assert "Slowest handler calls (top 3)" in text


def test_to_json_holds_the_same_numbers(summary: TraceSummary) -> None:
    data = json.loads(summary.to_json())
    assert data["exits"][0] == {"key": "SVM_EXIT_IOIO", "count": 2, "timed": 2,
                                "wall_ns": summary.exits[0].wall_ns, "guest_ns": 8000}  # fmt: skip
    assert data["slowest"][0]["plugin"] in {"ioio", "msr_protocol"}


# -- how events are paired (hand-made traces) ---------------------------------------------


def make(*events: tuple[str, int, dict[str, Any]]) -> list[dict[str, Any]]:
    """Events as a trace file holds them: (name, wall_ns, fields)."""
    return [{"seq": seq, "event": name, "wall_ns": wall, **fields}
            for seq, (name, wall, fields) in enumerate(events)]  # fmt: skip


def vmexit(wall: int, code: int, name: str, vcpu: int = 0) -> tuple[str, int, dict[str, Any]]:
    return ("vmexit", wall, {"vcpu_id": vcpu, "exit_code": code, "exit_name": name})


def gexit(event: str, wall: int, vcpu: int = 0) -> tuple[str, int, dict[str, Any]]:
    return (event, wall, {"vcpu_id": vcpu, "exit_reason": 0x7B, "exit_name": "SVM_EXIT_IOIO"})


def handled(wall: int, plugin: str, kind: str = "vmgexit", vcpu: int = 0,
            name: str = "SVM_EXIT_IOIO") -> tuple[str, int, dict[str, Any]]:  # fmt: skip
    return ("exit_handled", wall, {"vcpu_id": vcpu, "kind": kind, "plugin": plugin,
                                   "exit_name": name})  # fmt: skip


def test_an_automatic_exit_ends_at_its_handler() -> None:
    trap = "SVM_EXIT_CR0_WRITE_TRAP"
    summary = summarize(make(vmexit(100, 0x90, trap), handled(350, "crtraps", "vmexit", name=trap)))
    assert summary.exits == (Row(trap, 1, 1, 250),)
    assert summary.plugins == (Row("crtraps", 1, 1, 250),)


def test_an_exit_without_an_end_is_counted_not_timed() -> None:
    summary = summarize(make(vmexit(100, 0x78, "SVM_EXIT_HLT"), vmexit(900, 0x78, "SVM_EXIT_HLT")))
    assert summary.exits == (Row("SVM_EXIT_HLT", 2, 0, 0),)


def test_a_trace_filtered_without_vmexits_starts_exits_at_vmgexit_enter() -> None:
    summary = summarize(make(gexit("vmgexit_enter", 100), handled(130, "ioio"),
                             gexit("vmgexit_exit", 400)))  # fmt: skip
    assert summary.exits == (Row("SVM_EXIT_IOIO", 1, 1, 300),)
    assert summary.plugins == (Row("ioio", 1, 1, 30),)


def test_exits_of_two_vcpus_pair_separately() -> None:
    summary = summarize(make(
        vmexit(0, 0x403, "SVM_EXIT_VMGEXIT", vcpu=0), vmexit(10, 0x403, "SVM_EXIT_VMGEXIT", vcpu=1),
        gexit("vmgexit_enter", 20, vcpu=1), gexit("vmgexit_enter", 30, vcpu=0),
        handled(40, "ioio", vcpu=0), handled(70, "ioio", vcpu=1),
        gexit("vmgexit_exit", 100, vcpu=1), gexit("vmgexit_exit", 1000, vcpu=0),
    ))  # fmt: skip
    assert summary.exits == (Row("SVM_EXIT_IOIO", 2, 2, 1000 + 90),)
    assert summary.vcpus == (Row("vCPU 0", 1, 1, 1000), Row("vCPU 1", 1, 1, 90))
    assert summary.plugins == (Row("ioio", 2, 2, 10 + 50),)


def test_a_handler_call_outside_any_exit_is_counted_untimed() -> None:
    summary = summarize(make(handled(5, "ioio")))
    assert summary.plugins == (Row("ioio", 1, 0, 0),)
    assert summary.exits == () and summary.slowest == ()


def test_only_the_top_slowest_calls_are_kept() -> None:
    events = []
    for n, took in enumerate((30, 10, 50, 20, 40)):
        start = 1000 * n
        events += [vmexit(start, 0x403, "SVM_EXIT_VMGEXIT"), gexit("vmgexit_enter", start),
                   handled(start + took, "ioio"), gexit("vmgexit_exit", start + took)]  # fmt: skip
    summary = summarize(make(*events), top=2)
    assert [(c.wall_ns, c.seq) for c in summary.slowest] == [(50, 10), (40, 18)]


def test_events_nobody_described_are_counted_by_name() -> None:
    summary = summarize(make(
        ("cr_trap_value", 5, {"vcpu_id": 0}), ("cr_trap_value", 9, {"vcpu_id": 1}),
        ("phase", 12, {"name": "x"}),
    ))  # fmt: skip
    assert summary.by_event == (Row("cr_trap_value", 2), Row("phase", 1))
    assert summary.exits == ()
    assert (summary.first_ns, summary.last_ns, summary.span_ns) == (5, 12, 7)


def test_an_empty_trace_still_renders() -> None:
    summary = summarize([])
    assert summary.events == 0 and summary.span_ns is None
    assert summary.render() == "0 events, 0 exits, - of wall time"
