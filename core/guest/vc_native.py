"""A native #VC handler in x86-64 assembly: guest code that speaks the GHCB protocol.

This is the guest side of every NAE event, written the way guest firmware writes it
(no Python runs in the guest): the hardware delivers #VC (vector 29) through the IDT
with the SVM exit code as error code and RIP at the faulting instruction; the handler
decodes the instruction, fills the GHCB, writes the GHCB GPA to the GHCB MSR,
executes VMGEXIT, checks the reply, writes the results back into the interrupted
registers, moves RIP past the instruction and returns with IRETQ. It follows Linux's
``vc_handle_exitcode`` and friends (``arch/x86/coco/sev``), with the exceptions noted
below. sevsim's modeled handler (Python, capstone) does the same job from outside the
guest; this one is what a test or the demo runs when it wants guest code doing it,
instruction by instruction, with every step visible in the trace.

Use::

    code, entry = build_vc_handler()            # at VC_HANDLER_ADDRESS (0x40000)
    image = GuestImage(main_code, idt={29: entry}, data={VC_HANDLER_ADDRESS: code},
                       ist_vectors=frozenset({29}))
    # or: GuestImage(main_code, **vc_image_args())

Layout (position-dependent: assembled for one address, ``HANDLER_SIZE`` bytes)
==============================================================================

=====================  =========================================================
``address``            code, entry point first (at most ``CODE_LIMIT``, 8 KiB)
``address + 0x2000``   private state page (``STATE_OFFSET``), see ``STATE_*``:
                       +0x00 #VCs taken, +0x08 last exit code, +0x10 last RIP,
                       +0x18 DR7 as the guest last wrote it (reset 0x400),
                       +0x20/+0x28 sw_exit_info_1/2 of a failed VMGEXIT,
                       +0x30 1 while a #VC is being handled (``STATE_IN_VC``)
=====================  =========================================================

The state lives on its own page because a write to a page the CPU model has scanned
for code makes it rescan that page. Everything else lives on the stack the #VC runs
on (IST1 if the gate says so, else the interrupted stack): 0x100 bytes below the
interrupt frame, the 16 GPRs indexed by their x86 register number (slot 4 holds the
interrupted RSP, so ``[rsp + ...]`` operands decode like any other base) and the
decoder's locals. Nothing in the handler itself raises a #VC when the guest is sane
(the GHCB MSR and the FS/GS base MSRs are not intercepted; CR4 and XCR0 reads run
natively), but its reads of the instruction and of string IO buffers do when those
lie in MMIO (a jump into an MMIO region, ``rep outsb`` from one), and an exception the
hypervisor injects right after its VMGEXIT runs the guest's own handler inside it.
Such a nested #VC cannot be handled: on IST1 its frame overwrites the outer #VC's
(the stack is not shifted as Linux shifts it), and on any stack it would reuse the
one GHCB page while the outer #VC still owns it (Linux has a backup GHCB for one
level of nesting and gives up on the next). So the handler keeps an "in #VC" flag
(``STATE_IN_VC``), set on entry and cleared just before it IRETQs or jumps to a
forwarded exception's handler, and a #VC that finds it set terminates the guest
with ``NESTED_VC`` instead of looping or corrupting the outer one. The flag lives
in the one state page: one vCPU, as for the GHCB.

Supported (64-bit code only; prefixes 66, 67, F2/F3, REX, FS/GS, and the ignored
null segment overrides and LOCK)
=================================================================================

- CPUID (0x72): RAX, RCX and XCR0 (XGETBV if CR4.OSXSAVE, else 1) -> EAX..EDX.
- IOIO (0x7b): IN/OUT with imm8 and DX ports, sizes 1/2/4; IN into AL/AX keeps the
  upper bits of RAX and IN into EAX zero-extends, as the hardware does. INS/OUTS with
  and without REP (F3 or F2), address size 64 or 32 (67), DF honoured, FS/GS source
  override for OUTS: at most one shared buffer (2032 bytes) per VMGEXIT, through the
  scratch area at GHCB+0x800 with the element count in exit_info_2; a longer REP
  leaves RIP in place with RCX/RSI/RDI advanced, so the instruction runs again (as
  Linux's ES_RETRY).
- MSR (0x7c): RDMSR (exit_info_1 0, RCX -> EDX:EAX) and WRMSR (1, RCX, RAX, RDX).
- RDPMC (0x6f), RDTSCP (0x87), WBINVD (0x89), INVD (0x76), MONITOR (0x8a),
  MWAIT (0x8b): the GHCB call with the registers KVM requires.
- VMMCALL (0x81): RAX, RBX, RCX, RDX, RSI and the CPL of the interrupted code -> RAX.
- DR7: a write is sent (WRITE_DR7, RAX) and remembered, as Linux does: reserved bits
  cleared and bit 10 set, #GP if the upper half is not zero; a read returns the
  remembered value without an exit (the hypervisor cannot know the real one).
- MMIO (NPF, 0x400) for ``mov r/m, reg`` (88, 89), ``mov reg, r/m`` (8A, 8B),
  ``mov r/m, imm`` (C6, C7: imm8/16/32, sign-extended for REX.W), ``movzx``/``movsx``
  byte/word loads (0F B6/B7/BE/BF) and the ``moffs`` forms (A0-A3): ModRM with SIB,
  disp8/disp32, RIP-relative, any base and index incl. RSP/R12/R13, 32-bit address
  size, FS/GS bases. AH/CH/DH/BH are honoured for byte registers without REX.
  The guest-physical address comes from a walk of the guest's own 4-level page tables
  (1 GiB/2 MiB/4 KiB pages, C-bit and flags masked off), which must be identity
  mapped; exit MMIO_READ 0x80000001 / MMIO_WRITE 0x80000002 with exit_info_1 = GPA,
  exit_info_2 = length and sw_scratch = the GHCB shared buffer.

Replies: sw_exit_info_1[31:0] = 0 is success (and the valid bits of the registers
the handler reads back are checked, as Linux does); 1 with a valid exception event in
sw_exit_info_2 is delivered as the hardware would deliver it from the faulting
instruction: the handler reads the guest's IDT gate, builds the frame (RIP = the
instruction, error code from the event or 0 for vectors that push one) on the
interrupted stack, or on the gate's IST or the TSS RSP0 stack, and jumps to the
guest's handler (which returns to the faulting instruction with IRETQ, or skips it);
anything else is a VMM error.

Unsupported: an exit code it does not handle, an instruction it cannot decode (MMIO
through MOVS, XCHG, arithmetic on memory, a register operand, ...), a VMM error, an
exception it may not forward (NMI, #DF, #MC, #VC, a vector above 31, or an absent
gate), an MMIO address the page walk cannot translate, or a #VC taken inside the
handler (an instruction fetched from MMIO among them). Each ends the guest the way
Linux's ``sev_es_terminate`` does: the GHCB MSR protocol TERM_REQ with reason set
``TERM_REASON_SET`` (2, sevsim's own) and the code from
:class:`~sevsim.arch.ghcb_msr.TermReason`, then a HLT loop in case the hypervisor
resumes it.

Not done: 16/32-bit code (compatibility mode) and real mode, MMIO string moves, an
MMIO access that crosses a page, more than one vCPU sharing the one GHCB, NMI_COMPLETE.
"""

