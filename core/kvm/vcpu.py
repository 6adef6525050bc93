"""A KVM vCPU of an SEV-ES guest: KVM_RUN, exit handling, the VMGEXIT paths.

``run()`` is KVM_RUN: it VMRUNs the guest through the platform until an exit must
go to userspace, and returns that exit as a typed value. Everything the hypervisor
learns about the guest comes from the VMCB control area and the GHCB page; the
guest's registers after launch are out of reach (``guest_state_protected``).
"""

from __future__ import annotations

import time
import traceback
from typing import TYPE_CHECKING, Any

from sevsim.arch import ghcb_msr
from sevsim.arch.exits import SNP_ONLY_VMGEXITS, GhcbErr, SvmExit
from sevsim.arch.ghcb import GHCB_PAGE_SIZE, GHCB_USAGE_DEFAULT, Ghcb
from sevsim.arch.vmcb import VMCB_CONTROL, EventInj
from sevsim.arch.vmsa import VMSA, VMSA_PAGE_SIZE, Segment
from sevsim.errors import FOREIGN_FAULTS, GuestMemoryError, VcpuError
from sevsim.kvm import outcome as O
from sevsim.kvm.context import ExitContext
from sevsim.kvm.control_regs import ControlRegs
from sevsim.kvm.dispatch import ExitHandler, ExitKind, code_name
from sevsim.kvm.exits import (
    ApResetHold,
    FailEntry,
    Hlt,
    InternalError,
    InternalErrorSub,
    KvmExit,
    RunFailed,
    Shutdown,
    SystemEvent,
)
from sevsim.kvm.ghcb_map import MappedGhcb
from sevsim.kvm.msrs import MsrModel
from sevsim.kvm.pending import NMI_EVENT, ApResetHoldType, MpState, NmiState
from sevsim.kvm.scratch import Scratch
from sevsim.kvm.svm_setup import init_vmcb

if TYPE_CHECKING:
    from sevsim.kvm.vm import Vm

#: The three fields every GHCB-page VMGEXIT must mark valid.
_ALWAYS_REQUIRED = ("sw_exit_code", "sw_exit_info_1", "sw_exit_info_2")
#: GPRs ``sev_es_sync_from_ghcb`` takes from the GHCB when valid.
_SYNCED_IN = ("rax", "rbx", "rcx", "rdx", "rsi")
#: GPRs ``sev_es_sync_to_ghcb`` always writes back.
_SYNCED_OUT = ("rax", "rbx", "rcx", "rdx")
_GPRS = ("rax", "rbx", "rcx", "rdx", "rsp", "rbp", "rsi", "rdi",
         "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip")  # fmt: skip


