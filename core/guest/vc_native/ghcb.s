# The GHCB call: every exit type fills the GHCB through these two.

.equ GHCB_GPA_LOW, VC_GHCB_GPA & 0xffffffff     # EAX and EDX of the GHCB MSR write
.equ GHCB_GPA_HIGH, VC_GHCB_GPA >> 32
# The scratch area of string IO and MMIO: the GHCB's shared buffer.
.equ SCRATCH_GPA, VC_GHCB_GPA + GHCB_shared_buffer

# Start a request: no field valid yet, default usage, our protocol version.
vc_ghcb_reset:
    xor eax, eax
    mov [rdi + GHCB_valid_bitmap], rax
    mov [rdi + GHCB_valid_bitmap + 8], rax
    mov dword ptr [rdi + GHCB_ghcb_usage], eax
    mov word ptr [rdi + GHCB_protocol_version], VC_PROTOCOL_VERSION
    ret

# R8 = exit code, R9 = exit_info_1, R10 = exit_info_2: write the GHCB GPA to the GHCB
# MSR and VMGEXIT. Returns only on success (sw_exit_info_1[31:0] = 0); a reply that
# asks for an exception goes to vc_forward_exception, anything else is a VMM error.
vc_hv_call:
    mov [rdi + GHCB_sw_exit_code], r8
    mov [rdi + GHCB_sw_exit_info_1], r9
    mov [rdi + GHCB_sw_exit_info_2], r10
    ghcb_valid sw_exit_code
    ghcb_valid sw_exit_info_1
    ghcb_valid sw_exit_info_2
    mov ecx, MSR_AMD64_SEV_ES_GHCB
    mov eax, GHCB_GPA_LOW
    mov edx, GHCB_GPA_HIGH
    wrmsr
    rep vmmcall                 # VMGEXIT
    mov eax, dword ptr [rdi + GHCB_sw_exit_info_1]
    test eax, eax
    jnz vc_hv_failed
    ret
vc_hv_failed:
    mov rax, [rdi + GHCB_sw_exit_info_1]
    mov [r15 + STATE_failed_info1], rax
    mov rdx, [rdi + GHCB_sw_exit_info_2]
    mov [r15 + STATE_failed_info2], rdx
    cmp eax, GHCB_HV_RESP_ISSUE_EXCEPTION
    je vc_forward_exception
    jmp vc_vmm_error
