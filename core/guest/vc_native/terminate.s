# Giving up, as Linux's sev_es_terminate(): a TERM_REQ through the GHCB MSR protocol
# with sevsim's reason set and the reason in EAX, then a HLT loop in case the
# hypervisor resumes us.

.equ TERM_REQ, GHCB_MSR_TERM_REQ | (TERM_REASON_SET << GHCB_MSR_TERM_REASON_SET_POS)

vc_bad_insn:
    mov eax, TERM_UNSUPPORTED_INSN
    jmp vc_terminate
vc_vmm_error:
    mov eax, TERM_VMM_ERROR
    jmp vc_terminate
vc_bad_exception:
    mov eax, TERM_BAD_EXCEPTION
    jmp vc_terminate
vc_walk_failed:
    mov eax, TERM_PAGE_WALK
    jmp vc_terminate
vc_nested:
    mov eax, TERM_NESTED_VC
vc_terminate:
    shl eax, GHCB_MSR_TERM_REASON_POS
    or eax, TERM_REQ
    xor edx, edx
    mov ecx, MSR_AMD64_SEV_ES_GHCB
    wrmsr
    rep vmmcall                 # VMGEXIT
vc_hang:
    hlt
    jmp vc_hang
