"""The native #VC handler (``sevsim.guest.vc_native``) end to end.

Each test runs a real guest whose IDT vector 29 points at the assembled handler,
through the hardware model, kvm and the real ioio / mmio / msr_protocol plugins and
the standard devices. The guest stores what it saw in ``RESULTS`` (a page its page
tables map shared, so the test reads plaintext) and ends with a TERM_REQ of its own
(set 0, code 0); a handler failure ends it with the handler's reason instead.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from test_fidelity_kvm import table_without_rdtscp

from sevsim import hookimpl
from sevsim.arch.exits import SvmExit, VmgExit
from sevsim.arch.ghcb_msr import TermReason
from sevsim.arch.msr import DR7_RESET_VALUE
from sevsim.guest import snippets
from sevsim.guest.asm import assemble
from sevsim.guest.image import GHCB_GPA, GuestImage
from sevsim.guest.vc_native import (
    CODE_LIMIT,
    HANDLER_SIZE,
    STATE_DR7,
    STATE_IN_VC,
    STATE_OFFSET,
    STATE_VC_COUNT,
    VC_HANDLER_ADDRESS,
    build_vc_handler,
    term_request,
    vc_image_args,
)
from sevsim.kvm.dispatch import ExitHandler, ExitKind
from sevsim.kvm.exits import SystemEvent, SystemEventType
from sevsim.plugins import mmio
from sevsim.testing import GuestRun, run_guest
from sevsim.vmm.machine import MMIO_TEST_GPA

RESULTS = 0x50000
SHARED = frozenset({GHCB_GPA, RESULTS})
ALL = ("ioio", "mmio", "msr_protocol")
GUEST_DONE = SystemEvent(SystemEventType.SEV_TERM, (0x100,))
STATE = VC_HANDLER_ADDRESS + STATE_OFFSET
FILL = 0x1111_1111_1111_1111

#: The guest's own exception handlers: record into RESULTS + 0x100 and skip the insn.
GP_HANDLER, UD_HANDLER = 0x30000, 0x30100
EXC = RESULTS + 0x100


def _exception_handler(skip: int, error_code: bool) -> str:
    """Count, error code, RIP, interrupted RSP, RFLAGS inside, own RSP; skip the insn."""
    e = 8 if error_code else 0
    return f"""
        push rax
        push rsi
        mov rsi, {EXC}
        inc qword ptr [rsi]
        xor eax, eax
        {"mov rax, [rsp + 16]" if error_code else ""}
        mov [rsi + 8], rax
        mov rax, [rsp + {16 + e}]
        mov [rsi + 16], rax
        mov rax, [rsp + {40 + e}]
        mov [rsi + 24], rax
        pushfq
        pop rax
        mov [rsi + 32], rax
        mov [rsi + 40], rsp
        add qword ptr [rsp + {16 + e}], {skip}
        pop rsi
        pop rax
        {"add rsp, 8" if error_code else ""}
        iretq
    """


def _blobs() -> dict[int, bytes]:
    return {
        GP_HANDLER: assemble(_exception_handler(2, True), GP_HANDLER),
        UD_HANDLER: assemble(_exception_handler(3, False), UD_HANDLER),
    }


EXCEPTION_IDT = {13: GP_HANDLER, 6: UD_HANDLER}

TERMINATE = snippets.TERMINATE + "    hlt\n"


class Recorder:
    """Watches every GHCB request; with ``claim_mmio`` it also owns the MMIO codes
    (instead of the mmio plugin) to see the scratch GPA.

    The MMIO rows delegate to the real plugin's handlers, so the guest gets the same
    answers as with ``enable=["mmio"]``.
    """

    def __init__(self, claim_mmio: bool = False) -> None:
        self.claim_mmio = claim_mmio
        self.requests: list[tuple[int, int, int]] = []
        self.mmio: list[tuple[int, int, int, int]] = []

    @hookimpl
    def sevsim_vmgexit_enter(self, vcpu_id: int, exit_reason: int, info1: int, info2: int) -> None:
        self.requests.append((exit_reason, info1, info2))

    @hookimpl
    def sevsim_exit_handlers(self, config: object) -> Any:
        def wrap(handler: Any) -> Any:
            def recorded(ctx: Any) -> Any:
                self.mmio.append((ctx.code, ctx.exit_info_1, ctx.exit_info_2,
                                  ctx.ghcb["sw_scratch"]))  # fmt: skip
                return handler(ctx)

            return recorded

        if not self.claim_mmio:
            return
        scratch = ("sw_scratch",)
        yield ExitHandler(ExitKind.VMGEXIT, VmgExit.MMIO_READ, wrap(mmio.mmio_read), scratch)
        yield ExitHandler(ExitKind.VMGEXIT, VmgExit.MMIO_WRITE, wrap(mmio.mmio_write), scratch)


def run(
    source: str,
    plugins: dict[str, object] | None = None,
    *,
    enable: tuple[str, ...] = ALL,
    ist: bool = True,
    idt: dict[int, int] | None = None,
    data: dict[int, bytes] | None = None,
    **image: Any,
) -> GuestRun:
    """Run ``source`` (R15 = RESULTS) with the native handler, then the guest's TERM_REQ."""
    args = vc_image_args(ist=ist, idt={**EXCEPTION_IDT, **(idt or {})},
                         data={**_blobs(), **(data or {})})  # fmt: skip
    image.setdefault("shared", SHARED)
    return run_guest(f"mov r15, {RESULTS}\n{source}\n{TERMINATE}", plugins, enable=enable,
                     **{**args, **image})  # fmt: skip


