"""The native (assembly) and the modeled (Python) #VC handlers on the same instructions.

Each guest stores what its instructions produced into a shared page and terminates;
both handlers must leave the same results in the guest and in the devices, make the
same requests of the hypervisor, and produce the values :data:`EXPECT` lists. Where
the two knowingly differ, :data:`EXPECT` says what each must produce (:class:`Differ`).

Exceptions the hypervisor asks for (#GP, #UD) reach the guest's own handlers, which
record the vector, the RIP and (#GP) the error code, then terminate.
"""

import struct

import pytest
from attrs import frozen
from test_fidelity_kvm import table_without_rdtscp

from sevsim import hookimpl
from sevsim.arch.exits import SvmExit
from sevsim.arch.ghcb_msr import TermReason
from sevsim.guest.asm import assemble
from sevsim.guest.image import CODE
from sevsim.guest.snippets import TERMINATE
from sevsim.guest.vc import VcHandler
from sevsim.guest.vc_native import (
    HANDLER_SIZE,
    VC_HANDLER_ADDRESS,
    term_request,
    vc_image_args,
)
from sevsim.kvm.dispatch import ExitHandler, ExitKind
from sevsim.kvm.exits import SystemEvent, SystemEventType
from sevsim.testing import run_guest
from sevsim.vmm.machine import MMIO_TEST_GPA

OUT = 0x9000  # a second shared page for results
#: Where the guest's #GP and #UD handlers record vector, RIP and error code (#GP only).
EXC = OUT + 0x100
JUNK = 0x1122_3344_5566_7788
MASK64 = (1 << 64) - 1
ID = 0x5345_5653  # the MMIO test device's ID register ("SEVS")

GP_HANDLER, UD_HANDLER = 0x38000, 0x38100
EXCEPTION_HANDLERS = {
    GP_HANDLER: f"mov rsi, {EXC}; mov qword ptr [rsi], 13; mov rax, [rsp + 8]; "
                "mov [rsi + 8], rax; mov rax, [rsp]; mov [rsi + 16], rax",
    UD_HANDLER: f"mov rsi, {EXC}; mov qword ptr [rsi], 6; mov rax, [rsp]; mov [rsi + 8], rax",
}  # fmt: skip

