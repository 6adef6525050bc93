"""One vCPU's register state: fast access for the exit path, and VMSA load/save.

The Python binding's ``reg_read`` costs several times a direct call into the C
library (its type dispatch runs on every access), and the exit path reads and writes
a dozen registers per exit. So the registers an exit touches (GPRs, RIP, RFLAGS,
segment selectors, control and debug registers) go through ``uc_reg_read`` /
``uc_reg_write`` with one reusable buffer; the rare ones (descriptor-table registers,
MSRs, x87/SSE state) through the binding.

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
#: Selector registers read back only 16 bits in 64-bit mode.
_NARROW = frozenset(SEG_IDS.values())


class Registers:
    """Register access for one Unicorn engine."""

    __slots__ = ("_buf", "_context", "_handle", "_hflags", "_mmr", "_mmr_ref", "_read", "_ref",
                 "_state", "_write", "uc")  # fmt: skip

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

    def read(self, reg_id: int) -> int:
        buf = self._buf
        buf.value = 0
        self._read(self._handle, reg_id, self._ref)
        return buf.value & 0xFFFF if reg_id in _NARROW else buf.value

    def write(self, reg_id: int, value: int) -> bool:
        """Write a register; False when the CPU refuses it (a selector that cannot load)."""
        self._buf.value = value & 0xFFFF_FFFF_FFFF_FFFF
        return self._write(self._handle, reg_id, self._ref) == 0

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
        return self.read(GPR_IDS[name])

    def set_gpr(self, name: str, value: int) -> None:
        self.write(GPR_IDS[name], value)

    @property
    def rip(self) -> int:
        return self.read(_RIP)

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
        """(selector, base, limit, flags) of GDTR, IDTR, TR or LDTR (one C call: every
        exception delivery reads IDTR and often TR and GDTR)."""
        mmr = self._mmr
        self._read(self._handle, reg_id, self._mmr_ref)
        return mmr.selector, mmr.base, mmr.limit, mmr.flags

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
