"""The trust boundary, walked: nothing a plugin receives leads to the guest's secrets.

A real guest plants a random 16-byte secret in registers (R12, R13 and XMM5) and in
a private page, then makes a VMGEXIT that a spy plugin owns. At that exit the spy
walks everything reachable from its :class:`~sevsim.kvm.context.ExitContext`, and
an observer walks every argument of every hook it receives (the observer hooks
``sevsim_vm_created`` ... ``sevsim_exit_handled`` and the lifecycle hooks that get a
vCPU view). The walk must find no memory-encryption key, no part of the secret, no
VMSA plaintext the hypervisor did not write itself, no CPU model or Unicorn handle,
no hardware internal, no way to install a #VC handler model, and none of the
hypervisor's own objects (``Kvm``, ``Vm``, ``Vcpu``, the ``Platform``, the VMM's
devices, the plugin host): a plugin gets views of them, or it could run vCPUs,
create VMs or reach every other plugin's state.

What the walker follows from each object, to :data:`DEPTH` steps:

- instance attributes: ``__dict__``, every ``__slots__`` entry along the MRO (private
  ones too: Python has no privacy, so ``ctx._memory`` is as reachable as ``ctx.regs``)
  and attrs fields;
- properties of the object's class;
- mapping keys and values, and the items of lists, tuples and sets;
- what callables hold: a bound method's ``__self__`` and ``__func__``, a partial's
  function and arguments, a function's closure cells and defaults, the function a
  decorator wrapped (``__wrapped__``); never ``__globals__``: module globals are
  reachable by ``import`` anyway, which tests/test_import_layers.py checks, and that a
  plugin could import :func:`sevsim.kvm.seal.unseal` or walk ``gc.get_objects()`` is
  outside what this boundary promises (see :mod:`sevsim.kvm.seal`);
- the results of zero-argument methods of sevsim's classes, under this rule, so
  that the walk itself never changes the VM it inspects: a method annotated
  ``-> None`` returns nothing to follow and is not called; one named in
  :data:`QUERIES` (reviewed: it only reads) is called and its result followed; any
  other must be named in :data:`COMMANDS` (reviewed: it acts, e.g. ``Vcpu.run``), and
  a zero-argument method in neither list fails the test, so that new surface is
  reviewed before it is trusted.

Besides, every :class:`~sevsim.hw.GuestMemoryView` the walk reaches is read over all
of its RAM (the documented host read): private pages must come back as ciphertext.
tests/test_trust_boundary.py checks the public attributes of an exit context for a
planted register value; this walk goes further (private slots, properties, method
results, observers, keys, VMSA plaintext, hardware types, #VC installers).
"""

from __future__ import annotations

import collections
import functools
import gc
import inspect
import secrets
import sys
import types
from collections.abc import Iterator, Mapping
from enum import Enum
from typing import Any

import attrs
import pytest

import sevsim.hw
from sevsim import hookimpl
from sevsim.arch.exits import SVM_EXIT_SW
from sevsim.errors import GuestMemoryError, PluginError
from sevsim.guest.asm import assemble
from sevsim.guest.image import CODE, GuestImage
from sevsim.guest.snippets import TERMINATE, ghcb_vmgexit
from sevsim.hw import GuestMemoryView, Platform, SevFirmware, VmsaHandle
from sevsim.kvm.dispatch import ExitHandler, ExitKind
from sevsim.kvm.exits import SystemEvent, SystemEventType
from sevsim.kvm.seal import Seal, unseal
from sevsim.kvm.vcpu import Vcpu
from sevsim.kvm.vm import Kvm, Vm
from sevsim.testing import SimLog, isolated_host
from sevsim.vmm.launch import launch_image

#: How many steps from a root the walk goes.
DEPTH = 8
#: The exit code the spy owns (a software-defined one, from SVM_EXIT_SW up).
SPY = SVM_EXIT_SW + 0x5EC
#: A private page of the guest (mapped C=1, not part of the image).
SECRET_PAGE = 0x31000

LEAVES = (int, float, str, bytes, bytearray, memoryview, type(None), Enum)

