"""One vCPU's silicon: a Unicorn engine running an SEV-ES guest until a #VMEXIT.

The model adds what Unicorn lacks and an SEV-ES guest needs: the page walk with the
C-bit (``paging.walk`` from a TLB-fill hook), the hardware-handled MSRs (GHCB MSR,
SEV_STATUS), interception of sensitive instructions before they execute
(``intercept``), #VC delivery for non-automatic exits, automatic exits (VMGEXIT,
HLT), and exception delivery through the guest's IDT with escalation to a double
fault and then SHUTDOWN.

Everything here is hardware: it sees guest plaintext and registers. Only
``hw.svm`` talks to it; the hypervisor never does.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable, Generator
from typing import Any

from attrs import define, evolve, field, frozen
from unicorn import (
    UC_ARCH_X86,
    UC_CTL_IO_WRITE,
    UC_CTL_TLB_FLUSH,
    UC_ERR_EXCEPTION,
    UC_ERR_FETCH_UNMAPPED,
    UC_ERR_INSN_INVALID,
    UC_ERR_READ_UNMAPPED,
    UC_ERR_WRITE_UNMAPPED,
    UC_HOOK_CODE,
    UC_HOOK_INSN_INVALID,
    UC_HOOK_INTR,
    UC_HOOK_MEM_UNMAPPED,
    UC_HOOK_TLB_FILL,
    UC_MEM_FETCH,
    UC_MEM_FETCH_UNMAPPED,
    UC_MEM_WRITE,
    UC_MEM_WRITE_UNMAPPED,
    UC_MODE_32,
    UC_MODE_64,
    UC_PROT_EXEC,
    UC_PROT_READ,
    UC_PROT_WRITE,
    UC_TLB_VIRTUAL,
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
from sevsim.hw.intercept import MAX_INSN, Action, Sensitive, candidate_offsets, classify
from sevsim.hw.memory import PAGE_MASK, GuestMemory, PageForm
from sevsim.hw.paging import (
    ACCESS_FETCH,
    ACCESS_READ,
    ACCESS_WRITE,
    NonCanonical,
    PageFault,
    PagingMode,
    Translation,
    walk,
)

#: Intercepted instructions that fault with #GP(0) outside ring 0.
_CPL0_ONLY = frozenset({
    SvmExit.INVD, SvmExit.WBINVD, SvmExit.READ_DR7, SvmExit.WRITE_DR7, SvmExit.VMRUN,
    SvmExit.VMLOAD, SvmExit.VMSAVE, SvmExit.STGI, SvmExit.CLGI, SvmExit.SKINIT,
    SvmExit.INVLPGA,
})  # fmt: skip
#: Actions whose instructions #GP outside CPL 0 (RDMSR/WRMSR, MOV to and from CRs).
_CPL0_ACTIONS = (Action.HARDWARE_MSR, Action.CR_WRITE, Action.CR8_READ)
NMI_VECTOR, VC_VECTOR, DF_VECTOR = Vector.NMI, Vector.VC, Vector.DF
GP_VECTOR, PF_VECTOR, UD_VECTOR = Vector.GP, Vector.PF, Vector.UD
#: Exceptions whose delivery pushes an error code.
_ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})
_CONTRIBUTORY = frozenset({0, 10, 11, 12, 13})
_NO_END = 0xFFFF_FFFF_FFFF_FFFF

_GPR_IDS = {
    "rax": x86.UC_X86_REG_RAX, "rbx": x86.UC_X86_REG_RBX, "rcx": x86.UC_X86_REG_RCX,
    "rdx": x86.UC_X86_REG_RDX, "rsp": x86.UC_X86_REG_RSP, "rbp": x86.UC_X86_REG_RBP,
    "rsi": x86.UC_X86_REG_RSI, "rdi": x86.UC_X86_REG_RDI, "r8": x86.UC_X86_REG_R8,
    "r9": x86.UC_X86_REG_R9, "r10": x86.UC_X86_REG_R10, "r11": x86.UC_X86_REG_R11,
    "r12": x86.UC_X86_REG_R12, "r13": x86.UC_X86_REG_R13, "r14": x86.UC_X86_REG_R14,
    "r15": x86.UC_X86_REG_R15,
}  # fmt: skip
_SEG_IDS = {
    "es": x86.UC_X86_REG_ES, "cs": x86.UC_X86_REG_CS, "ss": x86.UC_X86_REG_SS,
    "ds": x86.UC_X86_REG_DS, "fs": x86.UC_X86_REG_FS, "gs": x86.UC_X86_REG_GS,
}  # fmt: skip
#: Capstone's register names (64-bit and 32-bit forms) -> our GPR names.
_GPR_NAME = {
    **{n: n for n in ("rax", "rbx", "rcx", "rdx", "rsp", "rbp", "rsi", "rdi")},
    **{"e" + n[1:]: n for n in ("rax", "rbx", "rcx", "rdx", "rsp", "rbp", "rsi", "rdi")},
    **{f"r{i}": f"r{i}" for i in range(8, 16)},
    **{f"r{i}d": f"r{i}" for i in range(8, 16)},
}
_CR_IDS = {0: x86.UC_X86_REG_CR0, 2: x86.UC_X86_REG_CR2, 3: x86.UC_X86_REG_CR3,
           4: x86.UC_X86_REG_CR4}  # fmt: skip
#: VMSA fields held in MSRs of the Unicorn CPU.
_MSR_FIELDS = {
    "efer": M.MSR_EFER, "star": M.MSR_STAR, "lstar": M.MSR_LSTAR, "cstar": M.MSR_CSTAR,
    "sfmask": M.MSR_SFMASK, "kernel_gs_base": M.MSR_KERNEL_GS_BASE, "g_pat": M.MSR_IA32_CR_PAT,
    "sysenter_cs": M.MSR_IA32_SYSENTER_CS, "sysenter_esp": M.MSR_IA32_SYSENTER_ESP,
    "sysenter_eip": M.MSR_IA32_SYSENTER_EIP,
}  # fmt: skip


@frozen
class HwExit:
    """A #VMEXIT as the hardware reports it in the VMCB control area.

    ``why``, ``rip`` and ``insn`` are the simulator's debug record of the exit (the
    guest instruction at ``rip``, decoded for the trace): a real hypervisor never
    sees them, and ``sevsim.kvm`` passes them on untouched, only for the trace.
    """

    exit_code: int
    info1: int = 0
    info2: int = 0
    why: str = ""
    rip: int | None = None
    insn: bytes = b""
    bits: int = 64
    #: (rip, exit code) of each #VC raised since the previous exit.
    vcs: tuple[tuple[int, int], ...] = ()


@frozen
class _AtSite:
    site: Sensitive
    rip: int


@frozen
class _Exception:
    vector: int
    error_code: int | None = None
    cr2: int | None = None
    software: bool = False  # INT n: no error code, whatever the vector


@frozen
class _PendingFault:
    """A failed translation waiting for the access to reveal its exact address."""

    vaddr: int
    error_code: int | None  # the #PF error code (None: NPF, or #GP if gpa is None too)
    gpa: int | None  # the page's guest-physical address when it has no RAM


#: A physical page no guest has: failed translations point here (see _tlb_fill).
_POISON = 0xDEAD_0000_0000


@frozen
class _Halted:
    pass


@frozen
class _Interrupted:
    """The host's timer: the physical interrupt that takes a CPU back from a guest."""


