"""The STI interrupt shadow reaches KVM in int_state (APM 15.21.5; KVM's
``svm_interrupt_blocked`` reads INTERRUPT_SHADOW beside the SEV-ES guest IF bit).

A VMM that injects an interrupt between STI and the instruction its shadow covers
breaks ``sti; hlt``: the handler returns to the HLT, and a one-shot timer that
already fired never wakes it. The host timer's kick can end a run exactly there (at
the start of the block after STI), so the CPU reports QEMU's inhibit-IRQ state.
"""

import pytest
from guests import guest, launch

from sevsim.arch.vmcb import VMCB_CONTROL, IntState
from sevsim.hw.engine import Engine
from sevsim.hw.inspect import cpu_of
from sevsim.hw.regs import Registers
from sevsim.kvm.exits import Hlt

STI_NOP = b"\xfb\x90\xf4"  # sti; nop; hlt


def test_the_cpu_sees_the_shadow_after_sti_and_not_after_the_next_instruction():
    engine = Engine(0)
    engine.block_checks = True  # counted runs stop at the exact instruction
    engine.uc.mem_map(0x1000, 0x1000)
    engine.uc.mem_write(0x1000, STI_NOP)
    regs = Registers(engine.uc, engine.env)
    engine.uc.emu_start(0x1000, 0x2000, count=1)  # sti
    assert regs.interrupt_shadow()
    engine.uc.emu_start(0x1001, 0x2000, count=1)  # nop
    assert not regs.interrupt_shadow()


@pytest.mark.parametrize(("shadow", "ready"), [(True, False), (False, True)])
def test_int_state_reports_the_shadow_and_kvm_waits_for_it_to_end(monkeypatch, shadow, ready):
    vm = launch(guest("sti\nnop\nnop\nhlt"))
    vcpu = vm.vcpus[0]
    vcpu.run(budget=1)  # the CPU exists from the first VMRUN on
    cpu = cpu_of(vcpu.vmsa)
    monkeypatch.setattr(cpu, "interrupt_shadow", lambda: shadow)
    vcpu.run(budget=1)
    expected = IntState.GUEST_INTERRUPT_MASK | (IntState.INTERRUPT_SHADOW if shadow else 0)
    assert VMCB_CONTROL.get(vcpu.vmcb, "int_state") == expected
    assert vcpu.ready_for_interrupt_injection is ready


def test_a_hlt_in_the_shadow_of_sti_ends_it_so_the_interrupt_can_wake_the_vcpu():
    """The HLT exit completes the instruction the shadow covered (KVM's
    ``__svm_skip_emulated_instruction`` clears the shadow too): an interrupt can be
    injected into the halted vCPU; reporting the shadow there left it halted for ever."""
    vm = launch(guest("cli\nsti\nhlt"))
    vcpu = vm.vcpus[0]
    assert isinstance(vcpu.run(), Hlt)
    assert VMCB_CONTROL.get(vcpu.vmcb, "int_state") == IntState.GUEST_INTERRUPT_MASK
    assert vcpu.ready_for_interrupt_injection
