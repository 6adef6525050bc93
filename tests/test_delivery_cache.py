"""Exception delivery replays a decoded plan per vector (sevsim.hw.exceptions); these
guests change what a plan was decoded from between two #VCs and check that the next
#VC sees the change, as the CPU would.

Each guest takes #VC (vector 29, through IST1) on CPUID; its own handler records
which handler ran, the error code, where the CPU pushed the frame and the RIP saved
there into the shared page at ``RECORD`` (plaintext to the test), then skips the
CPUID. The guest itself changes the gate, the CS descriptor, the TSS, IDTR, GDTR,
TR or the page tables between deliveries (with the TLB invalidation the CPU needs
for the tables), and the next #VC must follow.
"""

from __future__ import annotations

import struct

from sevsim.arch.exits import SvmExit
from sevsim.guest.asm import assemble
from sevsim.guest.image import GDT, IDT, IST1_TOP, PDPT, PT, TSS, gate
from sevsim.guest.snippets import TERMINATE
from sevsim.kvm.exits import Shutdown, SystemEvent
from sevsim.testing import GuestRun, run_guest

#: In the shared GHCB page: a count, then 32 bytes per delivery.
RECORD = 0x7800
#: In the same page: what the guest itself read back.
OUT = 0x7F00
HANDLER_A, HANDLER_B = 0x30000, 0x30100
#: Spare private pages the guest maps in.
SPARE_1, SPARE_2 = 0x40000, 0x41000
C_BIT = 1 << 51
PAGE_FLAGS = 0x7  # present, writable, user
IST_SLOT = TSS + 0x24
#: 64-bit frame with an error code: six qwords below the 16-byte aligned IST top.
FRAME = 6 * 8


def _handler(ident: int) -> str:
    """Record (ident, error code, frame address, saved RIP); skip the 2-byte CPUID."""
    return f"""
        push rax
        push rsi
        mov rsi, {RECORD}
        mov rax, [rsi]
        inc qword ptr [rsi]
        shl rax, 5
        add rsi, rax
        mov qword ptr [rsi + 8], {ident}
        mov rax, [rsp + 16]
        mov [rsi + 16], rax
        lea rax, [rsp + 16]
        mov [rsi + 24], rax
        mov rax, [rsp + 24]
        mov [rsi + 32], rax
        add qword ptr [rsp + 24], 2
        pop rsi
        pop rax
        add rsp, 8
        iretq
    """


def _run(
    body: str, pages: dict[int, bytes] | None = None
) -> tuple[GuestRun, list[tuple[int, int, int, int]]]:
    """Run ``body`` with the two handlers and ``pages`` placed; the records, in order."""
    result = run_guest(
        body + TERMINATE,
        enable=["msr_protocol"],
        idt={29: HANDLER_A},
        ist_vectors=frozenset({29}),
        data={
            HANDLER_A: assemble(_handler(0xA), HANDLER_A),
            HANDLER_B: assemble(_handler(0xB), HANDLER_B),
            **(pages or {}),
        },
    )
    memory = result.vm.memory
    count = struct.unpack("<Q", memory.read(RECORD, 8))[0]
    records = [struct.unpack("<4Q", memory.read(RECORD + 8 + 32 * i, 32)) for i in range(count)]
    return result, records


def _out(result: GuestRun) -> int:
    return struct.unpack("<Q", result.vm.memory.read(OUT, 8))[0]


def _gate_low(target: int) -> int:
    return struct.unpack("<Q", gate(target, ist=1)[:8])[0]


def _copy_to_spare_2(table: int, size: int) -> str:
    """Copy ``size`` bytes of the table at ``table`` to SPARE_2."""
    return f"""
        mov rsi, {table}
        mov rdi, {SPARE_2}
        mov ecx, {size // 8}
        rep movsq
    """


#: Make SPARE_2 a copy of the IDT whose #VC gate names HANDLER_B.
IDT_COPY_WITH_GATE_B = _copy_to_spare_2(IDT, 0x1000) + f"""
        mov rax, {_gate_low(HANDLER_B)}
        mov rdi, {SPARE_2 + 29 * 16}
        mov [rdi], rax
    """


