"""Real guest runs recorded by the JSON Lines trace, shared by the trace tests."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from pathlib import Path

from attrs import frozen

from sevsim.guest.asm import assemble
from sevsim.guest.image import CODE, GuestImage
from sevsim.guest.snippets import TERMINATE
from sevsim.guest.vc import VcHandler
from sevsim.hw import Platform
from sevsim.kvm.events import TeeSink
from sevsim.kvm.exits import KvmExit
from sevsim.kvm.vm import Kvm
from sevsim.testing import isolated_host
from sevsim.trace_jsonl import JsonlSink, TraceFilter
from sevsim.vmm.launch import launch_image

#: Two port accesses to the POST port, then a termination request (MSR protocol): two
#: IOIO exits handled by ``ioio`` and one TERM_REQ handled by ``msr_protocol``.
IOIO_GUEST = "mov dx, 0x80\nout dx, al\nin al, dx\n" + TERMINATE


def ticking_clock(step: int = 1000) -> Callable[[], int]:
    """A guest clock that moves ``step`` ns each time it is read: each traced event
    reads it once, so guest times count the events between two events."""
    return itertools.count(0, step).__next__


@frozen
class TracedRun:
    path: Path
    exit: KvmExit
    sink: JsonlSink


def traced_run(
    path: Path,
    source: str = IOIO_GUEST,
    *,
    enable: Iterable[str] = ("ioio", "msr_protocol"),
    trace_filter: str | None = None,
    guest_clock: Callable[[], int] | None = None,
    sink_type: type[JsonlSink] = JsonlSink,
) -> TracedRun:
    """Run ``source`` (with the modeled #VC handler) to its first exit to userspace,
    with kvm's and the simulator's events going to a :class:`JsonlSink` writing ``path``."""
    with path.open("w", encoding="utf-8") as file:
        parsed = TraceFilter.parse(trace_filter) if trace_filter is not None else None
        sink = sink_type(file, trace_filter=parsed, guest_clock=guest_clock)
        host = isolated_host(enable=enable)
        kvm = Kvm(Platform(sim=TeeSink(host.sim, sink)))
        vm = launch_image(kvm, GuestImage(assemble(source, CODE)), handlers=host.start(),
                          events=TeeSink(host.events, sink), vc_model=VcHandler())  # fmt: skip
        exit_ = vm.vcpus[0].run(30)
    return TracedRun(path, exit_, sink)
