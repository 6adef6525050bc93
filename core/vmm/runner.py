"""The VMM's run loop: launch a guest with the plugins a host loaded, run to the end.

This is what ``sevsim run`` does: create the VM with the host's exit table and its
observers plus the run's :class:`RunObserver` (the CLI's trace, or a silent
:class:`RunLog`), launch the image, then call ``Vcpu.run()`` until an exit this VMM
cannot continue from. With no devices yet, every exit to userspace ends the run; a
HLT does too, since nothing could wake the vCPU. The VMM never builds a trace itself:
a tool hands it one, and it only tells it what happened (:class:`RunObserver`).

How the run ended decides whether it succeeded (:func:`abnormal_end`, and
``sevsim run``'s exit status): the guest asking for termination with the general
reason (a SEV_TERM system event for a termination request with set 0 code 0, what
the demo guest and :data:`sevsim.guest.snippets.TERMINATE` send, through the GHCB MSR
or a GHCB page) and a HLT are normal ends, unless the HLT follows a termination
request with a failure reason that nobody handled;
everything else is a failure: a termination request with any other reason (the
guest gave up, e.g. with its #VC handler's own reason set), a shutdown, an internal
error, any other exit, and a failed KVM_RUN (``-errno``, including ``-EINTR`` when
``timeout`` ran out and ``-EINVAL`` for a termination request in the v5.11 era,
which failed KVM_RUN instead of reporting it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar, overload

from attrs import frozen

from sevsim.errors import ConfigError
from sevsim.guest.image import GuestImage
from sevsim.hw import Platform, SimSink
from sevsim.kvm.dispatch import ExitTable
from sevsim.kvm.events import EventSink, TeeSink
from sevsim.kvm.exits import Hlt, KvmExit
from sevsim.kvm.extensions import Extensions
from sevsim.kvm.termination import (
    Reason,
    Terminations,
    describe_exit,
    describe_reason,
    is_sev_term,
    term_reason,
)
from sevsim.kvm.vm import Kvm, Vm
from sevsim.vmm.launch import launch_image
from sevsim.vmm.machine import Devices

#: What a time limit must be, for the messages that refuse one.
TIMEOUT_EXPECTED = "expected a finite number of seconds > 0"


def check_timeout(value: object, where: str) -> float:
    """``value`` as a time limit in seconds: a finite number > 0, else a ConfigError
    naming ``where`` (``--timeout``, ``run_guest(timeout=...)``) and the value."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(f"{where} = {value!r}: {TIMEOUT_EXPECTED}")
    return float(value)


class RunObserver(EventSink, Protocol):
    """Whoever watches a run for the VMM: an event sink for kvm's events (and for the
    simulator's view, on a platform :func:`run_image` makes), told the VMM's own notes
    and each exit to userspace, and asked what the events said about termination (as
    :class:`~sevsim.kvm.termination.Terminations` knows it). The CLI's text trace is
    one; :class:`RunLog` is the VMM's own, silent one."""

    def note(self, text: str) -> None:
        """A line of the VMM's own: the guest's console, an access nobody claimed."""
        ...

    def record_exit(self, vcpu_id: int, exit_: KvmExit) -> None:
        """The exit ``Vcpu.run`` of vCPU ``vcpu_id`` returned to userspace."""
        ...

    def term_reason(self, exit_: KvmExit, vcpu_id: int) -> Reason | None: ...

    def describe_exit(self, exit_: KvmExit, vcpu_id: int) -> str: ...

    def ignored_termination(self, vcpu_id: int) -> Reason | None: ...


