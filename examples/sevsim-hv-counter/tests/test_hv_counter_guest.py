"""hv_counter end to end: a real SEV-ES guest calls the service through its GHCB.

The guest (64-bit assembly, below) does what a guest driver for this service would
do: it fills the GHCB page it shares with the hypervisor (fields, then their valid
bits), writes the page's GPA to the GHCB MSR, executes VMGEXIT and reads the reply
from the same page. It checks every reply itself and reports through the GHCB MSR
protocol: TERM_REQ with reason code 0 when all was as expected, else the number of
the step that went wrong. It also copies what it got at step 2 into the GHCB's
shared buffer, which the test reads from the host side.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

import pytest
from sevsim_hv_counter import NAME, SEVSIM_VMGEXIT_HV_COUNTER

from sevsim.arch.exits import GhcbErr, GhcbResp, exit_name
from sevsim.arch.ghcb import GHCB_SAVE_AREA, SHARED_BUFFER_START, valid_bit
from sevsim.guest.image import GHCB_GPA
from sevsim.kvm.exits import SystemEvent, SystemEventType

if TYPE_CHECKING:  # imported for real by pytest, through pytest_plugins below
    from sevsim.testing import GuestRun

pytest_plugins = ["sevsim.testing"]

MSR_GHCB = 0xC001_0130
TERM_REQ = 0x100
RAX, RBX = GHCB_SAVE_AREA.offset("rax"), GHCB_SAVE_AREA.offset("rbx")
EXIT_CODE = GHCB_SAVE_AREA.offset("sw_exit_code")
INFO1, INFO2 = GHCB_SAVE_AREA.offset("sw_exit_info_1"), GHCB_SAVE_AREA.offset("sw_exit_info_2")
BITMAP = GHCB_SAVE_AREA.offset("valid_bitmap")
#: Where the guest copies the step-2 reply (RAX, RBX) for the host to read.
REPORT = SHARED_BUFFER_START


def bitmap(*names: str) -> tuple[int, int]:
    """The two valid-bitmap quadwords marking ``names`` valid."""
    bits = sum(1 << valid_bit(name) for name in names)
    return bits & (1 << 64) - 1, bits >> 64


ALWAYS = bitmap("sw_exit_code", "sw_exit_info_1", "sw_exit_info_2")
RAX_BIT, RBX_BIT = bitmap("rax"), bitmap("rbx")


def guest(start: int) -> str:
    """The guest program, expecting the counters to start at ``start``."""
    return f"""
    mov r15, {GHCB_GPA:#x}              /* the GHCB page, mapped shared (C=0) */
    mov rdi, r15
    xor eax, eax
    mov ecx, 512
    rep stosq                           /* a clean page: ghcb_usage 0, nothing valid */

    mov r14, 1                          /* step 1: counter 1 += 5 -> start + 5, was start */
    mov r8, 1
    mov r9, 5
    mov r10, 3                          /* RAX and RBX valid */
    call hv_counter
    test rcx, rcx
    jnz fail
    mov r12, {start + 5:#x}
    cmp rax, r12
    jne fail
    mov r12, {start:#x}
    cmp rbx, r12
    jne fail

    mov r14, 2                          /* step 2: counter 1 += 7 -> start + 12, was start + 5 */
    mov r8, 1
    mov r9, 7
    mov r10, 3
    call hv_counter
    mov [r15 + {REPORT:#x}], rax        /* for the host to see */
    mov [r15 + {REPORT + 8:#x}], rbx
    test rcx, rcx
    jnz fail
    mov r12, {start + 12:#x}
    cmp rax, r12
    jne fail
    mov r12, {start + 5:#x}
    cmp rbx, r12
    jne fail

    mov r14, 3                          /* step 3: counter 0 is untouched */
    mov r8, 0
    mov r9, 0
    mov r10, 3
    call hv_counter
    test rcx, rcx
    jnz fail
    mov r12, {start:#x}
    cmp rax, r12
    jne fail

    mov r14, 4                          /* step 4: no counter 9 -> INVALID_INPUT */
    mov r8, 9
    mov r9, 1
    mov r10, 3
    call hv_counter
    cmp rcx, {GhcbResp.MALFORMED_INPUT}
    jne fail
    cmp rdx, {GhcbErr.INVALID_INPUT}
    jne fail

    mov r14, 5                          /* step 5: RBX not marked valid -> MISSING_INPUT */
    mov r8, 1
    mov r9, 1
    mov r10, 1
    call hv_counter
    cmp rcx, {GhcbResp.MALFORMED_INPUT}
    jne fail
    cmp rdx, {GhcbErr.MISSING_INPUT}
    jne fail

    mov rax, {TERM_REQ:#x}              /* all as expected: TERM_REQ, reason code 0 */
    jmp terminate

fail:                                   /* TERM_REQ, reason set 0, reason code = the step */
    mov rax, r14
    shl rax, 16
    or rax, {TERM_REQ:#x}
terminate:
    mov rdx, rax
    shr rdx, 32
    mov ecx, {MSR_GHCB:#x}
    wrmsr
    rep vmmcall
hang:
    hlt
    jmp hang

/* SEVSIM_VMGEXIT_HV_COUNTER: r8 = counter, r9 = increment, r10 bit 0 / bit 1: mark
   RAX / RBX valid. Returns rax, rbx = the reply registers, rcx, rdx = sw_exit_info_1/2. */
hv_counter:
    mov rdi, r15
    xor eax, eax
    mov ecx, {(BITMAP + 16) // 8}
    rep stosq                           /* clear the save area and the valid bitmap */
    mov rax, {SEVSIM_VMGEXIT_HV_COUNTER:#x}
    mov [r15 + {EXIT_CODE:#x}], rax     /* sw_exit_info_1 and _2 stay 0 */
    mov [r15 + {RAX:#x}], r8
    mov [r15 + {RBX:#x}], r9
    mov rax, {ALWAYS[0]:#x}
    mov rbx, {ALWAYS[1]:#x}
    test r10, 1
    jz rax_done
    mov rcx, {RAX_BIT[0]:#x}
    or rax, rcx
    mov rcx, {RAX_BIT[1]:#x}
    or rbx, rcx
rax_done:
    test r10, 2
    jz rbx_done
    mov rcx, {RBX_BIT[0]:#x}
    or rax, rcx
    mov rcx, {RBX_BIT[1]:#x}
    or rbx, rcx
rbx_done:
    mov [r15 + {BITMAP:#x}], rax
    mov [r15 + {BITMAP + 8:#x}], rbx
    mov ecx, {MSR_GHCB:#x}              /* GHCB MSR = the GHCB's GPA */
    mov rax, r15
    xor edx, edx
    wrmsr
    rep vmmcall                         /* VMGEXIT */
    mov rax, [r15 + {RAX:#x}]
    mov rbx, [r15 + {RBX:#x}]
    mov rcx, [r15 + {INFO1:#x}]
    mov rdx, [r15 + {INFO2:#x}]
    ret
"""


@pytest.fixture
def run_guest():
    """:func:`sevsim.testing.run_guest` (its module docstring promises this fixture, but
    sevsim 0.1.0 does not define it yet; a module fixture of the same name is harmless
    once it does). Imported here, after pytest has loaded ``sevsim.testing`` as a plugin,
    so that its assertion rewriting still applies."""
    from sevsim.testing import run_guest

    return run_guest


def ghcb_u64(run: GuestRun, offset: int) -> int:
    """A quadword of the GHCB page as the host sees it (shared: plaintext)."""
    return struct.unpack("<Q", run.vm.memory.read(GHCB_GPA + offset, 8))[0]


def failed_step(run: GuestRun) -> int | None:
    """The step the guest reported as failed, None if it terminated with code 0."""
    assert isinstance(run.exit, SystemEvent), f"the guest did not terminate: {run.exit}"
    assert run.exit.type == SystemEventType.SEV_TERM
    (value,) = run.exit.data
    assert value & 0xFFFF == TERM_REQ
    return (value >> 16) & 0xFF or None


def test_the_guest_notices_a_wrong_reply(run_guest):
    # The guest's own checks are live: expecting counters at 7, it fails at step 1.
    assert failed_step(run_guest(guest(7), enable=[NAME, "msr_protocol"])) == 1


@pytest.mark.parametrize("start", [0, 1000])
def test_a_guest_uses_the_counter_service(run_guest, start):
    settings = {NAME: {"start": start}} if start else None
    run = run_guest(guest(start), enable=[NAME, "msr_protocol"], settings=settings)
    assert failed_step(run) is None
    assert run.exit == SystemEvent(SystemEventType.SEV_TERM, (TERM_REQ,))
    assert (ghcb_u64(run, REPORT), ghcb_u64(run, REPORT + 8)) == (start + 12, start + 5)
    # the GHCB still holds the last reply: step 5's MISSING_INPUT
    assert (ghcb_u64(run, INFO1), ghcb_u64(run, INFO2)) == (2, GhcbErr.MISSING_INPUT)
    assert run.trace.requests[f"GHCB {exit_name(SEVSIM_VMGEXIT_HV_COUNTER)}"] == 5


def test_a_guest_meets_a_hypervisor_without_the_service(run_guest):
    # -p no:hv_counter: the first call comes back INVALID_EVENT; the guest gives up.
    run = run_guest(guest(0), enable=["msr_protocol"])
    assert failed_step(run) == 1
    assert ghcb_u64(run, EXIT_CODE) == SEVSIM_VMGEXIT_HV_COUNTER
    assert (ghcb_u64(run, INFO1), ghcb_u64(run, INFO2)) == (2, GhcbErr.INVALID_EVENT)
    assert run.trace.requests[f"GHCB {exit_name(SEVSIM_VMGEXIT_HV_COUNTER)}"] == 1
