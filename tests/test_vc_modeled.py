"""The modeled #VC handler (``sevsim.guest.vc``): real guest code, every NAE event it emulates.

Guests are keystone-assembled and run as SEV-ES guests with the Python handler as
their #VC handler. They leave what they observed in a page mapped shared
(``RESULTS``), which the test reads as the host. Hostile or missing hypervisor
features are plugins of the test. The decoder's rules are tested on their own at
the end.
"""

from __future__ import annotations

import ast
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest
from attrs import frozen
from test_fidelity_kvm import table_without_rdtscp

from sevsim import hookimpl
from sevsim.arch.exits import GhcbResp, SvmExit, VmgExit
from sevsim.arch.ghcb import GHCB_PAGE_SIZE, Ghcb
from sevsim.arch.ghcb_msr import TermReason
from sevsim.arch.ioio import IOIO_REP, IOIO_STR, IOIO_TYPE_IN
from sevsim.arch.vmcb import EventInj
from sevsim.guest.asm import assemble
from sevsim.guest.decode import (
    ImmOperand,
    MemOperand,
    MmioType,
    RegOperand,
    decode,
    decode_mmio,
    exit_code_of,
    extend,
    ioio_exitinfo,
    linear_address,
    merge_register,
    read_register,
)
from sevsim.guest.image import CODE, GHCB_GPA, GuestImage
from sevsim.guest.vc import GuestPanic, VcHandler, VmmError, verify_exception_info
from sevsim.guest.vc_native import term_request
from sevsim.hw import Platform
from sevsim.hw.vc_model import GuestFault
from sevsim.kvm.cpuid import CpuidModel
from sevsim.kvm.dispatch import ExitHandler, ExitKind
from sevsim.kvm.events import TeeSink
from sevsim.kvm.exits import Hlt, KvmExit, Shutdown, SystemEvent, SystemEventType
from sevsim.kvm.vm import Kvm, Vm
from sevsim.plugins import ioio, mmio
from sevsim.plugins import svm_intercepts as intercepts
from sevsim.testing import SimLog, isolated_host
from sevsim.trace import Trace
from sevsim.vmm.devices import MmioTestDevice
from sevsim.vmm.launch import launch_image
from sevsim.vmm.machine import MMIO_TEST_GPA, Devices

#: A page the guest maps shared, where it leaves results for the host to read.
RESULTS = 0x14000
#: Where the guest's #GP/#UD handlers record the vector and the faulting RIP.
EXC_RECORD = RESULTS + 0x800
SHARED = frozenset({GHCB_GPA, RESULTS})
#: Private data the guest reads (string sources).
DATA = 0x30000
#: A second MMIO test device close enough to the code for RIP-relative addressing.
NEAR_MMIO = 0x0200_0000
ALL = ("msr_protocol", "ioio", "mmio")
TERMINATED = (SystemEventType.SEV_TERM, (0x100,))

GP_HANDLER, UD_HANDLER = 0x38000, 0x38100
EXCEPTION_HANDLERS = {
    GP_HANDLER: f"""
        mov rdi, {EXC_RECORD}
        mov qword ptr [rdi], 13
        mov rax, [rsp + 8]          /* RIP after the error code */
        mov [rdi + 8], rax
        hlt""",
    UD_HANDLER: f"""
        mov rdi, {EXC_RECORD}
        mov qword ptr [rdi], 6
        mov rax, [rsp]
        mov [rdi + 8], rax
        hlt""",
}


@frozen
class Run:
    exit: KvmExit
    vm: Vm
    devices: Devices
    handler: VcHandler
    trace: Trace
    sim: SimLog

    def results(self, count: int, offset: int = 0) -> list[int]:
        raw = self.vm.memory.read(RESULTS + offset, 8 * count)
        return list(struct.unpack(f"<{count}Q", raw))

    def exception(self) -> tuple[int, int]:
        """(vector, RIP) recorded by the guest's #GP or #UD handler."""
        vector, rip = struct.unpack("<QQ", self.vm.memory.read(EXC_RECORD, 16))
        return vector, rip

    def exits(self, name: str) -> int:
        """How many GHCB exchanges with this exit name the trace shows."""
        return sum(f"GHCB {name} " in line or line.endswith(f"GHCB {name}")
                   for line in self.trace.lines)  # fmt: skip


def run(
    source: str,
    handler: VcHandler | None = None,
    *,
    enable: Iterable[str] = ALL,
    plugins: Mapping[str, object] | None = None,
    devices: Devices | None = None,
    data: Mapping[int, bytes] | None = None,
    owners: Mapping[int, str] | None = None,
    kvm: bool = True,
    cpuid: CpuidModel | None = None,
) -> Run:
    """Launch ``source`` with the modeled #VC handler and run it to its first user exit;
    ``kvm`` False leaves out KVM's own rows (a plugin that plays them itself), ``cpuid``
    replaces the guest's CPUID table."""
    handler = handler if handler is not None else VcHandler()
    devices = devices if devices is not None else Devices.standard()
    host = isolated_host(plugins, enable=enable, owners=owners, kvm=kvm)
    trace = Trace()
    blobs = {addr: assemble(src, addr) for addr, src in EXCEPTION_HANDLERS.items()}
    image = GuestImage(assemble(source, CODE), shared=SHARED, data={**blobs, **(data or {})},
                       idt={13: GP_HANDLER, 6: UD_HANDLER})  # fmt: skip
    sim = SimLog()
    kvm = Kvm(Platform(sim=TeeSink(trace, sim)))
    vm = launch_image(kvm, image, handlers=host.start(), events=TeeSink(host.events, trace),
                      vc_model=handler, devices=devices,
                      **({"cpuid": cpuid} if cpuid is not None else {}))  # fmt: skip
    exit_ = vm.vcpus[0].run()
    trace.record_exit(0, exit_)
    return Run(exit_, vm, devices, handler, trace, sim)


def halted(result: Run) -> Run:
    assert isinstance(result.exit, Hlt), "\n".join(result.trace.lines + result.handler.log)
    return result


def terminated(result: Run) -> Run:
    assert isinstance(result.exit, SystemEvent), "\n".join(result.trace.lines)
    assert (result.exit.type, result.exit.data) == TERMINATED
    return result


JUNK = 0x1122_3344_5566_7788

# -- CPUID, MSR, RDPMC, VMMCALL, DR7, cache and monitor instructions ----------------------


def test_cpuid_returns_vendor_and_sev_leaf_in_registers():
    r = halted(run(f"""
        mov rbx, {JUNK}
        mov rdx, {JUNK}
        xor eax, eax
        xor ecx, ecx
        cpuid
        mov rdi, {RESULTS}
        mov [rdi], rbx
        mov [rdi + 8], rdx
        mov [rdi + 16], rcx
        mov eax, 0x8000001f
        cpuid
        mov [rdi + 24], rax
        mov [rdi + 32], rbx
        mov [rdi + 40], rcx
        mov [rdi + 48], rdx
        hlt"""))
    ebx, edx, ecx, *sev = r.results(7)
    assert struct.pack("<III", ebx, edx, ecx) == b"AuthenticAMD"  # upper halves cleared
    leaf = r.vm.cpuid.lookup(0x8000_001F)
    assert sev == [leaf.eax, leaf.ebx, leaf.ecx, leaf.edx]
    assert sev[0] & 0b1010 == 0b1010 and sev[1] & 0x3F == 51  # SEV, SEV-ES, C-bit 51
    assert r.exits("SVM_EXIT_CPUID") == 2


