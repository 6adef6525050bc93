"""A readable trace of a run: every exit with its decoded meaning, and a summary.

:class:`Trace` is an event sink: it listens to everything kvm reports (the same
events the observer hooks get) and decodes the numbers with ``sevsim.arch``: exit
codes, GHCB MSR protocol requests and replies, GHCB error replies, termination
reasons. It also shows the guest instruction behind each exit, disassembled with
capstone from the simulator's debug record of the exit: a view a real hypervisor
does not have, marked as such.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any, TypeGuard

from sevsim.arch import ghcb_msr as G
from sevsim.arch.disasm import capstone
from sevsim.arch.exits import GhcbErr, GhcbResp, SvmExit, VmgExit, exit_name
from sevsim.arch.ghcb_msr import TERM_REASON_SET, GhcbMsr, TermReason, bits
from sevsim.arch.ioio import IoioInfo
from sevsim.kvm.dispatch import ExitKind
from sevsim.kvm.exits import Hlt, KvmExit, SystemEvent, SystemEventType

#: Reasons of sevsim's native #VC handler (its own reason set), by name.
_TERM_REASONS = {(TERM_REASON_SET, r.value): f"sevsim #VC handler: {r.name}" for r in TermReason}

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


def describe_reason(reason_set: int, reason_code: int) -> str:
    """A termination reason: ``set 1 code 4 (GHCB_TERM_CPUID)``."""
    why = (_TERM_REASONS.get((reason_set, reason_code))
           or G.term_reason_name(reason_set, reason_code))  # fmt: skip
    return f"set {reason_set} code {reason_code} ({why})"


def describe_msr(value: int) -> str:
    """A GHCB MSR protocol value in words, request or response."""
    code = G.info(value)
    try:
        name = GhcbMsr(code).name
    except ValueError:
        return f"unknown GHCBInfo {code:#05x}"
    match code:
        case GhcbMsr.SEV_INFO_RESP:
            return (f"{name} max {bits(value, 63, 48)} min {bits(value, 47, 32)} "
                    f"C-bit {bits(value, 31, 24)}")  # fmt: skip
        case GhcbMsr.CPUID_REQ:
            return f"{name} fn {bits(value, 63, 32):#x} E{'ABCD'[bits(value, 31, 30)]}X"
        case GhcbMsr.CPUID_RESP:
            data = bits(value, 63, 32)
            text = data.to_bytes(4, "little")
            shown = f" '{text.decode()}'" if all(32 <= b < 127 for b in text) else ""
            return f"{name} {data:#010x}{shown}"
        case GhcbMsr.TERM_REQ:
            return f"{name} {describe_reason(*G.term_reason(value))}"  # type: ignore[misc]
        case GhcbMsr.HV_FT_RESP:
            return f"{name} features {value >> 12:#x}"
    return name


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


def is_sev_term(exit_: KvmExit) -> TypeGuard[SystemEvent]:
    return isinstance(exit_, SystemEvent) and exit_.type is SystemEventType.SEV_TERM


Reason = tuple[int, int]


def term_reason(exit_: KvmExit, ghcb_reason: Reason | None = None) -> Reason | None:
    """(reason set, reason code) of a SEV_TERM exit, if known. The MSR protocol's
    request carries it; a GHCB TERM_REQUEST's exit carries only the GHCB's GPA, and
    its reason (``ghcb_reason``) is known only to whoever saw the request (KVM logs
    it; the trace records it)."""
    if not is_sev_term(exit_) or not exit_.data:
        return None
    return G.term_reason(exit_.data[0]) if G.info(exit_.data[0]) else ghcb_reason


def describe_exit(exit_: KvmExit, ghcb_reason: tuple[int, int] | None = None) -> str:
    """An exit in words, a termination request's reason included when known
    (:func:`term_reason`)."""
    text = exit_.describe()
    if is_sev_term(exit_) and exit_.data:
        data = exit_.data[0]
        if G.info(data):
            return f"{text}: {describe_msr(data)}"
        text += f": GHCB TERM_REQUEST at {data:#x}"
        if ghcb_reason is not None:
            text += f" {describe_reason(*ghcb_reason)}"
    return text


class Trace:
    """Records a run as lines of text (and echoes them, if asked) plus exit counts."""

    def __init__(
        self,
        echo: Callable[[str], None] | None = None,
        *,
        hypervisor_view: bool = False,
        shown: Callable[[str, Mapping[str, Any]], bool] | None = None,
    ) -> None:
        self.lines: list[str] = []
        #: Which events' lines are echoed (``TraceFilter.matches``; None: all). The
        #: trace still hears every event: the end of a run is decoded from them.
        self._shown = shown
        self._echoing = True
        #: Show only what KVM could see: no guest RIP, instruction or #VC.
        self.hypervisor_view = hypervisor_view
        #: #VMEXITs by exit code name.
        self.exits: Counter[str] = Counter()
        #: What the guest asked for: MSR-protocol requests and GHCB exit codes.
        self.requests: Counter[str] = Counter()
        #: The reason of each vCPU's last GHCB TERM_REQUEST (from the request, as KVM
        #: logs it: the SEV_TERM exit carries only the GHCB's address), by vCPU.
        self._ghcb_term_reasons: dict[int, tuple[int, int]] = {}
        #: The reason of a vCPU's last TERM_REQ that no plugin handled (the guest went
        #: on), by vCPU.
        self._ignored_terminations: dict[int, tuple[int, int]] = {}
        self._echo = echo
        self._seq = 0
        #: The MSR-protocol request being handled, by vCPU, and whether a plugin did.
        self._request: dict[int, int] = {}
        self._handled: set[int] = set()
        #: The silicon's account of each vCPU's last #VMEXIT (``sim_exit``), shown on
        #: the exit's line; empty when the trace sees only what KVM sees.
        self._sim_exits: dict[int, dict[str, Any]] = {}

    # -- EventSink --------------------------------------------------------------------

    def wants(self, name: str) -> bool:
        if self.hypervisor_view and name.startswith("sim_"):
            return False
        return hasattr(self, f"_on_{name}")

    def emit(self, name: str, /, **fields: Any) -> None:
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
        self._request[vcpu_id] = ghcb_gpa
        self._handled.discard(vcpu_id)

    def _on_msr_protocol_exit(self, vcpu_id: int, ghcb_gpa: int, result: int) -> None:
        if vcpu_id not in self._handled and ghcb_gpa == self._request.get(vcpu_id):
            self._line("      ignored: no plugin handles this request; the guest reads its "
                       "own value back")  # fmt: skip
            reason = G.term_reason(ghcb_gpa)
            if reason is not None:
                self._ignored_terminations[vcpu_id] = reason
            return
        self._line(f"      reply        {ghcb_gpa:#018x}  {describe_msr(ghcb_gpa)}")

    def _on_vmgexit_enter(self, vcpu_id: int, exit_reason: int, info1: int, info2: int) -> None:
        name = exit_name(exit_reason)
        self.requests[f"GHCB {name}"] += 1
        if exit_reason == VmgExit.TERM_REQUEST:
            self._ghcb_term_reasons[vcpu_id] = G.ghcb_term_reason(info1)
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
        if kind == ExitKind.MSR_PROTOCOL.value:
            self._handled.add(vcpu_id)
        for text in notes.values():
            self._line(f"      {plugin}: {text}")

    # -- the end of a run -------------------------------------------------------------------

    def record_exit(self, vcpu_id: int, exit_: KvmExit) -> None:
        """The exit ``Vcpu.run`` of vCPU ``vcpu_id`` returned to userspace."""
        self._line(f"      -> to userspace: {self.describe_exit(exit_, vcpu_id)}")

    def note(self, text: str) -> None:
        """A line of the VMM's own (launch digest, warnings)."""
        self._line(text)

    def term_reason(self, exit_: KvmExit, vcpu_id: int) -> tuple[int, int] | None:
        """:func:`term_reason` of an exit of ``vcpu_id``, with the reason this trace saw."""
        return term_reason(exit_, self._ghcb_term_reasons.get(vcpu_id))

    def ignored_termination(self, vcpu_id: int) -> tuple[int, int] | None:
        """The reason of the vCPU's last termination request nobody handled, if any."""
        return self._ignored_terminations.get(vcpu_id)

    def describe_exit(self, exit_: KvmExit, vcpu_id: int) -> str:
        """:func:`describe_exit` with the GHCB termination reason this trace saw."""
        return describe_exit(exit_, self._ghcb_term_reasons.get(vcpu_id))

    def summary(self, exit_: KvmExit, vcpu_id: int) -> list[str]:
        def counted(counter: Counter[str]) -> str:
            return ", ".join(f"{name} {n}" for name, n in sorted(counter.items())) or "none"

        ended = self.describe_exit(exit_, vcpu_id)
        if isinstance(exit_, Hlt):
            ended += " (the guest halted and no interrupt source can wake it)"
        return [f"VM ended: {ended}", f"exits: {counted(self.exits)}",
                f"requests: {counted(self.requests)}"]  # fmt: skip