def test_a_rewritten_gate_sends_the_next_vc_to_the_new_handler():
    result, records = _run(f"""
        cpuid
        cpuid
        mov rax, {_gate_low(HANDLER_B)}
        mov rdi, {IDT + 29 * 16}
        mov [rdi], rax
        cpuid
    """)
    assert isinstance(result.exit, SystemEvent), result.trace.lines
    assert [(ident, code) for ident, code, _, _ in records] == [
        (0xA, SvmExit.CPUID), (0xA, SvmExit.CPUID), (0xB, SvmExit.CPUID)]  # fmt: skip


def test_a_new_ist_pointer_moves_the_next_frame_there_aligned():
    result, records = _run(f"""
        cpuid
        cpuid
        mov rax, 0x14008
        mov rdi, {IST_SLOT}
        mov [rdi], rax
        cpuid
    """)
    assert isinstance(result.exit, SystemEvent), result.trace.lines
    assert [frame for _, _, frame, _ in records] == [
        IST1_TOP - FRAME, IST1_TOP - FRAME, 0x14000 - FRAME]  # fmt: skip


def test_without_an_ist_each_frame_goes_below_the_interrupted_stack():
    gate_at = IDT + 29 * 16 + 4  # the IST field
    result, records = _run(f"""
        mov rdi, {gate_at}
        mov byte ptr [rdi], 0
        mov rsp, 0xf008
        cpuid
        mov rsp, 0xd7f8
        cpuid
        mov rsp, 0xe028
        cpuid                          /* a frame across two pages */
        mov rsp, 0x10000
    """)
    assert isinstance(result.exit, SystemEvent), result.trace.lines
    assert [frame for _, _, frame, _ in records] == [
        0xF000 - FRAME, 0xD7F0 - FRAME, 0xE020 - FRAME]  # fmt: skip


def _remap_ist_page_then(invalidate: str) -> tuple[GuestRun, list[tuple[int, int, int, int]]]:
    """Map the IST stack's page to SPARE_1, invalidate, #VC; read the frame's saved
    RIP back through SPARE_1's own (identity) mapping."""
    stack_page = (IST1_TOP - FRAME) & ~0xFFF
    return _run(f"""
        cpuid
        cpuid
        mov rax, {SPARE_1 | C_BIT | PAGE_FLAGS}
        mov rdi, {PT + (stack_page >> 12) * 8}
        mov [rdi], rax
        mov rdi, {stack_page}
        {invalidate}
        cpuid
        mov rsi, {SPARE_1 | (IST1_TOP - FRAME) & 0xFFF}
        mov rax, [rsi + 8]
        mov rdi, {OUT}
        mov [rdi], rax
    """, {SPARE_1: bytes(0x1000)})


def test_an_ist_stack_remapped_and_invlpg_takes_the_next_frame_at_the_new_page():
    result, records = _remap_ist_page_then("invlpg [rdi]")
    assert isinstance(result.exit, SystemEvent), result.trace.lines
    assert len(records) == 3
    assert _out(result) == records[2][3] + 2  # the RIP the handler saw, moved past CPUID


def test_an_ist_stack_remapped_and_cr3_reloaded_takes_the_next_frame_at_the_new_page():
    result, records = _remap_ist_page_then("mov rax, cr3\n        mov cr3, rax")
    assert isinstance(result.exit, SystemEvent), result.trace.lines
    assert len(records) == 3
    assert _out(result) == records[2][3] + 2


def test_an_idt_page_remapped_and_invlpg_sends_the_next_vc_through_the_new_gate():
    result, records = _run(f"""
        cpuid
        cpuid
        {IDT_COPY_WITH_GATE_B}
        mov rax, {SPARE_2 | C_BIT | PAGE_FLAGS}
        mov rdi, {PT + (IDT >> 12) * 8}
        mov [rdi], rax
        mov rdi, {IDT}
        invlpg [rdi]
        cpuid
    """, {SPARE_2: bytes(0x1000)})
    assert isinstance(result.exit, SystemEvent), result.trace.lines
    assert [ident for ident, _, _, _ in records] == [0xA, 0xA, 0xB]


def _table_register(limit: int, base: int) -> bytes:
    """The 10-byte operand of LGDT/LIDT in 64-bit mode."""
    return struct.pack("<HQ", limit, base)


def test_a_new_idtr_sends_the_next_vc_through_the_new_table():
    result, records = _run(
        f"""
        cpuid
        cpuid
        {IDT_COPY_WITH_GATE_B}
        mov rdi, {SPARE_1}
        lidt [rdi]
        cpuid
    """,
        {SPARE_1: _table_register(0xFFF, SPARE_2), SPARE_2: bytes(0x1000)},
    )
    assert isinstance(result.exit, SystemEvent), result.trace.lines
    assert [ident for ident, _, _, _ in records] == [0xA, 0xA, 0xB]