@pytest.mark.parametrize(("xcr0", "size"), [(1, 0x240), (0x7, 0x340)])
def test_cpuid_reports_xcr0_for_the_xsave_leaf(xcr0, size):
    r = halted(run(f"""
        mov eax, 0xd
        xor ecx, ecx
        cpuid
        mov rdi, {RESULTS}
        mov [rdi], rbx
        hlt""", VcHandler(xcr0=xcr0)))
    assert r.results(1) == [size]
    assert r.vm.vcpus[0].xcr0 == xcr0


def test_rdmsr_and_wrmsr_of_modeled_msrs():
    r = halted(run(f"""
        mov rdi, {RESULTS}
        mov rax, {JUNK}
        mov rdx, {JUNK}
        mov ecx, 0x1a0              /* MSR_IA32_MISC_ENABLE */
        rdmsr
        mov [rdi], rax
        mov [rdi + 8], rdx
        mov ecx, 0x2ff              /* MSR_MTRR_DEF_TYPE */
        mov eax, 0x806
        mov edx, 0
        wrmsr
        xor eax, eax
        rdmsr
        mov [rdi + 16], rax
        hlt"""))
    assert r.results(3) == [1, 0, 0x806]
    assert r.vm.vcpus[0].msrs.values[0x2FF] == 0x806


@pytest.mark.parametrize(
    "access",
    ["mov ecx, 0x12345678\n rdmsr", "mov ecx, 0xfe\n xor eax, eax\n xor edx, edx\n wrmsr"],
    ids=["unknown-msr", "read-only-msr"],
)
def test_msr_failure_raises_gp_in_the_guest(access):
    r = halted(run(f"nop\n{access}\nud2"))
    vector, rip = r.exception()
    assert vector == 13
    assert rip == CODE + 1 + len(assemble(access.rsplit("\n", 1)[0], CODE + 1))


def test_vmmcall_sends_number_and_cpl():
    r = halted(run(f"""
        mov rdi, {RESULTS}
        mov eax, 11                 /* KVM_HC_SCHED_YIELD */
        vmmcall
        mov [rdi], rax
        mov eax, 99
        vmmcall
        mov [rdi + 8], rax
        hlt"""))
    assert r.results(2) == [0, (-1000) & (2**64 - 1)]


def test_rdpmc_reads_counters_and_faults_on_bad_ones():
    r = halted(run(f"""
        mov rdi, {RESULTS}
        mov rax, {JUNK}
        mov rdx, {JUNK}
        xor ecx, ecx
        rdpmc
        mov [rdi], rax
        mov [rdi + 8], rdx
        mov ecx, 8
        rdpmc
        hlt"""))
    assert r.results(2) == [0, 0]
    assert r.exception()[0] == 13


def test_cache_and_monitor_instructions_reach_the_hypervisor():
    r = halted(run(f"""
        wbinvd
        invd
        mov rax, {RESULTS}
        xor ecx, ecx
        xor edx, edx
        monitor
        xor eax, eax
        mwait
        mov rdi, {RESULTS}
        mov qword ptr [rdi], 1
        hlt"""))
    assert r.results(1) == [1]
    for name in ("WBINVD", "INVD", "MONITOR", "MWAIT"):
        assert r.exits(f"SVM_EXIT_{name}") == 1, name


def test_dr7_writes_go_to_the_hypervisor_and_reads_come_from_the_guest():
    r = halted(run(f"""
        mov rax, 0x155
        mov dr7, rax
        mov rbx, {JUNK}
        mov rbx, dr7
        mov rdi, {RESULTS}
        mov [rdi], rbx
        hlt"""))
    assert r.results(1) == [0x555]  # reserved bits 12 and 14-15 cleared, bit 10 set
    assert r.handler.dr7 == 0x555  # the guest's own record: KVM drops DR7 (SEV-ES)
    assert (r.exits("SVM_EXIT_WRITE_DR7"), r.exits("SVM_EXIT_READ_DR7")) == (1, 0)


def test_dr7_write_with_upper_bits_raises_gp():
    r = halted(run("mov rax, 0x100000400\n mov dr7, rax\n ud2"))
    assert r.exception() == (13, CODE + 10)
    assert r.exits("SVM_EXIT_WRITE_DR7") == 0


def test_rdtscp_gets_ud_from_kvm():
    # KVM answers "success" in the GHCB and queues #UD in EVENTINJ; the modeled handler
    # cannot be interrupted mid-exchange, so #UD arrives once it has finished (after
    # RDTSCP). A native handler gets it right after its VMGEXIT (test_vc_native.py).
    # RDTSCP is intercepted only for a guest whose CPUID lacks it.
    r = halted(run("nop\n rdtscp\n hlt", cpuid=table_without_rdtscp()))
    assert r.exception() == (6, CODE + 4)


# -- port IO ----------------------------------------------------------------------------


def test_in_and_out_of_every_size():
    r = halted(run(f"""
        mov rdi, {RESULTS}
        mov dx, 0x3f8
        mov al, 0x41
        out dx, al                  /* UART THR */
        mov al, 0x42
        out 0x80, al                /* POST, immediate port */
        mov dx, 0x3fc
        mov eax, 0x5a000003
        out dx, eax                 /* UART MCR, LSR, MSR, SCR */
        mov rax, {JUNK}
        in al, dx
        mov [rdi], rax
        mov rax, {JUNK}
        in ax, dx
        mov [rdi + 8], rax
        mov rax, {JUNK}
        in eax, dx
        mov [rdi + 16], rax
        mov dx, 0x402
        in al, dx                   /* debug port: 0xe9 */
        mov [rdi + 24], rax
        in al, 0x80
        mov [rdi + 32], rax
        mov al, 0x69
        out dx, al
        hlt"""))
    assert bytes(r.devices.uart.output) == b"A"
    assert (r.devices.uart.mcr, r.devices.uart.scr) == (3, 0x5A)
    assert r.devices.post.codes == [0x42]
    assert r.results(5) == [
        JUNK & ~0xFF | 0x03, JUNK & ~0xFFFF | 0x6003, 0x5AB0_6003, 0x5AB0_60E9, 0x5AB0_6042
    ]
    assert bytes(r.devices.debug.output) == b"i"


HELLO = b"Hello from an SEV-ES guest\n"


