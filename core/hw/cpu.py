"""One vCPU's silicon: a Unicorn engine running an SEV-ES guest until a #VMEXIT.

The model adds what Unicorn lacks and an SEV-ES guest needs, each in its own module:
the page walk with the C-bit (:mod:`~sevsim.hw.mmu`), stops in front of sensitive
instructions (:mod:`~sevsim.hw.intercept`), exception delivery through the guest's
IDT (:mod:`~sevsim.hw.exceptions`), fast register access and the VMSA state
(:mod:`~sevsim.hw.regs`). This module is the run loop that ties them together: it
runs the guest, and turns each stop into what the hardware does — a #VC for a
non-automatic exit, an automatic exit (VMGEXIT, HLT, the CR/EFER write traps, a
virtual-interrupt window), an exception, or the instruction retired by the model
itself (the hardware MSRs, writes of control registers, reads of CR8).

Everything here is hardware: it sees guest plaintext and registers. Only
:mod:`sevsim.hw.svm` talks to it; the hypervisor never does.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable, Generator
from typing import Any

from attrs import frozen
from unicorn import (
    UC_ERR_INSN_INVALID,
    UC_HOOK_INSN_INVALID,
    UC_HOOK_INTR,
    UC_HOOK_MEM_UNMAPPED,
    UC_HOOK_TLB_FILL,
    UC_MEM_FETCH_UNMAPPED,
    UC_MEM_WRITE_UNMAPPED,
    Uc,
    UcError,
)
from unicorn import x86_const as x86

from sevsim.arch import msr as M
from sevsim.arch.exits import SvmExit
from sevsim.arch.vectors import Vector
from sevsim.arch.vmcb import EventInj
from sevsim.arch.vmsa import Segment
from sevsim.errors import FOREIGN_FAULTS
from sevsim.hw import watchdog
from sevsim.hw.engine import TIMER_ERROR, Engine
from sevsim.hw.exceptions import Delivery, Event
from sevsim.hw.intercept import Interceptor
from sevsim.hw.memory import SHARED, GuestMemory
from sevsim.hw.mmu import POISON, Fault, GuestAccessFault, Mmu
from sevsim.hw.paging import ACCESS_FETCH, ACCESS_WRITE, PagingMode
from sevsim.hw.regs import CR_IDS, GPR_OF, Registers
from sevsim.hw.sites import MAX_INSN, Action, Sensitive
from sevsim.hw.vc_model import GuestView, VcModel

#: Intercepted instructions that fault with #GP(0) outside ring 0.
_CPL0_ONLY = frozenset({
    SvmExit.INVD, SvmExit.WBINVD, SvmExit.READ_DR7, SvmExit.WRITE_DR7, SvmExit.VMRUN,
    SvmExit.VMLOAD, SvmExit.VMSAVE, SvmExit.STGI, SvmExit.CLGI, SvmExit.SKINIT,
    SvmExit.INVLPGA, SvmExit.HLT,
})  # fmt: skip
#: Actions whose instructions #GP outside CPL 0 (RDMSR/WRMSR, MOV to and from CRs).
_CPL0_ACTIONS = (Action.HARDWARE_MSR, Action.CR_WRITE, Action.CR8_READ)
#: Enum members the exit path compares with, bound once: reading a member as an
#: attribute of its Enum class costs several times a module global here (CPython 3.11).
_AUTOMATIC_EXIT, _CR8_READ, _CR_WRITE = Action.AUTOMATIC_EXIT, Action.CR8_READ, Action.CR_WRITE
_HARDWARE_MSR, _NAE, _REAL_MODE_IRET = Action.HARDWARE_MSR, Action.NAE, Action.REAL_MODE_IRET
_TLB_INVALIDATION = Action.TLB_INVALIDATION
_CR0_WRITE_TRAP, _INVLPGA, _VC = SvmExit.CR0_WRITE_TRAP, SvmExit.INVLPGA, Vector.VC
#: The shortest wall-clock window a run towards a guest-time limit gets.
_MIN_RUN_NS = 100_000
#: RFLAGS bits a real-mode IRET loads, by operand size: FLAGS, or all but VM, VIF, VIP.
_IRET_LOADS = {2: 0xFFFF, 4: 0xFFFF | 1 << 16 | 1 << 18 | 1 << 21}
#: RFLAGS bits that always read as zero (bit 1 reads as one).
_RFLAGS_ZEROS = 1 << 3 | 1 << 5 | 1 << 15
_HARDWARE_MSRS = (M.MSR_AMD64_SEV_ES_GHCB, M.MSR_AMD64_SEV)
#: EVENTINJ types (APM 15.20): INTR, NMI, exception, software interrupt.
_EVENT_TYPES = frozenset((EventInj.TYPE_INTR, EventInj.TYPE_NMI, EventInj.TYPE_EXEPT,
                          EventInj.TYPE_SOFT))  # fmt: skip
#: The vectors that are exceptions (APM Table 8-1; 2 is the NMI, the others reserved).
_EXCEPTION_VECTORS = frozenset((0, 1, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 14, 16, 17, 18, 19,
                                21, 28, 29, 30))  # fmt: skip
#: Control-register bits whose change flushes the TLB (APM vol. 2, 5.5.2).
_PAGING_BITS = {
    0: M.CR0_PE | M.CR0_WP | M.CR0_PG,
    4: M.CR4_PSE | M.CR4_PAE | M.CR4_PGE | M.CR4_LA57 | M.CR4_PCIDE | M.CR4_SMEP | M.CR4_SMAP
    | M.CR4_PKE,
}


@frozen
class HwExit:
    """A #VMEXIT as the hardware reports it in the VMCB control area, plus ``why``:
    the simulator's own account of it (a triple fault, a tampered VMSA), never shown
    to a hypervisor."""

    exit_code: int
    info1: int = 0
    info2: int = 0
    why: str = ""


# -- why the engine stopped ----------------------------------------------------------


@frozen
class _AtSite:
    site: Sensitive
    rip: int


@frozen
class _Npf:
    """An access to a guest-physical address with no RAM: #VC(NPF), as for MMIO."""

    gpa: int
    write: bool
    fetch: bool = False


