"""One vCPU's register state: fast access for the exit path, and VMSA load/save.

The Python binding's ``reg_read`` costs several times a direct call into the C
library (its type dispatch runs on every access), and the exit path reads and writes
a dozen registers per exit. Reading most of them does not need the engine at all:
``uc_reg_read`` of a GPR, RIP, a segment selector or a descriptor-table register only
copies a field of the CPU's live ``CPUX86State``, so those are read from that memory
directly (the fields are found by probing, :func:`_probe_live`, and a build with
another layout is refused). GPR writes are stores into the same fields, as
``uc_reg_write`` does; RIP and RFLAGS are written through ``uc_reg_write`` (a RIP
write also ends the current translation block, and RFLAGS is split in QEMU's lazy
condition codes), as are control and debug registers, with one reusable buffer; the
rare ones (MSRs, x87/SSE state) go through the binding.

:meth:`Registers.load_state` and :meth:`Registers.save_state` are what VMRUN and
#VMEXIT do with a VMSA: every architectural field the VMSA holds, the FPU/SSE save
area included, goes into the CPU on entry and back into the VMSA on exit.
"""

from __future__ import annotations

import ctypes
import struct
from typing import Any

from attrs import frozen
from unicorn import UC_ARCH_X86, UC_MODE_32, Uc
from unicorn import x86_const as x86
from unicorn.unicorn_py3.unicorn import uclib

from sevsim.arch import msr as M
from sevsim.arch.vmsa import Segment

GPR_IDS = {
    "rax": x86.UC_X86_REG_RAX, "rbx": x86.UC_X86_REG_RBX, "rcx": x86.UC_X86_REG_RCX,
    "rdx": x86.UC_X86_REG_RDX, "rsp": x86.UC_X86_REG_RSP, "rbp": x86.UC_X86_REG_RBP,
    "rsi": x86.UC_X86_REG_RSI, "rdi": x86.UC_X86_REG_RDI, "r8": x86.UC_X86_REG_R8,
    "r9": x86.UC_X86_REG_R9, "r10": x86.UC_X86_REG_R10, "r11": x86.UC_X86_REG_R11,
    "r12": x86.UC_X86_REG_R12, "r13": x86.UC_X86_REG_R13, "r14": x86.UC_X86_REG_R14,
    "r15": x86.UC_X86_REG_R15,
}  # fmt: skip
SEG_IDS = {
    "es": x86.UC_X86_REG_ES, "cs": x86.UC_X86_REG_CS, "ss": x86.UC_X86_REG_SS,
    "ds": x86.UC_X86_REG_DS, "fs": x86.UC_X86_REG_FS, "gs": x86.UC_X86_REG_GS,
}  # fmt: skip
CR_IDS = {0: x86.UC_X86_REG_CR0, 2: x86.UC_X86_REG_CR2, 3: x86.UC_X86_REG_CR3,
          4: x86.UC_X86_REG_CR4}  # fmt: skip
#: Capstone's register names (64/32/16/8-bit forms of the GPRs) -> the 64-bit register.
GPR_OF = {
    **{n: n for n in GPR_IDS},
    **{"e" + n[1:]: n for n in ("rax", "rbx", "rcx", "rdx", "rsp", "rbp", "rsi", "rdi")},
    **{f"r{i}d": f"r{i}" for i in range(8, 16)},
}
#: VMSA fields held in MSRs of the CPU.
MSR_FIELDS = {
    "star": M.MSR_STAR, "lstar": M.MSR_LSTAR, "cstar": M.MSR_CSTAR, "sfmask": M.MSR_SFMASK,
    "kernel_gs_base": M.MSR_KERNEL_GS_BASE, "g_pat": M.MSR_IA32_CR_PAT,
    "sysenter_cs": M.MSR_IA32_SYSENTER_CS, "sysenter_esp": M.MSR_IA32_SYSENTER_ESP,
    "sysenter_eip": M.MSR_IA32_SYSENTER_EIP, "tsc_aux": M.MSR_TSC_AUX,
}  # fmt: skip
_RIP, _RFLAGS = x86.UC_X86_REG_RIP, x86.UC_X86_REG_RFLAGS
_RSP, _CS, _SS = x86.UC_X86_REG_RSP, x86.UC_X86_REG_CS, x86.UC_X86_REG_SS
_TR, _GDTR, _IDTR = x86.UC_X86_REG_TR, x86.UC_X86_REG_GDTR, x86.UC_X86_REG_IDTR
_RFLAGS_IF = 1 << 9
#: Descriptor-table registers, with the limit bits ``uc_reg_read`` reports.
_TABLE_IDS = {x86.UC_X86_REG_GDTR: 0xFFFF, x86.UC_X86_REG_IDTR: 0xFFFF,
              x86.UC_X86_REG_TR: 0xFFFF_FFFF, x86.UC_X86_REG_LDTR: 0xFFFF_FFFF}  # fmt: skip


