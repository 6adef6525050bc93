# RDTSCP (SVM_EXIT_RDTSCP): nothing to pass; EDX:EAX and ECX (TSC_AUX) back.

vc_rdtscp:
    cmp word ptr [r12], 0x010f
    jne vc_bad_insn
    cmp byte ptr [r12 + 2], 0xf9
    jne vc_bad_insn
    add r12, 3
    call vc_ghcb_reset
    mov r8d, SVM_EXIT_RDTSCP
    xor r9d, r9d
    xor r10d, r10d
    call vc_hv_call
    ghcb_require rcx
    mov eax, dword ptr [rdi + GHCB_rcx]
    mov [rbp + SLOT_rcx], rax
    jmp vc_edx_eax
