"""The exit-handler table: (kind, code) -> handler, built once, looked up per exit.

This is sevsim's ``svm_exit_handlers[]`` plus the VMGEXIT and MSR-protocol switch
statements of ``sev_handle_vmgexit``, turned into data so that plugins can own rows.
The plugin host fills the table at start-up; tests may register handlers directly.
A VMGEXIT is one dict lookup, never a fan-out over plugins.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from enum import Enum
from typing import TYPE_CHECKING, Any

from attrs import evolve, field, frozen

from sevsim.arch.exits import exit_name
from sevsim.arch.ghcb import REGISTER_FIELDS
from sevsim.arch.ghcb_msr import GhcbMsr
from sevsim.errors import PluginError

if TYPE_CHECKING:
    from sevsim.kvm.outcome import Outcome


class ExitKind(Enum):
    """Which number space an :class:`ExitHandler`'s ``code`` lives in."""

    #: ``sw_exit_code`` of a GHCB-page VMGEXIT (NAE events and SVM_VMGEXIT_* codes).
    VMGEXIT = "vmgexit"
    #: GHCBInfo (bits 11:0) of a GHCB MSR protocol request.
    MSR_PROTOCOL = "msr_protocol"
    #: An automatic #VMEXIT code the hardware raises by itself (CR/EFER write traps, HLT).
    VMEXIT = "vmexit"


def code_name(kind: ExitKind, code: int) -> str:
    """``0x7b (SVM_EXIT_IOIO)``: the hex and symbolic form used in every message."""
    if kind is ExitKind.MSR_PROTOCOL:
        try:
            return f"{code:#05x} ({GhcbMsr(code).linux_name})"
        except ValueError:
            return f"{code:#05x}"
    name = exit_name(code)
    return f"{code:#x}" if name.startswith("0x") else f"{code:#x} ({name})"


def _check_requires(instance: Any, attribute: Any, value: tuple[str, ...]) -> None:
    unknown = [name for name in value if name not in REGISTER_FIELDS]
    if unknown:
        raise PluginError(
            f"ExitHandler requires unknown GHCB field(s) {unknown}; "
            f"expected names from ghcb_save_area: {', '.join(REGISTER_FIELDS)}"
        )


Handler = Callable[..., "Outcome | None"]


@frozen
class ExitHandler:
    """A claim: "exits of ``kind`` with ``code`` are mine, handled by ``handler``".

    ``requires`` names GHCB save-area fields (beyond ``sw_exit_code``,
    ``sw_exit_info_1`` and ``sw_exit_info_2``, which every VMGEXIT needs) whose valid
    bits must be set; kvm checks them before calling, as ``sev_es_validate_vmgexit``
    does, and answers MISSING_INPUT otherwise. It may also be a callable taking the
    GHCB snapshot and returning such names, for codes whose needs depend on the
    request (IOIO: RAX only for OUT). ``plugin`` is stamped by the plugin host.
    """

    kind: ExitKind
    code: int
    handler: Handler = field(repr=False)
    requires: tuple[str, ...] | Callable[[Any], Iterable[str]] = field(default=())
    plugin: str | None = None

    @requires.validator
    def _validate_requires(self, attribute: Any, value: Any) -> None:
        if not callable(value):
            _check_requires(self, attribute, tuple(value))

    def required_fields(self, ghcb: Any) -> tuple[str, ...]:
        if callable(self.requires):
            fields = tuple(self.requires(ghcb))
            _check_requires(self, None, fields)
            return fields
        return tuple(self.requires)

    @property
    def owner(self) -> str:
        """The owning plugin's name, for messages (tests may register rows directly)."""
        return self.plugin or "<direct registration>"

    def describe(self) -> str:
        return f"{self.kind.value} {code_name(self.kind, self.code)}"


class ExitTable:
    """The dispatch table: one entry per (kind, code), conflicts refused."""

    def __init__(self, handlers: Iterable[ExitHandler] = ()) -> None:
        self._rows: dict[tuple[ExitKind, int], ExitHandler] = {}
        for h in handlers:
            self.register(h)

    def register(self, entry: ExitHandler, plugin: str | None = None) -> ExitHandler:
        """Add a row; a second claim on the same (kind, code) is an error naming both owners."""
        if plugin is not None:
            entry = evolve(entry, plugin=plugin)
        key = (entry.kind, entry.code)
        if key in self._rows:
            first = self._rows[key]
            raise PluginError(
                f"exit code conflict: {entry.describe()} is claimed by both "
                f"{first.owner!r} and {entry.owner!r}"
            )
        self._rows[key] = entry
        return entry

    def lookup(self, kind: ExitKind, code: int) -> ExitHandler | None:
        return self._rows.get((kind, code))

    def __iter__(self) -> Iterator[ExitHandler]:
        return iter(self._rows.values())

    def __len__(self) -> int:
        return len(self._rows)