class Registers:
    """Register access for one Unicorn engine."""

    __slots__ = ("_buf", "_cells", "_context", "_eflags", "_gprs", "_handle", "_hflags", "_mmr",
                 "_mmr_ref", "_read", "_ref", "_selectors", "_state", "_system_tables", "_tables",
                 "_view", "_write", "uc")  # fmt: skip

    def __init__(self, uc: Uc, env: int) -> None:
        self.uc = uc
        #: The CPU's live ``hflags``: ``env`` is the CPUX86State a saved context copies
        #: after its header, found by a marker in RAX (the state's first field).
        uc.reg_write(x86.UC_X86_REG_RAX, _MARK)
        saved = uc.context_save()
        uc.reg_write(x86.UC_X86_REG_RAX, 0)
        at = ctypes.cast(saved.context, ctypes.c_void_p).value
        assert at is not None
        header = ctypes.string_at(at, _layout().hflags).find(_MARK.to_bytes(8, "little"))
        #: Where the live state would start if it had a saved context's header, so
        #: that :class:`_ContextLayout` offsets apply to it.
        self._state = env - header
        self._hflags = ctypes.c_uint32.from_address(self._state + _layout().hflags)
        if header < 0 or ctypes.c_uint32.from_address(
                at + _layout().hflags).value != self._hflags.value:  # fmt: skip
            raise RuntimeError("the live CPU state of this Unicorn build does not match its "
                               "saved context; sevsim needs unicorn 2.1.x (see pyproject.toml)")
        self._handle = uc._uch
        self._read = uclib.uc_reg_read
        self._write = uclib.uc_reg_write
        self._buf = ctypes.c_uint64()
        self._ref = ctypes.byref(self._buf)
        self._mmr = _Mmr()
        self._mmr_ref = ctypes.byref(self._mmr)
        self._context: Any = None
        # The fields uc_reg_read would copy, read in place (see the module doc).
        live = _live(uc, env)
        self._gprs = {reg: ctypes.c_uint64.from_address(env + live.regs[reg])
                      for reg in GPR_IDS.values()}  # fmt: skip
        #: GPRs and RIP: register id -> its 64-bit field.
        self._cells = {**self._gprs, _RIP: ctypes.c_uint64.from_address(env + live.regs[_RIP])}
        #: QEMU's ``eflags`` field: IF and IOPL are always current there (the arithmetic
        #: flags are not while the CPU runs: they are computed lazily).
        self._eflags = ctypes.c_uint64.from_address(env + live.eflags)
        #: Selectors (16 bits through the API) of the six segment registers.
        self._selectors = {reg: ctypes.c_uint32.from_address(self._state + _layout().segment(name))
                           for name, reg in SEG_IDS.items()}  # fmt: skip
        #: GDTR, IDTR, TR, LDTR: register id -> (offset of QEMU's SegmentCache, limit mask).
        self._tables = live.tables
        self._view = memoryview((ctypes.c_char * live.size).from_address(env)).cast("B")
        offsets = [live.tables[reg][0] for reg in (_TR, _GDTR, _IDTR)]
        #: The bytes of CPUX86State holding TR, GDTR and IDTR (adjacent in QEMU).
        self._system_tables = slice(min(offsets), max(offsets) + _SEGMENT_CACHE.size)

    def read(self, reg_id: int) -> int:
        cell = self._cells.get(reg_id)
        if cell is not None:
            return cell.value
        selector = self._selectors.get(reg_id)
        if selector is not None:
            return selector.value & 0xFFFF
        buf = self._buf
        buf.value = 0
        self._read(self._handle, reg_id, self._ref)
        return buf.value

    def write(self, reg_id: int, value: int) -> bool:
        """Write a register; False when the CPU refuses it (a selector that cannot load)."""
        cell = self._gprs.get(reg_id)
        if cell is not None:  # what uc_reg_write does for a GPR of a 64-bit engine
            cell.value = value & 0xFFFF_FFFF_FFFF_FFFF
            return True
        self._buf.value = value & 0xFFFF_FFFF_FFFF_FFFF
        return self._write(self._handle, reg_id, self._ref) == 0

    def interrupt_flag(self) -> bool:
        """RFLAGS.IF: one memory read (QEMU keeps IF in ``eflags`` at all times)."""
        return bool(self._eflags.value & _RFLAGS_IF)

    def iopl(self) -> int:
        """RFLAGS.IOPL (kept in ``eflags`` at all times, like IF)."""
        return (self._eflags.value >> 12) & 3

    def interrupt_frame(self, in_run: bool = False) -> tuple[int, int, int, int, int]:
        """(CS, RIP, RFLAGS, RSP, SS) in one call: what an interrupt frame saves.

        Between runs RFLAGS is read in place (:meth:`rflags_between_runs`); inside a
        hook (``in_run``) through ``uc_reg_read``, which folds in the arithmetic flags
        QEMU may still hold lazily there."""
        selectors = self._selectors
        rflags = self.read(_RFLAGS) if in_run else self._eflags.value
        return (selectors[_CS].value & 0xFFFF, self._cells[_RIP].value, rflags,
                self._gprs[_RSP].value, selectors[_SS].value & 0xFFFF)

    def enter(self, rsp: int, rflags: int, rip: int, in_run: bool = False) -> None:
        """Load RSP, RFLAGS and RIP as an interrupt entering its handler does: RFLAGS
        through ``uc_reg_write`` (see the module doc), RSP in place, RIP as
        :meth:`set_rip` writes it (``in_run``: from a hook, the engine going on at RIP)."""
        self._gprs[_RSP].value = rsp & 0xFFFF_FFFF_FFFF_FFFF
        self._buf.value = rflags & 0xFFFF_FFFF_FFFF_FFFF
        self._write(self._handle, _RFLAGS, self._ref)
        self.set_rip(rip, in_run)

    def set_rip(self, rip: int, in_run: bool = False) -> None:
        """Write RIP: in place while the engine is stopped, through ``uc_reg_write`` from
        a hook (``in_run``). What ``uc_reg_write`` adds to the store, a request to leave
        the translation block being run, matters only inside a run, where it makes the
        engine go on at RIP; between runs the next run starts at the address it is given
        (RIP) and clears the request."""
        if in_run:
            self.write(_RIP, rip)
        else:
            self._cells[_RIP].value = rip & 0xFFFF_FFFF_FFFF_FFFF

    def rflags_between_runs(self) -> int:
        """RFLAGS while the engine is stopped, read in place: leaving a run folds QEMU's
        lazily computed arithmetic flags and DF into ``eflags``, and a write through the
        API stores all of it there, so between runs the field is exactly what
        ``uc_reg_read`` computes. Inside a hook (a run in progress) use :attr:`rflags`."""
        return self._eflags.value

    def cpl(self) -> int:
        """The privilege level the CPU runs at (QEMU's ``hflags``: SS.DPL in protected
        mode, 0 in real mode): one memory read, no call into the engine."""
        return self._hflags.value & _HF_CPL

    def interrupt_shadow(self) -> bool:
        """Whether the CPU holds interrupts off for one instruction (after STI or a MOV
        to SS): QEMU's inhibit-IRQ bit, which the hardware reports in int_state."""
        return bool(self._hflags.value & _HF_INHIBIT_IRQ)

    def end_interrupt_shadow(self) -> None:
        self._hflags.value &= ~_HF_INHIBIT_IRQ

    def code_bits(self) -> int:
        """Operand size of the code segment the CPU executes: 16, 32 or 64, from the
        mode bits QEMU derived when CS was loaded (what its decoder uses)."""
        hflags = self._hflags.value
        return 64 if hflags & _HF_CS64 else 32 if hflags & _HF_CS32 else 16

    def stack_bits(self) -> int:
        """Stack address size outside 64-bit mode: 32 if SS's cached descriptor has
        B set, else 16. Real mode keeps the cache protected mode left behind."""
        return 32 if self._hflags.value & _HF_SS32 else 16

    def segment(self, name: str) -> Segment:
        """A segment register as the CPU holds it now, hidden part included (its
        base, limit and attributes need not follow from the selector: real mode
        keeps what protected mode or VMRUN loaded)."""
        raw = ctypes.string_at(self._state + _layout().segment(name), _SEGMENT_CACHE.size)
        selector, base, limit, flags = _SEGMENT_CACHE.unpack(raw)
        return Segment(selector, vmcb_attrib(flags), limit, base)

    def gpr(self, name: str) -> int:
        return self._gprs[GPR_IDS[name]].value

    def set_gpr(self, name: str, value: int) -> None:
        self._gprs[GPR_IDS[name]].value = value & 0xFFFF_FFFF_FFFF_FFFF

    @property
    def rip(self) -> int:
        return self._cells[_RIP].value

    @rip.setter
    def rip(self, value: int) -> None:
        self.write(_RIP, value)

    @property
    def rflags(self) -> int:
        return self.read(_RFLAGS)

    @rflags.setter
    def rflags(self, value: int) -> None:
        self.write(_RFLAGS, value)

    def table(self, reg_id: int) -> tuple[int, int, int, int]:
        """(selector, base, limit, flags) of GDTR, IDTR, TR or LDTR, read in place (every
        exception delivery reads IDTR and often TR and GDTR). GDTR and IDTR have no
        selector or flags (0); their limit is 16 bits, as ``uc_reg_read`` gives it."""
        at, limit_mask = self._tables[reg_id]
        selector, base, limit, flags = _SEGMENT_CACHE.unpack_from(self._view, at)
        if limit_mask == 0xFFFF:
            return 0, base, limit & 0xFFFF, 0
        return selector & 0xFFFF, base, limit, flags

    def system_tables(self) -> bytes:
        """TR, GDTR and IDTR as the CPU holds them, raw, in one value: equal exactly
        while none of them changed (what exception delivery keys its plans on)."""
        return self._view[self._system_tables].tobytes()

    def msr(self, index: int) -> int:
        return self.uc.msr_read(index)

    def set_msr(self, index: int, value: int) -> None:
        self.uc.msr_write(index, value)

    # -- VMRUN / #VMEXIT ---------------------------------------------------------------

    def load_state(self, state: dict[str, Any]) -> None:
        """Load VMSA fields into the CPU (VMRUN of a VMSA the CPU has not cached).

        VMRUN takes segment state (selector, base, limit, attributes) from the VMSA
        and never reads the guest's GDT: a GDT that is absent, or lies in MMIO, is
        met only when the guest next loads a selector. So the segment caches are
        written directly (:meth:`set_segments`), after the control registers that
        decide what they mean (long mode).
        """
        uc = self.uc
        for cr in (4, 3, 0, 2):
            self.write(CR_IDS[cr], state.get(f"cr{cr}", 0))
        cr0, efer = state.get("cr0", 0), state.get("efer", 0)
        lma = M.EFER_LMA if efer & M.EFER_LME and cr0 & M.CR0_PG else 0
        self.set_segments({name: state.get(name, Segment()) for name in SEG_IDS},
                          efer=efer & ~M.EFER_LMA | lma)  # fmt: skip
        for name, reg in (("gdtr", x86.UC_X86_REG_GDTR), ("idtr", x86.UC_X86_REG_IDTR)):
            seg: Segment = state.get(name, Segment())
            uc.reg_write(reg, (0, seg.base, seg.limit, 0))
        for name, reg in GPR_IDS.items():
            self.write(reg, state.get(name, 0))
        for name, index in MSR_FIELDS.items():
            if name in state:
                uc.msr_write(index, state[name])
        for name, reg in (("tr", x86.UC_X86_REG_TR), ("ldtr", x86.UC_X86_REG_LDTR)):
            seg = state.get(name, Segment())
            uc.reg_write(reg, (seg.selector, seg.base, seg.limit, qemu_flags(seg.attrib)))
        self.write(x86.UC_X86_REG_FS_BASE, state.get("fs", Segment()).base)
        self.write(x86.UC_X86_REG_GS_BASE, state.get("gs", Segment()).base)
        self.write(_RFLAGS, state.get("rflags", 2))
        self.write(_RIP, state.get("rip", 0))
        self.write(x86.UC_X86_REG_DR7, state.get("dr7", 0x400))
        self.write(x86.UC_X86_REG_DR6, state.get("dr6", 0xFFFF_0FF0))
        self._load_fpu(state)

    def set_segments(self, segments: dict[str, Segment], efer: int | None = None) -> None:
        """Load segment registers' hidden state (selector, base, limit, attributes)
        directly, as VMRUN and exception delivery do, without reading a descriptor
        table; the CPU's derived mode bits (CPL, code and stack size) follow.

        Unicorn's 64-bit engine sets only the selector when CS, SS, DS or ES is
        written, and loading through the guest's GDT could fault outside emulation;
        so the caches are written into a saved CPU context and restored
        (:class:`_ContextLayout`). ``efer``, if given, is written the same way: a
        WRMSR cannot set EFER.LMA, which VMRUN takes from the VMSA.
        """
        layout = _layout()
        uc = self.uc
        if self._context is None:
            self._context = uc.context_save()
        else:
            uc.context_update(self._context)
        base = ctypes.cast(self._context.context, ctypes.c_void_p).value
        assert base is not None
        for name, seg in segments.items():
            at = base + layout.segment(name)
            ctypes.memmove(at, struct.pack("<I4xQII", seg.selector, seg.base & (2**64 - 1),
                                           seg.limit, qemu_flags(seg.attrib)), 24)  # fmt: skip
        if efer is not None:
            ctypes.memmove(base + layout.efer, struct.pack("<Q", efer), 8)
        raw = ctypes.string_at(base, layout.size)
        cr0 = self.read(x86.UC_X86_REG_CR0)
        hflags = layout.hflags_for(raw, protected=bool(cr0 & M.CR0_PE))
        ctypes.memmove(base + layout.hflags, struct.pack("<I", hflags), 4)
        uc.context_restore(self._context)

    def _load_fpu(self, state: dict[str, Any]) -> None:
        """The x87 and SSE state of the VMSA's save area: FCW, FSW, FTW (FXSAVE's
        abridged tag), FOP, the last instruction and data pointers, MXCSR, ST0-ST7
        and XMM0-15. YMM's upper halves stay in the VMSA: Unicorn has no AVX."""
        uc = self.uc
        fsw = state.get("x87_fsw", 0)
        uc.reg_write(x86.UC_X86_REG_FPCW, state.get("x87_fcw", 0x37F))
        uc.reg_write(x86.UC_X86_REG_FPSW, fsw)
        uc.reg_write(x86.UC_X86_REG_FPTAG, _full_tag(state.get("x87_ftw", 0)))
        uc.reg_write(x86.UC_X86_REG_FOP, state.get("x87_fop", 0))
        uc.reg_write(x86.UC_X86_REG_FIP, state.get("x87_rip", 0))
        uc.reg_write(x86.UC_X86_REG_FDP, state.get("x87_dp", 0))
        uc.reg_write(x86.UC_X86_REG_MXCSR, state.get("mxcsr", 0x1F80))
        for physical, value in enumerate(st_registers(bytes(state.get("fpreg_x87", bytes(80))),
                                                      fsw)):  # fmt: skip
            uc.reg_write(x86.UC_X86_REG_FP0 + physical, value)
        xmm = bytes(state.get("fpreg_xmm", bytes(256)))
        for i in range(16):
            uc.reg_write(x86.UC_X86_REG_XMM0 + i, int.from_bytes(xmm[16 * i : 16 * i + 16],
                                                                "little"))  # fmt: skip

    def save_state(self) -> dict[str, Any]:
        """The register state as VMSA fields (what #VMEXIT writes back to the VMSA)."""
        uc = self.uc
        state: dict[str, Any] = {name: self.read(reg) for name, reg in GPR_IDS.items()}
        state.update({name: uc.msr_read(index) for name, index in MSR_FIELDS.items()})
        state["efer"] = uc.msr_read(M.MSR_EFER) | M.EFER_SVME
        for name, reg in (("gdtr", x86.UC_X86_REG_GDTR), ("idtr", x86.UC_X86_REG_IDTR)):
            _, base, limit, _ = uc.reg_read(reg)
            state[name] = Segment(0, 0, limit, base)
        for name, reg in (("tr", x86.UC_X86_REG_TR), ("ldtr", x86.UC_X86_REG_LDTR)):
            selector, base, limit, flags = uc.reg_read(reg)
            state[name] = Segment(selector, vmcb_attrib(flags), limit, base)
        for cr, reg in CR_IDS.items():
            state[f"cr{cr}"] = self.read(reg)
        state["rflags"] = self.read(_RFLAGS)
        state["rip"] = self.read(_RIP)
        state["dr7"] = self.read(x86.UC_X86_REG_DR7)
        state["dr6"] = self.read(x86.UC_X86_REG_DR6)
        fsw = uc.reg_read(x86.UC_X86_REG_FPSW)
        state["x87_fcw"] = uc.reg_read(x86.UC_X86_REG_FPCW)
        state["x87_fsw"] = fsw
        state["x87_ftw"] = _abridged_tag(uc.reg_read(x86.UC_X86_REG_FPTAG))
        state["x87_fop"] = uc.reg_read(x86.UC_X86_REG_FOP)
        state["x87_rip"] = uc.reg_read(x86.UC_X86_REG_FIP)
        state["x87_dp"] = uc.reg_read(x86.UC_X86_REG_FDP)
        state["mxcsr"] = uc.reg_read(x86.UC_X86_REG_MXCSR)
        state["fpreg_x87"] = vmsa_x87(
            [uc.reg_read(x86.UC_X86_REG_FP0 + i) for i in range(8)], fsw)  # fmt: skip
        state["fpreg_xmm"] = b"".join(
            uc.reg_read(x86.UC_X86_REG_XMM0 + i).to_bytes(16, "little") for i in range(16)
        )
        return state



