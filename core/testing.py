"""sevsim's pytest plugin, for plugin authors and for sevsim's own tests.

Opt in from a test module or ``conftest.py``::

    pytest_plugins = ["sevsim.testing"]

Fixtures:

- ``plugin_host``: :func:`isolated_host`, a factory for a plugin host that sees only
  the plugins a test chooses (no ``sevsim.toml``, no environment, no autoload), with
  strict on, so that a test never picks up whatever else is installed and a broken
  plugin fails the test instead of being skipped.
- ``exit_driver``: :class:`ExitDriver`, which delivers one VMGEXIT or MSR-protocol
  request to the handlers of a table, with no guest CPU at all: GHCB contents in,
  GHCB contents and the KVM exit out.
- ``run_guest``: :func:`run_guest`, which assembles a 64-bit guest, launches it as an
  SEV-ES guest with the chosen plugins, runs it to its first exit to userspace (or
  through ``exits`` of them) and returns the exits with the trace of everything before
  them. A guest that never exits ends after ``timeout`` seconds (default
  :data:`RUN_GUEST_TIMEOUT`, 60) with a ``RunFailed("EINTR", ...)`` exit, so a test
  cannot hang.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pytest
from attrs import frozen

from sevsim.arch.exits import SvmExit
from sevsim.arch.ghcb import Ghcb
from sevsim.arch.vmcb import VMCB_CONTROL
from sevsim.errors import ConfigError
from sevsim.guest.asm import assemble
from sevsim.guest.image import CODE, GHCB_GPA, GuestImage
from sevsim.hw import Platform
from sevsim.hw.vc_model import VcModel
from sevsim.kvm import outcome as O
from sevsim.kvm.dispatch import ExitTable
from sevsim.kvm.events import EventSink, TeeSink
from sevsim.kvm.exits import (
    ApResetHold,
    FailEntry,
    InternalError,
    KvmExit,
    RunFailed,
    Shutdown,
    SystemEvent,
)
from sevsim.kvm.extensions import Extensions
from sevsim.kvm.vm import Kvm, Vm
from sevsim.plugin.config import isolated_config
from sevsim.plugin.host import PluginHost
from sevsim.trace import Trace
from sevsim.vmm.boot import launch_pc_image
from sevsim.vmm.launch import launch_image
from sevsim.vmm.machine import Devices
from sevsim.vmm.pc import PcConfig, PcMachine
from sevsim.vmm.runner import check_timeout
from sevsim.vmm.vmm import ClockMode, RunEnd, Vmm

#: :func:`run_guest`'s default time limit in seconds: far above what any test guest
#: needs, low enough that a guest stuck in a loop fails its test instead of hanging it.
RUN_GUEST_TIMEOUT = 60.0
#: What a run past the limit still gets (s): KVM_RUN enters once more and is
#: interrupted at once, so the limit ends the run with its ``RunFailed("EINTR")``.
_LAST_SLICE = 1e-6


#: The plugins that are KVM's own rows (the reused SVM intercepts, the GHCB
#: protocol's requests): every KVM has them, so an isolated host loads them too
#: unless told otherwise.
KVM_PLUGINS = ("svm_intercepts", "ghcb_protocol")


def isolated_host(
    plugins: Mapping[str, object] | None = None,
    *,
    enable: Iterable[str] = (),
    settings: Mapping[str, Mapping[str, Any]] | None = None,
    owners: Mapping[str | int, str] | None = None,
    strict: bool = True,
    kvm: bool = True,
) -> PluginHost:
    """A host with exactly ``plugins`` (name -> module or object) plus the installed
    entry-point plugins named in ``enable`` and, unless ``kvm`` is False, KVM's own
    rows (:data:`KVM_PLUGINS`).

    ``settings`` maps a plugin name to its ``[plugins.settings.<name>]`` table and
    ``owners`` is a ``[plugins.owners]`` table. Call ``.start()`` for what kvm needs
    (``Kvm().create_vm(handlers=host.start())``) and use ``.events`` as kvm's event sink.
    """
    enable = (*KVM_PLUGINS, *enable) if kvm else tuple(enable)
    config = isolated_config(enable=enable, settings=settings, owners=owners, strict=strict)
    return PluginHost(config, plugins=plugins or {})


@pytest.fixture
def plugin_host() -> Callable[..., PluginHost]:
    """:func:`isolated_host`: ``plugin_host({"mine": MyPlugin()}).start()``."""
    return isolated_host


@frozen
class Delivered:
    """What one delivered exit produced.

    ``exit`` is the KVM exit userspace would see (None when KVM resumed the guest);
    ``ghcb`` is the GHCB page as the guest finds it at its next VMRUN (for GHCB
    exits) and ``msr`` the GHCB MSR it reads back.
    """

    exit: KvmExit | None
    msr: int
    ghcb: Ghcb | None = None


class ExitDriver:
    """Plays the hardware for one exit at a time: no Unicorn, no guest code.

    It records a #VMEXIT in the vCPU's VMCB (for a VMGEXIT, the GHCB MSR value), lets
    kvm handle it exactly as after a real VMRUN, then does what the next VMRUN does
    before entering the guest (``prepare_switch_to_guest``: GHCB sync and write-back;
    ``inject_pending_events``: the plugins' events into EVENTINJ).
    """

    def __init__(self, table: ExitTable | Extensions, events: EventSink | None = None,
                 **vm_args: Any) -> None:  # fmt: skip
        self.vm = Kvm().create_vm(handlers=table, events=events, **vm_args)
        self.vm.add_ram(0, 0x200000)
        #: The standard machine's devices (UART, debug port, MMIO test device, ...).
        self.devices = Devices.standard()
        self.devices.attach(self.vm)
        self.vcpu = self.vm.create_vcpu()

    def _deliver(self, ghcb_msr: int, code: int = SvmExit.VMGEXIT, info1: int = 0,
                 info2: int = 0) -> KvmExit | None:  # fmt: skip
        vmcb = self.vcpu.vmcb
        VMCB_CONTROL.set(vmcb, "exit_code", code & 0xFFFF_FFFF)
        VMCB_CONTROL.set(vmcb, "exit_code_hi", code >> 32)
        VMCB_CONTROL.set(vmcb, "exit_info_1", info1)
        VMCB_CONTROL.set(vmcb, "exit_info_2", info2)
        VMCB_CONTROL.set(vmcb, "ghcb_gpa", ghcb_msr)
        result = self.vcpu.handle_exit()
        self.vcpu.prepare_switch_to_guest()
        self.vcpu.inject_pending_events()
        if isinstance(result, O.ExitToUser):
            return result.exit
        if isinstance(result, O.Fail):
            return RunFailed(result.errno, result.why, exit=result.exit)
        return None

    def msr_protocol(self, value: int) -> Delivered:
        """The guest wrote ``value`` to the GHCB MSR and executed VMGEXIT."""
        exit_ = self._deliver(value)
        return Delivered(exit_, VMCB_CONTROL.get(self.vcpu.vmcb, "ghcb_gpa"))

    def vmexit(self, code: int, info1: int = 0, info2: int = 0) -> Delivered:
        """An automatic #VMEXIT (a CR/EFER write trap, HLT, ...) with its exit info."""
        msr = VMCB_CONTROL.get(self.vcpu.vmcb, "ghcb_gpa")
        return Delivered(self._deliver(msr, code, info1, info2), msr)

    def vmgexit(self, ghcb: Ghcb | Mapping[str, int], ghcb_gpa: int = GHCB_GPA) -> Delivered:
        """The guest filled a GHCB at ``ghcb_gpa`` (fields set mark themselves valid)."""
        if not isinstance(ghcb, Ghcb):
            page = Ghcb()
            for name, value in ghcb.items():
                page[name] = value
            ghcb = page
        self.vm.memory.write(ghcb_gpa, ghcb.raw)
        exit_ = self._deliver(ghcb_gpa)
        after = Ghcb(self.vm.memory.read(ghcb_gpa, len(ghcb.raw)))
        return Delivered(exit_, VMCB_CONTROL.get(self.vcpu.vmcb, "ghcb_gpa"), after)


@pytest.fixture
def exit_driver() -> Callable[..., ExitDriver]:
    """``exit_driver(host.start())`` -> an :class:`ExitDriver` over that table."""
    return ExitDriver


class SimLog:
    """Records the simulator's view of a run (:mod:`sevsim.hw.sim`): what a test may
    check that no hypervisor could see, such as why a vCPU shut down."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def wants(self, name: str) -> bool:
        return True

    def emit(self, name: str, /, **fields: Any) -> None:
        self.events.append((name, fields))

    def why(self, vcpu: int = 0) -> str:
        """The simulator's account of ``vcpu``'s last exit that has one ("" if none)."""
        return next((f["why"] for name, f in reversed(self.events)
                     if name == "sim_exit" and f["vcpu"] == vcpu and f["why"]), "")  # fmt: skip


#: Exits a VMM does not resume from by running the vCPU again: the guest asked to end
#: or cannot go on, KVM_RUN failed (its time limit included), or only a SIPI can wake
#: the vCPU. :func:`run_guest` stops at the first of them.
FINAL_EXITS = (SystemEvent, Shutdown, FailEntry, InternalError, RunFailed, ApResetHold)


@frozen
class GuestRun:
    """A guest's exits to userspace, in order (``exit`` is the last), and the trace of
    everything before them; ``sim`` holds the simulator's own view of the run."""

    exit: KvmExit
    trace: Trace
    vm: Any
    devices: Devices
    sim: SimLog
    exits: tuple[KvmExit, ...] = ()


def run_guest(
    source: str,
    plugins: Mapping[str, object] | None = None,
    *,
    enable: Iterable[str] = (),
    settings: Mapping[str, Mapping[str, Any]] | None = None,
    owners: Mapping[str | int, str] | None = None,
    vc_model: VcModel | None = None,
    timeout: float = RUN_GUEST_TIMEOUT,
    exits: int = 1,
    vm_args: Mapping[str, Any] | None = None,
    **image_args: Any,
) -> GuestRun:
    """Assemble ``source`` at the image's code address, launch it with the standard
    devices, and run it to the first exit to userspace, or through ``exits`` of them.

    Past the first exit the vCPU runs again, as a VMM with nothing to add does (after
    a HLT the guest goes on with the next instruction), until ``exits`` exits were seen
    or one of :data:`FINAL_EXITS` ends the run early; ``GuestRun.exits`` holds them.
    ``timeout`` (seconds, a finite number > 0; default 60) bounds the whole run as
    ``sevsim run --timeout`` does: a guest still running then ends with
    ``RunFailed("EINTR", ...)`` as its exit (KVM_RUN interrupted), never a hang.
    ``vm_args`` go to KVM_CREATE_VM (``era``, ``ghcb_version``, ``cpuid``); the other
    keyword arguments describe the :class:`~sevsim.guest.image.GuestImage`.
    """
    timeout = check_timeout(timeout, "run_guest(timeout=...)")
    if isinstance(exits, bool) or not isinstance(exits, int) or exits < 1:
        raise ConfigError(f"run_guest(exits={exits!r}): expected a whole number of exits >= 1")
    host = isolated_host(plugins, enable=enable, settings=settings, owners=owners)
    trace = Trace()
    devices = Devices.standard()
    image = GuestImage(assemble(source, CODE), **image_args)
    sim = SimLog()
    kvm = Kvm(Platform(sim=TeeSink(host.sim, trace, sim)))
    vm = launch_image(kvm, image, handlers=host.start(), events=TeeSink(host.events, trace),
                      vc_model=vc_model, devices=devices, **(vm_args or {}))  # fmt: skip
    deadline = time.monotonic() + timeout
    seen: list[KvmExit] = []
    while True:
        left = max(deadline - time.monotonic(), _LAST_SLICE) if seen else timeout
        exit_ = vm.vcpus[0].run(left)
        trace.record_exit(0, exit_)
        seen.append(exit_)
        if len(seen) == exits or isinstance(exit_, FINAL_EXITS):
            return GuestRun(exit_, trace, vm, devices, sim, tuple(seen))


@frozen
class PcRun:
    """A guest the VMM's run loop ran on the ``pc`` machine, every vCPU, to its end."""

    end: RunEnd
    vmm: Vmm
    vm: Vm
    machine: PcMachine
    trace: Trace | None


def run_pc_guest(
    source: str,
    plugins: Mapping[str, object] | None = None,
    *,
    enable: Iterable[str] = (),
    vcpus: int = 1,
    ap_entry: int | None = None,
    memory: int = 32 << 20,
    clock: ClockMode = ClockMode.HOST,
    timeout: float | None = RUN_GUEST_TIMEOUT,
    max_exits: int | None = None,
    trace: Trace | None = None,
    **image_args: Any,
) -> PcRun:
    """Assemble ``source`` at the image's code address (the BSP's entry), launch it on
    a ``pc`` machine of ``vcpus`` vCPUs (the APs start at ``ap_entry``, in the image's
    data, and wait for INIT-SIPI-SIPI), and run every vCPU with the VMM's loop
    (:class:`~sevsim.vmm.vmm.Vmm`: interrupts, HLT waits, time slices) until the run
    ends. ``clock`` ICOUNT makes the run the same every time. The other keyword
    arguments describe the :class:`~sevsim.guest.image.GuestImage` (give it the native
    #VC handler's :func:`~sevsim.guest.vc_native.vc_image_args` for guests that #VC)."""
    host = isolated_host(plugins, enable=enable)
    image = GuestImage(assemble(source, CODE), **image_args)
    vm, machine = launch_pc_image(Kvm(), image, PcConfig(vcpus, memory), ap_entry=ap_entry,
                                  handlers=host.start(),
                                  events=host.events if trace is None else TeeSink(
                                      host.events, trace))  # fmt: skip
    vmm = Vmm(vm, machine, trace=trace, clock_mode=clock, timeout=timeout, max_exits=max_exits)
    return PcRun(vmm.run(), vmm, vm, machine, trace)


@pytest.fixture(name="run_guest")
def run_guest_fixture() -> Callable[..., GuestRun]:
    """:func:`run_guest`: ``run_guest("hlt", enable=["msr_protocol"]).exit``."""
    return run_guest
