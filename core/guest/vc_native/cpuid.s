# CPUID (SVM_EXIT_CPUID): RAX, RCX and XCR0 (XGETBV if CR4.OSXSAVE, else 1) go to the
# hypervisor; EAX..EDX come back (vc_handle_cpuid).

vc_cpuid:
    cmp word ptr [r12], 0xa20f
    jne vc_bad_insn
    add r12, 2
    call vc_ghcb_reset
    mov rax, [rbp + SLOT_rax]
    ghcb_set rax, rax
    mov rax, [rbp + SLOT_rcx]
    ghcb_set rcx, rax
    mov ebx, 1
    mov rax, cr4
    bt rax, CR4_OSXSAVE_BIT
    jnc vc_cpuid_xcr0
    xor ecx, ecx
    xgetbv
    shl rdx, 32
    or rax, rdx
    mov rbx, rax
vc_cpuid_xcr0:
    ghcb_set xcr0, rbx
    mov r8d, SVM_EXIT_CPUID
    xor r9d, r9d
    xor r10d, r10d
    call vc_hv_call
    ghcb_require rax, rbx, rcx, rdx
    mov eax, dword ptr [rdi + GHCB_rax]
    mov [rbp + SLOT_rax], rax
    mov eax, dword ptr [rdi + GHCB_rcx]
    mov [rbp + SLOT_rcx], rax
    mov eax, dword ptr [rdi + GHCB_rdx]
    mov [rbp + SLOT_rdx], rax
    mov eax, dword ptr [rdi + GHCB_rbx]
    mov [rbp + SLOT_rbx], rax
    jmp vc_done