def results(r: GuestRun, count: int, at: int = RESULTS) -> tuple[int, ...]:
    return struct.unpack(f"<{count}Q", r.vm.memory.read(at, 8 * count))


def exception_record(r: GuestRun) -> dict[str, int]:
    keys = ("count", "error_code", "rip", "rsp", "rflags", "handler_rsp")
    return dict(zip(keys, results(r, len(keys), EXC), strict=True))


def done(r: GuestRun) -> None:
    assert r.exit == GUEST_DONE, (r.exit, r.trace.lines[-12:])


def vc_count(r: GuestRun) -> int:
    """The handler's own count of #VCs, copied out by the guest (it is private memory)."""
    return results(r, 1, RESULTS + 0xF8)[0]


COPY_VC_COUNT = f"mov rax, {STATE}; mov rax, [rax + {STATE_VC_COUNT}]; mov [r15 + 0xf8], rax"


# -- the builder --------------------------------------------------------------------------


def test_builder_layout_code_then_state_page():
    code, entry = build_vc_handler()
    assert entry == VC_HANDLER_ADDRESS and len(code) == HANDLER_SIZE
    body = code[:STATE_OFFSET].rstrip(b"\0")
    assert 0 < len(body) <= CODE_LIMIT
    state = code[STATE_OFFSET:]
    assert int.from_bytes(state[STATE_DR7 : STATE_DR7 + 8], "little") == DR7_RESET_VALUE
    assert state.count(0) == len(state) - 1  # only DR7's reset value is set


def test_builder_is_position_dependent_and_checks_its_inputs():
    assert build_vc_handler(0x60000)[0] != build_vc_handler()[0]
    with pytest.raises(ValueError, match="page aligned"):
        build_vc_handler(0x40010)
    with pytest.raises(ValueError, match="C-bit"):
        build_vc_handler(cbit=52)


def test_image_args_install_vector_29_and_are_measured():
    args = vc_image_args(idt={13: GP_HANDLER}, data={GP_HANDLER: b"\xcf"})
    assert args["idt"] == {13: GP_HANDLER, 29: VC_HANDLER_ADDRESS}
    assert args["ist_vectors"] == frozenset({29})
    image = GuestImage(b"\xf4", **args)
    ranges = image.launch_ranges()
    assert any(a <= VC_HANDLER_ADDRESS and VC_HANDLER_ADDRESS + HANDLER_SIZE <= a + n
               for a, n in ranges)  # fmt: skip
    assert "ist_vectors" not in vc_image_args(ist=False)


# -- CPUID ------------------------------------------------------------------------------------


def test_cpuid_returns_four_registers_zero_extended():
    r = run(f"""
        mov rbx, {FILL}
        mov rdx, {FILL}
        mov rax, 0xffffffff80000000
        mov rcx, {FILL}
        cpuid
        mov [r15], rax
        mov [r15 + 8], rbx
        mov [r15 + 16], rcx
        mov [r15 + 24], rdx
    """)
    done(r)
    leaf = r.vm.cpuid.lookup(0x8000_0000, 0)
    assert results(r, 4) == (leaf.eax, leaf.ebx, leaf.ecx, leaf.edx)


class Cr4Trap:
    """CR4 write traps, acknowledged (only so the guest may set CR4.OSXSAVE)."""

    @hookimpl
    def sevsim_exit_handlers(self, config: object) -> Any:
        yield ExitHandler(ExitKind.VMEXIT, SvmExit.CR4_WRITE_TRAP, lambda ctx: None)