PROGRAMS = {
    "cpuid": "xor eax, eax; xor ecx, ecx; cpuid; mov [r15], rbx; mov [r15+8], rdx; "
             "mov [r15+16], rcx; mov eax, 0x8000001f; cpuid; mov [r15+24], rax; mov [r15+32], rbx",
    "msr": "mov ecx, 0x2ff; mov eax, 6; xor edx, edx; wrmsr; mov ecx, 0x2ff; "
           "rdmsr; mov [r15], rax; mov ecx, 0x1a0; rdmsr; mov [r15+8], rax",
    # KVM's MSR model does not know 0x12345678: it replies "issue exception #GP".
    "msr-unknown": "mov ecx, 0x12345678; rdmsr; mov [r15], rax",
    "port-io": f"mov rax, {JUNK}; mov dx, 0x3fd; in al, dx; mov [r15], rax; "
               f"mov dx, 0x3f8; mov al, 0x41; out dx, al; mov rax, {JUNK}; in eax, dx; "
               "mov [r15+8], rax; mov al, 0x5a; out 0x80, al",
    # 16 and 32 bits wide at COM1: THR then IER (then FCR, LCR); IER and IIR read back.
    "port-io-wide": f"mov rax, {JUNK}; mov dx, 0x3f8; mov ax, 0x0542; out dx, ax; "
                    f"mov rax, {JUNK}; inc dx; in ax, dx; mov [r15], rax; dec dx; "
                    f"mov eax, 0x03000a43; out dx, eax; mov rax, {JUNK}; in eax, dx; "
                    "mov [r15+8], rax",
    "string-io": "mov rsi, 0x30000; mov ecx, 5; mov dx, 0x3f8; rep outsb",
    # The debug port reads back 0xE9; a word at 0x3FD is the UART's LSR and MSR.
    "string-in": "lea rdi, [r15+0x40]; mov ecx, 5; mov dx, 0x402; rep insb; mov [r15], rdi; "
                 "mov [r15+8], rcx; lea rdi, [r15+0x50]; mov ecx, 3; mov dx, 0x3fd; "
                 "rep insw; mov [r15+16], rdi; mov [r15+24], rcx",
    "mmio": f"mov rbx, {MMIO_TEST_GPA}; mov eax, [rbx]; mov [r15], rax; "
            f"mov rax, {JUNK}; mov [rbx+8], rax; mov rcx, [rbx+8]; mov [r15+8], rcx; "
            "mov word ptr [rbx+0x18], 0x1234; movzx edx, byte ptr [rbx+0x18]; mov [r15+16], rdx; "
            "movsx rdx, word ptr [rbx+0x10]; mov [r15+24], rdx; mov byte ptr [rbx+0x100], 0xee; "
            "mov al, [rbx+0x100]; mov [r15+32], rax",
    # Writes (C6 imm8, 88 from CL, AH and R9B, A2 moffs), then reads (8A into AL and
    # AH, MOVZX, MOVSX, A0 moffs); the accumulator at 0x18 adds, WRITES counts.
    "mmio-byte": f"mov rbx, {MMIO_TEST_GPA}; mov byte ptr [rbx+0x100], 0x81; "
                 "mov cl, 0x7f; mov [rbx+0x101], cl; mov eax, 0x5a00; mov [rbx+0x102], ah; "
                 f"mov r9b, 0x33; mov [rbx+0x103], r9b; mov al, 0x44; "
                 f"movabs byte ptr [{MMIO_TEST_GPA + 0x104}], al; mov byte ptr [rbx+0x18], 5; "
                 f"mov rax, {JUNK}; mov al, [rbx+0x100]; mov [r15], rax; "
                 f"mov rax, {JUNK}; mov ah, [rbx+0x102]; mov [r15+8], rax; "
                 f"mov rcx, {JUNK}; movzx ecx, byte ptr [rbx+0x100]; mov [r15+16], rcx; "
                 "movsx rdx, byte ptr [rbx+0x100]; mov [r15+24], rdx; "
                 f"mov rsi, {JUNK}; movsx esi, byte ptr [rbx+0x101]; mov [r15+32], rsi; "
                 f"mov rax, {JUNK}; movabs al, byte ptr [{MMIO_TEST_GPA + 0x104}]; "
                 "mov [r15+40], rax; movzx edi, byte ptr [rbx+0x18]; mov [r15+48], rdi; "
                 "movzx r10, byte ptr [rbx+0x10]; mov [r15+56], r10",
    # Writes (66 C7 imm16, 66 89 from CX, into the scratch register's bytes 2-3), then
    # reads (66 8B into AX and R8W, MOVZX, MOVSX).
    "mmio-word": f"mov rbx, {MMIO_TEST_GPA}; mov word ptr [rbx+0x100], 0x8001; "
                 "mov cx, 0x7ffe; mov [rbx+0x102], cx; mov word ptr [rbx+0x18], 0x300; "
                 "mov word ptr [rbx+0x0a], 0xbeef; "
                 f"mov rax, {JUNK}; mov ax, [rbx+0x100]; mov [r15], rax; "
                 f"mov rcx, {JUNK}; movzx ecx, word ptr [rbx+0x100]; mov [r15+8], rcx; "
                 "movsx rdx, word ptr [rbx+0x100]; mov [r15+16], rdx; "
                 f"mov rsi, {JUNK}; movsx esi, word ptr [rbx+0x102]; mov [r15+24], rsi; "
                 f"mov r8, {JUNK}; mov r8w, [rbx+0x0a]; mov [r15+32], r8; "
                 "movzx edi, word ptr [rbx+0x18]; mov [r15+40], rdi; "
                 "movsx r11, word ptr [rbx+0x10]; mov [r15+48], r11",
    # Writes (C7 imm32, 89 from ECX and R9D, the scratch register's upper half), then
    # reads (8B into EAX, EDX and R10D: zero-extended to 64 bits).
    "mmio-dword": f"mov rbx, {MMIO_TEST_GPA}; mov dword ptr [rbx+0x100], 0x80000001; "
                  "mov ecx, 0x12345678; mov [rbx+0x104], ecx; mov dword ptr [rbx+0x18], 0x70000; "
                  "mov r9d, 0xcafef00d; mov [rbx+0x0c], r9d; "
                  f"mov rax, {JUNK}; mov eax, [rbx+0x100]; mov [r15], rax; "
                  f"mov rdx, {JUNK}; mov edx, [rbx+0x0c]; mov [r15+8], rdx; "
                  f"mov r10, {JUNK}; mov r10d, [rbx+0x104]; mov [r15+16], r10; "
                  f"mov rsi, {JUNK}; mov esi, [rbx]; mov [r15+24], rsi; "
                  "mov edi, [rbx+0x18]; mov [r15+32], rdi; mov ecx, [rbx+0x10]; mov [r15+40], rcx",
    # Writes (REX.W C7: imm32 sign-extended, 89 from RCX, A3 moffs), then reads (8B,
    # A1 moffs).
    "mmio-qword": f"mov rbx, {MMIO_TEST_GPA}; mov qword ptr [rbx+0x100], -2; "
                  f"mov rcx, {JUNK}; mov [rbx+0x108], rcx; mov rax, 0x100000000; "
                  f"mov [rbx+0x18], rax; mov rax, 0x0123456789abcdef; "
                  f"movabs qword ptr [{MMIO_TEST_GPA + 8}], rax; "
                  "mov r11, [rbx+0x100]; mov [r15], r11; mov rdx, [rbx+0x108]; mov [r15+8], rdx; "
                  f"movabs rax, qword ptr [{MMIO_TEST_GPA + 8}]; mov [r15+16], rax; "
                  "mov rsi, [rbx+0x18]; mov [r15+24], rsi; mov rdi, [rbx+0x10]; mov [r15+32], rdi",
    # MOVSXD (63 /r) is not among the native handler's MMIO forms.
    "mmio-movsxd": f"mov rbx, {MMIO_TEST_GPA}; mov dword ptr [rbx+0x100], 0x80000001; "
                   "movsxd rax, dword ptr [rbx+0x100]; mov [r15], rax",
    "vmmcall": "mov eax, 11; vmmcall; mov [r15], rax; mov eax, 77; vmmcall; mov [r15+8], rax",
    "rdpmc": f"mov rax, {JUNK}; mov rdx, {JUNK}; xor ecx, ecx; rdpmc; mov [r15], rax; "
             "mov [r15+8], rdx",
    # KVM queues #UD through EVENTINJ (and replies success in the GHCB); the guest's
    # CPUID lacks RDTSCP, else the instruction runs natively.
    "rdtscp": f"mov rax, {JUNK}; rdtscp; mov [r15], rax",
    # Reads come from the handler's copy (reset 0x400), with no exit; a write is sent.
    "dr7": f"mov rbx, {JUNK}; mov rbx, dr7; mov [r15], rbx; mov rax, 0xf0401; mov dr7, rax; "
           f"mov r9, {JUNK}; mov r9, dr7; mov [r15+8], r9",
    # Reserved bits 12, 14 and 15 set, bit 10 (reads as one) clear.
    "dr7-reserved": "mov rax, 0xd0f1; mov dr7, rax; mov rbx, dr7; mov [r15], rbx",
    # The upper half of DR7 set.
    "dr7-upper": "mov rax, 0x100000401; mov dr7, rax; mov rbx, dr7; mov [r15], rbx",
    "cache-and-wait": "wbinvd; invd; mov rax, 0x30000; xor ecx, ecx; xor edx, edx; monitor; "
                      "xor eax, eax; mwait; mov qword ptr [r15], 1",
}  # fmt: skip


