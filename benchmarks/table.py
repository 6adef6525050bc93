"""The benchmark table: one row per measured line, printed as it is measured.

A row carries both numbers and their ratio, because only a ratio measured in the
same run means anything on a shared, noisy machine; the goal is printed beside it
so a reader sees at once what the number is held to.
"""

from __future__ import annotations

from attrs import frozen

PASS, MISS, SKIP = "pass", "MISS", "skip"


@frozen
class Row:
    """One line: what was measured, sevsim's number, the floor's, and the verdict.

    ``ratio`` is whichever quotient the goal is stated in (a rate: sevsim / floor;
    a cost: sevsim / floor as a factor), so the benchmark that knows the direction
    computes it. ``passed`` is None when the line could not be judged (skipped or
    no goal), and ``note`` says why or adds what the numbers alone do not.
    """

    what: str
    unit: str
    ours: float | None
    floor: float | None
    ratio: float | None
    goal: str
    passed: bool | None
    note: str = ""

    @property
    def result(self) -> str:
        if self.passed is None:
            return SKIP if self.ours is None else "-"
        return PASS if self.passed else MISS


def skipped(what: str, goal: str, why: str) -> Row:
    return Row(what, "", None, None, None, goal, None, why)


def number(value: float | None) -> str:
    """Three significant digits at most, thousands separated: readable at a glance."""
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


#: (title, width, alignment) of each column.
COLUMNS = (
    ("benchmark", 50, "<"), ("unit", 14, "<"), ("sevsim", 10, ">"), ("floor", 10, ">"),
    ("ratio", 7, ">"), ("goal", 24, "<"), ("result", 6, "<"),
)  # fmt: skip


def _line(cells: tuple[str, ...]) -> str:
    return " ".join(f"{cell:{align}{width}}" for cell, (_, width, align) in zip(
        cells, COLUMNS, strict=True)).rstrip()  # fmt: skip


def header() -> str:
    titles = tuple(title for title, _, _ in COLUMNS)
    return _line(titles) + "\n" + _line(tuple("-" * width for _, width, _ in COLUMNS))


def format_row(row: Row) -> str:
    cells = (row.what, row.unit, number(row.ours), number(row.floor), number(row.ratio),
             row.goal, row.result)  # fmt: skip
    text = _line(cells)
    return text + (f"\n    note: {row.note}" if row.note else "")