#: The image's GDT: null, code, data, the 16-byte TSS descriptor, user code and data.
GDT_SIZE = 7 * 8


def test_a_new_gdtr_whose_cs_is_not_present_makes_the_next_vc_a_triple_fault():
    result, records = _run(
        f"""
        cpuid
        cpuid
        {_copy_to_spare_2(GDT, GDT_SIZE)}
        mov rdi, {SPARE_2 + 8 + 5}
        and byte ptr [rdi], 0x7f
        mov rdi, {SPARE_1}
        lgdt [rdi]
        cpuid
    """,
        {SPARE_1: _table_register(GDT_SIZE - 1, SPARE_2), SPARE_2: bytes(0x1000)},
    )
    assert isinstance(result.exit, Shutdown), result.trace.lines
    assert "triple fault delivering #29" in result.sim.why()
    assert len(records) == 2


def test_a_new_tss_moves_the_next_frame_to_its_ist():
    # A copy of the GDT with a second TSS descriptor (selector 0x38) for a TSS whose
    # IST1 is 0x14000; LTR loads it.
    new_tss = SPARE_1 + 0x100
    tss_low = 0x67 | (new_tss & 0xFF_FFFF) << 16 | 0x89 << 40 | ((new_tss >> 24) & 0xFF) << 56
    gdt_copy = bytes(GDT_SIZE) + struct.pack("<QQ", tss_low, new_tss >> 32)
    tss = bytearray(0x68)
    struct.pack_into("<Q", tss, 0x24, 0x14000)
    result, records = _run(
        f"""
        cpuid
        cpuid
        {_copy_to_spare_2(GDT, GDT_SIZE)}
        mov rdi, {SPARE_1}
        lgdt [rdi]
        mov ax, {GDT_SIZE}
        ltr ax
        cpuid
    """,
        {SPARE_1: _table_register(GDT_SIZE + 15, SPARE_2) + bytes(0xF6) + bytes(tss),
         SPARE_2: gdt_copy},
    )
    assert isinstance(result.exit, SystemEvent), result.trace.lines
    assert [frame for _, _, frame, _ in records] == [
        IST1_TOP - FRAME, IST1_TOP - FRAME, 0x14000 - FRAME]  # fmt: skip


def test_a_cs_descriptor_no_longer_present_makes_the_next_vc_a_triple_fault():
    # The gate's CS (0x08) is not present: #GP(8), which has no gate: #DF, none: shutdown.
    result, records = _run(f"""
        cpuid
        cpuid
        mov rdi, {GDT + 8 + 5}
        and byte ptr [rdi], 0x7f
        cpuid
    """)
    assert isinstance(result.exit, Shutdown), result.trace.lines
    assert "triple fault delivering #29" in result.sim.why()
    assert len(records) == 2


def test_an_ist_stack_above_4_gib_takes_the_frame_where_its_tables_map_it():
    # Linear 4 GiB + x maps to physical 2 MiB + x (a new PDPT slot, one 2 MiB page):
    # the TLB must be asked about the whole address, not its low 32 bits (which the
    # identity map sends elsewhere).
    high_ist = (4 << 30) + IST1_TOP
    frame = high_ist - FRAME
    physical = (2 << 20) + IST1_TOP - FRAME
    result, records = _run(f"""
        mov rax, {SPARE_1 | C_BIT | PAGE_FLAGS}
        mov rdi, {PDPT + 4 * 8}
        mov [rdi], rax
        mov rax, {(2 << 20) | C_BIT | PAGE_FLAGS | 0x80}
        mov rdi, {SPARE_1}
        mov [rdi], rax
        mov rax, {high_ist}
        mov rdi, {IST_SLOT}
        mov [rdi], rax
        cpuid
        cpuid
        mov rsi, {physical}
        mov rax, [rsi + 8]
        mov rdi, {OUT}
        mov [rdi], rax
    """, {SPARE_1: bytes(0x1000)})
    assert isinstance(result.exit, SystemEvent), result.trace.lines
    assert [frame_at for _, _, frame_at, _ in records] == [frame, frame]
    assert _out(result) == records[1][3] + 2
