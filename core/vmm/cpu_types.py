"""vCPU type names (QEMU's ``-cpu`` models) and the CPUID signature each one reports.

The signature (CPUID Fn0000_0001 EAX) is what QEMU puts in RDX at reset, so it is
part of every SEV-ES VMSA and therefore of the launch digest: a guest owner must
know the vCPU type to predict the measurement. Family/model/stepping values are
those of QEMU's ``builtin_x86_defs``; versions of one model share them.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from attrs import frozen

from sevsim.errors import ConfigError

#: Base family value that announces an extended family (AMD CPUID spec, pub. 25481).
EXTENDED_FAMILY_BASE = 0xF


def cpuid_signature(family: int, model: int, stepping: int) -> int:
    """CPUID Fn0000_0001 EAX for a family/model/stepping (AMD pub. 25481).

    Family = BaseFamily + ExtFamily when BaseFamily is 0xF, Model = ExtModel:BaseModel;
    bits: ExtFamily[27:20] ExtModel[19:16] BaseFamily[11:8] BaseModel[7:4] Stepping[3:0].
    """
    if not 0 <= stepping <= 0xF:
        raise ConfigError(f"stepping {stepping} must be 0..15")
    if family >= EXTENDED_FAMILY_BASE:
        base_family, ext_family = EXTENDED_FAMILY_BASE, family - EXTENDED_FAMILY_BASE
    else:
        base_family, ext_family = family, 0
    if ext_family > 0xFF or family < 0:
        raise ConfigError(f"family {family} must be 0..{EXTENDED_FAMILY_BASE + 0xFF}")
    if not 0 <= model <= (0xFF if base_family == EXTENDED_FAMILY_BASE else 0xF):
        raise ConfigError(f"model {model} cannot be encoded for family {family:#x}")
    return (
        (ext_family << 20)
        | ((model >> 4) << 16)
        | (base_family << 8)
        | ((model & 0xF) << 4)
        | stepping
    )


@frozen
class CpuModel:
    family: int
    model: int
    stepping: int

    @property
    def signature(self) -> int:
        return cpuid_signature(self.family, self.model, self.stepping)


_EPYC = CpuModel(family=23, model=1, stepping=2)
_ROME = CpuModel(family=23, model=49, stepping=0)
_MILAN = CpuModel(family=25, model=1, stepping=1)
_GENOA = CpuModel(family=25, model=17, stepping=0)
_TURIN = CpuModel(family=26, model=0, stepping=0)

VCPU_TYPES: Mapping[str, CpuModel] = MappingProxyType(
    {
        "EPYC": _EPYC,
        "EPYC-v1": _EPYC,
        "EPYC-v2": _EPYC,
        "EPYC-IBPB": _EPYC,
        "EPYC-v3": _EPYC,
        "EPYC-v4": _EPYC,
        "EPYC-Rome": _ROME,
        "EPYC-Rome-v1": _ROME,
        "EPYC-Rome-v2": _ROME,
        "EPYC-Rome-v3": _ROME,
        "EPYC-Milan": _MILAN,
        "EPYC-Milan-v1": _MILAN,
        "EPYC-Milan-v2": _MILAN,
        "EPYC-Genoa": _GENOA,
        "EPYC-Genoa-v1": _GENOA,
        "EPYC-Turin": _TURIN,
    }
)


def vcpu_signature(name: str) -> int:
    """The CPUID signature of the QEMU vCPU type ``name`` (case-sensitive)."""
    try:
        return VCPU_TYPES[name].signature
    except KeyError:
        valid = ", ".join(VCPU_TYPES)
        raise ConfigError(f"unknown vCPU type {name!r}; valid types: {valid}") from None