@pytest.mark.parametrize(("osxsave", "xcr0", "size"), [(False, 1, 0x240), (True, 3, 0x240),
                                                       (True, 7, 0x340)])  # fmt: skip
def test_cpuid_leaf_0xd_carries_xcr0(osxsave, xcr0, size):
    enable = f"""
        mov rax, cr4
        or rax, 0x40000
        mov cr4, rax
        xor ecx, ecx
        mov eax, {xcr0}
        xor edx, edx
        xsetbv
    """
    r = run(f"""
        {enable if osxsave else ""}
        mov eax, 0xd
        xor ecx, ecx
        cpuid
        mov [r15], rbx
    """, {"cr4": Cr4Trap()})
    done(r)
    assert results(r, 1) == (size,)
    assert r.vm.vcpus[0].xcr0 == xcr0


# -- port IO ----------------------------------------------------------------------------------


def test_out_forms_reach_the_devices():
    r = run(f"""
        mov al, 0x48
        out 0x80, al
        mov dx, 0x3f8
        mov ax, 0x0341
        out dx, ax
        mov eax, 0x03000142
        out dx, eax
        mov rax, {FILL & ~0xFF | 0x69:#x}
        out dx, al
        mov dx, 0x3ff
        mov al, 0x5c
        out dx, al
    """)
    done(r)
    uart = r.devices.uart
    assert r.devices.post.codes == [0x48]
    assert (uart.output, uart.ier, uart.lcr, uart.scr) == (b"ABi", 1, 3, 0x5C)


def test_in_forms_merge_into_rax_as_the_hardware_does():
    r = run(f"""
        mov rax, {FILL}
        in al, 0x80
        mov [r15], rax
        mov rax, {FILL}
        mov dx, 0x402
        in al, dx
        mov [r15 + 8], rax
        mov rax, {FILL}
        mov dx, 0x3fc
        in ax, dx
        mov [r15 + 16], rax
        mov rax, {FILL}
        in eax, dx
        mov [r15 + 24], rax
        mov rax, {FILL}
        mov dx, 0x3f8
        in eax, dx
        mov [r15 + 32], rax
    """)
    done(r)
    assert results(r, 5) == (
        0x1111_1111_1111_1100,  # POST port reads its last code: none yet; AL only
        0x1111_1111_1111_11E9,  # debugcon: AL, upper 56 bits kept
        0x1111_1111_1111_6000,  # UART MCR, LSR: AX, upper 48 bits kept
        0x00B0_6000,  # MCR LSR MSR SCR: EAX zero-extends
        0x0001_0000,  # RBR IER IIR LCR
    )


def test_ioio_exit_info_1_encodes_the_instruction():
    rec = Recorder()
    r = run("""
        mov dx, 0x402
        in al, 0x80
        out 0x80, ax
        in eax, dx
        lea rsi, [r15]
        lea rdi, [r15]
        mov ecx, 2
        rep outsb
        insd
        mov ecx, 1
        .byte 0x67, 0xf3, 0x6c
    """, {"rec": rec})
    done(r)
    ioio_requests = [(i1, i2) for code, i1, i2 in rec.requests if code == SvmExit.IOIO]
    a64, a32 = 1 << 9, 1 << 8
    assert ioio_requests == [
        (0x80 << 16 | 0x10 | a64 | 1, 0),  # in al, imm8
        (0x80 << 16 | 0x20 | a64, 0),  # out imm8, ax
        (0x402 << 16 | 0x40 | a64 | 1, 0),  # in eax, dx
        (0x402 << 16 | 3 << 10 | 0x10 | a64 | 8 | 4, 2),  # rep outsb: DS, REP, STR, 2 elements
        (0x402 << 16 | 0x40 | a64 | 4 | 1, 1),  # insd: ES
        (0x402 << 16 | 0x10 | a32 | 8 | 4 | 1, 1),  # addr32 rep insb
    ]


MESSAGE = b"Hello from an SEV-ES guest\n"


def test_rep_outsb_prints_on_the_uart_and_advances_rsi_rcx():
    r = run(f"""
        mov rsi, {RESULTS + 0x800}
        mov rax, {int.from_bytes(MESSAGE[:8], "little")}
        mov [rsi], rax
        mov rax, {int.from_bytes(MESSAGE[8:16], "little")}
        mov [rsi + 8], rax
        mov rax, {int.from_bytes(MESSAGE[16:24], "little")}
        mov [rsi + 16], rax
        mov eax, {int.from_bytes(MESSAGE[24:], "little")}
        mov [rsi + 24], eax
        mov dx, 0x3f8
        mov ecx, {len(MESSAGE)}
        rep outsb
        mov [r15], rsi
        mov [r15 + 8], rcx
    """)
    done(r)
    assert bytes(r.devices.uart.output) == MESSAGE
    assert results(r, 2) == (RESULTS + 0x800 + len(MESSAGE), 0)