#: Zero-argument methods reviewed as reads: called, their results followed. Each one
#: must be reached (a test checks), so that the list holds only today's surface.
QUERIES = frozenset({"ExitContext._ghcb", "Ghcb.valid_fields", "Segment.pack"})
#: Zero-argument methods reviewed as actions: not called. None is reachable today.
COMMANDS: frozenset[str] = frozenset()


@attrs.define
class Reached:
    """What one walk reached."""

    #: (path, value) of everything reached.
    values: list[tuple[str, Any]] = attrs.Factory(list)
    #: Qualified names of zero-argument methods in neither QUERIES nor COMMANDS.
    unreviewed: set[str] = attrs.Factory(set)
    #: path -> bound method, for every method reached by name.
    methods: dict[str, Any] = attrs.Factory(dict)


def _zero_argument(method: Any) -> bool:
    try:
        parameters = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):
        return False
    return all(
        p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters
    )


def _returns_nothing(function: types.FunctionType) -> bool:
    annotation = inspect.signature(function).return_annotation
    return annotation in (None, "None", type(None))


def _slot_names(cls: type) -> Iterator[str]:
    for klass in cls.__mro__:
        slots = klass.__dict__.get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            if name in ("__dict__", "__weakref__"):
                continue
            # a slot "__x" is stored under its mangled name
            yield f"_{klass.__name__.lstrip('_')}{name}" if name.startswith("__") else name


def _static(cls: type, name: str) -> Any:
    for klass in cls.__mro__:
        if name in klass.__dict__:
            return klass.__dict__[name]
    return None


def walk(roots: Mapping[str, Any], depth: int = DEPTH, home: str = "sevsim") -> Reached:
    """Everything reachable from ``roots`` under the rules of the module docstring;
    methods are called only on classes of modules under ``home``."""
    reached = Reached()
    seen: set[int] = set()
    frontier: list[tuple[str, Any]] = list(roots.items())
    for level in range(depth + 1):
        following: list[tuple[str, Any]] = []
        for path, obj in frontier:
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            reached.values.append((path, obj))  # also keeps obj alive, so ids stay unique
            if level == depth or isinstance(obj, (*LEAVES, type, types.ModuleType)):
                continue
            following += _children(path, obj, reached, home)
        frontier = following
    return reached


def _children(path: str, obj: Any, reached: Reached, home: str) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    if isinstance(obj, Mapping):
        try:
            items = list(obj.items())
        except Exception:
            items = []
        for key, value in items:
            out += [(f"{path}.keys()", key), (f"{path}[{key!r}]", value)]
    elif isinstance(obj, list | tuple | set | frozenset | collections.deque):
        out += [(f"{path}[{i}]", item) for i, item in enumerate(obj)]
    if callable(obj) and not isinstance(obj, type):
        try:
            out.append((f"{path}.__wrapped__", obj.__wrapped__))
        except AttributeError:
            pass
    if isinstance(obj, types.MethodType):
        out += [(f"{path}.__self__", obj.__self__), (f"{path}.__func__", obj.__func__)]
        return out
    if isinstance(obj, types.BuiltinMethodType):
        out.append((f"{path}.__self__", obj.__self__))
        return out
    if isinstance(obj, functools.partial):
        out += [(f"{path}.func", obj.func), (f"{path}.args", obj.args)]
        out += [(f"{path}.keywords", obj.keywords)]
        return out
    if isinstance(obj, types.FunctionType):
        for i, cell in enumerate(obj.__closure__ or ()):
            try:
                out.append((f"{path}.__closure__[{i}]", cell.cell_contents))
            except ValueError:  # an empty cell
                pass
        out += [(f"{path}.__defaults__", obj.__defaults__ or ())]
        out += [(f"{path}.__kwdefaults__", obj.__kwdefaults__ or {})]
        return out
    if isinstance(obj, Mapping | list | tuple | set | frozenset | collections.deque):
        return out
    cls = type(obj)
    names = set(getattr(obj, "__dict__", {}) or {}) | set(_slot_names(cls))
    if attrs.has(cls):
        names |= {f.name for f in attrs.fields(cls)}
    for name in sorted(names):
        try:
            out.append((f"{path}.{name}", getattr(obj, name)))
        except Exception:
            pass
    ours = cls.__module__ == home or cls.__module__.startswith(f"{home}.")
    for name in dir(cls):
        if name.startswith("__") and name.endswith("__"):
            continue
        static = _static(cls, name)
        if isinstance(static, property | functools.cached_property):
            try:
                out.append((f"{path}.{name}", getattr(obj, name)))
            except Exception:
                pass
        elif isinstance(static, types.FunctionType):
            bound = getattr(obj, name)
            reached.methods[f"{path}.{name}"] = bound
            if not ours or not _zero_argument(bound) or _returns_nothing(static):
                continue
            qualname = static.__qualname__
            if qualname in QUERIES:
                try:  # a read can fail (LAUNCH_DIGEST before LAUNCH_START, say)
                    out.append((f"{path}.{name}()", bound()))
                except Exception:
                    pass
            elif qualname not in COMMANDS:
                reached.unreviewed.add(qualname)
    return out