def source(program: str) -> str:
    return f"mov r15, {OUT}\n{PROGRAMS[program]}"


def run(program: str, modeled: bool):
    idt = {13: GP_HANDLER, 6: UD_HANDLER}
    image = {"idt": idt} if modeled else vc_image_args(idt=idt)
    handlers = {at: assemble(f"{code}\n{TERMINATE}", at) for at, code in EXCEPTION_HANDLERS.items()}
    data = {**image.pop("data", {}), 0x30000: b"hello", **handlers}
    return run_guest(
        f"{source(program)}\n{TERMINATE}",
        enable=["msr_protocol", "ioio", "mmio"],
        vc_model=VcHandler() if modeled else None,
        shared=frozenset({0x7000, OUT}),
        data=data,
        # RDTSCP is intercepted (and gets #UD) only when the guest's CPUID lacks it.
        vm_args={"cpuid": table_without_rdtscp()} if program == "rdtscp" else None,
        **image,
    )


#: What the exception record shows for an exception taken inside the native handler
#: (one KVM queues in EVENTINJ arrives right after the handler's VMGEXIT).
IN_VC_HANDLER = "inside the native #VC handler"


def observed(run_) -> dict:
    assert isinstance(run_.exit, SystemEvent), run_.trace.lines[-8:]
    d = run_.devices
    memory = run_.vm.memory
    vector, rip, error = struct.unpack("<3Q", memory.read(EXC, 24))
    if VC_HANDLER_ADDRESS <= rip < VC_HANDLER_ADDRESS + HANDLER_SIZE:
        rip = IN_VC_HANDLER
    return {
        "exit": run_.exit,
        "out": struct.unpack("<16Q", memory.read(OUT, 128)),
        "exception": (vector, rip, error) if vector else None,
        # The GHCB requests, as the trace shows them: exit code and exit information.
        "requests": tuple(" ".join(line.split()) for line in run_.trace.lines
                          if line.lstrip().startswith("GHCB ")),
        "uart": (bytes(d.uart.output), d.uart.ier, d.uart.lcr),
        "debug": bytes(d.debug.output),
        "post": d.post.codes,
        "mmio": (d.mmio_test.scratch, d.mmio_test.accumulator, d.mmio_test.writes,
                 bytes(d.mmio_test.buffer[:16])),
    }  # fmt: skip