def test_rep_outsb_prints_through_the_uart():
    r = halted(run(f"""
        mov rsi, {DATA}
        mov ecx, {len(HELLO)}
        mov dx, 0x3f8
        rep outsb
        mov rdi, {RESULTS}
        mov [rdi], rsi
        mov [rdi + 8], rcx
        hlt""", data={DATA: HELLO}))
    assert bytes(r.devices.uart.output) == HELLO
    assert r.results(2) == [DATA + len(HELLO), 0]
    assert r.exits("SVM_EXIT_IOIO") == 1


def test_rep_outs_goes_down_with_the_direction_flag():
    r = halted(run(f"""
        mov rsi, {DATA + 8}
        mov ecx, 3
        mov dx, 0x3f8
        std
        rep outsd                   /* the UART's THR takes each element's low byte */
        cld
        mov rdi, {RESULTS}
        mov [rdi], rsi
        hlt""", data={DATA: b"a123b123c123"}))
    assert bytes(r.devices.uart.output) == b"cba"
    assert r.results(1) == [DATA - 4]


def test_rep_outs_longer_than_the_shared_buffer_takes_several_exits():
    text = bytes(range(256)) * 20  # 5120 bytes: 2032 + 2032 + 1056
    r = halted(run(f"""
        mov rsi, {DATA}
        mov ecx, {len(text)}
        mov dx, 0x402
        rep outsb
        mov rdi, {RESULTS}
        mov [rdi], rsi
        mov [rdi + 8], rcx
        hlt""", data={DATA: text}))
    assert bytes(r.devices.debug.output) == text
    assert r.results(2) == [DATA + len(text), 0]
    assert r.exits("SVM_EXIT_IOIO") == 3


def test_outs_honours_a_segment_override():
    r = halted(run(f"""
        mov ecx, 0xc0000100         /* MSR_FS_BASE: native */
        mov eax, {DATA}
        xor edx, edx
        wrmsr
        mov esi, 3
        mov dx, 0x402
        .byte 0x64, 0x6e            /* outsb dx, byte ptr fs:[rsi] */
        hlt""", data={DATA: b"xyz!"}))
    assert bytes(r.devices.debug.output) == b"!"


def test_rep_insb_reads_uart_input():
    devices = Devices.standard()
    devices.uart.input += b"typed"
    r = halted(run(f"""
        mov rdi, {RESULTS}
        mov ecx, 5
        mov dx, 0x3f8
        rep insb
        mov rax, {RESULTS + 8}
        mov [rax], rdi
        hlt""", devices=devices))
    assert r.vm.memory.read(RESULTS, 5) == b"typed"
    assert r.results(1, offset=8) == [RESULTS + 5]


def test_insw_and_insd_store_elements_of_their_size():
    r = halted(run(f"""
        mov rdi, {RESULTS}
        mov dx, 0x3fc               /* UART MCR 0, LSR 0x60, MSR 0xb0, SCR 0 */
        insw
        insd
        mov rax, {RESULTS + 8}
        mov [rax], rdi
        hlt"""))
    assert r.vm.memory.read(RESULTS, 6) == b"\x00\x60\x00\x60\xb0\x00"
    assert r.results(1, offset=8) == [RESULTS + 6]


# -- MMIO --------------------------------------------------------------------------------


def mmio_devices(scratch: int = 0) -> tuple[Devices, MmioTestDevice]:
    """The standard machine with SCRATCH preset, plus a second test device at NEAR_MMIO."""
    devices = Devices.standard()
    devices.mmio_test.scratch = scratch
    near = MmioTestDevice(name="near-mmio")
    devices.mmio.insert(near, NEAR_MMIO, MmioTestDevice.SIZE)
    return devices, near


def test_mmio_reads_of_every_size_write_their_register_part():
    r = halted(run(f"""
        mov rdi, {RESULTS}
        mov rbx, {MMIO_TEST_GPA}
        mov rax, {JUNK}
        mov al, [rbx]
        mov [rdi], rax
        mov rax, {JUNK}
        mov ax, [rbx]
        mov [rdi + 8], rax
        mov rax, {JUNK}
        mov eax, [rbx]
        mov [rdi + 16], rax
        mov rax, {JUNK}
        mov rax, [rbx]
        mov [rdi + 24], rax
        mov rax, {JUNK}
        mov ah, [rbx]
        mov [rdi + 32], rax
        mov r9, {JUNK}
        mov r9w, [rbx + 2]
        mov [rdi + 40], r9
        hlt"""))
    sevs = MmioTestDevice.ID
    assert r.results(6) == [
        JUNK & ~0xFF | 0x53, JUNK & ~0xFFFF | 0x5653, sevs, sevs,
        JUNK & ~0xFF00 | 0x5300, JUNK & ~0xFFFF | 0x5345,
    ]  # fmt: skip
    assert r.exits("SVM_VMGEXIT_MMIO_READ") == 6


@pytest.mark.parametrize(
    ("store", "expected"),
    [("mov [rbx + 8], cl", 0xF0), ("mov [rbx + 8], cx", 0xDEF0), ("mov [rbx + 8], ecx", 0x9ABCDEF0),
     ("mov [rbx + 8], rcx", 0x1234_5678_9ABC_DEF0), ("mov [rbx + 9], ch", 0xDE00),
     ("mov byte ptr [rbx + 8], 0x80", 0x80), ("mov word ptr [rbx + 8], 0x8001", 0x8001),
     ("mov dword ptr [rbx + 8], 0x80000001", 0x8000_0001),
     ("mov qword ptr [rbx + 8], -2", 0xFFFF_FFFF_FFFF_FFFE)],
)  # fmt: skip
def test_mmio_writes_of_every_size(store, expected):
    r = halted(run(f"""
        mov rbx, {MMIO_TEST_GPA}
        mov rcx, 0x123456789abcdef0
        {store}
        hlt"""))
    assert r.devices.mmio_test.scratch == expected
    assert r.devices.mmio_test.writes == 1


def test_mmio_zero_and_sign_extending_reads():
    devices, _ = mmio_devices(scratch=0x0000_0000_8081_80F0)
    r = halted(run(f"""
        mov rdi, {RESULTS}
        mov rbx, {MMIO_TEST_GPA + 8}
        mov rax, {JUNK}
        movzx eax, byte ptr [rbx]
        mov [rdi], rax
        mov rax, {JUNK}
        movzx rax, word ptr [rbx]
        mov [rdi + 8], rax
        mov rax, {JUNK}
        movzx ax, byte ptr [rbx]
        mov [rdi + 16], rax
        mov rax, {JUNK}
        movsx rax, byte ptr [rbx]
        mov [rdi + 24], rax
        mov rax, {JUNK}
        movsx eax, word ptr [rbx]
        mov [rdi + 32], rax
        mov rax, {JUNK}
        movsx ax, byte ptr [rbx]
        mov [rdi + 40], rax
        mov rax, {JUNK}
        movsxd rax, dword ptr [rbx]
        mov [rdi + 48], rax
        hlt""", devices=devices))
    assert r.results(7) == [
        0xF0, 0x80F0, JUNK & ~0xFFFF | 0x00F0, 2**64 - 0x10, 0xFFFF_80F0,
        JUNK & ~0xFFFF | 0xFFF0, 0xFFFF_FFFF_8081_80F0,
    ]  # fmt: skip