# --- what must not be found ---------------------------------------------------------------

#: The hypervisor's own objects: a plugin gets views of them (``VcpuView``, ``VmView``)
#: and numbers (``VmInfo``), never them.
HYPERVISOR_OWN = (Kvm, Vm, Vcpu, Platform, SevFirmware, VmsaHandle)


def _hypervisor_own(value: Any) -> bool:
    """KVM's, the platform's, the VMM's (devices, buses) or the plugin host's objects."""
    module = type(value).__module__
    return isinstance(value, HYPERVISOR_OWN) or module.startswith(("sevsim.vmm.", "sevsim.plugin."))


def _hardware_internal(value: Any) -> bool:
    """An object of the silicon's own (CPU models, keys, plaintext memory, VMSA pages),
    of Unicorn, or of guest software. Enum members are constants, not objects of it."""
    module = type(value).__module__
    if isinstance(value, Enum):
        return False
    if module.split(".")[0] == "unicorn" or module.startswith("sevsim.guest"):
        return True
    if module.startswith("sevsim.hw."):
        exported = [getattr(sevsim.hw, name, None) for name in sevsim.hw.__all__]
        public = any(type(value) is kind for kind in exported)
        return not public
    return module == "sevsim.hw" and type(value).__name__.startswith("_")


@attrs.frozen
class Oracle:
    """What the simulator (and only it) knows of the guest: read from the hardware's
    private table, as only the one who builds the machine can."""

    key: bytes
    secret: bytes
    #: VMSA plaintext at launch (the hypervisor wrote it) and at the spy's exit.
    vmsa_at_launch: bytes
    vmsa_at_exit: list[bytes]
    private_page: list[bytes]

    def vmsa_news(self) -> list[bytes]:
        """16-byte pieces of the VMSA's plaintext at the exit that the hypervisor did
        not write itself before launch (and that are not zero)."""
        now = self.vmsa_at_exit[0]
        return [
            now[i : i + 16]
            for i in range(0, len(now), 16)
            if now[i : i + 16] != self.vmsa_at_launch[i : i + 16] and any(now[i : i + 16])
        ]

    def leaks(self, value: Any) -> list[str]:
        """Why ``value`` must not be reachable, if it must not."""
        halves = (self.secret[:8], self.secret[8:])
        found = []
        if isinstance(value, int) and not isinstance(value, bool):
            if value in {int.from_bytes(h, "little") for h in halves}:
                found.append("a secret register value")
            if value == int.from_bytes(self.key, "little"):
                found.append("the memory encryption key")
        if isinstance(value, str):
            if any(f"{int.from_bytes(h, 'little'):x}" in value.lower() for h in halves):
                found.append("the secret, in text")
        if isinstance(value, bytes | bytearray | memoryview):
            data = bytes(value)
            if any(h in data for h in halves):
                found.append("secret bytes")
            if self.key in data:
                found.append("the memory encryption key")
            if any(piece in data for piece in self.vmsa_news()):
                found.append("VMSA plaintext")
        if _hardware_internal(value):
            found.append(f"a hardware internal ({type(value).__qualname__})")
        if _hypervisor_own(value):
            found.append(f"the hypervisor's own {type(value).__qualname__}")
        return found


