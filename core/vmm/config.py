"""The ``[kvm]`` table of ``sevsim.toml``: which KVM the VM meets.

    [kvm]
    era = "newest"        # or "v5.11": the original, fail-stop SEV-ES series
    ghcb_version = 2      # the GHCB protocol version the VM offers (1 or 2)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from attrs import frozen

from sevsim.errors import ConfigError
from sevsim.kvm.compat import ERAS
from sevsim.kvm.vm import GHCB_VERSION_MAX, GHCB_VERSION_MIN
from sevsim.plugin.config import check_tables, read_toml

_KEYS = ("era", "ghcb_version")


@frozen
class KvmSettings:
    era: str = "newest"
    #: None: the era's default (2, or 1 for v5.11).
    ghcb_version: int | None = None

    def vm_args(self) -> dict[str, Any]:
        return {"era": self.era, "ghcb_version": self.ghcb_version}


def load_kvm_settings(file: Path | None, era: str | None = None) -> KvmSettings:
    """``[kvm]`` from ``file`` (if any), with ``--era`` over it."""
    document = read_toml(file) if file is not None else {}
    check_tables(document, str(file))
    return kvm_settings(document.get("kvm", {}), f"{file}: [kvm]", era)


def kvm_settings(table: Any, where: str, era: str | None = None) -> KvmSettings:
    """A ``[kvm]`` table (sevsim.toml's or a guest manifest's), with ``--era`` over it;
    ``where`` names the table in errors (``FILE: [kvm]``)."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table, got {table!r}")
    unknown = sorted(set(table) - set(_KEYS))
    if unknown:
        raise ConfigError(f"{where} has unknown key(s) {unknown}; expected: {', '.join(_KEYS)}")
    chosen = era if era is not None else table.get("era", "newest")
    if not isinstance(chosen, str) or chosen not in ERAS:
        origin = "--era" if era is not None else f"{where} era"
        raise ConfigError(f"{origin} = {chosen!r}: expected one of {sorted(ERAS)}")
    version = table.get("ghcb_version")
    valid = range(GHCB_VERSION_MIN, GHCB_VERSION_MAX + 1)
    if version is not None and (
        not isinstance(version, int) or isinstance(version, bool) or version not in valid
    ):
        expected = f"{valid.start}..{valid.stop - 1}"
        raise ConfigError(f"{where} ghcb_version = {version!r}: expected {expected}")
    return KvmSettings(chosen, version)
