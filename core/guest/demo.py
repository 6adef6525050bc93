"""The bundled demo guest of ``sevsim run``: an SEV-ES guest from its first steps.

First it does what early guest firmware does, through the GHCB MSR protocol alone:

1. reads SEV_STATUS and checks that SEV and SEV-ES are on;
2. negotiates the GHCB protocol version (SEV_INFO) and gives up with reason
   GHCB_SEV_ES_PROT_UNSUPPORTED if the hypervisor does not answer;
3. reads the CPUID vendor string and leaf 0x8000001F one register at a time.

Then it uses its GHCB page (mapped shared, C=0) through ordinary instructions that
its native #VC handler (``sevsim.guest.vc_native``) turns into GHCB requests:

4. prints "Hello from an SEV-ES guest" on the UART with ``rep outsb`` (IOIO);
5. reads the MMIO test device's ID, writes its scratch register and reads it back
   (MMIO); a wrong value ends the guest with reason set 1, code 0;
6. asks for termination (reason set 0, code 0: a general request) and halts, as
   Linux's ``sev_es_terminate`` does, in case the hypervisor ignores the request.
"""

from __future__ import annotations

from sevsim.guest.asm import assemble
from sevsim.guest.image import CODE, GuestImage
from sevsim.guest.vc_native import vc_image_args

#: Where the guest stores what it learnt (private memory: the host sees ciphertext).
RESULTS = 0x30000
GREETING = b"Hello from an SEV-ES guest\n"
GREETING_AT = RESULTS + 0x100
MAGIC = 0x5EC0_5EC0_5EC0_5EC0


def demo_source(mmio_test_gpa: int) -> str:
    """The demo's assembly; ``mmio_test_gpa`` is where the machine put the MMIO test
    device (the VMM's layout, which a guest learns as data, as firmware reads ACPI)."""
    return f"""
start:
    mov ecx, 0xC0010131             /* MSR_AMD64_SEV */
    rdmsr
    and eax, 3                      /* SEV | SEV-ES */
    cmp eax, 3
    jne not_sev_es

    mov rax, 0x002                  /* GHCB_MSR_SEV_INFO_REQ */
    call msr_exchange
    mov rbx, rax
    and ebx, 0xfff
    cmp ebx, 0x001                  /* GHCB_MSR_SEV_INFO_RESP */
    jne protocol_unsupported
    mov rbx, rax
    shr rbx, 48                     /* the hypervisor's maximum version */
    cmp rbx, 1
    jb protocol_unsupported

    mov rdi, {RESULTS:#x}
    mov rax, 0x0000000040000004     /* CPUID_REQ fn 0, EBX */
    call cpuid_msr
    mov [rdi], eax
    mov rax, 0x00000000C0000004     /* fn 0, EDX */
    call cpuid_msr
    mov [rdi + 4], eax
    mov rax, 0x0000000080000004     /* fn 0, ECX */
    call cpuid_msr
    mov [rdi + 8], eax
    mov rax, 0x8000001F00000004     /* fn 0x8000001F, EAX: SEV features */
    call cpuid_msr
    mov [rdi + 12], eax
    mov rax, 0x8000001F40000004     /* fn 0x8000001F, EBX: C-bit position */
    call cpuid_msr
    mov [rdi + 16], eax

    mov rsi, {GREETING_AT:#x}       /* #VC -> GHCB IOIO (string, REP) -> UART */
    mov ecx, {len(GREETING)}
    mov dx, 0x3f8
    cld
    rep outsb

    mov rbx, {mmio_test_gpa:#x}     /* #VC (NPF) -> GHCB MMIO_READ/WRITE -> device */
    mov eax, [rbx]                  /* ID register */
    mov [rdi + 20], eax
    mov rax, {MAGIC:#x}
    mov [rbx + 8], rax              /* SCRATCH */
    mov rcx, [rbx + 8]
    cmp rcx, rax
    jne mmio_failed

    mov rax, 0x100                  /* GHCB_MSR_TERM_REQ, set 0 code 0 */
    call msr_exchange
hang:
    hlt
    jmp hang

protocol_unsupported:
    mov rax, 0x10100                /* TERM_REQ, set 0 code 1: PROT_UNSUPPORTED */
    call msr_exchange
    jmp hang

not_sev_es:
    ud2

mmio_failed:
    mov rax, 0x1100                 /* TERM_REQ, set 1 code 0 */
    call msr_exchange
    jmp hang

cpuid_msr:                          /* request in rax; returns the register in eax */
    call msr_exchange
    mov rbx, rax
    and ebx, 0xfff
    cmp ebx, 0x005                  /* GHCB_MSR_CPUID_RESP */
    jne cpuid_failed
    shr rax, 32
    ret
cpuid_failed:
    mov rax, 0x41100                /* TERM_REQ, set 1 code 4: GHCB_TERM_CPUID */
    call msr_exchange
    jmp hang

msr_exchange:                       /* GHCB MSR = rax; VMGEXIT; rax = GHCB MSR */
    mov rdx, rax
    shr rdx, 32
    mov ecx, 0xC0010130
    wrmsr
    rep vmmcall
    rdmsr
    shl rdx, 32
    or rax, rdx
    ret
"""


def demo_image(mmio_test_gpa: int) -> GuestImage:
    """The demo guest, with its native #VC handler, for a machine whose MMIO test
    device is at ``mmio_test_gpa``."""
    args = vc_image_args()
    data = {**args["data"], GREETING_AT: GREETING}
    return GuestImage(assemble(demo_source(mmio_test_gpa), CODE), **{**args, "data": data})
