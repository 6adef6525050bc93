"""Registers read in place from the live CPU state agree with Unicorn's API.

:class:`sevsim.hw.regs.Registers` reads GPRs, RIP, selectors and descriptor-table
registers from the engine's ``CPUX86State`` and takes IF and IOPL from its
``eflags`` field, instead of calling ``uc_reg_read``: at rest and inside a hook
(where QEMU computes the arithmetic flags lazily) every value must be the one the
API gives.
"""

from unicorn import UC_HOOK_CODE, UcError
from unicorn import x86_const as x86

from sevsim.hw.engine import Engine
from sevsim.hw.regs import GPR_IDS, SEG_IDS, Registers

#: add rax, rbx; stc; std; popfq (IF and IOPL 3 from the stack); inc rcx; nop; hlt
CODE = bytes.fromhex("4801d8 f9 fd 9d 48ffc1 90 f4")
TABLES = (x86.UC_X86_REG_GDTR, x86.UC_X86_REG_IDTR, x86.UC_X86_REG_TR, x86.UC_X86_REG_LDTR)


def _engine() -> tuple[Engine, Registers]:
    engine = Engine(0)
    uc = engine.uc
    uc.mem_map(0x1000, 0x1000)
    uc.mem_map(0x8000, 0x1000)
    uc.mem_write(0x1000, CODE)
    regs = Registers(uc, engine.env)
    for i, reg in enumerate(GPR_IDS.values()):
        uc.reg_write(reg, 0x1111_0000_0000_0000 * (i + 1) + i)
    uc.reg_write(x86.UC_X86_REG_RSP, 0x8800)
    uc.mem_write(0x8800, (0x3202).to_bytes(8, "little"))  # IOPL 3, IF
    uc.reg_write(x86.UC_X86_REG_GDTR, (0, 0xFFFF_8000_0000_1000, 0x7F, 0))
    uc.reg_write(x86.UC_X86_REG_IDTR, (0, 0xFFFF_8000_0000_2000, 0xFFF, 0))
    uc.reg_write(x86.UC_X86_REG_TR, (0x40, 0xFFFF_8000_0000_3000, 0x67, 0x8B00))
    return engine, regs


def _agree(engine: Engine, regs: Registers) -> None:
    uc = engine.uc
    for reg in (*GPR_IDS.values(), x86.UC_X86_REG_RIP, *SEG_IDS.values()):
        assert regs.read(reg) == uc.reg_read(reg), reg
    assert regs.rip == uc.reg_read(x86.UC_X86_REG_RIP)
    for name, reg in GPR_IDS.items():
        assert regs.gpr(name) == uc.reg_read(reg)
    rflags = uc.reg_read(x86.UC_X86_REG_RFLAGS)
    assert regs.rflags == rflags
    assert regs.interrupt_flag() == bool(rflags & 1 << 9)
    assert regs.iopl() == (rflags >> 12) & 3
    for reg in TABLES:
        _, base, limit, _ = uc.reg_read(reg)
        assert regs.table(reg)[1:3] == (base, limit), reg
    _, _, _, flags = uc.reg_read(x86.UC_X86_REG_TR)
    assert regs.table(x86.UC_X86_REG_TR) == (0x40, 0xFFFF_8000_0000_3000, 0x67, flags)


def test_direct_reads_agree_with_the_api_at_rest_and_inside_hooks():
    engine, regs = _engine()
    seen = []

    def hook(uc, address, size, _):
        _agree(engine, regs)
        seen.append(address)

    engine.uc.hook_add(UC_HOOK_CODE, hook, begin=0x1000, end=0x1000 + len(CODE))
    _agree(engine, regs)
    engine.uc.emu_start(0x1000, 0x1000 + len(CODE))
    assert seen == [0x1000, 0x1003, 0x1004, 0x1005, 0x1006, 0x1009, 0x100A]
    _agree(engine, regs)
    assert regs.interrupt_flag() and regs.iopl() == 3


def test_gpr_writes_land_where_the_api_reads_them():
    engine, regs = _engine()
    for i, (name, reg) in enumerate(GPR_IDS.items()):
        assert regs.write(reg, -1 - i)
        assert engine.uc.reg_read(reg) == (1 << 64) - 1 - i
        regs.set_gpr(name, 0x42 + i)
        assert engine.uc.reg_read(reg) == 0x42 + i
    assert regs.write(x86.UC_X86_REG_RIP, 0x1003)
    assert regs.rip == engine.uc.reg_read(x86.UC_X86_REG_RIP) == 0x1003


def test_rflags_between_runs_is_what_the_api_computes_however_the_run_ended():
    """A run ends by emu_stop in a hook, by an exception (an unmapped access, an invalid
    instruction), by HLT or by its instruction count: each time the flags the last
    instructions computed lazily are in ``eflags``."""
    endings = {
        "hook stop": bytes.fromhex("4801d8 f9 fd 90 90 f4"),
        "unmapped read": bytes.fromhex("4801d8 f9 488b0425 00000100 f4"),
        "invalid opcode": bytes.fromhex("4829d8 fd 0f0b f4"),
        "hlt": bytes.fromhex("4801d8 f5 f4"),
        "count": bytes.fromhex("4831c0 4801d8 4883e801 90 f4"),
    }
    for how, code in endings.items():
        engine, regs = _engine()
        uc = engine.uc
        uc.mem_write(0x1000, code + b"\xf4" * 8)
        if how == "hook stop":
            engine.block_checks = True  # the stop lands in front of the hooked NOP
            uc.hook_add(UC_HOOK_CODE, lambda uc, *_: uc.emu_stop(), begin=0x1005, end=0x1005)
        try:
            uc.emu_start(0x1000, 0x1100, count=3 if how == "count" else 0)
        except UcError:
            pass
        assert regs.rflags_between_runs() == uc.reg_read(x86.UC_X86_REG_RFLAGS), how
        uc.reg_write(x86.UC_X86_REG_RFLAGS, 0x8D7)
        assert regs.rflags_between_runs() == uc.reg_read(x86.UC_X86_REG_RFLAGS) == 0x8D7, how


def test_rip_written_between_runs_is_where_the_next_run_starts():
    """RIP and RSP written in place between runs (an exception delivered, an instruction
    retired by the model) are what the API reads and where the next run starts."""
    engine, regs = _engine()
    engine.block_checks = True  # the counted run stops at the exact instruction
    uc = engine.uc
    uc.mem_write(0x1000, bytes.fromhex("48ffc0 48ffc3 f4"))  # inc rax; inc rbx; hlt
    uc.reg_write(x86.UC_X86_REG_RAX, 0)
    uc.reg_write(x86.UC_X86_REG_RBX, 0)
    uc.emu_start(0x1000, 0x1100, count=1)  # inc rax
    regs.set_rip(regs.rip + 3)  # skip inc rbx
    regs.enter(0x8000, 0x202, regs.rip)
    assert uc.reg_read(x86.UC_X86_REG_RIP) == 0x1006
    assert uc.reg_read(x86.UC_X86_REG_RSP) == 0x8000
    assert uc.reg_read(x86.UC_X86_REG_RFLAGS) == 0x202 == regs.rflags_between_runs()
    uc.emu_start(regs.rip, 0x1100)
    assert (uc.reg_read(x86.UC_X86_REG_RAX), uc.reg_read(x86.UC_X86_REG_RBX)) == (1, 0)
    assert regs.rip == 0x1007