@frozen
class Differ:
    """A known difference between the handlers: what each must produce, and why."""

    native: object
    modeled: object
    why: str


def address_of(program: str, insn: str) -> int:
    """The guest address of the first ``insn`` in ``program``."""
    before = source(program).split(insn)[0]
    return CODE + len(assemble(before, CODE))


def after(program: str, insn: str) -> int:
    """The guest address of the instruction after the first ``insn`` in ``program``."""
    return address_of(program, insn) + len(assemble(insn))


DONE = SystemEvent(SystemEventType.SEV_TERM, (0x100,))  # the guest's own TERMINATE
RESET = 0x400  # DR7
UART_IDLE = (b"", 0, 0)
MMIO_IDLE = (0, 0, 0, bytes(16))


def mmio(op: str, offset: int, size: int) -> str:
    """An MMIO request to the test device, as ``observed`` lists it."""
    return f"GHCB SVM_VMGEXIT_MMIO_{op} {size} bytes at {MMIO_TEST_GPA + offset:#x}"


def mmio_requests(size: int, writes: tuple[int, ...], reads: tuple[int, ...]) -> tuple:
    """``size``-byte writes to the device at these offsets, then reads."""
    return (*(mmio("WRITE", at, size) for at in writes),
            *(mmio("READ", at, size) for at in reads))  # fmt: skip


WRITE_DR7 = "GHCB SVM_EXIT_WRITE_DR7 info1 0x0 info2 0x0"