class Vcpu:
    """One vCPU: its VMCB, its VMSA page, and KVM's per-vCPU SEV-ES state."""

    def __init__(self, vm: Vm, vcpu_id: int) -> None:
        self.vm = vm
        self.id = vcpu_id
        platform = vm.platform
        self.vmsa = platform.alloc_vmsa((vm.name, vcpu_id))
        self.msrpm_pa, msrpm = platform.alloc_msrpm()
        self.vmcb = bytearray(VMCB_CONTROL.size)
        init_vmcb(self.vmcb, msrpm, vm.asid, self.vmsa.pa, self.msrpm_pa)
        # sev_es_vcpu_reset: the GHCB MSR starts out holding the SEV_INFO response.
        self._set_ghcb_msr(vm.sev_info())
        #: Register state set by the VMM before launch (VMSA field names).
        self._initial: dict[str, Any] = {}
        self.guest_state_protected = False
        #: KVM's ``vcpu->arch.regs`` (GPRs) as the last GHCB sync left them.
        self.regs: dict[str, int] = dict.fromkeys(_GPRS, 0)
        self.cpl = 0
        self.xcr0 = 1
        #: DR7 as the guest last wrote it through the GHCB (tracked, without effect).
        self.dr7 = 0x400
        #: CR0/CR4/CR8/EFER as KVM knows them: the initial state, then the write traps.
        self.cr = ControlRegs()
        self.msrs = MsrModel()
        self.nmi_state = NmiState()
        #: ``KVM_MP_STATE_*``; AP_RESET_HOLD while an AP is parked (see ``deliver_sipi``).
        self.mp_state = MpState.RUNNABLE
        self.ap_reset_hold_type = ApResetHoldType.NONE
        self.received_first_sipi = False
        self._ghcb: MappedGhcb | None = None
        self._ctx: ExitContext | None = None
        self._dead: str | None = None

    # -- before launch -------------------------------------------------------------

    def set_state(self, fields: dict[str, Any]) -> None:
        """KVM_SET_REGS/SREGS: set VMSA fields before LAUNCH_UPDATE_VMSA.

        Refused once the state is protected, as for KVM_X86_SEV_ES_VM guests.
        """
        if self.guest_state_protected:
            raise VcpuError(
                f"vCPU {self.id}: guest state is protected after LAUNCH_UPDATE_VMSA; "
                "its registers can no longer be set (-EINVAL)"
            )
        unknown = [name for name in fields if name not in VMSA]
        if unknown:
            raise VcpuError(f"vCPU {self.id}: {unknown} are not VMSA fields")
        self._initial.update(fields)

    def sync_vmsa(self, sev_features: int = 0) -> None:
        """``sev_es_sync_vmsa``: write the initial state into the VMSA page."""
        state = {**self._initial, "sev_features": sev_features}
        dr7 = state.get("dr7", 0x400)
        if dr7 & ~0x400:
            raise VcpuError(f"vCPU {self.id}: DR7 {dr7:#x} has breakpoints set; KVM refuses "
                            "LAUNCH_UPDATE_VMSA while the guest is being debugged (-EINVAL)")
        values = {k: (v.pack() if isinstance(v, Segment) else v) for k, v in state.items()}
        self.cr = ControlRegs.from_state(state)
        self.vmsa.host_write(0, bytes(VMSA.pack(values, size=VMSA_PAGE_SIZE)))

    # -- KVM_RUN ---------------------------------------------------------------------

    @property
    def dead(self) -> str | None:
        return self._dead

    def run(self, timeout: float | None = None) -> KvmExit:
        """KVM_RUN: run until an exit userspace must see.

        ``timeout`` (seconds) bounds the call, as a signal would: when it has passed,
        KVM_RUN returns -EINTR and the vCPU can be run again.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._dead is not None:
            raise VcpuError(f"vCPU {self.id} cannot run again: {self._dead}")
        if self.vm.dead is not None:
            raise VcpuError(f"vCPU {self.id}: VM is terminated: {self.vm.dead}")
        if not self.guest_state_protected:
            raise VcpuError(f"vCPU {self.id}: run LAUNCH_UPDATE_VMSA before KVM_RUN")
        if self.mp_state is MpState.AP_RESET_HOLD:
            # vcpu_block: an NMI wakes a parked vCPU; otherwise KVM_RUN would block
            # until a signal, which sevsim reports at once.
            nmi = self.nmi_state
            if not (nmi.queued or (nmi.pending and not nmi.masked)):  # kvm_vcpu_has_events
                return RunFailed("EINTR", f"vCPU {self.id} is parked in AP reset hold; "
                                 "an INIT-SIPI (deliver_sipi) or an NMI wakes it")  # fmt: skip
            self.mp_state = MpState.RUNNABLE
        while True:
            self.prepare_switch_to_guest()
            # req_immediate_exit: an event still waits, so leave the guest right after
            # entry (the host IPIs itself) and inject it at the next one.
            immediate = self._inject_pending_events()
            entry_deadline = time.monotonic() if immediate else deadline
            self.vm.platform.vmrun(self.vmcb, self.vm.memory, entry_deadline)
            result = self.handle_exit()
            if self.vm.dead is not None and not isinstance(result, O.ExitToUser):
                return RunFailed("EIO", self.vm.dead)
            expired = deadline is not None and time.monotonic() >= deadline
            if expired and isinstance(result, O.Resume):
                return RunFailed("EINTR", f"KVM_RUN interrupted after its {timeout:g} s limit")
            if isinstance(result, O.Resume):
                continue
            if isinstance(result, O.Fail):
                return RunFailed(result.errno, result.why)
            if isinstance(result.exit, Shutdown):
                self._dead = "it shut down (triple fault or VMSA integrity failure)"
            if isinstance(result.exit, RunFailed) and result.exit.plugin is not None:
                self.vm.terminate(result.exit.why)
            return result.exit

    def _exit_code(self) -> int:
        lo = VMCB_CONTROL.get(self.vmcb, "exit_code")
        return VMCB_CONTROL.get(self.vmcb, "exit_code_hi") << 32 | lo

    def handle_exit(self) -> O.Outcome:
        """``svm_handle_exit``: act on the #VMEXIT recorded in the VMCB."""
        code = self._exit_code()
        info1 = VMCB_CONTROL.get(self.vmcb, "exit_info_1")
        info2 = VMCB_CONTROL.get(self.vmcb, "exit_info_2")
        self.vm.emit("vmexit", vcpu_id=self.id, exit_code=code, info1=info1, info2=info2)
        if code == SvmExit.VMGEXIT:
            return self._vmgexit()
        if code == SvmExit.SHUTDOWN:
            return O.ExitToUser(Shutdown())
        if code == SvmExit.ERR:
            return O.ExitToUser(FailEntry(code))
        if code == SvmExit.INTR:  # the host's interrupt: handled by the host, resume
            return O.RESUME
        handler = self.vm.lookup(ExitKind.VMEXIT, code)
        if handler is not None:
            ctx = ExitContext(self, ExitKind.VMEXIT, code, info1, info2)
            return self._call(handler, ctx)
        if code == SvmExit.HLT:
            return O.ExitToUser(Hlt())
        return self.invalid_exit(code)

    def invalid_exit(self, code: int) -> O.ExitToUser:
        """``svm_handle_invalid_exit``: KVM_EXIT_INTERNAL_ERROR, UNEXPECTED_EXIT_REASON."""
        return O.ExitToUser(InternalError(
            InternalErrorSub.UNEXPECTED_EXIT_REASON, (code, self.id),
            f"no handler for exit {code_name(ExitKind.VMEXIT, code)}",
        ))  # fmt: skip

    def _call(self, handler: ExitHandler, ctx: ExitContext) -> O.Outcome:
        """Run a handler; a bug in it ends only this VM, naming the plugin.

        A bug is an exception, a return value that is not an outcome, or a register
        or MSR value that does not fit 64 bits.
        """
        self._ctx = ctx
        try:
            result = handler.handler(ctx)
        except FOREIGN_FAULTS as exc:  # a plugin bug must not take the host down
            return self._plugin_failed(handler, exc)
        if result is not None and not isinstance(result, O.Resume | O.ExitToUser | O.Fail):
            return self._plugin_failed(handler, f"returned {result!r}, expected an outcome "
                                       "(sevsim.kvm.outcome) or None")  # fmt: skip
        scratch = ctx.scratch
        if scratch is not None and not (isinstance(scratch, Scratch)
                                        and isinstance(scratch.data, bytearray | memoryview)
                                        and len(scratch.data) == scratch.length):  # fmt: skip
            ctx.scratch = None  # nothing of it goes back to the guest
            return self._plugin_failed(handler, f"left ctx.scratch = {scratch!r}, not the "
                                       "area it mapped with its length")  # fmt: skip
        values = {"GHCB MSR": ctx.msr, **{n: ctx.regs[n] for n in _SYNCED_OUT if n in ctx.regs}}
        for name, value in values.items():
            if not isinstance(value, int) or not 0 <= value < 1 << 64:
                return self._plugin_failed(handler, f"left {name} = {value!r}, not a u64")
        self.vm.emit("exit_handled", vcpu_id=self.id, kind=ctx.kind.value, code=ctx.code,
                     plugin=handler.owner, notes=ctx.notes)  # fmt: skip
        return O.RESUME if result is None else result

    @staticmethod
    def _plugin_failed(handler: ExitHandler, problem: BaseException | str) -> O.ExitToUser:
        who = handler.owner
        if isinstance(problem, BaseException):
            last = traceback.extract_tb(problem.__traceback__)[-1]
            problem = (f"raised {type(problem).__name__}: {problem} "
                       f"(at {last.filename}:{last.lineno})")  # fmt: skip
        why = f"handler of plugin {who!r} for {handler.describe()} {problem}"
        return O.ExitToUser(RunFailed("EIO", why, plugin=who))

    # -- events between runs: NMIs, AP reset hold and SIPI ------------------------------

    def nmi(self) -> None:
        """KVM_NMI: queue an NMI; it is injected at an entry when NMIs are unmasked."""
        self.nmi_state.queued += 1

    def _inject_pending_events(self) -> bool:
        """``inject_pending_event``: an NMI goes into EVENTINJ unless another event
        (an exception KVM queued) already occupies it this entry; then True, for an
        immediate exit that lets the NMI in at the next entry."""
        nmi = self.nmi_state
        if not (nmi.queued or nmi.pending):
            return False
        nmi.process()
        if VMCB_CONTROL.get(self.vmcb, "event_inj") & EventInj.VALID:
            return bool(nmi.pending)  # -EBUSY, whether or not NMIs are masked
        if nmi.take():
            self.queue_event(NMI_EVENT)
        return False

    def ap_reset_hold(self, kind: ApResetHoldType) -> O.Outcome:
        """``kvm_emulate_ap_reset_hold``: park this vCPU until a SIPI.

        sevsim's LAPIC lives in the VMM, so KVM tells it, as KVM does without an
        in-kernel LAPIC (KVM_EXIT_AP_RESET_HOLD); and it records the parked state as an
        in-kernel LAPIC would (mp_state AP_RESET_HOLD, the hold type), so that the
        VMM's SIPI can be answered the SEV-ES way (:meth:`deliver_sipi`). The GHCB of
        an AP_HLT_LOOP stays mapped until the next entry.
        """
        self.ap_reset_hold_type = kind
        self.mp_state = MpState.AP_RESET_HOLD
        return O.ExitToUser(ApResetHold())

    def deliver_sipi(self, vector: int) -> None:
        """An INIT-SIPI from the local APIC (sevsim's LAPIC is in the VMM, which calls
        this where KVM's ``kvm_apic_accept_events`` would).

        ``sev_vcpu_deliver_sipi_vector``: the first SIPI is swallowed (the AP starts
        from its VMSA; KVM cannot set its CS:IP); a later one answers the AP's reset
        hold request. Either way the vCPU is runnable again, and the vector is
        ignored: the AP reads its jump table itself.
        """
        if not 0 <= vector <= 0xFF:
            raise VcpuError(f"vCPU {self.id}: SIPI vector {vector!r} is not in 0..0xff")
        self.mp_state = MpState.RUNNABLE
        if not self.received_first_sipi:
            self.received_first_sipi = True
            return
        if self.ap_reset_hold_type is ApResetHoldType.NAE and self._ctx is not None:
            self._ctx.success(1)
            self._write_ghcb()
        elif self.ap_reset_hold_type is ApResetHoldType.MSR_PROTO:
            self._set_ghcb_msr(1 << 12 | ghcb_msr.GhcbMsr.AP_RESET_HOLD_RESP)

    # -- VMGEXIT (sev_handle_vmgexit) ----------------------------------------------------

    def queue_event(self, event_inj: int, error_code: int = 0) -> None:
        """Write EVENTINJ (and its error code) for the next VMRUN."""
        VMCB_CONTROL.set(self.vmcb, "event_inj", event_inj & 0xFFFF_FFFF)
        VMCB_CONTROL.set(self.vmcb, "event_inj_err", error_code)

    def _set_ghcb_msr(self, value: int) -> None:
        VMCB_CONTROL.set(self.vmcb, "ghcb_gpa", value)

    def _vmgexit(self) -> O.Outcome:
        ghcb_gpa = VMCB_CONTROL.get(self.vmcb, "ghcb_gpa")
        if ghcb_msr.info(ghcb_gpa):
            return self._msr_protocol(ghcb_gpa)
        if ghcb_gpa == 0:
            return self.vm.compat.ghcb_unmapped("GHCB GPA is 0")
        try:
            raw = self.vm.memory.read(ghcb_gpa, GHCB_PAGE_SIZE)
        except GuestMemoryError:
            return self.vm.compat.ghcb_unmapped(f"GHCB GPA {ghcb_gpa:#x} is not guest RAM")
        ghcb = MappedGhcb(raw, ghcb_gpa)
        code = ghcb["sw_exit_code"]
        self.vm.emit("vmgexit_enter", vcpu_id=self.id, exit_reason=code,
                     info1=ghcb["sw_exit_info_1"], info2=ghcb["sw_exit_info_2"])  # fmt: skip
        self._ghcb = ghcb
        snapshot = self._sync_from_ghcb(ghcb)
        try:
            handler, error = self._validate(snapshot, code)
        except _RequiresFailed as bad:
            return self._plugin_failed(bad.handler, bad.problem)
        ctx = ExitContext(self, ExitKind.VMGEXIT, code, snapshot["sw_exit_info_1"],
                          snapshot["sw_exit_info_2"], ghcb=ghcb, regs=self.regs)  # fmt: skip
        self._ctx = ctx
        if error is not None:
            result = self.vm.compat.bad_input(ctx, error, snapshot)
        else:
            ctx.success()
            assert handler is not None
            result = self._call(handler, ctx)
        self._write_ghcb()
        return result

    def _write_ghcb(self) -> None:
        """KVM works on the mapped GHCB page: what it wrote there (valid bitmap cleared,
        reply, a scratch area inside the page) is in guest memory at once, even when
        KVM_RUN now returns to userspace. Only RAX..RDX wait for the next entry."""
        if self._ghcb is not None:
            self._ghcb.flush(self.vm.memory)

    def _sync_from_ghcb(self, ghcb: Ghcb) -> Ghcb:
        """``sev_es_sync_from_ghcb``: snapshot, zero the GPRs, take the valid ones."""
        snapshot = Ghcb(ghcb.raw)
        for name in self.regs:
            self.regs[name] = 0
        for name in _SYNCED_IN:
            self.regs[name] = snapshot.get_if_valid(name)
        self.cpl = snapshot.get_if_valid("cpl")
        if snapshot.is_valid("xcr0"):
            self.xcr0 = snapshot["xcr0"]
        code = snapshot["sw_exit_code"]
        VMCB_CONTROL.set(self.vmcb, "exit_code", code & 0xFFFF_FFFF)
        VMCB_CONTROL.set(self.vmcb, "exit_code_hi", code >> 32)
        VMCB_CONTROL.set(self.vmcb, "exit_info_1", snapshot["sw_exit_info_1"])
        VMCB_CONTROL.set(self.vmcb, "exit_info_2", snapshot["sw_exit_info_2"])
        ghcb.valid_bitmap = 0
        return snapshot

    def _validate(self, snapshot: Ghcb, code: int) -> tuple[ExitHandler | None, GhcbErr | None]:
        """``sev_es_validate_vmgexit`` on the snapshot, with required bits from the table."""
        if snapshot["ghcb_usage"] != GHCB_USAGE_DEFAULT:
            return None, GhcbErr.INVALID_USAGE
        if not all(snapshot.is_valid(name) for name in _ALWAYS_REQUIRED):
            return None, GhcbErr.MISSING_INPUT
        handler = self.vm.lookup(ExitKind.VMGEXIT, code)
        if handler is None or not self.vm.compat.knows_vmgexit(code):
            # The SNP codes fail with KVM's default reason, MISSING_INPUT, for SEV-ES.
            snp = code in SNP_ONLY_VMGEXITS
            return None, GhcbErr.MISSING_INPUT if snp else GhcbErr.INVALID_EVENT
        try:
            required = handler.required_fields(snapshot)
        except FOREIGN_FAULTS as exc:  # the plugin's requires() is plugin code too
            raise _RequiresFailed(handler, exc) from exc
        if not all(snapshot.is_valid(name) for name in required):
            return None, GhcbErr.MISSING_INPUT
        return handler, None

    def prepare_switch_to_guest(self) -> None:
        """``sev_es_unmap_ghcb``: scratch back, trace, sync registers, release the GHCB."""
        ghcb, ctx = self._ghcb, self._ctx
        self._ctx = None
        self.ap_reset_hold_type = ApResetHoldType.NONE
        if ghcb is None:
            return
        if ctx is not None and ctx.scratch is not None:
            ctx.scratch.write_back(self.vm.memory)
        self.vm.emit("vmgexit_exit", vcpu_id=self.id, exit_reason=ghcb["sw_exit_code"],
                     info1=ghcb["sw_exit_info_1"], info2=ghcb["sw_exit_info_2"])  # fmt: skip
        for name in _SYNCED_OUT:
            ghcb[name] = self.regs[name]
        self._write_ghcb()
        self._ghcb = None

    # -- the GHCB MSR protocol (sev_handle_vmgexit_msr_protocol) -----------------------

    def _msr_protocol(self, value: int) -> O.Outcome:
        self.vm.emit("msr_protocol_enter", vcpu_id=self.id, ghcb_gpa=value)
        code = ghcb_msr.info(value)
        handler = self.vm.lookup(ExitKind.MSR_PROTOCOL, code)
        if handler is None or not self.vm.compat.knows_msr_request(code):
            return self.vm.compat.unknown_msr_request(self, value)
        ctx = ExitContext(self, ExitKind.MSR_PROTOCOL, code, msr=value)
        result = self._call(handler, ctx)
        self._set_ghcb_msr(ctx.msr)
        terminated = isinstance(result, O.ExitToUser) and isinstance(result.exit, SystemEvent)
        if not terminated:  # newest KVM skips the event on the terminate path only
            self.vm.emit("msr_protocol_exit", vcpu_id=self.id, ghcb_gpa=ctx.msr,
                         result=1 if isinstance(result, O.Resume) else 0)  # fmt: skip
        return result

    def describe(self) -> str:
        return f"vCPU {self.id} of {self.vm.name}"



class _RequiresFailed(Exception):
    """A handler's ``requires`` callable failed while the exit was being validated."""

    def __init__(self, handler: ExitHandler, problem: BaseException) -> None:
        super().__init__(str(problem))
        self.handler = handler
        self.problem = problem