def leaks(reached: Reached, oracle: Oracle) -> list[str]:
    return [f"{path}: {why}" for path, value in reached.values for why in oracle.leaks(value)]


# --- the guest, the spy and the observer ------------------------------------------------


def secret_guest(secret: bytes) -> str:
    """Plant ``secret`` in R12/R13, XMM5 and the private page, then VMGEXIT to the spy."""
    low, high = int.from_bytes(secret[:8], "little"), int.from_bytes(secret[8:], "little")
    return (
        f"""
    mov rax, {low:#x}
    mov r12, rax
    movq xmm5, rax
    mov rax, {high:#x}
    mov r13, rax
    pinsrq xmm5, rax, 1
    mov rsi, {SECRET_PAGE:#x}
    mov [rsi], r12
    mov [rsi + 8], r13
    xor eax, eax
    xor esi, esi
"""
        + ghcb_vmgexit(SPY)
        + TERMINATE
        + "hlt"
    )


@attrs.define
class Watch:
    """Everything the spy and the observer reached, by where they got it."""

    reached: dict[str, list[Reached]] = attrs.Factory(dict)
    #: What the two regression paths of issue 8 did when tried from the exit handler.
    attempts: dict[str, str] = attrs.Factory(dict)

    def add(self, where: str, roots: Mapping[str, Any]) -> None:
        self.reached.setdefault(where, []).append(walk(roots))

    def every(self) -> Iterator[tuple[str, Reached]]:
        for where, walks in self.reached.items():
            for reached in walks:
                yield where, reached


def _attempt(call: Any) -> str:
    try:
        call()
    except Exception as exc:
        return type(exc).__name__
    return "worked"


class Spy:
    """Owns SPY; at that exit walks its context and tries the two known leak paths."""

    def __init__(self, watch: Watch, at_exit: Any) -> None:
        self.watch = watch
        self.at_exit = at_exit

    @hookimpl
    def sevsim_exit_handlers(self) -> Iterator[ExitHandler]:
        def spy(ctx: Any) -> None:
            self.at_exit()
            self.watch.add("exit handler", {"ctx": ctx})
            self.watch.attempts["ctx.vm.platform.psp.key_for_asid"] = _attempt(
                lambda: ctx.vm.platform.psp.key_for_asid(ctx.vm.asid)
            )
            self.watch.attempts["ctx.vm.platform.load_vc_model"] = _attempt(
                lambda: ctx.vm.platform.load_vc_model(ctx.vcpu.vmsa, lambda view: iter(()))
            )
            # what the first fix left open: the views' operations, held openly, led
            # back to the Vcpu and Vm through their closures
            self.watch.attempts["ctx.vcpu._ops.cpl.__closure__[0]"] = _attempt(
                lambda: ctx.vcpu._ops.cpl.__closure__[0]
            )
            self.watch.attempts["ctx.vm.io_bus._read.__closure__[1]"] = _attempt(
                lambda: ctx.vm.io_bus._read.__closure__[1]
            )

        yield ExitHandler(ExitKind.VMGEXIT, SPY, spy, name="SPY")


