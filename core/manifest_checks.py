"""Reading a TOML document's values with errors that point at the line to fix.

``tomllib`` gives values without positions; :class:`TomlChecker` pairs a document's
path with the lines of its keys (:class:`~sevsim.manifest_lines.KeyLines`), so
that each check of a value's type, range or name can fail with one
:class:`~sevsim.errors.ConfigError` naming the file, the line, the key, the value and
what was expected, and suggest the nearest name for a misspelt one.
"""

from __future__ import annotations

from collections.abc import Collection
from difflib import get_close_matches
from pathlib import Path
from typing import Any

from attrs import field, frozen

from sevsim.errors import ConfigError
from sevsim.manifest_lines import KeyLines, KeyPath


@frozen
class TomlChecker:
    """Checks the values of the TOML text at ``path`` whose key lines are ``lines``."""

    path: Path
    lines: KeyLines = field(eq=False, repr=False)

    def where(self, key: KeyPath) -> str:
        """``FILE:LINE`` of ``key`` (of its table when the key is missing)."""
        return f"{self.path}:{self.lines.line(key)}"

    def error(self, key: KeyPath, value: Any, expected: str) -> ConfigError:
        return ConfigError(
            f"{self.where(key)}: {dotted(key)} = {_shown(value)}: expected {expected}"
        )

    def keys(self, prefix: KeyPath, table: dict[str, Any], known: Collection[str]) -> None:
        """Refuse a key of ``table`` (at ``prefix``) that is not in ``known``."""
        for key, value in table.items():
            if key not in known:
                where = (*prefix, key)
                raise ConfigError(
                    f"{self.where(where)}: {dotted(where)} = {_shown(value)}: unknown key"
                    f"{suggest(key, known)}; {dotted(prefix) or 'the top level'} takes: "
                    f"{', '.join(known)}"
                )

    def table(self, key: KeyPath, value: Any, known: Collection[str]) -> dict[str, Any]:
        """``value`` as a table whose keys are all in ``known``."""
        if not isinstance(value, dict):
            raise self.error(key, value, f"a table of {', '.join(known)}")
        self.keys(key, value, known)
        return value

    def integer(self, key: KeyPath, value: Any, low: int, high: int | None) -> int:
        """``value`` as a whole number from ``low`` to ``high`` (None: no limit)."""
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < low
            or (high is not None and value > high)
        ):
            bounds = f"{_number(low)}..{_number(high)}" if high is not None else f">= {low}"
            raise self.error(key, value, f"a whole number {bounds}")
        return value

    def choice(self, key: KeyPath, value: Any, choices: Collection[Any]) -> Any:
        """``value`` if it is one of ``choices``."""
        if isinstance(value, bool) or value not in choices:
            hint = suggest(value, choices) if isinstance(value, str) else ""
            raise self.error(key, value, f"one of {', '.join(map(repr, choices))}{hint}")
        return value

    def string(self, key: KeyPath, value: Any) -> str:
        if not isinstance(value, str):
            raise self.error(key, value, "a string")
        return value

    def boolean(self, key: KeyPath, value: Any) -> bool:
        if not isinstance(value, bool):
            raise self.error(key, value, "true or false")
        return value


def suggest(word: str, known: Collection[Any]) -> str:
    """`` (did you mean 'x'?)`` for the name in ``known`` nearest ``word``, if one is near."""
    names = [k for k in known if isinstance(k, str)]
    close = get_close_matches(word, names, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def dotted(key: KeyPath) -> str:
    """``("images", 0, "address")`` -> ``images[0].address``."""
    text = ""
    for part in key:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else part
    return text


def _number(value: int) -> str:
    return f"{value:#x}" if value >= 0x1000 else str(value)


def _shown(value: Any) -> str:
    """A value as a message shows it: addresses in hex, long text cut short."""
    if isinstance(value, int) and not isinstance(value, bool):
        return _number(value) if value >= 0 else str(value)
    if isinstance(value, list):
        return f"[{', '.join(map(_shown, value))}]"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