@pytest.mark.parametrize(("insn", "size"), [("rep outsb", 1), ("rep outsw", 2), ("rep outsd", 4)])
def test_long_rep_outs_goes_in_shared_buffer_sized_chunks(insn, size):
    count = 5000 // size
    rec = Recorder()
    r = run(f"""
        mov rdi, 0x60000
        xor eax, eax
    fill:
        mov [rdi + rax], al
        inc eax
        cmp eax, 5000
        jne fill
        mov rsi, rdi
        mov dx, 0x402
        mov ecx, {count}
        {insn}
        mov [r15], rsi
        mov [r15 + 8], rcx
        {COPY_VC_COUNT}
    """, {"rec": rec})
    done(r)
    if size == 1:  # the debug port is one byte wide: wider accesses go unclaimed
        assert bytes(r.devices.debug.output) == bytes(i & 0xFF for i in range(count))
    per_exit = 2032 // size
    counts = [i2 for code, _, i2 in rec.requests if code == SvmExit.IOIO]
    assert counts == [per_exit, per_exit, count - 2 * per_exit]
    assert results(r, 2) == (0x60000 + count * size, 0)
    assert vc_count(r) == 3  # the instruction re-ran until RCX reached 0


def test_rep_insb_fills_memory_and_advances_rdi():
    r = run("""
        mov rdi, 0x60000
        mov byte ptr [rdi + 3000], 0x77
        mov dx, 0x402
        mov ecx, 3000
        rep insb
        mov [r15], rdi
        mov [r15 + 8], rcx
        mov rsi, 0x60000
        mov al, [rsi + 2999]
        mov [r15 + 16], al
        mov al, [rsi + 3000]
        mov [r15 + 24], al
    """)
    done(r)
    assert results(r, 4) == (0x60000 + 3000, 0, 0xE9, 0x77)


def test_string_io_backwards_with_df_set():
    r = run(f"""
        mov rsi, {RESULTS + 0x800}
        mov rax, 0x0807060504030201
        mov [rsi], rax
        add rsi, 7
        mov dx, 0x402
        mov ecx, 8
        std
        rep outsb
        cld
        mov [r15], rsi
        mov rdi, {RESULTS + 0x900 + 6}
        mov dx, 0x3fc
        mov ecx, 4
        std
        rep insw
        cld
        mov [r15 + 8], rdi
    """)
    done(r)
    assert bytes(r.devices.debug.output) == bytes(range(8, 0, -1))
    assert results(r, 2) == (RESULTS + 0x800 - 1, RESULTS + 0x900 - 2)
    assert r.vm.memory.read(RESULTS + 0x900, 8) == bytes.fromhex("0060") * 4  # MCR, LSR


def test_single_outs_and_fs_override():
    r = run(f"""
        mov ecx, 0xc0000100
        mov eax, {RESULTS}
        xor edx, edx
        wrmsr
        mov dword ptr [r15 + 0x800], 0xcafef00d
        mov esi, 0x800
        mov dx, 0x402
        mov rcx, {FILL}
        outsb dx, byte ptr fs:[rsi]
        mov [r15], rsi
        mov [r15 + 8], rcx
        mov rsi, {RESULTS + 0x800}
        mov dx, 0x3f8
        outsw
        outsd
        mov [r15 + 16], rsi
    """)
    done(r)
    assert r.devices.debug.output == b"\x0d"  # from FS base + 0x800
    assert (r.devices.uart.output, r.devices.uart.ier) == (b"\x0d\xfe", 0x0A)
    assert results(r, 3) == (0x801, FILL, RESULTS + 0x806)


def test_addr32_rep_outsb_uses_esi_and_ecx():
    r = run(f"""
        mov rsi, 0xffffffff00000000 + {RESULTS + 0x800}
        mov dword ptr [r15 + 0x800], 0x44434241
        mov rcx, 0xffffffff00000004
        mov dx, 0x402
        .byte 0x67, 0xf3, 0x6e
        mov [r15], rsi
        mov [r15 + 8], rcx
    """)
    done(r)
    assert bytes(r.devices.debug.output) == b"ABCD"
    assert results(r, 2) == (RESULTS + 0x804, 0)