@frozen
class _Npf:
    """An access to a guest-physical address with no RAM: #VC(NPF), as for MMIO."""

    gpa: int
    write: bool
    fetch: bool = False


Stop = _AtSite | _Exception | _Halted | _Interrupted | _Npf


@define(eq=False)
class _CodePage:
    paddr: int
    hooks: list[int] = field(factory=list)


class GuestCpu:
    """The Unicorn-backed CPU of one vCPU, over its VM's guest memory."""

    def __init__(
        self,
        memory: GuestMemory,
        *,
        cbit: int,
        sev_status: int,
        vcpu_id: int = 0,
        cpu_model: int = x86.UC_CPU_X86_EPYC,
    ) -> None:
        self.memory = memory
        self.cbit = cbit
        self.vcpu_id = vcpu_id
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
        self.uc = Uc(UC_ARCH_X86, UC_MODE_64)
        self.uc.ctl_set_cpu_model(cpu_model)
        self.uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)
        # With exits enabled and none set, emu_start's "until" is ignored: otherwise
        # Unicorn translates that address through our page walk on every start.
        self.uc.ctl_exits_enabled(True)
        self.uc.ctl_set_exits([])
        for region in memory.ram:
            self.uc.mem_map_ptr(region.gpa, region.size, 7, region.address)
        self._stop: Stop | None = None
        self._skip_site: int | None = None
        #: True while Unicorn executes guest code: nothing derived from the CPU state
        #: may be cached then. While it is stopped, the model caches the paging mode,
        #: the code size and its own page walks in ``_host_cache``; running the guest,
        #: loading state, entering a handler or writing memory clears it.
        self._running = False
        self._host_cache: dict[Any, Any] = {}
        self._code_pages: dict[int, _CodePage] = {}
        #: Physical page -> the virtual pages whose scan of it is in place.
        self._code_paddrs: dict[int, set[int]] = {}
        self._site_cache: dict[int, Sensitive | None] = {}
        self.uc.hook_add(UC_HOOK_TLB_FILL, self._tlb_fill)
        self.uc.hook_add(UC_HOOK_INTR, self._on_interrupt)
        self.uc.hook_add(UC_HOOK_INSN_INVALID, self._on_invalid)
        self.uc.hook_add(UC_HOOK_MEM_UNMAPPED, self._on_unmapped)
        self._fault: _PendingFault | None = None
        memory.on_page_changed.append(self._page_changed)
        self._tb_flush_pending = False
        #: Guest software the model runs as this vCPU's #VC handler (None: the IDT's).
        self.vc_model: VcModel | None = None
        self._vc_run: Generator[None, None, int | None] | None = None
        self._deferred_event: tuple[int, int | None] | None = None
        #: time.monotonic() at which the host takes the CPU back (an INTR exit), if any.
        self.deadline: float | None = None
        self._watchdog: _Watchdog | None = None
        self._stop_lock = threading.Lock()
        #: The last #VC's exit code and info, as the VMSA keeps them.
        self.guest_exit = (0, 0, 0)
        self._vcs: list[tuple[int, int]] = []

    # -- registers ----------------------------------------------------------------

    def reg(self, name: str) -> int:
        return self.uc.reg_read(_GPR_IDS[name])

    def set_reg(self, name: str, value: int) -> None:
        self.uc.reg_write(_GPR_IDS[name], value)

    @property
    def rip(self) -> int:
        return self.uc.reg_read(x86.UC_X86_REG_RIP)

    @rip.setter
    def rip(self, value: int) -> None:
        self.uc.reg_write(x86.UC_X86_REG_RIP, value)

    def paging_mode(self) -> PagingMode:
        """CR0/CR3/CR4/EFER now. Cached while the guest is stopped (see ``_host_cache``)."""
        if self._running:
            return self._read_paging_mode()
        mode = self._host_cache.get("mode")
        if mode is None:
            mode = self._host_cache["mode"] = self._read_paging_mode()
        return mode

    def _read_paging_mode(self) -> PagingMode:
        r = self.uc.reg_read
        return PagingMode(
            r(x86.UC_X86_REG_CR0), r(x86.UC_X86_REG_CR3), r(x86.UC_X86_REG_CR4),
            self.uc.msr_read(M.MSR_EFER), self.cbit,
        )  # fmt: skip

    def _emulate(self, start: int, count: int = 0) -> None:
        """Let Unicorn run the guest (everything cached about its state goes stale)."""
        self._guest_ran()
        if self.deadline is not None:
            if self._watchdog is None:
                self._watchdog = _Watchdog(self)
            self._watchdog.arm(self.deadline)
        with self._stop_lock:
            self._running = True
        try:
            self.uc.emu_start(start, _NO_END, count=count)
        finally:
            with self._stop_lock:
                self._running = False
            self._guest_ran()

    def _time_is_up(self, deadline: float) -> bool:
        """Called by the watchdog thread: stop the guest if it is still running past
        ``deadline`` (and say so)."""
        with self._stop_lock:
            overdue = self._running and self.deadline == deadline
            if overdue:
                self.uc.emu_stop()
            return overdue

    def _guest_ran(self) -> None:
        """Forget what the guest may have changed: mode, code size, translations."""
        self._host_cache.clear()

    @property
    def cpl(self) -> int:
        return self.uc.reg_read(x86.UC_X86_REG_CS) & 3

    def bits(self) -> int:
        """Operand size of the current code segment: 16, 32 or 64."""
        if not self._running and "bits" in self._host_cache:
            return self._host_cache["bits"]
        bits = self._read_bits()
        if not self._running:
            self._host_cache["bits"] = bits
        return bits

    def _read_bits(self) -> int:
        mode = self.paging_mode()
        if not mode.cr0 & M.CR0_PE:
            return 16
        cs_attr = self._descriptor_attrib(self.uc.reg_read(x86.UC_X86_REG_CS))
        if mode.efer & M.EFER_LMA and cs_attr & (1 << 9):  # L bit of the packed attributes
            return 64
        return 32 if cs_attr & (1 << 10) else 16

    def load_state(self, state: dict[str, Any]) -> None:
        """Load VMSA fields into the CPU (VMRUN of a VMSA the CPU has not cached).

        In protected and long mode, segment registers are loaded by selector from the
        guest's GDT, as a far jump would; the VMSA's hidden parts must agree with that
        GDT. A real-mode VMSA (the reset state) has hidden bases no selector can
        produce (CS base 0xFFFF0000), so its segment caches are forged first.
        """
        self._guest_ran()
        if not state.get("cr0", 0) & M.CR0_PE:
            self._load_segment_caches(state)
        uc = self.uc
        uc.msr_write(M.MSR_EFER, state.get("efer", 0))
        uc.reg_write(x86.UC_X86_REG_CR4, state.get("cr4", 0))
        uc.reg_write(x86.UC_X86_REG_CR3, state.get("cr3", 0))
        uc.reg_write(x86.UC_X86_REG_CR0, state.get("cr0", 0))
        uc.reg_write(x86.UC_X86_REG_CR2, state.get("cr2", 0))
        for name in ("gdtr", "idtr"):
            seg: Segment = state.get(name, Segment())
            reg = x86.UC_X86_REG_GDTR if name == "gdtr" else x86.UC_X86_REG_IDTR
            uc.reg_write(reg, (0, seg.base, seg.limit, 0))
        for name, value in state.items():
            if name in _GPR_IDS:
                uc.reg_write(_GPR_IDS[name], value)
            elif name in _MSR_FIELDS and name != "efer":
                uc.msr_write(_MSR_FIELDS[name], value)
        if state.get("cr0", 0) & M.CR0_PE:
            for name, reg in _SEG_IDS.items():
                uc.reg_write(reg, state.get(name, Segment()).selector)
        for name, reg in (("tr", x86.UC_X86_REG_TR), ("ldtr", x86.UC_X86_REG_LDTR)):
            seg = state.get(name, Segment())
            uc.reg_write(reg, (seg.selector, seg.base, seg.limit, _qemu_flags(seg.attrib)))
        uc.reg_write(x86.UC_X86_REG_FS_BASE, state.get("fs", Segment()).base)
        uc.reg_write(x86.UC_X86_REG_GS_BASE, state.get("gs", Segment()).base)
        self.flush_tlb()
        self._guest_ran()
        uc.reg_write(x86.UC_X86_REG_RFLAGS, state.get("rflags", 2))
        uc.reg_write(x86.UC_X86_REG_RIP, state.get("rip", 0))
        uc.reg_write(x86.UC_X86_REG_DR7, state.get("dr7", 0x400))
        self.ghcb_msr = state.get("ghcb_msr", self.ghcb_msr)
        self._vintr_ctrl = state.get("vintr_ctrl", 0)
        self.tpr = self._vintr_ctrl & 0xF

    def _load_segment_caches(self, state: dict[str, Any]) -> None:
        """Forge the hidden segment state of a real-mode VMSA.

        A 32-bit scratch engine with a GDT of its own (outside guest memory) loads each
        segment from a descriptor holding the VMSA's base, limit and attributes, then
        leaves protected mode: the caches stay. Its CPU state is then restored into
        this engine, which runs every mode from there (Unicorn translates by the CPU's
        mode flags, not by the engine's mode). Selectors read back as scratch indices.
        """
        scratch = Uc(UC_ARCH_X86, UC_MODE_32)
        scratch.mem_map(0, 0x1000)
        names = tuple(_SEG_IDS)
        gdt = b"\0" * 8 + b"".join(_descriptor(state.get(n, Segment())) for n in names)
        scratch.mem_write(0, gdt)
        scratch.reg_write(x86.UC_X86_REG_GDTR, (0, 0, len(gdt) - 1, 0))
        for index, name in enumerate(names, start=1):
            scratch.reg_write(_SEG_IDS[name], index * 8)
        scratch.reg_write(x86.UC_X86_REG_CR0, state.get("cr0", 0))
        self.uc.context_restore(scratch.context_save())

    def save_state(self) -> dict[str, Any]:
        """The register state as VMSA fields (what #VMEXIT writes back to the VMSA)."""
        uc = self.uc
        state: dict[str, Any] = {name: uc.reg_read(reg) for name, reg in _GPR_IDS.items()}
        state.update({name: uc.msr_read(msr) for name, msr in _MSR_FIELDS.items()})
        state["efer"] |= M.EFER_SVME
        for name, reg in _SEG_IDS.items():
            selector = uc.reg_read(reg)
            base = 0
            if name == "fs":
                base = uc.reg_read(x86.UC_X86_REG_FS_BASE)
            elif name == "gs":
                base = uc.reg_read(x86.UC_X86_REG_GS_BASE)
            state[name] = Segment(selector, self._descriptor_attrib(selector), 0xFFFF_FFFF, base)
        for name, reg in (("gdtr", x86.UC_X86_REG_GDTR), ("idtr", x86.UC_X86_REG_IDTR)):
            _, base, limit, _ = uc.reg_read(reg)
            state[name] = Segment(0, 0, limit, base)
        for cr in (0, 2, 3, 4):
            state[f"cr{cr}"] = uc.reg_read(_CR_IDS[cr])
        state["rflags"] = uc.reg_read(x86.UC_X86_REG_RFLAGS)
        state["rip"] = uc.reg_read(x86.UC_X86_REG_RIP)
        state["dr7"] = uc.reg_read(x86.UC_X86_REG_DR7)
        state["cpl"] = self.cpl
        state["vintr_ctrl"] = self._vintr_ctrl & ~0xF | self.tpr  # V_TPR: bits 3:0
        code, info1, info2 = self.guest_exit
        state.update(guest_exit_code=code, guest_exit_info_1=info1, guest_exit_info_2=info2)
        return state

    def _descriptor_attrib(self, selector: int) -> int:
        """The packed VMCB attributes of a GDT descriptor (0 if it cannot be read)."""
        if selector & ~7 == 0 or selector & 4:
            return 0
        _, base, limit, _ = self.uc.reg_read(x86.UC_X86_REG_GDTR)
        if (selector | 7) > limit:
            return 0
        try:
            raw = struct.unpack("<Q", self.virt_read(base + (selector & ~7), 8))[0]
        except _FaultDuringAccess:
            return 0
        return ((raw >> 40) & 0xFF) | ((raw >> 52) & 0xF) << 8

    # -- guest-virtual access by the model (exception delivery, decode) -------------

    def translate(self, vaddr: int, access: int) -> Translation | PageFault | NonCanonical:
        """A supervisor walk for the model's own accesses (cached while the guest is stopped)."""
        key = (vaddr & PAGE_MASK, access)
        cached = None if self._running else self._host_cache.get(key)
        if cached is None:
            cached = walk(self.paging_mode(), vaddr & PAGE_MASK, access, 0, self._read_table)
            if not self._running:
                self._host_cache[key] = cached
        if isinstance(cached, Translation):
            return cached
        return evolve(cached, vaddr=vaddr)

    def _read_table(self, paddr: int, size: int) -> bytes:
        """Page-table reads: always private; a table outside RAM is a nested fault."""
        if self.memory.ram_at(paddr) is None:
            raise _FaultDuringAccess(_Npf(paddr, False))
        return self.memory.guest_read(paddr, size, private=True)

    def _virt_access(self, vaddr: int, size: int, access: int, data: bytes | None) -> bytes:
        out = bytearray()
        done = 0
        while done < size:
            va = vaddr + done
            t = self.translate(va, access)
            if isinstance(t, NonCanonical):
                raise _FaultDuringAccess(_Exception(GP_VECTOR, 0))
            if isinstance(t, PageFault):
                raise _FaultDuringAccess(_Exception(PF_VECTOR, t.error_code, va))
            chunk = min(size - done, 0x1000 - (va & 0xFFF))
            pa = t.paddr | (va & 0xFFF)
            if self.memory.ram_at(pa) is None:
                raise _FaultDuringAccess(_Npf(pa, data is not None))
            if data is None:
                out += self.memory.guest_read(pa, chunk, private=t.private)
            else:
                self.memory.guest_write(pa, data[done : done + chunk], private=t.private)
            done += chunk
        return bytes(out)

    def virt_read(self, vaddr: int, size: int) -> bytes:
        return self._virt_access(vaddr, size, ACCESS_READ, None)

    def fetch(self, vaddr: int, size: int) -> bytes:
        """Instruction bytes as the CPU fetches them: always private, whatever the C-bit."""
        out = bytearray()
        while len(out) < size:
            va = vaddr + len(out)
            t = self.translate(va, ACCESS_FETCH)
            if isinstance(t, PageFault | NonCanonical):
                raise _FaultDuringAccess(_Exception(PF_VECTOR, getattr(t, "error_code", 0), va))
            pa = t.paddr | (va & 0xFFF)
            if self.memory.ram_at(pa) is None:
                raise _FaultDuringAccess(_Npf(pa, False))
            chunk = min(size - len(out), 0x1000 - (va & 0xFFF))
            out += self.memory.guest_read(pa, chunk, private=True)
        return bytes(out)

    def virt_write(self, vaddr: int, data: bytes) -> None:
        try:
            self._virt_access(vaddr, len(data), ACCESS_WRITE, data)
        finally:
            self._guest_ran()  # the write may have changed a page table or the GDT

    # -- Unicorn hooks ------------------------------------------------------------

    def _tlb_fill(self, uc: Uc, vaddr: int, access: int, entry: Any, _: Any) -> bool:
        kind = {UC_MEM_WRITE: ACCESS_WRITE, UC_MEM_FETCH: ACCESS_FETCH}.get(access, ACCESS_READ)
        mode = self.paging_mode()
        fault: _PendingFault | None = None
        try:
            t = walk(mode, vaddr, kind, self.cpl, self._read_table)
        except _FaultDuringAccess as table_fault:  # a page table with no RAM behind it
            assert isinstance(table_fault.stop, _Npf)
            t, fault = None, _PendingFault(vaddr, None, table_fault.stop.gpa & PAGE_MASK)
        if isinstance(t, NonCanonical):
            fault = _PendingFault(vaddr, None, None)
        elif isinstance(t, PageFault):
            fault = _PendingFault(vaddr, t.error_code, None)
        elif t is not None and self.memory.ram_at(t.paddr) is None:
            fault = _PendingFault(vaddr, None, t.paddr)
        if fault is not None and fault.gpa is not None and fault.error_code is None and t:
            # MMIO: the #VC handler decodes the access itself; the page's GPA is enough,
            # and refusing the fill keeps the TLB intact (no flush per MMIO access).
            self._stop = _Npf(fault.gpa, kind == ACCESS_WRITE, kind == ACCESS_FETCH)
            return False
        if fault is not None:
            # Unicorn tells the fill hook only the page. Map the page to a physical page
            # that does not exist: the access then reports its exact offset there.
            self._fault = fault
            entry.paddr = _POISON
            entry.perms = UC_PROT_READ | UC_PROT_WRITE | UC_PROT_EXEC
            return True
        # Instruction fetches are always private; data follows the C-bit.
        private = t.private or kind == ACCESS_FETCH
        if self.memory.convert(t.paddr, PageForm.PRIVATE if private else PageForm.SHARED):
            # Other virtual pages may still map the old view: drop every translation.
            self.flush_tlb()
        assert t is not None
        # CR0.WP clear: supervisor writes ignore the read-only bit.
        writable = t.writable or (self.cpl == 0 and not mode.cr0 & M.CR0_WP)
        perms = UC_PROT_READ | (UC_PROT_WRITE if writable else 0)
        page = vaddr & PAGE_MASK
        scanned = self._code_pages.get(page)
        if kind == ACCESS_FETCH:
            if scanned is None or scanned.paddr != t.paddr:
                self._scan(page, t.paddr)
            # W^X for scanned code: a later write re-fills and forces a rescan.
            perms = UC_PROT_READ | UC_PROT_EXEC
        elif kind == ACCESS_WRITE and t.paddr in self._code_paddrs:
            # Through this page or an alias of it: every scan of that code is stale, and
            # so is every executable translation of it (the next fetch must rescan).
            for stale in list(self._code_paddrs[t.paddr]):
                self._unscan(stale)
            self.flush_tlb()
        elif t.paddr in self._code_paddrs:
            perms &= ~UC_PROT_WRITE
            if scanned is not None and scanned.paddr == t.paddr:
                perms |= UC_PROT_EXEC
        entry.paddr = t.paddr
        entry.perms = perms
        return True

    def flush_tlb(self) -> None:
        self.uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)

    def _scan(self, page: int, paddr: int) -> None:
        self._unscan(page)
        code = self.memory.guest_read(paddr, 0x1000, private=True)
        try:
            code += self.fetch(page + 0x1000, MAX_INSN - 1)
        except _FaultDuringAccess:
            pass  # nothing mapped after this page: no instruction spans into it
        record = _CodePage(paddr)
        for offset in sorted(candidate_offsets(code, 0x1000)):
            addr = page + offset
            self._site_cache.pop(addr, None)
            record.hooks.append(self.uc.hook_add(UC_HOOK_CODE, self._on_site, begin=addr, end=addr))
        self._code_pages[page] = record
        self._code_paddrs.setdefault(paddr, set()).add(page)

    def _unscan(self, page: int) -> None:
        record = self._code_pages.pop(page, None)
        if record is not None:
            for handle in record.hooks:
                self.uc.hook_del(handle)
            for addr in range(page, page + 0x1000):
                self._site_cache.pop(addr, None)
            pages = self._code_paddrs.get(record.paddr, set())
            pages.discard(page)
            if not pages:
                self._code_paddrs.pop(record.paddr, None)

    def _page_changed(self, paddr: int) -> None:
        """Guest memory changed behind Unicorn's back: drop translations and code."""
        for page, record in list(self._code_pages.items()):
            if record.paddr == paddr:
                self._unscan(page)
        self._tb_flush_pending = True

    def _on_site(self, uc: Uc, address: int, size: int, _: Any) -> None:
        if self._skip_site == address:
            self._skip_site = None
            return
        if address not in self._site_cache:
            try:
                code = self.fetch(address, MAX_INSN)
            except _FaultDuringAccess:
                try:
                    code = self.fetch(address, 0x1000 - (address & 0xFFF))
                except _FaultDuringAccess:
                    code = b""  # let Unicorn fetch it and fault precisely
            self._site_cache[address] = classify(code, self.bits()) if code else None
        site = self._site_cache[address]
        if site is None:
            return
        fault = self._privilege_fault(site)
        if fault is not None:  # checked by the hardware before the intercept
            self._stop = fault
            uc.emu_stop()
            return
        native_msr = site.action is Action.HARDWARE_MSR and self._msr_is_native(site)
        if native_msr and not self._is_efer_write(site):  # EFER: checked, maybe trapped
            return
        if site.action is Action.NAE and not self.intercepted(site.exit_code):
            return
        untrapped_cr = site.action is Action.CR_WRITE and not self.intercepted(site.exit_code)
        if untrapped_cr and site.exit_code != SvmExit.CR8_WRITE_TRAP:  # CR8: the model's
            return
        self._stop = _AtSite(site, address)
        uc.emu_stop()

    def _privilege_fault(self, site: Sensitive) -> _Exception | None:
        """The #GP/#UD an instruction takes at this CPL before it can be intercepted.

        APM vol. 2, 15.9: instruction intercepts are checked after the simple
        exceptions, CPL checks among them; IN/OUT check IOPL (a TSS without an I/O
        bitmap, as sevsim's guests have, allows nothing beyond it).
        """
        cpl = self.cpl
        if cpl == 0:
            return None
        code = site.exit_code
        if code == SvmExit.IOIO:
            iopl = (self.uc.reg_read(x86.UC_X86_REG_RFLAGS) >> 12) & 3
            return _Exception(GP_VECTOR, 0) if cpl > iopl else None
        if code in (SvmExit.MONITOR, SvmExit.MWAIT):
            return _Exception(UD_VECTOR)
        if code == SvmExit.RDPMC:
            pce = self.uc.reg_read(x86.UC_X86_REG_CR4) & (1 << 8)
            return None if pce else _Exception(GP_VECTOR, 0)
        if code in _CPL0_ONLY or site.action in _CPL0_ACTIONS:
            return _Exception(GP_VECTOR, 0)
        return None

    def _is_efer_write(self, site: Sensitive) -> bool:
        """A WRMSR to EFER: Unicorn drops bits it does not know instead of faulting, so
        the model checks the write; a passthrough one still ends in the EFER write
        trap, if armed."""
        return site.mnemonic == "wrmsr" and self.uc.reg_read(x86.UC_X86_REG_ECX) == M.MSR_EFER

    def _msr_is_native(self, site: Sensitive) -> bool:
        ecx = self.uc.reg_read(x86.UC_X86_REG_ECX)
        if ecx in (M.MSR_AMD64_SEV_ES_GHCB, M.MSR_AMD64_SEV):
            return False
        return not self.msr_intercepted(ecx, site.mnemonic == "wrmsr")

    def _on_unmapped(self, uc: Uc, access: int, address: int, *_: Any) -> bool:
        """An access reached the poison page: the fault is precise now."""
        fault, self._fault = self._fault, None
        if fault is None or address & PAGE_MASK != _POISON:
            self._stop = _Exception(GP_VECTOR, 0)  # nothing of ours: treat as a bad access
            return False
        exact = fault.vaddr | (address & 0xFFF)
        if fault.gpa is None and fault.error_code is None:  # non-canonical address
            self._stop = _Exception(GP_VECTOR, 0)
        elif fault.gpa is None:
            self._stop = _Exception(PF_VECTOR, fault.error_code, exact)
        else:
            self._stop = _Npf(fault.gpa | (address & 0xFFF), access == UC_MEM_WRITE_UNMAPPED,
                              access == UC_MEM_FETCH_UNMAPPED)  # fmt: skip
        self._flush_after_stop = True
        return False

    def _on_interrupt(self, uc: Uc, intno: int, _: Any) -> None:
        if self._stop is None:
            self._stop = _Exception(intno, software=self._is_int_n(intno))
        uc.emu_stop()

    def _is_int_n(self, intno: int) -> bool:
        """Whether the instruction just before RIP is ``INT intno`` (a software interrupt,
        which pushes no error code; RIP is already past it)."""
        try:
            return self.fetch(self.rip - 2, 2) == bytes([0xCD, intno])
        except _FaultDuringAccess:
            return False

    def _on_invalid(self, uc: Uc, _: Any) -> bool:
        if self._stop is None:
            self._stop = _Exception(UD_VECTOR)
        return False

    # -- running --------------------------------------------------------------------

    def run(self) -> HwExit:
        """Run the guest until something the hypervisor must see (a #VMEXIT)."""
        self._flush_after_stop = False
        if self._vc_run is not None:
            hw_exit = self._continue_vc()
            if hw_exit is not None:
                return hw_exit
        while True:
            if self._tb_flush_pending:
                self._tb_flush_pending = False
                self.uc.ctl_flush_tb()
                self.flush_tlb()
            self._stop = None
            start = self.rip
            if self.deadline is not None and time.monotonic() >= self.deadline:
                return HwExit(SvmExit.INTR, why="the host's time slice ended")
            try:
                self._emulate(start)
            except UcError as err:
                stop = self._stop or self._stop_for_error(err)
            else:
                stop = self._stop or self._natural_stop(start)
            if self._flush_after_stop:  # the poison translation must not stay in the TLB
                self._flush_after_stop = False
                self.flush_tlb()
            hw_exit = self._handle(stop)
            if hw_exit is not None:
                return self._with_debug(hw_exit, stop)

    # -- #VC -------------------------------------------------------------------------------

    def raise_vc(self, exit_code: int, info1: int = 0, info2: int = 0) -> HwExit | None:
        """An NAE event: #VC with the exit code as error code, to the guest's handler.

        The hardware also records the exit in the VMSA (``guest_exit_code`` and
        ``guest_exit_info_1/2``), where only the guest's state holds it.
        """
        self._vcs.append((self.rip, exit_code))
        self.guest_exit = (exit_code, info1, info2)
        if self.vc_model is None:
            return self.deliver_exception(VC_VECTOR, exit_code)
        self._vc_run = self.vc_model(GuestView(self), exit_code)
        return self._continue_vc()

    def _continue_vc(self) -> HwExit | None:
        """Run the modeled handler to its next VMGEXIT (an exit) or to its end."""
        assert self._vc_run is not None
        try:
            next(self._vc_run)
        except StopIteration as done:
            self._vc_run = None
            if done.value is not None:  # the handler forwards an exception (#GP, #UD)
                forwarded = self.deliver_exception(done.value)
                if forwarded is not None:
                    return forwarded
            event, self._deferred_event = self._deferred_event, None
            return None if event is None else self.deliver_exception(*event)
        except FOREIGN_FAULTS as exc:  # guest software crashed: the vCPU is lost
            self._vc_run = None
            return HwExit(SvmExit.SHUTDOWN, why=f"modeled #VC handler failed: {exc!r}")
        return HwExit(SvmExit.VMGEXIT, why="VMGEXIT from the modeled #VC handler",
                      rip=self.rip, vcs=self._take_vcs())  # fmt: skip

    def _take_vcs(self) -> tuple[tuple[int, int], ...]:
        vcs, self._vcs = tuple(self._vcs), []
        return vcs

    def _with_debug(self, hw_exit: HwExit, stop: Stop) -> HwExit:
        """Attach the guest instruction behind the exit, for the trace."""
        if isinstance(stop, _AtSite):
            rip, length = stop.rip, stop.site.length
        elif isinstance(stop, _Halted):
            rip, length = self.rip - 1, 1
        else:
            rip, length = self.rip, MAX_INSN
        try:
            insn = self.fetch(rip, length)
        except _FaultDuringAccess:
            insn = b""
        return evolve(hw_exit, rip=rip, insn=insn, bits=self.bits(), vcs=self._take_vcs())

    def _stop_for_error(self, err: UcError) -> Stop:
        if err.errno == UC_ERR_INSN_INVALID:
            return _Exception(UD_VECTOR)
        if err.errno in (UC_ERR_READ_UNMAPPED, UC_ERR_WRITE_UNMAPPED, UC_ERR_FETCH_UNMAPPED):
            return _Exception(GP_VECTOR, 0)
        if err.errno == UC_ERR_EXCEPTION:
            return _Exception(GP_VECTOR, 0)
        return _Exception(UD_VECTOR)

    def _natural_stop(self, start: int) -> Stop:
        """Unicorn returned by itself: the guest halted, or its time slice ran out."""
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return _Interrupted()
        return _Halted()

    def _handle(self, stop: Stop) -> HwExit | None:
        match stop:
            case _Halted():
                return HwExit(SvmExit.HLT)
            case _Interrupted():
                return HwExit(SvmExit.INTR, why="the host's time slice ended")
            case _Exception(vector, error_code, cr2, software):
                return self.deliver_exception(vector, error_code, cr2, software=software)
            case _Npf(gpa, write, fetch):
                # exit_info_1: a #PF-style error code (present, reserved: the MMIO SPTE;
                # write, instruction fetch)
                code = 0x9 | (0x2 if write else 0) | (0x10 if fetch else 0)
                return self.raise_vc(SvmExit.NPF, code, gpa)
            case _AtSite(site, rip):
                return self._handle_site(site, rip)
        raise AssertionError(f"unknown stop {stop!r}")

    def _handle_site(self, site: Sensitive, linear: int) -> HwExit | None:
        # Hooks see linear addresses; RIP is the offset into CS (they differ in real mode).
        if site.action is Action.AUTOMATIC_EXIT:  # VMGEXIT: trap-like, RIP moves on
            self.rip += site.length
            return HwExit(site.exit_code)
        if site.action is Action.HARDWARE_MSR:
            ecx = self.uc.reg_read(x86.UC_X86_REG_ECX)
            if ecx in (M.MSR_AMD64_SEV_ES_GHCB, M.MSR_AMD64_SEV):
                self._hardware_msr(site, ecx)
                self.rip += site.length
                return None
            if self._is_efer_write(site) and self._msr_is_native(site):
                efer = (self.reg("rdx") & 0xFFFF_FFFF) << 32 | self.reg("rax") & 0xFFFF_FFFF
                if not _valid_efer_write(efer, self.paging_mode()):
                    return self.deliver_exception(GP_VECTOR, 0)
                armed = self.intercepted(SvmExit.EFER_WRITE_TRAP)
                return self._write_trap(linear, SvmExit.EFER_WRITE_TRAP if armed else None,
                                        lambda: self.uc.msr_read(M.MSR_EFER))  # fmt: skip
        if site.action is Action.CR8_READ:
            self.set_reg(_GPR_NAME[site.operand], self.tpr)
            self.rip += site.length
            return None
        if site.action is Action.CR_WRITE:
            cr = site.exit_code - SvmExit.CR0_WRITE_TRAP
            value = self.reg(_GPR_NAME[site.operand])
            if not _valid_cr_write(cr, value, self.paging_mode()):
                return self.deliver_exception(GP_VECTOR, 0)
            if cr == 8:  # retires in the CPU model: trap-like, RIP moves on
                self.tpr = value
                self.rip += site.length
                intercepted = self.intercepted(site.exit_code)
                return HwExit(site.exit_code, info1=value) if intercepted else None
            return self._write_trap(linear, site.exit_code,
                                    lambda: self.uc.reg_read(_CR_IDS[cr]))  # fmt: skip
        return self.raise_vc(site.exit_code)

    def _hardware_msr(self, site: Sensitive, ecx: int) -> None:
        if site.mnemonic == "rdmsr":
            value = self.ghcb_msr if ecx == M.MSR_AMD64_SEV_ES_GHCB else self.sev_status
            self.set_reg("rax", value & 0xFFFF_FFFF)
            self.set_reg("rdx", value >> 32)
        elif ecx == M.MSR_AMD64_SEV_ES_GHCB:
            self.ghcb_msr = (self.reg("rdx") & 0xFFFF_FFFF) << 32 | (self.reg("rax") & 0xFFFF_FFFF)
        # WRMSR to SEV_STATUS is ignored: the register is read-only.

    def _write_trap(
        self, linear: int, exit_code: int | None, new_value: Callable[[], int]
    ) -> HwExit | None:
        """The write retires natively (a single step), then the trap exit, if armed
        (``exit_code``), reports the new value in exit_info_1. A fault in that step is
        delivered instead."""
        self._skip_site = linear
        self._stop = None
        try:
            self._emulate(self.rip, count=1)
        except UcError as err:
            return self._handle(self._stop or self._stop_for_error(err))
        if self._stop is not None:
            return self._handle(self._stop)
        return None if exit_code is None else HwExit(exit_code, info1=new_value())

    # -- exception delivery -----------------------------------------------------------

    def deliver_exception(
        self,
        vector: int,
        error_code: int | None = None,
        cr2: int | None = None,
        *,
        software: bool = False,
    ) -> HwExit | None:
        """Deliver an exception through the IDT; a failed delivery escalates.

        A fault while delivering becomes #DF; a fault while delivering #DF is a triple
        fault, which the hardware reports as a SHUTDOWN exit. ``software`` (INT n)
        pushes no error code even for vectors whose exceptions do.
        """
        current = _Exception(vector, error_code, cr2, software)
        while True:
            if current.cr2 is not None:
                self.uc.reg_write(x86.UC_X86_REG_CR2, current.cr2)
            code = current.error_code
            if code is None and current.vector in _ERROR_CODE_VECTORS and not current.software:
                code = 0
            fault = self._push_frame(current.vector, code, current.software)
            if fault is None:
                return None
            if current.vector == DF_VECTOR:
                return HwExit(SvmExit.SHUTDOWN, why=f"triple fault delivering #{vector}")
            if _is_double_fault(current.vector, fault.vector):
                current = _Exception(DF_VECTOR, 0)
            else:
                current = fault

    def inject(self, event_inj: int, error_code: int) -> HwExit | None:
        """Deliver an EVENTINJ event on VMRUN (exceptions, NMIs, interrupts).

        It arrives where the guest resumes. A modeled #VC handler in the middle of
        its exchange cannot be interrupted in Python: the event waits until it ends.
        """
        if not event_inj & EventInj.VALID:
            return None
        vector = event_inj & EventInj.VECTOR_MASK
        if (event_inj >> EventInj.TYPE_SHIFT) & 7 == EventInj.TYPE_NMI:
            vector = NMI_VECTOR  # the vector field is ignored for an NMI
        code = error_code if event_inj & EventInj.EV else None
        if self._vc_run is not None:
            self._deferred_event = (vector, code)
            return None
        return self.deliver_exception(vector, code)

    def _push_frame(
        self, vector: int, error_code: int | None, software: bool = False
    ) -> _Exception | None:
        """Push an interrupt frame and enter the handler; the fault if that fails.

        Long mode uses 16-byte gates and 8-byte pushes (IST and the TSS stack for a
        privilege change honoured); protected mode 8-byte gates and 4-byte pushes;
        real mode the IVT and 2-byte pushes, without an error code.
        """
        uc = self.uc
        mode = self.paging_mode()
        long_mode, protected = bool(mode.efer & M.EFER_LMA), bool(mode.cr0 & M.CR0_PE)
        word = 8 if long_mode else 4 if protected else 2
        gate_size = 16 if long_mode else 8 if protected else 4
        _, idt_base, idt_limit, _ = uc.reg_read(x86.UC_X86_REG_IDTR)
        idt_error = vector * 8 + 2
        if vector * gate_size + gate_size - 1 > idt_limit:
            return _Exception(GP_VECTOR, idt_error)
        try:
            raw = self.virt_read(idt_base + vector * gate_size, gate_size)
            if protected:
                gate = _gate(raw)
                if gate is None:
                    return _Exception(GP_VECTOR, idt_error)
                selector, target, gate_type, ist = gate
                if software and (int.from_bytes(raw[:8], "little") >> 45) & 3 < self.cpl:
                    self.rip -= 2  # a fault, at the INT n (CD ib) itself
                    return _Exception(GP_VECTOR, idt_error)
            else:
                target, selector = struct.unpack("<HH", raw)
                gate_type, ist, error_code = 0xE, 0, None
            sp = uc.reg_read(x86.UC_X86_REG_RSP)
            ss = uc.reg_read(x86.UC_X86_REG_SS)
            if long_mode and (ist or self.cpl != 0):
                _, tss_base, _, _ = uc.reg_read(x86.UC_X86_REG_TR)
                slot = 0x24 + 8 * (ist - 1) if ist else 4
                sp = struct.unpack("<Q", self.virt_read(tss_base + slot, 8))[0]
            if long_mode:
                sp &= ~0xF
            stack_base = 0 if long_mode else self._segment_base(ss, protected)
            rflags = uc.reg_read(x86.UC_X86_REG_RFLAGS)
            frame = [rflags, uc.reg_read(x86.UC_X86_REG_CS), self.rip]
            if long_mode:
                frame = [ss, uc.reg_read(x86.UC_X86_REG_RSP), *frame]
            if error_code is not None:
                frame.append(error_code)
            mask = (1 << (8 * word)) - 1
            sp = (sp - word * len(frame)) & (mask if word < 8 else (1 << 64) - 1)
            fmt = {8: "Q", 4: "I", 2: "H"}[word]
            data = struct.pack(f"<{len(frame)}{fmt}", *(v & mask for v in reversed(frame)))
            self.virt_write(stack_base + sp, data)
        except _FaultDuringAccess as fault:
            return fault.stop if isinstance(fault.stop, _Exception) else _Exception(GP_VECTOR, 0)
        if long_mode and self.cpl != 0:
            uc.reg_write(x86.UC_X86_REG_SS, 0)
        uc.reg_write(x86.UC_X86_REG_RSP, sp)
        clear = (1 << 8) | (1 << 14) | (1 << 16) | (1 << 17)  # TF NT RF VM
        if gate_type in (0xE, 0x6):
            clear |= 1 << 9  # interrupt gates clear IF
        uc.reg_write(x86.UC_X86_REG_RFLAGS, rflags & ~clear)
        try:
            uc.reg_write(x86.UC_X86_REG_CS, selector)
            self._guest_ran()  # a new code segment: the code size may differ
        except UcError:
            return _Exception(GP_VECTOR, selector & ~3)
        self.rip = target
        return None

    def _segment_base(self, selector: int, protected: bool) -> int:
        """Base of a data segment: from the GDT in protected mode, selector*16 in real mode."""
        if not protected:
            return selector << 4
        _, base, limit, _ = self.uc.reg_read(x86.UC_X86_REG_GDTR)
        if selector & ~7 == 0 or (selector | 7) > limit:
            return 0
        raw = struct.unpack("<Q", self.virt_read(base + (selector & ~7), 8))[0]
        return ((raw >> 16) & 0xFF_FFFF) | ((raw >> 56) & 0xFF) << 24

    def close(self) -> None:
        self.memory.on_page_changed.remove(self._page_changed)


