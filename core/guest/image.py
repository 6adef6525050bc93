"""Building a small 64-bit SEV-ES guest: page tables with the C-bit, GDT, TSS, IDT.

The image is what a guest owner hands to the VMM: bytes to place in guest memory
before launch (all of them get measured and encrypted by LAUNCH_UPDATE_DATA), the
initial register state for the VMSA, and the layout so tests can find things.
Every page is mapped private (C=1) except those named in ``shared``, which the page
tables map with C=0 — that is how an SEV-ES guest makes its GHCB visible to the
hypervisor.

Layout (guest-physical = guest-virtual, identity mapped over the first 4 GiB):

=========  ==========================================================
0x1000     PML4; 0x2000 PDPT; 0x3000 PD for 0-1 GiB; 0x4000 PT for 0-2 MiB
0x5000     GDT (null, code64 0x08, data 0x10, TSS 0x18, user code64 0x2b,
           user data 0x33); TSS at 0x5100
0x6000     IDT (256 gates, all absent unless given)
0x7000     GHCB (shared)
0x8000     stack top at 0x10000; IST1 stack top at 0x12000
0x20000    code
=========  ==========================================================
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from itertools import pairwise

from attrs import define, field

from sevsim.arch import msr as M
from sevsim.arch.vmsa import Segment

PML4, PDPT, PD, PT = 0x1000, 0x2000, 0x3000, 0x4000
GDT, TSS, IDT = 0x5000, 0x5100, 0x6000
GHCB_GPA = 0x7000
STACK_TOP = 0x10000
IST1_TOP = 0x12000
CODE = 0x20000
IMAGE_END = 0x200000  # the image lives in the first 2 MiB, the part mapped with 4 KiB pages

CODE64_SEL, DATA_SEL, TSS_SEL = 0x08, 0x10, 0x18
USER_CODE64_SEL, USER_DATA_SEL = 0x28 | 3, 0x30 | 3
#: Every mapping allows user access too (U/S set), so ring-3 test code can run.
_P, _RW, _US, _PS = 1 << 0, 1 << 1, 1 << 2, 1 << 7

GDT_ENTRIES = (
    0,
    0x00AF_9A00_0000_FFFF,  # 64-bit code, DPL 0
    0x00CF_9200_0000_FFFF,  # data, DPL 0
)
#: After the 16-byte TSS descriptor: ring-3 segments.
USER_GDT_ENTRIES = (
    0x00AF_FA00_0000_FFFF,  # 64-bit code, DPL 3
    0x00CF_F200_0000_FFFF,  # data, DPL 3
)


def gate(target: int, selector: int = CODE64_SEL, ist: int = 0, gate_type: int = 0xE) -> bytes:
    """A 16-byte 64-bit IDT gate (interrupt gate by default)."""
    low = (target & 0xFFFF) | selector << 16 | ist << 32 | (0x80 | gate_type) << 40
    low |= ((target >> 16) & 0xFFFF) << 48
    return struct.pack("<QQ", low, target >> 32)


@define
class GuestImage:
    """A guest's initial memory and registers, ready for the VMM to launch."""

    code: bytes
    cbit: int = 51
    #: Guest-physical pages the page tables map shared (C=0).
    shared: frozenset[int] = frozenset({GHCB_GPA})
    #: IDT vector -> handler address.
    idt: Mapping[int, int] = field(factory=dict)
    #: IDT vectors whose gate uses IST1.
    ist_vectors: frozenset[int] = frozenset()
    #: Extra private bytes to place: gpa -> data.
    data: Mapping[int, bytes] = field(factory=dict)
    entry: int = CODE
    #: VMSA fields that replace the defaults of :meth:`initial_state` (e.g. ``rflags``,
    #: ``vintr_ctrl``); names are checked when the VMM sets the state.
    registers: Mapping[str, object] = field(factory=dict)

    def memory(self) -> dict[int, bytes]:
        """Guest-physical address -> bytes, for every private range of the image."""
        c = 1 << self.cbit
        flags = _P | _RW | _US
        pml4 = struct.pack("<Q", PDPT | c | flags)
        pdpt = struct.pack("<Q", PD | c | flags) + b"".join(
            struct.pack("<Q", (i << 30) | c | flags | _PS) for i in range(1, 4)
        )
        pd = struct.pack("<Q", PT | c | flags) + b"".join(
            struct.pack("<Q", (i << 21) | c | flags | _PS) for i in range(1, 512)
        )
        pt = b"".join(
            struct.pack("<Q", (i << 12) | (0 if i << 12 in self.shared else c) | flags)
            for i in range(512)
        )
        tss_desc_low = 0x67 | (TSS & 0xFFFFFF) << 16 | 0x89 << 40 | ((TSS >> 24) & 0xFF) << 56
        gdt = b"".join(struct.pack("<Q", e) for e in GDT_ENTRIES)
        gdt += struct.pack("<QQ", tss_desc_low, TSS >> 32)
        gdt += b"".join(struct.pack("<Q", e) for e in USER_GDT_ENTRIES)
        tss = bytearray(0x68)
        struct.pack_into("<Q", tss, 4, STACK_TOP)  # RSP0
        struct.pack_into("<Q", tss, 0x24, IST1_TOP)  # IST1
        struct.pack_into("<H", tss, 0x66, 0x68)  # no I/O bitmap
        idt = bytearray(4096)
        for vector, target in self.idt.items():
            ist = 1 if vector in self.ist_vectors else 0
            idt[vector * 16 : vector * 16 + 16] = gate(target, ist=ist)
        out = {
            PML4: pml4, PDPT: pdpt, PD: pd, PT: pt,
            GDT: gdt, TSS: bytes(tss), IDT: bytes(idt), self.entry: self.code,
        }  # fmt: skip
        for gpa, data in self.data.items():
            out[gpa] = data
        _refuse_overlaps(out.items())
        return out

    def launch_ranges(self) -> list[tuple[int, int]]:
        """Page-aligned (gpa, length) ranges covering every private byte, merged."""
        pages = sorted({
            page
            for gpa, data in self.memory().items()
            for page in range(gpa & ~0xFFF, gpa + len(data), 0x1000)
        } - set(self.shared))  # fmt: skip
        ranges: list[tuple[int, int]] = []
        for page in pages:
            if ranges and sum(ranges[-1]) == page:
                ranges[-1] = (ranges[-1][0], ranges[-1][1] + 0x1000)
            else:
                ranges.append((page, 0x1000))
        return ranges

    def initial_state(self) -> dict[str, object]:
        """VMSA fields of a vCPU already in 64-bit long mode at ``entry``, with
        ``registers`` over the defaults."""
        code = Segment(CODE64_SEL, 0xA9B, 0xFFFF_FFFF, 0)
        data = Segment(DATA_SEL, 0xC93, 0xFFFF_FFFF, 0)
        defaults = {
            "cs": code, "ss": data, "ds": data, "es": data, "fs": data, "gs": data,
            "gdtr": Segment(0, 0, (len(GDT_ENTRIES) + 2 + len(USER_GDT_ENTRIES)) * 8 - 1, GDT),
            "idtr": Segment(0, 0, 256 * 16 - 1, IDT),
            "tr": Segment(TSS_SEL, 0x8B, 0x67, TSS),
            "ldtr": Segment(0, 0x82, 0xFFFF, 0),
            "cr0": M.CR0_PE | M.CR0_ET | M.CR0_NE | M.CR0_PG | (1 << 1),
            "cr3": PML4 | (1 << self.cbit),
            "cr4": M.CR4_PAE | M.CR4_OSFXSR | M.CR4_OSXMMEXCPT,
            "efer": M.EFER_SCE | M.EFER_LME | M.EFER_LMA | M.EFER_NX | M.EFER_SVME,
            "rflags": 0x2, "rip": self.entry, "rsp": STACK_TOP,
            "dr7": 0x400, "dr6": 0xFFFF_0FF0, "g_pat": M.PAT_DEFAULT, "xcr0": 1,
            "mxcsr": 0x1F80, "x87_fcw": 0x37F,
        }  # fmt: skip
        return {**defaults, **self.registers}


def _refuse_overlaps(items: Iterable[tuple[int, bytes]]) -> None:
    spans = sorted((gpa, gpa + len(data)) for gpa, data in items)
    for (a0, a1), (b0, b1) in pairwise(spans):
        if b0 < a1:
            raise ValueError(f"image ranges [{a0:#x}, {a1:#x}) and [{b0:#x}, {b1:#x}) overlap")
