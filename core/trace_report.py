"""A trace as one HTML page: a timeline of exits per vCPU, and the summary's tables.

The page is self-contained (inline CSS and one inline SVG, no script, nothing fetched),
so it can be mailed, attached to a bug or opened offline. Its size does not grow with
the trace: the timeline counts exits in a fixed number of time buckets per vCPU and
draws one bar per bucket and plugin, so a boot with a million exits draws no more
than one with a thousand. Phase markers come from ``phase`` events (their ``name``)
and from ``launch_command`` events (their ``command``).
"""

from __future__ import annotations

from array import array
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from html import escape
from typing import Any

from sevsim.trace_schema import PHASE
from sevsim.trace_summary import (
    ExitSpan,
    SummaryBuilder,
    Table,
    TraceSummary,
    format_ns,
    vcpu_order,
)

#: Timeline geometry (SVG user units): lanes of vCPUs under a band of marker labels.
PLOT_WIDTH = 1000
BUCKETS = 250
LANE_HEIGHT = 44
LANE_GAP = 10
LEFT = 70
TOP = 60
AXIS = 28
#: Events that mark a phase of the run on the timeline, and the field naming it.
MARKERS = {PHASE: "name", "launch_command": "command"}
#: The legend's name for exits no plugin handled (kvm itself, or userspace).
UNHANDLED = "(no plugin)"

