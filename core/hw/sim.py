"""The simulator's own view of a guest: what only a simulator can see.

A real hypervisor never learns the guest's RIP, the instruction behind an exit or
the #VCs the guest handled by itself. sevsim can show them, for the trace and for
tools that ask explicitly: the silicon reports them to the :class:`SimSink` given to
:class:`~sevsim.hw.Platform` when it is created (by whoever builds the simulated
machine: the command line, a test), and to nothing the hypervisor holds. No exit
handler ever receives one of these; observer plugins see them only through the
separate ``sevsim_sim_*`` hooks.

Events (fields): ``sim_vc`` (vm, vcpu, exit_code, rip, insn, bits): the hardware
raised #VC in front of the instruction ``insn`` at ``rip``; ``sim_exit`` (vm, vcpu,
exit_code, rip, insn, bits, why): a #VMEXIT and the instruction behind it, with the
simulator's account of why (a triple fault, a tampered VMSA) where there is one.
"""

from __future__ import annotations

from typing import Any, Protocol

#: Event names the silicon reports, with their fields.
SIM_EVENTS: dict[str, tuple[str, ...]] = {
    "sim_vc": ("vm", "vcpu", "exit_code", "rip", "insn", "bits"),
    "sim_exit": ("vm", "vcpu", "exit_code", "rip", "insn", "bits", "why"),
}


class SimSink(Protocol):
    def wants(self, name: str) -> bool: ...

    def emit(self, name: str, /, **fields: Any) -> None: ...


class NoSim:
    """Nobody watches the simulator's view: nothing is built."""

    def wants(self, name: str) -> bool:
        return False

    def emit(self, name: str, /, **fields: Any) -> None:
        return None
