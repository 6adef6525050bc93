"""The fills the MMU keeps beside Unicorn's TLB (sevsim.hw.mmu) and the invalidations
they must see.

Unicorn's TLB is small and direct-mapped; the MMU keeps every fill since the last
flush, so a page evicted by pages that share its TLB set comes back with the
translation the TLB held, as from a bigger TLB. These guests rewrite a PTE without
invalidating it, evict the page by reading pages of the same set, and check what they
read; then they invalidate it (INVLPG, INVLPGA, INVPCID, a CR3 reload) and read again.
Each guest stores what it read into a shared page, plaintext to the test.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from guests import guest, launch, watched_kvm

from sevsim.arch.exits import SvmExit
from sevsim.arch.msr import CR0_WP
from sevsim.arch.vmcb import VMCB_CONTROL
from sevsim.guest.asm import assemble
from sevsim.guest.image import CODE, GHCB_GPA, PT
from sevsim.guest.snippets import TERMINATE
from sevsim.guest.vc_native import vc_image_args
from sevsim.hw import mmu as mmu_module
from sevsim.hw.mmu import Mmu
from sevsim.kvm.exits import SystemEvent
from sevsim.testing import GuestRun, SimLog, run_guest

#: A shared page for the results: the guest's reads, in order; its exception record
#: at OUT + 0x100.
OUT = 0x50000
RECORD = OUT + 0x100
SHARED = frozenset({GHCB_GPA, OUT})
#: The linear page the guests remap, and the two physical pages it maps to.
PAGE = 0x1FF000
OLD, NEW = 0x31000, 0x32000
OLD_VALUE, NEW_VALUE = 0x01D, 0x2E0
PRIVATE_PTE, SHARED_PTE = 1 << 51 | 0x3, 0x3  # present and writable, with or without C
#: Pages that share PAGE's set in a direct-mapped TLB of up to 256 entries (the same
#: index bits, 1 MiB apart: the image maps RAM, 16 MiB, with 2 MiB pages from 2 MiB
#: up), more of them than the TLB's victim entries.
EVICTORS = 14


def _evict(label: str = "evict") -> str:
    """Read the pages of PAGE's TLB set (``label``: a name of its own in the guest)."""
    return f"""
        mov rbx, {PAGE + 0x100000}
        mov ecx, {EVICTORS}
        {label}:
        mov rax, [rbx]
        add rbx, 0x100000
        loop {label}
    """


#: INVPCID RAX, [RDI], which Keystone does not know.
INVPCID = ".byte 0x66, 0x0f, 0x38, 0x82, 0x07"
INVPCID_SIZE = 5

#: Exception handlers: record (vector, RIP) at RECORD; #UD skips an INVPCID, #PF asks
#: for termination.
UD_HANDLER, PF_HANDLER = 0x30000, 0x30100


def _recorder(vector: int, error_code: bool) -> str:
    return f"""
        push rsi
        push rax
        mov rsi, {RECORD}
        mov qword ptr [rsi], {vector}
        mov rax, [rsp + {24 if error_code else 16}]
        mov [rsi + 8], rax
    """


HANDLERS = {
    UD_HANDLER: assemble(_recorder(6, False) + f"""
        add qword ptr [rsp + 16], {INVPCID_SIZE}
        pop rax
        pop rsi
        iretq
    """, UD_HANDLER),
    PF_HANDLER: assemble(_recorder(14, True) + TERMINATE, PF_HANDLER),
}  # fmt: skip
IDT = {6: UD_HANDLER, 14: PF_HANDLER}
DATA = {**HANDLERS, OLD: struct.pack("<Q", OLD_VALUE), NEW: struct.pack("<Q", NEW_VALUE)}


def _set_pte(pte: int, page: int = PAGE) -> str:
    return f"mov rax, {pte}; mov rdi, {PT + (page >> 12) * 8}; mov [rdi], rax"


def _read(slot: int, page: int = PAGE) -> str:
    """Read the first qword of ``page`` into the result ``slot``."""
    return f"mov rdi, {page}; mov rax, [rdi]; mov rdi, {OUT + 8 * slot}; mov [rdi], rax"


RELOAD_CR3 = "mov rax, cr3; mov cr3, rax"


def _remapped_without_invalidation(invalidate: str) -> str:
    """Four results: PAGE mapped to OLD; its PTE changed to NEW with no invalidation;
    PAGE evicted from the TLB; ``invalidate`` (RDI = PAGE) run."""
    return f"""
        {_set_pte(PRIVATE_PTE | OLD)}
        {RELOAD_CR3}
        {_read(0)}
        {_set_pte(PRIVATE_PTE | NEW)}
        {_read(1)}
        {_evict()}
        {_read(2)}
        mov rdi, {PAGE}
        {invalidate}
        {_read(3)}
    """


def _run(source: str, **image_args: Any) -> GuestRun:
    return run_guest(source + TERMINATE, enable=["msr_protocol"], shared=SHARED, idt=IDT,
                     data=DATA, **image_args)  # fmt: skip