def test_mmio_addressing_modes():
    devices, near = mmio_devices()
    near.scratch = 0x4E454152  # "NEAR"
    rip_relative = assemble(f"mov eax, dword ptr [rip + {NEAR_MMIO + 8 - (CODE + 6)}]", CODE)
    assert len(rip_relative) == 6
    r = halted(run(f"""
        mov eax, dword ptr [rip + {NEAR_MMIO + 8 - (CODE + 6)}]
        mov rdi, {RESULTS}
        mov [rdi], rax
        mov rbx, {MMIO_TEST_GPA - 0x20}
        mov rcx, 4
        mov eax, dword ptr [rbx + rcx*8]        /* base + index*scale */
        mov [rdi + 8], rax
        mov rbx, {MMIO_TEST_GPA}
        mov rcx, -1
        mov eax, dword ptr [rbx + rcx*4 + 4]    /* negative index, displacement */
        mov [rdi + 16], rax
        movabs eax, dword ptr [{MMIO_TEST_GPA}] /* moffs */
        mov [rdi + 24], rax
        mov rbx, {0xFFFF_FFFF_0000_0000 | MMIO_TEST_GPA}
        .byte 0x67, 0x8b, 0x03                  /* mov eax, [ebx]: 32-bit address size */
        mov [rdi + 32], rax
        mov ecx, 0xc0000100                     /* MSR_FS_BASE */
        mov eax, {MMIO_TEST_GPA}
        xor edx, edx
        wrmsr
        mov ecx, 0xc0000101                     /* MSR_GS_BASE */
        mov eax, {NEAR_MMIO}
        wrmsr
        xor ebx, ebx
        mov eax, dword ptr fs:[rbx]
        mov [rdi + 40], rax
        mov eax, dword ptr gs:[rbx + 8]
        mov [rdi + 48], rax
        mov rcx, 0x5a5a
        mov qword ptr gs:[rbx + 8], rcx
        hlt""", devices=devices))
    sevs = MmioTestDevice.ID
    assert r.results(7) == [0x4E454152, sevs, sevs, sevs, sevs, sevs, 0x4E454152]
    assert near.scratch == 0x5A5A


def test_movs_between_ram_and_mmio():
    devices, _ = mmio_devices(scratch=0x7777)
    buffer = MMIO_TEST_GPA + MmioTestDevice.BUFFER
    r = halted(run(f"""
        mov rsi, {DATA}
        mov rdi, {buffer}
        mov ecx, 3
        rep movsq                   /* RAM -> MMIO, one element per #VC */
        mov rsi, {buffer}
        mov rdi, {RESULTS}
        mov ecx, 24
        rep movsb                   /* MMIO -> RAM */
        mov rsi, {MMIO_TEST_GPA + 8}
        mov rdi, {buffer + 24}
        .byte 0xa5                  /* movsd: MMIO -> MMIO */
        mov rax, {RESULTS + 0x100}
        mov [rax], rsi
        mov [rax + 8], rdi
        mov [rax + 16], rcx
        hlt""", devices=devices, data={DATA: b"0123456789abcdefGHIJKLMN"}))
    assert bytes(devices.mmio_test.buffer[:28]) == b"0123456789abcdefGHIJKLMNww\0\0"
    assert r.vm.memory.read(RESULTS, 24) == b"0123456789abcdefGHIJKLMN"
    assert r.results(3, offset=0x100) == [MMIO_TEST_GPA + 12, buffer + 28, 0]
    assert r.exits("SVM_VMGEXIT_MMIO_WRITE") == 3 + 1
    assert r.exits("SVM_VMGEXIT_MMIO_READ") == 24 + 1


def test_movs_goes_down_with_the_direction_flag():
    buffer = MMIO_TEST_GPA + MmioTestDevice.BUFFER
    r = halted(run(f"""
        mov rsi, {DATA + 3}
        mov rdi, {buffer + 3}
        mov ecx, 4
        std
        rep movsb
        cld
        mov rax, {RESULTS}
        mov [rax], rsi
        mov [rax + 8], rdi
        hlt""", data={DATA: b"wxyz"}))
    assert bytes(r.devices.mmio_test.buffer[:4]) == b"wxyz"
    assert r.results(2) == [DATA - 1, buffer - 1]


def test_an_alu_operation_on_mmio_cannot_be_emulated():
    r = terminated(run(f"mov rax, {MMIO_TEST_GPA}\n add dword ptr [rax], 1\n hlt"))
    assert r.handler.log and r.handler.log[0].startswith("Failed to decode instruction")
    assert "add dword ptr [rax], 1" in r.handler.log[0]


COMPAT_CODE = 0x32000
COMPAT_GDT = 0x31000


def test_compatibility_mode_code_is_decoded_as_32_bit():
    """The guest loads a GDT with a 32-bit code segment and drops into it with RETFQ."""
    gdt = struct.pack("<4Q", 0, 0x00AF_9A00_0000_FFFF, 0x00CF_9200_0000_FFFF,
                      0x00CF_9A00_0000_FFFF)  # fmt: skip
    pointer = struct.pack("<HQ", len(gdt) - 1, COMPAT_GDT)
    compat = assemble(f"""
        mov edi, {RESULTS}
        mov ebx, {MMIO_TEST_GPA}
        mov eax, dword ptr [ebx]
        mov dword ptr [edi], eax
        movzx eax, word ptr [ebx + 2]
        mov dword ptr [edi + 4], eax
        mov dx, 0x402
        mov esi, {DATA}
        mov ecx, 3
        rep outsb
        mov dword ptr [edi + 8], esi
        mov ecx, 0x1a0
        rdmsr
        mov dword ptr [edi + 12], eax
        hlt""", COMPAT_CODE, bits=32)
    r = halted(run(f"""
        mov rax, {COMPAT_GDT + 0x100}
        lgdt [rax]
        push 0x18
        push {COMPAT_CODE}
        retfq""", data={COMPAT_GDT: gdt, COMPAT_GDT + 0x100: pointer, COMPAT_CODE: compat,
                        DATA: b"32!"}))  # fmt: skip
    words = struct.unpack("<4I", r.vm.memory.read(RESULTS, 16))
    assert words == (MmioTestDevice.ID, 0x5345, DATA + 3, 1)
    assert bytes(r.devices.debug.output) == b"32!"


def test_a_loop_of_outs_and_mmio_writes():
    r = halted(run(f"""
        mov rbx, {MMIO_TEST_GPA}
        mov dx, 0x402
        mov ecx, 1000
    again:
        mov al, cl
        out dx, al
        mov [rbx + 0x18], rcx       /* ACCUMULATOR adds what is written */
        dec ecx
        jnz again
        hlt"""))
    assert bytes(r.devices.debug.output) == bytes(i & 0xFF for i in range(1000, 0, -1))
    assert r.devices.mmio_test.accumulator == sum(range(1, 1001))


