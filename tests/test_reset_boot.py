"""A guest that starts from the x86 reset state and makes its own way to long mode.

The firmware image is built here: real-mode code at the reset vector loads a GDT,
enters protected mode, enables PAE paging with C-bit page tables that live in the
(measured) image, enters long mode and asks for termination through the GHCB MSR
protocol. Each mode's code runs on the same vCPU engine.
"""

import struct

from guests import terminate_handler
from unicorn import x86_const as x86

from sevsim.arch.exits import SvmExit
from sevsim.guest.asm import assemble
from sevsim.hw.inspect import cpu_of
from sevsim.kvm.dispatch import ExitHandler, ExitKind, ExitTable
from sevsim.kvm.exits import SystemEvent, SystemEventType
from sevsim.kvm.vm import Kvm
from sevsim.vmm.firmware import build_firmware_image, parse_firmware
from sevsim.vmm.launch import launch_firmware

BASE = 0xFFFF_0000
START16, PROT32, LONG64, GDTR, GDT, PML4, PDPT = (BASE + o for o in
    (0x0, 0x100, 0x200, 0x800, 0x810, 0x8000, 0x9000))  # fmt: skip
CBIT = 1 << 51


def descriptor(access: int, flags: int) -> bytes:
    """A flat descriptor: base 0, limit 0xfffff, given access byte and flags nibble."""
    return struct.pack("<HHBBBB", 0xFFFF, 0, 0, access, flags << 4 | 0xF, 0)


def firmware() -> bytes:
    start16 = b"\xfa"  # cli
    start16 += b"\x66\x2e\x0f\x01\x16" + struct.pack("<H", GDTR - BASE)  # o32 lgdt cs:[GDTR]
    start16 += assemble("mov eax, cr0; or eax, 1; mov cr0, eax", bits=16)
    start16 += b"\x66\xea" + struct.pack("<IH", PROT32, 0x08)  # o32 jmp far 0x08:PROT32
    prot32 = assemble(f"""
        mov ax, 0x10; mov ds, ax; mov es, ax; mov ss, ax
        mov eax, cr4; or eax, 0x20; mov cr4, eax       /* PAE */
        mov eax, {PML4}; mov cr3, eax
        mov ecx, 0xC0000080; rdmsr; or eax, 0x100; wrmsr   /* EFER.LME */
        mov eax, cr0; or eax, 0x80000000; mov cr0, eax    /* PG: long mode is active */
    """, PROT32, bits=32) + b"\xea" + struct.pack("<IH", LONG64, 0x18)
    long64 = assemble("""
        mov ecx, 0xC0010131; rdmsr; mov ebx, eax       /* SEV_STATUS, kept for the check */
        mov ecx, 0xC0010130; mov eax, 0x100; xor edx, edx; wrmsr
        rep vmmcall
    """, LONG64)
    gdt = b"\0" * 8 + descriptor(0x9B, 0xC) + descriptor(0x93, 0xC) + descriptor(0x9B, 0xA)
    pml4 = struct.pack("<Q", PDPT | CBIT | 0x3)
    pdpt = b"".join(struct.pack("<Q", i << 30 | CBIT | 0x83) for i in range(4))
    code = {START16: start16, PROT32: prot32, LONG64: long64, GDT: gdt,
            GDTR: struct.pack("<HI", len(gdt) - 1, GDT), PML4: pml4, PDPT: pdpt}  # fmt: skip
    reset_vector = b"\xe9" + struct.pack("<H", (START16 - BASE - 0xFFF3) & 0xFFFF)  # jmp near
    return build_firmware_image(BASE + 0x1000, reset_vector, size=0x10000, code=code)


def test_reset_state_to_long_mode_to_termination():
    table = ExitTable([ExitHandler(ExitKind.MSR_PROTOCOL, 0x100, terminate_handler)])
    traps = []
    # Without the crtraps plugin nobody would own the CR/EFER write traps; note them, resume.
    for code in (SvmExit.CR0_WRITE_TRAP, SvmExit.CR4_WRITE_TRAP, SvmExit.EFER_WRITE_TRAP):
        table.register(ExitHandler(ExitKind.VMEXIT, code,
                                   lambda ctx: traps.append((ctx.code, ctx.exit_info_1))))
    vm = launch_firmware(Kvm(), parse_firmware(firmware(), "reset test"), handlers=table)
    vm.launch_measure()
    vm.launch_finish()
    exit_ = vm.vcpus[0].run()
    assert exit_ == SystemEvent(SystemEventType.SEV_TERM, (0x100,))
    # Real mode set PE; 32-bit code set PAE (next to the MCE KVM added at launch),
    # EFER.LME (SVME stays set), then PG; each trap carried the new value.
    assert traps == [(0x90, 0x11), (0x94, 0x60), (0x8F, 0x1100), (0x90, 0x8000_0011)]
    assert cpu_of(vm.vcpus[0].vmsa).bits() == 64  # white box: the CPU ended in long mode