from __future__ import annotations

import functools
from typing import Any

from sevsim.arch.exits import SvmExit, VmgExit
from sevsim.arch.ghcb import GHCB, GHCB_SAVE_AREA, SHARED_BUFFER_END, SHARED_BUFFER_START
from sevsim.arch.ghcb import valid_bit as _valid_bit
from sevsim.arch.ghcb_msr import TERM_REASON_SET, TermReason, term_req
from sevsim.arch.msr import MSR_AMD64_SEV_ES_GHCB, MSR_FS_BASE, MSR_GS_BASE
from sevsim.arch.vectors import Vector
from sevsim.arch.vmcb import EventInj
from sevsim.guest.asm import AssemblyError, assemble
from sevsim.guest.image import GHCB_GPA, IMAGE_END

#: Where the tests and the demo put the handler: inside the first 2 MiB, past the code.
VC_HANDLER_ADDRESS = 0x40000
#: The code must fit below the state page.
CODE_LIMIT = 0x2000
#: The private state page, relative to the handler's address.
STATE_OFFSET = 0x2000
#: Bytes the handler occupies (code, padding, state page).
HANDLER_SIZE = STATE_OFFSET + 0x1000

STATE_VC_COUNT = 0x00
STATE_LAST_EXIT_CODE = 0x08
STATE_LAST_RIP = 0x10
STATE_DR7 = 0x18
STATE_FAILED_INFO1 = 0x20
STATE_FAILED_INFO2 = 0x28
#: Non-zero while the handler is handling a #VC: a #VC that finds it set is nested.
STATE_IN_VC = 0x30
DR7_RESET = 0x400

#: GHCB protocol version written in each request (KVM does not read it).
PROTOCOL_VERSION = 1

VC_VECTOR = Vector.VC
#: Exceptions that push an error code (#DF #TS #NP #SS #GP #PF #AC #CP #VC #SX).
_ERROR_CODE_VECTORS = (8, 10, 11, 12, 13, 14, 17, 21, 29, 30)
#: Exceptions the handler refuses to forward: NMI, #DF, #MC, #VC.
_NOT_FORWARDED = (2, 8, 18, 29)


def term_request(reason: TermReason) -> int:
    """The GHCB MSR value of the handler's TERM_REQ (what a SEV_TERM exit carries)."""
    return term_req(TERM_REASON_SET, reason)


# -- the source -------------------------------------------------------------------

# Save area (offsets from RBP = RSP after the prologue) and the hardware frame above it.
_LOCALS = {
    "L_RIP": 0x80,  # address of the faulting instruction
    "L_REG": 0x88,  # ModRM reg field (with REX.R)
    "L_EA": 0x90,  # effective address
    "L_RIPREL": 0x98,  # 1 if the operand is RIP-relative
    "L_SIZE": 0xA0,  # memory access / IO element size
    "L_DSIZE": 0xA8,  # destination register size of an MMIO read
    "L_EXT": 0xB0,  # MMIO read: 0 plain, 1 zero-extend, 2 sign-extend
    "L_WRITE": 0xB8,  # MMIO: 0 read, 1 write a register, 2 write an immediate
    "L_IMM": 0xC0,  # the immediate of C6/C7
    "L_TMP": 0xC8,  # 10 bytes for SIDT/SGDT
    "L_NEWSP": 0xD8,  # exception forwarding: the stack pointer to RET from
    "L_CHUNK": 0xE0,  # string IO: elements in this VMGEXIT
    "L_STEP": 0xE8,  # string IO: +size or -size (DF)
    "L_DR7": 0xF0,  # DR7 write: the value to remember once the hypervisor took it
}
_FRAME = 0x100  # error code; then RIP, CS, RFLAGS, RSP, SS
F_ERR, F_RIP, F_CS, F_RFLAGS, F_RSP, F_SS = (_FRAME + 8 * i for i in range(6))

# Prefix flags kept in R13 while decoding.
F_OPSIZE, F_ADDR32, F_REP, F_FS, F_GS = 1, 2, 4, 8, 16

_GPRS = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
         *(f"r{i}" for i in range(8, 16)))  # fmt: skip


def _off(name: str) -> int:
    return GHCB_SAVE_AREA.offset(name)


def _bit(name: str) -> tuple[int, int]:
    """(byte offset in the GHCB, mask) of a save-area field's valid bit."""
    bit = _valid_bit(name)
    return GHCB_SAVE_AREA.offset("valid_bitmap") + bit // 8, 1 << (bit % 8)


def _set(name: str, reg: str | None = None) -> str:
    """Store ``reg`` (if given) in the GHCB field ``name`` and mark it valid."""
    byte, mask = _bit(name)
    store = f"mov [rdi + {_off(name):#x}], {reg}\n    " if reg else ""
    return f"{store}or byte ptr [rdi + {byte:#x}], {mask:#x}"


def _require(*names: str) -> str:
    """Jump to the VMM-error exit unless every named result came back valid."""
    lines = []
    for name in names:
        byte, mask = _bit(name)
        lines.append(f"test byte ptr [rdi + {byte:#x}], {mask:#x}\n    jz vc_vmm_error")
    return "\n    ".join(lines)


def _restore(base: str, skip: tuple[str, ...] = ("rsp",)) -> str:
    """Reload the saved GPRs from ``[base + slot]``, ``base`` itself last."""
    regs = [r for r in _GPRS if r not in skip and r != base]
    if base not in skip:
        regs.append(base)
    return "\n    ".join(f"mov {r}, [{base} + {8 * _GPRS.index(r):#x}]" for r in regs)


