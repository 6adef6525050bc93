# IOIO (SVM_EXIT_IOIO): IN/OUT with an imm8 or DX port, sizes 1/2/4, and INS/OUTS
# with or without REP (vc_handle_ioio). R9 builds exit_info_1 from sevsim.arch.ioio's
# bits; RBX is the element size throughout.

.equ IOIO_ADDR_64_TO_32, IOIO_ADDR_64 ^ IOIO_ADDR_32
.equ IOIO_SEG_DS, SEG_DS << IOIO_SEG_SHIFT

vc_ioio:
    movzx eax, byte ptr [r12]
    mov ebx, 1                  # even opcodes move a byte
    test eax, 1
    jz vc_io_size
    mov ebx, 4
    test r13d, PFX_OPSIZE
    jz vc_io_size
    mov ebx, 2
vc_io_size:
    mov [rbp + L_SIZE], rbx
    mov r9d, ebx
    shl r9d, IOIO_SIZE_SHIFT
    or r9d, IOIO_ADDR_64
    test r13d, PFX_ADDR32
    jz vc_io_asize
    xor r9d, IOIO_ADDR_64_TO_32
vc_io_asize:
    test eax, 2                 # bit 1 clear: IN / INS
    jnz vc_io_dir
    or r9d, IOIO_TYPE_IN
vc_io_dir:
    mov edx, eax
    and edx, 0xfc
    cmp edx, 0xe4               # E4-E7: port imm8
    je vc_io_imm
    cmp edx, 0xec               # EC-EF: port DX
    je vc_io_dx
    cmp edx, 0x6c               # 6C-6F: INS / OUTS
    je vc_io_string
    jmp vc_bad_insn
vc_io_imm:
    movzx ecx, byte ptr [r12 + 1]
    add r12, 2
    jmp vc_io_port
vc_io_dx:
    movzx ecx, word ptr [rbp + SLOT_rdx]
    inc r12
vc_io_port:
    shl ecx, IOIO_PORT_SHIFT
    or r9d, ecx
    call vc_ghcb_reset
    mov ecx, ebx                # RDX = the mask of the element size
    shl ecx, 3
    mov rdx, 1
    shl rdx, cl
    dec rdx
    xor eax, eax
    test r9d, IOIO_TYPE_IN
    jnz vc_io_rax
    mov rax, [rbp + SLOT_rax]
    and rax, rdx
vc_io_rax:
    ghcb_set rax, rax
    mov r8d, SVM_EXIT_IOIO
    xor r10d, r10d
    push rdx
    call vc_hv_call
    pop rdx
    test r9d, IOIO_TYPE_IN
    jz vc_done
    ghcb_require rax
    mov rax, [rdi + GHCB_rax]
    and rax, rdx
    cmp ebx, 4                  # IN into EAX zero-extends; AL, AX keep the rest
    je vc_io_in32
    not rdx
    and rdx, [rbp + SLOT_rax]
    or rax, rdx
vc_io_in32:
    mov [rbp + SLOT_rax], rax
    jmp vc_done

# INS / OUTS: at most one shared buffer of elements per VMGEXIT, through the scratch
# area, with the element count in exit_info_2. A longer REP leaves RIP in place with
# RCX, RSI/RDI advanced, so the instruction runs again (Linux's ES_RETRY). R11 masks
# addresses to the address size.
vc_io_string:
    or r9d, IOIO_STR
    inc r12
    movzx ecx, word ptr [rbp + SLOT_rdx]
    shl ecx, IOIO_PORT_SHIFT
    or r9d, ecx
    mov r11, -1
    test r13d, PFX_ADDR32
    jz vc_ios_amask
    mov r11d, 0xffffffff
vc_ios_amask:
    mov eax, 1
    test r13d, PFX_REP
    jz vc_ios_count
    or r9d, IOIO_REP
    mov rax, [rbp + SLOT_rcx]
    and rax, r11
    jz vc_done
vc_ios_count:                   # elements this time: RCX, at most a buffer full
    mov ecx, GHCB_shared_buffer_SIZE
    cmp ebx, 2
    jne vc_ios_not2
    shr ecx, 1
vc_ios_not2:
    cmp ebx, 4
    jne vc_ios_max
    shr ecx, 2
vc_ios_max:
    cmp rax, rcx
    jbe vc_ios_chunk
    mov rax, rcx
vc_ios_chunk:
    mov [rbp + L_CHUNK], rax
    mov rdx, rbx
    test dword ptr [rbp + F_RFLAGS], X86_EFLAGS_DF
    jz vc_ios_step
    neg rdx
vc_ios_step:
    mov [rbp + L_STEP], rdx
    test r9d, IOIO_TYPE_IN
    jnz vc_ios_call
    or r9d, IOIO_SEG_DS         # OUTS reads DS:RSI (or FS/GS); INS writes ES:RDI (0)
    mov rsi, [rbp + SLOT_rsi]
    and rsi, r11
    call vc_seg_base
    add rsi, rax
    lea r8, [rdi + GHCB_shared_buffer]
    mov rcx, [rbp + L_CHUNK]
vc_outs_elem:
    xor eax, eax
vc_outs_byte:
    mov dl, byte ptr [rsi + rax]
    mov byte ptr [r8], dl
    inc r8
    inc eax
    cmp eax, ebx
    jne vc_outs_byte
    add rsi, [rbp + L_STEP]
    dec rcx
    jnz vc_outs_elem
vc_ios_call:
    call vc_ghcb_reset
    mov rax, SCRATCH_GPA
    ghcb_set sw_scratch, rax
    mov r8d, SVM_EXIT_IOIO
    mov r10, [rbp + L_CHUNK]
    call vc_hv_call
    mov rax, [rbp + L_CHUNK]
    imul rax, [rbp + L_STEP]
    test r9d, IOIO_TYPE_IN
    jz vc_ios_advance_rsi
    mov rsi, [rbp + SLOT_rdi]
    and rsi, r11
    lea r8, [rdi + GHCB_shared_buffer]
    mov rcx, [rbp + L_CHUNK]
vc_ins_elem:
    xor edx, edx
vc_ins_byte:
    mov r10b, byte ptr [r8]
    mov byte ptr [rsi + rdx], r10b
    inc r8
    inc edx
    cmp edx, ebx
    jne vc_ins_byte
    add rsi, [rbp + L_STEP]
    dec rcx
    jnz vc_ins_elem
    add rax, [rbp + SLOT_rdi]
    and rax, r11
    mov [rbp + SLOT_rdi], rax
    jmp vc_ios_rep
vc_ios_advance_rsi:
    add rax, [rbp + SLOT_rsi]
    and rax, r11
    mov [rbp + SLOT_rsi], rax
vc_ios_rep:
    test r9d, IOIO_REP
    jz vc_done
    mov rax, [rbp + SLOT_rcx]
    sub rax, [rbp + L_CHUNK]
    and rax, r11
    mov [rbp + SLOT_rcx], rax
    jnz vc_resume
    jmp vc_done
