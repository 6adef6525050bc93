# RAX = linear address -> RAX = guest-physical address, by the guest's own 4-level
# page tables (1 GiB, 2 MiB and 4 KiB pages), which must be identity mapped. The
# C-bit and the flags are masked off every entry.

.equ PTE_ADDR_MASK, ((1 << 52) - 1) & ~0xfff & ~(1 << VC_C_BIT)

vc_virt_to_phys:
    mov rbx, cr3
    mov r8, PTE_ADDR_MASK
    and rbx, r8
    mov ecx, 39                 # the level's shift: 39, 30, 21, 12
vc_walk_level:
    mov rdx, rax
    shr rdx, cl
    and edx, 0x1ff
    mov rbx, [rbx + rdx * 8]
    test bl, 1                  # present
    jz vc_walk_failed
    cmp ecx, 12
    je vc_walk_leaf
    cmp ecx, 39
    je vc_walk_next
    test bl, 0x80               # PS: a 1 GiB or 2 MiB page
    jnz vc_walk_leaf
vc_walk_next:
    and rbx, r8
    sub ecx, 9
    jmp vc_walk_level
vc_walk_leaf:
    mov rdx, 1
    shl rdx, cl
    dec rdx
    and rax, rdx
    not rdx
    and rbx, r8
    and rbx, rdx
    or rax, rbx
    ret