def _results(run: GuestRun, count: int, at: int = OUT) -> tuple[int, ...]:
    assert isinstance(run.exit, SystemEvent), run.trace.lines
    return struct.unpack(f"<{count}Q", run.vm.memory.read(at, 8 * count))


def _exits(sim: SimLog) -> list[tuple[str, int]]:
    """Every #VC and #VMEXIT of a run, as the simulator saw them."""
    return [(name, fields["exit_code"]) for name, fields in sim.events]


#: What TERMINATE causes: one VMGEXIT, and nothing else does.
TERMINATE_ONLY = [("sim_exit", SvmExit.VMGEXIT)]


@pytest.fixture
def fills(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The linear page of every TLB fill of the CPUs the test creates."""
    pages: list[int] = []
    fill = Mmu.tlb_fill

    def counted(self: Mmu, uc: Any, vaddr: int, access: int, entry: Any, data: Any) -> bool:
        pages.append(vaddr)
        return fill(self, uc, vaddr, access, entry, data)

    monkeypatch.setattr(Mmu, "tlb_fill", counted)
    return pages


def test_an_evicted_page_comes_back_with_the_translation_the_tlb_held_until_invlpg(fills):
    """The PTE names NEW, but nothing invalidated PAGE: the refill after the eviction
    gives what the TLB held (OLD), as a TLB big enough to keep it would. INVLPG drops
    it, without an exit, and the next read walks to NEW."""
    run = _run(_remapped_without_invalidation("invlpg [rdi]"))
    assert _results(run, 4) == (OLD_VALUE, OLD_VALUE, OLD_VALUE, NEW_VALUE)
    assert fills.count(PAGE) == 3  # the first fill, after the eviction, after INVLPG
    assert _exits(run.sim) == TERMINATE_ONLY


def test_invlpg_never_exits():
    """A hundred INVLPGs, each followed by a read that fills again: no #VC, no exit."""
    run = _run(f"""
        {_set_pte(PRIVATE_PTE | OLD)}
        {RELOAD_CR3}
        xor r12, r12
        mov edx, 100
        again:
        mov rdi, {PAGE}
        invlpg [rdi]
        add r12, [rdi]
        dec edx
        jnz again
        mov rdi, {OUT}
        mov [rdi], r12
    """)
    assert _results(run, 1) == (100 * OLD_VALUE,)
    assert _exits(run.sim) == TERMINATE_ONLY


def test_invpcid_is_undefined_as_the_cpuid_says_and_invalidates_nothing():
    """Unicorn does not implement INVPCID: #UD, in front of it, with no exit. The TLB
    keeps the old translation through it."""
    run = _run(_remapped_without_invalidation(f"""
        xor eax, eax                   /* type 0: one address */
        lea rsi, [rip + invpcid]
        mov rbx, {RECORD + 16}
        mov [rbx], rsi
        invpcid:
        {INVPCID}
    """))
    assert _results(run, 4) == (OLD_VALUE,) * 4
    vector, rip, invpcid_at = _results(run, 3, RECORD)
    assert (vector, rip) == (6, invpcid_at)
    assert _exits(run.sim) == TERMINATE_ONLY


def test_the_guests_cpuid_has_no_invpcid():
    """What the #UD above agrees with: CPUID leaf 7 EBX bit 10, from KVM through the
    guest's #VC handler."""
    args = vc_image_args(data=DATA, idt=IDT)
    run = run_guest(f"""
        mov eax, 7
        xor ecx, ecx
        cpuid
        mov rdi, {OUT}
        mov [rdi], rbx
    """ + TERMINATE, enable=["msr_protocol"], shared=SHARED, **args)  # fmt: skip
    (ebx,) = _results(run, 1)
    assert ebx != 0  # the leaf is there (FSGSBASE, BMI1, SMEP)
    assert not ebx & 1 << 10


def test_invlpga_the_hypervisor_lets_run_drops_the_translation():
    """INVLPGA with its intercept cleared (a hypervisor's choice) runs natively, once
    the guest has EFER.SVME set (without it: #UD), and invalidates like INVLPG."""
    kvm, sim = watched_kvm()
    source = "mov ecx, 0xC0000080; rdmsr; or eax, 0x1000; wrmsr\n" + (
        _remapped_without_invalidation("mov rax, rdi; xor ecx, ecx; invlpga rax, ecx"))
    vm = launch(guest(source + TERMINATE, shared=SHARED, idt=IDT, data=DATA), kvm)
    vcpu = vm.vcpus[0]
    intercepts = bytearray(VMCB_CONTROL.get(vcpu.vmcb, "intercepts"))
    for bit in (122, 143):  # INVLPGA, and the EFER write trap (no handler here)
        intercepts[bit // 8] &= ~(1 << bit % 8)
    VMCB_CONTROL.set(vcpu.vmcb, "intercepts", bytes(intercepts))
    assert isinstance(vcpu.run(), SystemEvent)
    assert struct.unpack("<4Q", vm.memory.read(OUT, 32)) == (OLD_VALUE,) * 3 + (NEW_VALUE,)
    assert struct.unpack("<Q", vm.memory.read(RECORD, 8)) == (0,)  # no #UD
    assert _exits(sim) == TERMINATE_ONLY


def test_a_hot_page_evicted_over_and_over_reads_and_writes_its_own_page(fills):
    """Each round writes PAGE, evicts it, and adds what it reads back: every refill,
    for a read or a write, lands on the same physical page."""
    run = _run(f"""
        {_set_pte(PRIVATE_PTE | OLD)}
        {RELOAD_CR3}
        xor r12, r12
        mov r13, 1
        round:
        mov rdi, {PAGE}
        mov [rdi], r13
        {_evict("after_write")}
        mov rdi, {PAGE}
        add r12, [rdi]
        {_evict("after_read")}
        inc r13
        cmp r13, 20
        jbe round
        mov rdi, {OUT}
        mov [rdi], r12
        {_read(1, OLD)}
    """)
    assert _results(run, 2) == (sum(range(1, 21)), 20)
    assert fills.count(PAGE) >= 40  # evicted before each access


def test_a_page_read_through_a_shared_alias_in_between_reads_back_its_private_data():
    """PAGE (C=1) and the page below it (C=0) map the same page: reading through the
    alias shows the ciphertext and changes the page's view, which a refill of PAGE kept
    from before must not skip: PAGE reads its plaintext again."""
    alias = PAGE - 0x1000
    run = _run(f"""
        {_set_pte(PRIVATE_PTE | OLD)}
        {_set_pte(SHARED_PTE | OLD, alias)}
        {RELOAD_CR3}
        mov rdi, {PAGE}
        mov qword ptr [rdi], 0x5a5a
        {_read(0)}
        {_read(1, alias)}
        {_evict()}
        {_read(2)}
    """)
    private, through_alias, again = _results(run, 3)
    assert (private, again) == (0x5A5A, 0x5A5A)
    assert through_alias != 0x5A5A  # ciphertext


def test_a_pte_mapped_used_and_cleared_before_a_cr3_reload_is_gone_after_it():
    """The table page looks as it did at the first fill since the last flush, but a
    fill read it in between: the reload must still flush, and the cleared PTE faults."""
    run = _run(f"""
        {_set_pte(0)}
        {RELOAD_CR3}                   /* flushes; the next fetch notes the table page */
        {_set_pte(PRIVATE_PTE | NEW)}
        {_read(0)}
        {_set_pte(0)}
        {RELOAD_CR3}
        {_read(1)}
    """)
    assert _results(run, 2) == (NEW_VALUE, 0)  # the second read never completed
    vector, _ = _results(run, 2, RECORD)
    assert vector == 14


def _wp_toggles(rounds: int) -> str:
    """PAGE mapped read-only; ``rounds`` times: clear CR0.WP, write the round's number
    into PAGE (allowed at CPL 0), read it back into its result slot, set CR0.WP again;
    then one more write, which must fault."""
    return f"""
        {_set_pte(PRIVATE_PTE & ~0x2 | OLD)}
        {RELOAD_CR3}
        mov r12, 1
    again:
        mov rax, cr0
        and eax, {~CR0_WP & 0xFFFF_FFFF}
        mov cr0, rax
        mov rdi, {PAGE}
        mov [rdi], r12
        mov rax, [rdi]
        mov rdi, {OUT}
        mov [rdi + 8 * r12 - 8], rax
        mov rax, cr0
        or eax, {CR0_WP}
        mov cr0, rax
        inc r12
        cmp r12, {rounds}
        jbe again
        mov rdi, {PAGE}
    fault:
        mov [rdi], r12
    """


def test_cr0_wp_toggled_back_and_forth_keeps_each_modes_walks_and_their_faults(monkeypatch):
    """OVMF clears CR0.WP around each page-table write and sets it again. A write to
    a read-only page at CPL 0 goes through while WP is clear and faults once it is set,
    however often the two modes alternate; each mode's walks are remembered for it
    (no more walks for 8 rounds than for 2), never used in the other."""
    walks: list[int] = []
    walk = mmu_module.walk

    def counted(mode: Any, vaddr: int, *args: Any) -> Any:
        walks.append(vaddr)
        return walk(mode, vaddr, *args)

    monkeypatch.setattr(mmu_module, "walk", counted)
    counts = []
    for rounds in (2, 8):
        walks.clear()
        run = run_guest(_wp_toggles(rounds) + TERMINATE, enable=["msr_protocol", "crtraps"],
                        shared=SHARED, idt=IDT, data=DATA)  # fmt: skip
        assert _results(run, rounds) == tuple(range(1, rounds + 1))
        source = _wp_toggles(rounds)
        fault_at = CODE + len(assemble(source[: source.index("fault:")], CODE))
        assert _results(run, 2, RECORD) == (14, fault_at)
        counts.append(len(walks))
    assert counts[0] == counts[1]
