# WBINVD (SVM_EXIT_WBINVD) and INVD (SVM_EXIT_INVD): nothing to pass, nothing back.

vc_wbinvd:
    mov r8d, SVM_EXIT_WBINVD
    cmp word ptr [r12], 0x090f
    je vc_no_operands
    jmp vc_bad_insn
vc_invd:
    mov r8d, SVM_EXIT_INVD
    cmp word ptr [r12], 0x080f
    jne vc_bad_insn
vc_no_operands:
    add r12, 2
    call vc_ghcb_reset
    xor r9d, r9d
    xor r10d, r10d
    call vc_hv_call
    jmp vc_done
