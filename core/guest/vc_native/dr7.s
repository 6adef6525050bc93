# DR7: MOV reg, DR7 (0F 21, SVM_EXIT_READ_DR7) is answered locally with the value the
# guest last wrote (the hypervisor cannot know the real one); MOV DR7, reg (0F 23,
# SVM_EXIT_WRITE_DR7) is sent with the value in RAX and remembered, as Linux does.

# #GP(0), as an EVENTINJ value (EventInj.exception(Vector.GP, 0)).
.equ EVENT_GP0, EVENTINJ_VALID | EVENTINJ_EV | (EVENTINJ_TYPE_EXEPT << EVENTINJ_TYPE_SHIFT) | X86_TRAP_GP

vc_dr7_read:
    cmp word ptr [r12], 0x210f
    jne vc_bad_insn
    call vc_dr7_operand
    mov rax, [r15 + STATE_dr7]
    mov [rbp + rbx * 8], rax
    jmp vc_done
vc_dr7_write:
    cmp word ptr [r12], 0x230f
    jne vc_bad_insn
    call vc_dr7_operand
    call vc_ghcb_reset
    mov rax, [rbp + rbx * 8]
    mov rdx, rax
    shr rdx, 32
    jz vc_dr7_fits
    mov edx, EVENT_GP0          # upper half set: #GP(0)
    jmp vc_forward_exception
vc_dr7_fits:                    # as Linux: reserved bits cleared, bit 10 set
    and eax, 0xffff23ff
    or eax, DR7_RESET_VALUE
    mov [rbp + L_DR7], rax
    ghcb_set rax, rax
    mov r8d, SVM_EXIT_WRITE_DR7
    xor r9d, r9d
    xor r10d, r10d
    call vc_hv_call
    mov rax, [rbp + L_DR7]      # accepted: remember it, as Linux does
    mov [r15 + STATE_dr7], rax
    jmp vc_done

# RBX = the GPR of a MOV to/from DR7; R12 past the instruction.
vc_dr7_operand:
    movzx eax, byte ptr [r12 + 2]
    mov ecx, eax
    shr ecx, 3
    and ecx, 7
    cmp ecx, 7
    jne vc_bad_insn
    test r14d, 4                # REX.R: DR15 does not exist
    jnz vc_bad_insn
    mov ebx, eax
    and ebx, 7
    test r14d, 1                # REX.B
    jz vc_dr7_operand_done
    or ebx, 8
vc_dr7_operand_done:
    add r12, 3
    ret