def test_the_handler_is_guest_software():
    """It may use the hardware's guest view (sevsim.hw.vc_model) and the layouts, nothing
    else of kvm or hw."""
    for module in ("vc", "decode"):
        tree = ast.parse((Path(__file__).parent.parent / "core" / "guest" / f"{module}.py")
                         .read_text())  # fmt: skip
        imported = {node.module for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and node.module}  # fmt: skip
        ours = {name for name in imported if name.startswith("sevsim")}
        assert all(name == "sevsim.hw.vc_model" or name.startswith(("sevsim.arch", "sevsim.guest"))
                   for name in ours), ours  # fmt: skip


# -- what the hypervisor is sent ---------------------------------------------------------


class Recorder:
    """A hypervisor that notes each request's valid fields before KVM's handler runs."""

    def __init__(self) -> None:
        self.requests: list[tuple[int, frozenset[str], Ghcb]] = []

    def _row(self, code: int, handler: Any, requires: Any) -> ExitHandler:
        def record(ghcb: Ghcb) -> Iterable[str]:
            self.requests.append((code, frozenset(ghcb.valid_fields()), Ghcb(ghcb.raw)))
            return requires(ghcb) if callable(requires) else requires

        return ExitHandler(ExitKind.VMGEXIT, code, handler, record)

    @hookimpl
    def sevsim_exit_handlers(self, config: object) -> Iterable[ExitHandler]:
        yield self._row(SvmExit.CPUID, intercepts.cpuid, intercepts.cpuid_requires)
        yield self._row(SvmExit.MSR, intercepts.msr, intercepts.msr_requires)
        yield self._row(SvmExit.VMMCALL, intercepts.vmmcall, ("rax", "cpl"))
        yield self._row(SvmExit.IOIO, ioio.io_interception, ioio.requires)
        yield self._row(VmgExit.MMIO_READ, mmio.mmio_read, ("sw_scratch",))
        yield self._row(VmgExit.MMIO_WRITE, mmio.mmio_write, ("sw_scratch",))


BASE = frozenset({"sw_exit_code", "sw_exit_info_1", "sw_exit_info_2"})


def test_each_request_carries_the_fields_kvm_needs_in_a_fresh_bitmap():
    recorder = Recorder()
    halted(run(f"""
        xor eax, eax
        cpuid
        mov ecx, 0x1a0
        rdmsr
        wrmsr
        mov eax, 11
        vmmcall
        mov dx, 0x402
        mov eax, 0x1234
        out dx, al
        in al, dx
        mov rsi, {DATA}
        outsb
        mov rbx, {MMIO_TEST_GPA}
        mov eax, [rbx]
        mov [rbx + 8], eax
        hlt""", enable=["msr_protocol"], plugins={"recorder": recorder}, data={DATA: b"!"},
        kvm=False))
    fields = [(code, sorted(valid - BASE)) for code, valid, _ in recorder.requests]
    assert fields == [
        (SvmExit.CPUID, ["rax", "rcx", "xcr0"]),
        (SvmExit.MSR, ["rcx"]),
        (SvmExit.MSR, ["rax", "rcx", "rdx"]),
        (SvmExit.VMMCALL, ["cpl", "rax", "rbx", "rcx", "rdx", "rsi"]),
        (SvmExit.IOIO, ["rax"]),
        (SvmExit.IOIO, ["rax"]),
        (SvmExit.IOIO, ["sw_scratch"]),
        (VmgExit.MMIO_READ, ["sw_scratch"]),
        (VmgExit.MMIO_WRITE, ["sw_scratch"]),
    ]
    assert all(BASE <= valid for _, valid, _ in recorder.requests)
    infos = [(g["sw_exit_info_1"], g["sw_exit_info_2"]) for _, _, g in recorder.requests]
    assert infos[1:3] == [(0, 0), (1, 0)]  # RDMSR, WRMSR
    assert infos[4:7] == [
        (0x402 << 16 | 0x10 | 0x200, 0),  # out dx, al: 1 byte, 64-bit addresses
        (0x402 << 16 | 0x10 | 0x200 | IOIO_TYPE_IN, 0),
        (0x402 << 16 | 0x10 | 0x200 | IOIO_STR | 3 << 10, 1),  # outsb from DS, 1 element
    ]
    assert infos[7:] == [(MMIO_TEST_GPA, 4), (MMIO_TEST_GPA + 8, 4)]
    for _, _, ghcb in recorder.requests:
        assert (ghcb["protocol_version"], ghcb["ghcb_usage"]) == (2, 0)
    assert recorder.requests[6][2]["sw_scratch"] == GHCB_GPA + 0x800
    assert recorder.requests[4][2]["rax"] == 0x34  # only AL of RAX
    assert recorder.requests[3][2]["cpl"] == 0


# -- a hypervisor that fails the guest ---------------------------------------------------


def test_an_error_reply_makes_the_guest_terminate():
    r = terminated(run("mov dx, 0x402\n out dx, al\n hlt", enable=["msr_protocol"]))
    assert r.handler.log[0].startswith("Failure in communication with VMM (exit-code 0x7b")
    assert "sw_exit_info_1 0x2" in r.handler.log[0]


class InjectsPageFault:
    """A hypervisor that answers WBINVD with an exception Linux would never forward."""

    @hookimpl
    def sevsim_exit_handlers(self, config: object) -> Iterable[ExitHandler]:
        yield ExitHandler(ExitKind.VMGEXIT, SvmExit.WBINVD,
                          lambda ctx: ctx.inject_exception(14))  # fmt: skip


def test_an_exception_other_than_gp_or_ud_is_a_vmm_error():
    r = terminated(run("wbinvd\n hlt", plugins={"evil": InjectsPageFault()},
                       owners={SvmExit.WBINVD: "evil"}))
    assert "Failure in communication with VMM" in r.handler.log[0]


def test_a_ghcb_the_guest_does_not_map_makes_it_terminate():
    r = terminated(run("cpuid\n hlt", VcHandler(ghcb_vaddr=0x1_0000_0000)))
    assert "guest address 0x100000000 is not mapped" in r.handler.log[0]


def test_a_hypervisor_that_ignores_termination_gets_a_panicked_guest():
    r = run("mov dx, 0x402\n out dx, al\n hlt", enable=[])
    assert isinstance(r.exit, Shutdown)
    assert "Returned from Terminate-Request to Hypervisor" in r.sim.why()


# -- the handler against a scripted hypervisor ---------------------------------------------


