# Entry and exit: the one way into the handler (the #VC gate's target, at the
# handler's first byte) and the two ways back to the interrupted code.

# ---- entry: save the interrupted GPRs below the frame, then dispatch on the exit code
vc_entry:
    sub rsp, FRAME
    gprs_store rsp, rax, rcx, rdx, rbx, rbp, rsi, rdi, r8, r9, r10, r11, r12, r13, r14, r15
    mov rbp, rsp
    mov rax, [rbp + F_RSP]
    mov [rbp + SLOT_rsp], rax
    cld
    mov r15, VC_STATE
    inc qword ptr [r15 + STATE_vc_count]
    mov rax, [rbp + F_RIP]
    mov [rbp + L_RIP], rax
    mov [r15 + STATE_last_rip], rax
    mov rax, [rbp + F_ERR]
    mov [r15 + STATE_last_exit_code], rax
    cmp qword ptr [r15 + STATE_in_vc], 0
    jne vc_nested
    mov qword ptr [r15 + STATE_in_vc], 1
    mov rdi, VC_GHCB
    call vc_prefixes
    mov rax, [rbp + F_ERR]
    cmp rax, SVM_EXIT_IOIO
    je vc_ioio
    cmp rax, SVM_EXIT_NPF
    je vc_mmio
    cmp rax, SVM_EXIT_CPUID
    je vc_cpuid
    cmp rax, SVM_EXIT_MSR
    je vc_msr
    cmp rax, SVM_EXIT_VMMCALL
    je vc_vmmcall
    cmp rax, SVM_EXIT_RDPMC
    je vc_rdpmc
    cmp rax, SVM_EXIT_RDTSCP
    je vc_rdtscp
    cmp rax, SVM_EXIT_WBINVD
    je vc_wbinvd
    cmp rax, SVM_EXIT_INVD
    je vc_invd
    cmp rax, SVM_EXIT_MONITOR
    je vc_monitor
    cmp rax, SVM_EXIT_MWAIT
    je vc_mwait
    cmp rax, SVM_EXIT_READ_DR7
    je vc_dr7_read
    cmp rax, SVM_EXIT_WRITE_DR7
    je vc_dr7_write
    mov eax, TERM_UNSUPPORTED_EXIT
    jmp vc_terminate

# ---- leaving: RIP = R12 (past the instruction), or unchanged (vc_resume)
vc_done:
    mov [rbp + F_RIP], r12
vc_resume:
    mov rax, [rbp + SLOT_rsp]
    mov [rbp + F_RSP], rax
    mov rax, VC_STATE
    mov qword ptr [rax + STATE_in_vc], 0
    gprs_load rsp, rax, rcx, rdx, rbx, rbp, rsi, rdi, r8, r9, r10, r11, r12, r13, r14, r15
    add rsp, FRAME + 8          # and the error code
    iretq
