"""A KVM vCPU of an SEV-ES guest: KVM_RUN, exit handling, the VMGEXIT paths.

``run()`` is KVM_RUN: it VMRUNs the guest through the platform until an exit must
go to userspace, and returns that exit as a typed value. Everything the hypervisor
learns about the guest comes from the VMCB control area and the GHCB page; the
guest's registers after launch are out of reach (``guest_state_protected``).

The VMM drives the vCPU as a userspace VMM drives KVM without an in-kernel local
APIC: :meth:`Vcpu.interrupt` is KVM_INTERRUPT, :attr:`Vcpu.request_interrupt_window`
and :attr:`Vcpu.ready_for_interrupt_injection` are the ``kvm_run`` fields of the same
names, :meth:`Vcpu.nmi` is KVM_NMI, :meth:`Vcpu.init` and :meth:`Vcpu.deliver_sipi`
are what the VMM's local APIC does on INIT and SIPI.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Mapping
from enum import IntEnum
from typing import TYPE_CHECKING, Any, Literal

from sevsim.arch import ghcb_msr
from sevsim.arch.exits import SNP_ONLY_VMGEXITS, GhcbErr, SvmExit
from sevsim.arch.ghcb import (
    GHCB_EXIT,
    GHCB_PAGE_SIZE,
    GHCB_SAVE_AREA,
    GHCB_USAGE_DEFAULT,
    Ghcb,
    page_reader,
    valid_mask,
)
from sevsim.arch.ghcb_msr import GHCB_MSR_INFO_MASK
from sevsim.arch.vmcb import (
    V_IRQ,
    VMCB_CONTROL,
    VMCB_EVENT_INJ,
    VMCB_EXIT,
    VMCB_GHCB_GPA,
    VMCB_INT_STATE,
    EventInj,
    IntState,
)
from sevsim.arch.vmsa import VMSA, VMSA_PAGE_SIZE, Segment
from sevsim.errors import FOREIGN_FAULTS, GuestMemoryError, PluginError, VcpuError
from sevsim.hw import CpuidLeaf, foreign_time_limit, run_foreign
from sevsim.kvm import outcome as O
from sevsim.kvm.context import ExitContext, Regs, VcpuOps, VcpuView
from sevsim.kvm.cpuid import CpuidRuntime
from sevsim.kvm.dispatch import ExitHandler, ExitKind, code_name
from sevsim.kvm.exits import (
    FailEntry,
    Hlt,
    InternalError,
    InternalErrorSub,
    IrqWindowOpen,
    KvmExit,
    RunFailed,
    Shutdown,
)
from sevsim.kvm.ghcb_map import MappedGhcb
from sevsim.kvm.msrs import MsrModel
from sevsim.kvm.protected import (
    STATE_GROUPS,
    STATE_IOCTLS,
    group_of,
    refuses_protected_state,
)
from sevsim.kvm.svm_setup import (
    VINTR_BIT,
    VMSA_DEFAULTS,
    init_vmcb,
    recalc_instruction_intercepts,
    sync_vmsa_fields,
)

if TYPE_CHECKING:
    from sevsim.kvm.vm import Vm

#: What KVM reads of a GHCB-page request (``sev_es_sync_from_ghcb``,
#: ``sev_es_validate_vmgexit``), in page order: one struct call per VMGEXIT.
_REQUEST = page_reader("cpl", "rax", "rcx", "rdx", "rbx", "rsi", "sw_exit_code",
                       "sw_exit_info_1", "sw_exit_info_2", "sw_scratch", "xcr0",
                       "valid_bitmap", "ghcb_usage")  # fmt: skip
#: Where the exit code and its two infos, and the usage, are in a request read.
_EXIT = slice(_REQUEST.names.index("sw_exit_code"), _REQUEST.names.index("sw_exit_info_2") + 1)
_USAGE_AT = _REQUEST.names.index("ghcb_usage")
#: The three fields every GHCB-page VMGEXIT must mark valid, as valid-bitmap bits.
_ALWAYS_REQUIRED = valid_mask(("sw_exit_code", "sw_exit_info_1", "sw_exit_info_2"))
#: Valid-bitmap bits of what ``sev_es_sync_from_ghcb`` takes when valid.
_RAX, _RBX, _RCX, _RDX, _RSI, _CPL, _XCR0, _SCRATCH = (valid_mask((name,)) for name in (
    "rax", "rbx", "rcx", "rdx", "rsi", "cpl", "xcr0", "sw_scratch"))  # fmt: skip
#: GPRs ``sev_es_sync_to_ghcb`` always writes back.
_SYNCED_OUT = ("rax", "rbx", "rcx", "rdx")
#: The valid bitmap in the page (a snapshot's, after its ``requires`` ran).
_BITMAP_AT = GHCB_SAVE_AREA.offset("valid_bitmap")
_BITMAP_END = _BITMAP_AT + GHCB_SAVE_AREA["valid_bitmap"].size
#: The VMCB's exit code, its high half and the two infos, packed with one struct call.
_PACK_VMCB_EXIT, _VMCB_EXIT_AT = VMCB_EXIT.codec.pack_into, VMCB_EXIT.offset
#: The events of every exit, which the vCPU asks its VM about once (``Vcpu._traced``).
_EXIT_EVENTS = ("vmexit", "vmgexit_enter", "exit_handled", "vmgexit_exit")
#: What a handler may return besides None; Resume, bound once (the run loop asks per exit).
_OUTCOMES = (O.Resume, O.ExitToUser, O.Fail)
_RESUME = O.Resume
#: What validation found: the handler, or the GHCB error to answer; and the snapshot a
#: handler's ``requires`` was given, if one ran.
_Validated = tuple["ExitHandler | None", "GhcbErr | None", "Ghcb | None"]
#: Enum members every exit compares with, bound once: reading a member as an attribute
#: of its Enum class costs several times a module global (CPython 3.11).
_VMGEXIT, _SHUTDOWN, _ERR = SvmExit.VMGEXIT, SvmExit.SHUTDOWN, SvmExit.ERR
_INTR, _VINTR = SvmExit.INTR, SvmExit.VINTR
_KIND_VMEXIT, _KIND_VMGEXIT = ExitKind.VMEXIT, ExitKind.VMGEXIT
#: How kvm injects interrupts and NMIs (the ``how`` of their events): through EVENTINJ,
#: as ``svm_inject_irq`` and ``svm_inject_nmi`` do.
INJECTED_BY_EVENTINJ = "event_inj"


class MpState(IntEnum):
    """``KVM_MP_STATE_*`` values a vCPU of sevsim can be in."""

    RUNNABLE = 0
    INIT_RECEIVED = 2
    AP_RESET_HOLD = 9


class Vcpu:
    """One vCPU: its VMCB, its VMSA page, and KVM's per-vCPU SEV-ES state."""

    def __init__(self, vm: Vm, vcpu_id: int) -> None:
        self.vm = vm
        self.id = vcpu_id
        platform = vm.platform
        self.vmsa = platform.alloc_vmsa((vm.name, vcpu_id))
        self.msrpm_pa, msrpm = platform.alloc_msrpm()
        self.vmcb = bytearray(VMCB_CONTROL.size)
        init_vmcb(self.vmcb, msrpm, vm.asid, self.vmsa.pa, self.msrpm_pa,
                  recalc_instruction_intercepts(vm.cpuid, vm.compat.name))  # fmt: skip
        # sev_es_vcpu_reset: the GHCB MSR starts out holding the SEV_INFO response.
        self._set_ghcb_msr(vm.sev_info())
        #: Register state set by the VMM before launch (VMSA field names).
        self._initial: dict[str, Any] = {}
        self.guest_state_protected = False
        #: KVM_SET_GUEST_DEBUG's control flags (``vcpu->guest_debug``).
        self.guest_debug = 0
        #: KVM's ``vcpu->arch.regs`` as the last GHCB sync left them.
        self.regs = Regs()
        self.cpl = 0
        self.xcr0 = 1
        self.msrs = MsrModel()
        #: What CPUID reflects of this vCPU's state (``kvm_update_cpuid_runtime``).
        self.cpuid_runtime = CpuidRuntime()
        #: SIPIs taken so far: one ends a HLT the VMM waits on (QEMU's do_cpu_sipi).
        self.sipis = 0
        #: ``KVM_MP_STATE_*``: the VMM puts APs in INIT_RECEIVED until their SIPI.
        self.mp_state = MpState.RUNNABLE
        #: ``kvm_run.request_interrupt_window``: exit (IRQ_WINDOW_OPEN) as soon as the
        #: guest can take an interrupt.
        self.request_interrupt_window = False
        #: ``kvm_run.immediate_exit``: while set, KVM_RUN returns -EINTR instead of
        #: entering the guest again (QEMU's kick sets it from its signal handler, so a
        #: device that needs the VMM's attention mid-run ends the run); the VMM clears it.
        self.immediate_exit = False
        #: KVM_INTERRUPT's vector, injected at the next entry.
        self._interrupt: int | None = None
        self._ghcb: MappedGhcb | None = None
        self._ctx: ExitContext | None = None
        self._dead: str | None = None
        #: Each active plugin's per-vCPU state, by plugin name.
        self.plugin_states = {part.name: part.vcpu_state() for part in vm.extensions.parts
                              if part.vcpu_state is not None}  # fmt: skip
        self._views: dict[str | None, VcpuView] = {}
        #: Lifecycle hook -> (plugin, its function, its view) of each implementer.
        self._hook_calls: dict[str, tuple[tuple[str, Callable[..., Any], VcpuView], ...]] = {}
        #: Whether any plugin injects events before VMRUN: asked before every entry.
        self._injects = bool(vm.extensions.implementing("vcpu_events"))
        #: The per-exit events an observer listens to, asked once: a VM's observers are
        #: fixed when it is made, and emit() asks again (one that failed since hears
        #: nothing more), so this only spares building events nobody hears.
        self._traced = frozenset(name for name in _EXIT_EVENTS if vm.wants(name))
        #: Host nanoseconds in guest mode and guest instructions retired (counted
        #: runs only), over every VMRUN: the VMM's clock reads them.
        self.guest_ns = 0
        self.retired = 0
        self._ops = VcpuOps(
            queue_event=self.queue_event, event_pending=self._event_pending,
            cpuid=self._cpuid, set_cpuid_runtime=self.cpuid_runtime.update,
            get_msr=self._get_msr, set_msr=self._set_msr, park=self._park, inject_nmi=self.nmi,
            mapped_ghcb=lambda: self._ghcb, flush_ghcb=self._write_ghcb,
            set_ghcb_msr=self._set_ghcb_msr, cpl=lambda: self.cpl, xcr0=lambda: self.xcr0,
            initial_state=lambda: dict(self._initial),
        )  # fmt: skip

    def view(self, plugin: str | None) -> VcpuView:
        """This vCPU as ``plugin`` sees it (with its own state)."""
        view = self._views.get(plugin)
        if view is None:
            state = self.plugin_states.get(plugin) if plugin is not None else None
            view = self._views[plugin] = VcpuView(self.id, state, self.vm.view(plugin), self._ops)
        return view

    # -- before launch -------------------------------------------------------------

    def set_state(self, fields: Mapping[str, Any], ioctl: str | None = None) -> None:
        """KVM_SET_REGS/SREGS/FPU/XSAVE/DEBUGREGS: set VMSA fields before
        LAUNCH_UPDATE_VMSA. ``ioctl`` names one of them, and then ``fields`` must
        belong to it; without it, any VMSA fields (what a VMM's reset does with all
        of them).

        Once the state is protected, a KVM_X86_SEV_ES_VM refuses (-EINVAL); a 5.11-era
        VM accepts and changes only KVM's copy (:mod:`sevsim.kvm.protected`).
        """
        unknown = [name for name in fields if name not in VMSA]
        if unknown:
            raise VcpuError(f"vCPU {self.id}: {unknown} are not VMSA fields")
        if ioctl is not None:
            group = self._state_group(ioctl, "SET")
            stray = sorted(set(fields) - set(STATE_GROUPS[group]))
            if stray:
                raise VcpuError(f"vCPU {self.id}: {ioctl} does not set {stray}; it sets "
                                f"{', '.join(STATE_GROUPS[group])}")  # fmt: skip
        if self.guest_state_protected:
            self._refuse_protected(ioctl or "KVM_SET_REGS/SREGS")
            self.regs.update({k: v for k, v in fields.items() if k in self.regs})
        self._initial.update(fields)
        self.cpuid_runtime.update(cr4=self._initial.get("cr4", 0),
                                  xcr0=self._initial.get("xcr0", 1))  # fmt: skip
        self._lifecycle("vcpu_reset")

    def get_state(self, ioctl: str) -> dict[str, Any]:
        """KVM_GET_REGS/SREGS/FPU/XSAVE/DEBUGREGS: KVM's copy of one register group.

        Before launch that is the state the VMM set, with KVM's reset values for the
        rest. Once the state is protected, a KVM_X86_SEV_ES_VM refuses (-EINVAL); a
        5.11-era VM answers from its stale copy (the GPRs as the last GHCB sync left
        ``vcpu->arch.regs``).
        """
        group = self._state_group(ioctl, "GET")
        if self.guest_state_protected:
            self._refuse_protected(ioctl)
        known = {**VMSA_DEFAULTS, **self._initial}  # KVM's values, before its setters
        state = {name: known.get(name, 0) for name in STATE_GROUPS[group]}
        if self.guest_state_protected:
            state.update({k: v for k, v in self.regs.items() if k in state})
        return state

    def _state_group(self, ioctl: str, op: str) -> str:
        group = group_of(ioctl)
        if group is None or not ioctl.startswith(f"KVM_{op}_"):
            names = [name for name in STATE_IOCTLS if name.startswith(f"KVM_{op}_")]
            raise VcpuError(f"vCPU {self.id}: {ioctl!r} is not one of {names}")
        return group

    def _refuse_protected(self, ioctl: str) -> None:
        if refuses_protected_state(self.vm.compat.name):
            raise VcpuError(f"vCPU {self.id}: {ioctl} refused: the guest state is protected "
                            "after LAUNCH_UPDATE_VMSA (has_protected_state: -EINVAL)")  # fmt: skip

    def set_guest_debug(self, control: int) -> None:
        """KVM_SET_GUEST_DEBUG: refused (-EINVAL) once the state is protected, in every
        era; before launch the flags are kept, and LAUNCH_UPDATE_VMSA then refuses
        a vCPU being debugged."""
        if self.guest_state_protected:
            raise VcpuError(f"vCPU {self.id}: KVM_SET_GUEST_DEBUG refused: KVM cannot debug "
                            "a guest whose state is protected (-EINVAL)")  # fmt: skip
        if isinstance(control, bool) or not isinstance(control, int) or control < 0:
            raise VcpuError(f"vCPU {self.id}: KVM_SET_GUEST_DEBUG control {control!r}: "
                            "expected KVM_GUESTDBG_* flags (an integer >= 0)")  # fmt: skip
        self.guest_debug = control

    def sync_vmsa(self, sev_features: int = 0) -> None:
        """``sev_es_sync_vmsa``: write the initial state into the VMSA page, with KVM's
        own adjustments to it."""
        if self.guest_debug:
            raise VcpuError(f"vCPU {self.id}: KVM_SET_GUEST_DEBUG flags {self.guest_debug:#x} "
                            "are set; KVM refuses LAUNCH_UPDATE_VMSA (-EINVAL)")  # fmt: skip
        dr7 = self._initial.get("dr7", 0x400)
        if dr7 & ~0x400:
            raise VcpuError(f"vCPU {self.id}: DR7 {dr7:#x} has breakpoints set; KVM refuses "
                            "LAUNCH_UPDATE_VMSA while the guest is being debugged (-EINVAL)")
        state = sync_vmsa_fields(self._initial, sev_features)
        values = {k: (v.pack() if isinstance(v, Segment) else v) for k, v in state.items()}
        self.vmsa.host_write(0, bytes(VMSA.pack(values, size=VMSA_PAGE_SIZE)))

    # -- KVM_RUN ---------------------------------------------------------------------

    @property
    def dead(self) -> str | None:
        return self._dead

    def run(self, timeout: float | None = None, budget: int | None = None, *,
            slice_ns: int | None = None,
            plugin_timeout: float | Literal["timeout"] | None = "timeout") -> KvmExit:  # fmt: skip
        """KVM_RUN: run until an exit userspace must see.

        ``timeout`` (seconds) bounds the call, as a signal would; ``budget`` bounds
        the guest instructions it may retire (a reproducible slice, as the host's
        counters would enforce) and ``slice_ns`` the guest time it may use (a host
        timer that counts only while the guest runs: the simulator's exit handling
        takes far longer than KVM's, and is not the guest's time). When one is used
        up, KVM_RUN returns -EINTR and the vCPU can be run again. :attr:`usage` adds up what every
        VMRUN used. ``plugin_timeout`` (by default ``timeout``) bounds plugin code:
        a plugin still running when it passes is interrupted, and KVM_RUN fails
        naming it. A VMM that slices time passes its overall limit here: a slice
        ending is a signal, which never aborts the kernel's exit handling.
        """
        now = time.monotonic()
        deadline = None if timeout is None else now + timeout
        limit = timeout if plugin_timeout == "timeout" else plugin_timeout
        with foreign_time_limit(None if limit is None else now + limit):
            try:
                return self._run(timeout, deadline, budget, slice_ns)
            finally:
                # KVM writes the mapped GHCB page directly: what it wrote since the last
                # entry is in guest memory when KVM_RUN returns, however it returns. (On
                # the way back into the guest, prepare_switch_to_guest writes it.)
                self._write_ghcb()

    def _run(self, timeout: float | None, deadline: float | None, budget: int | None,
             slice_ns: int | None) -> KvmExit:  # fmt: skip
        if self._dead is not None:
            raise VcpuError(f"vCPU {self.id} cannot run again: {self._dead}")
        if self.vm.dead is not None:
            raise VcpuError(f"vCPU {self.id}: VM is terminated: {self.vm.dead}")
        if not self.guest_state_protected:
            raise VcpuError(f"vCPU {self.id}: run LAUNCH_UPDATE_VMSA before KVM_RUN")
        if self.mp_state is not MpState.RUNNABLE:
            # vcpu_block: KVM_RUN would wait for an event; sevsim reports at once.
            if not (self.mp_state is MpState.AP_RESET_HOLD and self.wakeup_pending()):
                return RunFailed("EINTR", f"vCPU {self.id} is {self.mp_state.name}: a SIPI "
                                 "(deliver_sipi) or an event must wake it")  # fmt: skip
            self.mp_state = MpState.RUNNABLE
        retired_before, ns_before = self.retired, self.guest_ns
        vm = self.vm
        vmrun = vm.platform.vmrun
        while True:
            if self.immediate_exit:
                return RunFailed("EINTR", f"vCPU {self.id}: KVM_RUN interrupted: the VMM "
                                 "kicked it (immediate_exit)")  # fmt: skip
            self.prepare_switch_to_guest()
            # req_immediate_exit: an event still waits, so leave the guest right after
            # entry (the host IPIs itself) and inject it at the next one.
            immediate = self.inject_pending_events()
            if vm.dead is not None:
                return RunFailed("EIO", vm.dead, plugin=vm.dead_plugin)
            entry_deadline = time.monotonic() if immediate else deadline
            ns_left = None if slice_ns is None else max(slice_ns - (self.guest_ns - ns_before), 1)
            left = None if budget is None else budget - (self.retired - retired_before)
            used = vmrun(self.vmcb, vm.memory, entry_deadline,
                         None if left is None else max(left, 1), guest_ns=ns_left)  # fmt: skip
            self.guest_ns += used.guest_ns
            self.retired += used.retired
            result = self._handle_exit()
            if vm.dead is not None and not isinstance(result, O.ExitToUser):
                return RunFailed("EIO", vm.dead, plugin=vm.dead_plugin)
            if isinstance(result, _RESUME):
                if self.request_interrupt_window and self.ready_for_interrupt_injection:
                    return IrqWindowOpen()  # dm_request_for_irq_injection
                if deadline is not None and time.monotonic() >= deadline:
                    return RunFailed("EINTR", f"KVM_RUN interrupted after its {timeout:g} s limit")
                if budget is not None and self.retired - retired_before >= budget:
                    return RunFailed("EINTR", f"KVM_RUN interrupted after {budget} instructions")
                if slice_ns is not None and self.guest_ns - ns_before >= slice_ns:
                    return RunFailed("EINTR", f"KVM_RUN interrupted after {slice_ns} ns of "
                                     "guest time")  # fmt: skip
                continue
            if isinstance(result, O.Fail):
                return RunFailed(result.errno, result.why, exit=result.exit)
            if isinstance(result.exit, Shutdown):
                self._dead = "it shut down (triple fault or VMSA integrity failure)"
            if isinstance(result.exit, RunFailed) and result.exit.plugin is not None:
                vm.terminate(result.exit.why, result.exit.plugin)
            return result.exit

    def _exit_code(self) -> int:
        lo, hi, _, _ = VMCB_EXIT.get(self.vmcb)
        return hi << 32 | lo

    def handle_exit(self) -> O.Outcome:
        """``svm_handle_exit``: act on the #VMEXIT recorded in the VMCB. What KVM wrote
        into a mapped GHCB page is in guest memory when it returns, as KVM's own writes
        into the page are."""
        result = self._handle_exit()
        self._write_ghcb()
        return result

    def _handle_exit(self) -> O.Outcome:
        """:meth:`handle_exit` inside KVM_RUN, which writes the GHCB page back where
        anyone else could look: before the guest runs again, or when it returns."""
        lo, hi, info1, info2 = VMCB_EXIT.get(self.vmcb)
        code = hi << 32 | lo
        vm = self.vm
        if "vmexit" in self._traced:
            vm.emit("vmexit", vcpu_id=self.id, exit_code=code, info1=info1, info2=info2)
        if code == _VMGEXIT:
            return self._vmgexit()
        if code == _SHUTDOWN:
            return O.ExitToUser(Shutdown())
        if code == _ERR:
            return O.ExitToUser(FailEntry(code))
        if code == _INTR:  # the host's interrupt: handled by the host, resume
            return O.RESUME
        if code == _VINTR:  # interrupt_window_interception
            self._clear_vintr()
            return O.RESUME
        handler = vm.lookup(_KIND_VMEXIT, code)
        if handler is not None:
            ctx = ExitContext(self.view(handler.plugin), _KIND_VMEXIT, code, info1, info2)
            return self._call(handler, ctx)
        if code == SvmExit.HLT:
            return O.ExitToUser(Hlt())
        return self.invalid_exit(code)

    def invalid_exit(self, code: int) -> O.ExitToUser:
        """``svm_handle_invalid_exit``: KVM_EXIT_INTERNAL_ERROR, UNEXPECTED_EXIT_REASON.

        data[1] is where KVM puts the host CPU of the last entry; sevsim has one host
        CPU per vCPU, so it reports the vCPU's id there.
        """
        return O.ExitToUser(InternalError(
            InternalErrorSub.UNEXPECTED_EXIT_REASON, (code, self.id),
            f"no handler for exit {code_name(ExitKind.VMEXIT, code)}",
        ))  # fmt: skip

    def _call(self, handler: ExitHandler, ctx: ExitContext) -> O.Outcome:
        """Run a handler; a bug in it ends only this VM, naming the plugin.

        A bug is an exception (including one the context raises for a value that is
        not a u64, or a scratch area resized) or a return value that is not an outcome.
        """
        self._ctx = ctx
        try:
            result = run_foreign(handler.handler, ctx)
        except FOREIGN_FAULTS as exc:  # a plugin bug must not take the host down
            return self._plugin_failed(handler, exc)
        if result is not None and not isinstance(result, _OUTCOMES):
            return self._plugin_failed(
                handler, f"returned {result!r}, expected an outcome (RESUME, ExitToUser, Fail) "
                "or None")  # fmt: skip
        scratch = ctx._scratch  # ctx.scratch, without the property call (every exit)
        if scratch is not None and len(scratch.data) != scratch.length:
            ctx._scratch = None  # nothing of it goes back to the guest
            return self._plugin_failed(handler, f"left a scratch area of {len(scratch.data)} "
                                       f"bytes where it mapped {scratch.length}")  # fmt: skip
        if "exit_handled" in self._traced:
            vm = self.vm
            vm.emit("exit_handled", vcpu_id=self.id, kind=ctx.kind.value, code=ctx.code,
                    plugin=handler.owner, notes=ctx.notes)  # fmt: skip
        return O.RESUME if result is None else result

    def _plugin_failed(self, handler: ExitHandler, problem: BaseException | str) -> O.ExitToUser:
        """End the run with -EIO naming the plugin; observers hear of it first
        (``plugin_failed``: the exception's type, or None for a broken contract)."""
        who = handler.owner
        error, message = None, str(problem)
        if isinstance(problem, BaseException):
            error = type(problem).__name__
            where = traceback.extract_tb(problem.__traceback__)
            at = f" (at {where[-1].filename}:{where[-1].lineno})" if where else ""
            problem = f"raised {error}: {message}{at}"
        self.vm.emit("plugin_failed", vcpu_id=self.id, plugin=who, kind=handler.kind.value,
                     code=handler.code, error=error, message=message)  # fmt: skip
        why = f"handler of plugin {who!r} for {handler.describe()} {problem}"
        return O.ExitToUser(RunFailed("EIO", why, plugin=who))

    # -- plugins' lifecycle -------------------------------------------------------------

    def _lifecycle(self, hook: str, **args: Any) -> list[Any]:
        """Call ``hook`` of every plugin that implements it, with its own view; a plugin
        that fails ends this VM, naming it."""
        calls = self._hook_calls.get(hook)
        if calls is None:  # each plugin's function and view, found once per hook
            calls = self._hook_calls[hook] = tuple(
                (part.name, part.lifecycle[hook], self.view(part.name))
                for part in self.vm.extensions.implementing(hook))  # fmt: skip
        if not calls:
            return []
        results = []
        for name, function, view in calls:
            try:
                results.append(run_foreign(function, vcpu=view, **args))
            except FOREIGN_FAULTS as exc:
                self.vm.terminate(f"plugin {name!r} failed in sevsim_{hook}: "
                                  f"{type(exc).__name__}: {exc}", name)  # fmt: skip
                results.append(None)
        return results

    def wakeup_pending(self) -> bool:
        """``kvm_vcpu_has_events`` for what kvm itself holds (a pending NMI): may a
        parked or halted vCPU run again?"""
        return any(self._lifecycle("vcpu_wakeup"))

    # -- events between runs: interrupts, NMIs, INIT and SIPI ----------------------------

    def queue_event(self, event_inj: int, error_code: int = 0) -> None:
        """Write EVENTINJ (and its error code) for the next VMRUN. Whoever writes it (kvm
        for KVM_INTERRUPT, the ``nmi`` plugin for NMIs), an interrupt or NMI is reported
        here, as KVM's ``kvm_inj_virq`` tracepoint does when it injects."""
        VMCB_EVENT_INJ.set(self.vmcb, event_inj & 0xFFFF_FFFF, error_code & 0xFFFF_FFFF)
        if event_inj & EventInj.VALID:
            self._report_injection(event_inj)

    def _report_injection(self, event_inj: int) -> None:
        kind = event_inj >> EventInj.TYPE_SHIFT & 7
        if kind == EventInj.TYPE_INTR:
            self.vm.emit("interrupt_injected", vcpu_id=self.id,
                         vector=event_inj & EventInj.VECTOR_MASK, how=INJECTED_BY_EVENTINJ)
        elif kind == EventInj.TYPE_NMI:
            self.vm.emit("nmi_injected", vcpu_id=self.id, how=INJECTED_BY_EVENTINJ)

    def _event_pending(self) -> bool:
        return bool(VMCB_EVENT_INJ.get(self.vmcb)[0] & EventInj.VALID)

    @property
    def if_flag(self) -> bool:
        """``kvm_run.if_flag``: the guest's RFLAGS.IF, which for SEV-ES KVM knows only
        from the VMCB's int_state (``svm_get_if_flag``)."""
        return bool(VMCB_INT_STATE.get(self.vmcb)[0] & IntState.GUEST_INTERRUPT_MASK)

    @property
    def ready_for_interrupt_injection(self) -> bool:
        """``kvm_vcpu_ready_for_interrupt_injection``: interrupts allowed (IF, no
        interrupt shadow) and nothing queued already."""
        int_state = VMCB_INT_STATE.get(self.vmcb)[0]
        allowed = int_state & IntState.GUEST_INTERRUPT_MASK and not (
            int_state & IntState.INTERRUPT_SHADOW)  # fmt: skip
        return bool(allowed) and self._interrupt is None and not self._event_pending()

    def interrupt(self, vector: int) -> None:
        """KVM_INTERRUPT: inject external interrupt ``vector`` at the next entry.

        As with KVM, userspace calls it only when :attr:`ready_for_interrupt_injection`
        says the guest can take it (EVENTINJ ignores RFLAGS.IF).
        """
        if not 0 <= vector <= 0xFF:
            raise VcpuError(f"vCPU {self.id}: interrupt vector {vector!r} is not in 0..0xff")
        if self._interrupt is not None:
            raise VcpuError(f"vCPU {self.id}: interrupt {self._interrupt:#x} is still queued "
                            "(-EEXIST)")  # fmt: skip
        self._interrupt = vector

    def nmi(self) -> None:
        """KVM_NMI: queue an NMI, for the ``nmi`` plugin to inject when NMIs are unmasked."""
        if not any(self._lifecycle("vcpu_nmi")):
            raise VcpuError(
                f"vCPU {self.id}: KVM_NMI needs the 'nmi' plugin (NMI injection and "
                "NMI_COMPLETE for SEV-ES guests), which is not active"
            )

    def init(self) -> None:
        """INIT from the local APIC: the vCPU waits for a SIPI (KVM_MP_STATE_INIT_RECEIVED).

        KVM cannot reset an SEV-ES vCPU's registers (they are sealed in the VMSA): the
        vCPU resumes where it was, once the SIPI releases it. For the same reason a
        vCPU that shut down stays down (``shutdown_interception`` cannot reinitialize
        an encrypted VMSA): INIT, which another vCPU's IPI may send, leaves it alone.
        """
        if self._dead is None:
            self.mp_state = MpState.INIT_RECEIVED
            self.vm.emit("init_delivered", vcpu_id=self.id)

    def deliver_sipi(self, vector: int) -> None:
        """A SIPI from the local APIC (where KVM's ``kvm_apic_accept_events`` calls
        ``sev_vcpu_deliver_sipi_vector``): the vCPU may run again; the ``apboot``
        plugin answers an AP reset hold. The vector is ignored: an SEV-ES AP starts
        from its VMSA or reads its jump table itself."""
        if not 0 <= vector <= 0xFF:
            raise VcpuError(f"vCPU {self.id}: SIPI vector {vector!r} is not in 0..0xff")
        self.mp_state = MpState.RUNNABLE
        self.sipis += 1
        # The real-mode start page the vector names (CS = vector << 8, IP = 0).
        self.vm.emit("sipi_delivered", vcpu_id=self.id, vector=vector, start=vector << 12)
        self._lifecycle("vcpu_sipi", vector=vector)

    def _park(self) -> None:
        self.mp_state = MpState.AP_RESET_HOLD

    def inject_pending_events(self) -> bool:
        """``kvm_check_and_inject_events``, before each entry: the KVM_INTERRUPT vector,
        then what plugins inject (NMIs); True for an immediate exit when an event still
        waits."""
        if self._interrupt is not None and not self._event_pending():
            self.queue_event(EventInj.VALID | EventInj.TYPE_INTR << EventInj.TYPE_SHIFT
                             | self._interrupt)  # fmt: skip
            self._interrupt = None
        immediate = self._injects and any(self._lifecycle("vcpu_events"))
        if self.request_interrupt_window and not self.ready_for_interrupt_injection:
            self._set_vintr()
        return immediate

    def _set_vintr(self) -> None:
        """``svm_set_vintr``: a virtual interrupt (V_IRQ) with the VINTR intercept, so the
        CPU exits when the guest can take an interrupt. Asked before every entry while
        the VMM waits for the window: once both are set, there is nothing to write."""
        int_ctl = VMCB_CONTROL.get(self.vmcb, "int_ctl")
        intercepts = int.from_bytes(VMCB_CONTROL.get(self.vmcb, "intercepts"), "little")
        if int_ctl & V_IRQ and intercepts >> VINTR_BIT & 1:
            return
        VMCB_CONTROL.set(self.vmcb, "int_ctl", int_ctl | V_IRQ)
        VMCB_CONTROL.set(self.vmcb, "intercepts",
                         (intercepts | 1 << VINTR_BIT).to_bytes(24, "little"))  # fmt: skip

    def _clear_vintr(self) -> None:
        VMCB_CONTROL.set(self.vmcb, "int_ctl", VMCB_CONTROL.get(self.vmcb, "int_ctl") & ~V_IRQ)
        intercepts = int.from_bytes(VMCB_CONTROL.get(self.vmcb, "intercepts"), "little")
        VMCB_CONTROL.set(self.vmcb, "intercepts",
                         (intercepts & ~(1 << VINTR_BIT)).to_bytes(24, "little"))  # fmt: skip

    # -- services plugins reach through their view ---------------------------------------

    def _cpuid(self, function: int, index: int) -> CpuidLeaf:
        return self.cpuid_runtime.apply(self.vm.cpuid, function, index)

    def _get_msr(self, index: int) -> int | None:
        """``kvm_get_msr``: the VMM's MSR devices first (its local APIC), then KVM's."""
        value = self.vm.msr_bus.read(self.id, index)
        return value if value is not None else self.msrs.read(index)

    def _set_msr(self, index: int, value: int) -> bool:
        handled = self.vm.msr_bus.write(self.id, index, value)
        ok = handled if handled is not None else self.msrs.write(index, value)
        if ok and index in CpuidRuntime.MSRS:
            self.cpuid_runtime.update(**{CpuidRuntime.MSRS[index]: value})
        return ok

    # -- VMGEXIT (sev_handle_vmgexit) ----------------------------------------------------

    def _set_ghcb_msr(self, value: int) -> None:
        VMCB_CONTROL.set(self.vmcb, "ghcb_gpa", value)

    def _vmgexit(self) -> O.Outcome:
        ghcb_gpa = VMCB_GHCB_GPA.get(self.vmcb)[0]
        if ghcb_gpa & GHCB_MSR_INFO_MASK:
            return self._msr_protocol(ghcb_gpa)
        vm = self.vm
        compat, memory = vm.compat, vm.memory
        if ghcb_gpa == 0:
            return compat.ghcb_unmapped("GHCB GPA is 0")
        try:
            page = memory.read(ghcb_gpa, GHCB_PAGE_SIZE)
        except GuestMemoryError:
            return compat.ghcb_unmapped(f"GHCB GPA {ghcb_gpa:#x} is not guest RAM")
        ghcb = MappedGhcb(page, ghcb_gpa)
        request = _REQUEST.get(page)  # what the snapshot will hold
        code, info1, info2 = request[_EXIT]
        if "vmgexit_enter" in self._traced:
            vm.emit("vmgexit_enter", vcpu_id=self.id, exit_reason=code, info1=info1,
                    info2=info2)  # fmt: skip
        self._ghcb = ghcb
        bitmap = self._sync_from_ghcb(ghcb, request)
        try:
            handler, error, snapshot = self._validate(page, code, request[_USAGE_AT], bitmap)
        except _RequiresFailed as bad:
            return self._plugin_failed(bad.handler, bad.problem)
        plugin = handler.plugin if handler is not None else None
        view = self._views.get(plugin) or self.view(plugin)  # self.view(plugin), inline
        ctx = ExitContext(view, _KIND_VMGEXIT, code, info1, info2, ghcb=ghcb, regs=self.regs,
                          memory=memory, compat=compat)  # fmt: skip
        self._ctx = ctx
        if error is not None:
            return compat.bad_input(ctx, error, snapshot if snapshot is not None else Ghcb(page))
        ghcb.put_exit_info(0, 0)  # ctx.success(): svm_vmgexit_success(svm, 0)
        assert handler is not None
        return self._call(handler, ctx)

    def _write_ghcb(self) -> None:
        """KVM works on the mapped GHCB page: what it wrote there (valid bitmap cleared,
        reply, a scratch area inside the page) is in guest memory at once, even when
        KVM_RUN now returns to userspace. Only RAX..RDX wait for the next entry."""
        if self._ghcb is not None:
            self._ghcb.flush(self.vm.memory)

    def _sync_from_ghcb(self, ghcb: MappedGhcb, request: tuple[Any, ...]) -> int:
        """``sev_es_sync_from_ghcb`` from the page as read (``request``): zero the GPRs,
        take the valid ones, snapshot ``sw_scratch``, clear the page's valid bitmap; the
        bitmap the guest sent (newest KVM's snapshot of it) is returned."""
        cpl, rax, rcx, rdx, rbx, rsi, code, info1, info2, scratch, xcr0, valid, _ = request
        bitmap = int.from_bytes(valid, "little")
        self.regs.load_synced(rax if bitmap & _RAX else 0, rbx if bitmap & _RBX else 0,
                              rcx if bitmap & _RCX else 0, rdx if bitmap & _RDX else 0,
                              rsi if bitmap & _RSI else 0)  # fmt: skip
        self.cpl = cpl if bitmap & _CPL else 0
        if bitmap & _XCR0:
            self.xcr0 = xcr0
            self.cpuid_runtime.update(xcr0=xcr0)
        if not (bitmap & _SCRATCH or self.vm.compat.sw_scratch_unchecked):
            scratch = 0
        ghcb.snapshot_scratch = scratch
        _PACK_VMCB_EXIT(self.vmcb, _VMCB_EXIT_AT, code & 0xFFFF_FFFF, code >> 32, info1, info2)
        ghcb.clear_valid_bitmap()
        return bitmap

    def _validate(self, page: bytes, code: int, usage: int, bitmap: int) -> _Validated:
        """``sev_es_validate_vmgexit`` on the snapshot (``page`` as read, ``bitmap`` its
        valid bits), with required bits from the table; also the snapshot a handler's
        ``requires`` callable was given, if one ran (a refusal reads the same one)."""
        if usage != GHCB_USAGE_DEFAULT:
            return None, GhcbErr.INVALID_USAGE, None
        if bitmap & _ALWAYS_REQUIRED != _ALWAYS_REQUIRED:
            return None, GhcbErr.MISSING_INPUT, None
        handler = self.vm.lookup(_KIND_VMGEXIT, code)
        if handler is None:
            # The SNP codes fail with KVM's default reason, MISSING_INPUT, for SEV-ES.
            snp = code in SNP_ONLY_VMGEXITS
            return None, GhcbErr.MISSING_INPUT if snp else GhcbErr.INVALID_EVENT, None
        if not callable(handler.requires):  # a tuple, checked when the row was made
            required = handler.required_mask(None)
            return (handler, None, None) if bitmap & required == required else (
                None, GhcbErr.MISSING_INPUT, None)  # fmt: skip
        snapshot = Ghcb(page)
        try:
            required = run_foreign(handler.required_mask, snapshot)
        except FOREIGN_FAULTS as exc:  # the plugin's requires() is plugin code too
            raise _RequiresFailed(handler, exc) from exc
        bitmap = int.from_bytes(snapshot.raw[_BITMAP_AT:_BITMAP_END], "little")  # as left
        if bitmap & required != required:
            return None, GhcbErr.MISSING_INPUT, snapshot
        return handler, None, snapshot

    def prepare_switch_to_guest(self) -> None:
        """``sev_es_unmap_ghcb``: scratch back, trace, sync registers, release the GHCB.

        What KVM wrote into the page since the exit reaches guest memory here with the
        registers, in one write; first, though, wherever another writer or reader comes
        before: a scratch area copied back (it may cover part of the page) and the
        observers of ``vmgexit_exit`` find the page as KVM left it."""
        ghcb, ctx = self._ghcb, self._ctx
        self._ctx = None
        if ghcb is None:
            return
        vm = self.vm
        memory = vm.memory
        scratch = ctx._scratch if ctx is not None else None  # ctx.scratch (every exit)
        if scratch is not None:
            ghcb.flush(memory)
            scratch.write_back(memory)
        if "vmgexit_exit" in self._traced:
            ghcb.flush(memory)
            code, info1, info2 = GHCB_EXIT.get(ghcb.raw)
            vm.emit("vmgexit_exit", vcpu_id=self.id, exit_reason=code, info1=info1,
                    info2=info2)  # fmt: skip
        ghcb.put_gprs(*self.regs.pick(_SYNCED_OUT))
        ghcb.flush(memory)
        self._ghcb = None

    # -- the GHCB MSR protocol (sev_handle_vmgexit_msr_protocol) -----------------------

    def _msr_protocol(self, value: int) -> O.Outcome:
        self.vm.emit("msr_protocol_enter", vcpu_id=self.id, ghcb_gpa=value)
        code = ghcb_msr.info(value)
        handler = self.vm.lookup(ExitKind.MSR_PROTOCOL, code)
        if handler is None:
            return self.vm.compat.unknown_msr_request(self, value)
        ctx = ExitContext(self.view(handler.plugin), ExitKind.MSR_PROTOCOL, code, msr=value,
                          regs=self.regs, memory=self.vm.memory, compat=self.vm.compat)  # fmt: skip
        result = self._call(handler, ctx)
        self._set_ghcb_msr(ctx.msr)
        terminated = isinstance(result, O.ExitToUser) and self.vm.compat.is_termination(result.exit)
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


__all__ = ["MpState", "PluginError", "Vcpu"]
