"""Deterministic replay: the same run gives the same trace, ``sevsim replay`` re-runs a
trace's run and reports the first event that differs (docs/replay.md)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

import sevsim.plugins.msr_protocol as msr_protocol
from sevsim.cli import main
from sevsim.trace_jsonl import JsonlSink, read_header, read_trace


def _run(tmp_path: Path, name: str, *options: str, status: int = 0) -> Path:
    trace = tmp_path / name
    assert main(["run", "--guest", "demo", "-q", "--trace-file", str(trace), *options]) == status
    return trace


def _without_host_times(path: Path) -> bytes:
    """The file as bytes, with the two host-clock values zeroed, as replay ignores them."""
    lines = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if "schema" in record:
            record["started"] = None
        else:
            record["wall_ns"] = 0
        lines.append(json.dumps(record, separators=(",", ":")))
    return "\n".join(lines).encode()


def _replay(trace: Path, capsys: pytest.CaptureFixture[str], *options: str) -> tuple[int, str]:
    capsys.readouterr()  # what the recorded run printed
    status = main(["replay", str(trace), *options])
    captured = capsys.readouterr()
    return status, captured.out + captured.err


def test_two_runs_of_the_demo_write_the_same_trace_but_for_host_times(tmp_path):
    first, second = _run(tmp_path, "1.jsonl"), _run(tmp_path, "2.jsonl")
    assert _without_host_times(first) == _without_host_times(second)
    assert len(first.read_text().splitlines()) > 50


def test_the_header_records_what_ran(tmp_path, monkeypatch):
    monkeypatch.setenv("SEVSIM_PLUGINS", "msr_protocol,ioio,mmio,svm_intercepts,ghcb_protocol")
    trace = _run(tmp_path, "run.jsonl", "--era", "v5.11", "-p", "no:crtraps",
                 "--trace-filter", "event=vmexit,msr_protocol_exit", status=1)  # fmt: skip
    run = read_header(trace)["run"]
    assert run["version"] == 1
    assert (run["guest"], run["era"], run["plugins"], run["clock"]) == (
        "demo", "v5.11", ["no:crtraps"], "none")
    assert run["env"] == {"SEVSIM_PLUGINS": "msr_protocol,ioio,mmio,svm_intercepts,ghcb_protocol"}
    assert run["trace_filter"] == "event=msr_protocol_exit,vmexit"
    [(path, digest)] = run["inputs"].items()
    assert path.endswith("demo.toml") and len(digest) == 64


def test_replaying_an_unchanged_run_finds_no_difference(tmp_path, capsys):
    trace = _run(tmp_path, "run.jsonl")
    events = sum(1 for _ in read_trace(trace))
    assert _replay(trace, capsys) == (0, f"identical: {events} events\n")


def test_a_filtered_run_of_another_era_replays_the_same(tmp_path, capsys):
    # v5.11 fails KVM_RUN on the termination request (-EINVAL): a failed run replays too
    trace = _run(tmp_path, "run.jsonl", "--era", "v5.11", "--trace-filter", "event=vmexit",
                 status=1)
    status, out = _replay(trace, capsys, "--json")
    assert status == 0
    assert json.loads(out) == {"identical": True, "events": 11, "changed_inputs": []}


def test_a_changed_plugin_reply_is_the_first_divergence(tmp_path, capsys, monkeypatch):
    trace = _run(tmp_path, "run.jsonl")
    recorded = list(read_trace(trace))
    index = next(i for i, e in enumerate(recorded)
                 if e["event"] == "msr_protocol_exit" and e["exit_name"] == "GHCB_MSR_CPUID_RESP")
    original = msr_protocol.cpuid

    def flip_a_bit(ctx: Any) -> None:  # the vendor string's first letter, 'A' -> 'B'
        original(ctx)
        ctx.msr ^= 3 << 32

    monkeypatch.setattr(msr_protocol, "cpuid", flip_a_bit)
    status, out = _replay(trace, capsys, "--json")
    report = json.loads(out)
    assert status == 1
    assert (report["identical"], report["index"], report["events"]) == (False, index, index)
    expected, got = report["expected"], report["got"]
    assert got["ghcb_gpa"] == expected["ghcb_gpa"] ^ 3 << 32
    assert {k: v for k, v in got.items() if k not in ("ghcb_gpa", "decoded")} == {
        k: v for k, v in expected.items() if k not in ("ghcb_gpa", "decoded")}


def test_the_text_report_names_the_event_and_both_versions(tmp_path, capsys):
    trace = _run(tmp_path, "run.jsonl")
    lines = trace.read_text().splitlines()
    edited = json.loads(lines[5])
    edited["status"] = "INVALID_GUEST_STATE"  # as if the recorded launch had failed here
    lines[5] = json.dumps(edited, separators=(",", ":"))
    trace.write_text("\n".join(lines) + "\n")
    status, out = _replay(trace, capsys)
    assert status == 1
    assert out.splitlines()[0] == "diverged at event 4 (after 4 identical events)"
    assert '"status":"INVALID_GUEST_STATE"' in out.splitlines()[1]
    assert '"status":"SUCCESS"' in out.splitlines()[2]


def test_a_trace_cut_short_diverges_where_it_ends(tmp_path, capsys):
    trace = _run(tmp_path, "run.jsonl")
    lines = trace.read_text().splitlines()
    trace.write_text("\n".join(lines[:-3]) + "\n")
    status, out = _replay(trace, capsys)
    assert status == 1
    assert "expected: (the trace ends here)" in out


def test_a_changed_manifest_is_named(tmp_path, capsys):
    manifest = tmp_path / "hello.toml"
    manifest.write_text('[guest]\nboot = "long"\nvc_handler = "native"\n\n[[images]]\n'
                        "address = 0x20000\nsource = 'mov rax, 0x100; mov rdx, 0; "
                        "mov ecx, 0xC0010130; wrmsr; rep vmmcall'\n")  # fmt: skip
    trace = tmp_path / "run.jsonl"
    assert main(["run", str(manifest), "-q", "--trace-file", str(trace)]) == 0
    assert _replay(trace, capsys)[0] == 0
    manifest.write_text(manifest.read_text().replace("0x100;", "0x1100;"))
    status, out = _replay(trace, capsys)
    assert status == 1
    assert f"{manifest} is not the file the run read (changed since, or gone)" in out


def _header_only(tmp_path: Path, run: dict[str, Any] | None) -> Path:
    out = io.StringIO()
    JsonlSink(out, run=run)
    trace = tmp_path / "t.jsonl"
    trace.write_text(out.getvalue())
    return trace


@pytest.mark.parametrize(("run", "message"), [
    (None, "the header has no run record"),
    ({"version": 2}, "run record version 2 is newer than this sevsim replays (1)"),
    ({"version": "1"}, "run record version '1': expected an integer >= 1"),
    ({"version": 1, "colour": "red"}, "is not one sevsim wrote"),
    ({"version": 1, "clock": "sundial"}, "is not one sevsim wrote"),
    ({"version": 1, "firmware": "/x.fd", "clock": "host"},
     "not replayable: the guest's time came from the host's clock"),
    ({"version": 1, "firmware": "/x.fd", "clock": "icount"},
     "not replayable: the guest's UART read the terminal; record with --uart-input TEXT"),
    ({"version": 1, "guest": "demo", "uart_input": "-"}, "not replayable: the guest read its "
     "UART from stdin"),
    ({"version": 1, "firmware": "/x.fd", "vars": "/v.fd", "clock": "icount"},
     "not replayable: the run wrote its UEFI variable store (/v.fd)"),
])  # fmt: skip
def test_a_trace_that_cannot_be_replayed_is_refused_on_one_line(tmp_path, capsys, run, message):
    status, out = _replay(_header_only(tmp_path, run), capsys)
    assert status == 2
    assert message in out and out.count("\n") == 1


def test_a_trace_that_is_not_there_is_refused(tmp_path, capsys):
    status, out = _replay(tmp_path / "none.jsonl", capsys)
    assert (status, out.count("\n")) == (2, 1)
    assert "cannot open it" in out
