"""Which events a trace keeps: ``event=vmgexit_enter,exit_handled;vcpu=0;code=SVM_EXIT_IOIO``.

Grammar (docs/trace-format.md, "Filters")::

    filter  := "" | clause (";" clause)*
    clause  := key "=" value ("," value)*
    key     := "event" | "vcpu" | "plugin" | "code"

Values of one clause are alternatives (any may match); clauses must all match. A
clause on a field (``vcpu``, ``plugin``, ``code``) keeps only events that carry that
field with one of the values, so ``code=SVM_EXIT_IOIO`` is every event about an IOIO
exit and nothing else. A filter is checked when it is parsed, so that a typo fails at
once instead of leaving an empty trace: event names must be known events
(:data:`~sevsim.trace_schema.KNOWN_EVENTS`), codes numbers or Linux's exit code names.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from attrs import frozen

from sevsim.arch.exits import SvmExit, VmgExit
from sevsim.errors import ConfigError
from sevsim.trace_schema import CODE_FIELDS, KNOWN_EVENTS, VCPU_FIELDS, first_of

_PLUGIN_NAME = re.compile(r"[\w.-]+")
_NUMBER = re.compile(r"(0[xX][0-9a-fA-F]+)|[0-9]+")
_INDEX = re.compile(r"[0-9]+")
_CODE_NAMES = {member.linux_name: int(member) for enum in (SvmExit, VmgExit) for member in enum}


def _event(text: str) -> str:
    if text not in KNOWN_EVENTS:
        raise ValueError(f"a known event ({', '.join(sorted(KNOWN_EVENTS))})")
    return text


def _vcpu(text: str) -> int:
    if not _INDEX.fullmatch(text):
        raise ValueError("a vCPU index (0, 1, ...)")
    return int(text)


def _plugin(text: str) -> str:
    if not _PLUGIN_NAME.fullmatch(text):
        raise ValueError("a plugin name (letters, digits, '_', '.', '-')")
    return text


def _code(text: str) -> int:
    number = _NUMBER.fullmatch(text)
    if number is not None:
        return int(text, 16 if number[1] else 10)
    named = _CODE_NAMES.get(text.upper())
    if named is None:
        raise ValueError("an exit code: a number (0x7b, 123) or Linux's name (SVM_EXIT_IOIO)")
    return named


#: Each key: how one of its values is read (raising ValueError(what was expected)).
_KEYS: dict[str, Callable[[str], Any]] = {
    "event": _event, "vcpu": _vcpu, "plugin": _plugin, "code": _code,
}  # fmt: skip


def _is_one_of(value: Any, values: frozenset[Any]) -> bool:
    """Filter values are ints and strings; a field of another type matches none."""
    return isinstance(value, int | str) and value in values


def _show(values: frozenset[Any] | None, key: str) -> str | None:
    if values is None:
        return None
    shown = sorted(f"{v:#x}" if key == "code" else str(v) for v in values)
    return f"{key}={','.join(shown)}"


@frozen
class TraceFilter:
    """A parsed filter: for each key, the values it accepts (None: any)."""

    events: frozenset[str] | None = None
    vcpus: frozenset[int] | None = None
    plugins: frozenset[str] | None = None
    codes: frozenset[int] | None = None

    @classmethod
    def parse(cls, text: str) -> TraceFilter:
        """Read a filter; a ConfigError names the bad part and what was expected."""
        found: dict[str, frozenset[Any]] = {}
        for clause in (part.strip() for part in text.split(";")):
            if not clause:
                continue
            key, equals, values = (s.strip() for s in clause.partition("="))
            if not equals:
                raise ConfigError(f"trace filter {text!r}: {clause!r} is not "
                                  "KEY=VALUE[,VALUE...]")  # fmt: skip
            if key not in _KEYS:
                raise ConfigError(f"trace filter {text!r}: unknown key {key!r}; expected one "
                                  f"of {', '.join(_KEYS)}")  # fmt: skip
            if key in found:
                raise ConfigError(f"trace filter {text!r}: {key!r} appears twice; list its "
                                  f"values in one clause ({key}=A,B)")  # fmt: skip
            found[key] = frozenset(cls._value(text, key, v.strip()) for v in values.split(","))
        return cls(found.get("event"), found.get("vcpu"), found.get("plugin"),
                   found.get("code"))  # fmt: skip

    @staticmethod
    def _value(text: str, key: str, value: str) -> Any:
        try:
            return _KEYS[key](value)
        except ValueError as what:
            raise ConfigError(f"trace filter {text!r}: {key} {value!r} is not valid; "
                              f"expected {what}") from None  # fmt: skip

    def _field_clauses(self) -> list[tuple[tuple[str, ...], frozenset[Any]]]:
        clauses = ((VCPU_FIELDS, self.vcpus), (("plugin",), self.plugins),
                   (CODE_FIELDS, self.codes))  # fmt: skip
        return [(fields, values) for fields, values in clauses if values is not None]

    def wants(self, name: str) -> bool:
        """Whether events named ``name`` can pass: False when the event clause leaves
        it out, or when it is a known event without a field another clause needs."""
        if self.events is not None and name not in self.events:
            return False
        known = KNOWN_EVENTS.get(name)
        if known is None:  # fields unknown until it is emitted
            return True
        return all(any(f in known for f in fields) for fields, _ in self._field_clauses())

    def names(self, event: str) -> bool:
        """Whether the event clause lists ``event`` by name: how a reader asks for what
        a trace leaves out unless asked (the text trace's device accesses)."""
        return self.events is not None and event in self.events

    def matches(self, name: str, fields: Mapping[str, Any]) -> bool:
        """Whether this event passes every clause."""
        if self.events is not None and name not in self.events:
            return False
        return all(_is_one_of(first_of(fields, keys), values)
                   for keys, values in self._field_clauses())  # fmt: skip

    def __str__(self) -> str:
        """The filter in its canonical form (parses back to an equal filter)."""
        parts = (_show(self.events, "event"), _show(self.vcpus, "vcpu"),
                 _show(self.plugins, "plugin"), _show(self.codes, "code"))  # fmt: skip
        return ";".join(p for p in parts if p is not None)
