"""A fuzz case as data: what the guest puts in the GHCB MSR and page, exit by exit.

A :class:`Case` is one to three VMGEXITs on a fresh VM (:class:`Step`: the GHCB MSR
value and the page the guest filled), or random guest code (:class:`CodeCase`). Both
have a JSON form that names fields rather than bytes, so that a reproducer can be
read and edited by hand (``docs/fuzzing.md``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from attrs import field, frozen

from fuzz.oracle import ERAS
from sevsim.arch.ghcb import GHCB, GHCB_PAGE_SIZE, GHCB_SAVE_AREA, REGISTER_FIELDS
from sevsim.guest.image import GHCB_GPA

_SHARED_BUFFER = GHCB.offset("shared_buffer")
_SHARED_SIZE = GHCB["shared_buffer"].size
_BITMAP = GHCB_SAVE_AREA.offset("valid_bitmap")
#: Guest RAM no image structure uses, in both paths (the driver's 2 MiB and a guest's):
#: scratch areas meant to land outside the GHCB page go here.
FREE_RAM = 0x10_0000
#: How a case reaches kvm: "driver" (``sevsim.testing.ExitDriver``, no guest CPU) or
#: "guest" (guest code fills the page and executes VMGEXIT).
PATHS = ("driver", "guest")


def _check_fields(instance: object, attribute: object, value: Mapping[str, int]) -> None:
    unknown = sorted(set(value) - set(REGISTER_FIELDS))
    if unknown:
        raise ValueError(f"GHCB page fields {unknown} are not GHCB save-area fields")


@frozen
class PageSpec:
    """A GHCB page as the guest fills it. ``fields`` are save-area values, written
    without their valid bits: ``valid_bitmap`` alone says which count, so a value can
    be present and not valid, or valid and never written."""

    fields: Mapping[str, int] = field(factory=dict, validator=_check_fields)
    valid_bitmap: int = 0
    ghcb_usage: int = 0
    protocol_version: int = 0
    #: The start of the shared buffer (0x800), where in-page scratch data lives.
    buffer: bytes = b""

    def build(self) -> bytes:
        page = bytearray(GHCB_PAGE_SIZE)
        for name, value in self.fields.items():
            GHCB_SAVE_AREA.set(page, name, value)
        page[_BITMAP : _BITMAP + 16] = self.valid_bitmap.to_bytes(16, "little")
        GHCB.set(page, "ghcb_usage", self.ghcb_usage)
        GHCB.set(page, "protocol_version", self.protocol_version)
        page[_SHARED_BUFFER : _SHARED_BUFFER + len(self.buffer)] = self.buffer[:_SHARED_SIZE]
        return bytes(page)

    def to_json(self) -> dict[str, Any]:
        return {
            "fields": {name: hex(value) for name, value in self.fields.items()},
            "valid_bitmap": hex(self.valid_bitmap),
            "ghcb_usage": hex(self.ghcb_usage),
            "protocol_version": hex(self.protocol_version),
            "buffer": self.buffer.hex(),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PageSpec:
        return cls(
            {name: int(value, 0) for name, value in data.get("fields", {}).items()},
            int(data.get("valid_bitmap", "0"), 0),
            int(data.get("ghcb_usage", "0"), 0),
            int(data.get("protocol_version", "0"), 0),
            bytes.fromhex(data.get("buffer", "")),
        )


@frozen
class Step:
    """One VMGEXIT: the GHCB MSR value, and the page the guest filled.

    The page is at the MSR's GPA when that is a GHCB page kvm can map (GHCBInfo 0,
    guest RAM other than page 0); otherwise it sits at the usual GHCB address, where
    kvm must leave it alone (:func:`page_gpa`).
    """

    msr: int
    page: PageSpec = field(factory=PageSpec)

    def to_json(self) -> dict[str, Any]:
        return {"msr": hex(self.msr), "page": self.page.to_json()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Step:
        return cls(int(data["msr"], 0), PageSpec.from_json(data.get("page", {})))


def _check_era(instance: object, attribute: object, value: str) -> None:
    if value not in ERAS:
        raise ValueError(f"era {value!r}: expected one of {ERAS}")


@frozen
class Case:
    """Exits delivered one after another to the one vCPU of a fresh VM."""

    era: str = field(validator=_check_era)
    steps: tuple[Step, ...]
    path: str = "driver"

    def to_json(self) -> dict[str, Any]:
        return {"kind": "exits", "era": self.era, "path": self.path,
                "steps": [step.to_json() for step in self.steps]}  # fmt: skip

    def with_path(self, path: str) -> Case:
        return Case(self.era, self.steps, path)


@frozen
class CodeCase:
    """Random bytes run as a guest's code; ``idt`` gives it exception handlers that
    record the vector and halt (without them a fault ends in a triple fault)."""

    era: str = field(validator=_check_era)
    code: bytes
    idt: bool = True

    def to_json(self) -> dict[str, Any]:
        return {"kind": "code", "era": self.era, "code": self.code.hex(), "idt": self.idt}


AnyCase = Case | CodeCase


def case_from_json(data: Mapping[str, Any]) -> AnyCase:
    """The case a reproducer holds (the ``case`` of a finding, or a bare case)."""
    if data.get("kind") == "code":
        return CodeCase(data["era"], bytes.fromhex(data["code"]), bool(data.get("idt", True)))
    steps = tuple(Step.from_json(step) for step in data["steps"])
    return Case(data["era"], steps, data.get("path", "driver"))


def dumps(case: AnyCase) -> str:
    return json.dumps(case.to_json(), indent=1)


def page_gpa(msr: int, is_ram: Callable[[int, int], bool]) -> int:
    """Where a step's page lives: at the GHCB GPA the MSR names when kvm can map it
    (``is_ram(gpa, 4096)``), else at the usual GHCB address as a canary."""
    gpa = msr & ~0xFFF
    if msr & 0xFFF == 0 and gpa != 0 and is_ram(gpa, GHCB_PAGE_SIZE):
        return gpa
    return GHCB_GPA
