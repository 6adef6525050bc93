# Exception forwarding: the hypervisor answered with an exception to raise (an
# EVENTINJ value in RDX, from sw_exit_info_2). Deliver it as the hardware would have
# from the faulting instruction: read the guest's IDT gate, build the frame (RIP =
# the instruction, the event's error code or 0 for vectors that push one) on the
# interrupted stack, or on the gate's IST or the TSS RSP0 stack, and jump to the
# guest's handler. Vectors the handler may not forward end the guest.

# NMI, #DF, #MC, #VC: never forwarded.
.equ NOT_FORWARDED, (1 << X86_TRAP_NMI) | (1 << X86_TRAP_DF) | (1 << X86_TRAP_MC) | (1 << X86_TRAP_VC)

vc_forward_exception:
    mov rbx, rdx
    bt edx, EVENTINJ_VALID_BIT
    jnc vc_vmm_error
    mov ecx, edx
    shr ecx, EVENTINJ_TYPE_SHIFT
    and ecx, 7
    cmp ecx, EVENTINJ_TYPE_EXEPT
    jne vc_vmm_error
    movzx esi, dl               # the vector
    cmp esi, 32                 # exceptions only
    jae vc_bad_exception
    mov eax, NOT_FORWARDED
    bt eax, esi
    jc vc_bad_exception
    sidt [rbp + L_TMP]          # the gate: within the IDT's limit, present
    movzx eax, word ptr [rbp + L_TMP]
    mov ecx, esi
    shl ecx, 4
    add ecx, 15
    cmp ecx, eax
    ja vc_bad_exception
    sub ecx, 15
    mov rdx, [rbp + L_TMP + 2]
    add rdx, rcx
    movzx r8d, byte ptr [rdx + 5]
    test r8d, 0x80
    jz vc_bad_exception
    movzx r9d, word ptr [rdx]   # R9 = the handler's address
    movzx eax, word ptr [rdx + 6]
    shl rax, 16
    or r9, rax
    mov eax, dword ptr [rdx + 8]
    shl rax, 32
    or r9, rax
    movzx r11d, byte ptr [rdx + 4]
    and r11d, 7                 # IST index
    mov r10, [rbp + SLOT_rsp]
    test r11d, r11d
    jnz vc_fwd_ist
    test byte ptr [rbp + F_CS], 3
    jz vc_fwd_stack             # CPL 0: stay on the interrupted stack
    mov ecx, 4                  # else the TSS's RSP0
    jmp vc_fwd_tss
vc_fwd_ist:
    lea ecx, [r11 * 8 + 0x1c]   # the TSS's IST<n>
vc_fwd_tss:
    str ax
    movzx eax, ax
    and eax, 0xfff8
    sgdt [rbp + L_TMP]
    mov rdx, [rbp + L_TMP + 2]
    add rdx, rax                # the TSS descriptor: RAX = the TSS's base
    movzx eax, word ptr [rdx + 2]
    movzx r11d, byte ptr [rdx + 4]
    shl r11d, 16
    or eax, r11d
    movzx r11d, byte ptr [rdx + 7]
    shl r11d, 24
    or eax, r11d
    mov r11d, dword ptr [rdx + 8]
    shl r11, 32
    or rax, r11
    mov r10, [rax + rcx]
vc_fwd_stack:                   # push SS, RSP, RFLAGS, CS, RIP (and error code)
    and r10, -16
    mov rax, [rbp + F_RIP]
    mov rcx, [rbp + F_CS]
    mov rdx, [rbp + F_RFLAGS]
    mov r11, [rbp + SLOT_rsp]
    mov r12, [rbp + F_SS]
    mov [r10 - 8], r12
    mov [r10 - 16], r11
    mov [r10 - 24], rdx
    mov [r10 - 32], rcx
    mov [r10 - 40], rax
    sub r10, 40
    mov eax, ERROR_CODE_VECTORS
    bt eax, esi
    jnc vc_fwd_no_error
    xor eax, eax
    bt ebx, EVENTINJ_EV_BIT
    jnc vc_fwd_error_code
    mov rax, rbx
    shr rax, 32                 # the error code: sw_exit_info_2[63:32]
vc_fwd_error_code:
    sub r10, 8
    mov [r10], rax
vc_fwd_no_error:
    mov [r10 - 8], r9           # the handler's address, to RET to
    sub r10, 8
    mov [rbp + L_NEWSP], r10
    mov rax, VC_STATE
    mov qword ptr [rax + STATE_in_vc], 0
    and r8d, 0xf
    cmp r8d, 0xf                # a trap gate keeps IF as it was
    jne vc_fwd_go
    bt edx, X86_EFLAGS_IF_BIT
    jc vc_fwd_go_sti
vc_fwd_go:
    gprs_load rbp, rax, rcx, rdx, rbx, rsi, rdi, r8, r9, r10, r11, r12, r13, r14, r15
    mov rsp, [rbp + L_NEWSP]
    mov rbp, [rbp + SLOT_rbp]
    ret
vc_fwd_go_sti:
    gprs_load rbp, rax, rcx, rdx, rbx, rsi, rdi, r8, r9, r10, r11, r12, r13, r14, r15
    mov rsp, [rbp + L_NEWSP]
    mov rbp, [rbp + SLOT_rbp]
    sti
    ret