class _Mmr(ctypes.Structure):
    """Unicorn's ``uc_x86_mmr``: a descriptor-table or task register."""

    _fields_ = (("selector", ctypes.c_uint16), ("base", ctypes.c_uint64),
                ("limit", ctypes.c_uint32), ("flags", ctypes.c_uint32))  # fmt: skip


# -- hidden segment state ----------------------------------------------------------------

#: A value no fresh engine holds in RAX (see Registers.__init__).
_MARK = 0x5EF5_1A7E_0DD5_EA11
#: QEMU's ``hflags`` bits that follow from the segment caches (target/i386/cpu.h).
_HF_CPL = 3
_HF_INHIBIT_IRQ = 1 << 3
_HF_CS32, _HF_SS32, _HF_ADDSEG = 1 << 4, 1 << 5, 1 << 6
_HF_LMA, _HF_CS64 = 1 << 14, 1 << 15
_DESC_B, _DESC_L = 1 << 22, 1 << 21
#: QEMU's segment register order in ``CPUX86State.segs``.
_SEG_ORDER = ("es", "cs", "ss", "ds", "fs", "gs")
_SEGMENT_CACHE = struct.Struct("<I4xQII")  # selector, base, limit, flags


@frozen
class _ContextLayout:
    """Where a saved Unicorn x86 context keeps the segment caches and ``hflags``.

    Found once per process by loading known descriptors into a scratch engine and
    looking for them in its saved context (:func:`_layout`), so that a Unicorn build
    with another layout fails loudly here instead of corrupting a guest.
    """

    segs: int
    hflags: int
    efer: int
    size: int

    def segment(self, name: str) -> int:
        return self.segs + _SEGMENT_CACHE.size * _SEG_ORDER.index(name)

    def hflags_for(self, raw: bytes, protected: bool) -> int:
        """``hflags`` with the bits QEMU derives from CS and SS recomputed, as its
        ``cpu_x86_load_seg_cache`` does after loading CS and then SS."""
        hflags = struct.unpack_from("<I", raw, self.hflags)[0] & ~_HF_LMA
        if struct.unpack_from("<Q", raw, self.efer)[0] & M.EFER_LMA:
            hflags |= _HF_LMA
        _, _, _, cs_flags = _SEGMENT_CACHE.unpack_from(raw, self.segment("cs"))
        _, ss_base, _, ss_flags = _SEGMENT_CACHE.unpack_from(raw, self.segment("ss"))
        ds_base = _SEGMENT_CACHE.unpack_from(raw, self.segment("ds"))[1]
        es_base = _SEGMENT_CACHE.unpack_from(raw, self.segment("es"))[1]
        hflags &= ~(_HF_CPL | _HF_CS32 | _HF_SS32 | _HF_ADDSEG | _HF_CS64)
        if hflags & _HF_LMA and cs_flags & _DESC_L:
            hflags |= _HF_CS32 | _HF_CS64
        elif cs_flags & _DESC_B:
            hflags |= _HF_CS32
        if protected:
            hflags |= (ss_flags >> 13) & 3
        if ss_flags & _DESC_B:
            hflags |= _HF_SS32
        if hflags & _HF_CS64:
            pass  # zero bases assumed for DS, ES and SS in long mode
        elif not protected or not hflags & _HF_CS32:
            hflags |= _HF_ADDSEG
        elif ds_base | es_base | ss_base:
            hflags |= _HF_ADDSEG
        return hflags


