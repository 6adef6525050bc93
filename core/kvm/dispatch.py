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
from sevsim.arch.ghcb import REGISTER_FIELDS, valid_mask
from sevsim.arch.ghcb_msr import GhcbMsr
from sevsim.errors import PluginError

if TYPE_CHECKING:
    from sevsim.kvm.outcome import Outcome

#: The KVM eras an ExitHandler can be limited to (``[kvm] era``).
ERAS = ("newest", "v5.11")


class ExitKind(Enum):
    """Which number space an :class:`ExitHandler`'s ``code`` lives in."""

    #: ``sw_exit_code`` of a GHCB-page VMGEXIT (NAE events and SVM_VMGEXIT_* codes).
    VMGEXIT = "vmgexit"
    #: GHCBInfo (bits 11:0) of a GHCB MSR protocol request.
    MSR_PROTOCOL = "msr_protocol"
    #: An automatic #VMEXIT code the hardware raises by itself (CR/EFER write traps, HLT).
    VMEXIT = "vmexit"

    #: A member is its only instance: hashed by identity, in C, not by its name in
    #: Python as Enum does (the dispatch table is keyed by kind, and looked up per exit).
    __hash__ = object.__hash__


#: The largest code of each kind: GHCBInfo is 12 bits, exit codes are 64-bit.
CODE_LIMITS = {ExitKind.VMGEXIT: (1 << 64) - 1, ExitKind.MSR_PROTOCOL: 0xFFF,
               ExitKind.VMEXIT: (1 << 64) - 1}  # fmt: skip


def code_name(kind: ExitKind, code: int, name: str | None = None) -> str:
    """``0x7b (SVM_EXIT_IOIO)``: the hex and symbolic form used in every message;
    ``name`` is a plugin's own name for a code sevsim does not know."""
    if kind is ExitKind.MSR_PROTOCOL:
        try:
            return f"{code:#05x} ({GhcbMsr(code).linux_name})"
        except ValueError:
            return f"{code:#05x} ({name})" if name else f"{code:#05x}"
    known = exit_name(code)
    if name and (known.startswith("0x") or known.startswith("SVM_EXIT_SW")):
        return f"{code:#x} ({name})"
    return f"{code:#x}" if known.startswith("0x") else f"{code:#x} ({known})"


def _check_kind(instance: Any, attribute: Any, value: Any) -> None:
    if not isinstance(value, ExitKind):
        raise PluginError(
            f"ExitHandler kind {value!r}: expected an ExitKind "
            f"({', '.join(f'ExitKind.{k.name}' for k in ExitKind)})"
        )


def _check_code(instance: Any, attribute: Any, value: Any) -> None:
    limit = CODE_LIMITS.get(instance.kind, (1 << 64) - 1)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise PluginError(
            f"ExitHandler code {value!r} for {instance.kind.value}: expected an integer in "
            f"0..{limit:#x}"
        )


#: The names ``requires`` may give, for a membership test per name.
_REGISTER_FIELDS = frozenset(REGISTER_FIELDS)


def _check_requires(names: Iterable[str]) -> tuple[str, ...]:
    names = tuple(names)
    unknown = [name for name in names if not isinstance(name, str) or name not in _REGISTER_FIELDS]
    if unknown:
        raise PluginError(
            f"ExitHandler requires unknown GHCB field(s) {unknown}; "
            f"expected names from ghcb_save_area: {', '.join(REGISTER_FIELDS)}"
        )
    return names


#: Valid-bitmap masks of ``requires`` answers already checked, by the answer's id: a
#: static tuple, or the constant tuples a callable returns, is checked and turned into
#: a mask once, not on every exit. Each entry holds its tuple, so that an id in the
#: table is never another object's; emptied when full.
_MASKS: dict[int, tuple[tuple[str, ...], int]] = {}
_MASKS_KEPT = 64


def _check_requires_field(instance: Any, attribute: Any, value: Any) -> None:
    if callable(value):
        return
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise PluginError(
            f"ExitHandler requires {value!r}: expected a tuple of GHCB field names or a "
            "callable taking the GHCB and returning them"
        )
    _check_requires(value)


def _check_eras(instance: Any, attribute: Any, value: frozenset[str] | None) -> None:
    if value is not None and not set(value) <= set(ERAS):
        raise PluginError(f"ExitHandler eras {sorted(value)}: expected a subset of {ERAS}")


def _check_handler(instance: Any, attribute: Any, value: Any) -> None:
    if not callable(value):
        raise PluginError(f"ExitHandler handler {value!r} is not callable")


def _as_requires(value: Any) -> Any:
    """``requires`` as stored: a callable as given, any other iterable as a tuple (a
    string stays one, for the validator to refuse by name)."""
    return value if callable(value) or isinstance(value, str) else tuple(value)


def _as_eras(value: Iterable[str] | None) -> frozenset[str] | None:
    return None if value is None else frozenset(value)


Handler = Callable[..., "Outcome | None"]


@frozen
class ExitHandler:
    """A claim: "exits of ``kind`` with ``code`` are mine, handled by ``handler``".

    ``requires`` names GHCB save-area fields (beyond ``sw_exit_code``,
    ``sw_exit_info_1`` and ``sw_exit_info_2``, which every VMGEXIT needs) whose valid
    bits must be set; kvm checks them before calling, as ``sev_es_validate_vmgexit``
    does, and answers MISSING_INPUT otherwise. It may also be a callable taking the
    GHCB snapshot and returning such names, for codes whose needs depend on the
    request (IOIO: RAX only for OUT). ``name`` names a code sevsim does not know (in
    the trace and ``sevsim plugins``). ``eras`` limits the row to some KVM eras: a
    VM of another era meets the code as KVM of that era did, unknown. ``plugin`` is
    stamped by the plugin host.
    """

    kind: ExitKind = field(validator=_check_kind)
    code: int = field(validator=_check_code)
    handler: Handler = field(repr=False, validator=_check_handler)
    requires: tuple[str, ...] | Callable[[Any], Iterable[str]] = field(
        default=(), validator=_check_requires_field, converter=_as_requires
    )
    name: str | None = None
    eras: frozenset[str] | None = field(default=None, validator=_check_eras, converter=_as_eras)
    plugin: str | None = None

    def required_mask(self, ghcb: Any) -> int:
        """The valid bits ``requires`` asks for (:func:`~sevsim.arch.ghcb.valid_mask`);
        for a callable, of this request (it is plugin code: call it as such)."""
        requires = self.requires
        names = requires(ghcb) if callable(requires) else requires
        known = _MASKS.get(id(names))
        if known is not None and known[0] is names:
            return known[1]
        mask = valid_mask(_check_requires(names))
        if type(names) is tuple:  # immutable, and so its answer too
            if len(_MASKS) >= _MASKS_KEPT:
                _MASKS.clear()
            _MASKS[id(names)] = (names, mask)
        return mask

    def known_in(self, era: str) -> bool:
        """Whether a KVM of ``era`` had this row at all."""
        return self.eras is None or era in self.eras

    @property
    def owner(self) -> str:
        """The owning plugin's name, for messages (tests may register rows directly)."""
        return self.plugin or "<direct registration>"

    def describe(self) -> str:
        return f"{self.kind.value} {code_name(self.kind, self.code, self.name)}"


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
