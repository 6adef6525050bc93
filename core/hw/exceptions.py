"""Exception and interrupt delivery through the guest's IDT, as the CPU does it.

Unicorn does not deliver exceptions through a guest IDT: it stops and reports them.
The model delivers them itself: it reads the gate, picks the stack (the TSS's RSP0
on a privilege change, the IST slot the gate names), pushes the frame (SS, RSP,
RFLAGS, CS, RIP and an error code where the vector has one, 16-byte aligned in long
mode; 4-byte pushes in protected mode; IP, CS, FLAGS through the IVT in real mode),
clears IF for an interrupt gate and loads CS:RIP. A fault while delivering becomes a
double fault, a fault while delivering that is a triple fault: the SHUTDOWN exit.
The guest's own IRET then runs natively.

Nearly every delivery takes the same path: a #VC in 64-bit mode from CPL 0 to a
CPL 0 handler under the same CS, often through an IST. That case is decoded once
per vector into a :class:`_Plan` (the handler, the gate, and where the gate, the CS
descriptor and the IST slot lie in host memory) and replayed. Replaying stays exact:
CS, IDTR, GDTR, TR, long mode and the guest-physical space are compared; the TLB is
asked again for every page the delivery reads, as the full path asks it (the guest
may remap one and INVLPG it, which Unicorn executes unseen); the gate and the
descriptor's P and DPL, which the guest may rewrite at any time without a flush,
are read again and compared; the IST slot is read and the stack translated for
every frame. Whatever differs, or any access that would fault, takes the full path.

A plan also lets a #VC be delivered from the code hook in front of the instruction
that raises it, the engine still running (:meth:`Delivery.deliver_in_run`): RFLAGS
is then read through the API (its arithmetic flags may still be lazy in QEMU) and
the RIP write makes Unicorn leave the block for the handler. A frame that would land
on a page code was translated from is not written there: that code must be dropped
first, between runs.
"""

from __future__ import annotations

import struct
from functools import cache, lru_cache

from attrs import frozen
from unicorn import UC_PROT_READ, UC_PROT_WRITE
from unicorn import x86_const as x86

from sevsim.arch import msr as M
from sevsim.arch.vectors import ERROR_CODE_VECTORS, Vector
from sevsim.arch.vmsa import Segment
from sevsim.hw.memory import GuestMemory
from sevsim.hw.mmu import GuestAccessFault, Mmu
from sevsim.hw.regs import Registers

#: Exceptions whose delivery pushes an error code.
_CONTRIBUTORY = frozenset({0, 10, 11, 12, 13})
_CLEARED = (1 << 8) | (1 << 14) | (1 << 16) | (1 << 17)  # TF NT RF VM
_IF = 1 << 9
_DB = 1 << 10  # a segment's D/B attribute (VMCB format): 32-bit
#: A descriptor's access byte: P and DPL, and their values for a present DPL 0 segment.
_PRESENT_DPL, _PRESENT_DPL0 = 0xE0, 0x80
_IDTR, _GDTR, _TR = x86.UC_X86_REG_IDTR, x86.UC_X86_REG_GDTR, x86.UC_X86_REG_TR
_LMA = M.EFER_LMA
_MASK64 = (1 << 64) - 1
#: Bits 63:47 of a canonical address, shifted down: all clear or all set.
_CANONICAL = (0, (1 << 17) - 1)
_QWORD = struct.Struct("<Q")
#: A 64-bit interrupt frame without and with an error code, lowest address first.
_LONG_FRAME = struct.Struct("<5Q")
_LONG_FRAME_CODE = struct.Struct("<6Q")


@frozen
class Event:
    """An exception or interrupt to deliver."""

    vector: int
    error_code: int | None = None
    cr2: int | None = None
    #: INT n: no error code, whatever the vector, and the gate's DPL is checked.
    software: bool = False
    #: Injected through EVENTINJ: an error code is pushed exactly when one is given
    #: (EV), whatever the vector.
    injected: bool = False


def is_double_fault(first: int, second: int) -> bool:
    """APM 8.2.9: contributory after contributory, or #PF/contributory after #PF."""
    if first == Vector.PF:
        return second == Vector.PF or second in _CONTRIBUTORY
    return first in _CONTRIBUTORY and second in _CONTRIBUTORY