def handler_source(
    address: int = VC_HANDLER_ADDRESS,
    *,
    ghcb: int = GHCB_GPA,
    ghcb_gpa: int | None = None,
    cbit: int = 51,
    protocol_version: int = PROTOCOL_VERSION,
) -> str:
    """The assembly source of the handler for these addresses (keystone syntax)."""
    ghcb_gpa = ghcb if ghcb_gpa is None else ghcb_gpa
    state = address + STATE_OFFSET
    scratch_gpa = ghcb_gpa + SHARED_BUFFER_START
    buf = SHARED_BUFFER_START
    buf_len = SHARED_BUFFER_END - SHARED_BUFFER_START
    addr_mask = ((1 << 52) - 1) & ~0xFFF & ~(1 << cbit)
    err_vectors = sum(1 << v for v in _ERROR_CODE_VECTORS)
    not_forwarded = sum(1 << v for v in _NOT_FORWARDED)
    usage, version = GHCB.offset("ghcb_usage"), GHCB.offset("protocol_version")
    bitmap = GHCB_SAVE_AREA.offset("valid_bitmap")
    L = _LOCALS
    term = 0x100 | TERM_REASON_SET << 12
    save = "\n    ".join(f"mov [rsp + {8 * i:#x}], {r}" for i, r in enumerate(_GPRS) if r != "rsp")
    return f"""
/* ---- entry: save the interrupted GPRs below the frame ---- */
vc_entry:
    sub rsp, {_FRAME:#x}
    {save}
    mov rbp, rsp
    mov rax, [rbp + {F_RSP:#x}]
    mov [rbp + 0x20], rax
    cld
    mov r15, {state:#x}
    inc qword ptr [r15 + {STATE_VC_COUNT:#x}]
    mov rax, [rbp + {F_RIP:#x}]
    mov [rbp + {L["L_RIP"]:#x}], rax
    mov [r15 + {STATE_LAST_RIP:#x}], rax
    mov rax, [rbp + {F_ERR:#x}]
    mov [r15 + {STATE_LAST_EXIT_CODE:#x}], rax
    cmp qword ptr [r15 + {STATE_IN_VC:#x}], 0
    jne vc_nested
    mov qword ptr [r15 + {STATE_IN_VC:#x}], 1
    mov rdi, {ghcb:#x}
    call vc_prefixes
    mov rax, [rbp + {F_ERR:#x}]
    cmp rax, {SvmExit.IOIO:#x}
    je vc_ioio
    cmp rax, {SvmExit.NPF:#x}
    je vc_mmio
    cmp rax, {SvmExit.CPUID:#x}
    je vc_cpuid
    cmp rax, {SvmExit.MSR:#x}
    je vc_msr
    cmp rax, {SvmExit.VMMCALL:#x}
    je vc_vmmcall
    cmp rax, {SvmExit.RDPMC:#x}
    je vc_rdpmc
    cmp rax, {SvmExit.RDTSCP:#x}
    je vc_rdtscp
    cmp rax, {SvmExit.WBINVD:#x}
    je vc_wbinvd
    cmp rax, {SvmExit.INVD:#x}
    je vc_invd
    cmp rax, {SvmExit.MONITOR:#x}
    je vc_monitor
    cmp rax, {SvmExit.MWAIT:#x}
    je vc_mwait
    cmp rax, {SvmExit.READ_DR7:#x}
    je vc_dr7_read
    cmp rax, {SvmExit.WRITE_DR7:#x}
    je vc_dr7_write
    mov eax, {TermReason.UNSUPPORTED_EXIT}
    jmp vc_terminate

/* ---- leaving: RIP = R12 (past the instruction), or unchanged (vc_resume) ---- */
vc_done:
    mov [rbp + {F_RIP:#x}], r12
vc_resume:
    mov rax, [rbp + 0x20]
    mov [rbp + {F_RSP:#x}], rax
    mov rax, {state:#x}
    mov qword ptr [rax + {STATE_IN_VC:#x}], 0
    {_restore("rsp")}
    add rsp, {_FRAME + 8:#x}
    iretq

/* ---- prefixes: R12 -> opcode, R13 = F_* flags, R14 = REX (0 if none) ---- */
vc_prefixes:
    mov r12, [rbp + {L["L_RIP"]:#x}]
    xor r13d, r13d
    xor r14d, r14d
    mov ecx, 14
vc_pfx_loop:
    movzx eax, byte ptr [r12]
    mov edx, eax
    and edx, 0xf0
    cmp edx, 0x40
    je vc_pfx_rex
    cmp eax, 0x66
    je vc_pfx_opsize
    cmp eax, 0x67
    je vc_pfx_addr32
    cmp eax, 0xf3
    je vc_pfx_rep
    cmp eax, 0xf2
    je vc_pfx_rep
    cmp eax, 0x64
    je vc_pfx_fs
    cmp eax, 0x65
    je vc_pfx_gs
    cmp eax, 0xf0
    je vc_pfx_next
    cmp eax, 0x2e
    je vc_pfx_next
    cmp eax, 0x36
    je vc_pfx_next
    cmp eax, 0x3e
    je vc_pfx_next
    cmp eax, 0x26
    je vc_pfx_next
    ret
vc_pfx_opsize:
    or r13d, {F_OPSIZE}
    jmp vc_pfx_next
vc_pfx_addr32:
    or r13d, {F_ADDR32}
    jmp vc_pfx_next
vc_pfx_rep:
    or r13d, {F_REP}
    jmp vc_pfx_next
vc_pfx_fs:
    and r13d, {~(F_FS | F_GS) & 0xFF}
    or r13d, {F_FS}
    jmp vc_pfx_next
vc_pfx_gs:
    and r13d, {~(F_FS | F_GS) & 0xFF}
    or r13d, {F_GS}
vc_pfx_next:
    xor r14d, r14d
    jmp vc_pfx_advance
vc_pfx_rex:
    mov r14d, eax
vc_pfx_advance:
    inc r12
    dec ecx
    jnz vc_pfx_loop
    jmp vc_bad_insn

/* ---- GHCB helpers ---- */
vc_ghcb_reset:
    xor eax, eax
    mov [rdi + {bitmap:#x}], rax
    mov [rdi + {bitmap + 8:#x}], rax
    mov dword ptr [rdi + {usage:#x}], eax
    mov word ptr [rdi + {version:#x}], {protocol_version}
    ret

/* R8 = exit code, R9 = exit_info_1, R10 = exit_info_2; returns only on success */
vc_hv_call:
    mov [rdi + {_off("sw_exit_code"):#x}], r8
    mov [rdi + {_off("sw_exit_info_1"):#x}], r9
    mov [rdi + {_off("sw_exit_info_2"):#x}], r10
    {_set("sw_exit_code")}
    {_set("sw_exit_info_1")}
    {_set("sw_exit_info_2")}
    mov ecx, {MSR_AMD64_SEV_ES_GHCB:#x}
    mov eax, {ghcb_gpa & 0xFFFF_FFFF:#x}
    mov edx, {ghcb_gpa >> 32:#x}
    wrmsr
    rep vmmcall
    mov eax, dword ptr [rdi + {_off("sw_exit_info_1"):#x}]
    test eax, eax
    jnz vc_hv_failed
    ret
vc_hv_failed:
    mov rax, [rdi + {_off("sw_exit_info_1"):#x}]
    mov [r15 + {STATE_FAILED_INFO1:#x}], rax
    mov rdx, [rdi + {_off("sw_exit_info_2"):#x}]
    mov [r15 + {STATE_FAILED_INFO2:#x}], rdx
    cmp eax, 1
    je vc_forward_exception
    jmp vc_vmm_error

/* ---- termination (TERM_REQ through the GHCB MSR protocol) ---- */
vc_bad_insn:
    mov eax, {TermReason.UNSUPPORTED_INSN}
    jmp vc_terminate
vc_vmm_error:
    mov eax, {TermReason.VMM_ERROR}
    jmp vc_terminate
vc_bad_exception:
    mov eax, {TermReason.BAD_EXCEPTION}
    jmp vc_terminate
vc_walk_failed:
    mov eax, {TermReason.PAGE_WALK}
    jmp vc_terminate
vc_nested:
    mov eax, {TermReason.NESTED_VC}
vc_terminate:
    shl eax, 16
    or eax, {term:#x}
    xor edx, edx
    mov ecx, {MSR_AMD64_SEV_ES_GHCB:#x}
    wrmsr
    rep vmmcall
vc_hang:
    hlt
    jmp vc_hang

/* ---- exception forwarding: deliver the event in RDX as the hardware would ---- */
vc_forward_exception:
    mov rbx, rdx
    bt edx, 31
    jnc vc_vmm_error
    mov ecx, edx
    shr ecx, 8
    and ecx, 7
    cmp ecx, 3
    jne vc_vmm_error
    movzx esi, dl
    cmp esi, 32
    jae vc_bad_exception
    mov eax, {not_forwarded:#x}
    bt eax, esi
    jc vc_bad_exception
    sidt [rbp + {L["L_TMP"]:#x}]
    movzx eax, word ptr [rbp + {L["L_TMP"]:#x}]
    mov ecx, esi
    shl ecx, 4
    add ecx, 15
    cmp ecx, eax
    ja vc_bad_exception
    sub ecx, 15
    mov rdx, [rbp + {L["L_TMP"] + 2:#x}]
    add rdx, rcx
    movzx r8d, byte ptr [rdx + 5]
    test r8d, 0x80
    jz vc_bad_exception
    movzx r9d, word ptr [rdx]
    movzx eax, word ptr [rdx + 6]
    shl rax, 16
    or r9, rax
    mov eax, dword ptr [rdx + 8]
    shl rax, 32
    or r9, rax
    movzx r11d, byte ptr [rdx + 4]
    and r11d, 7
    mov r10, [rbp + 0x20]
    test r11d, r11d
    jnz vc_fwd_ist
    test byte ptr [rbp + {F_CS:#x}], 3
    jz vc_fwd_stack
    mov ecx, 4
    jmp vc_fwd_tss
vc_fwd_ist:
    lea ecx, [r11 * 8 + 0x1c]
vc_fwd_tss:
    str ax
    movzx eax, ax
    and eax, 0xfff8
    sgdt [rbp + {L["L_TMP"]:#x}]
    mov rdx, [rbp + {L["L_TMP"] + 2:#x}]
    add rdx, rax
    movzx eax, word ptr [rdx + 2]
    movzx r11d, byte ptr [rdx + 4]
    shl r11d, 16
    or eax, r11d
    movzx r11d, byte ptr [rdx + 7]
    shl r11d, 24
    or eax, r11d
    mov r11d, dword ptr [rdx + 8]
    shl r11, 32
    or rax, r11
    mov r10, [rax + rcx]
vc_fwd_stack:
    and r10, -16
    mov rax, [rbp + {F_RIP:#x}]
    mov rcx, [rbp + {F_CS:#x}]
    mov rdx, [rbp + {F_RFLAGS:#x}]
    mov r11, [rbp + 0x20]
    mov r12, [rbp + {F_SS:#x}]
    mov [r10 - 8], r12
    mov [r10 - 16], r11
    mov [r10 - 24], rdx
    mov [r10 - 32], rcx
    mov [r10 - 40], rax
    sub r10, 40
    mov eax, {err_vectors:#x}
    bt eax, esi
    jnc vc_fwd_no_error
    xor eax, eax
    bt ebx, 11
    jnc vc_fwd_error_code
    mov rax, rbx
    shr rax, 32
vc_fwd_error_code:
    sub r10, 8
    mov [r10], rax
vc_fwd_no_error:
    mov [r10 - 8], r9
    sub r10, 8
    mov [rbp + {L["L_NEWSP"]:#x}], r10
    mov rax, {state:#x}
    mov qword ptr [rax + {STATE_IN_VC:#x}], 0
    and r8d, 0xf
    cmp r8d, 0xf
    jne vc_fwd_go
    bt edx, 9
    jc vc_fwd_go_sti
vc_fwd_go:
    {_restore("rbp", skip=("rsp", "rbp"))}
    mov rsp, [rbp + {L["L_NEWSP"]:#x}]
    mov rbp, [rbp + 0x28]
    ret
vc_fwd_go_sti:
    {_restore("rbp", skip=("rsp", "rbp"))}
    mov rsp, [rbp + {L["L_NEWSP"]:#x}]
    mov rbp, [rbp + 0x28]
    sti
    ret

/* ---- CPUID ---- */
vc_cpuid:
    cmp word ptr [r12], 0xa20f
    jne vc_bad_insn
    add r12, 2
    call vc_ghcb_reset
    mov rax, [rbp]
    {_set("rax", "rax")}
    mov rax, [rbp + 0x8]
    {_set("rcx", "rax")}
    mov ebx, 1
    mov rax, cr4
    bt rax, 18
    jnc vc_cpuid_xcr0
    xor ecx, ecx
    xgetbv
    shl rdx, 32
    or rax, rdx
    mov rbx, rax
vc_cpuid_xcr0:
    {_set("xcr0", "rbx")}
    mov r8d, {SvmExit.CPUID:#x}
    xor r9d, r9d
    xor r10d, r10d
    call vc_hv_call
    {_require("rax", "rbx", "rcx", "rdx")}
    mov eax, dword ptr [rdi + {_off("rax"):#x}]
    mov [rbp], rax
    mov eax, dword ptr [rdi + {_off("rcx"):#x}]
    mov [rbp + 0x8], rax
    mov eax, dword ptr [rdi + {_off("rdx"):#x}]
    mov [rbp + 0x10], rax
    mov eax, dword ptr [rdi + {_off("rbx"):#x}]
    mov [rbp + 0x18], rax
    jmp vc_done

/* ---- RDMSR / WRMSR ---- */
vc_msr:
    xor r9d, r9d
    cmp word ptr [r12], 0x320f
    je vc_msr_go
    mov r9d, 1
    cmp word ptr [r12], 0x300f
    jne vc_bad_insn
vc_msr_go:
    add r12, 2
    call vc_ghcb_reset
    mov rax, [rbp + 0x8]
    {_set("rcx", "rax")}
    test r9d, r9d
    jz vc_msr_call
    mov rax, [rbp]
    {_set("rax", "rax")}
    mov rax, [rbp + 0x10]
    {_set("rdx", "rax")}
vc_msr_call:
    mov r8d, {SvmExit.MSR:#x}
    xor r10d, r10d
    call vc_hv_call
    test r9d, r9d
    jnz vc_done
vc_edx_eax:
    {_require("rax", "rdx")}
    mov eax, dword ptr [rdi + {_off("rax"):#x}]
    mov [rbp], rax
    mov eax, dword ptr [rdi + {_off("rdx"):#x}]
    mov [rbp + 0x10], rax
    jmp vc_done

/* ---- RDPMC / RDTSCP ---- */
vc_rdpmc:
    cmp word ptr [r12], 0x330f
    jne vc_bad_insn
    add r12, 2
    call vc_ghcb_reset
    mov rax, [rbp + 0x8]
    {_set("rcx", "rax")}
    mov r8d, {SvmExit.RDPMC:#x}
    xor r9d, r9d
    xor r10d, r10d
    call vc_hv_call
    jmp vc_edx_eax

vc_rdtscp:
    cmp word ptr [r12], 0x010f
    jne vc_bad_insn
    cmp byte ptr [r12 + 2], 0xf9
    jne vc_bad_insn
    add r12, 3
    call vc_ghcb_reset
    mov r8d, {SvmExit.RDTSCP:#x}
    xor r9d, r9d
    xor r10d, r10d
    call vc_hv_call
    {_require("rcx")}
    mov eax, dword ptr [rdi + {_off("rcx"):#x}]
    mov [rbp + 0x8], rax
    jmp vc_edx_eax

/* ---- WBINVD / INVD: nothing to pass ---- */
vc_wbinvd:
    mov r8d, {SvmExit.WBINVD:#x}
    cmp word ptr [r12], 0x090f
    je vc_no_operands
    jmp vc_bad_insn
vc_invd:
    mov r8d, {SvmExit.INVD:#x}
    cmp word ptr [r12], 0x080f
    jne vc_bad_insn
vc_no_operands:
    add r12, 2
    call vc_ghcb_reset
    xor r9d, r9d
    xor r10d, r10d
    call vc_hv_call
    jmp vc_done

/* ---- MONITOR (RAX, RCX, RDX) / MWAIT (RAX, RCX) ---- */
vc_monitor:
    cmp word ptr [r12], 0x010f
    jne vc_bad_insn
    cmp byte ptr [r12 + 2], 0xc8
    jne vc_bad_insn
    add r12, 3
    call vc_ghcb_reset
    mov rax, [rbp + 0x10]
    {_set("rdx", "rax")}
    mov r8d, {SvmExit.MONITOR:#x}
    jmp vc_rax_rcx_call
vc_mwait:
    cmp word ptr [r12], 0x010f
    jne vc_bad_insn
    cmp byte ptr [r12 + 2], 0xc9
    jne vc_bad_insn
    add r12, 3
    call vc_ghcb_reset
    mov r8d, {SvmExit.MWAIT:#x}
vc_rax_rcx_call:
    mov rax, [rbp]
    {_set("rax", "rax")}
    mov rax, [rbp + 0x8]
    {_set("rcx", "rax")}
    xor r9d, r9d
    xor r10d, r10d
    call vc_hv_call
    jmp vc_done

/* ---- VMMCALL: number in RAX, arguments RBX RCX RDX RSI, CPL; result RAX ---- */
vc_vmmcall:
    cmp word ptr [r12], 0x010f
    jne vc_bad_insn
    cmp byte ptr [r12 + 2], 0xd9
    jne vc_bad_insn
    add r12, 3
    call vc_ghcb_reset
    mov rax, [rbp]
    {_set("rax", "rax")}
    mov rax, [rbp + 0x18]
    {_set("rbx", "rax")}
    mov rax, [rbp + 0x8]
    {_set("rcx", "rax")}
    mov rax, [rbp + 0x10]
    {_set("rdx", "rax")}
    mov rax, [rbp + 0x30]
    {_set("rsi", "rax")}
    mov al, byte ptr [rbp + {F_CS:#x}]
    and al, 3
    mov byte ptr [rdi + {_off("cpl"):#x}], al
    {_set("cpl")}
    mov r8d, {SvmExit.VMMCALL:#x}
    xor r9d, r9d
    xor r10d, r10d
    call vc_hv_call
    {_require("rax")}
    mov rax, [rdi + {_off("rax"):#x}]
    mov [rbp], rax
    jmp vc_done

/* ---- DR7: MOV reg, DR7 (0F 21) answered locally; MOV DR7, reg (0F 23) sent ---- */
vc_dr7_read:
    cmp word ptr [r12], 0x210f
    jne vc_bad_insn
    call vc_dr7_operand
    mov rax, [r15 + {STATE_DR7:#x}]
    mov [rbp + rbx * 8], rax
    jmp vc_done
vc_dr7_write:
    cmp word ptr [r12], 0x230f
    jne vc_bad_insn
    call vc_dr7_operand
    call vc_ghcb_reset
    mov rax, [rbp + rbx * 8]
    mov rdx, rax
    shr rdx, 32
    jz vc_dr7_fits
    mov edx, {EventInj.exception(Vector.GP, 0):#x}   /* upper half set: #GP(0) */
    jmp vc_forward_exception
vc_dr7_fits:                /* as Linux: reserved bits cleared, bit 10 set */
    and eax, 0xffff23ff
    or eax, 0x400
    mov [rbp + {L["L_DR7"]:#x}], rax
    {_set("rax", "rax")}
    mov r8d, {SvmExit.WRITE_DR7:#x}
    xor r9d, r9d
    xor r10d, r10d
    call vc_hv_call
    mov rax, [rbp + {L["L_DR7"]:#x}]   /* accepted: remember it, as Linux does */
    mov [r15 + {STATE_DR7:#x}], rax
    jmp vc_done
vc_dr7_operand:             /* RBX = the GPR of a MOV to/from DR7; R12 past it */
    movzx eax, byte ptr [r12 + 2]
    mov ecx, eax
    shr ecx, 3
    and ecx, 7
    cmp ecx, 7
    jne vc_bad_insn
    test r14d, 4
    jnz vc_bad_insn
    mov ebx, eax
    and ebx, 7
    test r14d, 1
    jz vc_dr7_operand_done
    or ebx, 8
vc_dr7_operand_done:
    add r12, 3
    ret

/* ---- IOIO ---- */
vc_ioio:
    movzx eax, byte ptr [r12]
    mov ebx, 1
    test eax, 1
    jz vc_io_size
    mov ebx, 4
    test r13d, {F_OPSIZE}
    jz vc_io_size
    mov ebx, 2
vc_io_size:
    mov [rbp + {L["L_SIZE"]:#x}], rbx
    mov r9d, ebx
    shl r9d, 4
    or r9d, 0x200
    test r13d, {F_ADDR32}
    jz vc_io_asize
    xor r9d, 0x300
vc_io_asize:
    test eax, 2
    jnz vc_io_dir
    or r9d, 1
vc_io_dir:
    mov edx, eax
    and edx, 0xfc
    cmp edx, 0xe4
    je vc_io_imm
    cmp edx, 0xec
    je vc_io_dx
    cmp edx, 0x6c
    je vc_io_string
    jmp vc_bad_insn
vc_io_imm:
    movzx ecx, byte ptr [r12 + 1]
    add r12, 2
    jmp vc_io_port
vc_io_dx:
    movzx ecx, word ptr [rbp + 0x10]
    inc r12
vc_io_port:
    shl ecx, 16
    or r9d, ecx
    call vc_ghcb_reset
    mov ecx, ebx
    shl ecx, 3
    mov rdx, 1
    shl rdx, cl
    dec rdx
    xor eax, eax
    test r9d, 1
    jnz vc_io_rax
    mov rax, [rbp]
    and rax, rdx
vc_io_rax:
    {_set("rax", "rax")}
    mov r8d, {SvmExit.IOIO:#x}
    xor r10d, r10d
    push rdx
    call vc_hv_call
    pop rdx
    test r9d, 1
    jz vc_done
    {_require("rax")}
    mov rax, [rdi + {_off("rax"):#x}]
    and rax, rdx
    cmp ebx, 4
    je vc_io_in32
    not rdx
    and rdx, [rbp]
    or rax, rdx
vc_io_in32:
    mov [rbp], rax
    jmp vc_done

vc_io_string:
    or r9d, 4
    inc r12
    movzx ecx, word ptr [rbp + 0x10]
    shl ecx, 16
    or r9d, ecx
    mov r11, -1
    test r13d, {F_ADDR32}
    jz vc_ios_amask
    mov r11d, 0xffffffff
vc_ios_amask:
    mov eax, 1
    test r13d, {F_REP}
    jz vc_ios_count
    or r9d, 8
    mov rax, [rbp + 0x8]
    and rax, r11
    jz vc_done
vc_ios_count:
    mov ecx, {buf_len}
    cmp ebx, 2
    jne vc_ios_not2
    shr ecx, 1
vc_ios_not2:
    cmp ebx, 4
    jne vc_ios_max
    shr ecx, 2
vc_ios_max:
    cmp rax, rcx
    jbe vc_ios_chunk
    mov rax, rcx
vc_ios_chunk:
    mov [rbp + {L["L_CHUNK"]:#x}], rax
    mov rdx, rbx
    test dword ptr [rbp + {F_RFLAGS:#x}], 0x400
    jz vc_ios_step
    neg rdx
vc_ios_step:
    mov [rbp + {L["L_STEP"]:#x}], rdx
    test r9d, 1
    jnz vc_ios_call
    or r9d, 0xc00
    mov rsi, [rbp + 0x30]
    and rsi, r11
    call vc_seg_base
    add rsi, rax
    lea r8, [rdi + {buf:#x}]
    mov rcx, [rbp + {L["L_CHUNK"]:#x}]
vc_outs_elem:
    xor eax, eax
vc_outs_byte:
    mov dl, byte ptr [rsi + rax]
    mov byte ptr [r8], dl
    inc r8
    inc eax
    cmp eax, ebx
    jne vc_outs_byte
    add rsi, [rbp + {L["L_STEP"]:#x}]
    dec rcx
    jnz vc_outs_elem
vc_ios_call:
    call vc_ghcb_reset
    mov rax, {scratch_gpa:#x}
    {_set("sw_scratch", "rax")}
    mov r8d, {SvmExit.IOIO:#x}
    mov r10, [rbp + {L["L_CHUNK"]:#x}]
    call vc_hv_call
    mov rax, [rbp + {L["L_CHUNK"]:#x}]
    imul rax, [rbp + {L["L_STEP"]:#x}]
    test r9d, 1
    jz vc_ios_advance_rsi
    mov rsi, [rbp + 0x38]
    and rsi, r11
    lea r8, [rdi + {buf:#x}]
    mov rcx, [rbp + {L["L_CHUNK"]:#x}]
vc_ins_elem:
    xor edx, edx
vc_ins_byte:
    mov r10b, byte ptr [r8]
    mov byte ptr [rsi + rdx], r10b
    inc r8
    inc edx
    cmp edx, ebx
    jne vc_ins_byte
    add rsi, [rbp + {L["L_STEP"]:#x}]
    dec rcx
    jnz vc_ins_elem
    add rax, [rbp + 0x38]
    and rax, r11
    mov [rbp + 0x38], rax
    jmp vc_ios_rep
vc_ios_advance_rsi:
    add rax, [rbp + 0x30]
    and rax, r11
    mov [rbp + 0x30], rax
vc_ios_rep:
    test r9d, 8
    jz vc_done
    mov rax, [rbp + 0x8]
    sub rax, [rbp + {L["L_CHUNK"]:#x}]
    and rax, r11
    mov [rbp + 0x8], rax
    jnz vc_resume
    jmp vc_done

/* RAX = the FS or GS base if an override prefix names one, else 0 */
vc_seg_base:
    xor eax, eax
    test r13d, {F_FS | F_GS}
    jz vc_seg_base_done
    mov ecx, {MSR_FS_BASE:#x}
    test r13d, {F_FS}
    jnz vc_seg_base_msr
    mov ecx, {MSR_GS_BASE:#x}
vc_seg_base_msr:
    rdmsr
    shl rdx, 32
    or rax, rdx
vc_seg_base_done:
    ret

/* ---- MMIO: decode the MOV, walk the page tables, MMIO_READ / MMIO_WRITE ---- */
vc_mmio:
    xor eax, eax
    mov [rbp + {L["L_EXT"]:#x}], rax
    mov [rbp + {L["L_WRITE"]:#x}], rax
    mov [rbp + {L["L_RIPREL"]:#x}], rax
    mov [rbp + {L["L_REG"]:#x}], rax
    mov ecx, 8
    test r14d, 8
    jnz vc_mmio_opsize
    mov ecx, 4
    test r13d, {F_OPSIZE}
    jz vc_mmio_opsize
    mov ecx, 2
vc_mmio_opsize:
    mov [rbp + {L["L_SIZE"]:#x}], rcx
    mov [rbp + {L["L_DSIZE"]:#x}], rcx
    movzx eax, byte ptr [r12]
    inc r12
    cmp eax, 0x88
    je vc_mmio_w8
    cmp eax, 0x89
    je vc_mmio_w
    cmp eax, 0x8a
    je vc_mmio_r8
    cmp eax, 0x8b
    je vc_mmio_modrm
    cmp eax, 0xc6
    je vc_mmio_imm8
    cmp eax, 0xc7
    je vc_mmio_imm
    cmp eax, 0x0f
    je vc_mmio_0f
    mov edx, eax
    and edx, 0xfc
    cmp edx, 0xa0
    je vc_mmio_moffs
    jmp vc_bad_insn
vc_mmio_w8:
    mov qword ptr [rbp + {L["L_SIZE"]:#x}], 1
vc_mmio_w:
    mov qword ptr [rbp + {L["L_WRITE"]:#x}], 1
    jmp vc_mmio_modrm
vc_mmio_r8:
    mov qword ptr [rbp + {L["L_SIZE"]:#x}], 1
    mov qword ptr [rbp + {L["L_DSIZE"]:#x}], 1
    jmp vc_mmio_modrm
vc_mmio_imm8:
    mov qword ptr [rbp + {L["L_SIZE"]:#x}], 1
vc_mmio_imm:
    mov qword ptr [rbp + {L["L_WRITE"]:#x}], 2
    jmp vc_mmio_modrm
vc_mmio_0f:
    movzx eax, byte ptr [r12]
    inc r12
    mov ecx, eax
    and ecx, 0xf6
    cmp ecx, 0xb6
    jne vc_bad_insn
    mov ecx, 1
    test eax, 1
    jz vc_mmio_ext_size
    mov ecx, 2
vc_mmio_ext_size:
    mov [rbp + {L["L_SIZE"]:#x}], rcx
    mov ecx, 1
    test eax, 8
    jz vc_mmio_ext_kind
    mov ecx, 2
vc_mmio_ext_kind:
    mov [rbp + {L["L_EXT"]:#x}], rcx
    jmp vc_mmio_modrm

/* A0/A1: AL/rAX <- [moffs]; A2/A3: [moffs] <- AL/rAX; moffs is 8 bytes (4 with 67) */
vc_mmio_moffs:
    test eax, 1
    jnz vc_mmio_moffs_size
    mov qword ptr [rbp + {L["L_SIZE"]:#x}], 1
    mov qword ptr [rbp + {L["L_DSIZE"]:#x}], 1
vc_mmio_moffs_size:
    test eax, 2
    jz vc_mmio_moffs_addr
    mov qword ptr [rbp + {L["L_WRITE"]:#x}], 1
vc_mmio_moffs_addr:
    test r13d, {F_ADDR32}
    jnz vc_mmio_moffs32
    mov rax, [r12]
    add r12, 8
    jmp vc_mmio_address
vc_mmio_moffs32:
    mov eax, dword ptr [r12]
    add r12, 4
    jmp vc_mmio_address

vc_mmio_modrm:
    call vc_modrm
    cmp qword ptr [rbp + {L["L_WRITE"]:#x}], 2
    jne vc_mmio_ea
    cmp qword ptr [rbp + {L["L_REG"]:#x}], 0
    jne vc_bad_insn
    mov rcx, [rbp + {L["L_SIZE"]:#x}]
    cmp ecx, 1
    jne vc_mmio_imm_not8
    movsx rax, byte ptr [r12]
    inc r12
    jmp vc_mmio_imm_done
vc_mmio_imm_not8:
    cmp ecx, 2
    jne vc_mmio_imm32
    movsx rax, word ptr [r12]
    add r12, 2
    jmp vc_mmio_imm_done
vc_mmio_imm32:
    movsxd rax, dword ptr [r12]
    add r12, 4
vc_mmio_imm_done:
    mov [rbp + {L["L_IMM"]:#x}], rax
vc_mmio_ea:
    mov rax, [rbp + {L["L_EA"]:#x}]
    cmp qword ptr [rbp + {L["L_RIPREL"]:#x}], 0
    je vc_mmio_not_riprel
    add rax, r12
vc_mmio_not_riprel:
    test r13d, {F_ADDR32}
    jz vc_mmio_address
    mov eax, eax
vc_mmio_address:
    mov rsi, rax
    call vc_seg_base
    add rax, rsi
    call vc_virt_to_phys
    mov rsi, rax
    call vc_ghcb_reset
    mov r9, rsi
    mov r10, [rbp + {L["L_SIZE"]:#x}]
    mov rax, {scratch_gpa:#x}
    {_set("sw_scratch", "rax")}
    mov qword ptr [rdi + {buf:#x}], 0
    mov r8d, {VmgExit.MMIO_READ:#x}
    mov rax, [rbp + {L["L_WRITE"]:#x}]
    test eax, eax
    jz vc_mmio_call
    mov r8d, {VmgExit.MMIO_WRITE:#x}
    mov rax, [rbp + {L["L_IMM"]:#x}]
    cmp qword ptr [rbp + {L["L_WRITE"]:#x}], 2
    je vc_mmio_store
    mov rcx, [rbp + {L["L_REG"]:#x}]
    mov rax, [rbp + rcx * 8]
    cmp r10d, 1
    jne vc_mmio_store
    test r14d, r14d
    jnz vc_mmio_store
    cmp ecx, 4
    jb vc_mmio_store
    mov rax, [rbp + rcx * 8 - 0x20]
    shr rax, 8
vc_mmio_store:
    mov [rdi + {buf:#x}], rax
vc_mmio_call:
    call vc_hv_call
    cmp qword ptr [rbp + {L["L_WRITE"]:#x}], 0
    jne vc_done
    mov rax, [rdi + {buf:#x}]
    mov rcx, [rbp + {L["L_SIZE"]:#x}]
    cmp ecx, 8
    je vc_mmio_loaded
    shl ecx, 3
    mov rdx, 1
    shl rdx, cl
    dec rdx
    and rax, rdx
    cmp qword ptr [rbp + {L["L_EXT"]:#x}], 2
    jne vc_mmio_loaded
    cmp ecx, 8
    jne vc_mmio_sx16
    movsx rax, al
    jmp vc_mmio_loaded
vc_mmio_sx16:
    movsx rax, ax
vc_mmio_loaded:
    mov rcx, [rbp + {L["L_REG"]:#x}]
    mov rdx, [rbp + {L["L_DSIZE"]:#x}]
    cmp edx, 8
    je vc_mmio_put64
    cmp edx, 4
    je vc_mmio_put32
    cmp edx, 2
    je vc_mmio_put16
    test r14d, r14d
    jnz vc_mmio_put8
    cmp ecx, 4
    jb vc_mmio_put8
    sub ecx, 4
    mov byte ptr [rbp + rcx * 8 + 1], al
    jmp vc_done
vc_mmio_put8:
    mov byte ptr [rbp + rcx * 8], al
    jmp vc_done
vc_mmio_put16:
    mov word ptr [rbp + rcx * 8], ax
    jmp vc_done
vc_mmio_put32:
    mov eax, eax
vc_mmio_put64:
    mov [rbp + rcx * 8], rax
    jmp vc_done

/* ModRM at R12 -> L_REG, L_EA (without RIP for RIP-relative: L_RIPREL = 1), R12 past
   the displacement. A register operand has no memory access to emulate. */
vc_modrm:
    movzx eax, byte ptr [r12]
    inc r12
    mov ecx, eax
    shr ecx, 3
    and ecx, 7
    test r14d, 4
    jz vc_modrm_reg
    or ecx, 8
vc_modrm_reg:
    mov [rbp + {L["L_REG"]:#x}], rcx
    mov edx, eax
    shr edx, 6
    cmp edx, 3
    je vc_bad_insn
    mov ebx, eax
    and ebx, 7
    xor esi, esi
    cmp ebx, 4
    je vc_modrm_sib
    cmp ebx, 5
    jne vc_modrm_base
    test edx, edx
    jnz vc_modrm_base
    mov qword ptr [rbp + {L["L_RIPREL"]:#x}], 1
    jmp vc_modrm_disp32
vc_modrm_base:
    test r14d, 1
    jz vc_modrm_base_reg
    or ebx, 8
vc_modrm_base_reg:
    mov rsi, [rbp + rbx * 8]
    jmp vc_modrm_disp
vc_modrm_sib:
    movzx eax, byte ptr [r12]
    inc r12
    mov ecx, eax
    shr ecx, 3
    and ecx, 7
    test r14d, 2
    jz vc_sib_index
    or ecx, 8
vc_sib_index:
    cmp ecx, 4
    je vc_sib_base
    mov r8, [rbp + rcx * 8]
    mov ecx, eax
    shr ecx, 6
    shl r8, cl
    add rsi, r8
vc_sib_base:
    mov ebx, eax
    and ebx, 7
    cmp ebx, 5
    jne vc_sib_has_base
    test edx, edx
    jz vc_modrm_disp32
vc_sib_has_base:
    test r14d, 1
    jz vc_sib_base_reg
    or ebx, 8
vc_sib_base_reg:
    add rsi, [rbp + rbx * 8]
vc_modrm_disp:
    cmp edx, 1
    je vc_modrm_disp8
    cmp edx, 2
    je vc_modrm_disp32
    jmp vc_modrm_done
vc_modrm_disp8:
    movsx rax, byte ptr [r12]
    inc r12
    add rsi, rax
    jmp vc_modrm_done
vc_modrm_disp32:
    movsxd rax, dword ptr [r12]
    add r12, 4
    add rsi, rax
vc_modrm_done:
    mov [rbp + {L["L_EA"]:#x}], rsi
    ret

/* RAX = linear address -> RAX = guest-physical address, by the guest's page tables */
vc_virt_to_phys:
    mov rbx, cr3
    mov r8, {addr_mask:#x}
    and rbx, r8
    mov ecx, 39
vc_walk_level:
    mov rdx, rax
    shr rdx, cl
    and edx, 0x1ff
    mov rbx, [rbx + rdx * 8]
    test bl, 1
    jz vc_walk_failed
    cmp ecx, 12
    je vc_walk_leaf
    cmp ecx, 39
    je vc_walk_next
    test bl, 0x80
    jnz vc_walk_leaf
vc_walk_next:
    and rbx, r8
    sub ecx, 9
    jmp vc_walk_level
vc_walk_leaf:
    mov rdx, 1
    shl rdx, cl
    dec rdx
    and rax, rdx
    not rdx
    and rbx, r8
    and rbx, rdx
    or rax, rbx
    ret
"""


