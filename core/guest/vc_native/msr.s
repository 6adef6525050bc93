# RDMSR / WRMSR (SVM_EXIT_MSR): exit_info_1 0 with RCX, EDX:EAX back; or 1 with RCX,
# RAX and RDX (vc_handle_msr).

vc_msr:
    xor r9d, r9d
    cmp word ptr [r12], 0x320f  # RDMSR
    je vc_msr_go
    mov r9d, 1
    cmp word ptr [r12], 0x300f  # WRMSR
    jne vc_bad_insn
vc_msr_go:
    add r12, 2
    call vc_ghcb_reset
    mov rax, [rbp + SLOT_rcx]
    ghcb_set rcx, rax
    test r9d, r9d
    jz vc_msr_call
    mov rax, [rbp + SLOT_rax]
    ghcb_set rax, rax
    mov rax, [rbp + SLOT_rdx]
    ghcb_set rdx, rax
vc_msr_call:
    mov r8d, SVM_EXIT_MSR
    xor r10d, r10d
    call vc_hv_call
    test r9d, r9d
    jnz vc_done

# EDX:EAX from the GHCB into the interrupted RDX and RAX (RDMSR, RDPMC, RDTSCP).
vc_edx_eax:
    ghcb_require rax, rdx
    mov eax, dword ptr [rdi + GHCB_rax]
    mov [rbp + SLOT_rax], rax
    mov eax, dword ptr [rdi + GHCB_rdx]
    mov [rbp + SLOT_rdx], rax
    jmp vc_done
