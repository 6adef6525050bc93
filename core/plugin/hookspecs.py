"""Every hook a sevsim plugin can implement, in one module, each with a working example.

Plugins mark their implementations with :data:`hookimpl`; pluggy matches them to the
specs here by name (``sevsim_*``) and refuses an implementation whose arguments are not
among the spec's. An implementation may take any subset of the arguments.

There are three kinds of hook:

- ``sevsim_configure`` and ``sevsim_exit_handlers`` are called by the plugin host
  once per plugin, each plugin on its own, at start-up: a plugin gets only its own
  settings table, and the host knows which plugin yielded which record, so it can
  stamp the record with the owner's name and name both owners of a conflict.
- ``sevsim_exit_handlers`` is the ownership hook. Exit handling is not a pluggy
  fan-out: the host builds one dispatch table from the yielded records, and a
  VMGEXIT is a dict lookup.
- The observer hooks (``sevsim_vm_created`` ... ``sevsim_vmexit``) are 1:N and only
  for watching (tracing, metrics). There is one per event in
  :data:`sevsim.kvm.events.EVENTS`, named ``sevsim_<event>``, with the event's fields
  as arguments; kvm does not even build an event that no plugin implements.

The examples use :func:`sevsim.testing.isolated_host`, the host plugin authors test
with; ``tests/test_hookspecs.py`` runs every example.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from sevsim.kvm.dispatch import ExitHandler

PROJECT = "sevsim"

#: Marks a hook specification in this module.
hookspec = pluggy.HookspecMarker(PROJECT)
#: Marks a plugin's hook implementation: ``@hookimpl def sevsim_...``.
hookimpl = pluggy.HookimplMarker(PROJECT)


# --- start-up: settings and ownership -------------------------------------------------


@hookspec
def sevsim_configure(settings: Mapping[str, Any]) -> object | None:
    """Receive this plugin's settings table; return the configuration to run with.

    ``settings`` is ``[plugins.settings.<this plugin>]`` from ``sevsim.toml`` (a
    read-only mapping, empty when the table is absent); no plugin sees another's.
    Validate it here and raise :class:`sevsim.errors.ConfigError` naming the bad value
    and what was expected: the host reports it with the table's origin and stops
    start-up. Whatever is returned (``None`` means "the table as it is") is handed to
    this plugin's :func:`sevsim_exit_handlers` as ``config``. Returning it, instead of
    storing it on the plugin, keeps one plugin module usable by several hosts at once.

    Example::

        >>> from sevsim.errors import ConfigError
        >>> from sevsim.plugin.hookspecs import hookimpl
        >>> from sevsim.testing import isolated_host
        >>> seen = []
        >>> class Versions:
        ...     @hookimpl
        ...     def sevsim_configure(self, settings):
        ...         unknown = set(settings) - {"max_version"}
        ...         if unknown:
        ...             raise ConfigError(f"unknown {sorted(unknown)}")
        ...         return {"max_version": settings.get("max_version", 2)}
        ...     @hookimpl
        ...     def sevsim_exit_handlers(self, config):
        ...         seen.append(config["max_version"])
        ...         return []
        >>> table = isolated_host(
        ...     {"versions": Versions()}, settings={"versions": {"max_version": 1}}
        ... ).start()
        >>> seen
        [1]
        >>> isolated_host(
        ...     {"versions": Versions()}, settings={"versions": {"max_vers": 1}}
        ... ).start()  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        sevsim.errors.PluginError: ... plugin 'versions' rejected its settings: unknown ['max_vers']
    """


@hookspec
def sevsim_exit_handlers(config: Any) -> Iterable[ExitHandler]:
    """Yield (or return) the :class:`~sevsim.kvm.dispatch.ExitHandler` records this plugin owns.

    Each record claims one ``(kind, code)``: a VMGEXIT ``sw_exit_code``, a GHCB MSR
    protocol GHCBInfo, or an automatic #VMEXIT code; ``requires`` names the GHCB fields
    kvm must find valid before calling the handler. ``config`` is what this plugin's
    :func:`sevsim_configure` returned (or its settings table). The host stamps every
    record with this plugin's name and puts it in the one dispatch table built at
    start-up; two plugins claiming one code stop start-up with an error naming both
    (settle it with ``-p no:NAME`` or ``[plugins.owners]``).

    Example::

        >>> from sevsim.kvm.dispatch import ExitHandler, ExitKind
        >>> from sevsim.kvm.outcome import RESUME
        >>> from sevsim.plugin.hookspecs import hookimpl
        >>> from sevsim.testing import isolated_host
        >>> HELLO = 0xF000_0F00  # SVM_EXIT_SW and up: codes a hypervisor defines
        >>> def hello(ctx):
        ...     ctx.regs["rax"] = 0x48454C4C4F  # "HELLO", back to the guest in RAX
        ...     return RESUME
        >>> class Hello:
        ...     @hookimpl
        ...     def sevsim_exit_handlers(self, config):
        ...         yield ExitHandler(ExitKind.VMGEXIT, HELLO, hello, requires=("rax",))
        >>> table = isolated_host({"hello": Hello()}).start()
        >>> entry = table.lookup(ExitKind.VMGEXIT, HELLO)
        >>> entry.plugin, entry.requires, entry.handler is hello
        ('hello', ('rax',), True)
    """


# --- a plugin's own state, and its part in a vCPU's life --------------------------------
#
# kvm calls these for each plugin on its own, like sevsim_exit_handlers: a plugin only
# ever sees its own state (``vcpu.state``, ``vm.state``, ``ctx.vcpu.state``).


@hookspec
def sevsim_vm_state(config: Any) -> object:
    """A fresh per-VM state object for this plugin, made when a VM is created; handlers
    find it as ``ctx.vm.state``. ``config`` is what :func:`sevsim_configure` returned.

    Example::

        >>> from sevsim.kvm.dispatch import ExitHandler, ExitKind
        >>> from sevsim.plugin.hookspecs import hookimpl
        >>> from sevsim.testing import ExitDriver, isolated_host
        >>> class Tally:
        ...     @hookimpl
        ...     def sevsim_vm_state(self):
        ...         return {"calls": 0}
        ...     @hookimpl
        ...     def sevsim_exit_handlers(self):
        ...         def count(ctx):
        ...             ctx.vm.state["calls"] += 1
        ...             ctx.regs["rax"] = ctx.vm.state["calls"]
        ...         yield ExitHandler(ExitKind.VMGEXIT, 0xF000_0002, count, name="TALLY")
        >>> driver = ExitDriver(isolated_host({"tally": Tally()}).start())
        >>> for _ in range(3):
        ...     out = driver.vmgexit({"sw_exit_code": 0xF000_0002, "sw_exit_info_1": 0,
        ...                           "sw_exit_info_2": 0})
        >>> out.ghcb["rax"]
        3
    """


@hookspec
def sevsim_vcpu_state(config: Any) -> object:
    """A fresh per-vCPU state object for this plugin, made when a vCPU is created;
    handlers find it as ``ctx.vcpu.state``, lifecycle hooks as ``vcpu.state``.

    Example::

        >>> from sevsim.plugin.hookspecs import hookimpl
        >>> from sevsim.testing import ExitDriver, isolated_host
        >>> class Budget:
        ...     @hookimpl
        ...     def sevsim_vcpu_state(self, config):
        ...         return {"left": config.get("budget", 10)}
        >>> host = isolated_host({"budget": Budget()}, settings={"budget": {"budget": 3}})
        >>> driver = ExitDriver(host.start())
        >>> driver.vcpu.plugin_states["budget"]
        {'left': 3}
    """


@hookspec
def sevsim_vcpu_reset(vcpu: Any) -> None:
    """The VMM set this vCPU's registers before launch (``kvm_vcpu_reset``): all KVM
    will ever know of them is in ``vcpu.initial_state``.

    Example::

        >>> from sevsim.plugin.hookspecs import hookimpl
        >>> from sevsim.testing import ExitDriver, isolated_host
        >>> class Cr0:
        ...     @hookimpl
        ...     def sevsim_vcpu_state(self):
        ...         return {}
        ...     @hookimpl
        ...     def sevsim_vcpu_reset(self, vcpu):
        ...         vcpu.state["cr0"] = vcpu.initial_state.get("cr0", 0)
        >>> driver = ExitDriver(isolated_host({"cr0": Cr0()}).start())
        >>> driver.vcpu.set_state({"cr0": 0x80050033})
        >>> hex(driver.vcpu.plugin_states["cr0"]["cr0"])
        '0x80050033'
    """


@hookspec
def sevsim_vcpu_sipi(vcpu: Any, vector: int) -> None:
    """The VMM's local APIC delivered a SIPI (``sev_vcpu_deliver_sipi_vector``): the
    vCPU is runnable again; ``vector`` is what the SIPI carried.

    Example::

        >>> from sevsim.plugin.hookspecs import hookimpl
        >>> from sevsim.testing import ExitDriver, isolated_host
        >>> class Sipis:
        ...     @hookimpl
        ...     def sevsim_vcpu_sipi(self, vcpu, vector):
        ...         print(f"vcpu{vcpu.id} SIPI {vector:#x}")
        >>> driver = ExitDriver(isolated_host({"sipis": Sipis()}).start())
        >>> driver.vcpu.deliver_sipi(0x9F)
        vcpu0 SIPI 0x9f
    """


@hookspec
def sevsim_vcpu_nmi(vcpu: Any) -> bool:
    """The VMM asked for an NMI (KVM_NMI). Return True when taken; with nobody taking
    it, ``Vcpu.nmi()`` fails.

    Example::

        >>> from sevsim.plugin.hookspecs import hookimpl
        >>> from sevsim.testing import ExitDriver, isolated_host
        >>> class Nmis:
        ...     @hookimpl
        ...     def sevsim_vcpu_state(self):
        ...         return []
        ...     @hookimpl
        ...     def sevsim_vcpu_nmi(self, vcpu):
        ...         vcpu.state.append("nmi")
        ...         return True
        >>> driver = ExitDriver(isolated_host({"nmis": Nmis()}).start())
        >>> driver.vcpu.nmi()
        >>> driver.vcpu.plugin_states["nmis"]
        ['nmi']
    """


@hookspec
def sevsim_vcpu_events(vcpu: Any) -> bool:
    """Just before each VMRUN (``inject_pending_event``): inject what waits, with
    ``vcpu.queue_event``. Return True when an event still waits (EVENTINJ was taken):
    the vCPU then exits right after entry, to inject it at the next one.

    Example::

        >>> from sevsim.plugin.hookspecs import hookimpl
        >>> from sevsim.testing import ExitDriver, isolated_host
        >>> class Entries:
        ...     @hookimpl
        ...     def sevsim_vcpu_state(self):
        ...         return {"entries": 0}
        ...     @hookimpl
        ...     def sevsim_vcpu_events(self, vcpu):
        ...         vcpu.state["entries"] += 1
        ...         return False
        >>> driver = ExitDriver(isolated_host({"entries": Entries()}).start())
        >>> _ = driver.vmexit(0x90, info1=0x11)  # an exit, then the next entry
        >>> driver.vcpu.plugin_states["entries"]
        {'entries': 1}
    """


@hookspec
def sevsim_vcpu_wakeup(vcpu: Any) -> bool:
    """May a vCPU parked in AP reset hold run again (``kvm_vcpu_has_events``)? True when
    this plugin has an event for it (an NMI).

    Example::

        >>> from sevsim.plugin.hookspecs import hookimpl
        >>> from sevsim.testing import ExitDriver, isolated_host
        >>> class Doorbell:
        ...     @hookimpl
        ...     def sevsim_vcpu_state(self):
        ...         return {"rung": True}
        ...     @hookimpl
        ...     def sevsim_vcpu_wakeup(self, vcpu):
        ...         return vcpu.state["rung"]
        >>> driver = ExitDriver(isolated_host({"doorbell": Doorbell()}).start())
        >>> driver.vcpu.wakeup_pending()
        True
    """


# --- observers: one per sevsim.kvm.events.EVENTS entry ---------------------------------


@hookspec
def sevsim_vm_created(vm: Any) -> None:
    """A VM was created (KVM_CREATE_VM): ``vm`` is the VM object kvm made.

    Example::

        >>> from sevsim.plugin.hookspecs import hookimpl
        >>> from sevsim.testing import isolated_host
        >>> class Census:
        ...     @hookimpl
        ...     def sevsim_vm_created(self, vm):
        ...         print("created", vm)
        >>> host = isolated_host({"census": Census()})
        >>> host.events.wants("vm_created")
        True
        >>> host.events.emit("vm_created", vm="vm0")
        created vm0
    """


@hookspec
def sevsim_vm_destroyed(vm: Any, why: str) -> None:
    """A VM ended; ``why`` says how (shutdown, termination request and its reason, ...).

    Example::

        >>> from sevsim.plugin.hookspecs import hookimpl
        >>> from sevsim.testing import isolated_host
        >>> class Obituary:
        ...     @hookimpl
        ...     def sevsim_vm_destroyed(self, vm, why):
        ...         print(f"{vm} ended: {why}")
        >>> host = isolated_host({"obituary": Obituary()})
        >>> host.events.emit("vm_destroyed", vm="vm0", why="guest asked to terminate")
        vm0 ended: guest asked to terminate
    """


@hookspec
def sevsim_launch_command(vm: Any, command: str, status: str, detail: str) -> None:
    """A SEV firmware launch command ran: ``command`` (e.g. ``LAUNCH_UPDATE_VMSA``),
    the firmware ``status`` name (``SUCCESS``, ``INVALID_GUEST_STATE``, ...) and a
    human ``detail``.

    Example::

        >>> from sevsim.plugin.hookspecs import hookimpl
        >>> from sevsim.testing import isolated_host
        >>> class Launches:
        ...     @hookimpl
        ...     def sevsim_launch_command(self, vm, command, status, detail):
        ...         print(command, status, detail)
        >>> host = isolated_host({"launches": Launches()})
        >>> host.events.emit(
        ...     "launch_command", vm="vm0", command="LAUNCH_START", status="SUCCESS",
        ...     detail="policy 0x5",
        ... )
        LAUNCH_START SUCCESS policy 0x5
    """


@hookspec
def sevsim_vmgexit_enter(vcpu_id: int, exit_reason: int, info1: int, info2: int) -> None:
    """A VMGEXIT with a GHCB page, before handling (KVM's ``kvm_vmgexit_enter``):
    ``exit_reason`` is the GHCB's ``sw_exit_code``, ``info1``/``info2`` its
    ``sw_exit_info_1``/``sw_exit_info_2`` as the guest wrote them.

    Example::

        >>> from sevsim.arch.exits import exit_name
        >>> from sevsim.plugin.hookspecs import hookimpl
        >>> from sevsim.testing import isolated_host
        >>> class Tracer:
        ...     @hookimpl
        ...     def sevsim_vmgexit_enter(self, vcpu_id, exit_reason, info1, info2):
        ...         print(f"vcpu{vcpu_id} {exit_name(exit_reason)} {info1:#x} {info2:#x}")
        >>> host = isolated_host({"tracer": Tracer()})
        >>> host.events.emit("vmgexit_enter", vcpu_id=0, exit_reason=0x7B, info1=0x3F80210, info2=0)
        vcpu0 SVM_EXIT_IOIO 0x3f80210 0x0
    """


@hookspec
def sevsim_vmgexit_exit(vcpu_id: int, exit_reason: int, info1: int, info2: int) -> None:
    """A VMGEXIT was handled (KVM's ``kvm_vmgexit_exit``): ``info1``/``info2`` are
    the ``sw_exit_info_1``/``sw_exit_info_2`` the guest will read back (0/0 for
    success, 2 and a ``GHCB_ERR_*`` for malformed input).

    Example::

        >>> from sevsim.plugin.hookspecs import hookimpl
        >>> from sevsim.testing import isolated_host
        >>> class Errors:
        ...     @hookimpl
        ...     def sevsim_vmgexit_exit(self, vcpu_id, exit_reason, info1, info2):
        ...         if info1 == 2:
        ...             print(f"vcpu{vcpu_id} {exit_reason:#x} refused, GHCB_ERR {info2}")
        >>> host = isolated_host({"errors": Errors()})
        >>> host.events.emit("vmgexit_exit", vcpu_id=1, exit_reason=0x7B, info1=2, info2=4)
        vcpu1 0x7b refused, GHCB_ERR 4
    """


@hookspec
def sevsim_msr_protocol_enter(vcpu_id: int, ghcb_gpa: int) -> None:
    """A GHCB MSR protocol request, before handling (KVM's ``kvm_vmgexit_msr_protocol_enter``):
    ``ghcb_gpa`` is the whole GHCB MSR value (GHCBInfo in bits 11:0).

    Example::

        >>> from sevsim.arch.ghcb_msr import GhcbMsr, info
        >>> from sevsim.plugin.hookspecs import hookimpl
        >>> from sevsim.testing import isolated_host
        >>> class Requests:
        ...     @hookimpl
        ...     def sevsim_msr_protocol_enter(self, vcpu_id, ghcb_gpa):
        ...         print(f"vcpu{vcpu_id} {GhcbMsr(info(ghcb_gpa)).linux_name}")
        >>> host = isolated_host({"requests": Requests()})
        >>> host.events.emit("msr_protocol_enter", vcpu_id=0, ghcb_gpa=0x002)
        vcpu0 GHCB_MSR_SEV_INFO_REQ
    """


@hookspec
def sevsim_msr_protocol_exit(vcpu_id: int, ghcb_gpa: int, result: Any) -> None:
    """A GHCB MSR protocol request was handled (KVM's ``kvm_vmgexit_msr_protocol_exit``):
    ``ghcb_gpa`` is the GHCB MSR value the guest reads back (the response) and
    ``result`` what handling produced (the handler's outcome).

    Example::

        >>> from sevsim.arch.ghcb_msr import bits
        >>> from sevsim.plugin.hookspecs import hookimpl
        >>> from sevsim.testing import isolated_host
        >>> class Versions:
        ...     @hookimpl
        ...     def sevsim_msr_protocol_exit(self, vcpu_id, ghcb_gpa):
        ...         print("max", bits(ghcb_gpa, 63, 48), "min", bits(ghcb_gpa, 47, 32))
        >>> host = isolated_host({"versions": Versions()})
        >>> host.events.emit(
        ...     "msr_protocol_exit", vcpu_id=0, ghcb_gpa=0x0002_0001_3300_0001, result=1
        ... )
        max 2 min 1
    """


@hookspec
def sevsim_vmexit(vcpu_id: int, exit_code: int, info1: int, info2: int) -> None:
    """An automatic #VMEXIT (not a VMGEXIT): ``exit_code`` with ``exit_info_1/2`` from
    the VMCB control area, e.g. ``SVM_EXIT_CR0_WRITE_TRAP`` carrying the new CR0.

    Example::

        >>> from sevsim.plugin.hookspecs import hookimpl
        >>> from sevsim.testing import isolated_host
        >>> class Cr0Watch:
        ...     @hookimpl
        ...     def sevsim_vmexit(self, exit_code, info1):
        ...         if exit_code == 0x90:
        ...             print(f"CR0 <- {info1:#x}")
        >>> host = isolated_host({"cr0watch": Cr0Watch()})
        >>> host.events.emit("vmexit", vcpu_id=0, exit_code=0x90, info1=0x80050033, info2=0)
        CR0 <- 0x80050033
    """


@hookspec
def sevsim_exit_handled(
    vcpu_id: int, kind: str, code: int, plugin: str, notes: dict[str, Any]
) -> None:
    """A handler from the dispatch table returned a valid outcome (a handler that
    failed ends the VM instead: :func:`sevsim_plugin_failed`): ``kind`` is the
    :class:`~sevsim.kvm.dispatch.ExitKind` value (``"vmgexit"``, ``"msr_protocol"``,
    ``"vmexit"``), ``plugin`` the owner of the row, and ``notes`` what the handler put
    in ``ctx.notes`` to explain itself (the trace prints them).

    Example::

        >>> from collections import Counter
        >>> from sevsim.plugin.hookspecs import hookimpl
        >>> from sevsim.testing import isolated_host
        >>> class PerPlugin:
        ...     def __init__(self):
        ...         self.handled = Counter()
        ...     @hookimpl
        ...     def sevsim_exit_handled(self, plugin, notes):
        ...         self.handled[plugin] += 1
        ...         for key, text in notes.items():
        ...             print(f"{plugin}: {key}: {text}")
        >>> watcher = PerPlugin()
        >>> host = isolated_host({"perplugin": watcher})
        >>> host.events.emit("exit_handled", vcpu_id=0, kind="vmgexit", code=0x7B,
        ...                  plugin="ioio", notes={"ioio": "out 1 byte to port 0x3f8"})
        ioio: ioio: out 1 byte to port 0x3f8
        >>> watcher.handled
        Counter({'ioio': 1})
    """


@hookspec
def sevsim_plugin_failed(
    vcpu_id: int, plugin: str, kind: str, code: int, error: str | None, message: str
) -> None:
    """A plugin's exit handler failed while handling the exit ``kind``/``code`` (as in
    :func:`sevsim_exit_handled`): it raised (``error`` is the exception's type name,
    ``message`` its text), or broke its contract (``error`` is None and ``message`` says
    how: a return value that is not an outcome, a scratch area resized). The host does
    not crash: KVM_RUN fails with -EIO naming ``plugin``, and only that VM ends.

    Example::

        >>> from sevsim.kvm.dispatch import ExitHandler, ExitKind
        >>> from sevsim.plugin.hookspecs import hookimpl
        >>> from sevsim.testing import ExitDriver, isolated_host
        >>> class Broken:
        ...     @hookimpl
        ...     def sevsim_exit_handlers(self):
        ...         def handler(ctx):
        ...             raise KeyError("rax")
        ...         yield ExitHandler(ExitKind.VMGEXIT, 0xF000_0001, handler)
        >>> class Pager:
        ...     @hookimpl
        ...     def sevsim_plugin_failed(self, plugin, code, error, message):
        ...         print(f"{plugin} failed on {code:#x}: {error}: {message}")
        >>> host = isolated_host({"broken": Broken(), "pager": Pager()})
        >>> driver = ExitDriver(host.start(), events=host.events)
        >>> out = driver.vmgexit({"sw_exit_code": 0xF000_0001, "sw_exit_info_1": 0,
        ...                       "sw_exit_info_2": 0})
        broken failed on 0xf0000001: KeyError: 'rax'
        >>> out.exit.errno, out.exit.plugin
        ('EIO', 'broken')
    """


@hookspec
def sevsim_interrupt_injected(vcpu_id: int, vector: int, how: str) -> None:
    """kvm injected external interrupt ``vector`` (the VMM's KVM_INTERRUPT) into a vCPU
    for its next VMRUN (KVM's ``kvm_inj_virq``); ``how`` is the mechanism, ``"event_inj"``
    (EVENTINJ, as ``svm_inject_irq`` writes it).

    Example::

        >>> from sevsim.plugin.hookspecs import hookimpl
        >>> from sevsim.testing import ExitDriver, isolated_host
        >>> class Irqs:
        ...     @hookimpl
        ...     def sevsim_interrupt_injected(self, vcpu_id, vector, how):
        ...         print(f"vcpu{vcpu_id} vector {vector:#x} by {how}")
        >>> host = isolated_host({"irqs": Irqs()})
        >>> driver = ExitDriver(host.start(), events=host.events)
        >>> driver.vcpu.interrupt(0x30)  # KVM_INTERRUPT: injected at the next entry
        >>> _ = driver.vmexit(0x78)  # an exit (HLT), then that entry
        vcpu0 vector 0x30 by event_inj
    """


@hookspec
def sevsim_nmi_injected(vcpu_id: int, how: str) -> None:
    """An NMI went into a vCPU for its next VMRUN (``svm_inject_nmi``, through the
    ``nmi`` plugin, once NMIs are unmasked); ``how`` as in
    :func:`sevsim_interrupt_injected`.

    Example::

        >>> from sevsim.plugin.hookspecs import hookimpl
        >>> from sevsim.testing import ExitDriver, isolated_host
        >>> class Nmis:
        ...     @hookimpl
        ...     def sevsim_nmi_injected(self, vcpu_id, how):
        ...         print(f"NMI into vcpu{vcpu_id} by {how}")
        >>> host = isolated_host({"nmis": Nmis()}, enable=["nmi"])
        >>> driver = ExitDriver(host.start(), events=host.events)
        >>> driver.vcpu.nmi()  # KVM_NMI
        >>> _ = driver.vmexit(0x78)
        NMI into vcpu0 by event_inj
    """


@hookspec
def sevsim_init_delivered(vcpu_id: int) -> None:
    """An INIT reached a vCPU (from the VMM's local APIC): it now waits for a SIPI
    (KVM_MP_STATE_INIT_RECEIVED). A vCPU that shut down ignores INIT and is not reported.

    Example::

        >>> from sevsim.plugin.hookspecs import hookimpl
        >>> from sevsim.testing import ExitDriver, isolated_host
        >>> class Inits:
        ...     @hookimpl
        ...     def sevsim_init_delivered(self, vcpu_id):
        ...         print(f"INIT vcpu{vcpu_id}")
        >>> host = isolated_host({"inits": Inits()})
        >>> driver = ExitDriver(host.start(), events=host.events)
        >>> driver.vcpu.init()
        INIT vcpu0
        >>> driver.vcpu.mp_state.name
        'INIT_RECEIVED'
    """


@hookspec
def sevsim_sipi_delivered(vcpu_id: int, vector: int, start: int) -> None:
    """A SIPI reached a vCPU waiting for one (``sev_vcpu_deliver_sipi_vector``):
    ``vector`` is what it carried and ``start`` the real-mode address that names
    (``vector << 12``), which an SEV-ES AP does not use: it goes on from its VMSA or
    reads its AP jump table.

    Example::

        >>> from sevsim.plugin.hookspecs import hookimpl
        >>> from sevsim.testing import ExitDriver, isolated_host
        >>> class Sipis:
        ...     @hookimpl
        ...     def sevsim_sipi_delivered(self, vcpu_id, vector, start):
        ...         print(f"SIPI vcpu{vcpu_id} vector {vector:#x} start {start:#x}")
        >>> host = isolated_host({"sipis": Sipis()})
        >>> driver = ExitDriver(host.start(), events=host.events)
        >>> driver.vcpu.deliver_sipi(0x9F)
        SIPI vcpu0 vector 0x9f start 0x9f000
    """


@hookspec
def sevsim_device_access(
    vcpu_id: int, device: str, bus: str, address: int, size: int, direction: str, value: int
) -> None:
    """A device of the VMM served an access (QEMU's ``memory_region_ops_read/write``):
    ``bus`` is ``"io"`` (``address`` a port) or ``"mmio"`` (a guest-physical address),
    ``direction`` ``"read"`` or ``"write"``, ``value`` the ``size`` bytes moved, as a
    little-endian number. The VMM reports it, since only it knows the ``device``;
    ``vcpu_id`` is the vCPU whose exit made the access.

    Example::

        >>> from sevsim.plugin.hookspecs import hookimpl
        >>> from sevsim.testing import ExitDriver, isolated_host
        >>> class Ports:
        ...     @hookimpl
        ...     def sevsim_device_access(self, device, address, direction, value):
        ...         print(f"{device} {direction} {address:#x} {value:#x}")
        >>> host = isolated_host({"ports": Ports()}, enable=["ioio"])
        >>> driver = ExitDriver(host.start(), events=host.events)
        >>> out_al_to_0x80 = 0x80 << 16 | 0x10  # IOIO exit info: port 31:16, 1 byte, OUT
        >>> _ = driver.vmgexit({"sw_exit_code": 0x7B, "sw_exit_info_1": out_al_to_0x80,
        ...                     "sw_exit_info_2": 0, "rax": 0x42})
        post write 0x80 0x42
    """


# --- the simulator's view: one per sevsim.hw.sim.SIM_EVENTS entry ---------------------
#
# What only a simulator can see (the guest's RIP and instructions). Exit handlers
# never receive these; ``sevsim plugins`` lists the plugins that implement them, and
# ``sevsim run --hypervisor-view`` leaves them out of the trace.


@hookspec
def sevsim_sim_vc(vm: str, vcpu: int, exit_code: int, rip: int, insn: bytes, bits: int) -> None:
    """The hardware raised #VC in the guest: ``exit_code`` is the #VC error code (the
    exit code the instruction would have caused), ``rip`` and ``insn`` (its bytes, to
    decode in ``bits``-bit mode) the guest instruction.

    Example::

        >>> from collections import Counter
        >>> from sevsim.plugin.hookspecs import hookimpl
        >>> from sevsim.testing import isolated_host
        >>> class VcCount:
        ...     def __init__(self):
        ...         self.by_code = Counter()
        ...     @hookimpl
        ...     def sevsim_sim_vc(self, exit_code):
        ...         self.by_code[exit_code] += 1
        >>> counter = VcCount()
        >>> host = isolated_host({"vccount": counter})
        >>> for rip in (0x1000, 0x1004):
        ...     host.sim.emit("sim_vc", vm="vm", vcpu=0, exit_code=0x72, rip=rip,
        ...                   insn=b"\\x0f\\xa2", bits=64)
        >>> counter.by_code
        Counter({114: 2})
    """


@hookspec
def sevsim_sim_exit(
    vm: str, vcpu: int, exit_code: int, rip: int | None, insn: bytes, bits: int, why: str
) -> None:
    """A #VMEXIT, seen from the silicon: the guest instruction behind it (``rip``,
    ``insn``) and, where the simulator knows more than the hypervisor, ``why`` (a
    triple fault, a VMSA that failed its integrity check).

    Example::

        >>> from sevsim.plugin.hookspecs import hookimpl
        >>> from sevsim.testing import isolated_host
        >>> class Shutdowns:
        ...     @hookimpl
        ...     def sevsim_sim_exit(self, exit_code, why):
        ...         if exit_code == 0x7F:
        ...             print("shutdown:", why)
        >>> host = isolated_host({"shutdowns": Shutdowns()})
        >>> host.sim.emit("sim_exit", vm="vm", vcpu=0, exit_code=0x7F, rip=0x1000, insn=b"",
        ...               bits=64, why="triple fault delivering #14")
        shutdown: triple fault delivering #14
    """