_LAYOUT: list[_ContextLayout] = []


@frozen
class _LiveLayout:
    """Where the live ``CPUX86State`` keeps what ``uc_reg_read`` copies out of it:
    offsets from ``env`` of each GPR and RIP, of ``eflags``, and of the SegmentCache
    of each descriptor-table register (with the limit mask the API applies)."""

    regs: dict[int, int]
    eflags: int
    tables: dict[int, tuple[int, int]]
    size: int


_LIVE: list[_LiveLayout] = []
#: How far into the live CPU state the probe looks (its fields sit near the start).
_LIVE_SEARCH = 0x400
#: A value for RFLAGS that no fresh engine holds: CF PF AF ZF SF DF OF AC ID set.
_RFLAGS_MARK = 0x24_0CD7


def _live(uc: Uc, env: int) -> _LiveLayout:
    if not _LIVE:
        _LIVE.append(_probe_live(uc, env))
    return _LIVE[0]


def _probe_live(uc: Uc, env: int) -> _LiveLayout:
    """Write a distinct value into every GPR, RIP, RFLAGS and descriptor-table
    register of an engine through the API, find each once in its live state, and put
    the registers back. A build that keeps any of them elsewhere (or twice) is
    refused, rather than read wrongly."""
    direct = [*GPR_IDS.values(), _RIP]
    saved = [uc.reg_read(reg) for reg in direct]
    saved_flags = uc.reg_read(_RFLAGS)
    saved_tables = {reg: uc.reg_read(reg) for reg in _TABLE_IDS}
    marks = {reg: _MARK ^ (i + 1) << 40 for i, reg in enumerate(direct)}
    table_marks = {reg: (0x28 + 8 * i, _MARK ^ (0x80 + i) << 40, 0x5A5 + i, 0x89 << 8)
                   for i, reg in enumerate(_TABLE_IDS)}  # fmt: skip
    try:
        for reg, mark in marks.items():
            uc.reg_write(reg, mark)
        uc.reg_write(_RFLAGS, _RFLAGS_MARK)
        for reg, value in table_marks.items():
            uc.reg_write(reg, value)
        raw = ctypes.string_at(env, _LIVE_SEARCH)
    finally:
        for reg, value in zip(direct, saved, strict=True):
            uc.reg_write(reg, value)
        uc.reg_write(_RFLAGS, saved_flags)
        for reg, table in saved_tables.items():
            uc.reg_write(reg, table)

    def only(value: int) -> int:
        found = [off for off in range(0, _LIVE_SEARCH - 7, 8)
                 if struct.unpack_from("<Q", raw, off)[0] == value]  # fmt: skip
        return found[0] if len(found) == 1 else -1

    regs = {reg: only(mark) for reg, mark in marks.items()}
    eflags = only(_RFLAGS_MARK)
    tables = {reg: (only(value[1]) - 8, _TABLE_IDS[reg]) for reg, value in table_marks.items()}
    bad = [reg for reg, off in regs.items() if off < 0]
    bad += [reg for reg, (off, mask) in tables.items()
            if off < 0 or _SEGMENT_CACHE.unpack_from(raw, off)[2] & mask != table_marks[reg][2]]
    if bad or eflags < 0:
        raise RuntimeError(
            "this Unicorn build keeps its x86 registers in an unexpected layout (register "
            f"ids {bad}{', RFLAGS' if eflags < 0 else ''} not found); sevsim needs unicorn "
            "2.1.x (see pyproject.toml)"
        )
    size = max([*regs.values(), eflags, *(off + _SEGMENT_CACHE.size for off, _ in tables.values())])
    return _LiveLayout(regs, eflags, tables, size + 8)