def test_rep_with_zero_count_does_nothing():
    rec = Recorder()
    r = run("mov dx, 0x402; xor ecx, ecx; rep outsb; rep insb", {"rec": rec})
    done(r)
    assert not [x for x in rec.requests if x[0] == SvmExit.IOIO]
    assert r.devices.debug.output == b""


# -- MSRs, exceptions forwarded to the guest's handlers ----------------------------------------


def test_rdmsr_wrmsr_round_trip():
    r = run(f"""
        mov ecx, 0x1a0
        mov rax, {FILL}
        mov rdx, {FILL}
        rdmsr
        mov [r15], rax
        mov [r15 + 8], rdx
        mov ecx, 0x200
        mov eax, 0x12345006
        mov edx, 0xf
        wrmsr
        xor eax, eax
        xor edx, edx
        rdmsr
        mov [r15 + 16], rax
        mov [r15 + 24], rdx
    """)
    done(r)
    assert results(r, 4) == (1, 0, 0x12345006, 0xF)
    assert r.vm.vcpus[0].msrs.values[0x200] == 0xF_1234_5006
    assert exception_record(r)["count"] == 0


@pytest.mark.parametrize("ist", [True, False])
@pytest.mark.parametrize("insn", ["mov ecx, 0x12345678; rdmsr", "mov ecx, 0xfe; wrmsr"])
def test_gp_from_the_hypervisor_reaches_the_guests_gp_handler(insn, ist):
    r = run(f"""
        mov [r15 + 8], rsp
        {insn}
    """, ist=ist)
    done(r)
    record = exception_record(r)
    rsp = results(r, 2)[1]
    assert record["count"] == 1 and record["error_code"] == 0
    fault_rip = next(int(line.split(" at ")[1].split()[0], 16)
                     for line in r.trace.lines if "#VC" in line)  # fmt: skip
    assert record["rip"] == fault_rip
    assert record["rsp"] == rsp  # the frame is on the interrupted stack (no IST for #GP)
    assert record["handler_rsp"] < rsp
    assert not record["rflags"] & 0x200  # interrupt gate: IF clear


def test_gp_gate_on_the_same_ist_as_vc():
    """The forwarded frame lands where the #VC frame was: the handler must not trip."""
    r = run("mov ecx, 0x12345678; rdmsr; mov [r15], rsp", ist_vectors=frozenset({29, 13}))
    done(r)
    record = exception_record(r)
    assert record["count"] == 1
    assert 0x11000 < record["handler_rsp"] < 0x12000  # IST1 stack
    assert record["rsp"] == results(r, 1)[0]


def test_trap_gate_gets_if_from_the_interrupted_code():
    # Turn the #GP gate into a trap gate (type 0xF), then fault with IF set.
    r = run("""
        mov rax, 0x60d5
        mov byte ptr [rax], 0x8f
        sti
        mov ecx, 0x12345678
        rdmsr
        cli
    """)
    done(r)
    assert exception_record(r)["rflags"] & 0x200


@pytest.mark.parametrize(("insn", "vector"), [("mov ecx, 7; rdpmc", 13), ("rdtscp", 6)])
def test_exceptions_kvm_queues_in_eventinj_arrive_inside_the_vc_handler(insn, vector):
    """KVM queues #GP (bad RDPMC counter) and #UD (RDTSCP, intercepted for a guest whose
    CPUID lacks it) in EVENTINJ rather than answering through the GHCB (REFERENCE.md
    1.2): the next VMRUN delivers them where the guest resumes, right after the #VC
    handler's VMGEXIT, not at the instruction."""
    handler = 0x30200
    recorder = assemble(f"""
        mov rsi, {EXC}
        mov rax, [rsp + {8 if vector == 13 else 0}]
        mov [rsi + 16], rax
    """ + TERMINATE, handler)
    r = run(insn, idt={vector: handler}, data={handler: recorder},
            vm_args={"cpuid": table_without_rdtscp()})  # fmt: skip
    done(r)
    rip = exception_record(r)["rip"]
    assert VC_HANDLER_ADDRESS <= rip < VC_HANDLER_ADDRESS + HANDLER_SIZE


def test_rdpmc_valid_counter():
    r = run(f"mov rax, {FILL}; mov rdx, {FILL}; xor ecx, ecx; rdpmc; mov [r15], rax; "
            "mov [r15 + 8], rdx")  # fmt: skip
    done(r)
    assert results(r, 2) == (0, 0)


# -- the other intercepts ------------------------------------------------------------------------


