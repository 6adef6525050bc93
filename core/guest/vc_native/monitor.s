# MONITOR (SVM_EXIT_MONITOR: RAX, RCX, RDX) and MWAIT (SVM_EXIT_MWAIT: RAX, RCX).

vc_monitor:
    cmp word ptr [r12], 0x010f
    jne vc_bad_insn
    cmp byte ptr [r12 + 2], 0xc8
    jne vc_bad_insn
    add r12, 3
    call vc_ghcb_reset
    mov rax, [rbp + SLOT_rdx]
    ghcb_set rdx, rax
    mov r8d, SVM_EXIT_MONITOR
    jmp vc_rax_rcx_call
vc_mwait:
    cmp word ptr [r12], 0x010f
    jne vc_bad_insn
    cmp byte ptr [r12 + 2], 0xc9
    jne vc_bad_insn
    add r12, 3
    call vc_ghcb_reset
    mov r8d, SVM_EXIT_MWAIT
vc_rax_rcx_call:
    mov rax, [rbp + SLOT_rax]
    ghcb_set rax, rax
    mov rax, [rbp + SLOT_rcx]
    ghcb_set rcx, rax
    xor r9d, r9d
    xor r10d, r10d
    call vc_hv_call
    jmp vc_done