def _layout() -> _ContextLayout:
    if not _LAYOUT:
        _LAYOUT.append(_probe_layout())
    return _LAYOUT[0]


def _probe_layout() -> _ContextLayout:
    """Load a descriptor with a recognisable base into each segment register of a
    scratch engine (its 32-bit mode loads descriptors fully) and find them."""
    scratch = Uc(UC_ARCH_X86, UC_MODE_32)
    scratch.mem_map(0, 0x10000)
    scratch.reg_write(x86.UC_X86_REG_GDTR, (0, 0, 0xFFFF, 0))
    scratch.reg_write(x86.UC_X86_REG_CR0, M.CR0_PE)
    marks = {name: 0x5E5E_0000 + 0x100 * i for i, name in enumerate(_SEG_ORDER)}
    for i, name in enumerate(_SEG_ORDER):
        attrib = 0xC9B if name == "cs" else 0xC93
        selector = 0x40 + 8 * i
        scratch.mem_write(selector, descriptor(Segment(selector, attrib, 0xFFFFF, marks[name])))
        scratch.reg_write(SEG_IDS[name], selector)
    efers = (M.EFER_SCE | M.EFER_NX, M.EFER_SCE | M.EFER_LME)
    raws = []
    for efer in efers:
        scratch.msr_write(M.MSR_EFER, efer)
        context = scratch.context_save()
        base = ctypes.cast(context.context, ctypes.c_void_p).value
        assert base is not None
        raws.append(ctypes.string_at(base, context.size))
    raw = raws[0]
    first = raw.find(struct.pack("<Q", marks["es"])) - 8
    efer_at = next((off for off in range(0, len(raw) - 8, 8)
                    if raw[off : off + 8] == struct.pack("<Q", efers[0])
                    and raws[1][off : off + 8] == struct.pack("<Q", efers[1])), -1)  # fmt: skip
    layout = _ContextLayout(segs=first, hflags=first - 8, efer=efer_at, size=context.size)
    for i, name in enumerate(_SEG_ORDER):
        selector, seg_base, _, flags = _SEGMENT_CACHE.unpack_from(raw, layout.segment(name))
        hflags = struct.unpack_from("<I", raw, layout.hflags)[0]
        if first < 8 or efer_at < 0 or (selector, seg_base) != (0x40 + 8 * i, marks[name]) or not (
                hflags & _HF_CS32 and flags & _DESC_B):  # fmt: skip
            raise RuntimeError(
                "this Unicorn build keeps its x86 CPU context in an unexpected layout; "
                "sevsim needs unicorn 2.1.x (see pyproject.toml)"
            )
    return layout