def test_wbinvd_invd_monitor_mwait_complete():
    rec = Recorder()
    r = run(f"wbinvd; invd; mov rax, {RESULTS}; xor ecx, ecx; xor edx, edx; monitor; "
            f"mwait; mov qword ptr [r15], 1; {COPY_VC_COUNT}", {"rec": rec})  # fmt: skip
    done(r)
    assert [code for code, *_ in rec.requests] == [
        SvmExit.WBINVD, SvmExit.INVD, SvmExit.MONITOR, SvmExit.MWAIT]
    assert (results(r, 1), vc_count(r)) == ((1,), 4)


def test_vmmcall_hypercalls():
    r = run("""
        mov eax, 11
        vmmcall
        mov [r15], rax
        mov eax, 99
        vmmcall
        mov [r15 + 8], rax
    """)
    done(r)
    assert results(r, 2) == (0, (-1000) & (2**64 - 1))  # KVM_HC_SCHED_YIELD; -KVM_ENOSYS


def test_dr7_write_is_sent_and_reads_come_from_the_handler():
    rec = Recorder()
    r = run(f"""
        mov rbx, {FILL}
        mov rbx, dr7
        mov [r15], rbx
        mov r9, 0x401
        mov dr7, r9
        mov rbx, dr7
        mov [r15 + 8], rbx
    """, {"rec": rec})
    done(r)
    assert results(r, 2) == (0x400, 0x401)
    assert [code for code, *_ in rec.requests] == [SvmExit.WRITE_DR7]


# -- MMIO -------------------------------------------------------------------------------------

ID = 0x5345_5653  # the test device's ID register: bytes 53 56 45 53
MMIO_SETUP = f"""
    mov rbx, {MMIO_TEST_GPA}
    mov rax, {FILL}
    mov rcx, {FILL}
    mov rdx, {FILL}
    mov rsi, {FILL}
    mov r9, {FILL}
    mov r13, {MMIO_TEST_GPA}
    xor r12d, r12d
"""

READS = {
    "mov eax, [rbx]": ("rax", ID),
    "mov rax, [rbx]": ("rax", ID),
    "mov ax, [rbx]": ("rax", 0x1111_1111_1111_5653),
    "mov al, [rbx]": ("rax", 0x1111_1111_1111_1153),
    "mov ah, [rbx]": ("rax", 0x1111_1111_1111_5311),
    "mov dh, [rbx + 1]": ("rdx", 0x1111_1111_1111_5611),
    "mov sil, [rbx + 2]": ("rsi", 0x1111_1111_1111_1145),
    "mov r9d, [r13]": ("r9", ID),
    "mov r9w, [r13 + r12*8 + 1]": ("r9", 0x1111_1111_1111_4556),
    "mov ecx, [rbx + 0x10]": ("rcx", 1),  # WRITES: the setup's one
    "mov ecx, [r12 + rbx]": ("rcx", ID),
    "mov ecx, [rbx + 0x100]": ("rcx", 0x807F),  # disp32
    "mov ecx, [rdi - 0x100]": ("rcx", ID),  # negative disp8
    "movzx ecx, byte ptr [rbx + 3]": ("rcx", 0x53),
    "movzx cx, byte ptr [rbx]": ("rcx", 0x1111_1111_1111_0053),
    "movzx rcx, word ptr [rbx + 2]": ("rcx", 0x5345),
    "movsx rcx, byte ptr [rbx + 0x101]": ("rcx", 0xFFFF_FFFF_FFFF_FF80),
    "movsx ecx, word ptr [rbx + 0x100]": ("rcx", 0xFFFF_807F),
    "movsx cx, byte ptr [rbx + 0x100]": ("rcx", 0x1111_1111_1111_007F),
    "movabs eax, dword ptr [0xd0000000]": ("rax", ID),
    "movabs al, byte ptr [0xd0000001]": ("rax", 0x1111_1111_1111_1156),
    "mov eax, [ebx]": ("rax", ID),
    "mov ecx, fs:[rsi]": ("rcx", ID),
}


@pytest.mark.parametrize("insn", READS)
def test_mmio_read_forms(insn):
    reg, expected = READS[insn]
    rec = Recorder(claim_mmio=True)
    setup = {"ebx": f"mov rbx, {0xFFFF_FFFF_0000_0000 | MMIO_TEST_GPA:#x}",
             "fs:": "mov rsi, 0x80"}  # fmt: skip
    extra = next((v for k, v in setup.items() if k in insn), "")
    r = run(f"""
        mov rdi, {MMIO_TEST_GPA + 0x100}
        mov word ptr [rdi], 0x807f
        mov ecx, 0xc0000100
        mov eax, {MMIO_TEST_GPA - 0x80}
        xor edx, edx
        wrmsr
        {MMIO_SETUP}
        {extra}
        {insn}
        mov [r15], {reg}
    """, {"rec": rec}, enable=("ioio", "msr_protocol"))
    done(r)
    assert results(r, 1) == (expected,), hex(results(r, 1)[0])
    code, gpa, length, scratch = rec.mmio[-1]
    assert (code, scratch) == (VmgExit.MMIO_READ, GHCB_GPA + 0x800)
    assert MMIO_TEST_GPA <= gpa < MMIO_TEST_GPA + 0x200 and length in (1, 2, 4, 8)


