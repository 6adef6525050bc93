"""Small pieces of guest assembly that many guests need."""

from __future__ import annotations

from sevsim.arch.ghcb_msr import term_req


def terminate(reason_set: int = 0, reason_code: int = 0) -> str:
    """Ask for termination through the GHCB MSR protocol (GHCB MSR = TERM_REQ, VMGEXIT).

    Clobbers RAX, RCX and RDX. With no hypervisor answering, execution goes on after it.
    """
    return f"""
    mov ecx, 0xC0010130
    mov eax, {term_req(reason_set, reason_code):#x}
    xor edx, edx
    wrmsr
    rep vmmcall
"""


#: The general termination request (set 0, code 0), as KVM's sev_smoke_test sends it.
TERMINATE = terminate()
