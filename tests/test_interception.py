"""Interception is exact however a sensitive instruction is reached.

The guest's #VC handler records the RIP and error code the hardware gave it into the
shared page and asks for termination; each test reaches a CPUID by another path and
checks that the #VC arrived in front of exactly that instruction.
"""

import struct

import pytest
from guests import guest, launch
from test_fidelity_kvm import table_without_rdtscp

from sevsim.arch.exits import SvmExit
from sevsim.guest.asm import assemble
from sevsim.guest.snippets import TERMINATE
from sevsim.hw.inspect import cpu_of
from sevsim.kvm.exits import Hlt, SystemEvent
from sevsim.testing import run_guest

RECORD = 0x7900  # in the shared GHCB page, beyond what the tests use of the GHCB
HANDLER = 0x30000
VC_RECORDER = assemble(f"""
    mov rsi, {RECORD}
    mov rax, [rsp + 8]          /* RIP of the interrupted instruction */
    mov [rsi], rax
    mov rax, [rsp]              /* the error code: the exit code */
    mov [rsi + 8], rax
""" + TERMINATE + "hlt", HANDLER)  # fmt: skip

TARGET = 0x31000  # nop; cpuid; hlt
CPUID_AT = TARGET + 1
BLOBS = {
    HANDLER: VC_RECORDER,
    TARGET: b"\x90\x0f\xa2\xf4",
    0x32FFE: b"\x90\x0f\xa2\xf4",  # CPUID at 0x32fff spans two pages
    0x35000: b"\x90\x90\xc3",  # nop; nop; ret: rewritten into CPUID after it ran
    0x37000: b"\xb8\x90\x0f\xa2\xf4\xc3",  # mov eax, 0xf4a20f90; ret: CPUID in the imm32
}

PATHS = {
    "fall-through": (f"mov rax, {TARGET}; jmp rax", CPUID_AT),
    "direct-jmp": (f"jmp {CPUID_AT}", CPUID_AT),
    "indirect-jmp": (f"mov rax, {CPUID_AT}; jmp rax", CPUID_AT),
    "direct-call": (f"call {CPUID_AT}", CPUID_AT),
    "indirect-call": (f"mov rax, {CPUID_AT}; call rax", CPUID_AT),
    "ret": (f"mov rax, {CPUID_AT}; push rax; ret", CPUID_AT),
    "iretq": (f"mov rax, rsp; push 0x10; push rax; pushfq; push 0x08; push {CPUID_AT}; iretq",
              CPUID_AT),
    "page-spanning": ("mov rax, 0x32ffe; jmp rax", 0x32FFF),
    "self-written": ("mov rdi, 0x34000; mov eax, 0xf4a20f; mov [rdi], eax; jmp rdi", 0x34000),
    "rewritten-after-running": ("mov rax, 0x35000; call rax; mov rdi, rax; "
                                "mov word ptr [rdi], 0xa20f; call rdi", 0x35000),
    # The MOV runs first (its block holds no CPUID), then a jump lands inside it.
    "into-an-immediate": ("mov rax, 0x37000; call rax; mov rax, 0x37002; jmp rax", 0x37002),
}  # fmt: skip


@pytest.mark.parametrize("path", PATHS)
def test_cpuid_raises_vc_in_front_of_the_instruction(path):
    source, expected_rip = PATHS[path]
    run = run_guest(source + "\nhlt", enable=["msr_protocol"], idt={29: HANDLER}, data=BLOBS)
    assert isinstance(run.exit, SystemEvent), run.trace.lines
    rip, code = struct.unpack("<QQ", run.vm.memory.read(RECORD, 16))
    assert (hex(rip), code) == (hex(expected_rip), SvmExit.CPUID)


@pytest.mark.parametrize(
    ("insn", "code"),
    [("cpuid", SvmExit.CPUID), ("in al, 0x80", SvmExit.IOIO), ("out dx, eax", SvmExit.IOIO),
     ("rep outsb", SvmExit.IOIO), ("insw", SvmExit.IOIO), ("rdpmc", SvmExit.RDPMC),
     ("rdtscp", SvmExit.RDTSCP), ("invd", SvmExit.INVD), ("wbinvd", SvmExit.WBINVD),
     ("monitor", SvmExit.MONITOR), ("mwait", SvmExit.MWAIT), ("vmmcall", SvmExit.VMMCALL),
     ("mov rax, dr7", SvmExit.READ_DR7), ("mov dr7, rax", SvmExit.WRITE_DR7),
     ("mov ecx, 0x1a0; rdmsr", SvmExit.MSR), ("mov ecx, 0x10; wrmsr", SvmExit.MSR),
     ("mov rax, 0xd0000000; mov eax, [rax]", SvmExit.NPF),
     # RDPRU, which capstone cannot decode, between two instructions of one block
     ("nop; .byte 0x0f, 0x01, 0xfd; nop", SvmExit.RDPRU)],
)  # fmt: skip
def test_every_nae_event_becomes_a_vc_with_its_exit_code(insn, code):
    # RDTSCP is intercepted only for a guest whose CPUID lacks it.
    vm_args = {"cpuid": table_without_rdtscp()} if insn == "rdtscp" else None
    run = run_guest(insn + "\nhlt", enable=["msr_protocol"], idt={29: HANDLER}, data=BLOBS,
                    vm_args=vm_args)  # fmt: skip
    assert isinstance(run.exit, SystemEvent), run.trace.lines
    assert struct.unpack("<Q", run.vm.memory.read(RECORD + 8, 8))[0] == code


