"""What an exit handler gets: the hypervisor's view of one exit, and how to answer.

KVM's handlers take a ``struct kvm_vcpu *`` and poke at ``svm->sev_es.ghcb``,
``vcpu->arch.regs`` and the VMCB. sevsim hands a plugin one :class:`ExitContext`
holding exactly that view — nothing a real hypervisor could not see — with named
ways to reply (``svm_vmgexit_success``, ``svm_vmgexit_inject_exception``,
``svm_vmgexit_bad_input``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from attrs import define, field

from sevsim.arch.exits import GhcbErr, GhcbResp
from sevsim.arch.vmcb import EventInj
from sevsim.kvm.dispatch import ExitKind
from sevsim.kvm.ghcb_map import MappedGhcb
from sevsim.kvm.outcome import Outcome
from sevsim.kvm.scratch import Scratch, setup_scratch

if TYPE_CHECKING:
    from sevsim.kvm.vcpu import Vcpu
    from sevsim.kvm.vm import Vm


@define(eq=False)
class ExitContext:
    """One exit being handled.

    ``regs`` is KVM's ``vcpu->arch.regs`` after ``sev_es_sync_from_ghcb``: every GPR
    zero except the ones the guest marked valid (RAX, RBX, RCX, RDX, RSI). A handler
    sets results there; RAX..RDX go back to the GHCB on the next VMRUN. For MSR
    protocol exits, ``msr`` holds the GHCB MSR value; set it to reply.
    """

    vcpu: Vcpu
    kind: ExitKind
    code: int
    exit_info_1: int = 0
    exit_info_2: int = 0
    ghcb: MappedGhcb | None = None
    msr: int = 0
    regs: dict[str, int] = field(factory=dict)
    #: The scratch area of this exit, once a handler asked for it.
    scratch: Scratch | None = None
    #: Plugin-specific values handlers may hang on the exit (for the trace).
    notes: dict[str, Any] = field(factory=dict)

    @property
    def vm(self) -> Vm:
        return self.vcpu.vm

    @property
    def settings(self) -> dict[str, Any]:
        """The settings table of the plugin that owns this exit code."""
        handler = self.vm.lookup(self.kind, self.code)
        plugin = handler.plugin if handler else None
        return self.vm.plugin_settings.get(plugin or "", {})

    # -- GHCB replies (sw_exit_info_1 / sw_exit_info_2) -------------------------------

    def _ghcb(self) -> MappedGhcb:
        if self.ghcb is None:
            raise RuntimeError(f"{self.kind.value} exit {self.code:#x} has no GHCB to answer in")
        return self.ghcb

    def set_exit_info(self, info1: int, info2: int) -> None:
        """``svm_vmgexit_set_return_code``: write both response fields."""
        ghcb = self._ghcb()
        ghcb["sw_exit_info_1"] = info1
        ghcb["sw_exit_info_2"] = info2

    def success(self, info2: int = 0) -> None:
        """``svm_vmgexit_success``: info_1 = 0, info_2 = ``info2``."""
        self.set_exit_info(GhcbResp.NO_ACTION, info2)

    def inject_exception(self, vector: int) -> None:
        """Ask the guest to raise ``vector`` (info_1 = 1, info_2 = the event, as KVM)."""
        self.set_exit_info(GhcbResp.ISSUE_EXCEPTION, EventInj.exception(vector))

    def queue_exception(self, vector: int, error_code: int | None = None) -> None:
        """``kvm_queue_exception``: EVENTINJ, delivered by the next VMRUN.

        For an SEV-ES guest that lands wherever the guest is when it resumes: inside
        its #VC handler, right after VMGEXIT. KVM does this for RDPMC and RDTSCP;
        :meth:`inject_exception` (the GHCB reply) is the way the guest can handle.
        """
        self.vcpu.queue_event(EventInj.exception(vector, error_code), error_code or 0)

    def map_scratch(self, length: int, sync: bool) -> Scratch | Outcome:
        """``setup_vmgexit_scratch``: the scratch area of this exit, or the outcome to
        return instead (the guest already told INVALID_SCRATCH_AREA, or -EFAULT)."""
        ghcb = self._ghcb()
        result = setup_scratch(ghcb, ghcb["sw_scratch"], length, sync, self.vm.memory)
        if isinstance(result, GhcbErr):
            return self.vm.compat.bad_scratch(self, result)
        if isinstance(result, Scratch):
            self.scratch = result
        return result

    def bad_input(self, error: GhcbErr) -> None:
        """``svm_vmgexit_bad_input``: info_1 = 2, info_2 = the GHCB_ERR_* code."""
        self.set_exit_info(GhcbResp.MALFORMED_INPUT, error)
