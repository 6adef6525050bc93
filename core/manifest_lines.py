"""Where a key sits in a TOML text: ``tomllib`` gives values but no line numbers.

A manifest error should point at the line to fix, so this scans the text once for
table headers (``[a.b]``, ``[[a]]``) and ``key = value`` lines and records each key
path's first line. It is a simple scanner, not a parser: it skips the inside of
multi-line strings, and a key inside an inline table or a multi-line array is found
at the line of the key that holds it. A path it did not see is answered with its
nearest recorded parent (a missing key with its table's header).
"""

from __future__ import annotations

import re

#: A key path as ``tomllib`` nests it: table and key names, and the index of an
#: array-of-tables entry (``("images", 0, "address")``).
KeyPath = tuple[str | int, ...]

_HEADER = re.compile(r"\s*(\[\[?)\s*([^\]]+?)\s*\]")
_KEY = re.compile(r"""\s*((?:[\w-]+|"[^"]*"|'[^']*')(?:\s*\.\s*(?:[\w-]+|"[^"]*"|'[^']*'))*)\s*=""")
_DELIMITERS = ('"""', "'''")


def _names(dotted: str) -> tuple[str, ...]:
    """``a."b.c".d`` -> ``("a", "b.c", "d")``."""
    parts = re.findall(r"""[\w-]+|"[^"]*"|'[^']*'""", dotted)
    return tuple(p[1:-1] if p[0] in "\"'" else p for p in parts)


class KeyLines:
    """The line (1-based) of every table header and key of one TOML text."""

    def __init__(self, text: str) -> None:
        self._lines: dict[KeyPath, int] = {}
        self._scan(text)

    def line(self, path: KeyPath) -> int:
        """The line of ``path``, else of its nearest recorded parent, else 1."""
        for end in range(len(path), 0, -1):
            found = self._lines.get(path[:end])
            if found is not None:
                return found
        return 1

    def _record(self, path: KeyPath, number: int) -> None:
        for end in range(1, len(path) + 1):
            self._lines.setdefault(path[:end], number)

    def _scan(self, text: str) -> None:
        table: KeyPath = ()
        entries: dict[tuple[str, ...], int] = {}  # array-of-tables name -> entries seen
        open_string: str | None = None
        for number, line in enumerate(text.splitlines(), start=1):
            if open_string is not None:
                if line.count(open_string) % 2:
                    open_string = None
                continue
            header = _HEADER.match(line)
            key = None if header else _KEY.match(line)
            if header:
                names = _names(header.group(2))
                if header.group(1) == "[[":
                    index = entries[names] = entries.get(names, -1) + 1
                    table = (*names, index)
                else:
                    table = names
                self._record(table, number)
            elif key:
                self._record((*table, *_names(key.group(1))), number)
                rest = line[key.end() :]
                open_string = next((d for d in _DELIMITERS if rest.count(d) % 2), None)