class FakeView:
    """A flat, identity-mapped guest for driving the handler without a CPU."""

    def __init__(self, code: bytes, bits: int = 64) -> None:
        self.memory = bytearray(0x10000)
        self.memory[0x1000 : 0x1000 + len(code)] = code
        self.regs = {"rip": 0x1000, "rflags": 2}
        self.bits = bits
        self.cpl = 0
        self.ghcb_msr = 0

    def reg(self, name: str) -> int:
        return self.regs.get(name, 0)

    def set_reg(self, name: str, value: int) -> None:
        self.regs[name] = value

    def segment_base(self, name: str) -> int:
        return 0

    def read(self, vaddr: int, size: int) -> bytes:
        if vaddr + size > len(self.memory):
            raise GuestFault(vaddr)
        return bytes(self.memory[vaddr : vaddr + size])

    def write(self, vaddr: int, data: bytes) -> None:
        self.memory[vaddr : vaddr + len(data)] = data

    def translate(self, vaddr: int) -> tuple[int, bool]:
        return vaddr, False

    def ghcb(self) -> Ghcb:
        return Ghcb(self.memory[GHCB_GPA : GHCB_GPA + GHCB_PAGE_SIZE])


def test_a_vc_that_does_not_match_the_instruction_is_not_emulated():
    view = FakeView(assemble("cpuid", 0x1000))
    handler = VcHandler()
    steps = handler(view, SvmExit.WBINVD)
    next(steps)
    assert view.ghcb_msr == 0x100  # straight to the termination request
    assert "wrong/unhandled opcode bytes" in handler.log[0]
    with pytest.raises(GuestPanic):
        next(steps)
    assert view.regs["rip"] == 0x1000


def test_an_exit_code_without_emulation_is_unsupported():
    view = FakeView(assemble("cpuid", 0x1000))
    handler = VcHandler()
    next(handler(view, SvmExit.EXCP_BASE + 17))  # #AC: Linux forwards it; the model does not
    assert view.ghcb_msr == 0x100
    assert handler.log[0].startswith("Unsupported exit-code 0x51 in #VC exception (IP: 0x1000)")


def test_a_reply_without_its_result_registers_is_a_vmm_error():
    view = FakeView(assemble("cpuid", 0x1000))
    handler = VcHandler()
    steps = handler(view, SvmExit.CPUID)
    next(steps)
    assert view.ghcb_msr == GHCB_GPA
    reply = view.ghcb()
    reply.valid_bitmap = 0
    reply["sw_exit_info_1"] = 0
    reply["rax"] = 1  # RBX, RCX, RDX left out
    view.write(GHCB_GPA, bytes(reply.raw))
    next(steps)
    assert view.ghcb_msr == 0x100
    assert "lacks valid rbx, rcx, rdx" in handler.log[0]


def test_a_successful_exchange_moves_rip_past_the_instruction():
    view = FakeView(b"\xee")  # out dx, al
    view.regs["rdx"] = 0x402
    steps = VcHandler()(view, SvmExit.IOIO)
    next(steps)
    reply = view.ghcb()
    reply["sw_exit_info_1"] = 0
    view.write(GHCB_GPA, bytes(reply.raw))
    with pytest.raises(StopIteration) as done:
        next(steps)
    assert done.value.value is None
    assert view.regs["rip"] == 0x1001


def test_rdtscp_results_are_taken_when_a_hypervisor_emulates_it():
    view = FakeView(assemble("rdtscp", 0x1000))
    view.regs.update(rax=JUNK, rdx=JUNK, rcx=JUNK)
    steps = VcHandler()(view, SvmExit.RDTSCP)
    next(steps)
    request = view.ghcb()
    assert (request["sw_exit_code"], request.valid_fields()) == (
        SvmExit.RDTSCP, ("sw_exit_code", "sw_exit_info_1", "sw_exit_info_2"),
    )  # fmt: skip
    reply = Ghcb()
    reply["sw_exit_info_1"] = 0
    for name, value in (("rax", 2**40 + 1), ("rdx", 2), ("rcx", 3)):
        reply[name] = value
    view.write(GHCB_GPA, bytes(reply.raw))
    with pytest.raises(StopIteration):
        next(steps)
    assert [view.regs[n] for n in ("rax", "rdx", "rcx", "rip")] == [1, 2, 3, 0x1003]


class UnmappedAbove(FakeView):
    """A FakeView whose page tables map nothing from ``limit`` on (a #PF, not MMIO)."""

    def __init__(self, code: bytes, limit: int) -> None:
        super().__init__(code)
        self.limit = limit

    def translate(self, vaddr: int) -> tuple[int, bool]:
        if vaddr >= self.limit:
            raise GuestFault(vaddr)
        return vaddr, False


def test_an_instruction_in_mmio_is_a_nested_vc_with_the_native_reason():
    """FakeView maps every address but has RAM only below 0x10000: above it is MMIO,
    where reading the instruction would be a #VC inside the #VC handler."""
    view = FakeView(b"")
    view.regs["rip"] = 0x20000
    handler = VcHandler()
    steps = handler(view, SvmExit.NPF)
    next(steps)
    assert view.ghcb_msr == term_request(TermReason.NESTED_VC) == 0x62100
    assert handler.log == ["#VC inside the #VC handler (exit-code 0x400 IP: 0x20000): "
                           "the instruction at 0x20000 is in MMIO"]  # fmt: skip
    with pytest.raises(GuestPanic):
        next(steps)
    assert view.regs["rip"] == 0x20000


def test_an_instruction_that_runs_into_mmio_is_a_nested_vc():
    view = FakeView(b"")
    view.memory[0xFFFF] = 0x8B  # mov eax, [rbx]: the ModRM byte would be at 0x10000
    view.regs["rip"] = 0xFFFF
    handler = VcHandler()
    next(handler(view, SvmExit.NPF))
    assert view.ghcb_msr == term_request(TermReason.NESTED_VC)
    assert handler.log[0].endswith("the instruction at 0xffff runs into MMIO at 0x10000")


def test_an_unmapped_instruction_is_still_a_general_termination():
    view = UnmappedAbove(b"", 0x10000)
    view.regs["rip"] = 0x20000
    handler = VcHandler()
    next(handler(view, SvmExit.NPF))
    assert view.ghcb_msr == 0x100
    assert "#VC handler fault at IP 0x20000" in handler.log[0]


@pytest.mark.parametrize(("view", "nested"), [
    (FakeView(b"\xf3\x6e"), True),  # rep outsb: RSI in MMIO
    (UnmappedAbove(b"\xf3\x6e", 0x10000), False),  # RSI not mapped at all: #PF
])  # fmt: skip
def test_a_string_io_buffer_in_mmio_is_a_nested_vc_and_unmapped_is_pf(view, nested):
    view.regs.update(rsi=0xFFFE, rcx=4, rdx=0x3F8)  # two bytes in RAM, two beyond
    handler = VcHandler()
    steps = handler(view, SvmExit.IOIO)
    if nested:
        next(steps)
        assert view.ghcb_msr == term_request(TermReason.NESTED_VC)
        assert handler.log[0].endswith("the string IO buffer reaches MMIO at 0x10000")
    else:
        with pytest.raises(StopIteration) as done:
            next(steps)
        assert done.value.value == 14 and view.ghcb_msr == 0 and handler.log == []


