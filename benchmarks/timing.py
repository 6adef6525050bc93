"""Timing both sides of a ratio fairly on a machine others are using.

Repetitions of sevsim and of its floor are interleaved, so a burst of load from
another process lands on both, and each side's median is kept: one slow outlier
moves neither number, and the ratio of the medians is what the table reports.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable


def interleaved_medians(
    repeat: int, ours: Callable[[], float], floor: Callable[[], float]
) -> tuple[float, float]:
    """Median seconds of ``ours`` and of ``floor``, run alternately ``repeat`` times
    each; every callable sets up outside its own timer and returns the seconds timed."""
    ours_s: list[float] = []
    floor_s: list[float] = []
    for _ in range(repeat):
        ours_s.append(ours())
        floor_s.append(floor())
    return statistics.median(ours_s), statistics.median(floor_s)