#: program -> what ``observed`` must show: the first qwords of "out", or any other
#: key's whole value; a :class:`Differ` where the handlers knowingly disagree.
EXPECT = {
    "cpuid": {"out": (int.from_bytes(b"Auth", "little"), int.from_bytes(b"enti", "little"),
                      int.from_bytes(b"cAMD", "little"))},
    "msr": {"out": (6, 1)},  # MTRR_DEF_TYPE as written; MISC_ENABLE's fast strings
    "msr-unknown": {
        "out": (0,),  # never stored: the #GP handler terminates
        "exception": (13, address_of("msr-unknown", "rdmsr"), 0),
        "requests": ("GHCB SVM_EXIT_MSR rdmsr",),
    },
    "port-io": {
        "out": (JUNK & ~0xFF | 0x60, 0x0001_0000),  # LSR into AL; RBR IER IIR LCR
        "uart": (b"A", 0, 0),
        "post": [0x5A],
    },
    "port-io-wide": {
        # IER 5, IIR 1 into AX (RAX's other bytes kept); IN EAX zero-extends.
        "out": (JUNK & ~0xFFFF | 0x0105, 0x0301_0A00),
        "uart": (b"BC", 0x0A, 0x03),
        "requests": ("GHCB SVM_EXIT_IOIO out port 0x3f8 size 2",
                     "GHCB SVM_EXIT_IOIO in port 0x3f9 size 2",
                     "GHCB SVM_EXIT_IOIO out port 0x3f8 size 4",
                     "GHCB SVM_EXIT_IOIO in port 0x3f8 size 4"),
    },
    "string-io": {"uart": (b"hello", 0, 0)},
    "string-in": {
        "out": (OUT + 0x45, 0, OUT + 0x56, 0, 0, 0, 0, 0, 0xE9E9_E9E9_E9, 0, 0xB060_B060_B060),
    },
    "mmio": {
        "out": (ID, JUNK, 0x34, 2, JUNK & ~0xFF | 0xEE),
        "mmio": (JUNK, 0x1234, 3, b"\xee" + bytes(15)),
    },
    "mmio-byte": {
        "out": (JUNK & ~0xFF | 0x81, JUNK & ~0xFF00 | 0x5A00, 0x81, 0xFFFF_FFFF_FFFF_FF81, 0x7F,
                JUNK & ~0xFF | 0x44, 5, 6),
        "mmio": (0, 5, 6, b"\x81\x7f\x5a\x33\x44" + bytes(11)),
        "requests": mmio_requests(1, (0x100, 0x101, 0x102, 0x103, 0x104, 0x18),
                                  (0x100, 0x102, 0x100, 0x100, 0x101, 0x104, 0x18, 0x10)),
    },
    "mmio-word": {
        "out": (JUNK & ~0xFFFF | 0x8001, 0x8001, 0xFFFF_FFFF_FFFF_8001, 0x7FFE,
                JUNK & ~0xFFFF | 0xBEEF, 0x300, 4),
        "mmio": (0xBEEF_0000, 0x300, 4, b"\x01\x80\xfe\x7f" + bytes(12)),
        "requests": mmio_requests(2, (0x100, 0x102, 0x18, 0x0A),
                                  (0x100, 0x100, 0x100, 0x102, 0x0A, 0x18, 0x10)),
    },
    "mmio-dword": {
        "out": (0x8000_0001, 0xCAFE_F00D, 0x1234_5678, ID, 0x7_0000, 4),
        "mmio": (0xCAFE_F00D_0000_0000, 0x7_0000, 4,
                 bytes.fromhex("01000080 78563412") + bytes(8)),
        "requests": mmio_requests(4, (0x100, 0x104, 0x18, 0x0C),
                                  (0x100, 0x0C, 0x104, 0x00, 0x18, 0x10)),
    },
    "mmio-qword": {
        "out": (MASK64 - 1, JUNK, 0x0123_4567_89AB_CDEF, 1 << 32, 4),
        "mmio": (0x0123_4567_89AB_CDEF, 1 << 32, 4, (MASK64 - 1).to_bytes(8, "little")
                 + JUNK.to_bytes(8, "little")),
        "requests": mmio_requests(8, (0x100, 0x108, 0x18, 0x08), (0x100, 0x108, 0x08, 0x18, 0x10)),
    },
    "mmio-movsxd": {
        "exit": Differ(SystemEvent(SystemEventType.SEV_TERM,
                                   (term_request(TermReason.UNSUPPORTED_INSN),)), DONE,
                       "MOVSXD is not among vc_native's MMIO forms; the modeled decoder has it"),
        "out": Differ((0,), (0xFFFF_FFFF_8000_0001,), "the native handler terminated"),
        "requests": Differ((mmio("WRITE", 0x100, 4),),
                           (mmio("WRITE", 0x100, 4), mmio("READ", 0x100, 4)),
                           "the native handler does not decode MOVSXD"),
        "mmio": (0, 0, 1, b"\x01\x00\x00\x80" + bytes(12)),
    },
    "vmmcall": {"out": (0, -1000 & MASK64)},  # SCHED_YIELD 0; -KVM_ENOSYS
    "rdpmc": {"out": (0, 0)},  # counter 0 reads zero into EAX and EDX (upper halves cleared)
    "rdtscp": {
        "out": (0,),
        "requests": ("GHCB SVM_EXIT_RDTSCP info1 0x0 info2 0x0",),
        "exception": Differ(
            (6, IN_VC_HANDLER, 0), (6, after("rdtscp", "rdtscp"), 0),
            "EVENTINJ is delivered at the next VMRUN: inside the native handler, right after"
            " its VMGEXIT; the modeled handler cannot be interrupted, so #UD comes after it"
            " has finished the instruction",
        ),
    },
    "dr7": {
        "out": (RESET, 0xF0401),
        "requests": (WRITE_DR7,),  # no READ_DR7: reads never leave the guest
    },
    "dr7-reserved": {  # as Linux: reserved bits cleared, bit 10 set, before sending
        "out": (0x04F1,),
        "requests": (WRITE_DR7,),
    },
    "dr7-upper": {  # as Linux: #GP at the MOV, nothing sent
        "out": (0,),
        "exception": (13, address_of("dr7-upper", "mov dr7, rax"), 0),
        "requests": (),
    },
    "cache-and-wait": {"out": (1,)},
}  # fmt: skip