WRITES = {
    "mov [rbx + 8], rdx": 0x8877_6655_4433_2211,
    "mov [rbx + 8], edx": 0x4433_2211,
    "mov [rbx + 8], dx": 0x2211,
    "mov [rbx + 8], dl": 0x11,
    "mov [rbx + 8], dh": 0x22,
    "mov [rbx + 8], r9b": 0x99,
    "mov [rbx + rcx*8], rdx": 0x8877_6655_4433_2211,
    "mov [r13 + r12*4 + 8], rdx": 0x8877_6655_4433_2211,
    "mov byte ptr [rbx + 8], 0x5a": 0x5A,
    "mov word ptr [rbx + 8], 0x1234": 0x1234,
    "mov dword ptr [rbx + 8], 0x89abcdef": 0x89AB_CDEF,
    "mov qword ptr [rbx + 8], -2": 0xFFFF_FFFF_FFFF_FFFE,
    "movabs qword ptr [0xd0000008], rax": 0x0102_0304_0506_0708,
    "movabs byte ptr [0xd0000008], al": 0x08,
}


@pytest.mark.parametrize("insn", WRITES)
def test_mmio_write_forms(insn):
    rec = Recorder(claim_mmio=True)
    r = run(f"""
        mov rbx, {MMIO_TEST_GPA}
        mov r13, {MMIO_TEST_GPA}
        xor r12d, r12d
        mov ecx, 1
        mov rdx, 0x8877665544332211
        mov r9, 0x99
        mov rax, 0x0102030405060708
        {insn}
    """, {"rec": rec}, enable=("ioio", "msr_protocol"))
    done(r)
    assert r.devices.mmio_test.scratch == WRITES[insn]
    assert r.devices.mmio_test.writes == 1
    code, gpa, _, scratch = rec.mmio[0]
    assert (code, gpa, scratch) == (VmgExit.MMIO_WRITE, MMIO_TEST_GPA + 8, GHCB_GPA + 0x800)


def test_mmio_through_a_non_identity_mapping_and_rip_relative():
    """The handler walks the page tables: VA 0x1ff000 maps the device's GPA."""
    va, at = 0x1FF000, 0x31000
    disp = va - (at + 6)
    rip_relative = bytes([0x8B, 0x05]) + disp.to_bytes(4, "little", signed=True) + b"\xc3"
    rec = Recorder(claim_mmio=True)
    r = run(f"""
        mov rax, {MMIO_TEST_GPA | 3}
        mov rdi, 0x4ff8
        mov [rdi], rax
        mov rax, {at}
        call rax
        mov [r15], rax
        xor ecx, ecx
        mov ecx, [rcx*8 + {va + 2}]
        mov [r15 + 8], rcx
    """, {"rec": rec}, enable=("ioio", "msr_protocol"), data={at: rip_relative})
    done(r)
    assert results(r, 2) == (ID, 0x5345)
    assert [gpa for _, gpa, _, _ in rec.mmio] == [MMIO_TEST_GPA, MMIO_TEST_GPA + 2]


# -- failures end the guest with the handler's reason -------------------------------------------


def test_unsupported_mmio_instruction_terminates():
    r = run(f"mov rbx, {MMIO_TEST_GPA}; add [rbx + 8], eax")
    assert r.exit == SystemEvent(SystemEventType.SEV_TERM,
                                 (term_request(TermReason.UNSUPPORTED_INSN),))  # fmt: skip


def test_hypervisor_error_reply_terminates():
    r = run("out 0x80, al", enable=("msr_protocol",))  # nobody owns IOIO: INVALID_EVENT
    assert r.exit == SystemEvent(SystemEventType.SEV_TERM, (term_request(TermReason.VMM_ERROR),))


def test_exception_without_a_guest_handler_terminates():
    # Mark the #GP gate not present, then fault.
    r = run("mov rax, 0x60d5; mov byte ptr [rax], 0x0e; mov ecx, 0x12345678; rdmsr")
    assert r.exit == SystemEvent(SystemEventType.SEV_TERM,
                                 (term_request(TermReason.BAD_EXCEPTION),))  # fmt: skip


