"""Small pieces of guest assembly that many guests need."""

from __future__ import annotations

from sevsim.arch.exits import VmgExit
from sevsim.arch.ghcb import GHCB_SAVE_AREA, valid_bit
from sevsim.arch.ghcb_msr import term_req
from sevsim.arch.msr import MSR_AMD64_SEV_ES_GHCB
from sevsim.guest.image import GHCB_GPA

_SW_FIELDS = ("sw_exit_code", "sw_exit_info_1", "sw_exit_info_2")
_SW_BITMAP = sum(1 << valid_bit(name) for name in _SW_FIELDS)


def terminate(reason_set: int = 0, reason_code: int = 0) -> str:
    """Ask for termination through the GHCB MSR protocol (GHCB MSR = TERM_REQ, VMGEXIT).

    Clobbers RAX, RCX and RDX. With no hypervisor answering, execution goes on after it.
    """
    return f"""
    mov ecx, {MSR_AMD64_SEV_ES_GHCB:#x}
    mov eax, {term_req(reason_set, reason_code):#x}
    xor edx, edx
    wrmsr
    rep vmmcall
"""


#: The general termination request (set 0, code 0), as KVM's sev_smoke_test sends it.
TERMINATE = terminate()


def ghcb_vmgexit(
    code: int, info1: int | str = 0, info2: int | str = 0, ghcb: int = GHCB_GPA
) -> str:
    """Ask through the GHCB page at ``ghcb`` (mapped at the same virtual address):
    ``sw_exit_code``, ``sw_exit_info_1/2`` (immediates, or registers other than RAX,
    RCX, RDX and RDI), only those three marked valid, GHCB MSR = the page, VMGEXIT.

    Leaves RDI pointing at the GHCB, for reading the reply; clobbers RAX, RCX, RDX.
    """
    bitmap = GHCB_SAVE_AREA.offset("valid_bitmap")
    at = {name: GHCB_SAVE_AREA.offset(name) for name in _SW_FIELDS}
    return f"""
    mov rdi, {ghcb}
    mov rax, {code}; mov [rdi + {at["sw_exit_code"]}], rax
    mov rax, {info1}; mov [rdi + {at["sw_exit_info_1"]}], rax
    mov rax, {info2}; mov [rdi + {at["sw_exit_info_2"]}], rax
    mov rax, {_SW_BITMAP & (1 << 64) - 1}; mov [rdi + {bitmap}], rax
    mov rax, {_SW_BITMAP >> 64}; mov [rdi + {bitmap + 8}], rax
    mov ecx, {MSR_AMD64_SEV_ES_GHCB:#x}; mov eax, {ghcb & 0xFFFF_FFFF}; mov edx, {ghcb >> 32}; wrmsr
    rep vmmcall
"""


def nmi_complete(backup: int, ghcb: int = GHCB_GPA) -> str:
    """End an NMI handler with NMI_COMPLETE without disturbing an interrupted GHCB user.

    The NMI may have arrived in the middle of an exchange (KVM injects it at the entry
    right after a #VC handler's VMGEXIT, or after an MSR-protocol request), so, as
    Linux's ``__sev_get_ghcb``/``__sev_put_ghcb`` do with their backup GHCB, the page
    is saved to ``backup`` (4 KiB of private memory) and restored around the request,
    and the GHCB MSR (which may hold an MSR-protocol reply) with it. Preserves every
    register but the flags; assumes DF clear.
    """
    return f"""
    push rax; push rcx; push rdx; push rsi; push rdi
    mov ecx, {MSR_AMD64_SEV_ES_GHCB:#x}; rdmsr; push rax; push rdx
    mov rsi, {ghcb}; mov rdi, {backup}; mov ecx, 512; rep movsq
    {ghcb_vmgexit(VmgExit.NMI_COMPLETE, ghcb=ghcb)}
    mov rsi, {backup}; mov rdi, {ghcb}; mov ecx, 512; rep movsq
    pop rdx; pop rax; mov ecx, {MSR_AMD64_SEV_ES_GHCB:#x}; wrmsr
    pop rdi; pop rsi; pop rdx; pop rcx; pop rax
"""