def _reply(info1: int, info2: int) -> Ghcb:
    ghcb = Ghcb()
    ghcb["sw_exit_info_1"] = info1
    ghcb["sw_exit_info_2"] = info2
    return ghcb


@pytest.mark.parametrize(
    ("info1", "info2", "forwarded"),
    [(GhcbResp.ISSUE_EXCEPTION, EventInj.exception(13), 13),
     (GhcbResp.ISSUE_EXCEPTION, EventInj.exception(13, 0), 13),
     (GhcbResp.ISSUE_EXCEPTION, EventInj.exception(6), 6),
     (0xFFFF_FFFF_0000_0001, EventInj.exception(6), 6)],  # only the low 32 bits count
)  # fmt: skip
def test_verify_exception_info_forwards_gp_and_ud(info1, info2, forwarded):
    from sevsim.guest.vc import ForwardException

    with pytest.raises(ForwardException) as exc:
        verify_exception_info(_reply(info1, info2))
    assert exc.value.vector == forwarded


@pytest.mark.parametrize(
    ("info1", "info2"),
    [(GhcbResp.ISSUE_EXCEPTION, EventInj.exception(14)),
     (GhcbResp.ISSUE_EXCEPTION, EventInj.exception(13) & ~EventInj.VALID),
     (GhcbResp.ISSUE_EXCEPTION, EventInj.VALID | 13),  # type INTR, not an exception
     (GhcbResp.MALFORMED_INPUT, 4), (7, 0)],
)  # fmt: skip
def test_verify_exception_info_refuses_anything_else(info1, info2):
    with pytest.raises(VmmError):
        verify_exception_info(_reply(info1, info2))


def test_verify_exception_info_accepts_success():
    verify_exception_info(_reply(0xFFFF_FFFF_0000_0000, 123))


# -- the decoder ---------------------------------------------------------------------------


def one(source: str, bits: int = 64, address: int = 0x1000):
    code = assemble(source, address, bits=bits) if isinstance(source, str) else source
    insn = decode(code, address, bits)
    assert insn is not None and insn.length == len(code)
    return insn


@pytest.mark.parametrize(
    ("name", "value", "before", "after"),
    [("al", 0xAB, JUNK, JUNK & ~0xFF | 0xAB), ("ah", 0xAB, JUNK, JUNK & ~0xFF00 | 0xAB00),
     ("ax", 0xABCD, JUNK, JUNK & ~0xFFFF | 0xABCD), ("eax", 0xABCD, JUNK, 0xABCD),
     ("rax", 0xABCD, JUNK, 0xABCD), ("r9b", 0x1FF, JUNK, JUNK & ~0xFF | 0xFF),
     ("sil", 0, JUNK, JUNK & ~0xFF), ("r15d", 2**32 + 5, JUNK, 5)],
)  # fmt: skip
def test_register_writes_follow_the_hardware(name, value, before, after):
    assert merge_register(before, name, value) == after


@pytest.mark.parametrize(
    ("name", "value"), [("al", 0x88), ("ah", 0x77), ("ax", 0x7788), ("eax", 0x55667788),
                        ("rax", JUNK), ("r8w", 0x7788), ("spl", 0x88), ("esi", 0x55667788)],
)  # fmt: skip
def test_register_reads_pick_their_part(name, value):
    assert read_register(lambda full: JUNK, name) == value


@pytest.mark.parametrize(
    ("source", "kind", "size", "reg"),
    [("mov byte ptr [rax], bl", MmioType.WRITE, 1, "bl"),
     ("mov word ptr [rax], bx", MmioType.WRITE, 2, "bx"),
     ("mov dword ptr [rax], ebx", MmioType.WRITE, 4, "ebx"),
     ("mov qword ptr [rax], rbx", MmioType.WRITE, 8, "rbx"),
     ("mov byte ptr [rax], 1", MmioType.WRITE_IMM, 1, None),
     ("mov qword ptr [rax], -1", MmioType.WRITE_IMM, 8, None),
     ("mov bh, byte ptr [rax]", MmioType.READ, 1, "bh"),
     ("mov r10w, word ptr [rax]", MmioType.READ, 2, "r10w"),
     ("mov ebx, dword ptr [rax]", MmioType.READ, 4, "ebx"),
     ("mov rbx, qword ptr [rax]", MmioType.READ, 8, "rbx"),
     ("movabs al, byte ptr [0xd0000000]", MmioType.READ, 1, "al"),
     ("movabs qword ptr [0xd0000000], rax", MmioType.WRITE, 8, "rax"),
     ("movzx ebx, byte ptr [rax]", MmioType.READ_ZERO_EXTEND, 1, "ebx"),
     ("movzx rbx, word ptr [rax]", MmioType.READ_ZERO_EXTEND, 2, "rbx"),
     ("movsx bx, byte ptr [rax]", MmioType.READ_SIGN_EXTEND, 1, "bx"),
     ("movsx ebx, word ptr [rax]", MmioType.READ_SIGN_EXTEND, 2, "ebx"),
     ("movsxd rbx, dword ptr [rax]", MmioType.READ_SIGN_EXTEND, 4, "rbx"),
     ("movsb", MmioType.MOVS, 1, None), ("rep movsq", MmioType.MOVS, 8, None),
     (b"\xa5", MmioType.MOVS, 4, None), (b"\x66\xa5", MmioType.MOVS, 2, None)],
)  # fmt: skip
def test_decode_mmio_forms(source, kind, size, reg):
    mmio = decode_mmio(one(source))
    assert mmio is not None
    assert (mmio.type, mmio.bytes) == (kind, size)
    assert (mmio.reg.name if mmio.reg else None) == reg


def test_decode_mmio_immediates_are_sized_to_the_access():
    assert decode_mmio(one("mov qword ptr [rax], -2")).imm == 2**64 - 2
    assert decode_mmio(one("mov word ptr [rax], 0x8001")).imm == 0x8001


@pytest.mark.parametrize(
    "source",
    ["add dword ptr [rax], 1", "mov rax, rbx", "mov rax, 5", "cmp byte ptr [rax], 0",
     b"\x8c\x00", "lea rax, [rbx]", "movsx eax, bl"],  # b"\x8c\x00": mov [rax], es
)
def test_decode_mmio_refuses_what_it_cannot_emulate(source):
    assert decode_mmio(one(source)) is None


def test_decode_mmio_in_32_and_16_bit_modes():
    mmio = decode_mmio(one("mov eax, dword ptr [ebx + 8]", bits=32))
    assert (mmio.type, mmio.bytes, mmio.reg.name) == (MmioType.READ, 4, "eax")
    mmio = decode_mmio(one("mov ax, word ptr [bx + si]", bits=16))
    assert (mmio.type, mmio.bytes, mmio.reg.name) == (MmioType.READ, 2, "ax")
    mmio = decode_mmio(one(b"\x66\x8b\x07", bits=16))  # mov eax, [bx]: operand-size prefix
    assert (mmio.bytes, mmio.reg.name) == (4, "eax")


