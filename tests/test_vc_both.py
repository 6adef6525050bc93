"""The native (assembly) and the modeled (Python) #VC handlers on the same instructions.

Each guest stores what its instructions produced into a shared page and terminates;
both handlers must leave the same results in the guest and in the devices.
"""

import pytest

from sevsim.guest.snippets import TERMINATE
from sevsim.guest.vc import VcHandler
from sevsim.guest.vc_native import vc_image_args
from sevsim.kvm.exits import SystemEvent
from sevsim.testing import run_guest
from sevsim.vmm.machine import MMIO_TEST_GPA

OUT = 0x9000  # a second shared page for results
JUNK = 0x1122_3344_5566_7788

PROGRAMS = {
    "cpuid": "xor eax, eax; xor ecx, ecx; cpuid; mov [r15], rbx; mov [r15+8], rdx; "
             "mov [r15+16], rcx; mov eax, 0x8000001f; cpuid; mov [r15+24], rax; mov [r15+32], rbx",
    "msr": "mov ecx, 0x2ff; mov eax, 6; xor edx, edx; wrmsr; mov ecx, 0x2ff; "
           "rdmsr; mov [r15], rax; mov ecx, 0x1a0; rdmsr; mov [r15+8], rax",
    "port-io": f"mov rax, {JUNK}; mov dx, 0x3fd; in al, dx; mov [r15], rax; "
               f"mov dx, 0x3f8; mov al, 0x41; out dx, al; mov rax, {JUNK}; in eax, dx; "
               "mov [r15+8], rax; mov al, 0x5a; out 0x80, al",
    "string-io": "mov rsi, 0x30000; mov ecx, 5; mov dx, 0x3f8; rep outsb",
    "mmio": f"mov rbx, {MMIO_TEST_GPA}; mov eax, [rbx]; mov [r15], rax; "
            f"mov rax, {JUNK}; mov [rbx+8], rax; mov rcx, [rbx+8]; mov [r15+8], rcx; "
            "mov word ptr [rbx+0x18], 0x1234; movzx edx, byte ptr [rbx+0x18]; mov [r15+16], rdx; "
            "movsx rdx, word ptr [rbx+0x10]; mov [r15+24], rdx; mov byte ptr [rbx+0x100], 0xee; "
            "mov al, [rbx+0x100]; mov [r15+32], rax",
    "vmmcall": "mov eax, 11; vmmcall; mov [r15], rax; mov eax, 77; vmmcall; mov [r15+8], rax",
    "rdpmc": f"mov rax, {JUNK}; mov rdx, {JUNK}; xor ecx, ecx; rdpmc; mov [r15], rax; "
             "mov [r15+8], rdx",
    "cache-and-wait": "wbinvd; invd; mov rax, 0x30000; xor ecx, ecx; xor edx, edx; monitor; "
                      "xor eax, eax; mwait; mov qword ptr [r15], 1",
}  # fmt: skip


def run(program: str, modeled: bool):
    image = {} if modeled else vc_image_args()
    data = {**image.pop("data", {}), 0x30000: b"hello"}
    return run_guest(
        f"mov r15, {OUT}\n{PROGRAMS[program]}\n{TERMINATE}",
        enable=["msr_protocol", "ioio", "mmio"],
        vc_model=VcHandler() if modeled else None,
        shared=frozenset({0x7000, OUT}),
        data=data,
        **image,
    )


def observed(run_) -> tuple:
    assert isinstance(run_.exit, SystemEvent), run_.trace.lines[-8:]
    d = run_.devices
    return (run_.vm.memory.read(OUT, 40), bytes(d.uart.output), d.post.codes,
            d.mmio_test.scratch, d.mmio_test.accumulator, d.mmio_test.writes,
            bytes(d.mmio_test.buffer[:4]))  # fmt: skip


#: A few values each program must produce (offset in the results, bytes), so that
#: agreement cannot be two handlers doing nothing.
EXPECT = {
    "cpuid": (0, b"Auth"),
    "msr": (0, b"\x06"),
    "port-io": (0, bytes.fromhex("60776655")),  # LSR in AL, RAX's other bytes kept
    "mmio": (0, b"SVES"),
    "vmmcall": (8, (-1000).to_bytes(8, "little", signed=True)),
    "rdpmc": (0, bytes(16)),  # counter 0 reads zero into EAX and EDX (upper halves cleared)
    "cache-and-wait": (0, b"\x01"),
}


@pytest.mark.parametrize("program", PROGRAMS)
def test_native_and_modeled_handlers_agree(program):
    native, modeled = observed(run(program, False)), observed(run(program, True))
    assert native == modeled
    if program in EXPECT:
        offset, value = EXPECT[program]
        assert native[0][offset : offset + len(value)] == value
    if program == "string-io":
        assert native[1] == b"hello"
