"""``render_html``: one self-contained page with a bucketed timeline and the summary's tables."""

from __future__ import annotations

import shutil
import struct
import subprocess
import zlib
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from trace_runs import traced_run

from sevsim.trace_jsonl import read_trace
from sevsim.trace_report import BUCKETS, render_html


class Page(HTMLParser):
    """What a test checks of the page: tags, each table's rows, texts inside the SVG."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tags: Counter[str] = Counter()
        self.attrs: list[tuple[str, dict[str, str | None]]] = []
        self.tables: dict[str, list[list[str]]] = {}
        self.svg_texts: list[str] = []
        self.title = ""
        self._table: str | None = None
        self._cell: list[str] | None = None
        self._in: list[str] = []
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[tag] += 1
        self.attrs.append((tag, dict(attrs)))
        self._in.append(tag)
        if tag == "table":
            self._table = dict(attrs)["class"]
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        self._in.pop()
        if tag in ("td", "th") and self._table is not None and self._cell is not None:
            self.tables[self._table][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        elif self._in and self._in[-1] == "text" and "svg" in self._in:
            self.svg_texts.append(data)
        elif self._in and self._in[-1] == "title" and "svg" not in self._in:
            self.title += data

    def body(self, table: str) -> list[list[str]]:
        """The table's rows without its header."""
        return self.tables[table][1:]


