# VMMCALL (SVM_EXIT_VMMCALL): the number in RAX, arguments in RBX, RCX, RDX, RSI, and
# the CPL of the interrupted code; the result comes back in RAX.

vc_vmmcall:
    cmp word ptr [r12], 0x010f
    jne vc_bad_insn
    cmp byte ptr [r12 + 2], 0xd9
    jne vc_bad_insn
    add r12, 3
    call vc_ghcb_reset
    mov rax, [rbp + SLOT_rax]
    ghcb_set rax, rax
    mov rax, [rbp + SLOT_rbx]
    ghcb_set rbx, rax
    mov rax, [rbp + SLOT_rcx]
    ghcb_set rcx, rax
    mov rax, [rbp + SLOT_rdx]
    ghcb_set rdx, rax
    mov rax, [rbp + SLOT_rsi]
    ghcb_set rsi, rax
    mov al, byte ptr [rbp + F_CS]
    and al, 3
    mov byte ptr [rdi + GHCB_cpl], al
    ghcb_valid cpl
    mov r8d, SVM_EXIT_VMMCALL
    xor r9d, r9d
    xor r10d, r10d
    call vc_hv_call
    ghcb_require rax
    mov rax, [rdi + GHCB_rax]
    mov [rbp + SLOT_rax], rax
    jmp vc_done
