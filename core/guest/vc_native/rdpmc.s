# RDPMC (SVM_EXIT_RDPMC): the counter number in RCX, EDX:EAX back.

vc_rdpmc:
    cmp word ptr [r12], 0x330f
    jne vc_bad_insn
    add r12, 2
    call vc_ghcb_reset
    mov rax, [rbp + SLOT_rcx]
    ghcb_set rcx, rax
    mov r8d, SVM_EXIT_RDPMC
    xor r9d, r9d
    xor r10d, r10d
    call vc_hv_call
    jmp vc_edx_eax
