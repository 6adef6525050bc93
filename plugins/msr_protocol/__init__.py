"""The GHCB MSR protocol (patches 13-16 of the SEV-ES series), as newest KVM speaks it.

Before a guest has a GHCB page it talks to the hypervisor through the GHCB MSR
alone: GHCBInfo (bits 11:0) names the request, GHCBData (63:12) carries its fields,
and the reply comes back in the same MSR on the next VMRUN. This plugin owns those
requests:

=========  ==================  ============================================
request    reply               what
=========  ==================  ============================================
0x002      0x001 SEV_INFO      max/min GHCB protocol version, the host's C-bit
0x004      0x005 CPUID         one register of one CPUID function (index 0)
0x080      0x081 HV_FEATURES   hypervisor features (newest KVM: 0x3)
0x100      -                   termination request: the VM stops (SEV_TERM)
0x010-014  -                   SNP page requests: an SEV-ES guest is terminated
=========  ==================  ============================================

AP_RESET_HOLD (0x006) belongs to the ``apboot`` plugin. Requests nobody owns are
ignored by kvm, as newest KVM does: the guest reads its own value back. The 5.11
era knew only SEV_INFO, CPUID and TERM_REQ, and failed KVM_RUN on a termination
request.

Settings (``[plugins.settings.msr_protocol]``): ``min_version`` (default 1) and
``max_version`` (default 2), the GHCB protocol versions SEV_INFO offers.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from attrs import frozen

from sevsim import hookimpl
from sevsim.arch.ghcb_msr import (
    GHCB_HV_FT_SUPPORTED,
    SNP_ONLY_REQUESTS,
    GhcbMsr,
    bits,
    sev_info_resp,
    with_bits,
)
from sevsim.errors import ConfigError
from sevsim.kvm import outcome as O
from sevsim.kvm.context import ExitContext
from sevsim.kvm.dispatch import ExitHandler, ExitKind

#: The protocol versions KVM can speak (GHCB spec v1 and v2).
SUPPORTED_VERSIONS = range(1, 3)


@frozen
class Settings:
    min_version: int = 1
    max_version: int = 2


@hookimpl
def sevsim_configure(settings: Mapping[str, Any]) -> Settings:
    unknown = sorted(set(settings) - {"min_version", "max_version"})
    if unknown:
        raise ConfigError(
            f"msr_protocol: unknown setting(s) {unknown}; expected min_version, max_version"
        )
    values = {}
    for name in ("min_version", "max_version"):
        value = settings.get(name, getattr(Settings(), name))
        if not isinstance(value, int) or isinstance(value, bool) or value not in SUPPORTED_VERSIONS:
            raise ConfigError(
                f"msr_protocol: {name} = {value!r}; expected an integer in "
                f"{SUPPORTED_VERSIONS.start}..{SUPPORTED_VERSIONS.stop - 1}"
            )
        values[name] = value
    if values["min_version"] > values["max_version"]:
        raise ConfigError(
            f"msr_protocol: min_version {values['min_version']} is above "
            f"max_version {values['max_version']}"
        )
    return Settings(**values)


def terminate(ctx: ExitContext) -> O.Outcome:
    """KVM_EXIT_SYSTEM_EVENT, type SEV_TERM, data[0] = the raw GHCB MSR value (5.11: -EINVAL)."""
    return O.sev_term(ctx.vm.era, ctx.msr)


def sev_info(config: Settings, ctx: ExitContext) -> None:
    """The VM's GHCB version (what its vCPUs' MSR held at reset), capped by the setting,
    and the host's C-bit (``sev_enc_bit``), whatever the guest's CPUID table says."""
    max_version = min(config.max_version, ctx.vm.ghcb_version)
    ctx.msr = sev_info_resp(max_version, min(config.min_version, max_version),
                            ctx.vm.sev_enc_bit)  # fmt: skip


def cpuid(ctx: ExitContext) -> None:
    function, register = bits(ctx.msr, 63, 32), bits(ctx.msr, 31, 30)
    leaf = ctx.vcpu.cpuid(function, 0)  # KVM's CPUID handler; no sub-leaf here
    value = (leaf.eax, leaf.ebx, leaf.ecx, leaf.edx)[register]
    reply = with_bits(ctx.msr, 63, 32, value)  # bits 31:12 keep the guest's value
    ctx.msr = with_bits(reply, 11, 0, GhcbMsr.CPUID_RESP)


def hv_features(ctx: ExitContext) -> None:
    ctx.msr = GHCB_HV_FT_SUPPORTED << 12 | GhcbMsr.HV_FT_RESP


def snp_only(ctx: ExitContext) -> O.Outcome:
    """KVM terminates a non-SNP guest that sends an SNP request."""
    ctx.notes["snp"] = f"{GhcbMsr(ctx.code).linux_name} from a non-SNP guest: terminated"
    return terminate(ctx)


@hookimpl
def sevsim_exit_handlers(config: Settings) -> Iterator[ExitHandler]:
    kind, newest = ExitKind.MSR_PROTOCOL, {"newest"}
    yield ExitHandler(kind, GhcbMsr.SEV_INFO_REQ, lambda ctx: sev_info(config, ctx))
    yield ExitHandler(kind, GhcbMsr.CPUID_REQ, cpuid)
    yield ExitHandler(kind, GhcbMsr.HV_FT_REQ, hv_features, eras=newest)
    yield ExitHandler(kind, GhcbMsr.TERM_REQ, terminate)
    for code in sorted(SNP_ONLY_REQUESTS):
        yield ExitHandler(kind, code, snp_only, eras=newest)
