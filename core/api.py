"""Everything a sevsim plugin author needs, from one import: ``from sevsim import api``.

sevsim's plugin surface is spread over the layers it models (exit codes in
``sevsim.arch``, the exit context in ``sevsim.kvm``, hookspecs in ``sevsim.plugin``,
fixtures in ``sevsim.testing``). A third-party plugin should not have to learn that
map, nor depend on where a name happens to live today: this module is the one place
whose names are a promise. It defines nothing of its own; every name is the object
of the module that implements it, so ``api.ExitContext is
sevsim.kvm.context.ExitContext``.

What is here, by the job a plugin has to do:

- **Claim exit codes**: :data:`hookimpl`, :class:`ExitHandler`, :class:`ExitKind`,
  :data:`ERAS`; the hooks themselves are documented, each with a running example, in
  :mod:`sevsim.plugin.hookspecs`.
- **Handle an exit**: the objects a handler receives, :class:`ExitContext` with its
  :class:`Regs`, :class:`VcpuView`, :class:`VmView`, :class:`MappedGhcb` (``ctx.ghcb``),
  :class:`Scratch`, :class:`CpuidLeaf` and :class:`CpuidModel`, :class:`GuestBus`.
- **Answer**: outcomes (:data:`RESUME`, :class:`Resume`, :class:`ExitToUser`,
  :class:`Fail`, :func:`sev_term`), the KVM exits userspace sees (:class:`SystemEvent`,
  :class:`InternalError`, ...), GHCB reply codes (:class:`GhcbResp`, :class:`GhcbErr`)
  and events to inject (:class:`EventInj`, :class:`Vector`).
- **Speak the protocol**: exit codes (:class:`SvmExit`, :class:`VmgExit`,
  :data:`SVM_EXIT_SW` for codes of your own, :func:`exit_name`), the GHCB layout
  (:class:`Ghcb`, :data:`GHCB_SAVE_AREA`, :func:`valid_bit`, ...), the GHCB MSR
  protocol (:class:`GhcbMsr`, :func:`bits`, :func:`with_bits`, :func:`term_req`, ...),
  the IOIO exit information (:class:`IoioInfo`) and MSR numbers and control-register
  bits (the :mod:`msr` namespace: ``api.msr.EFER_SVME``).
- **Watch**: what observers hear (:data:`EVENTS`, :class:`VmInfo`) and, separately,
  the simulator's own view that no exit handler ever receives (:data:`SIM_EVENTS`,
  hooks ``sevsim_sim_*``).
- **Fail well**: :class:`ConfigError` for settings a plugin rejects, :class:`PluginError`.
- **Test**: :func:`isolated_host`, :class:`ExitDriver`, :func:`run_guest` and their
  results, and guest snippets (:data:`TERMINATE`, :func:`ghcb_vmgexit`, ...).

The testing names need pytest, which a plugin does not need at run time, and pull in
the guest side and the VMM; they are loaded on first use (:pep:`562`), so
``import sevsim.api`` stays what a running plugin needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from sevsim.arch import msr
from sevsim.arch.exits import SVM_EXIT_SW, GhcbErr, GhcbResp, SvmExit, VmgExit, exit_name
from sevsim.arch.ghcb import (
    GHCB,
    GHCB_SAVE_AREA,
    GHCB_SCRATCH_AREA_LIMIT,
    REGISTER_FIELDS,
    SHARED_BUFFER_END,
    SHARED_BUFFER_START,
    Ghcb,
    valid_bit,
)
from sevsim.arch.ghcb_msr import (
    GHCB_HV_FT_SUPPORTED,
    SNP_ONLY_REQUESTS,
    GhcbMsr,
    bits,
    cpuid_req,
    sev_info_resp,
    term_reason,
    term_req,
    with_bits,
)
from sevsim.arch.ioio import IOIO_REP, IOIO_STR, IOIO_TYPE_IN, IoioInfo
from sevsim.arch.vectors import Vector
from sevsim.arch.vmcb import EventInj
from sevsim.errors import ConfigError, PluginError, SevsimError
from sevsim.hw import SIM_EVENTS, CpuidLeaf
from sevsim.kvm.buses import GuestBus
from sevsim.kvm.context import ExitContext, Regs, VcpuView, VmView
from sevsim.kvm.cpuid import CpuidModel
from sevsim.kvm.dispatch import ERAS, ExitHandler, ExitKind
from sevsim.kvm.events import EVENTS
from sevsim.kvm.exits import (
    ApResetHold,
    Hlt,
    InternalError,
    InternalErrorSub,
    KvmExit,
    RunFailed,
    Shutdown,
    SystemEvent,
    SystemEventType,
)
from sevsim.kvm.ghcb_map import MappedGhcb
from sevsim.kvm.outcome import RESUME, ExitToUser, Fail, Outcome, Resume, sev_term
from sevsim.kvm.scratch import Scratch
from sevsim.kvm.vm import VmInfo
from sevsim.plugin.hookspecs import hookimpl

if TYPE_CHECKING:  # for type checkers; at run time __getattr__ below loads them
    from sevsim.guest.asm import assemble
    from sevsim.guest.image import CODE, GHCB_GPA
    from sevsim.guest.snippets import TERMINATE, ghcb_vmgexit, nmi_complete, terminate
    from sevsim.testing import (
        KVM_PLUGINS,
        RUN_GUEST_TIMEOUT,
        Delivered,
        ExitDriver,
        GuestRun,
        PcRun,
        SimLog,
        isolated_host,
        run_guest,
        run_pc_guest,
    )

#: The testing helpers and guest snippets, loaded on first use: module -> names.
_ON_FIRST_USE = {
    "sevsim.testing": ("KVM_PLUGINS", "RUN_GUEST_TIMEOUT", "Delivered", "ExitDriver",
                       "GuestRun", "PcRun", "SimLog", "isolated_host", "run_guest",
                       "run_pc_guest"),
    "sevsim.guest.snippets": ("TERMINATE", "ghcb_vmgexit", "nmi_complete", "terminate"),
    "sevsim.guest.image": ("CODE", "GHCB_GPA"),
    "sevsim.guest.asm": ("assemble",),
}  # fmt: skip


def __getattr__(name: str) -> Any:
    """Load a testing helper the first time it is asked for (:pep:`562`)."""
    for home, names in _ON_FIRST_USE.items():
        if name in names:
            value = getattr(importlib.import_module(home), name)
            globals()[name] = value
            return value
    raise AttributeError(f"module 'sevsim.api' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "CODE",
    "ERAS",
    "EVENTS",
    "GHCB",
    "GHCB_GPA",
    "GHCB_HV_FT_SUPPORTED",
    "GHCB_SAVE_AREA",
    "GHCB_SCRATCH_AREA_LIMIT",
    "IOIO_REP",
    "IOIO_STR",
    "IOIO_TYPE_IN",
    "KVM_PLUGINS",
    "REGISTER_FIELDS",
    "RESUME",
    "RUN_GUEST_TIMEOUT",
    "SHARED_BUFFER_END",
    "SHARED_BUFFER_START",
    "SIM_EVENTS",
    "SNP_ONLY_REQUESTS",
    "SVM_EXIT_SW",
    "TERMINATE",
    "ApResetHold",
    "ConfigError",
    "CpuidLeaf",
    "CpuidModel",
    "Delivered",
    "EventInj",
    "ExitContext",
    "ExitDriver",
    "ExitHandler",
    "ExitKind",
    "ExitToUser",
    "Fail",
    "Ghcb",
    "GhcbErr",
    "GhcbMsr",
    "GhcbResp",
    "GuestBus",
    "GuestRun",
    "Hlt",
    "InternalError",
    "InternalErrorSub",
    "IoioInfo",
    "KvmExit",
    "MappedGhcb",
    "Outcome",
    "PcRun",
    "PluginError",
    "Regs",
    "Resume",
    "RunFailed",
    "Scratch",
    "SevsimError",
    "Shutdown",
    "SimLog",
    "SvmExit",
    "SystemEvent",
    "SystemEventType",
    "VcpuView",
    "Vector",
    "VmInfo",
    "VmView",
    "VmgExit",
    "assemble",
    "bits",
    "cpuid_req",
    "exit_name",
    "ghcb_vmgexit",
    "hookimpl",
    "isolated_host",
    "msr",
    "nmi_complete",
    "run_guest",
    "run_pc_guest",
    "sev_info_resp",
    "sev_term",
    "term_reason",
    "term_req",
    "terminate",
    "valid_bit",
    "with_bits",
]
