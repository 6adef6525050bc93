"""``sevsim run``'s trace options and ``sevsim trace summarize|report``, end to end
through ``sevsim.cli.main`` with the bundled demo guest."""

from __future__ import annotations

import json
import re
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from sevsim.cli import main
from sevsim.trace_jsonl import read_trace
from sevsim.trace_summary import summarize


@pytest.fixture(autouse=True)
def clean(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No sevsim.toml and no SEVSIM_* variables; every plugin the demo needs loads."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SEVSIM_PLUGINS", raising=False)
    monkeypatch.delenv("SEVSIM_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delenv("NO_COLOR", raising=False)


def events(path: Path) -> list[dict[str, Any]]:
    return list(read_trace(path))


def names(trace: list[dict[str, Any]]) -> Counter[str]:
    return Counter(event["event"] for event in trace)


@pytest.fixture(scope="module")
def demo_trace(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The demo guest with both traces: the JSONL file and the text on stdout."""
    import contextlib
    import io

    path = tmp_path_factory.mktemp("trace") / "demo.jsonl"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(["run", "--guest", "demo", "--trace-format", "text,jsonl",
                       "--trace-file", str(path)])  # fmt: skip
    assert status == 0
    return path, out.getvalue()


# --- run --trace-format / --trace-file ------------------------------------------------------


def test_the_jsonl_trace_holds_every_kind_of_event_of_the_run(demo_trace) -> None:
    path, _ = demo_trace
    counts = names(events(path))
    # The demo: 6 MSR-protocol requests, then IOIO and 3 MMIO exits through the GHCB,
    # and a TERM_REQ: 11 VMGEXITs, each seen by the simulator too.
    assert counts["vmexit"] == 11 and counts["sim_exit"] == 11
    assert counts["msr_protocol_enter"] == 7  # SEV_INFO, 5 CPUID, TERM_REQ
    assert counts["msr_protocol_exit"] == 6  # the TERM_REQ never returns
    assert counts["vmgexit_enter"] == counts["vmgexit_exit"] == 4  # IOIO, 3 MMIO
    assert counts["sim_vc"] == 4
    assert counts["exit_handled"] == 11
    assert counts["vm_created"] == 1 and counts["launch_command"] >= 8
    phases = [e["name"] for e in events(path) if e["event"] == "phase"]
    assert phases == ["launch", "end"]


def test_the_text_trace_shows_the_same_run(demo_trace) -> None:
    path, text = demo_trace
    exits = re.findall(r"^#(\d+) +vcpu0 VMGEXIT", text, re.MULTILINE)
    assert len(exits) == names(events(path))["vmexit"] == 11
    assert "[uart] Hello from an SEV-ES guest" in text
    assert "VM ended: system event SEV_TERM [0x100]" in text


def test_a_trace_file_alone_means_jsonl_and_the_text_trace_stays(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "--trace-file", "t.jsonl"]) == 0
    assert "#11   vcpu0 VMGEXIT" in capsys.readouterr().out
    assert names(events(tmp_path / "t.jsonl"))["vmexit"] == 11


def test_jsonl_only_prints_no_text_trace(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "--trace-format", "jsonl", "--trace-file", "t.jsonl"]) == 0
    out = capsys.readouterr().out
    assert "vcpu0 VMGEXIT" not in out
    assert out.startswith("VM ended: system event SEV_TERM")  # only the summary
    assert names(events(tmp_path / "t.jsonl"))["vmexit"] == 11


def test_the_filter_applies_to_both_traces(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "--trace-format", "text,jsonl", "--trace-file", "t.jsonl",
                 "--trace-filter", "code=SVM_EXIT_IOIO"]) == 0  # fmt: skip
    kept = events(tmp_path / "t.jsonl")
    assert set(names(kept)) == {"sim_vc", "vmgexit_enter", "exit_handled", "vmgexit_exit"}
    assert all(e.get("exit_name") == "SVM_EXIT_IOIO" for e in kept)
    out = capsys.readouterr().out
    assert "GHCB SVM_EXIT_IOIO  rep outs port 0x3f8 size 1 x 27" in out
    assert "MSR protocol" not in out and "MMIO_READ  4 bytes" not in out
    # The run's verdict still sees every event: the summary counts them all.
    assert "exits: VMGEXIT 11" in out


def test_the_hypervisor_view_leaves_out_what_only_the_simulator_sees(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "--trace-file", "t.jsonl", "--hypervisor-view"]) == 0
    counts = names(events(tmp_path / "t.jsonl"))
    assert counts["vmexit"] == 11
    assert not [name for name in counts if name.startswith("sim_")]
    out = capsys.readouterr().out
    assert "(simulator's view)" not in out and "@0x" not in out
    assert "#1    vcpu0 VMGEXIT\n" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--trace-format", "jsonl"],
         "--trace-format jsonl needs --trace-file FILE: where to write it"),
        (["--trace-format", "text", "--trace-file", "t.jsonl"],
         "--trace-file t.jsonl holds the jsonl trace, but --trace-format is text: add jsonl"),
        (["--trace-file", "no/such/dir/t.jsonl"],
         "--trace-file no/such/dir/t.jsonl: cannot write it: No such file or directory"),
    ],
)  # fmt: skip
def test_inconsistent_trace_options_are_one_line_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", *argv]) == 2
    assert capsys.readouterr().err == f"sevsim: error: {message}\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--trace-format", "xml"], "argument --trace-format: 'xml': expected text or jsonl"),
        (["--trace-filter", "event=vmexti"], "trace filter 'event=vmexti': event 'vmexti' is "
                                             "not valid; expected a known event"),
    ],
)  # fmt: skip
def test_bad_trace_option_values_are_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["run", *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


# --- sevsim trace summarize -------------------------------------------------------------------


def test_summarize_prints_the_exit_counts_of_the_file(
    demo_trace, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = demo_trace
    assert main(["trace", "summarize", str(path)]) == 0
    out = capsys.readouterr().out
    expected = summarize(read_trace(path))
    assert out.startswith(f"{expected.events} events, 11 exits, ")
    section = next(part for part in out.split("\n\n") if part.startswith("Exits by code"))
    printed = dict(re.findall(r"^(\w+) +(\d+) ", section, re.MULTILINE))
    assert {key: int(n) for key, n in printed.items()} == {
        row.key: row.count for row in expected.exits
    }
    assert printed["GHCB_MSR_CPUID_REQ"] == "5" and printed["SVM_VMGEXIT_MMIO_READ"] == "2"


def test_summarize_as_json(demo_trace, capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = demo_trace
    assert main(["trace", "summarize", str(path), "--json", "--top", "3"]) == 0
    document = json.loads(capsys.readouterr().out)
    exits = {row["key"]: row["count"] for row in document["exits"]}
    assert exits["GHCB_MSR_CPUID_REQ"] == 5 and exits["SVM_EXIT_IOIO"] == 1
    assert len(document["slowest"]) == 3


def test_summarize_names_a_file_that_is_not_a_trace(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "notes.txt").write_text("hello\n")
    assert main(["trace", "summarize", "notes.txt"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sevsim: error: notes.txt:1: not a JSON line") and err.count("\n") == 1
    assert main(["trace", "summarize", "missing.jsonl"]) == 2
    assert "trace file missing.jsonl: cannot open it" in capsys.readouterr().err


# --- sevsim trace report ---------------------------------------------------------------------


class Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: Counter[str] = Counter()
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[tag] += 1

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_report_writes_a_page_that_parses(
    demo_trace, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = demo_trace
    assert main(["trace", "report", str(path), "-o", "report.html", "--title", "demo <1>"]) == 0
    assert capsys.readouterr().err.startswith("wrote report.html (")
    page = (tmp_path / "report.html").read_text()
    tags = Tags()
    tags.feed(page)
    assert tags.tags["svg"] == 1 and tags.tags["table"] >= 4
    text = " ".join(tags.text)
    assert "demo <1>" in text  # escaped in the source, the title once parsed
    assert "GHCB_MSR_CPUID_REQ" in text and "msr_protocol" in text
    assert "http" not in page.replace("http://www.w3.org/2000/svg", "")  # nothing fetched


def test_report_into_a_missing_directory_is_one_line(
    demo_trace, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = demo_trace
    assert main(["trace", "report", str(path), "-o", "no/dir/r.html"]) == 2
    assert capsys.readouterr().err == (
        "sevsim: error: -o no/dir/r.html: cannot write the report: No such file or directory\n"
    )