def st_registers(fpreg_x87: bytes, fsw: int) -> list[tuple[int, int]]:
    """The VMSA's ``fpreg_x87`` as (mantissa, exponent) pairs of the physical registers
    R0-R7.

    The VMSA keeps ST0-ST7 in an undocumented layout (``sev_es_sync_vmsa`` writes it):
    bytes 0-7 of each register in eight 8-byte slots, then bytes 8-9 of each in eight
    2-byte slots. ST(i) is physical register (TOP + i) mod 8, TOP being FSW bits 13:11.
    """
    top = (fsw >> 11) & 7
    physical: list[tuple[int, int]] = [(0, 0)] * 8
    for i in range(8):
        mantissa = int.from_bytes(fpreg_x87[8 * i : 8 * i + 8], "little")
        exponent = int.from_bytes(fpreg_x87[64 + 2 * i : 66 + 2 * i], "little")
        physical[(top + i) % 8] = (mantissa, exponent)
    return physical


def vmsa_x87(physical: list[tuple[int, int]], fsw: int) -> bytes:
    """The inverse of :func:`st_registers`: R0-R7 into the VMSA's ``fpreg_x87``."""
    top = (fsw >> 11) & 7
    stack = [physical[(top + i) % 8] for i in range(8)]
    return b"".join(m.to_bytes(8, "little") for m, _ in stack) + b"".join(
        e.to_bytes(2, "little") for _, e in stack)  # fmt: skip