def _gate(raw: bytes) -> tuple[int, int, int, int] | None:
    """(selector, target, type, IST) of a present interrupt or trap gate, else None.

    16 bytes: a long-mode gate (types 0xE/0xF); 8 bytes: a 32-bit gate (0xE/0xF)
    or a 16-bit one (0x6/0x7).
    """
    low = int.from_bytes(raw[:8], "little")
    gate_type = (low >> 40) & 0xF
    if not (low >> 47) & 1 or gate_type not in (0x6, 0x7, 0xE, 0xF):
        return None
    target = (low & 0xFFFF) | ((low >> 48) & 0xFFFF) << 16
    if len(raw) == 16:
        target |= int.from_bytes(raw[8:12], "little") << 32
    return (low >> 16) & 0xFFFF, target, gate_type, (low >> 32) & 7


#: Bits a MOV to CR4 may set on this CPU model (AMD: VME..OSXMMEXCPT, UMIP, FSGSBASE,
#: PCIDE, OSXSAVE, SMEP, SMAP, PKE, CET); the rest are reserved: #GP.
_CR4_VALID = 0x7FF | (1 << 11) | (1 << 16) | (1 << 17) | (1 << 18) | (1 << 20) | (1 << 21) | (
    1 << 22) | (1 << 23)  # fmt: skip


