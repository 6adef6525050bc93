# MMIO (SVM_EXIT_NPF): decode the MOV, walk the page tables, and send
# SVM_VMGEXIT_MMIO_READ / MMIO_WRITE with exit_info_1 = the GPA, exit_info_2 = the
# length and the data in the shared buffer (vc_handle_mmio).
#
# Forms: mov r/m, reg (88, 89); mov reg, r/m (8A, 8B); mov r/m, imm (C6, C7);
# movzx/movsx byte and word loads (0F B6/B7/BE/BF); the moffs forms (A0-A3).

vc_mmio:
    xor eax, eax
    mov [rbp + L_EXT], rax
    mov [rbp + L_WRITE], rax
    mov [rbp + L_RIPREL], rax
    mov [rbp + L_REG], rax
    mov ecx, 8
    test r14d, 8                # REX.W
    jnz vc_mmio_opsize
    mov ecx, 4
    test r13d, PFX_OPSIZE
    jz vc_mmio_opsize
    mov ecx, 2
vc_mmio_opsize:
    mov [rbp + L_SIZE], rcx
    mov [rbp + L_DSIZE], rcx
    movzx eax, byte ptr [r12]
    inc r12
    cmp eax, 0x88
    je vc_mmio_w8
    cmp eax, 0x89
    je vc_mmio_w
    cmp eax, 0x8a
    je vc_mmio_r8
    cmp eax, 0x8b
    je vc_mmio_modrm
    cmp eax, 0xc6
    je vc_mmio_imm8
    cmp eax, 0xc7
    je vc_mmio_imm
    cmp eax, 0x0f
    je vc_mmio_0f
    mov edx, eax
    and edx, 0xfc
    cmp edx, 0xa0
    je vc_mmio_moffs
    jmp vc_bad_insn
vc_mmio_w8:
    mov qword ptr [rbp + L_SIZE], 1
vc_mmio_w:
    mov qword ptr [rbp + L_WRITE], 1
    jmp vc_mmio_modrm
vc_mmio_r8:
    mov qword ptr [rbp + L_SIZE], 1
    mov qword ptr [rbp + L_DSIZE], 1
    jmp vc_mmio_modrm
vc_mmio_imm8:
    mov qword ptr [rbp + L_SIZE], 1
vc_mmio_imm:
    mov qword ptr [rbp + L_WRITE], 2
    jmp vc_mmio_modrm
vc_mmio_0f:
    movzx eax, byte ptr [r12]
    inc r12
    mov ecx, eax
    and ecx, 0xf6
    cmp ecx, 0xb6
    jne vc_bad_insn
    mov ecx, 1
    test eax, 1
    jz vc_mmio_ext_size
    mov ecx, 2
vc_mmio_ext_size:
    mov [rbp + L_SIZE], rcx
    mov ecx, 1
    test eax, 8
    jz vc_mmio_ext_kind
    mov ecx, 2
vc_mmio_ext_kind:
    mov [rbp + L_EXT], rcx
    jmp vc_mmio_modrm

# A0/A1: AL/rAX <- [moffs]; A2/A3: [moffs] <- AL/rAX; moffs is 8 bytes (4 with 67)
vc_mmio_moffs:
    test eax, 1
    jnz vc_mmio_moffs_size
    mov qword ptr [rbp + L_SIZE], 1
    mov qword ptr [rbp + L_DSIZE], 1
vc_mmio_moffs_size:
    test eax, 2
    jz vc_mmio_moffs_addr
    mov qword ptr [rbp + L_WRITE], 1
vc_mmio_moffs_addr:
    test r13d, PFX_ADDR32
    jnz vc_mmio_moffs32
    mov rax, [r12]
    add r12, 8
    jmp vc_mmio_address
vc_mmio_moffs32:
    mov eax, dword ptr [r12]
    add r12, 4
    jmp vc_mmio_address

