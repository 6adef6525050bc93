"""x86 behaviour the CPU model must get right in front of interception.

Each guest's exception handlers record (vector, error code, RIP) in the shared page
and terminate; the tests read what the guest saw.
"""

import struct

import pytest
from guests import guest, launch, watched_kvm

from sevsim.arch.exits import SvmExit
from sevsim.arch.vmcb import VMCB_CONTROL
from sevsim.guest.asm import assemble
from sevsim.guest.image import USER_CODE64_SEL, USER_DATA_SEL
from sevsim.guest.snippets import TERMINATE
from sevsim.hw.inspect import cpu_of
from sevsim.kvm.exits import FailEntry, SystemEvent
from sevsim.testing import run_guest

RECORD = 0x7900


def recorder(vector: int, address: int, error_code: bool = True) -> bytes:
    """A handler storing vector, error code (or 0) and the interrupted RIP."""
    rip = "[rsp + 8]" if error_code else "[rsp]"
    code = "mov rax, [rsp]" if error_code else "xor eax, eax"
    return assemble(f"""
        mov rsi, {RECORD}
        mov qword ptr [rsi], {vector}
        {code}
        mov [rsi + 8], rax
        mov rax, {rip}
        mov [rsi + 16], rax
    """ + TERMINATE, address)


HANDLERS = {13: 0x30000, 29: 0x30100, 6: 0x30200}
BLOBS = {
    0x30000: recorder(13, 0x30000),
    0x30100: recorder(29, 0x30100),
    0x30200: recorder(6, 0x30200, error_code=False),
}


def seen(run) -> tuple[int, int, int]:
    assert isinstance(run.exit, SystemEvent), run.trace.lines
    return struct.unpack("<QQQ", run.vm.memory.read(RECORD, 24))


USER = 0x3A000


def in_ring3(user_code: str):
    """Drop to CPL 3 and run ``user_code`` there (every mapping allows user access)."""
    kernel = f"""
        push {USER_DATA_SEL}
        push 0x3c000
        push 0x2
        push {USER_CODE64_SEL}
        push {USER}
        iretq
    """
    blobs = {**BLOBS, USER: assemble(user_code + "\nhlt", USER)}
    return run_guest(kernel, enable=["msr_protocol"], idt=HANDLERS, data=blobs)


@pytest.mark.parametrize(
    ("insn", "vector"),
    [("in al, dx", 13), ("mov ecx, 0xc0010130; rdmsr", 13), ("mov ecx, 0xc0010130; wrmsr", 13),
     ("wbinvd", 13), ("mov rax, dr7", 13), ("mov cr4, rax", 13), ("mov cr8, rax", 13),
     ("mov rax, cr8", 13), ("monitor", 6)],
)  # fmt: skip
def test_privileged_instructions_fault_in_ring3_before_any_intercept(insn, vector):
    got_vector, error_code, rip = seen(in_ring3(insn))
    assert got_vector == vector
    assert rip >= USER and (vector == 6 or error_code == 0)


def test_cpuid_in_ring3_is_still_a_vc():
    vector, error_code, rip = seen(in_ring3("cpuid"))
    assert (vector, error_code, rip) == (29, SvmExit.CPUID, USER)


def test_writes_through_an_alias_rescan_the_code():
    # 0x31000 holds "nop; nop; ret" and runs once; then the guest writes CPUID over the
    # nops through another virtual address of the same page (PT slot 0x1ff).
    run = run_guest("""
        mov rax, 0x31000
        call rax
        mov rax, 0x8000000031007        /* present, writable, user, C-bit 51 */
        mov rsi, 0x4ff8
        mov [rsi], rax
        mov rdi, 0x1ff000
        mov word ptr [rdi], 0xa20f
        mov rax, 0x31000
        call rax
        hlt
    """,
        enable=["msr_protocol"], idt=HANDLERS, data={**BLOBS, 0x31000: b"\x90\x90\xc3"})
    assert seen(run) == (29, SvmExit.CPUID, 0x31000)


def test_code_mapped_with_c_bit_clear_still_executes_decrypted():
    # Instruction fetches are always private: a C=0 mapping of launched code runs it.
    run = run_guest("""
        mov rax, 0x31007               /* PT slot 0x1fe -> 0x31000, C-bit clear */
        mov rsi, 0x4ff0
        mov [rsi], rax
        mov rax, 0x1fe001
        jmp rax
    """, enable=["msr_protocol"], idt=HANDLERS, data={**BLOBS, 0x31000: b"\x90\x0f\xa2\xf4"})
    assert seen(run) == (29, SvmExit.CPUID, 0x1FE001)


