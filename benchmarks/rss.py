"""The peak resident set size of this process's own memory.

``getrusage``'s ``ru_maxrss`` will not do for a child process: Linux carries the
parent's peak across fork and exec into it, so a child started by a parent that
once held more would report the parent's number. ``VmHWM`` is the high-water mark
of this address space alone.
"""

from __future__ import annotations

from pathlib import Path


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("/proc/self/status has no VmHWM line: not Linux?")