@frozen
class _Retranslate:
    """A block was translated before its hooks existed: drop it and go on."""


@frozen
class _Interrupted:
    """The host's timer: the physical interrupt that takes a CPU back from a guest."""


_Stop = _AtSite | Event | _Npf | _Retranslate | _Interrupted

#: Bits a MOV to CR4 may set on this CPU model (AMD: VME..OSXMMEXCPT, UMIP, FSGSBASE,
#: PCIDE, OSXSAVE, SMEP, SMAP, PKE, CET); the rest are reserved: #GP.
_CR4_VALID = 0x7FF | (1 << 11) | (1 << 16) | (1 << 17) | (1 << 18) | (1 << 20) | (1 << 21) | (
    1 << 22) | (1 << 23)  # fmt: skip
#: EFER bits this CPU model implements (SCE, LME, LMA, NXE, SVME, LMSLE, FFXSR, TCE,
#: MCOMMIT, INTWB, UAIEN, AIBRSE); setting any other is #GP.
_EFER_VALID = (
    M.EFER_SCE | M.EFER_LME | M.EFER_LMA | M.EFER_NX | M.EFER_SVME | 1 << 13 | M.EFER_FFXSR
    | 1 << 15 | 1 << 17 | 1 << 18 | 1 << 20 | M.EFER_AUTOIBRS
)  # fmt: skip


def valid_cr_write(cr: int, value: int, mode: PagingMode) -> bool:
    """The architectural checks of MOV to CR0/CR3/CR4/CR8 (APM vol. 2, 3.1)."""
    if cr == 0:
        pg_without_pe = value & M.CR0_PG and not value & M.CR0_PE
        cd_clear_nw_set = value & M.CR0_NW and not value & M.CR0_CD
        long_without_pae = value & M.CR0_PG and mode.efer & M.EFER_LME and not mode.cr4 & M.CR4_PAE
        return not (value >> 32 or pg_without_pe or cd_clear_nw_set or long_without_pae)
    if cr == 3:
        return not value >> 52
    if cr == 4:
        leaving_pae = mode.efer & M.EFER_LMA and not value & M.CR4_PAE
        return not (value & ~_CR4_VALID or leaving_pae)
    if cr == 8:
        return not value >> 4
    return False


def valid_efer_write(value: int, mode: PagingMode) -> bool:
    """The architectural checks of WRMSR to EFER (APM vol. 2, 3.1.7 and 14.6.1):
    reserved bits, and LME may not change while paging is on. A write of LMA is
    ignored by the processor, not refused."""
    lme_changes = mode.paging and (value ^ mode.efer) & M.EFER_LME
    return not (value & ~_EFER_VALID or lme_changes)


