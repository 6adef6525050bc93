"""A readable trace of a run: every exit with its decoded meaning, and a summary.

:class:`Trace` is an event sink: it listens to everything kvm reports (the same
events the observer hooks get) and decodes the numbers with ``sevsim.arch``: exit
codes, GHCB MSR protocol requests and replies, GHCB error replies, termination
reasons. It also shows the guest instruction behind each exit, disassembled with
capstone from the simulator's debug record of the exit: a view a real hypervisor
does not have, marked as such.

Besides the exits it shows what the hypervisor side did to a vCPU on its own account:
interrupts and NMIs injected, INIT and SIPI delivered, a plugin's handler failing, and
(when asked: they repeat the handlers' notes, naming the device) each access a VMM
device served. Termination reasons are decoded by :mod:`sevsim.kvm.termination`,
which the VMM uses too; its names are re-exported here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from sevsim.arch import ghcb_msr as G
from sevsim.arch.disasm import capstone
from sevsim.arch.exits import GhcbErr, GhcbResp, SvmExit, VmgExit, exit_name
from sevsim.arch.ioio import IoioInfo
from sevsim.kvm.dispatch import ExitKind, code_name
from sevsim.kvm.exits import Hlt, KvmExit
from sevsim.kvm.termination import (
    Reason,
    Terminations,
    describe_exit,
    describe_msr,
    describe_reason,
    is_sev_term,
    term_reason,
)

__all__ = [
    "Reason", "Trace", "describe_access", "describe_exit", "describe_msr", "describe_reason",
    "describe_request", "describe_response", "disassemble", "is_sev_term", "term_reason",
]  # fmt: skip

VMGEXIT_BYTES = b"\xf3\x0f\x01\xd9"


def disassemble(code: bytes, address: int, bits_: int = 64) -> str:
    """One instruction as ``bytes  mnemonic operands``; capstone prints VMGEXIT as
    VMMCALL (it drops the REP prefix), so that one is named here."""
    insn = next(capstone(bits_).disasm(code, address, 1), None)
    if insn is None:
        return f"{code[:4].hex(' ')} (undecodable)"
    text = f"{insn.mnemonic} {insn.op_str}"
    if bytes(insn.bytes).endswith(VMGEXIT_BYTES):
        text = "vmgexit"
    return f"{insn.bytes.hex(' '):<14} {text}".rstrip()


def describe_request(code: int, info1: int, info2: int) -> str:
    """A GHCB exit's ``sw_exit_info_1/2`` in words, for the codes that define them."""
    if code == SvmExit.IOIO:
        io = IoioInfo.decode(info1)
        return io.describe() + (f" x {info2}" if io.string else "")
    if code in (VmgExit.MMIO_READ, VmgExit.MMIO_WRITE):
        return f"{info2} bytes at {info1:#x}"
    if code == SvmExit.MSR:
        return "wrmsr" if info1 else "rdmsr"
    if code == VmgExit.TERM_REQUEST:
        return describe_reason(*G.ghcb_term_reason(info1))
    return f"info1 {info1:#x} info2 {info2:#x}"


def describe_response(info1: int, info2: int) -> str:
    """``sw_exit_info_1/2`` of a GHCB reply in words."""
    match info1 & 0xFFFF_FFFF:
        case GhcbResp.NO_ACTION:
            return f"ok (info2 {info2:#x})"
        case GhcbResp.ISSUE_EXCEPTION:
            return f"raise exception vector {info2 & 0xFF} (event {info2:#x})"
        case GhcbResp.MALFORMED_INPUT:
            try:
                return f"error {GhcbErr(info2).name}"
            except ValueError:
                return f"error {info2:#x}"
    return f"info1 {info1:#x} info2 {info2:#x}"


def describe_access(bus: str, address: int, size: int, direction: str, value: int) -> str:
    """A device access in words, as the ``ioio`` plugin notes one: ``port 0x80 <- 0x00``,
    ``mmio 0xfee00300 -> 0x00004500``; the value shown with all of its bytes."""
    where = f"port {address:#x}" if bus == "io" else f"{bus} {address:#x}"
    arrow = "->" if direction == "read" else "<-"
    return f"{where} {arrow} {value:#0{2 + 2 * size}x} ({size} byte{'s' * (size != 1)})"


#: How an interrupt or NMI was injected (the events' ``how``), as the trace says it.
_HOW = {"event_inj": "EVENTINJ"}


