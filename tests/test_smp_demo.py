"""The bundled multi-vCPU guest (``sevsim run --guest smp``): four vCPUs on the ``pc``
machine, APs woken with INIT-SIPI-SIPI and parked in AP_HLT_LOOP, one released again
through the AP jump table, a LAPIC timer interrupt and an NMI with NMI_COMPLETE."""

from __future__ import annotations

import json

import pytest

from sevsim.cli import main
from sevsim.errors import ConfigError
from sevsim.manifest import find_guest, load_manifest, parse_manifest

#: Each AP prints its APIC ID; AP 2 is woken twice; then the BSP's timer and NMI.
EXPECTED = """\
AP 1 up
AP 2 up
AP 3 up
AP 2 up again
BSP: LAPIC timer interrupt
BSP: NMI
done
"""


def _run(*options: str) -> int:
    return main(["run", "--guest", "smp", "--uart-input", "", "-q", *options])


def test_the_uart_shows_every_vcpu_in_order(capsys):
    assert _run() == 0
    assert capsys.readouterr().out == EXPECTED


def test_the_manifest_expects_the_same_lines():
    manifest = load_manifest(find_guest("smp"))
    assert manifest.expect is not None and manifest.expect.uart == EXPECTED
    assert (manifest.vcpus, manifest.ap_entry) == (4, 0x30000)


def test_icount_runs_write_byte_identical_traces(tmp_path, capsys):
    traces = []
    for name in ("first.jsonl", "second.jsonl"):
        path = tmp_path / name
        status = _run("--icount", "--trace-format", "jsonl", "--trace-file", str(path))
        assert status == 0
        assert capsys.readouterr().out == EXPECTED
        traces.append(path.read_bytes())
    assert traces[0] == traces[1]
    lines = traces[0].decode().splitlines()
    assert '"event":"vmgexit_enter"' in traces[0].decode()
    assert len(lines) > 500  # every exit of the four vCPUs, not just the header


def test_sevsim_guests_lists_it(capsys):
    assert main(["guests"]) == 0
    assert any(line.split()[0] == "smp" and "INIT-SIPI-SIPI" in line
               for line in capsys.readouterr().out.splitlines())  # fmt: skip


# --- what a manifest with APs must say --------------------------------------------------------

_CODE = "[[images]]\naddress = 0x20000\nsource = 'hlt'\n"


@pytest.mark.parametrize(("guest", "message"), [
    ("vcpus = 2\nap_entry = 0x30000\nmemory_mib = 32",
     "m.toml:3: guest.ap_entry = 0x30000: expected an address inside one of the [[images]]"),
    ("vcpus = 1\nap_entry = 0x20000",
     "m.toml:3: guest.ap_entry = 0x20000: expected no ap_entry for one vCPU (no APs)"),
    ("vcpus = 255\nap_entry = 0x20000",
     "m.toml:2: guest.vcpus = 255: expected a whole number 1..254"),
    ("vcpus = 2\nap_entry = 0x20000",
     "m.toml:1: guest.memory_mib = 16: expected at least 32 with APs"),
    ("vcpus = 2\nap_entry = 0x20000\nmemory_mib = 32\nvc_handler = 'modeled'",
     "m.toml:5: guest.vc_handler = 'modeled': expected \"native\" or \"none\" with APs"),
    ("boot = 'reset'\nap_entry = 0xfffffff0",
     "m.toml:3: guest.ap_entry = 0xfffffff0: expected no ap_entry for boot = \"reset\""),
])  # fmt: skip
def test_a_manifest_with_aps_is_checked(guest, message):
    with pytest.raises(ConfigError) as error:
        parse_manifest(f"[guest]\n{guest}\n{_CODE}", "m.toml")
    assert str(error.value).startswith(message), str(error.value)


def test_summarize_and_report_read_the_four_vcpus_trace(tmp_path, capsys):
    """``trace summarize`` and ``trace report`` on a recorded multi-vCPU trace: every
    vCPU appears with its own exits (issue 12's multi-vCPU trace)."""
    trace = tmp_path / "smp.jsonl"
    assert _run("--icount", "--trace-format", "jsonl", "--trace-file", str(trace)) == 0
    capsys.readouterr()
    assert main(["trace", "summarize", str(trace), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    rows = {row["key"]: row for row in summary["vcpus"]}
    assert set(rows) == {"vCPU 0", "vCPU 1", "vCPU 2", "vCPU 3"}
    assert all(row["count"] > 0 for row in rows.values())
    report = tmp_path / "smp.html"
    assert main(["trace", "report", str(trace), "-o", str(report)]) == 0
    page = report.read_text()
    assert page.startswith("<!DOCTYPE html>") and "vCPU 3" in page