def _valid_cr_write(cr: int, value: int, mode: PagingMode) -> bool:
    """The architectural checks of MOV to CR0/CR4/CR8 (APM vol. 2, 3.1)."""
    if cr == 0:
        pg_without_pe = value & M.CR0_PG and not value & M.CR0_PE
        cd_clear_nw_set = value & (1 << 29) and not value & (1 << 30)
        long_without_pae = value & M.CR0_PG and mode.efer & M.EFER_LME and not mode.cr4 & M.CR4_PAE
        return not (value >> 32 or pg_without_pe or cd_clear_nw_set or long_without_pae)
    if cr == 4:
        leaving_pae = mode.efer & M.EFER_LMA and not value & M.CR4_PAE
        return not (value & ~_CR4_VALID or leaving_pae)
    if cr == 8:
        return not value >> 4
    return True


#: EFER bits this CPU model implements (SCE, LME, LMA, NXE, SVME, LMSLE, FFXSR, TCE,
#: MCOMMIT, INTWB, UAIEN, AIBRSE); setting any other is #GP.
_EFER_VALID = (
    M.EFER_SCE | M.EFER_LME | M.EFER_LMA | M.EFER_NX | M.EFER_SVME | 1 << 13 | M.EFER_FFXSR
    | 1 << 15 | 1 << 17 | 1 << 18 | 1 << 20 | M.EFER_AUTOIBRS
)  # fmt: skip