class Observer:
    """Implements every observer hook and the lifecycle hooks that get a vCPU, and
    walks every argument it is given."""

    def __init__(self, watch: Watch) -> None:
        self.watch = watch

    @hookimpl
    def sevsim_vm_created(self, vm: Any) -> None:
        self.watch.add("sevsim_vm_created", {"vm": vm})

    @hookimpl
    def sevsim_vm_destroyed(self, vm: Any, why: str) -> None:
        self.watch.add("sevsim_vm_destroyed", {"vm": vm, "why": why})

    @hookimpl
    def sevsim_launch_command(self, vm: Any, command: str, status: str, detail: str) -> None:
        fields = {"vm": vm, "command": command, "status": status, "detail": detail}
        self.watch.add("sevsim_launch_command", fields)

    @hookimpl
    def sevsim_vmgexit_enter(self, vcpu_id: int, exit_reason: int, info1: int, info2: int) -> None:
        self.watch.add("sevsim_vmgexit_enter",
                       {"vcpu_id": vcpu_id, "exit_reason": exit_reason, "info1": info1,
                        "info2": info2})  # fmt: skip

    @hookimpl
    def sevsim_vmgexit_exit(self, vcpu_id: int, exit_reason: int, info1: int, info2: int) -> None:
        self.watch.add("sevsim_vmgexit_exit",
                       {"vcpu_id": vcpu_id, "exit_reason": exit_reason, "info1": info1,
                        "info2": info2})  # fmt: skip

    @hookimpl
    def sevsim_msr_protocol_enter(self, vcpu_id: int, ghcb_gpa: int) -> None:
        self.watch.add("sevsim_msr_protocol_enter", {"vcpu_id": vcpu_id, "ghcb_gpa": ghcb_gpa})

    @hookimpl
    def sevsim_msr_protocol_exit(self, vcpu_id: int, ghcb_gpa: int, result: Any) -> None:
        self.watch.add("sevsim_msr_protocol_exit",
                       {"vcpu_id": vcpu_id, "ghcb_gpa": ghcb_gpa, "result": result})  # fmt: skip

    @hookimpl
    def sevsim_vmexit(self, vcpu_id: int, exit_code: int, info1: int, info2: int) -> None:
        self.watch.add("sevsim_vmexit",
                       {"vcpu_id": vcpu_id, "exit_code": exit_code, "info1": info1,
                        "info2": info2})  # fmt: skip

    @hookimpl
    def sevsim_exit_handled(
        self, vcpu_id: int, kind: str, code: int, plugin: str, notes: dict[str, Any]
    ) -> None:
        self.watch.add("sevsim_exit_handled",
                       {"vcpu_id": vcpu_id, "kind": kind, "code": code, "plugin": plugin,
                        "notes": notes})  # fmt: skip

    @hookimpl
    def sevsim_vcpu_reset(self, vcpu: Any) -> None:
        self.watch.add("sevsim_vcpu_reset", {"vcpu": vcpu})

    @hookimpl
    def sevsim_vcpu_events(self, vcpu: Any) -> bool:
        self.watch.add("sevsim_vcpu_events", {"vcpu": vcpu})
        return False


#: The hooks the observer must have heard for the walk to mean anything.
OBSERVED = (
    "sevsim_vm_created", "sevsim_launch_command", "sevsim_vcpu_reset", "sevsim_vcpu_events",
    "sevsim_vmgexit_enter", "sevsim_vmgexit_exit", "sevsim_exit_handled",
    "sevsim_msr_protocol_enter", "sevsim_vm_destroyed",
)  # fmt: skip


@attrs.frozen
class Run:
    watch: Watch
    oracle: Oracle
    exit: Any
    memory_reads: dict[str, bytes]


def _read_reached_memory(watch: Watch) -> dict[str, bytes]:
    """The documented host read of every guest memory view reached, over all its RAM."""
    reads: dict[str, bytes] = {}
    done: set[int] = set()
    for where, reached in watch.every():
        for path, value in reached.values:
            if isinstance(value, GuestMemoryView) and id(value) not in done:
                done.add(id(value))
                for ram in value.ram:
                    reads[f"{where}: {path}.read({ram.gpa:#x}, {ram.size:#x})"] = value.read(
                        ram.gpa, ram.size
                    )
    return reads


@pytest.fixture(scope="module")
def run() -> Run:
    """One guest run with a fresh secret, walked at its exit and by every observer."""
    secret = secrets.token_bytes(16)
    watch = Watch()
    host = isolated_host({"spy": Spy(watch, lambda: at_exit()), "observer": Observer(watch)},
                         enable=["msr_protocol"])  # fmt: skip
    platform = Platform(sim=SimLog())
    vm = launch_image(Kvm(platform), GuestImage(assemble(secret_guest(secret), CODE)),
                      handlers=host.start(), events=host.events)  # fmt: skip
    # The oracle's reach into the hardware's private table (sevsim.hw._behind): the
    # simulator's own knowledge, which this test compares the plugins' reach against.
    silicon = sevsim.hw._behind(platform)
    vmsa = sevsim.hw._behind(vm.vcpus[0].vmsa)
    memory = sevsim.hw._behind(vm.memory)
    key = silicon.psp.key_for_asid(vm.asid)
    oracle = Oracle(key, secret, vmsa.plaintext(), [], [])

    def at_exit() -> None:
        oracle.vmsa_at_exit.append(vmsa.plaintext())
        oracle.private_page.append(memory.guest_read(SECRET_PAGE, 16, memory.key_id(key)))

    exit_ = vm.vcpus[0].run(60)
    reads = _read_reached_memory(watch)
    vm.destroy()
    return Run(watch, oracle, exit_, reads)