_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; background: #fff; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 17px; margin: 28px 0 8px; }
.meta { color: #555; margin: 0; }
table { border-collapse: collapse; }
th, td { padding: 3px 10px; border-bottom: 1px solid #ddd; text-align: left; }
th { background: #f3f3f3; }
.num { text-align: right; font-variant-numeric: tabular-nums; }
.legend span { display: inline-block; margin-right: 14px; }
.legend i { display: inline-block; width: 12px; height: 12px; margin-right: 4px;
            vertical-align: -1px; }
svg.timeline { display: block; border: 1px solid #ddd; margin-top: 6px; }
svg text { font: 11px system-ui, sans-serif; fill: #333; }
"""


def _colour(index: int) -> str:
    """The ``index``-th plugin's colour: hues a golden angle apart stay distinct for
    any number of plugins."""
    return f"hsl({index * 137.508 % 360:.0f},60%,48%)"


class _Timeline:
    """Exits and markers as compact arrays, bucketed only when drawn (the time range
    is known only at the end of the trace)."""

    def __init__(self) -> None:
        self._starts = array("q")
        self._lanes = array("l")
        self._plugins = array("l")
        self._lane_ids: dict[Any, int] = {}
        self._plugin_ids: dict[str, int] = {}
        self.markers: list[tuple[int, str]] = []

    def add_exit(self, span: ExitSpan) -> None:
        self._starts.append(span.start_ns)
        self._lanes.append(self._lane_ids.setdefault(span.vcpu, len(self._lane_ids)))
        plugin = span.plugin if span.plugin is not None else UNHANDLED
        self._plugins.append(self._plugin_ids.setdefault(plugin, len(self._plugin_ids)))

    def add_marker(self, event: Mapping[str, Any]) -> None:
        field = MARKERS.get(event["event"])
        if field is not None and field in event:
            self.markers.append((event["wall_ns"], str(event[field])))

    def colours(self) -> dict[str, str]:
        """Plugin -> colour, the busiest plugin first."""
        counts = Counter(self._plugins)
        names = {i: name for name, i in self._plugin_ids.items()}
        ranked = [names[i] for i, _ in counts.most_common()]
        return {name: _colour(n) for n, name in enumerate(ranked)}

    def svg(self, first: int | None, last: int | None) -> str:
        """The timeline over [first, last] (wall ns): a lane per vCPU, a stacked bar per
        time bucket (height: exits in the bucket, colour: plugin), markers across."""
        lanes = sorted(self._lane_ids, key=vcpu_order)
        width = LEFT + PLOT_WIDTH + 20
        height = TOP + max(len(lanes), 1) * (LANE_HEIGHT + LANE_GAP) + AXIS
        parts = [
            f'<svg class="timeline" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="exits per vCPU over time">'
        ]
        if first is None or last is None or not self._starts:
            parts.append(f'<text x="{LEFT}" y="{TOP + 20}">no exits in this trace</text>')
        else:
            span = max(last - first, 1)
            parts += self._bars(lanes, first, span)
            parts += self._axis(span, height)
            parts += self._marker_lines(first, span, height)
        parts.append("</svg>")
        return "".join(parts)

    def _bars(self, lanes: list[Any], first: int, span: int) -> list[str]:
        counts: defaultdict[tuple[int, int], Counter[str]] = defaultdict(Counter)
        names = {i: name for name, i in self._plugin_ids.items()}
        for start, lane, plugin_id in zip(self._starts, self._lanes, self._plugins, strict=True):
            counts[lane, _bucket(start - first, span)][names[plugin_id]] += 1
        tallest = max(sum(stack.values()) for stack in counts.values())
        colours = self.colours()
        step = PLOT_WIDTH / BUCKETS
        out = []
        for row, vcpu in enumerate(lanes):
            lane, who = self._lane_ids[vcpu], escape(f"vCPU {vcpu}")
            base = TOP + row * (LANE_HEIGHT + LANE_GAP) + LANE_HEIGHT
            out.append(f'<text x="{LEFT - 8}" y="{base - LANE_HEIGHT // 2 + 4}" '
                       f'text-anchor="end">{who}</text><line x1="{LEFT}" y1="{base}" '
                       f'x2="{LEFT + PLOT_WIDTH}" y2="{base}" stroke="#bbb"/>')  # fmt: skip
            for b in range(BUCKETS):
                stack = counts.get((lane, b))
                if not stack:
                    continue
                when = f"{format_ns(b * span / BUCKETS)} to {format_ns((b + 1) * span / BUCKETS)}"
                y = float(base)
                for plugin in (name for name in colours if name in stack):
                    h = max(LANE_HEIGHT * stack[plugin] / tallest, 1.0)
                    y -= h
                    tip = f"{who}, {when}: {stack[plugin]} exits, {escape(plugin)}"
                    out.append(f'<rect x="{LEFT + b * step:.1f}" y="{y:.1f}" width="{step:.1f}" '
                               f'height="{h:.1f}" fill="{colours[plugin]}"><title>{tip}</title>'
                               "</rect>")  # fmt: skip
        return out

    @staticmethod
    def _axis(span: int, height: int) -> list[str]:
        """Five time labels under the lanes, from 0 to the trace's length."""
        y = height - AXIS + 16
        anchors = ("start", "middle", "middle", "middle", "end")
        return [f'<text x="{LEFT + PLOT_WIDTH * i / 4:.1f}" y="{y}" text-anchor="{anchor}">'
                f"{format_ns(span * i / 4) if i else '0'}</text>"
                for i, anchor in enumerate(anchors)]  # fmt: skip

    def _marker_lines(self, first: int, span: int, height: int) -> list[str]:
        """One dashed line per bucket that has markers; labels staggered on three rows
        so that markers close together stay readable (all names are in the tooltip)."""
        grouped: defaultdict[int, list[str]] = defaultdict(list)
        for wall, label in self.markers:
            grouped[_bucket(wall - first, span)].append(label)
        out = []
        for n, (b, labels) in enumerate(sorted(grouped.items())):
            x = LEFT + (b + 0.5) * PLOT_WIDTH / BUCKETS
            y = 12 + 14 * (n % 3)
            shown = labels[0] + (f" +{len(labels) - 1}" if len(labels) > 1 else "")
            out.append(f'<g class="marker"><title>{escape(", ".join(labels))}</title>'
                       f'<line x1="{x:.1f}" y1="{y + 2}" x2="{x:.1f}" y2="{height - AXIS}" '
                       'stroke="#555" stroke-dasharray="3,3"/>'
                       f'<text x="{x + 3:.1f}" y="{y}">{escape(shown)}</text></g>')  # fmt: skip
        return out


def _bucket(offset_ns: int, span: int) -> int:
    """The time bucket of a moment ``offset_ns`` into a timeline ``span`` ns long."""
    return min(offset_ns * BUCKETS // span, BUCKETS - 1)


def _table(table: Table) -> str:
    """A summary table as HTML, numeric columns aligned right."""
    right = [table.numeric(i) for i in range(len(table.head))]

    def row(cells: tuple[str, ...], tag: str) -> str:
        return "<tr>" + "".join(f"<{tag}{' class=num' if r else ''}>{escape(c)}</{tag}>"
                                for c, r in zip(cells, right, strict=True)) + "</tr>"  # fmt: skip

    body = "".join(row(cells, "td") for cells in table.body)
    return (f'<h2>{escape(table.title)}</h2><table class="{table.name}"><thead>'
            f"{row(table.head, 'th')}</thead><tbody>{body}</tbody></table>")  # fmt: skip


def _page(title: str, summary: TraceSummary, timeline: _Timeline) -> str:
    legend = "".join(f'<span><i style="background:{c}"></i>{escape(name)}</span>'
                     for name, c in timeline.colours().items())  # fmt: skip
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        f'<p class="meta">{escape(summary.headline())}</p>',
        "<h2>Exits over time, per vCPU, by the plugin that handled them</h2>",
        f'<div class="legend">{legend}</div>',
        timeline.svg(summary.first_ns, summary.last_ns),
        *(_table(table) for table in summary.tables()),
        "</body></html>",
    ])  # fmt: skip


def render_html(events: Iterable[Mapping[str, Any]], title: str) -> str:
    """The report page of a trace's events (as :func:`~sevsim.trace_jsonl.read_trace`
    yields them), read in one pass."""
    timeline = _Timeline()
    builder = SummaryBuilder(on_exit=timeline.add_exit)
    for event in events:
        builder.add(event)
        timeline.add_marker(event)
    return _page(title, builder.finish(), timeline)