def _full_tag(abridged: int) -> int:
    """FXSAVE's abridged tag byte (1 = valid) to the x87 tag word (2 bits, 3 = empty).

    A register marked valid is recorded as 0 (valid); the CPU recomputes zero/special
    from the register itself when it matters.
    """
    return sum((0 if abridged >> i & 1 else 3) << (2 * i) for i in range(8))


def _abridged_tag(tag_word: int) -> int:
    return sum(1 << i for i in range(8) if (tag_word >> (2 * i)) & 3 != 3)


def descriptor(seg: Segment) -> bytes:
    """An 8-byte GDT descriptor with a segment's base, limit and VMCB attributes."""
    granular = bool(seg.attrib & 0x800)
    limit = seg.limit >> 12 if granular else seg.limit
    low = (limit & 0xFFFF) | (seg.base & 0xFF_FFFF) << 16 | (seg.attrib & 0xFF) << 40
    low |= ((limit >> 16) & 0xF) << 48 | ((seg.attrib >> 8) & 0xF) << 52
    low |= ((seg.base >> 24) & 0xFF) << 56
    return struct.pack("<Q", low)


def qemu_flags(attrib: int) -> int:
    """VMCB packed attributes (type..P in 7:0, AVL..G in 11:8) to QEMU's descriptor flags."""
    return (attrib & 0xFF) << 8 | ((attrib >> 8) & 0xF) << 20


def vmcb_attrib(flags: int) -> int:
    """QEMU's descriptor flags back to VMCB packed attributes."""
    return (flags >> 8) & 0xFF | ((flags >> 20) & 0xF) << 8
