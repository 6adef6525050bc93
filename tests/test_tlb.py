"""The TLB the CPU model keeps across CR3 reloads (sevsim.hw.mmu).

A MOV to CR3 with the value it already holds keeps the translations whose page
tables are unchanged (OVMF reloads CR3 on every exception return, and a flush
costs a refill per page afterwards); these guests change their tables and reload
CR3, and must see the new translation, as after a flush on hardware.
"""

import struct

from sevsim.guest.asm import assemble
from sevsim.guest.snippets import TERMINATE
from sevsim.kvm.exits import SystemEvent
from sevsim.testing import run_guest

RECORD = 0x7900  # in the shared GHCB page
OLD, NEW = 0x31000, 0x32000
PTE = 0x8000000000003  # present, writable, C-bit 51
HANDLERS = {14: 0x30000}
PF_RECORDER = """
    mov rsi, 0x7900
    mov qword ptr [rsi + 16], 14
    mov rax, cr2
    mov [rsi + 24], rax
""" + TERMINATE


def run(body: str):
    data = {OLD: struct.pack("<Q", 0x01D), NEW: struct.pack("<Q", 0x2E0),
            0x30000: assemble(PF_RECORDER, 0x30000)}  # fmt: skip
    result = run_guest(body + TERMINATE, enable=["msr_protocol"], idt=HANDLERS, data=data)
    assert isinstance(result.exit, SystemEvent), result.trace.lines
    return struct.unpack("<QQQQ", result.vm.memory.read(RECORD, 32))


def test_a_pte_changed_before_a_cr3_reload_gives_the_new_page():
    first, second, _, _ = run(f"""
        mov rax, {PTE | OLD}
        mov rsi, 0x4ff8                /* PT slot 0x1ff: virtual 0x1ff000 */
        mov [rsi], rax
        mov rax, cr3
        mov cr3, rax
        mov rdi, 0x1ff000
        mov rbx, [rdi]
        mov rdx, 0x7900
        mov [rdx], rbx
        mov rax, {PTE | NEW}
        mov [rsi], rax
        mov rax, cr3
        mov cr3, rax                   /* same value: the TLB must not keep OLD */
        mov rbx, [rdi]
        mov [rdx + 8], rbx
    """)
    assert (first, second) == (0x01D, 0x2E0)


def test_a_cleared_pte_before_a_cr3_reload_faults():
    _, _, vector, cr2 = run(f"""
        mov rax, {PTE | OLD}
        mov rsi, 0x4ff8
        mov [rsi], rax
        mov rax, cr3
        mov cr3, rax
        mov rdi, 0x1ff008
        mov rbx, [rdi]
        mov qword ptr [rsi], 0
        mov rax, cr3
        mov cr3, rax
        mov rbx, [rdi]
    """)
    assert (vector, cr2) == (14, 0x1FF008)


def test_unchanged_tables_keep_working_across_many_reloads():
    first, second, _, _ = run(f"""
        mov rax, {PTE | OLD}
        mov rsi, 0x4ff8
        mov [rsi], rax
        mov rax, cr3
        mov cr3, rax
        mov rdi, 0x1ff000
        mov ecx, 1000
    again:
        mov rax, cr3
        mov cr3, rax
        add rbx, [rdi]
        loop again
        mov rdx, 0x7900
        mov [rdx], rbx
        mov rbx, [rdi]
        mov [rdx + 8], rbx
    """)
    assert (first, second) == (1000 * 0x01D, 0x01D)