vc_mmio_modrm:
    call vc_modrm
    cmp qword ptr [rbp + L_WRITE], 2
    jne vc_mmio_ea
    cmp qword ptr [rbp + L_REG], 0
    jne vc_bad_insn
    mov rcx, [rbp + L_SIZE]
    cmp ecx, 1
    jne vc_mmio_imm_not8
    movsx rax, byte ptr [r12]
    inc r12
    jmp vc_mmio_imm_done
vc_mmio_imm_not8:
    cmp ecx, 2
    jne vc_mmio_imm32
    movsx rax, word ptr [r12]
    add r12, 2
    jmp vc_mmio_imm_done
vc_mmio_imm32:
    movsxd rax, dword ptr [r12]
    add r12, 4
vc_mmio_imm_done:
    mov [rbp + L_IMM], rax
vc_mmio_ea:
    mov rax, [rbp + L_EA]
    cmp qword ptr [rbp + L_RIPREL], 0
    je vc_mmio_not_riprel
    add rax, r12
vc_mmio_not_riprel:
    test r13d, PFX_ADDR32
    jz vc_mmio_address
    mov eax, eax
vc_mmio_address:                # RAX = the offset: add the segment base, translate
    mov rsi, rax
    call vc_seg_base
    add rax, rsi
    call vc_virt_to_phys
    mov rsi, rax
    call vc_ghcb_reset
    mov r9, rsi
    mov r10, [rbp + L_SIZE]
    mov rax, SCRATCH_GPA
    ghcb_set sw_scratch, rax
    mov qword ptr [rdi + GHCB_shared_buffer], 0
    mov r8d, SVM_VMGEXIT_MMIO_READ
    mov rax, [rbp + L_WRITE]
    test eax, eax
    jz vc_mmio_call
    mov r8d, SVM_VMGEXIT_MMIO_WRITE
    mov rax, [rbp + L_IMM]
    cmp qword ptr [rbp + L_WRITE], 2
    je vc_mmio_store
    mov rcx, [rbp + L_REG]
    mov rax, [rbp + rcx * 8]
    cmp r10d, 1
    jne vc_mmio_store
    test r14d, r14d
    jnz vc_mmio_store
    cmp ecx, 4                  # AH, CH, DH, BH: byte 1 of slots 0-3
    jb vc_mmio_store
    mov rax, [rbp + rcx * 8 - 4 * 8]
    shr rax, 8
vc_mmio_store:
    mov [rdi + GHCB_shared_buffer], rax
vc_mmio_call:
    call vc_hv_call
    cmp qword ptr [rbp + L_WRITE], 0
    jne vc_done
    mov rax, [rdi + GHCB_shared_buffer]
    mov rcx, [rbp + L_SIZE]
    cmp ecx, 8
    je vc_mmio_loaded
    shl ecx, 3
    mov rdx, 1
    shl rdx, cl
    dec rdx
    and rax, rdx
    cmp qword ptr [rbp + L_EXT], 2
    jne vc_mmio_loaded
    cmp ecx, 8
    jne vc_mmio_sx16
    movsx rax, al
    jmp vc_mmio_loaded
vc_mmio_sx16:
    movsx rax, ax
vc_mmio_loaded:                 # into the destination register, as wide as it is
    mov rcx, [rbp + L_REG]
    mov rdx, [rbp + L_DSIZE]
    cmp edx, 8
    je vc_mmio_put64
    cmp edx, 4
    je vc_mmio_put32
    cmp edx, 2
    je vc_mmio_put16
    test r14d, r14d
    jnz vc_mmio_put8
    cmp ecx, 4
    jb vc_mmio_put8
    sub ecx, 4
    mov byte ptr [rbp + rcx * 8 + 1], al
    jmp vc_done
vc_mmio_put8:
    mov byte ptr [rbp + rcx * 8], al
    jmp vc_done
vc_mmio_put16:
    mov word ptr [rbp + rcx * 8], ax
    jmp vc_done
vc_mmio_put32:
    mov eax, eax
vc_mmio_put64:
    mov [rbp + rcx * 8], rax
    jmp vc_done