def _valid_efer_write(value: int, mode: PagingMode) -> bool:
    """The architectural checks of WRMSR to EFER (APM vol. 2, 3.1.7 and 14.6.1):
    reserved bits, and LME may not change while paging is on. A write of LMA is
    ignored by the processor, not refused."""
    lme_changes = mode.paging and (value ^ mode.efer) & M.EFER_LME
    return not (value & ~_EFER_VALID or lme_changes)


def _descriptor(seg: Segment) -> bytes:
    """An 8-byte GDT descriptor with a segment's base, limit and VMCB attributes."""
    granular = bool(seg.attrib & 0x800)
    limit = seg.limit >> 12 if granular else seg.limit
    low = (limit & 0xFFFF) | (seg.base & 0xFF_FFFF) << 16 | (seg.attrib & 0xFF) << 40
    low |= ((limit >> 16) & 0xF) << 48 | ((seg.attrib >> 8) & 0xF) << 52
    low |= ((seg.base >> 24) & 0xFF) << 56
    return struct.pack("<Q", low)


def _qemu_flags(attrib: int) -> int:
    """VMCB packed attributes (type..P in 7:0, AVL..G in 11:8) to QEMU's descriptor flags."""
    return (attrib & 0xFF) << 8 | ((attrib >> 8) & 0xF) << 20


