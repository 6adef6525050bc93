"""Why a guest asked to terminate, as KVM learns it, and exits described in words.

A termination request reaches userspace as a SEV_TERM system event. Through the GHCB
MSR protocol the event carries the request itself (reason set and code inside); through
a GHCB page it carries only the page's GPA, and the reason was in the request KVM read
from the page (``sw_exit_info_1``), which KVM logs but does not pass on. Whoever must
judge how a run ended (the VMM's run loop, ``sevsim run``'s exit status) needs that
reason, so it lives here, on the hypervisor side: :class:`Terminations` hears kvm's
events and remembers what they said. The trace uses the same words for its lines, so
this module is where they are defined once.
"""

from __future__ import annotations

from typing import Any, TypeGuard

from sevsim.arch import ghcb_msr as G
from sevsim.arch.exits import VmgExit
from sevsim.arch.ghcb_msr import TERM_REASON_SET, GhcbMsr, TermReason, bits
from sevsim.kvm.dispatch import ExitKind
from sevsim.kvm.exits import KvmExit, SystemEvent, SystemEventType

#: (reason set, reason code) of a termination request.
Reason = tuple[int, int]

#: Reasons of sevsim's native #VC handler (its own reason set), by name.
_TERM_REASONS = {(TERM_REASON_SET, r.value): f"sevsim #VC handler: {r.name}" for r in TermReason}


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


def is_sev_term(exit_: KvmExit) -> TypeGuard[SystemEvent]:
    return isinstance(exit_, SystemEvent) and exit_.type is SystemEventType.SEV_TERM


def term_reason(exit_: KvmExit, ghcb_reason: Reason | None = None) -> Reason | None:
    """(reason set, reason code) of a SEV_TERM exit, if known. The MSR protocol's
    request carries it; a GHCB TERM_REQUEST's exit carries only the GHCB's GPA, and
    its reason (``ghcb_reason``) is known only to whoever saw the request
    (:class:`Terminations`)."""
    if not is_sev_term(exit_) or not exit_.data:
        return None
    return G.term_reason(exit_.data[0]) if G.info(exit_.data[0]) else ghcb_reason


def describe_exit(exit_: KvmExit, ghcb_reason: Reason | None = None) -> str:
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


class Terminations:
    """An event sink that remembers, per vCPU, what kvm's events said about termination:
    the reason of the last GHCB TERM_REQUEST (the exit carries only the GHCB's GPA), and
    a TERM_REQ through the MSR protocol that no plugin handled (the guest read its own
    value back and went on, to halt or spin)."""

    #: The events it listens to.
    HEARS = frozenset({"vmgexit_enter", "msr_protocol_enter", "msr_protocol_exit",
                       "exit_handled"})  # fmt: skip

    def __init__(self) -> None:
        self._ghcb_reasons: dict[int, Reason] = {}
        self._ignored: dict[int, Reason] = {}
        #: The MSR-protocol request being handled, by vCPU, and whether a plugin did.
        self._request: dict[int, int] = {}
        self._handled: set[int] = set()

    # -- EventSink ----------------------------------------------------------------------

    def wants(self, name: str) -> bool:
        return name in self.HEARS

    def emit(self, name: str, /, **fields: Any) -> None:
        getattr(self, f"_on_{name}")(**fields)

    def _on_vmgexit_enter(self, vcpu_id: int, exit_reason: int, info1: int, info2: int) -> None:
        if exit_reason == VmgExit.TERM_REQUEST:
            self._ghcb_reasons[vcpu_id] = G.ghcb_term_reason(info1)

    def _on_msr_protocol_enter(self, vcpu_id: int, ghcb_gpa: int) -> None:
        self._request[vcpu_id] = ghcb_gpa
        self._handled.discard(vcpu_id)

    def _on_exit_handled(self, vcpu_id: int, kind: str, code: int, plugin: str,
                         notes: dict[str, Any]) -> None:  # fmt: skip
        if kind == ExitKind.MSR_PROTOCOL.value:
            self._handled.add(vcpu_id)

    def _on_msr_protocol_exit(self, vcpu_id: int, ghcb_gpa: int, result: int) -> None:
        if self.unanswered(vcpu_id, ghcb_gpa):
            reason = G.term_reason(ghcb_gpa)
            if reason is not None:
                self._ignored[vcpu_id] = reason

    # -- what it knows -------------------------------------------------------------------

    def unanswered(self, vcpu_id: int, ghcb_gpa: int) -> bool:
        """Whether ``ghcb_gpa``, read back by the vCPU after an MSR-protocol request, is
        the request itself: no plugin handled it."""
        return vcpu_id not in self._handled and ghcb_gpa == self._request.get(vcpu_id)

    def term_reason(self, exit_: KvmExit, vcpu_id: int) -> Reason | None:
        """:func:`term_reason` of an exit of ``vcpu_id``, with the GHCB request's reason."""
        return term_reason(exit_, self._ghcb_reasons.get(vcpu_id))

    def describe_exit(self, exit_: KvmExit, vcpu_id: int) -> str:
        """:func:`describe_exit` with the GHCB termination reason of ``vcpu_id``."""
        return describe_exit(exit_, self._ghcb_reasons.get(vcpu_id))

    def ignored_termination(self, vcpu_id: int) -> Reason | None:
        """The reason of the vCPU's last termination request nobody handled, if any."""
        return self._ignored.get(vcpu_id)