class GuestCpu:
    """The Unicorn-backed CPU of one vCPU, over its VM's guest memory.

    ``sim`` receives the simulator's own view of the guest (each #VC with its
    instruction); it belongs to whoever created the platform, never to the
    hypervisor.
    """

    def __init__(
        self,
        memory: GuestMemory,
        *,
        cbit: int,
        sev_status: int,
        cpu_model: int = x86.UC_CPU_X86_EPYC,
        on_vc: Callable[[int, int, bytes, int], None] | None = None,
    ) -> None:
        self.memory = memory
        self.sev_status = sev_status
        #: MSR 0xC0010130 as the guest last wrote it (hardware state, not in the VMSA).
        self.ghcb_msr = 0
        #: CR8, the task priority (TPR[7:4]). Unicorn's CR8 is an APIC it lacks, so the
        #: CPU model keeps it; the VMSA holds it in V_TPR (``vintr_ctrl`` bits 3:0).
        self.tpr = 0
        self._vintr_ctrl = 0
        #: Set by VMRUN from the VMCB: exit code -> intercepted?
        self.intercepted: Callable[[int], bool] = lambda code: True
        #: Set by VMRUN from the MSR permission map: (msr, write) -> intercepted?
        self.msr_intercepted: Callable[[int, bool], bool] = lambda msr, write: True
        #: A virtual interrupt waits for the guest to enable interrupts (V_IRQ with
        #: the VINTR intercept): the CPU exits as soon as RFLAGS.IF is set.
        self.virq_pending = False
        self._on_vc = on_vc
        self.engine = Engine(cpu_model)
        uc = self.uc = self.engine.uc
        self._mapped: list[int] = []
        self._map(memory)
        self.regs = Registers(uc, self.engine.env)
        self.mmu = Mmu(uc, memory, cbit, self.regs.cpl)
        self.delivery = Delivery(self.regs, self.mmu)
        self.interceptor = Interceptor(self.engine, self.mmu, self.regs.code_bits, self._at_site,
                                       self._retranslate)  # fmt: skip
        engine = self.engine
        engine.hook_add(UC_HOOK_TLB_FILL, self.mmu.tlb_fill)
        engine.hook_add(UC_HOOK_INTR, self._on_interrupt)
        engine.hook_add(UC_HOOK_INSN_INVALID, self._on_invalid)
        # Bounded to the poison page: any unbounded memory hook makes Unicorn 2.1's
        # notdirty_write keep every RAM page on the slow store path (about 10x per
        # store). A fill refused for MMIO needs no hook: the run ends with an
        # unmapped-access error and _error_stop takes the fault.
        engine.hook_add(UC_HOOK_MEM_UNMAPPED, self._on_unmapped, POISON, POISON + 0xFFF)
        self._stop: _Stop | None = None
        self._last_site: tuple[int, int] | None = None
        #: Guest software the model runs as this vCPU's #VC handler (None: the IDT's).
        self.vc_model: VcModel | None = None
        self._vc_run: Generator[None, None, int | None] | None = None
        self._deferred_event: Event | None = None
        #: time.monotonic() at which the host takes the CPU back (an INTR exit), if any.
        self.deadline: float | None = None
        #: Instructions the guest may still retire before the host takes the CPU back
        #: (counted runs: deterministic slices), if any.
        self.budget: int | None = None
        #: The value of :attr:`guest_ns` at which the host takes the CPU back, if any.
        self.guest_limit: int | None = None
        #: The wall-clock deadline of the run in progress, and the earliest one this
        #: CPU has queued with the host's timer and not yet seen fire (None: none).
        self._run_deadline: float | None = None
        self._armed: float | None = None
        #: What the CPU spent in guest mode: host nanoseconds on guest code (the
        #: simulator's own work inside a run left out: :mod:`sevsim.hw.run_clock`),
        #: and instructions retired in counted runs (a performance counter of the host).
        self.guest_ns = 0
        self.retired = 0
        self._running = False
        self._stop_lock = threading.Lock()
        #: The last #VC's exit code and info, as the VMSA keeps them.
        self.guest_exit = (0, 0, 0)

    def _map(self, memory: GuestMemory) -> None:
        for region in memory.ram:
            self.uc.mem_map_ptr(region.gpa, region.size, 7, region.address)
            self._mapped.append(region.gpa)

    def rebind(self, memory: GuestMemory) -> None:
        """VMRUN with other nested page tables than last time: this CPU now reaches
        another guest-physical space (a hypervisor pointing a VMCB at another VM)."""
        if memory is self.memory:
            return
        for gpa in self._mapped:
            self.uc.mem_unmap(gpa, next(r.size for r in self.memory.ram if r.gpa == gpa))
        self._mapped.clear()
        self.mmu.close()
        self.memory = memory
        self._map(memory)
        self.mmu.memory = memory
        self.mmu.forget_walks()
        memory.on_page_changed.append(self.mmu._page_changed)
        self.mmu.flush_tlb()
        self.uc.ctl_flush_tb()

    def close(self) -> None:
        self.mmu.close()

    # -- state ---------------------------------------------------------------------

    def cpl(self) -> int:
        return self.regs.cpl()

    def bits(self) -> int:
        """Operand size of the current code segment: 16, 32 or 64."""
        return self.regs.code_bits()

    def load_state(self, state: dict[str, Any]) -> None:
        """Load VMSA fields (VMRUN of a VMSA this CPU does not hold yet)."""
        self.regs.load_state(state)
        self.mmu.mode = PagingMode(state.get("cr0", 0), state.get("cr3", 0), state.get("cr4", 0),
                                   self.regs.msr(M.MSR_EFER), self.mmu.mode.cbit)  # fmt: skip
        self.mmu.flush_tlb()
        self.uc.ctl_flush_tb()
        self.ghcb_msr = state.get("ghcb_msr", self.ghcb_msr)
        self._vintr_ctrl = state.get("vintr_ctrl", 0)
        self.tpr = self._vintr_ctrl & 0xF

    def save_state(self) -> dict[str, Any]:
        """The register state as VMSA fields (what #VMEXIT writes back to the VMSA)."""
        state = self.regs.save_state()
        state["cpl"] = self.cpl()
        state["vintr_ctrl"] = self._vintr_ctrl & ~0xF | self.tpr  # V_TPR: bits 3:0
        code, info1, info2 = self.guest_exit
        state.update(guest_exit_code=code, guest_exit_info_1=info1, guest_exit_info_2=info2)
        return state

    def set_key(self, key_id: int) -> None:
        """VMRUN under another ASID's key: every private page now decrypts with it."""
        if key_id != self.mmu.kid:
            self.mmu.kid = key_id
            self.mmu.flush_tlb()
            self.uc.ctl_flush_tb()

    def interrupts_enabled(self) -> bool:
        """RFLAGS.IF, which the hardware reports to KVM in the VMCB's int_state."""
        return self.regs.interrupt_flag()

    def interrupt_shadow(self) -> bool:
        """The STI / MOV SS shadow, reported in int_state beside IF."""
        return self.regs.interrupt_shadow()

    # -- hooks --------------------------------------------------------------------

    def _halt(self, stop: _Stop) -> None:
        if self._stop is None:
            self._stop = stop
        self.engine.stop()

    def _retranslate(self) -> None:
        self._halt(_Retranslate())

    def _on_unmapped(self, uc: Uc, access: int, address: int, *_: Any) -> bool:
        fault = self.mmu.take_fault() or self.mmu.unmapped(access == UC_MEM_WRITE_UNMAPPED,
                                  access == UC_MEM_FETCH_UNMAPPED, address)  # fmt: skip
        self._halt(self._fault_stop(fault))
        return False

    @staticmethod
    def _fault_stop(fault: Fault) -> _Stop:
        if fault.npf_gpa is not None:
            return _Npf(fault.npf_gpa, fault.access == ACCESS_WRITE, fault.access == ACCESS_FETCH)
        if fault.vector == Vector.PF:
            return Event(Vector.PF, fault.error_code, fault.vaddr)
        return Event(Vector.GP, 0)

    def _on_interrupt(self, uc: Uc, intno: int, _: Any) -> None:
        if not 0 <= intno <= 0xFF:  # Unicorn's own exits (after its nested SVM): not ours
            self._halt(Event(Vector.UD))
            return
        self._halt(Event(intno, software=self._is_int_n(intno)))

    def _is_int_n(self, intno: int) -> bool:
        """Whether the instruction just before RIP is ``INT intno`` (a software interrupt,
        which pushes no error code; RIP is already past it)."""
        try:
            return self.mmu.fetch(self.regs.rip - 2, 2) == bytes([0xCD, intno])
        except GuestAccessFault:
            return False

    def _on_invalid(self, uc: Uc, _: Any) -> bool:
        self._halt(Event(Vector.UD))
        return False

    def _at_site(self, address: int, site: Sensitive) -> None:
        """A sensitive instruction is about to run: stop in front of it, let it run, or
        finish it here.

        Runs inside Unicorn (a code hook), so whatever needs no #VMEXIT is done here: a
        GHCB MSR write is taken and the instruction then runs natively (Unicorn drops
        writes to MSRs it does not know), as do instructions the VMCB does not
        intercept. Before an INVLPG, or an INVLPGA the VMCB lets run, the MMU drops the
        fills it keeps; Unicorn then drops its own entry for the page (or, for INVLPG
        outside CPL 0, raises the #GP). Where a hook may move RIP (:meth:`_in_run_ok`),
        the usual #VC enters the guest's handler and the instructions the CPU answers
        itself (RDMSR of the GHCB MSR or SEV_STATUS, a CR8 read) are retired, the run
        going on. Everything else stops the run in front of the instruction.
        """
        action = site.action
        if action is _REAL_MODE_IRET:
            if not self.mmu.mode.cr0 & M.CR0_PE and self.regs.stack_bits() == 32:
                self._halt(_AtSite(site, address))
            return
        fault = self._privilege_fault(site)
        if fault is not None:  # checked by the hardware before the intercept
            self._halt(fault)
            return
        if action is _NAE:
            if not self.intercepted(site.exit_code):
                if site.exit_code == _INVLPGA:
                    self.mmu.forget_fills()
            elif not self._raise_vc_in_run(site.exit_code, address, site.length):
                self._halt(_AtSite(site, address))
            return
        if action is _TLB_INVALIDATION:
            self.mmu.forget_fills()
            return
        if action is _CR8_READ and self._in_run_ok():
            self._read_cr8(site, in_run=True)
            return
        if action is _HARDWARE_MSR:
            ecx = self.regs.read(x86.UC_X86_REG_RCX) & 0xFFFF_FFFF
            write = site.mnemonic == "wrmsr"
            if ecx == M.MSR_AMD64_SEV_ES_GHCB and write:
                self.ghcb_msr = self._edx_eax()
                return
            if ecx in _HARDWARE_MSRS:
                if self._in_run_ok():
                    self._hardware_msr(ecx, write, site.length, in_run=True)
                    return
            elif not self.msr_intercepted(ecx, write):
                if not (write and ecx == M.MSR_EFER):  # EFER: checked by the model
                    return
            elif self._raise_vc_in_run(SvmExit.MSR, address, site.length):
                return
        self._halt(_AtSite(site, address))

    def _in_run_ok(self) -> bool:
        """Whether a hook may move RIP itself and let the run go on: not in a counted
        run (the instruction the hook is in front of would count as retired), and not
        before Unicorn reports new blocks (a block left by a RIP write does not count as
        one that ran to its end, so the block it leads to would go undecoded:
        :mod:`sevsim.hw.intercept`)."""
        return self.budget is None and self.interceptor.reporting

    def _edx_eax(self) -> int:
        regs = self.regs
        rdx, rax = regs.read(x86.UC_X86_REG_RDX), regs.read(x86.UC_X86_REG_RAX)
        return (rdx & 0xFFFF_FFFF) << 32 | rax & 0xFFFF_FFFF

    def _privilege_fault(self, site: Sensitive) -> Event | None:
        """The #GP/#UD an instruction takes at this CPL before it can be intercepted.

        APM vol. 2, 15.9: instruction intercepts are checked after the simple
        exceptions, CPL checks among them; IN/OUT check IOPL (a TSS without an I/O
        bitmap, as sevsim's guests have, allows nothing beyond it).
        """
        cpl = self.regs.cpl()
        if cpl == 0:
            return None
        code = site.exit_code
        if code == SvmExit.IOIO:
            iopl = self.regs.iopl()
            return Event(Vector.GP, 0) if cpl > iopl else None
        if code in (SvmExit.MONITOR, SvmExit.MWAIT):
            return Event(Vector.UD)
        if code == SvmExit.RDPMC:
            pce = self.mmu.mode.cr4 & (1 << 8)
            return None if pce else Event(Vector.GP, 0)
        if code in _CPL0_ONLY or site.action in _CPL0_ACTIONS:
            return Event(Vector.GP, 0)
        return None

    # -- running --------------------------------------------------------------------

    def _emulate(self, start: int) -> None:
        """Let Unicorn run the guest from ``start`` until something stops it."""
        if self.mmu.tlb_stale:
            self.mmu.flush_tlb()
        if self.mmu.code_stale:
            self.mmu.code_stale = False
            self.uc.ctl_flush_tb()
            # Fetches fill again, telling the other CPUs the code is run here.
            self.mmu.flush_tlb()
        if not self.interceptor.reporting:  # a block Unicorn will not report
            self.interceptor.prime(self._linear(start))
        deadline = self.deadline
        if self.guest_limit is not None:
            # Guest time goes at the host's pace while the engine runs. A run gets a
            # window of its own however little is left, or the engine's fixed cost
            # could eat it all, run after run, and the guest never move on.
            left = max(self.guest_limit - self.guest_ns, _MIN_RUN_NS)
            at = time.monotonic() + left / 1e9
            deadline = at if deadline is None else min(deadline, at)
        # From here on the timer stops this run when the deadline passes (time_is_up,
        # again and again until the engine has started). The CPU keeps one entry
        # queued: after each exit of a KVM_RUN it comes back towards the same deadline,
        # and with a guest-time slice towards a later one at every entry (guest time
        # runs slower than the wall clock), which the queued entry hands on to when it
        # fires (time_is_up). Only an earlier deadline, or one queued after the last
        # entry fired, is queued anew.
        queue = None
        with self._stop_lock:
            self._run_deadline = deadline
            self._running = True
            armed = self._armed
            if deadline is not None and (
                    armed is None or deadline < armed or time.monotonic() >= armed):  # fmt: skip
                self._armed = queue = deadline
        if queue is not None:
            watchdog.arm(self, queue)
        count = 0 if self.budget is None else max(self.budget, 1)
        clock = self.engine.clock
        mark = clock.begin()
        try:
            self.engine.start(start, count)
        finally:
            self.guest_ns += clock.end(mark)
            if count:
                retired = self.engine.retired
                self.retired += retired
                self.budget = count - retired
            with self._stop_lock:
                self._running = False

    def _linear(self, rip: int) -> int:
        """The linear address of ``rip``: flat in 64-bit mode, else CS's cached base
        plus EIP — which in real mode need not be the selector times 16 (the reset
        CS, or a CS protected mode left behind on its way back to real mode)."""
        if self.bits() == 64:
            return rip
        return (self.regs.segment("cs").base + rip) & 0xFFFF_FFFF

    def _slice_over(self) -> bool:
        """The host's timer has taken the CPU back: its time or its instruction
        budget for this VMRUN is used up."""
        if self.budget is not None and self.budget <= 0:
            return True
        if self.guest_limit is not None and self.guest_ns >= self.guest_limit:
            return True
        return self.deadline is not None and time.monotonic() >= self.deadline

    def time_is_up(self, deadline: float) -> bool:
        """Called by the host timer when ``deadline`` passes: stop the guest if it is
        still running towards it (True: the timer looks again soon). A run towards a
        later deadline goes on, and that deadline is queued in its place."""
        with self._stop_lock:
            running_to = self._run_deadline if self._running else None
            if running_to == deadline:
                self.engine.interrupt()
                return True
            if running_to is None or running_to < deadline:
                return False  # not running, or towards an earlier deadline, queued itself
            self._armed = running_to
        watchdog.arm(self, running_to)
        return False

    def run(self) -> HwExit:
        """Run the guest until something the hypervisor must see (a #VMEXIT)."""
        self._last_site = None
        if self._vc_run is not None:
            hw_exit = self._continue_vc()
            if hw_exit is not None:
                return hw_exit
        while True:
            if self.virq_pending and self.interrupts_enabled() and not self.interrupt_shadow():
                return HwExit(SvmExit.VINTR)
            if self._slice_over():
                return HwExit(SvmExit.INTR, why="the host's time slice ended")
            self._stop = None
            try:
                self._emulate(self.regs.rip)
            except UcError as err:
                stop = self._stop or self._error_stop(err)
            else:
                stop = self._stop or self._natural_stop()
            hw_exit = self._handle(stop)
            if hw_exit is not None:
                return hw_exit

    def _error_stop(self, err: UcError) -> _Stop:
        refused = self.mmu.take_fault()  # an access the TLB fill refused: MMIO
        if refused is not None:
            return self._fault_stop(refused)
        if err.errno == UC_ERR_INSN_INVALID:
            return Event(Vector.UD)
        if err.errno == TIMER_ERROR:
            return _Interrupted()
        return Event(Vector.GP, 0)

    def _natural_stop(self) -> _Stop:
        """Unicorn returned by itself: a HLT nobody hooked, or the host's timer."""
        if self._slice_over():
            return _Interrupted()
        rip = self.regs.rip
        return _AtSite(Sensitive(SvmExit.HLT, 1, Action.AUTOMATIC_EXIT, "hlt"), rip - 1)

    def _handle(self, stop: _Stop) -> HwExit | None:
        if type(stop) is _AtSite:  # the usual stop, first: a hooked instruction
            return self._handle_site(stop.site, stop.rip)
        match stop:
            case _Retranslate():
                self.interceptor.drop_stale_blocks()
                return None
            case _Interrupted():
                return HwExit(SvmExit.INTR, why="the host's time slice ended")
            case Event():
                return self._deliver(stop)
            case _Npf(gpa, write, fetch):
                # exit_info_1: a #PF-style error code (present, reserved: the MMIO SPTE;
                # write, instruction fetch)
                code = 0x9 | (0x2 if write else 0) | (0x10 if fetch else 0)
                return self.raise_vc(SvmExit.NPF, code, gpa)
            case _AtSite(site, address):
                return self._handle_site(site, address)
        raise AssertionError(f"unknown stop {stop!r}")

    def _deliver(self, event: Event) -> HwExit | None:
        why = self.delivery.deliver(event)
        return None if why is None else HwExit(SvmExit.SHUTDOWN, why=why)

    # -- what the model retires itself ------------------------------------------------

    def exit_site(self) -> tuple[int, bytes, int]:
        """(linear address, bytes, code size) of the instruction behind the last exit,
        for the simulator's view: the sensitive instruction that caused it, else the
        instruction at RIP."""
        address, length = self._last_site or (self._linear(self.regs.rip), MAX_INSN)
        try:
            insn = self.mmu.code_at(address, length)
        except GuestAccessFault:
            insn = b""
        return address, insn, self.bits()

    def _retire(self, length: int, in_run: bool = False) -> None:
        """The model completed the instruction at RIP: move past it, in place between
        runs, through the API from a hook (``in_run``: the engine then leaves the block
        and goes on there). It was the one an STI or MOV SS shadow covered, if any, so
        the shadow is over (QEMU ends it only when it executes the instruction itself)."""
        regs = self.regs
        regs.set_rip(regs.rip + length, in_run)
        regs.end_interrupt_shadow()

    def _read_cr8(self, site: Sensitive, in_run: bool = False) -> None:
        """MOV from CR8: the TPR the model keeps (writes trap to the hypervisor)."""
        self.regs.set_gpr(GPR_OF[site.operand], self.tpr)
        self._retire(site.length, in_run)

    def _hardware_msr(self, ecx: int, write: bool, length: int, in_run: bool = False) -> None:
        """RDMSR of the GHCB MSR or SEV_STATUS, which the CPU answers itself under
        SEV-ES; WRMSR to SEV_STATUS is ignored (the register is read-only)."""
        if not write:
            value = self.ghcb_msr if ecx == M.MSR_AMD64_SEV_ES_GHCB else self.sev_status
            self.regs.set_gpr("rax", value & 0xFFFF_FFFF)
            self.regs.set_gpr("rdx", value >> 32)
        self._retire(length, in_run)

    def _handle_site(self, site: Sensitive, address: int) -> HwExit | None:
        self._last_site = (address, site.length)
        action = site.action
        if action is _AUTOMATIC_EXIT:  # VMGEXIT, HLT: trap-like, RIP moves on
            self._retire(site.length)
            return HwExit(site.exit_code)
        if action is _CR8_READ:
            self._read_cr8(site)
            return None
        if action is _CR_WRITE:
            return self._write_cr(site)
        if action is _HARDWARE_MSR:
            return self._msr(site)
        if action is _REAL_MODE_IRET:
            return self._real_mode_iret(site)
        return self.raise_vc(site.exit_code)

    def _real_mode_iret(self, site: Sensitive) -> HwExit | None:
        """IRET in real mode popping through ESP, as the CPU does when SS's cached
        descriptor is 32-bit (APM vol. 3, IRET: pops use the stack's address size).

        OVMF's MpInitLib returns an SEV-ES AP to real mode this way with its stack
        above 64 KiB; Unicorn would pop from SS:SP and jump to garbage. CS gets the
        selector and the selector times 16 as base, keeping its limit and attributes.
        """
        regs = self.regs
        word = 4 if site.mnemonic == "iretd" else 2
        esp = regs.read(x86.UC_X86_REG_RSP) & 0xFFFF_FFFF
        try:
            raw = self.mmu.read(regs.segment("ss").base + esp, 3 * word)
        except GuestAccessFault:
            return self._deliver(Event(Vector.SS, 0))
        ip, cs, flags = struct.unpack("<3I" if word == 4 else "<3H", raw)
        loaded = _IRET_LOADS[word]
        regs.rflags = (regs.rflags & ~loaded | flags & loaded) & ~_RFLAGS_ZEROS | 2
        regs.write(x86.UC_X86_REG_RSP, esp + 3 * word)
        code = regs.segment("cs")
        regs.set_segments({"cs": Segment(cs & 0xFFFF, code.attrib, code.limit, (cs & 0xFFFF) << 4)})
        regs.rip = ip
        regs.end_interrupt_shadow()
        return None

    def _msr(self, site: Sensitive) -> HwExit | None:
        regs = self.regs
        ecx = regs.read(x86.UC_X86_REG_RCX) & 0xFFFF_FFFF
        write = site.mnemonic == "wrmsr"
        if ecx in _HARDWARE_MSRS:
            self._hardware_msr(ecx, write, site.length)
            return None
        if ecx == M.MSR_EFER and write and not self.msr_intercepted(ecx, True):
            return self._write_efer(self._edx_eax(), site.length)
        return self.raise_vc(SvmExit.MSR)

    def _write_efer(self, value: int, length: int) -> HwExit | None:
        """WRMSR to EFER, passed through: the CPU checks it, then the trap exit (if
        armed) reports the new value. Unicorn drops bits it does not know instead of
        faulting, so the model does the checks."""
        mode = self.mmu.mode
        if not valid_efer_write(value, mode):
            return self._deliver(Event(Vector.GP, 0))
        efer = value & ~M.EFER_LMA | mode.efer & M.EFER_LMA  # LMA is the CPU's to set
        self.regs.set_msr(M.MSR_EFER, efer)
        self.mmu.mode = PagingMode(mode.cr0, mode.cr3, mode.cr4, efer | M.EFER_SVME, mode.cbit)
        self._retire(length)
        if self.intercepted(SvmExit.EFER_WRITE_TRAP):
            return HwExit(SvmExit.EFER_WRITE_TRAP, info1=efer | M.EFER_SVME)
        return None

    def _write_cr(self, site: Sensitive) -> HwExit | None:
        """MOV to CR0/CR3/CR4/CR8, LMSW, CLTS: retired by the model (the value checked,
        written, RIP moved on), then the write trap the VMCB arms reports the new
        value in exit_info_1. No single-stepping: that would discard every
        translated block."""
        regs, mode = self.regs, self.mmu.mode
        cr = site.exit_code - _CR0_WRITE_TRAP
        base = site.mnemonic.split()[-1]
        if base == "clts":
            value = mode.cr0 & ~(1 << 3)
        elif base == "lmsw":  # the low four bits; PE can be set, not cleared
            source = regs.gpr(GPR_OF.get(site.operand, "rax")) if site.operand else 0
            value = mode.cr0 & ~0xE | source & 0xF | mode.cr0 & 1
        else:
            value = regs.gpr(GPR_OF[site.operand])
            if regs.code_bits() != 64:
                value &= 0xFFFF_FFFF
        if not valid_cr_write(cr, value, mode):
            return self._deliver(Event(Vector.GP, 0))
        self._retire(site.length)
        if cr == 8:
            self.tpr = value
        else:
            self._set_cr(cr, value)
        trap = _CR0_WRITE_TRAP + cr
        return HwExit(trap, info1=value) if cr != 3 and self.intercepted(trap) else None

    def _set_cr(self, cr: int, value: int) -> None:
        """Write CR0/CR3/CR4 into the CPU; paging changes take LMA and the TLB along.

        As on hardware, the TLB is flushed by a CR3 write and by CR0/CR4 writes that
        change how addresses translate, not by rewriting CR0/CR4 with the same value
        (OVMF writes CR0, CR3 and CR4 back on every exception exit). Reloading CR3
        keeps the translations that are still exact (:meth:`Mmu.reload_cr3`)."""
        mode = self.mmu.mode
        old = mode.cr0 if cr == 0 else mode.cr3 if cr == 3 else mode.cr4
        if value == old:
            if cr == 3:  # Unicorn would flush its TLB whatever the tables say
                self.mmu.reload_cr3()
            return
        self.regs.write(CR_IDS[cr], value)
        efer = self.regs.msr(M.MSR_EFER) | M.EFER_SVME
        cr0, cr3, cr4 = (value if cr == n else getattr(mode, f"cr{n}") for n in (0, 3, 4))
        self.mmu.mode = PagingMode(cr0, cr3, cr4, efer, mode.cbit)
        if cr == 3 or (old ^ value) & _PAGING_BITS[cr]:
            self.mmu.flush_tlb()

    # -- #VC and events ---------------------------------------------------------------

    def raise_vc(self, exit_code: int, info1: int = 0, info2: int = 0) -> HwExit | None:
        """An NAE event: #VC with the exit code as error code, to the guest's handler.

        The hardware also records the exit in the VMSA (``guest_exit_code`` and
        ``guest_exit_info_1/2``), where only the guest's state holds it.
        """
        if self._on_vc is not None:
            rip = self.regs.rip
            self._on_vc(exit_code, rip, self._code_bytes(rip), self.bits())
        self.guest_exit = (exit_code, info1, info2)
        if self.vc_model is None:
            return self._deliver(Event(_VC, exit_code))
        self._vc_run = self.vc_model(GuestView(self), exit_code)
        return self._continue_vc()

    def _raise_vc_in_run(self, exit_code: int, address: int, length: int) -> bool:
        """:meth:`raise_vc` from the code hook in front of the instruction at
        ``address``, without stopping the run: the usual #VC (no modeled handler, its
        vector's delivery plan holding, :meth:`Delivery.deliver_in_run`) enters the
        handler and the engine goes on there, where a hook may move RIP
        (:meth:`_in_run_ok`). False, with nothing done, for anything else, which the
        caller stops for. Should the observer of #VCs fail, the run ends in a
        simulator fault that names this instruction (:meth:`exit_site`)."""
        if self.vc_model is not None or not self._in_run_ok():
            return False
        rip = self.regs.rip
        code = self._code_bytes(rip) if self._on_vc is not None else b""
        if not self.delivery.deliver_in_run(_VC, exit_code):
            return False
        self.guest_exit = (exit_code, 0, 0)
        if self._on_vc is not None:
            last, self._last_site = self._last_site, (address, length)
            self._on_vc(exit_code, rip, code, self.bits())
            self._last_site = last
        return True

    def _code_bytes(self, rip: int) -> bytes:
        try:
            return self.mmu.code_at(self._linear(rip), MAX_INSN)
        except GuestAccessFault:
            return b""

    def inject(self, event_inj: int, error_code: int) -> HwExit | None:
        """Deliver an EVENTINJ event on VMRUN (exceptions, NMIs, interrupts).

        It arrives where the guest resumes. A modeled #VC handler in the middle of
        its exchange cannot be interrupted in Python: the event waits until it ends.
        """
        if not event_inj & EventInj.VALID:
            return None
        vector = event_inj & EventInj.VECTOR_MASK
        kind = (event_inj >> EventInj.TYPE_SHIFT) & 7
        if kind not in _EVENT_TYPES or (kind == EventInj.TYPE_EXEPT
                                        and vector not in _EXCEPTION_VECTORS):  # fmt: skip
            # APM 15.20: a reserved TYPE, or an exception with a vector that is none
            # (2 is the NMI), makes VMRUN fail before the guest runs.
            return HwExit(SvmExit.ERR, why=f"EVENTINJ {event_inj:#x}: VMEXIT_INVALID")
        if kind == EventInj.TYPE_NMI:
            vector = Vector.NMI  # the vector field is ignored for an NMI
        code = error_code if event_inj & EventInj.EV else None
        event = Event(vector, code, software=kind == EventInj.TYPE_SOFT, injected=True)
        if self._vc_run is not None:
            self._deferred_event = event
            return None
        return self._deliver(event)

    def _continue_vc(self) -> HwExit | None:
        """Run the modeled handler to its next VMGEXIT (an exit) or to its end."""
        assert self._vc_run is not None
        try:
            next(self._vc_run)
        except StopIteration as done:
            self._vc_run = None
            if done.value is not None:  # the handler forwards an exception (#GP, #UD)
                forwarded = self._deliver(Event(done.value))
                if forwarded is not None:
                    return forwarded
            event, self._deferred_event = self._deferred_event, None
            return None if event is None else self._deliver(event)
        except FOREIGN_FAULTS as exc:  # guest software crashed: the vCPU is lost
            self._vc_run = None
            return HwExit(SvmExit.SHUTDOWN, why=f"modeled #VC handler failed: {exc!r}")
        return HwExit(SvmExit.VMGEXIT, why="VMGEXIT from the modeled #VC handler")


__all__ = ["SHARED", "GuestCpu", "HwExit", "valid_cr_write", "valid_efer_write"]