#: Where the return-to-real-mode guest puts its 32-bit stack (above 64 KiB, as
#: OVMF's MpInitLib puts an SEV-ES AP's reset stack) and its real-mode code.
BIG_STACK, REAL_CODE = 0x2_0000, 0x8000
PROT16 = BASE + 0x400  # 16-bit protected-mode code, after the copies at LONG64
#: TERM_REQ values: reason code 1 from the right real-mode target, 2 from the wrong one.
REACHED, WRONG = 0x1100, 0x2100


def back_to_real_mode_firmware() -> bytes:
    """Reset state -> protected mode -> a 16-bit protected-mode segment -> PE cleared
    -> IRET to real mode, with SS still holding the flat 32-bit descriptor and ESP
    above 64 KiB: the return path MpInitLib takes for an SEV-ES AP."""
    start16 = b"\xfa\x66\x2e\x0f\x01\x16" + struct.pack("<H", GDTR - BASE)
    start16 += assemble("mov eax, cr0; or eax, 1; mov cr0, eax", bits=16)
    start16 += b"\x66\xea" + struct.pack("<IH", PROT32, 0x08)

    def terminate(value: int) -> str:
        return f"mov ecx, 0xC0010130; mov eax, {value}; xor edx, edx; wrmsr; rep vmmcall"

    real = assemble(terminate(REACHED), bits=16)
    wrong = assemble(terminate(WRONG), bits=16)
    prot32 = assemble(f"""
        mov ax, 0x10; mov ds, ax; mov es, ax; mov ss, ax
        mov esi, {LONG64}; mov edi, {REAL_CODE}; mov ecx, {len(real)}; rep movsb
        mov esi, {LONG64 + 0x100}; mov edi, 0x100; mov ecx, {len(wrong)}; rep movsb
        mov dword ptr [0xFFFA], 0x00100000      /* what SS:SP would pop: 0000:0100 */
        mov word ptr [0xFFFE], 2
        mov esp, {BIG_STACK - 6}
        mov word ptr [esp], 0                   /* IP */
        mov word ptr [esp + 2], {REAL_CODE >> 4} /* CS */
        mov word ptr [esp + 4], 0x402           /* FLAGS: DF, which nothing after clears */
        mov esp, {BIG_STACK - 8}
    """, PROT32, bits=32) + b"\xea" + struct.pack("<IH", PROT16, 0x20)
    prot16 = b"\x58" + assemble("mov eax, cr0; and eax, 0xFFFFFFFE; mov cr0, eax", bits=16)
    prot16 += b"\xcf"  # pop ax (alignment), PE off, iret
    gdt = (b"\0" * 8 + descriptor(0x9B, 0xC) + descriptor(0x93, 0xC) + descriptor(0x9B, 0xA)
           + descriptor(0x9B, 0x8))  # fmt: skip
    code = {START16: start16, PROT32: prot32, PROT16: prot16, LONG64: real, LONG64 + 0x100: wrong,
            GDT: gdt, GDTR: struct.pack("<HI", len(gdt) - 1, GDT)}  # fmt: skip
    reset_vector = b"\xe9" + struct.pack("<H", (START16 - BASE - 0xFFF3) & 0xFFFF)
    return build_firmware_image(BASE + 0x1000, reset_vector, size=0x10000, code=code)



def test_iret_back_to_real_mode_pops_through_esp_of_a_32_bit_stack():
    """The CPU pops IRET's frame at SS.base + ESP when SS's cached descriptor is
    32-bit, in real mode too; Unicorn would pop at SS:SP (0xFFFA here) and reach
    the wrong code. Before the model retired this IRET, the guest terminated WRONG.
    """
    table = ExitTable([ExitHandler(ExitKind.MSR_PROTOCOL, 0x100, terminate_handler)])
    for code in (SvmExit.CR0_WRITE_TRAP, SvmExit.CR4_WRITE_TRAP, SvmExit.EFER_WRITE_TRAP):
        table.register(ExitHandler(ExitKind.VMEXIT, code, lambda ctx: None))
    image = parse_firmware(back_to_real_mode_firmware(), "real-mode return test")
    vm = launch_firmware(Kvm(), image, handlers=table, ram_size=1 << 20)
    vm.launch_measure()
    vm.launch_finish()
    assert vm.vcpus[0].run() == SystemEvent(SystemEventType.SEV_TERM, (REACHED,))
    cpu = cpu_of(vm.vcpus[0].vmsa)
    assert cpu.bits() == 16
    assert cpu.regs.segment("cs").base == REAL_CODE  # CS: the selector times 16
    assert cpu.regs.read(x86.UC_X86_REG_RSP) == BIG_STACK  # ESP, not SP, moved on
    assert cpu.regs.rflags & 0x400  # FLAGS came from the frame