def _is_double_fault(first: int, second: int) -> bool:
    """APM 8.2.9: contributory after contributory, or #PF/contributory after #PF."""
    if first == PF_VECTOR:
        return second == PF_VECTOR or second in _CONTRIBUTORY
    return first in _CONTRIBUTORY and second in _CONTRIBUTORY


class _Watchdog(threading.Thread):
    """The host's timer for one vCPU: stops the engine when the deadline passes.

    One thread for the vCPU's lifetime, armed at each entry; Unicorn's own timeout
    would start a thread for every emu_start, which costs more than a whole exit.
    """

    def __init__(self, cpu: GuestCpu) -> None:
        super().__init__(name=f"sevsim-vcpu{cpu.vcpu_id}-timer", daemon=True)
        self._cpu = cpu
        self._deadline: float | None = None
        self._wake = threading.Condition()
        self.start()

    def arm(self, deadline: float | None) -> None:
        """Set (or, with None, clear) the deadline."""
        with self._wake:
            if self._deadline != deadline:
                self._deadline = deadline
                self._wake.notify()

    def run(self) -> None:
        while True:
            with self._wake:
                while self._deadline is None:
                    self._wake.wait()
                remaining = self._deadline - time.monotonic()
                if remaining > 0:
                    self._wake.wait(remaining)
                    continue
                fired, self._deadline = self._deadline, None
            # A stop can race with the engine's start: repeat it while the guest runs
            # past this deadline (a later run has a deadline of its own).
            while self._cpu._time_is_up(fired):
                time.sleep(0.01)