def check(got: dict, key: str, want: object) -> None:
    if key == "out":
        assert isinstance(want, tuple)
        assert got[key][: len(want)] == want
    else:
        assert got[key] == want, key


@pytest.mark.parametrize("program", PROGRAMS)
def test_native_and_modeled_handlers_agree(program):
    native, modeled = observed(run(program, False)), observed(run(program, True))
    expect = EXPECT.get(program, {})
    for key, want in expect.items():
        if isinstance(want, Differ):
            check(native, key, want.native)
            check(modeled, key, want.modeled)
            del native[key], modeled[key]
    assert native == modeled
    for key, want in expect.items():
        if not isinstance(want, Differ):
            check(native, key, want)
    untouched = {"exception": None, "uart": UART_IDLE, "debug": b"", "post": [],
                 "mmio": MMIO_IDLE, "exit": DONE}  # fmt: skip
    for key, value in untouched.items():  # what a program does not expect stays as it was
        if key not in expect:
            assert native[key] == value, key


def test_every_program_has_expected_results():
    assert set(EXPECT) == set(PROGRAMS)


class RefuseDr7Writes:
    """A hypervisor that answers every DR7 write with #GP."""

    @hookimpl
    def sevsim_exit_handlers(self):
        yield ExitHandler(ExitKind.VMGEXIT, SvmExit.WRITE_DR7,
                          lambda ctx: ctx.inject_exception(13), ("rax",))  # fmt: skip


@pytest.mark.parametrize("modeled", [False, True], ids=["native", "modeled"])
def test_a_refused_dr7_write_is_not_remembered(modeled):
    """Linux records the new DR7 only once the hypervisor took it; the #GP handler here
    skips the 3-byte MOV, and the read that follows still sees the old value."""
    skip = 0x38200
    args = {"idt": {13: skip}}
    args = args if modeled else vc_image_args(**args)
    skipper = assemble("add qword ptr [rsp + 8], 3; add rsp, 8; iretq", skip)
    data = {**args.pop("data", {}), skip: skipper}
    run_ = run_guest(f"mov rax, 0x4f1; mov dr7, rax; mov rbx, dr7; mov rsi, {OUT}; "
                     f"mov [rsi], rbx\n{TERMINATE}", {"refuse": RefuseDr7Writes()},
                     owners={SvmExit.WRITE_DR7: "refuse"},
                     enable=["msr_protocol"], vc_model=VcHandler() if modeled else None,
                     shared=frozenset({0x7000, OUT}), data=data, **args)  # fmt: skip
    assert isinstance(run_.exit, SystemEvent), run_.trace.lines[-6:]
    assert struct.unpack("<Q", run_.vm.memory.read(OUT, 8))[0] == RESET