# --- the tests --------------------------------------------------------------------------


def test_the_run_planted_the_secret_and_everybody_watched(run):
    # Without these the other tests would pass for nothing: the guest ran to its end,
    # the secret is really in its registers and private page, and every hook fired.
    assert run.exit == SystemEvent(SystemEventType.SEV_TERM, (0x100,))
    assert run.oracle.private_page == [run.oracle.secret]
    low, high = run.oracle.secret[:8], run.oracle.secret[8:]
    assert low in run.oracle.vmsa_at_exit[0] and high in run.oracle.vmsa_at_exit[0]
    assert run.oracle.vmsa_news(), "the VMSA plaintext at the exit shows nothing new"
    assert set(OBSERVED) | {"exit handler"} <= set(run.watch.reached)
    assert run.memory_reads, "the walk reached no guest memory view to read"


def test_the_walk_reaches_the_exit_contexts_whole_surface(run):
    (reached,) = run.watch.reached["exit handler"]
    paths = {path for path, _ in reached.values}
    for expected in ("ctx.regs", "ctx.ghcb", "ctx.vcpu", "ctx.vm", "ctx._memory",
                     "ctx.vcpu._ops", "ctx.vm.cpuid_table", "ctx.vm.io_bus",
                     "ctx.vm.io_bus._vm"):  # fmt: skip
        assert expected in paths
    assert any(path.endswith(".pack()") for path in paths)  # method results are followed
    # the views' operations are there, sealed: a number, not the vCPU or VM
    sealed = dict(reached.values)
    assert type(sealed["ctx.vcpu._ops"]) is Seal and type(sealed["ctx.vm.io_bus._vm"]) is Seal
    assert ctx_paths_under(paths, "ctx.vcpu._ops") == {"ctx.vcpu._ops._number",
                                                      "ctx.vcpu._ops._what"}  # fmt: skip


def ctx_paths_under(paths: set[str], prefix: str) -> set[str]:
    return {path for path in paths if path.startswith(f"{prefix}.")}


@pytest.mark.parametrize("where", ["exit handler", *OBSERVED])
def test_nothing_a_plugin_receives_leads_to_a_secret(run, where):
    found = [leak for reached in run.watch.reached[where] for leak in leaks(reached, run.oracle)]
    assert found == []


def test_private_memory_reads_back_as_ciphertext(run):
    halves = (run.oracle.secret[:8], run.oracle.secret[8:])
    for path, data in run.memory_reads.items():
        assert not any(h in data for h in halves), path


def test_no_way_to_install_a_vc_model_or_read_a_key(run):
    for where, reached in run.watch.every():
        names = {path.rsplit(".", 1)[-1] for path in reached.methods}
        assert not names & {"key_for_asid", "load_vc_model"}, where
        for path, method in reached.methods.items():
            if path.endswith(".bind_vc_model"):
                # the VMSA is sealed: the guest's #VC handler was chosen at launch
                with pytest.raises(GuestMemoryError, match="sealed"):
                    method(lambda view: iter(()))


def test_the_leak_paths_of_issue_8_are_gone(run):
    assert run.watch.attempts == {
        "ctx.vm.platform.psp.key_for_asid": "AttributeError",
        "ctx.vm.platform.load_vc_model": "AttributeError",
        "ctx.vcpu._ops.cpl.__closure__[0]": "AttributeError",
        "ctx.vm.io_bus._read.__closure__[1]": "AttributeError",
    }