@pytest.mark.parametrize(
    "insn",
    ["rdtsc", "mov rax, cr0", "mov ecx, 0xc0000080; rdmsr", "mov ecx, 0x277; rdmsr; wrmsr",
     "rdrand rax", "mov ecx, 0xc0000100; rdmsr", "rdtscp",
     "mov rax, 0x37000; call rax"],  # CPUID's bytes inside an immediate that only runs as one
)
def test_what_is_not_intercepted_runs_natively(insn):
    run = run_guest(insn + "\nhlt", enable=["msr_protocol"], idt={29: HANDLER}, data=BLOBS)
    assert run.trace.lines[-1].endswith("Hlt"), run.trace.lines


PF_RECORDER = assemble(f"""
    mov rsi, {RECORD}
    mov rax, cr2
    mov [rsi], rax
    mov rax, [rsp]              /* error code */
    mov [rsi + 8], rax
    mov rax, [rsp + 8]          /* RIP of the faulting instruction */
    mov [rsi + 16], rax
""" + TERMINATE, 0x36000)  # fmt: skip


@pytest.mark.parametrize(
    ("access", "address", "error_code"),
    [("mov eax, [rdi]", 0x1_0000_0123, 0x0), ("mov [rdi], eax", 0x1_0000_0FFE, 0x2),
     ("jmp rdi", 0x1_2345_6789, 0x10)],
)  # fmt: skip
def test_page_faults_carry_the_exact_address_and_error_code(access, address, error_code):
    source = f"mov rdi, {address}\nfault: {access}\nhlt"
    run = run_guest(source, enable=["msr_protocol"], idt={14: 0x36000},
                    data={**BLOBS, 0x36000: PF_RECORDER})  # fmt: skip
    assert isinstance(run.exit, SystemEvent), run.trace.lines
    cr2, code, rip = struct.unpack("<QQQ", run.vm.memory.read(RECORD, 24))
    assert (hex(cr2), code) == (hex(address), error_code)
    assert rip == (address if access.startswith("jmp") else 0x2000A)


@pytest.mark.parametrize(
    ("source", "info1"),
    [("mov eax, [rax]", 0x9), ("mov [rax], eax", 0xB), ("jmp rax", 0x19)],
    ids=["read", "write", "fetch"],
)
def test_mmio_npf_records_the_access_kind_like_a_reserved_bit_npt_fault(source, info1):
    """The #VC's exit information (kept in the VMSA, where only the hardware reads it):
    present | reserved (the MMIO SPTE), plus write or instruction fetch. The GPA is
    the page's: the model learns only the page from Unicorn's TLB fill (hardware
    reports the byte; no guest handler can read it, as it decodes the access itself)."""
    run = run_guest(f"mov rax, 0xd0000010; {source}\nhlt", enable=["msr_protocol"],
                    idt={29: HANDLER}, data=BLOBS)  # fmt: skip
    assert isinstance(run.exit, SystemEvent), run.trace.lines
    cpu = cpu_of(run.vm.vcpus[0].vmsa)  # white box: the CPU model's record
    assert cpu.guest_exit == (SvmExit.NPF, info1, 0xD000_0000)


#: Counts #VCs at RECORD and skips the 2-byte CPUID.
VC_SKIPPER = assemble(f"""
    push rsi
    mov rsi, {RECORD}
    inc qword ptr [rsi]
    pop rsi
    add qword ptr [rsp + 8], 2
    add rsp, 8
    iretq
""", HANDLER)  # fmt: skip
KEPT, REWRITTEN_BLOCK = 0x36000, 0x38FFE  # the second's CPUID is at 0x39000, a page on


def test_a_site_rewritten_away_loses_its_hook_on_whichever_page_of_its_block():
    """Hooks follow the sensitive instructions the guest really runs: a CPUID rewritten
    into NOPs loses its hook when Unicorn reports its block again, also when the block
    starts on the page before; the CPUID elsewhere keeps its hook and its #VC."""
    vm = launch(guest(f"""
        xor r15, r15
    again:                      /* twice, stopping at the same HLT each time */
        mov rax, {KEPT}; call rax
        mov rax, {REWRITTEN_BLOCK}; call rax
        hlt
        mov rdi, {REWRITTEN_BLOCK + 2}; mov word ptr [rdi], 0x9090
        inc r15
        cmp r15, 2
        jb again
        {TERMINATE}
    """, idt={29: HANDLER},
        data={HANDLER: VC_SKIPPER, KEPT: b"\x0f\xa2\xc3",
              REWRITTEN_BLOCK: b"\x90\x90\x0f\xa2\xc3"}))  # fmt: skip
    vcpu = vm.vcpus[0]
    assert isinstance(vcpu.run(timeout=30), Hlt)
    hooks = cpu_of(vcpu.vmsa).interceptor.hook_count
    assert isinstance(vcpu.run(timeout=30), Hlt)
    assert cpu_of(vcpu.vmsa).interceptor.hook_count == hooks - 1
    assert struct.unpack("<Q", vm.memory.read(RECORD, 8))[0] == 3  # KEPT twice, the other once
    assert isinstance(vcpu.run(timeout=30), SystemEvent)
