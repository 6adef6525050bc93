# Instruction prefixes, for every exit: R12 -> the opcode, R13 = PFX_* flags,
# R14 = the REX byte (0 if none). A REX prefix counts only right before the opcode.

vc_prefixes:
    mov r12, [rbp + L_RIP]
    xor r13d, r13d
    xor r14d, r14d
    mov ecx, 14                 # an instruction is at most 15 bytes
vc_pfx_loop:
    movzx eax, byte ptr [r12]
    mov edx, eax
    and edx, 0xf0
    cmp edx, 0x40
    je vc_pfx_rex
    cmp eax, 0x66
    je vc_pfx_opsize
    cmp eax, 0x67
    je vc_pfx_addr32
    cmp eax, 0xf3
    je vc_pfx_rep
    cmp eax, 0xf2
    je vc_pfx_rep
    cmp eax, 0x64
    je vc_pfx_fs
    cmp eax, 0x65
    je vc_pfx_gs
    cmp eax, 0xf0               # LOCK
    je vc_pfx_next
    cmp eax, 0x2e               # CS, SS, DS, ES: null in 64-bit mode
    je vc_pfx_next
    cmp eax, 0x36
    je vc_pfx_next
    cmp eax, 0x3e
    je vc_pfx_next
    cmp eax, 0x26
    je vc_pfx_next
    ret
vc_pfx_opsize:
    or r13d, PFX_OPSIZE
    jmp vc_pfx_next
vc_pfx_addr32:
    or r13d, PFX_ADDR32
    jmp vc_pfx_next
vc_pfx_rep:
    or r13d, PFX_REP
    jmp vc_pfx_next
vc_pfx_fs:
    and r13d, PFX_NO_SEGMENT    # the last segment override counts
    or r13d, PFX_FS
    jmp vc_pfx_next
vc_pfx_gs:
    and r13d, PFX_NO_SEGMENT
    or r13d, PFX_GS
vc_pfx_next:
    xor r14d, r14d
    jmp vc_pfx_advance
vc_pfx_rex:
    mov r14d, eax
vc_pfx_advance:
    inc r12
    dec ecx
    jnz vc_pfx_loop
    jmp vc_bad_insn