class Trace:
    """Records a run as lines of text (and echoes them, if asked) plus exit counts.

    ``device_accesses`` adds a line for each access a VMM device served: off by default,
    since the ``ioio`` and ``mmio`` plugins' notes already say what each exit read or
    wrote, and a firmware boot makes thousands of them.
    """

    def __init__(
        self,
        echo: Callable[[str], None] | None = None,
        *,
        hypervisor_view: bool = False,
        shown: Callable[[str, Mapping[str, Any]], bool] | None = None,
        device_accesses: bool = False,
    ) -> None:
        self.lines: list[str] = []
        #: Which events' lines are echoed (``TraceFilter.matches``; None: all). The
        #: trace still hears every event: the end of a run is decoded from them.
        self._shown = shown
        self._echoing = True
        #: Show only what KVM could see: no guest RIP, instruction or #VC.
        self.hypervisor_view = hypervisor_view
        #: Whether each device access gets a line (see above).
        self.device_accesses = device_accesses
        #: #VMEXITs by exit code name.
        self.exits: Counter[str] = Counter()
        #: What the guest asked for: MSR-protocol requests and GHCB exit codes.
        self.requests: Counter[str] = Counter()
        #: What the events said about termination requests (the run's verdict needs it).
        self.terminations = Terminations()
        self._echo = echo
        self._seq = 0
        #: The silicon's account of each vCPU's last #VMEXIT (``sim_exit``), shown on
        #: the exit's line; empty when the trace sees only what KVM sees.
        self._sim_exits: dict[int, dict[str, Any]] = {}

    # -- EventSink --------------------------------------------------------------------

    def wants(self, name: str) -> bool:
        if self.hypervisor_view and name.startswith("sim_"):
            return False
        if name == "device_access":
            return self.device_accesses
        return hasattr(self, f"_on_{name}")

    def emit(self, name: str, /, **fields: Any) -> None:
        if self.terminations.wants(name):
            self.terminations.emit(name, **fields)
        self._echoing = self._shown is None or self._shown(name, fields)
        try:
            getattr(self, f"_on_{name}")(**fields)
        finally:
            self._echoing = True

    def _line(self, text: str) -> None:
        self.lines.append(text)
        if self._echo is not None and self._echoing:
            self._echo(text)

    # -- events ---------------------------------------------------------------------------

    def _on_vm_created(self, vm: Any) -> None:
        self._line(f"VM {vm.name!r} created: SEV-ES, ASID {vm.asid}")

    def _on_vm_destroyed(self, vm: Any, why: str) -> None:
        self._line(f"VM {vm.name!r} destroyed: {why}")

    def _on_launch_command(self, vm: Any, command: str, status: str, detail: str) -> None:
        self._line(f"  {command}: {status}{': ' + detail if detail else ''}")

    def _on_sim_exit(self, vm: str, vcpu: int, exit_code: int, rip: int | None, insn: bytes,
                     bits: int, why: str) -> None:  # fmt: skip
        self._sim_exits[vcpu] = {"rip": rip, "insn": insn, "bits": bits, "why": why}

    def _on_vmexit(self, vcpu_id: int, exit_code: int, info1: int, info2: int) -> None:
        self._seq += 1
        name = exit_name(exit_code).removeprefix("SVM_EXIT_")
        self.exits[name] += 1
        where = ""
        seen = self._sim_exits.pop(vcpu_id, None)
        if seen is not None and seen["rip"] is not None:
            where = f"  @{seen['rip']:#x}  {disassemble(seen['insn'], seen['rip'], seen['bits'])}"
            if seen["why"]:
                where += f"  [{seen['why']}]"
        info = "" if exit_code == SvmExit.VMGEXIT else f" info1 {info1:#x} info2 {info2:#x}"
        self._line(f"#{self._seq:<4} vcpu{vcpu_id} {name}{info}{where}")

    def _on_msr_protocol_enter(self, vcpu_id: int, ghcb_gpa: int) -> None:
        self.requests[f"MSR {describe_msr(ghcb_gpa).split()[0]}"] += 1
        self._line(f"      MSR protocol {ghcb_gpa:#018x}  {describe_msr(ghcb_gpa)}")

    def _on_msr_protocol_exit(self, vcpu_id: int, ghcb_gpa: int, result: int) -> None:
        if self.terminations.unanswered(vcpu_id, ghcb_gpa):
            self._line("      ignored: no plugin handles this request; the guest reads its "
                       "own value back")  # fmt: skip
            return
        self._line(f"      reply        {ghcb_gpa:#018x}  {describe_msr(ghcb_gpa)}")

    def _on_vmgexit_enter(self, vcpu_id: int, exit_reason: int, info1: int, info2: int) -> None:
        name = exit_name(exit_reason)
        self.requests[f"GHCB {name}"] += 1
        self._line(f"      GHCB {name}  {describe_request(exit_reason, info1, info2)}")

    def _on_sim_vc(self, vm: str, vcpu: int, exit_code: int, rip: int, insn: bytes,
                   bits: int) -> None:  # fmt: skip
        self._line(f"      #VC {exit_name(exit_code)} at {rip:#x}  "
                   f"{disassemble(insn, rip, bits)} (simulator's view)")  # fmt: skip

    def _on_vmgexit_exit(self, vcpu_id: int, exit_reason: int, info1: int, info2: int) -> None:
        self._line(f"      reply: {describe_response(info1, info2)}")

    def _on_exit_handled(
        self, vcpu_id: int, kind: str, code: int, plugin: str, notes: dict[str, Any]
    ) -> None:
        for text in notes.values():
            self._line(f"      {plugin}: {text}")

    # -- what the hypervisor side did on its own account ---------------------------------
    #
    # These name their vCPU: they happen between exits, or for another vCPU than the
    # one whose exit is being handled (an IPI), so the exit above them may not be theirs.

    def _labelled(self, label: str, text: str) -> None:
        """A line in the MSR protocol lines' columns: ``      label        text``."""
        self._line(f"      {label:<12} {text}")

    def _on_plugin_failed(self, vcpu_id: int, plugin: str, kind: str, code: int,
                          error: str | None, message: str) -> None:  # fmt: skip
        problem = message if error is None else f"{error}: {message}"
        self._labelled("plugin error", f"vcpu{vcpu_id} {plugin}: handler for {kind} "
                       f"{code_name(ExitKind(kind), code)}: {problem}")  # fmt: skip

    def _on_interrupt_injected(self, vcpu_id: int, vector: int, how: str) -> None:
        self._labelled("interrupt", f"vcpu{vcpu_id} vector {vector:#x} ({_HOW.get(how, how)})")

    def _on_nmi_injected(self, vcpu_id: int, how: str) -> None:
        self._labelled("NMI", f"vcpu{vcpu_id} ({_HOW.get(how, how)})")

    def _on_init_delivered(self, vcpu_id: int) -> None:
        self._labelled("INIT", f"vcpu{vcpu_id}: waits for a SIPI")

    def _on_sipi_delivered(self, vcpu_id: int, vector: int, start: int) -> None:
        self._labelled("SIPI", f"vcpu{vcpu_id} vector {vector:#x} (start {start:#x})")

    def _on_device_access(self, vcpu_id: int, device: str, bus: str, address: int, size: int,
                          direction: str, value: int) -> None:  # fmt: skip
        access = describe_access(bus, address, size, direction, value)
        self._labelled("device", f"vcpu{vcpu_id} {device}: {access}")

    # -- the end of a run -------------------------------------------------------------------

    def record_exit(self, vcpu_id: int, exit_: KvmExit) -> None:
        """The exit ``Vcpu.run`` of vCPU ``vcpu_id`` returned to userspace."""
        self._line(f"      -> to userspace: {self.describe_exit(exit_, vcpu_id)}")

    def note(self, text: str) -> None:
        """A line of the VMM's own (launch digest, warnings)."""
        self._line(text)

    def term_reason(self, exit_: KvmExit, vcpu_id: int) -> Reason | None:
        """:func:`term_reason` of an exit of ``vcpu_id``, with the reason this trace saw."""
        return self.terminations.term_reason(exit_, vcpu_id)

    def ignored_termination(self, vcpu_id: int) -> Reason | None:
        """The reason of the vCPU's last termination request nobody handled, if any."""
        return self.terminations.ignored_termination(vcpu_id)

    def describe_exit(self, exit_: KvmExit, vcpu_id: int) -> str:
        """:func:`describe_exit` with the GHCB termination reason this trace saw."""
        return self.terminations.describe_exit(exit_, vcpu_id)

    def summary(self, exit_: KvmExit, vcpu_id: int) -> list[str]:
        def counted(counter: Counter[str]) -> str:
            return ", ".join(f"{name} {n}" for name, n in sorted(counter.items())) or "none"

        ended = self.describe_exit(exit_, vcpu_id)
        if isinstance(exit_, Hlt):
            ended += " (the guest halted and no interrupt source can wake it)"
        return [f"VM ended: {ended}", f"exits: {counted(self.exits)}",
                f"requests: {counted(self.requests)}"]  # fmt: skip
