# RAX = the FS or GS base if an override prefix names one, else 0 (the only segment
# bases 64-bit mode applies). For OUTS and MMIO operands.

vc_seg_base:
    xor eax, eax
    test r13d, PFX_FS | PFX_GS
    jz vc_seg_base_done
    mov ecx, MSR_FS_BASE
    test r13d, PFX_FS
    jnz vc_seg_base_msr
    mov ecx, MSR_GS_BASE
vc_seg_base_msr:
    rdmsr
    shl rdx, 32
    or rax, rdx
vc_seg_base_done:
    ret