class GuestView:
    """The vCPU as guest software sees it, for guest code the model runs in Python.

    The modeled #VC handler (``sevsim.guest``) is guest-side code: it may read and
    write the guest's registers and memory (through the guest's own page tables, so
    the C-bit decides private or shared), and reaches the hypervisor only through
    the GHCB MSR and VMGEXIT — which it performs by ``yield``-ing from its generator.
    """

    def __init__(self, cpu: GuestCpu) -> None:
        self._cpu = cpu

    def reg(self, name: str) -> int:
        if name == "rip":
            return self._cpu.rip
        if name == "rflags":
            return self._cpu.uc.reg_read(x86.UC_X86_REG_RFLAGS)
        return self._cpu.reg(name)

    def set_reg(self, name: str, value: int) -> None:
        if name == "rip":
            self._cpu.rip = value
        else:
            self._cpu.set_reg(name, value & 0xFFFF_FFFF_FFFF_FFFF)

    @property
    def bits(self) -> int:
        """Operand size of the code segment: 16, 32 or 64."""
        return self._cpu.bits()

    @property
    def cpl(self) -> int:
        return self._cpu.cpl

    def segment_base(self, name: str) -> int:
        """FS/GS bases (other segments are flat in long mode)."""
        reg = {"fs": x86.UC_X86_REG_FS_BASE, "gs": x86.UC_X86_REG_GS_BASE}.get(name)
        return 0 if reg is None else self._cpu.uc.reg_read(reg)

    def read(self, vaddr: int, size: int) -> bytes:
        """Guest-virtual read; raises GuestFault if the guest's tables do not map it."""
        try:
            return self._cpu.virt_read(vaddr, size)
        except _FaultDuringAccess as fault:
            raise GuestFault(vaddr) from fault

    def write(self, vaddr: int, data: bytes) -> None:
        try:
            self._cpu.virt_write(vaddr, data)
        except _FaultDuringAccess as fault:
            raise GuestFault(vaddr) from fault

    def translate(self, vaddr: int) -> tuple[int, bool]:
        """(guest-physical address, private) of ``vaddr`` — Linux's slow_virt_to_phys."""
        try:
            t = self._cpu.translate(vaddr, ACCESS_READ)
        except _FaultDuringAccess as fault:
            raise GuestFault(vaddr) from fault
        if isinstance(t, PageFault | NonCanonical):
            raise GuestFault(vaddr)
        return t.paddr | (vaddr & 0xFFF), t.private

    @property
    def ghcb_msr(self) -> int:
        return self._cpu.ghcb_msr

    @ghcb_msr.setter
    def ghcb_msr(self, value: int) -> None:
        self._cpu.ghcb_msr = value & 0xFFFF_FFFF_FFFF_FFFF


class GuestFault(Exception):
    """Guest software touched an address its own page tables do not map."""

    def __init__(self, vaddr: int) -> None:
        super().__init__(f"guest address {vaddr:#x} is not mapped")
        self.vaddr = vaddr


#: The modeled #VC handler: called with the guest's view and the #VC error code; a
#: generator that yields once per VMGEXIT and returns an exception vector to raise
#: in the guest, or None to resume it.
VcModel = Callable[[GuestView, int], Generator[None, None, int | None]]


class _FaultDuringAccess(Exception):
    """A model-side guest-virtual access faulted; carries the stop it becomes."""

    def __init__(self, stop: _Exception | _Npf) -> None:
        super().__init__(repr(stop))
        self.stop = stop