@pytest.fixture(scope="module")
def html(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("trace") / "run.jsonl"
    traced_run(path)
    return render_html(read_trace(path), "IOIO guest <run 1>")


def test_the_page_is_self_contained(html: str) -> None:
    assert "http://" not in html and "https://" not in html
    page = Page(html)
    assert not {"script", "link", "img", "iframe", "object"} & set(page.tags)
    assert html.startswith("<!DOCTYPE html>")


def test_one_svg_timeline_with_a_lane_per_vcpu(html: str) -> None:
    page = Page(html)
    assert page.tags["svg"] == 1
    (svg,) = [attrs for tag, attrs in page.attrs if tag == "svg"]
    assert svg["class"] == "timeline"
    assert "vCPU 0" in page.svg_texts
    fills = {attrs["fill"] for tag, attrs in page.attrs if tag == "rect"}
    assert len(fills) == 2  # ioio and msr_protocol, one colour each


def test_launch_commands_are_markers_on_the_timeline(html: str) -> None:
    page = Page(html)
    assert page.tags["g"] >= 1
    assert any(text.startswith("LAUNCH_START") for text in page.svg_texts)


def test_the_title_is_escaped(html: str) -> None:
    assert "IOIO guest &lt;run 1&gt;" in html
    assert Page(html).title == "IOIO guest <run 1>"


def test_a_table_of_the_top_exit_codes(html: str) -> None:
    page = Page(html)
    assert page.tables["exits"][0][:3] == ["exit code", "count", "%"]
    codes = page.body("exits")
    assert [row[:3] for row in codes] == [["SVM_EXIT_IOIO", "2", "66.67"],
                                          ["GHCB_MSR_TERM_REQ", "1", "33.33"]]  # fmt: skip


def test_the_slowest_handlers_and_the_legend(html: str) -> None:
    page = Page(html)
    slowest = page.body("slowest")
    assert len(slowest) == 3
    assert {row[0] for row in slowest} == {"ioio", "msr_protocol"}
    assert {row[0] for row in page.body("plugins")} == {"ioio", "msr_protocol"}
    legend = html[html.index('<div class="legend">') : html.index("<svg")]
    assert "ioio" in legend and "msr_protocol" in legend


def synthetic(exits: int, vcpus: int = 4) -> list[dict[str, Any]]:
    """``exits`` GHCB exits spread over ``vcpus`` and three plugins, four events each,
    with a phase marker in the middle."""
    plugins = ("ioio", "mmio", "msr_protocol")
    events: list[dict[str, Any]] = []
    for n in range(exits):
        vcpu, wall = n % vcpus, n * 1000
        common = {"vcpu_id": vcpu, "exit_reason": 0x7B + n % 3, "exit_name": f"CODE{n % 3}"}
        events += [
            {"event": "vmexit", "wall_ns": wall, "vcpu_id": vcpu, "exit_code": 0x403,
             "exit_name": "SVM_EXIT_VMGEXIT"},
            {"event": "vmgexit_enter", "wall_ns": wall + 10, **common},
            {"event": "exit_handled", "wall_ns": wall + 20 + n % 7, "vcpu_id": vcpu,
             "kind": "vmgexit", "plugin": plugins[n % 3], "exit_name": common["exit_name"]},
            {"event": "vmgexit_exit", "wall_ns": wall + 40, **common},
        ]  # fmt: skip
        if n == exits // 2:
            events.append({"event": "phase", "wall_ns": wall + 50, "name": "kernel"})
    for seq, event in enumerate(events):
        event["seq"] = seq
    return events


def test_a_large_trace_is_bucketed_not_drawn_event_by_event() -> None:
    events = synthetic(25_000)  # 100,001 events
    html = render_html(iter(events), "big")
    page = Page(html)
    assert page.tags["rect"] <= BUCKETS * 4 * 3  # buckets x vCPUs x plugins
    assert len(html) < 1_500_000
    assert [t for t in page.svg_texts if t.startswith("vCPU")] == [f"vCPU {n}" for n in range(4)]
    assert "kernel" in page.svg_texts
    assert {row[0]: row[1] for row in page.body("exits")} == {
        "CODE0": "8334", "CODE1": "8333", "CODE2": "8333"}  # fmt: skip


def test_an_empty_trace_gives_an_empty_timeline() -> None:
    page = Page(render_html([], "nothing"))
    assert page.tags["svg"] == 1
    assert "no exits in this trace" in page.svg_texts


# -- how it looks in a browser ------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def png_has_two_colours(png: bytes) -> bool:
    """Whether an 8-bit RGB(A) PNG holds more than one colour: a minimal decoder
    (chunks, zlib, scanline filters) that stops at the first second colour."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, bytearray(), b""
    while pos < len(png):
        length, kind = struct.unpack(">I4s", png[pos : pos + 8])
        data = png[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = data
        elif kind == b"IDAT":
            idat += data
    width, height, depth, colour_type = struct.unpack(">IIBB", header[:10])
    assert depth == 8 and colour_type in (2, 6), f"unsupported PNG: depth {depth} {colour_type}"
    bpp = 3 if colour_type == 2 else 4
    raw, stride = zlib.decompress(bytes(idat)), width * bpp
    previous, first = bytearray(stride), None
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = previous[i], previous[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + a) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + b) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        first = first if first is not None else bytes(line[:bpp])
        if line != first * width:
            return True
        previous = line
    return False


def test_the_png_check_tells_blank_from_drawn() -> None:
    def png(rows: list[bytes], width: int) -> bytes:
        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", 0)

        raw = b"".join(b"\x02" + row for row in rows)  # filter Up on every row
        header = struct.pack(">IIBBBBB", width, len(rows), 8, 2, 0, 0, 0)
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))  # fmt: skip

    white = b"\xff" * 6
    assert not png_has_two_colours(png([white, b"\x00" * 6], 2))  # Up: white again
    assert png_has_two_colours(png([white, b"\x00\x00\x00\x01\x01\x01"], 2))


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium installed")
def test_a_headless_browser_draws_the_page(html: str, tmp_path: Path) -> None:
    page, shot = tmp_path / "report.html", tmp_path / "shot.png"
    page.write_text(html, encoding="utf-8")
    assert CHROMIUM is not None
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                    f"--screenshot={shot}", "--window-size=1200,800", page.as_uri()],
                   check=True, capture_output=True, timeout=120)  # fmt: skip
    assert png_has_two_colours(shot.read_bytes())