def test_every_zero_argument_method_reached_is_reviewed(run):
    unreviewed = set().union(*(reached.unreviewed for _, reached in run.watch.every()))
    assert unreviewed == set(), "classify these as QUERIES or COMMANDS"


def test_every_reviewed_method_is_reached(run):
    # The lists name today's surface only: a method of KVM's own objects (Vcpu.run,
    # Kvm.create_vm, ...) left in them would hide that they became reachable again.
    reached = {
        method.__func__.__qualname__
        for _, walked in run.watch.every()
        for method in walked.methods.values()
        if isinstance(method, types.MethodType)
    }
    assert QUERIES | COMMANDS <= reached


# --- the walker itself ---------------------------------------------------------------


class _Box:
    __slots__ = ("__hidden", "_held", "calls")

    def __init__(self, held: Any) -> None:
        self.__hidden = ("slot", 0xA1)
        self._held = held
        self.calls: list[str] = []

    @property
    def shown(self) -> int:
        return 0xA2

    def query(self) -> int:
        self.calls.append("query")
        return 0xA3

    def action(self) -> int:
        self.calls.append("action")
        return 0xBAD

    def command(self) -> None:
        self.calls.append("command")

    def unknown(self) -> int:
        self.calls.append("unknown")
        return 0xBAD


class _Owner:
    def __init__(self, held: int) -> None:
        self.held = held

    def operation(self, value: int) -> int:
        return self.held + value


def test_the_walker_follows_slots_properties_closures_and_queries(monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "QUERIES", frozenset({"_Box.query"}))
    monkeypatch.setattr(sys.modules[__name__], "COMMANDS", frozenset({"_Box.action"}))
    hidden, behind_wrapper = 0xA4, 0xA7

    def closure() -> int:
        return hidden

    def wrapped() -> int:
        return behind_wrapper

    @functools.wraps(wrapped)
    def wrapper() -> int:
        return 0

    bound = _Owner(0xA6).operation
    box = _Box({"inner": [functools.partial(print, 0xA5), closure, bound, wrapper]})
    reached = walk({"box": box}, home=__name__)
    values = {value for _, value in reached.values if isinstance(value, int)}
    # slot, property, query result, closure cell, partial argument, a bound method's
    # owner (__self__), what a decorator wrapped (__wrapped__, then its closure)
    assert {0xA1, 0xA2, 0xA3, 0xA4, 0xA5, 0xA6, 0xA7} <= values
    assert 0xBAD not in values
    assert box.calls == ["query"]  # no action, command or unreviewed method ran
    assert reached.unreviewed == {"_Box.unknown"}


def test_the_walker_stops_at_its_depth():
    chain: Any = 0x5EC
    for _ in range(5):
        chain = [chain]
    assert 0x5EC in {v for _, v in walk({"c": chain}, depth=5).values if isinstance(v, int)}
    assert 0x5EC not in {v for _, v in walk({"c": chain}, depth=4).values if isinstance(v, int)}


def test_the_oracle_names_each_kind_of_leak():
    oracle = Oracle(b"K" * 32, bytes(range(16)), bytes(32), [bytes(16) + b"R" * 16], [])
    assert oracle.leaks(int.from_bytes(bytes(range(8)), "little")) == ["a secret register value"]
    assert oracle.leaks(b"..." + bytes(range(8, 16))) == ["secret bytes"]
    assert oracle.leaks(bytearray(b"xK" + b"K" * 32)) == ["the memory encryption key"]
    assert oracle.leaks(b"R" * 16) == ["VMSA plaintext"]
    assert oracle.leaks(sevsim.hw._behind(Platform())) == ["a hardware internal (_Silicon)"]
    assert oracle.leaks(b"harmless") == []


def test_a_seal_names_its_object_only_while_it_lives():
    owner = _Owner(1)
    seal = Seal(owner, "vCPU 0 of VM 'gone'")
    assert unseal(seal) is owner
    assert repr(seal) == "<sealed vCPU 0 of VM 'gone'>"  # what a plugin printing it sees
    del owner
    gc.collect()
    with pytest.raises(PluginError, match="vCPU 0 of VM 'gone' is gone"):
        unseal(seal)
