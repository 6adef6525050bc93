"""What one event of the machine-readable trace looks like (docs/trace-format.md).

The writer (:mod:`sevsim.trace_jsonl`), the filter (:mod:`sevsim.trace_filter`) and
the readers (:mod:`sevsim.trace_summary`, :mod:`sevsim.trace_report`) share these
definitions, so that the format is stated once: the schema's name and version, the
keys every event carries, the events the trace knows, and how an event's Python
values become JSON. Events nobody has described here still go through the same
conversion: the trace never drops or refuses an event for being new.
"""

from __future__ import annotations

import math
from collections import ChainMap
from collections.abc import Mapping
from enum import Enum
from typing import Any

import attrs

from sevsim.arch import ghcb_msr
from sevsim.arch.exits import exit_name
from sevsim.arch.ghcb_msr import GhcbMsr
from sevsim.hw import SIM_EVENTS
from sevsim.kvm.dispatch import ExitKind
from sevsim.kvm.events import EVENTS
from sevsim.trace import (
    describe_access,
    describe_msr,
    describe_request,
    describe_response,
    disassemble,
)

#: The header's ``schema`` value: what the file is.
SCHEMA = "sevsim-trace"
#: The header's ``version``: raised only for changes an existing reader would misread.
VERSION = 1

#: Keys the trace itself puts on every event; an event field of the same name is
#: written with a trailing underscore (``seq_``) rather than overwrite one.
COMMON_KEYS = frozenset({"seq", "event", "wall_ns", "guest_ns"})

#: The trace's own marker event: a stage of the run (``name``: "launch", "boot", ...),
#: emitted by whoever drives the run, shown on the report's timeline.
PHASE = "phase"

#: Every event the trace knows, with its fields: kvm's, the simulator's and the trace's
#: own. A live view: an event added to kvm's or the simulator's table is known at once.
KNOWN_EVENTS: Mapping[str, tuple[str, ...]] = ChainMap(EVENTS, SIM_EVENTS, {PHASE: ("name",)})

#: Where an event keeps its vCPU index (kvm's name first, then the simulator's).
VCPU_FIELDS = ("vcpu_id", "vcpu")
#: Where an event keeps an exit code (kvm's vmexit and the simulator's, the GHCB's
#: ``sw_exit_code``, an exit handler's code).
CODE_FIELDS = ("exit_code", "exit_reason", "code")
#: Events about an exit handler, whose ``code`` lives in the number space ``kind`` names.
HANDLER_EVENTS = frozenset({"exit_handled", "plugin_failed"})

_DISASSEMBLY_MODES = (16, 32, 64)


def json_value(value: Any) -> Any:
    """``value`` as JSON can hold it, losing nothing a reader of the trace needs.

    ints stay ints (an IntEnum too: the same exit code arrives as ``SvmExit.IOIO``
    from one emitter and as 123 from another, and must read the same; its name is in
    ``exit_name``); other enums become their name; bytes lowercase hex; attrs objects
    (``VmInfo``) a JSON object of their fields; mappings and sequences recursively;
    anything else its ``str``.
    """
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, Enum):
        return value.name
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if attrs.has(type(value)):
        return json_value(attrs.asdict(value, recurse=False))
    if isinstance(value, Mapping):
        return {k if isinstance(k, str) else str(json_value(k)): json_value(v)
                for k, v in value.items()}  # fmt: skip
    if isinstance(value, set | frozenset):
        return sorted((json_value(v) for v in value), key=repr)
    if isinstance(value, list | tuple):
        return [json_value(v) for v in value]
    return str(value)


def ghcb_msr_name(code: int) -> str:
    """Linux's name of a GHCBInfo code (``GHCB_MSR_TERM_REQ``); ``GHCB_MSR_0x123`` for a
    code Linux does not name."""
    try:
        return GhcbMsr(code).linux_name
    except ValueError:
        return f"GHCB_MSR_{code:#05x}"


def _exit_name(name: str, fields: Mapping[str, Any]) -> str | None:
    """The symbolic name of the code an event is about, in the number space it is in."""
    if name in HANDLER_EVENTS:
        code = fields.get("code")
        if not isinstance(code, int):
            return None
        if fields.get("kind") == ExitKind.MSR_PROTOCOL.value:
            return ghcb_msr_name(code)
        return exit_name(code)
    if name.startswith("msr_protocol_"):
        value = fields.get("ghcb_gpa")
        return ghcb_msr_name(ghcb_msr.info(value)) if isinstance(value, int) else None
    code = fields.get("exit_code", fields.get("exit_reason"))
    return exit_name(code) if isinstance(code, int) else None


def _ints(fields: Mapping[str, Any], *names: str) -> list[int] | None:
    values = [fields.get(name) for name in names]
    ints = [v for v in values if isinstance(v, int)]
    return ints if len(ints) == len(values) else None


def _decoded(name: str, fields: Mapping[str, Any]) -> str | None:
    """A line of text for humans (``sevsim.trace``'s decoding); not for machines."""
    if name == "vmgexit_enter" and (ints := _ints(fields, "exit_reason", "info1", "info2")):
        return describe_request(*ints)
    if name == "vmgexit_exit" and (ints := _ints(fields, "info1", "info2")):
        return describe_response(*ints)
    if name.startswith("msr_protocol_") and (ints := _ints(fields, "ghcb_gpa")):
        return describe_msr(*ints)
    if name == "device_access" and (ints := _ints(fields, "address", "size", "value")):
        bus, direction = fields.get("bus"), fields.get("direction")
        if isinstance(bus, str) and isinstance(direction, str):
            address, size, value = ints
            access = describe_access(bus, address, size, direction, value)
            return f"{fields.get('device')}: {access}"
    if name.startswith("sim_") and (ints := _ints(fields, "rip", "bits")):
        insn = fields.get("insn")
        if isinstance(insn, bytes) and insn and ints[1] in _DISASSEMBLY_MODES:
            return disassemble(insn, *ints)
    return None


def encode_fields(name: str, fields: Mapping[str, Any]) -> dict[str, Any]:
    """An event's fields as JSON values, followed by the names the trace decodes for
    it (``exit_name``, ``decoded``) unless the event has fields of those names."""
    record = {(f"{key}_" if key in COMMON_KEYS else key): json_value(value)
              for key, value in fields.items()}  # fmt: skip
    for key, decode in (("exit_name", _exit_name), ("decoded", _decoded)):
        if key not in record and (text := decode(name, fields)) is not None:
            record[key] = text
    return record


def first_of(event: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    """The value of the first of ``keys`` the event has (None if it has none)."""
    for key in keys:
        if key in event:
            return event[key]
    return None