def gate(raw: bytes) -> tuple[int, int, int, int, int] | None:
    """(selector, target, type, IST, DPL) of a present interrupt or trap gate, else None.

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
    return (low >> 16) & 0xFFFF, target, gate_type, (low >> 32) & 7, (low >> 45) & 3


#: :func:`gate`, kept per gate's bytes: every #VC decodes the same gate.
_gate = lru_cache(maxsize=1024)(gate)


@cache
def _frame(word: int, count: int) -> struct.Struct:
    """An interrupt frame of ``count`` stack words of ``word`` bytes."""
    return struct.Struct(f"<{count}{ {8: 'Q', 4: 'I', 2: 'H'}[word]}")


@frozen
class _Plan:
    """One vector's delivery from CPL 0 in 64-bit mode to a CPL 0 handler under the
    same CS, decoded, and what it was decoded from (see the module doc)."""

    #: What it was decoded under: the CS selector delivered from (which the gate
    #: also names), and TR, GDTR and IDTR (:meth:`Registers.system_tables`).
    key: tuple[int, bytes]
    #: The guest-physical space the pages below lie in.
    memory: GuestMemory
    #: Each page the delivery reads: (linear page, the physical page the TLB gave).
    pages: tuple[tuple[int, int], ...]
    #: The 16-byte gate as decoded, and where it lies.
    gate: bytes
    gate_view: memoryview
    gate_at: int
    #: Where the access byte of the CS descriptor lies: of the descriptor, only its
    #: P and DPL bits play a part (CS is not reloaded).
    access_view: memoryview
    access_at: int
    #: Where the TSS's IST slot lies (read on every delivery); None: no IST, the
    #: handler runs on the interrupted stack.
    ist_view: memoryview | None
    ist_at: int
    target: int
    #: RFLAGS bits the delivery clears (IF too through an interrupt gate).
    cleared: int


class Delivery:
    """Delivers events into one vCPU (its registers and its MMU)."""

    def __init__(self, regs: Registers, mmu: Mmu) -> None:
        self.regs = regs
        self.mmu = mmu
        #: Vector -> the plan of its last delivery that had one.
        self._plans: dict[int, _Plan] = {}

    def deliver(self, event: Event) -> str | None:
        """Deliver ``event``; a failed delivery escalates. Returns None, or why the CPU
        shut down (a fault while delivering a double fault)."""
        first = event.vector
        current = event
        while True:
            if current.cr2 is not None:
                self.regs.write(x86.UC_X86_REG_CR2, current.cr2)
            code = current.error_code
            if (code is None and current.vector in ERROR_CODE_VECTORS and not current.software
                    and not current.injected):  # fmt: skip
                code = 0
            fault = self._push_frame(current.vector, code, current.software)
            if fault is None:
                return None
            if current.vector == Vector.DF:
                return f"triple fault delivering #{first}"
            if is_double_fault(current.vector, fault.vector):
                current = Event(Vector.DF, 0)
            else:
                current = fault

    def deliver_in_run(self, vector: int, error_code: int) -> bool:
        """Deliver an exception from inside a code hook, in front of the instruction
        that raises it, when its vector's plan holds; False (nothing done) otherwise,
        and the caller stops the run and delivers it with :meth:`deliver`.

        Writing RIP inside the hook makes Unicorn leave the block and go on at the
        handler: no stop, no restart, nothing flushed."""
        return self._push_planned(vector, error_code, in_run=True)

    def _push_frame(self, vector: int, error_code: int | None, software: bool) -> Event | None:
        """Push an interrupt frame and enter the handler; the fault if that fails.

        Through the vector's plan when it still holds; otherwise (and to compute any
        fault) the full path."""
        if self._push_planned(vector, error_code):
            return None
        return self._push_frame_full(vector, error_code, software)

    def _push_planned(self, vector: int, error_code: int | None, in_run: bool = False) -> bool:
        """Deliver through the vector's plan if it still holds and the frame goes to one
        page that translates to RAM; False, with nothing changed, otherwise."""
        regs, mmu = self.regs, self.mmu
        if regs.cpl():  # the TLB probes below answer for CPL 0 only
            return False
        cs, rip, rflags, old_sp, ss = regs.interrupt_frame(in_run)
        plan = self._plans.get(vector)
        key = (cs, regs.system_tables())
        if plan is None or not (
            plan.key == key
            and plan.memory is mmu.memory and mmu.mode.efer & _LMA
            and mmu.tlb_maps(plan.pages)
            # The guest may rewrite them at any time, no flush needed.
            and plan.gate_view[plan.gate_at : plan.gate_at + 16] == plan.gate
            and plan.access_view[plan.access_at] & _PRESENT_DPL == _PRESENT_DPL0
        ):  # fmt: skip
            plan = self._plan(vector, key)
            if plan is None:
                return False
            self._plans[vector] = plan
        ist_view = plan.ist_view
        sp = old_sp if ist_view is None else _QWORD.unpack_from(ist_view, plan.ist_at)[0]
        if error_code is None:
            data = _LONG_FRAME.pack(rip, cs, rflags, old_sp, ss)
        else:
            data = _LONG_FRAME_CODE.pack(error_code & _MASK64, rip, cs, rflags, old_sp, ss)
        size = len(data)
        sp = (sp & ~0xF) - size & _MASK64
        if sp >> 47 not in _CANONICAL or (sp & 0xFFF) + size > 0x1000:
            return False
        paddr = mmu.tlb_paddr(sp, UC_PROT_WRITE)
        region = mmu.memory.ram_at(paddr) if paddr >= 0 else None
        if region is None or (in_run and mmu.holds_code(paddr & ~0xFFF)):
            return False  # (translated code written from a hook would run stale)
        at = paddr - region.gpa
        region.view[at : at + size] = data
        mmu.written(paddr & ~0xFFF)
        regs.enter(sp, rflags & ~plan.cleared, plan.target, in_run)
        return True

    def _plan(self, vector: int, key: tuple[int, bytes]) -> _Plan | None:
        """Decode the delivery of ``vector`` from CPL 0 in 64-bit mode under ``key``'s
        CS and system tables (:attr:`_Plan.key`); None if it is not the planned case
        (see :class:`_Plan`) or one of its reads would not go through the TLB to RAM in
        one page (the full path then says what happens)."""
        mmu = self.mmu
        cs = key[0]
        if not mmu.mode.efer & _LMA or cs & 3:
            return None
        table = self.regs.table
        idtr, gdtr, tr = table(_IDTR), table(_GDTR), table(_TR)
        _, idt_base, idt_limit, _ = idtr
        if vector * 16 + 15 > idt_limit:
            return None
        pages: dict[int, int] = {}
        gate_found = self._locate(idt_base + vector * 16, 16, pages)
        if gate_found is None:
            return None
        gate_view, gate_at = gate_found
        raw_gate = gate_view[gate_at : gate_at + 16].tobytes()
        parsed = _gate(raw_gate)
        if parsed is None:
            return None
        selector, target, gate_type, ist, _ = parsed
        _, gdt_base, gdt_limit, _ = gdtr
        if selector & ~3 != cs or selector & ~7 == 0 or selector & 4 or (selector | 7) > gdt_limit:
            return None
        descriptor_found = self._locate(gdt_base + (selector & ~7), 8, pages)
        if descriptor_found is None:
            return None
        access_view, access_at = descriptor_found
        access_at += 5
        if access_view[access_at] & _PRESENT_DPL != _PRESENT_DPL0:
            return None
        ist_view, ist_at = None, 0
        if ist:
            ist_found = self._locate(tr[1] + 0x24 + 8 * (ist - 1), 8, pages)
            if ist_found is None:
                return None
            ist_view, ist_at = ist_found
        return _Plan(key, mmu.memory, tuple(pages.items()), raw_gate,
                     gate_view, gate_at, access_view, access_at, ist_view, ist_at, target,
                     _CLEARED | (_IF if gate_type in (0xE, 0x6) else 0))  # fmt: skip

    def _locate(
        self, linear: int, size: int, pages: dict[int, int]
    ) -> tuple[memoryview, int] | None:
        """(buffer, offset) of ``size`` bytes a supervisor read at ``linear`` reaches
        through the TLB, its page noted in ``pages``; None unless that is RAM in one
        page (what :meth:`Mmu.translate` would give without walking)."""
        linear &= _MASK64
        page = linear & ~0xFFF
        if linear >> 47 not in _CANONICAL or linear - page + size > 0x1000:
            return None
        physical = pages.get(page)
        if physical is None:
            physical = self.mmu.tlb_paddr(page, UC_PROT_READ)
            if physical < 0:
                return None
            pages[page] = physical
        region = self.mmu.memory.ram_at(physical)
        if region is None:
            return None
        return region.view, physical + linear - page - region.gpa

    def _push_frame_full(self, vector: int, error_code: int | None, software: bool) -> Event | None:
        """:meth:`_push_frame` for any mode and privilege, every fault computed."""
        regs = self.regs
        mode = self.mmu.mode
        long_mode, protected = bool(mode.efer & M.EFER_LMA), bool(mode.cr0 & M.CR0_PE)
        word = 8 if long_mode else 4 if protected else 2
        gate_size = 16 if long_mode else 8 if protected else 4
        _, idt_base, idt_limit, _ = regs.table(x86.UC_X86_REG_IDTR)
        idt_error = vector * 8 + 2
        if vector * gate_size + gate_size - 1 > idt_limit:
            return Event(Vector.GP, idt_error)
        # The engine is stopped: delivery happens between runs.
        cs, rip, rflags, old_sp, ss = regs.interrupt_frame()
        cpl = cs & 3
        try:
            raw = self.mmu.read(idt_base + vector * gate_size, gate_size)
            if protected:
                parsed = _gate(raw)
                if parsed is None:
                    return Event(Vector.GP, idt_error)
                selector, target, gate_type, ist, dpl = parsed
                if software and dpl < cpl:
                    regs.rip = rip - 2  # a fault, at the INT n (CD ib) itself
                    return Event(Vector.GP, idt_error)
            else:
                target, selector = struct.unpack("<HH", raw)
                gate_type, ist, error_code = 0xE, 0, None
            target_cs = self._descriptor(selector) if protected else None
            if protected and (target_cs is None or not (target_cs.attrib >> 7) & 1):
                return Event(Vector.GP, selector & ~3)
            new_cpl = (target_cs.attrib >> 5) & 3 if target_cs is not None else 0
            sp = old_sp
            stack = None  # the stack segment a privilege change loads
            if long_mode and (ist or new_cpl < cpl):
                _, tss_base, _, _ = regs.table(x86.UC_X86_REG_TR)
                slot = 0x24 + 8 * (ist - 1) if ist else 4 + 8 * new_cpl
                sp = int.from_bytes(self.mmu.read(tss_base + slot, 8), "little")
                if new_cpl < cpl:
                    stack = Segment(new_cpl, new_cpl << 5, 0, 0)
            elif protected and new_cpl < cpl:  # 32-bit: SS:ESP from the TSS
                _, tss_base, _, _ = regs.table(x86.UC_X86_REG_TR)
                sp, new_ss = struct.unpack("<IH", self.mmu.read(tss_base + 4 + 8 * new_cpl, 6))
                stack = self._descriptor(new_ss)
                if stack is None:
                    return Event(Vector.TS, new_ss & ~3)
            if long_mode:  # a flat 64-bit stack: SS's base and size play no part
                sp &= ~0xF
                stack_base, sp_mask = 0, (1 << 64) - 1
            else:
                # The stack's base and address size are SS's hidden ones (real mode
                # keeps what protected mode loaded), or the new stack's.
                stack_seg = stack if stack is not None else regs.segment("ss")
                stack_base = stack_seg.base
                sp_mask = 0xFFFF_FFFF if stack_seg.attrib & _DB else 0xFFFF
            frame = [rflags, cs, rip]
            if long_mode or stack is not None:
                frame = [ss, old_sp, *frame]
            if error_code is not None:
                frame.append(error_code)
            mask = (1 << (8 * word)) - 1
            sp = sp & ~sp_mask | (sp - word * len(frame)) & sp_mask
            data = _frame(word, len(frame)).pack(*[v & mask for v in reversed(frame)])
            self.mmu.write(stack_base + (sp & sp_mask), data)
        except GuestAccessFault as failed:
            fault = failed.fault
            if fault.npf_gpa is not None or fault.vector != Vector.PF:
                return Event(Vector.GP, 0)
            return Event(Vector.PF, fault.error_code, fault.vaddr)
        cleared = _CLEARED | (_IF if gate_type in (0xE, 0x6) else 0)
        # RIP before the segments: set_segments carries the whole state through a
        # saved context, so the order of the two does not matter.
        regs.enter(sp, rflags & ~cleared, target)
        if not protected:  # real mode: the base is the selector times 16
            regs.set_segments({"cs": Segment(selector, 0x9B, 0xFFFF, selector << 4)})
        elif target_cs is not None and ((selector & ~3 | new_cpl) != cs or stack is not None):
            loads = {"cs": Segment(selector & ~3 | new_cpl, target_cs.attrib, target_cs.limit,
                                   target_cs.base)}  # fmt: skip
            if stack is not None:
                loads["ss"] = stack
            regs.set_segments(loads)
        return None

    def _descriptor(self, selector: int) -> Segment | None:
        """The GDT descriptor of ``selector`` as a segment (None: null or past the limit)."""
        _, base, limit, _ = self.regs.table(x86.UC_X86_REG_GDTR)
        if selector & ~7 == 0 or selector & 4 or (selector | 7) > limit:
            return None
        return _segment_of(selector, self.mmu.read(base + (selector & ~7), 8))


@lru_cache(maxsize=1024)
def _segment_of(selector: int, descriptor: bytes) -> Segment:
    """A GDT descriptor as the segment ``selector`` loads (kept: the same few come back
    on every exception)."""
    raw = int.from_bytes(descriptor, "little")
    seg_limit = (raw & 0xFFFF) | ((raw >> 48) & 0xF) << 16
    attrib = ((raw >> 40) & 0xFF) | ((raw >> 52) & 0xF) << 8
    if attrib & 0x800:  # granular: a limit in 4 KiB units
        seg_limit = seg_limit << 12 | 0xFFF
    seg_base = ((raw >> 16) & 0xFF_FFFF) | ((raw >> 56) & 0xFF) << 24
    return Segment(selector, attrib, seg_limit, seg_base)
