"""Slices of guest execution: a run the host's timer (or an instruction budget) ends
must resume exactly where it stopped.

Unicorn stops a run from another thread at the next memory access it checks; for a
read-modify-write instruction that can be after the store, and the instruction would
run again on resume (``sevsim.hw.engine``). These guests count in memory with such
instructions while the host slices them as finely as it can, and the counts must
come out exact.
"""

from __future__ import annotations

import struct

from guests import guest, launch

from sevsim.guest.snippets import TERMINATE
from sevsim.hw.inspect import cpu_of
from sevsim.kvm.exits import RunFailed, SystemEvent

COUNTER = 0x30000
ROUNDS = 300_000
#: Enough rounds for many slices of the host's timer (stores run at Unicorn's full
#: speed: a few nanoseconds a round).
TIMED_ROUNDS = 5_000_000


def _count(rounds: int) -> str:
    """Three read-modify-write forms on three counters (zeroed first: a page never
    written reads as the decryption of whatever was there)."""
    return f"""
    mov rbx, {COUNTER:#x}
    xor eax, eax
    mov [rbx], rax
    mov [rbx + 8], rax
    mov [rbx + 16], rax
    mov rcx, {rounds}
again:
    add qword ptr [rbx], 1
    inc qword ptr [rbx + 8]
    xadd qword ptr [rbx + 16], rdx
    mov edx, 3
    dec rcx
    jnz again
{TERMINATE}
"""


def _finish(vm, run) -> int:
    """Run the guest to its end with ``run``; how many times KVM_RUN was interrupted."""
    interrupted = 0
    while True:
        exit_ = run(vm.vcpus[0])
        if isinstance(exit_, RunFailed) and exit_.errno == "EINTR":
            interrupted += 1
            continue
        assert isinstance(exit_, SystemEvent), exit_
        return interrupted


def _counters(vm) -> tuple[int, int, int]:
    """The counters as the guest sees them (private memory: the simulator's view)."""
    raw = cpu_of(vm.vcpus[0].vmsa).mmu.read(COUNTER, 24)
    return struct.unpack("<3Q", raw)


def test_timer_slices_do_not_repeat_read_modify_write_instructions():
    vm = launch(guest(_count(TIMED_ROUNDS)))
    interrupted = _finish(vm, lambda vcpu: vcpu.run(timeout=0.0005))
    assert interrupted > 20  # the host really did take the CPU back, often
    assert _counters(vm) == (TIMED_ROUNDS, TIMED_ROUNDS, 3 * (TIMED_ROUNDS - 1))


def test_guest_time_slices_count_only_the_guests_own_time():
    """``slice_ns`` ends KVM_RUN once the guest itself has run that long: every
    slice but the last used at least its time, and all of them together no more
    than the guest's own time (the exits' handling is not in it)."""
    vm = launch(guest(_count(TIMED_ROUNDS)))
    vcpu = vm.vcpus[0]
    used = []

    def run(vcpu):
        before = vcpu.guest_ns
        exit_ = vcpu.run(slice_ns=1_000_000)
        used.append(vcpu.guest_ns - before)
        return exit_

    interrupted = _finish(vm, run)
    assert interrupted >= 5
    assert all(ns >= 1_000_000 for ns in used[:-1])
    assert sum(used) == vcpu.guest_ns
    assert _counters(vm) == (TIMED_ROUNDS, TIMED_ROUNDS, 3 * (TIMED_ROUNDS - 1))


def test_instruction_budgets_slice_and_count_exactly():
    vm = launch(guest(_count(ROUNDS)))
    interrupted = _finish(vm, lambda vcpu: vcpu.run(budget=10_007))
    assert _counters(vm) == (ROUNDS, ROUNDS, 3 * (ROUNDS - 1))
    # Six instructions a round: every slice but the last used its whole budget. A
    # slice ends at the next block start, and Unicorn does not count the rest of the
    # block it was in (at most one round here), so the count may fall short by that.
    assert interrupted >= (6 * ROUNDS) // 10_007 - 1
    assert 6 * ROUNDS - 6 * interrupted <= vm.vcpus[0].retired <= 6 * ROUNDS + 20


def test_mov_to_cr2_is_not_intercepted_and_reads_back():
    """CR2 is plain storage: no trap, no #GP (OVMF's exception exit restores it)."""
    vm = launch(guest(f"""
        mov rax, 0x1234567
        mov cr2, rax
        mov rbx, cr2
        mov rdi, {COUNTER:#x}
        mov [rdi], rbx
        {TERMINATE}
    """))
    assert isinstance(vm.vcpus[0].run(10), SystemEvent)
    assert _counters(vm)[0] == 0x1234567
