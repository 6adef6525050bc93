"""hv_counter: a hypervisor-defined VMGEXIT, written as a third-party sevsim plugin.

The GHCB protocol's own VMGEXIT codes live at 0x8000_xxxx; exit codes from
``SVM_EXIT_SW`` (0xF000_0000, Linux's ``arch/x86/include/uapi/asm/svm.h``) up are
software-defined, free for a hypervisor to give its own meaning. This plugin claims
one of them, :data:`SEVSIM_VMGEXIT_HV_COUNTER` (0xF000_0001), and serves per-VM
monotonic counters through it: a guest can ask the host for sequence numbers that
never go backwards, for as long as the VM lives.

The call (a GHCB-page VMGEXIT; the four fields below must be marked valid, and
``sw_exit_info_1``/``sw_exit_info_2`` as for every VMGEXIT):

=================  =========================================================
``sw_exit_code``   0xF000_0001
``rax`` (in)       counter number, ``0 .. counters - 1``
``rbx`` (in)       increment, ``0 .. max_increment`` (0 just reads)
``rax`` (out)      the counter's new value
``rbx`` (out)      its value before the call (fetch-and-add)
=================  =========================================================

Replies, in ``sw_exit_info_1``/``sw_exit_info_2`` as for every VMGEXIT:

- ``0 / 0``: done, results in RAX and RBX;
- ``2 / GHCB_ERR_MISSING_INPUT (4)``: RAX or RBX not marked valid (kvm checks
  ``requires`` before the handler runs, as ``sev_es_validate_vmgexit`` does);
- ``2 / GHCB_ERR_INVALID_INPUT (5)``: no such counter, an increment above
  ``max_increment``, or one that would take the counter past 2**64 - 1 (a
  monotonic counter never wraps); RAX and RBX come back as the guest sent them;
- ``2 / GHCB_ERR_INVALID_EVENT (6)``: the plugin is not loaded (``-p no:hv_counter``):
  kvm has no handler for the code. A guest can probe for the service this way.

Settings (``[plugins.settings.hv_counter]`` in ``sevsim.toml``):

=================  =======  ==================================================
``counters``       4        how many counters each VM has (1..256)
``start``          0        the value every counter starts at (0..2**64 - 1)
``max_increment``  2**32-1  the largest increment one call may ask for (1..2**64 - 1)
=================  =======  ==================================================

Every value is checked at start-up; a bad one stops it with a
:class:`~sevsim.errors.ConfigError` naming the setting, the value and the range.

Counters belong to the VM: they are this plugin's per-VM state, which sevsim makes
for every VM (``sevsim_vm_state``) and drops with it. Two VMs never see each other's
counters, and all vCPUs of one VM share them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from functools import partial
from typing import Any

from attrs import frozen

from sevsim import hookimpl
from sevsim.arch.exits import GhcbErr
from sevsim.errors import ConfigError
from sevsim.kvm.context import ExitContext
from sevsim.kvm.dispatch import ExitHandler, ExitKind

__all__ = [
    "LIMITS",
    "NAME",
    "SEVSIM_VMGEXIT_HV_COUNTER",
    "SVM_EXIT_SW",
    "U64_MAX",
    "Settings",
    "handle",
    "sevsim_configure",
    "sevsim_exit_handlers",
    "sevsim_vm_state",
]

#: The plugin's name: the entry-point name in this distribution's pyproject.toml.
NAME = "hv_counter"
#: First software-defined exit code (Linux ``SVM_EXIT_SW``).
SVM_EXIT_SW = 0xF000_0000
#: The ``sw_exit_code`` this plugin owns.
SEVSIM_VMGEXIT_HV_COUNTER = SVM_EXIT_SW + 1

U64_MAX = (1 << 64) - 1


@frozen
class Settings:
    """The validated ``[plugins.settings.hv_counter]`` table."""

    counters: int = 4
    start: int = 0
    max_increment: int = 0xFFFF_FFFF


#: Setting -> inclusive range of allowed values.
LIMITS: dict[str, tuple[int, int]] = {
    "counters": (1, 256),
    "start": (0, U64_MAX),
    "max_increment": (1, U64_MAX),
}


@hookimpl
def sevsim_configure(settings: Mapping[str, Any]) -> Settings:
    """Check the settings table; the result becomes ``config`` below."""
    unknown = sorted(set(settings) - set(LIMITS))
    if unknown:
        raise ConfigError(f"{NAME}: unknown setting(s) {unknown}; expected {', '.join(LIMITS)}")
    values: dict[str, int] = {}
    for name, (low, high) in LIMITS.items():
        value = settings.get(name, getattr(Settings(), name))
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            span = f"{low}..{high:#x}" if high > 0xFFFF else f"{low}..{high}"
            raise ConfigError(f"{NAME}: {name} = {value!r}; expected an integer in {span}")
        values[name] = value
    return Settings(**values)


@hookimpl
def sevsim_vm_state(config: Settings) -> list[int]:
    """A new VM's counters, all at ``start``."""
    return [config.start] * config.counters


def handle(config: Settings, ctx: ExitContext) -> None:
    """SEVSIM_VMGEXIT_HV_COUNTER: counter[RAX] += RBX; RAX = new, RBX = old.

    kvm has already checked that RAX and RBX are valid (``requires``) and pre-set the
    success reply (0/0); only the request itself is checked here. Returning None
    resumes the guest, which finds RAX..RDX in the GHCB.
    """
    counters: list[int] = ctx.vm.state
    index, increment = ctx.regs["rax"], ctx.regs["rbx"]
    if index >= len(counters):
        ctx.notes[NAME] = f"no counter {index} (this VM has {len(counters)})"
        ctx.bad_input(GhcbErr.INVALID_INPUT)
        return
    if increment > config.max_increment:
        ctx.notes[NAME] = f"increment {increment:#x} above max_increment {config.max_increment:#x}"
        ctx.bad_input(GhcbErr.INVALID_INPUT)
        return
    old = counters[index]
    new = old + increment
    if new > U64_MAX:
        ctx.notes[NAME] = f"counter {index} at {old:#x} cannot grow by {increment:#x}"
        ctx.bad_input(GhcbErr.INVALID_INPUT)
        return
    counters[index] = new
    ctx.regs["rax"], ctx.regs["rbx"] = new, old
    ctx.notes[NAME] = f"counter {index}: {old} + {increment} -> {new}"
    ctx.success()


@hookimpl
def sevsim_exit_handlers(config: Settings) -> Iterator[ExitHandler]:
    """Claim the exit code; RAX (counter) and RBX (increment) must be valid."""
    yield ExitHandler(
        ExitKind.VMGEXIT, SEVSIM_VMGEXIT_HV_COUNTER, partial(handle, config),
        requires=("rax", "rbx"), name="SEVSIM_VMGEXIT_HV_COUNTER",
    )