@functools.lru_cache(maxsize=16)
def build_vc_handler(
    address: int = VC_HANDLER_ADDRESS,
    *,
    ghcb: int = GHCB_GPA,
    ghcb_gpa: int | None = None,
    cbit: int = 51,
    protocol_version: int = PROTOCOL_VERSION,
) -> tuple[bytes, int]:
    """Assemble the handler for ``address``: (bytes to place there, entry address).

    ``ghcb`` is the GHCB page's linear address (mapped shared), ``ghcb_gpa`` its
    guest-physical address when the two differ, ``cbit`` the C-bit position the page
    walk masks off. The bytes are ``HANDLER_SIZE`` long: code, zero padding, and the
    state page with DR7 at its reset value; all of it is private memory to measure.
    """
    if address & 0xFFF or ghcb & 0xFFF or (ghcb_gpa or 0) & 0xFFF:
        raise ValueError(f"handler {address:#x} and GHCB {ghcb:#x} must be page aligned")
    if not 12 < cbit < 52:
        raise ValueError(f"the C-bit must be a physical-address bit (12..51), got {cbit}")
    source = handler_source(address, ghcb=ghcb, ghcb_gpa=ghcb_gpa, cbit=cbit,
                            protocol_version=protocol_version)  # fmt: skip
    code = assemble(source, address)
    if len(code) > CODE_LIMIT:
        raise AssemblyError(f"the #VC handler is {len(code):#x} bytes, over {CODE_LIMIT:#x}")
    state = bytearray(0x1000)
    state[STATE_DR7 : STATE_DR7 + 8] = DR7_RESET.to_bytes(8, "little")
    return code.ljust(STATE_OFFSET, b"\0") + bytes(state), address


def vc_image_args(
    address: int = VC_HANDLER_ADDRESS,
    *,
    ist: bool = True,
    idt: dict[int, int] | None = None,
    data: dict[int, bytes] | None = None,
    **build_args: Any,
) -> dict[str, Any]:
    """``GuestImage`` keyword arguments that install the handler as vector 29.

    Merges with the caller's own ``idt`` and ``data``; with ``ist`` the #VC gate uses
    IST1, so a #VC taken on a bad stack still has a good one (Linux does the same).
    """
    code, entry = build_vc_handler(address, **build_args)
    if address + len(code) > IMAGE_END:
        raise ValueError(f"the handler at {address:#x} does not fit below {IMAGE_END:#x}")
    args: dict[str, Any] = {
        "idt": {**(idt or {}), VC_VECTOR: entry},
        "data": {**(data or {}), address: code},
    }
    if ist:
        args["ist_vectors"] = frozenset({VC_VECTOR})
    return args