class RunLog(Terminations):
    """The VMM's record of a run when nobody gave it a trace: its notes and exits to
    userspace as lines, and what kvm's events said about termination."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def note(self, text: str) -> None:
        self.lines.append(text)

    def record_exit(self, vcpu_id: int, exit_: KvmExit) -> None:
        self.note(f"      -> to userspace: {self.describe_exit(exit_, vcpu_id)}")


ObserverT = TypeVar("ObserverT", bound=RunObserver)


def abnormal_end(exit_: KvmExit, trace: RunObserver | None = None,
                 vcpu_id: int = 0) -> str | None:  # fmt: skip
    """None if ``exit_`` (of ``vcpu``) is a normal end of a run (see the module doc),
    else why not.

    ``trace`` (the run's) knows what the exit alone does not: the reason of a GHCB
    termination request, and a termination request nobody handled before a HLT.
    """
    if isinstance(exit_, Hlt):
        ignored = trace.ignored_termination(vcpu_id) if trace is not None else None
        if ignored in (None, (0, 0)):
            return None
        return (f"the guest halted after a termination request nobody handled: "
                f"{describe_reason(*ignored)}")  # fmt: skip
    described = trace.describe_exit(exit_, vcpu_id) if trace is not None else describe_exit(exit_)
    if is_sev_term(exit_):
        reason = trace.term_reason(exit_, vcpu_id) if trace is not None else term_reason(exit_)
        if reason == (0, 0):
            return None
        return (
            f"the guest asked to terminate with a failure reason: "
            f"{described} (a normal end is reason set 0 code 0, or HLT)"
        )
    return f"the VM did not end normally: {described}"


@frozen
class RunResult(Generic[ObserverT]):
    """How :func:`run_image` ended, with the observer it was given (or its RunLog)."""

    exit: KvmExit
    trace: ObserverT
    vm: Vm
    devices: Devices

    @property
    def failure(self) -> str | None:
        """:func:`abnormal_end` of the exit: None when the run ended normally."""
        return abnormal_end(self.exit, self.trace, 0)


@overload
def run_image(image: GuestImage, table: ExitTable | Extensions, events: EventSink, *,
              trace: None = None, **options: Any) -> RunResult[RunLog]: ...  # fmt: skip


@overload
def run_image(image: GuestImage, table: ExitTable | Extensions, events: EventSink, *,
              trace: ObserverT, **options: Any) -> RunResult[ObserverT]: ...  # fmt: skip


def run_image(
    image: GuestImage,
    table: ExitTable | Extensions,
    events: EventSink,
    *,
    trace: RunObserver | None = None,
    sim: SimSink | None = None,
    make_devices: Callable[[Callable[[bytes], None]], Devices] = Devices.standard,
    kvm: Kvm | None = None,
    timeout: float | None = None,
    uart_input: bytes = b"",
    **vm_args: Any,
) -> RunResult[Any]:
    """Launch ``image`` on one vCPU and run it until it stops (or ``timeout`` seconds
    have passed: a spinning guest cannot hang the VMM); trace every exit, device
    output and unclaimed access. ``uart_input`` is what the guest can read from COM1.
    ``timeout`` is None (no limit) or a finite number of seconds > 0.

    ``trace`` watches the run (a :class:`RunLog` by default): it hears kvm's events
    and, beside ``sim``, the simulator's view of the platform made here (not that of a
    ``kvm`` of the caller's, whose platform has its listener already). ``make_devices``
    builds the machine from the console callback (a guest manifest's devices, say).
    """
    if timeout is not None:
        timeout = check_timeout(timeout, "run_image(timeout=...)")
    if trace is None:
        trace = RunLog()
    console = LineConsole(lambda line: trace.note(f"      [uart] {line}"))
    devices = make_devices(console.write)
    devices.uart.input += uart_input
    for bus in (devices.io, devices.mmio):
        bus.on_unclaimed.append(
            lambda bus, access, address, size: trace.note(
                f"      [{bus.name}] unclaimed {size}-byte {access} at {address:#x}: "
                + ("all ones" if access == "read" else "dropped")
            )
        )
    if kvm is None:
        kvm = Kvm(Platform(sim=trace if sim is None else TeeSink(trace, sim)))
    vm = launch_image(
        kvm, image, handlers=table, events=TeeSink(events, trace), devices=devices, **vm_args,
    )  # fmt: skip
    trace.note(f"launch digest {vm.launch_digest().hex()}")
    vcpu = vm.vcpus[0]
    exit_ = vcpu.run(timeout)
    console.flush()
    trace.record_exit(vcpu.id, exit_)
    return RunResult(exit_, trace, vm, devices)


class LineConsole:
    """Collects a device's output bytes and hands on whole lines."""

    def __init__(self, emit: Callable[[str], None]) -> None:
        self._emit = emit
        self._pending = bytearray()

    def write(self, data: bytes) -> None:
        self._pending += data
        while b"\n" in self._pending:
            line, _, rest = self._pending.partition(b"\n")
            self._emit(line.decode("latin-1"))
            self._pending = bytearray(rest)

    def flush(self) -> None:
        if self._pending:
            self._emit(self._pending.decode("latin-1"))
            self._pending.clear()
