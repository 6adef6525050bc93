"""A #VC inside the #VC handler: both handlers on the same guests.

When the instruction at RIP is itself in MMIO (the guest jumped there), the CPU's
fetch raises #VC(NPF), and the handler's own read of that instruction raises
another #VC: the same happens to a string IO buffer in MMIO. The native handler
used to take that nested #VC on the same IST stack, over the outer one's frame, and
loop for ever; now it refuses to nest and terminates with its reason ``NESTED_VC``.
The modeled handler ends the same guests the same way.

Each guest asks for a general termination (set 0, code 0) if it ever gets past the
faulting instruction, and every run is bounded by a KVM_RUN timeout so that a
regression fails (RunFailed EINTR) instead of hanging the suite.
"""

from __future__ import annotations

import re

import pytest
from attrs import frozen

from sevsim.arch.ghcb_msr import TermReason
from sevsim.guest.asm import assemble
from sevsim.guest.image import CODE, GHCB_GPA, PT
from sevsim.guest.snippets import TERMINATE
from sevsim.guest.vc import VcHandler
from sevsim.guest.vc_native import (
    HANDLER_SIZE,
    VC_HANDLER_ADDRESS,
    term_request,
    vc_image_args,
)
from sevsim.kvm.exits import KvmExit, SystemEvent, SystemEventType
from sevsim.testing import run_guest
from sevsim.trace import Trace
from sevsim.vmm.machine import MMIO_TEST_GPA, Devices

NESTED = SystemEvent(SystemEventType.SEV_TERM, (term_request(TermReason.NESTED_VC),))
#: KVM_RUN's bound: a run that loops shows up as RunFailed EINTR after this long.
TIMEOUT = 10.0
#: A guest page remapped to the MMIO test device (the last 4 KiB page of the first PT).
REMAPPED = 0x1FF000


@frozen
class Run:
    exit: KvmExit
    trace: Trace
    devices: Devices
    handler: VcHandler | None

    def vcs(self) -> list[tuple[str, int]]:
        """(exit name, RIP) of every #VC the trace shows."""
        return [(m[1], int(m[2], 16)) for line in self.trace.lines
                if (m := re.search(r"#VC (\S+) at (0x[0-9a-f]+)", line))]  # fmt: skip

    def modeled_vmgexits(self) -> list[int]:
        """The guest RIP of every VMGEXIT the modeled handler made."""
        return [int(m[1], 16) for line in self.trace.lines if "modeled #VC handler" in line
                and (m := re.search(r"@(0x[0-9a-f]+)", line))]  # fmt: skip


def run(
    source: str,
    modeled: bool,
    data: dict[int, bytes] | None = None,
    idt: dict[int, int] | None = None,
) -> Run:
    """``source`` as an SEV-ES guest with the native or the modeled #VC handler."""
    args: dict = {"idt": idt or {}} if modeled else vc_image_args(idt=idt)
    data = {**args.pop("data", {}), **(data or {})}
    handler = VcHandler() if modeled else None
    guest = run_guest(f"{source}\n{TERMINATE}\nhlt", enable=("msr_protocol", "ioio", "mmio"),
                      vc_model=handler, timeout=TIMEOUT, shared=frozenset({GHCB_GPA}),
                      data=data, **args)  # fmt: skip
    return Run(guest.exit, guest.trace, guest.devices, handler)


#: name -> (set-up, the instruction that faults, the exit code of the first #VC)
GUESTS = {
    "jmp into MMIO": (f"mov rax, {MMIO_TEST_GPA}", "jmp rax", "SVM_EXIT_NPF"),
    "call into MMIO": (f"mov rax, {MMIO_TEST_GPA + 0x10}", "call rax", "SVM_EXIT_NPF"),
    "rep outsb from MMIO": (f"mov rsi, {MMIO_TEST_GPA}; mov ecx, 4; mov dx, 0x3f8", "rep outsb",
                            "SVM_EXIT_IOIO"),
    "rep insb into MMIO": (f"mov rdi, {MMIO_TEST_GPA + 0x100}; mov ecx, 4; mov dx, 0x3f8",
                           "rep insb", "SVM_EXIT_IOIO"),
}  # fmt: skip


def first_vc_rip(setup: str, insn: str) -> int:
    """Where the first #VC is taken: at the target of a jump, else at the instruction."""
    if insn in ("jmp rax", "call rax"):
        return int(setup.split()[-1], 0)
    return CODE + len(assemble(setup, CODE))


@pytest.mark.parametrize("modeled", [False, True], ids=["native", "modeled"])
@pytest.mark.parametrize("guest", GUESTS)
def test_a_vc_the_handler_would_take_inside_itself_terminates(guest, modeled):
    setup, insn, first_exit = GUESTS[guest]
    r = run(f"{setup}\n{insn}", modeled)
    assert r.exit == NESTED, (r.exit, r.trace.lines[-8:])
    assert r.devices.uart.output == b""  # no MMIO byte reached the UART
    assert (r.devices.mmio_test.writes, bytes(r.devices.mmio_test.buffer[:4])) == (0, bytes(4))
    rip = first_vc_rip(setup, insn)
    if modeled:  # its VMGEXITs (INS: the IO read, then the TERM_REQ) at the interrupted RIP
        assert r.modeled_vmgexits() == [rip] * (2 if insn == "rep insb" else 1)
        assert r.handler is not None and "#VC inside the #VC handler" in r.handler.log[0]
    else:  # the first #VC is the guest's; the second the handler's own read, the last one
        (outer, outer_rip), (inner, inner_rip) = r.vcs()
        assert (outer, outer_rip) == (first_exit, rip)
        assert inner == "SVM_EXIT_NPF"
        assert VC_HANDLER_ADDRESS <= inner_rip < VC_HANDLER_ADDRESS + HANDLER_SIZE


@pytest.mark.parametrize("modeled", [False, True], ids=["native", "modeled"])
def test_an_instruction_that_runs_from_ram_into_mmio_terminates(modeled):
    """``mov eax, [rbx]`` (8B 03) across a page end: the opcode is in RAM, the ModRM
    byte on a page the guest has remapped to the MMIO device."""
    at = REMAPPED - 1
    r = run(f"""
        mov rax, {MMIO_TEST_GPA | 3}
        mov rdi, {PT + 8 * ((REMAPPED >> 12) & 511)}
        mov [rdi], rax
        mov rax, {at}
        jmp rax
    """, modeled, data={at: b"\x8b"})
    assert r.exit == NESTED, (r.exit, r.trace.lines[-8:])
    if modeled:
        assert r.modeled_vmgexits() == [at]
    else:
        assert r.vcs()[0] == ("SVM_EXIT_NPF", at)


@pytest.mark.parametrize("modeled", [False, True], ids=["native", "modeled"])
def test_ordinary_mmio_still_completes(modeled):
    """The same device, reached by data accesses only: no termination for nesting."""
    r = run(f"mov rbx, {MMIO_TEST_GPA}; mov eax, [rbx]; mov [rbx + 8], rax; "
            "mov dx, 0x3f8; mov al, 0x41; out dx, al", modeled)  # fmt: skip
    assert r.exit == SystemEvent(SystemEventType.SEV_TERM, (0x100,)), r.trace.lines[-8:]
    assert r.devices.uart.output == b"A"
    assert r.devices.mmio_test.scratch == int.from_bytes(b"SVES", "little")
