"""What a guest is expected to do: a manifest's ``[expect]`` table, checked after a run.

A guest's author knows what a good run looks like (it ends normally, prints this on
the UART, posts these codes); writing it next to the guest lets a test, or a person
changing the hypervisor, check a run against it without reading the trace. The check
reads only what the VMM holds after the run: the last exit, the trace and the devices.
"""

from __future__ import annotations

from attrs import frozen

from sevsim.kvm.exits import KvmExit
from sevsim.trace import Trace, describe_exit
from sevsim.vmm.machine import Devices
from sevsim.vmm.runner import abnormal_end


@frozen
class Expected:
    """Each field None is not checked."""

    #: Whether the run ends normally (``sevsim run`` exits 0; :func:`abnormal_end`).
    normal_end: bool | None = None
    #: Text that the description of the last exit contains (``VM ended: ...``).
    exit: str | None = None
    #: Everything the guest wrote to the UART, decoded as Latin-1.
    uart: str | None = None
    #: The codes written to the POST port, in order.
    post: tuple[int, ...] | None = None

    def mismatches(self, exit_: KvmExit, devices: Devices, trace: Trace | None = None) -> list[str]:
        """How the run that ended with ``exit_`` differs from this; [] if it does not.

        ``trace`` (the run's, if it had one) knows a GHCB termination request's reason.
        """
        found = []
        failure = abnormal_end(exit_, trace)
        if self.normal_end is not None and (failure is None) != self.normal_end:
            found.append(
                f"expected a normal end, got: {failure}"
                if self.normal_end
                else "expected the run to fail, but it ended normally"
            )
        ended = trace.describe_exit(exit_, 0) if trace is not None else describe_exit(exit_)
        if self.exit is not None and self.exit not in ended:
            found.append(f"expected the last exit to mention {self.exit!r}, got {ended!r}")
        uart = devices.uart.output.decode("latin-1")
        if self.uart is not None and uart != self.uart:
            found.append(f"expected UART output {self.uart!r}, got {uart!r}")
        post = tuple(devices.post.codes)
        if self.post is not None and post != self.post:
            found.append(f"expected POST codes {_hex(self.post)}, got {_hex(post)}")
        return found


def _hex(codes: tuple[int, ...]) -> str:
    return "[" + ", ".join(f"{c:#x}" for c in codes) + "]"