def test_non_canonical_access_is_gp_not_pf():
    run = run_guest("mov rax, 0x0000900000000000; mov rax, [rax]",
                    enable=["msr_protocol"], idt=HANDLERS, data=BLOBS)  # fmt: skip
    assert seen(run)[:2] == (13, 0)


def test_software_int_13_pushes_no_error_code():
    run = run_guest("int 0x0d", enable=["msr_protocol"],
                    idt={13: 0x30200}, data={0x30200: recorder(13, 0x30200, error_code=False)})
    assert seen(run) == (13, 0, 0x20002)  # RIP after the INT, where the frame starts


def test_page_tables_outside_ram_fault_instead_of_crashing():
    # PML4[1] points at 0x40000000, where the VM has no RAM: a nested fault, then #VC.
    run = run_guest("""
        mov rax, 0x40000003
        mov rsi, 0x1008
        mov [rsi], rax
        mov rax, 0x8000000000
        mov rax, [rax]
    """, enable=["msr_protocol"], idt=HANDLERS, data=BLOBS)
    assert seen(run)[:2] == (29, SvmExit.NPF)


def test_a_vmsa_runs_only_under_its_own_guests_key():
    kvm, sim = watched_kvm()
    a, b = launch(guest("hlt"), kvm), launch(guest("hlt"), kvm)
    VMCB_CONTROL.set(a.vcpus[0].vmcb, "vmsa_pa", b.vcpus[0].vmsa.pa)
    exit_ = a.vcpus[0].run()
    assert isinstance(exit_, FailEntry) and "another guest's key" in sim.why()


def test_int_n_from_ring3_through_a_ring0_gate_is_gp():
    vector, error_code, rip = seen(in_ring3("int 0x1d"))
    assert (vector, error_code) == (13, 0x1D * 8 + 2)  # IDT bit set, the gate's index
    assert rip == USER  # a fault: RIP at the INT


def test_cr8_is_the_cpus_tpr_and_survives_exits():
    """Unicorn's CR8 is an APIC it does not have (reads 0); the CPU model keeps the TPR
    itself, saves it in the VMSA's V_TPR at #VMEXIT and reloads it at VMRUN."""
    source = f"""
        mov eax, 9; mov cr8, rax                 /* CR8 write trap: an exit */
        mov ecx, 0xC0010130; mov eax, 2; xor edx, edx; wrmsr; rep vmmcall   /* another */
        mov rbx, cr8; mov r12, cr8
        mov rsi, {RECORD}; mov [rsi], rbx; mov [rsi + 8], r12
        {TERMINATE}
    """
    run = run_guest(source, enable=["msr_protocol", "crtraps"])
    assert isinstance(run.exit, SystemEvent)
    assert struct.unpack("<QQ", run.vm.memory.read(RECORD, 16)) == (9, 9)
    assert run.vm.vcpus[0].plugin_states["crtraps"].cr8 == 9  # and KVM's copy, from the trap


def test_v_tpr_of_the_initial_state_is_cr8_and_the_other_vintr_bits_survive():
    run = run_guest(f"mov rax, cr8; mov rsi, {RECORD}; mov [rsi], rax\n" + TERMINATE,
                    enable=["msr_protocol", "crtraps"],
                    registers={"vintr_ctrl": 0x1_0305})  # fmt: skip
    vcpu = run.vm.vcpus[0]
    assert isinstance(run.exit, SystemEvent)
    assert vcpu.plugin_states["crtraps"].cr8 == 5  # KVM's copy, from KVM_SET_SREGS
    assert struct.unpack("<Q", run.vm.memory.read(RECORD, 8))[0] == 5  # the guest's CR8
    cpu = cpu_of(vcpu.vmsa)  # white box: what #VMEXIT saves into the VMSA
    assert cpu.save_state()["vintr_ctrl"] == 0x1_0305


def test_efer_writes_are_checked_even_without_the_trap_armed():
    """Unicorn drops unknown EFER bits silently; the CPU model raises #GP as hardware."""
    vm = launch(guest("mov ecx, 0xC0000080; rdmsr; or eax, 0x10000; wrmsr; hlt",
                      idt=HANDLERS, data=BLOBS))  # fmt: skip
    vcpu = vm.vcpus[0]
    intercepts = bytearray(VMCB_CONTROL.get(vcpu.vmcb, "intercepts"))
    intercepts[143 // 8] &= ~(1 << 143 % 8)  # no TRAP_EFER_WRITE
    VMCB_CONTROL.set(vcpu.vmcb, "intercepts", bytes(intercepts))
    assert isinstance(vcpu.run(), SystemEvent)
    assert struct.unpack("<QQ", vm.memory.read(RECORD, 16)) == (13, 0)
