# ModRM at R12 -> L_REG, L_EA (without RIP for RIP-relative: L_RIPREL = 1), R12 past
# the displacement. SIB, disp8/disp32, any base and index incl. RSP/R12/R13. A
# register operand has no memory access to emulate.

vc_modrm:
    movzx eax, byte ptr [r12]
    inc r12
    mov ecx, eax
    shr ecx, 3
    and ecx, 7
    test r14d, 4                # REX.R
    jz vc_modrm_reg
    or ecx, 8
vc_modrm_reg:
    mov [rbp + L_REG], rcx
    mov edx, eax
    shr edx, 6                  # EDX = mod
    cmp edx, 3
    je vc_bad_insn
    mov ebx, eax
    and ebx, 7
    xor esi, esi
    cmp ebx, 4
    je vc_modrm_sib
    cmp ebx, 5
    jne vc_modrm_base
    test edx, edx
    jnz vc_modrm_base
    mov qword ptr [rbp + L_RIPREL], 1
    jmp vc_modrm_disp32
vc_modrm_base:
    test r14d, 1                # REX.B
    jz vc_modrm_base_reg
    or ebx, 8
vc_modrm_base_reg:
    mov rsi, [rbp + rbx * 8]
    jmp vc_modrm_disp
vc_modrm_sib:
    movzx eax, byte ptr [r12]
    inc r12
    mov ecx, eax
    shr ecx, 3
    and ecx, 7
    test r14d, 2                # REX.X
    jz vc_sib_index
    or ecx, 8
vc_sib_index:
    cmp ecx, 4                  # no index
    je vc_sib_base
    mov r8, [rbp + rcx * 8]
    mov ecx, eax
    shr ecx, 6
    shl r8, cl
    add rsi, r8
vc_sib_base:
    mov ebx, eax
    and ebx, 7
    cmp ebx, 5
    jne vc_sib_has_base
    test edx, edx
    jz vc_modrm_disp32          # mod 0, base 5: disp32, no base
vc_sib_has_base:
    test r14d, 1
    jz vc_sib_base_reg
    or ebx, 8
vc_sib_base_reg:
    add rsi, [rbp + rbx * 8]
vc_modrm_disp:
    cmp edx, 1
    je vc_modrm_disp8
    cmp edx, 2
    je vc_modrm_disp32
    jmp vc_modrm_done
vc_modrm_disp8:
    movsx rax, byte ptr [r12]
    inc r12
    add rsi, rax
    jmp vc_modrm_done
vc_modrm_disp32:
    movsxd rax, dword ptr [r12]
    add r12, 4
    add rsi, rax
vc_modrm_done:
    mov [rbp + L_EA], rsi
    ret