REGS = {"rax": 0x1000, "rbx": 0xD000_0000, "rcx": 3, "rsi": 2**64 - 8, "rbp": 0x500}


def address(source: str | bytes, bits: int = 64, bases: Mapping[str, int] | None = None) -> int:
    insn = one(source, bits=bits)
    assert insn.mem is not None
    return linear_address(insn, insn.mem, lambda n: REGS.get(n, 0),
                          lambda s: (bases or {}).get(s, 0))  # fmt: skip


@pytest.mark.parametrize(
    ("source", "expected"),
    [("mov eax, dword ptr [rbx]", 0xD000_0000),
     ("mov eax, dword ptr [rbx + rcx*8 + 0x10]", 0xD000_0028),
     ("mov eax, dword ptr [rbx + rsi]", 0xCFFF_FFF8),  # wraps at 64 bits
     ("mov eax, dword ptr [rbx - 0x10]", 0xCFFF_FFF0),
     ("mov eax, dword ptr [rcx*4]", 12),
     ("mov eax, dword ptr [rip + 0x100]", 0x1000 + 6 + 0x100),
     ("movabs eax, dword ptr [0xfedcba9876543210]", 0xFEDC_BA98_7654_3210),
     (b"\x67\x8b\x04\x33", 0xCFFF_FFF8),  # mov eax, [ebx + esi]: 32-bit wrap
     (b"\x67\x8b\x05\x00\x01\x00\x00", 0x1000 + 7 + 0x100)],  # [eip + 0x100]
)  # fmt: skip
def test_linear_address_of_every_addressing_mode(source, expected):
    assert address(source) == expected


def test_linear_address_adds_fs_and_gs_bases_only_in_64_bit_mode():
    bases = {"fs": 0x7000_0000, "gs": 0x100, "ds": 0x50, "es": 0x60, "ss": 0x70}
    assert address("mov eax, dword ptr fs:[rax]", bases=bases) == 0x7000_1000
    assert address("mov eax, dword ptr gs:[rax + 8]", bases=bases) == 0x1108
    assert address(b"\x26\x8b\x00", bases=bases) == 0x1000  # es: ignored in 64-bit mode
    assert address("mov eax, dword ptr [rbp]", bases=bases) == 0x500
    assert address("mov eax, dword ptr [eax]", bits=32, bases=bases) == 0x1050
    assert address("mov eax, dword ptr es:[eax]", bits=32, bases=bases) == 0x1060
    assert address("mov eax, dword ptr [ebp]", bits=32, bases=bases) == 0x570  # SS default
    assert address("mov ax, word ptr [bx + si + 2]", bits=16) == (0x0000 + 0xFFF8 + 2) & 0xFFFF


@pytest.mark.parametrize(
    ("value", "size", "to", "signed", "expected"),
    [(0x80, 1, 8, True, 2**64 - 0x80), (0x80, 1, 8, False, 0x80), (0x7F, 1, 4, True, 0x7F),
     (0x8000, 2, 4, True, 0xFFFF_8000), (0x8000_0000, 4, 8, True, 0xFFFF_FFFF_8000_0000),
     (0x80, 1, 2, True, 0xFF80)],
)  # fmt: skip
def test_extend(value, size, to, signed, expected):
    assert extend(value, size, to, signed) == expected


DX = 0x3F8


@pytest.mark.parametrize(
    ("source", "bits", "info"),
    [("in al, 0x80", 64, 0x80 << 16 | 0x10 | 0x200 | IOIO_TYPE_IN),
     ("out 0x80, eax", 64, 0x80 << 16 | 0x40 | 0x200),
     ("in ax, dx", 64, DX << 16 | 0x20 | 0x200 | IOIO_TYPE_IN),
     ("out dx, al", 32, DX << 16 | 0x10 | 0x100),
     ("out dx, ax", 16, DX << 16 | 0x20 | 0x80),
     ("insb", 64, DX << 16 | 0x10 | 0x200 | IOIO_TYPE_IN | IOIO_STR),
     ("rep insd", 64, DX << 16 | 0x40 | 0x200 | IOIO_TYPE_IN | IOIO_STR | IOIO_REP),
     ("rep outsw", 64, DX << 16 | 0x20 | 0x200 | IOIO_STR | IOIO_REP | 3 << 10),
     (b"\x65\x6e", 64, DX << 16 | 0x10 | 0x200 | IOIO_STR | 5 << 10),  # gs outsb
     (b"\x67\xf3\x6c", 64, DX << 16 | 0x10 | 0x100 | IOIO_TYPE_IN | IOIO_STR | IOIO_REP),
     ("rep outsb", 32, DX << 16 | 0x10 | 0x100 | IOIO_STR | IOIO_REP | 3 << 10)],
)  # fmt: skip
def test_ioio_exitinfo(source, bits, info):
    io = ioio_exitinfo(one(source, bits=bits), 0xABCD_0000 | DX)
    assert io is not None
    assert hex(io.exit_info_1) == hex(info)


def test_ioio_exitinfo_refuses_other_instructions():
    assert ioio_exitinfo(one("mov eax, dword ptr [rbx]"), 0) is None


@pytest.mark.parametrize(
    ("source", "code"),
    [("cpuid", SvmExit.CPUID), ("rdmsr", SvmExit.MSR), ("wrmsr", SvmExit.MSR),
     ("rdpmc", SvmExit.RDPMC), ("rdtscp", SvmExit.RDTSCP), ("rdtsc", SvmExit.RDTSC),
     ("invd", SvmExit.INVD), ("wbinvd", SvmExit.WBINVD), ("monitor", SvmExit.MONITOR),
     ("mwait", SvmExit.MWAIT), (b"\x0f\x01\xfa", SvmExit.MONITOR),
     ("vmmcall", SvmExit.VMMCALL), ("mov dr7, rax", SvmExit.WRITE_DR7),
     ("mov rbx, dr7", SvmExit.READ_DR7), ("mov rbx, dr6", None), ("nop", None)],
)  # fmt: skip
def test_exit_code_of_each_intercepted_instruction(source, code):
    assert exit_code_of(one(source)) == code


def test_decode_keeps_prefixes_and_operands():
    insn = one(b"\x64\xf3\xa4")  # rep movsb with an FS source
    assert (insn.mnemonic, insn.rep, insn.segment, insn.length) == ("movsb", True, "fs", 3)
    insn = one("mov qword ptr gs:[rbx + rcx*8 - 4], 0x10")
    assert insn.operands == (
        MemOperand(8, "rbx", "rcx", 8, -4, "gs"),
        ImmOperand(0x10, 8),
    )
    assert one("in al, dx").operands == (RegOperand("al", 1), RegOperand("dx", 2))
    assert decode(b"\x0f", 0, 64) is None  # cut short
    assert decode(b"\xff\xff", 0, 64) is None  # FF /7 is undefined