def _fake_vc(code: int) -> str:
    """Enter the handler as the hardware would, with a made-up exit code and RIP."""
    return f"""
        lea rax, [rsp]
        push 0x10
        push rax
        pushfq
        push 0x08
        mov rax, 0x32000
        push rax
        push {code}
        mov rax, {VC_HANDLER_ADDRESS}
        jmp rax
    """


def test_unknown_exit_code_terminates():
    r = run(_fake_vc(0x6E), data={0x32000: b"\x0f\x31"})  # RDTSC is never intercepted
    assert r.exit == SystemEvent(SystemEventType.SEV_TERM,
                                 (term_request(TermReason.UNSUPPORTED_EXIT),))  # fmt: skip


def test_mmio_address_the_page_walk_cannot_translate_terminates():
    # mov eax, [rbx] with RBX beyond the 4 GiB the page tables map
    r = run(f"mov rbx, 0x100000000\n{_fake_vc(SvmExit.NPF)}", data={0x32000: b"\x8b\x03"})
    assert r.exit == SystemEvent(SystemEventType.SEV_TERM, (term_request(TermReason.PAGE_WALK),))


def test_a_vc_in_an_exception_handler_run_inside_the_vc_handler_terminates():
    """KVM injects #GP right after the handler's VMGEXIT (bad RDPMC counter); the guest's
    #GP handler then does port IO, which would reuse the GHCB the #VC handler is in
    the middle of using (and, on IST1, its stack): a nested #VC. (A jump into MMIO, the
    other way to nest, is in test_vc_nested.py, next to the modeled handler.)"""
    handler = 0x30200
    r = run("mov ecx, 7; rdpmc", idt={13: handler},
            data={handler: assemble("mov al, 0x42; out 0x80, al; hlt", handler)})  # fmt: skip
    assert r.exit == SystemEvent(SystemEventType.SEV_TERM,
                                 (term_request(TermReason.NESTED_VC),))  # fmt: skip
    assert r.devices.post.codes == []


@pytest.mark.parametrize("ist", [True, False])
def test_the_in_vc_flag_is_cleared_on_iretq_and_on_forwarding(ist):
    """#VCs after an emulated one and after a forwarded #GP are not taken for nested."""
    r = run(f"""
        mov al, 1
        out 0x80, al
        mov ecx, 0x12345678
        rdmsr
        mov al, 2
        out 0x80, al
        mov rax, {STATE}
        mov rax, [rax + {STATE_IN_VC}]
        mov [r15], rax
    """, ist=ist)
    done(r)
    assert r.devices.post.codes == [1, 2]
    assert exception_record(r)["count"] == 1
    assert results(r, 1) == (0,)


# -- long loops ---------------------------------------------------------------------------------


def test_ten_thousand_outs():
    r = run(f"""
        xor ecx, ecx
    loop_out:
        mov eax, ecx
        out 0x80, al
        inc ecx
        cmp ecx, 10000
        jne loop_out
        {COPY_VC_COUNT}
    """)
    done(r)
    assert len(r.devices.post.codes) == 10000
    assert r.devices.post.codes == [i & 0xFF for i in range(10000)]
    assert vc_count(r) == 10000


def test_ten_thousand_mmio_writes_then_read_back():
    r = run(f"""
        mov rbx, {MMIO_TEST_GPA}
        xor ecx, ecx
    loop_mmio:
        mov [rbx + 0x18], rcx
        inc ecx
        cmp ecx, 10000
        jne loop_mmio
        mov rax, [rbx + 0x18]
        mov [r15], rax
        mov eax, [rbx + 0x10]
        mov [r15 + 8], rax
    """)
    done(r)
    total = sum(range(10000))
    assert results(r, 2) == (total, 10000)
    assert (r.devices.mmio_test.accumulator, r.devices.mmio_test.writes) == (total, 10000)


def test_handler_at_another_address_with_another_ghcb():
    ghcb, at = 0x51000, 0x60000
    args = vc_image_args(at, ghcb=ghcb)
    r = run_guest(f"mov r15, {RESULTS}; xor eax, eax; cpuid; mov [r15], rbx; mov al, 0x42; "
                  "out 0x80, al\n"
                  + TERMINATE, enable=ALL, shared=frozenset({ghcb, RESULTS}), **args)  # fmt: skip
    done(r)
    assert results(r, 1) == (r.vm.cpuid.lookup(0, 0).ebx,)
    assert r.devices.post.codes == [0x42]
