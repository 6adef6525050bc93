"""Decoding the instruction behind a #VC, for the modeled #VC handler (``sevsim.guest.vc``).

An SEV-ES guest's #VC handler gets only an exit code; everything else — which port,
which register, which guest address, how wide — it must read from the faulting
instruction itself, as Linux does with its instruction decoder (``insn_decode``,
``insn_decode_mmio``, ``insn_get_addr_ref``, ``vc_ioio_exitinfo``). Here capstone does
the byte-level decoding in the CPU's current mode and this module turns its output
into what the handler needs. Everything is pure: registers come in through a
callable, so the rules can be tested without a guest.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum

from attrs import frozen
from capstone import CsInsn
from capstone.x86 import X86_OP_IMM, X86_OP_MEM, X86_OP_REG

from sevsim.arch.disasm import capstone
from sevsim.arch.exits import EXIT_BY_MNEMONIC, SvmExit
from sevsim.arch.ioio import SEGMENT_NUMBERS, IoioInfo

MAX_INSN = 15
U64 = (1 << 64) - 1

_SEGMENT_PREFIXES = {0x26: "es", 0x2E: "cs", 0x36: "ss", 0x3E: "ds", 0x64: "fs", 0x65: "gs"}
_REP_PREFIXES = frozenset({0xF2, 0xF3})


def _gpr_parts() -> dict[str, tuple[str, int, int]]:
    """Register name -> (64-bit register, bit offset, size in bytes), for every GPR part."""
    parts: dict[str, tuple[str, int, int]] = {}
    for letter in "abcd":
        full = f"r{letter}x"
        parts |= {full: (full, 0, 8), f"e{letter}x": (full, 0, 4), f"{letter}x": (full, 0, 2),
                  f"{letter}l": (full, 0, 1), f"{letter}h": (full, 8, 1)}  # fmt: skip
    for name in ("si", "di", "bp", "sp"):
        full = f"r{name}"
        parts |= {full: (full, 0, 8), f"e{name}": (full, 0, 4), name: (full, 0, 2),
                  f"{name}l": (full, 0, 1)}  # fmt: skip
    for n in range(8, 16):
        full = f"r{n}"
        parts |= {full: (full, 0, 8), f"{full}d": (full, 0, 4), f"{full}w": (full, 0, 2),
                  f"{full}b": (full, 0, 1)}  # fmt: skip
    parts |= {"rip": ("rip", 0, 8), "eip": ("rip", 0, 4), "ip": ("rip", 0, 2)}
    return parts


#: Every general-purpose register name capstone prints, and where it lives.
GPR_PARTS = _gpr_parts()


def is_gpr(name: str) -> bool:
    return name in GPR_PARTS and GPR_PARTS[name][0] != "rip"


def read_register(reg: Callable[[str], int], name: str) -> int:
    """The value of ``name`` (``ah``, ``r9w``, ``esi``, ...) given 64-bit register reads."""
    full, shift, size = GPR_PARTS[name]
    return (reg(full) >> shift) & ((1 << (8 * size)) - 1)


def merge_register(old: int, name: str, value: int) -> int:
    """The 64-bit register after writing ``value`` to its part ``name``.

    As the hardware does: 8- and 16-bit writes leave the other bits alone, a 32-bit
    write zero-extends into the upper half, a 64-bit write replaces everything.
    """
    _, shift, size = GPR_PARTS[name]
    if size >= 4:
        return value & ((1 << (8 * size)) - 1)
    mask = ((1 << (8 * size)) - 1) << shift
    return (old & ~mask & U64) | ((value << shift) & mask)


@frozen
class RegOperand:
    name: str
    size: int


@frozen
class ImmOperand:
    value: int
    size: int


@frozen
class MemOperand:
    """``segment:[base + index*scale + disp]``; ``segment`` is None without an override."""

    size: int
    base: str | None = None
    index: str | None = None
    scale: int = 1
    disp: int = 0
    segment: str | None = None


Operand = RegOperand | ImmOperand | MemOperand


@frozen
class Instruction:
    """One decoded instruction: what the #VC handler needs to emulate it."""

    address: int
    length: int
    mnemonic: str  # without prefixes: "insb", not "rep insb"
    op_str: str
    opcode: bytes  # the opcode bytes, prefixes and ModRM excluded
    modrm: int
    operands: tuple[Operand, ...]
    address_size: int  # bytes: 2, 4 or 8
    bits: int
    rep: bool = False
    segment: str | None = None  # segment override prefix

    def describe(self) -> str:
        rep = "rep " if self.rep else ""
        return f"{rep}{self.mnemonic} {self.op_str}".strip()

    @property
    def mem(self) -> MemOperand | None:
        return next((op for op in self.operands if isinstance(op, MemOperand)), None)


def decode(code: bytes, address: int, bits: int) -> Instruction | None:
    """Decode the instruction at the start of ``code`` in ``bits``-bit mode (None: invalid)."""
    insn = next(capstone(bits, detail=True).disasm(code[:MAX_INSN], address, 1), None)
    if insn is None:
        return None
    opcode_len = 1 if insn.opcode[0] != 0x0F else 3 if insn.opcode[1] in (0x38, 0x3A) else 2
    return Instruction(
        address=address, length=insn.size, mnemonic=insn.mnemonic.split()[-1],
        op_str=insn.op_str, opcode=bytes(insn.opcode[:opcode_len]), modrm=insn.modrm,
        operands=tuple(_operand(insn, op) for op in insn.operands),
        address_size=insn.addr_size, bits=bits, rep=insn.prefix[0] in _REP_PREFIXES,
        segment=_SEGMENT_PREFIXES.get(insn.prefix[1]),
    )  # fmt: skip


def _operand(insn: CsInsn, op) -> Operand:  # type: ignore[no-untyped-def]
    if op.type == X86_OP_REG:
        return RegOperand(insn.reg_name(op.reg), op.size)
    if op.type == X86_OP_IMM:
        return ImmOperand(op.imm, op.size)
    assert op.type == X86_OP_MEM
    mem = op.mem
    return MemOperand(
        size=op.size,
        base=insn.reg_name(mem.base) if mem.base else None,
        index=insn.reg_name(mem.index) if mem.index else None,
        scale=mem.scale, disp=mem.disp,
        segment=insn.reg_name(mem.segment) if mem.segment else None,
    )  # fmt: skip


def effective_segment(insn: Instruction, default: str = "ds") -> str:
    """The segment of a data access: the override prefix, else ``default``."""
    return insn.segment or default


def segment_base(insn: Instruction, segment: str, base_of: Callable[[str], int]) -> int:
    """A segment's base as the CPU uses it: in 64-bit mode only FS and GS have one."""
    if insn.bits == 64 and segment not in ("fs", "gs"):
        return 0
    return base_of(segment)


def linear_address(
    insn: Instruction,
    mem: MemOperand,
    reg: Callable[[str], int],
    base_of: Callable[[str], int],
) -> int:
    """``insn_get_addr_ref``: segment base + (base + index*scale + disp) in the address size.

    RIP-relative addresses count from the end of the instruction; the offset wraps
    at the address size (a 0x67 prefix in 64-bit mode gives 32-bit offsets) and the
    linear address at the mode's width.
    """
    offset = mem.disp
    if mem.base in ("rip", "eip"):
        offset += insn.address + insn.length
    elif mem.base is not None:
        offset += read_register(reg, mem.base)
    if mem.index is not None:
        offset += read_register(reg, mem.index) * mem.scale
    offset &= (1 << (8 * insn.address_size)) - 1
    default = "ss" if mem.base in ("rbp", "ebp", "bp", "rsp", "esp", "sp") else "ds"
    base = segment_base(insn, effective_segment(insn, default), base_of)
    width = U64 if insn.bits == 64 else 0xFFFF_FFFF
    return (base + offset) & width


# -- MMIO ----------------------------------------------------------------------------


class MmioType(Enum):
    """Linux's ``enum insn_mmio_type``."""

    WRITE = "write"  # MOV m, r
    WRITE_IMM = "write_imm"  # MOV m, imm
    READ = "read"  # MOV r, m
    READ_ZERO_EXTEND = "read_zero_extend"  # MOVZX r, m
    READ_SIGN_EXTEND = "read_sign_extend"  # MOVSX/MOVSXD r, m
    MOVS = "movs"  # MOVS m, m


@frozen
class MmioInsn:
    """An MMIO access decoded: its kind, its width, the register and memory operands."""

    type: MmioType
    bytes: int
    mem: MemOperand
    reg: RegOperand | None = None
    imm: int | None = None


_READS = {"mov": MmioType.READ, "movabs": MmioType.READ, "movzx": MmioType.READ_ZERO_EXTEND,
          "movsx": MmioType.READ_SIGN_EXTEND, "movsxd": MmioType.READ_SIGN_EXTEND}  # fmt: skip
_MOVS = frozenset({"movsb", "movsw", "movsd", "movsq"})


def decode_mmio(insn: Instruction) -> MmioInsn | None:
    """``insn_decode_mmio``: the MOV forms a #VC handler can emulate against MMIO.

    MOV to and from memory (ModRM and moffs forms), MOV of an immediate to memory,
    MOVZX, MOVSX/MOVSXD, and MOVS. The register must be a general-purpose one;
    anything else (ALU operations on MMIO, MOV of a segment register) is None.
    """
    ops = insn.operands
    if insn.mnemonic in _MOVS and len(ops) == 2 and isinstance(ops[1], MemOperand):
        return MmioInsn(MmioType.MOVS, ops[1].size, ops[1])
    if len(ops) != 2:
        return None
    dst, src = ops
    if insn.mnemonic in ("mov", "movabs") and isinstance(dst, MemOperand):
        if isinstance(src, RegOperand) and is_gpr(src.name):
            return MmioInsn(MmioType.WRITE, dst.size, dst, reg=src)
        if isinstance(src, ImmOperand):
            imm = src.value & ((1 << (8 * dst.size)) - 1)
            return MmioInsn(MmioType.WRITE_IMM, dst.size, dst, imm=imm)
        return None
    kind = _READS.get(insn.mnemonic)
    if kind is not None and isinstance(dst, RegOperand) and isinstance(src, MemOperand):
        if is_gpr(dst.name):
            return MmioInsn(kind, src.size, src, reg=dst)
    return None


def extend(value: int, size: int, to: int, signed: bool) -> int:
    """``value`` of ``size`` bytes, zero- or sign-extended to ``to`` bytes."""
    if signed and value >> (8 * size - 1) & 1:
        value |= ((1 << (8 * to)) - 1) & ~((1 << (8 * size)) - 1)
    return value


# -- IOIO ----------------------------------------------------------------------------

_IO_IN = frozenset({"in", "insb", "insw", "insd"})
_IO_STRING = frozenset({"insb", "insw", "insd", "outsb", "outsw", "outsd"})
_IO = _IO_IN | _IO_STRING | {"out"}


@frozen
class IoInsn:
    """An IN/OUT/INS/OUTS decoded into its exit information."""

    exit_info_1: int
    port: int
    size: int
    is_in: bool
    string: bool
    segment: str  # the segment of a string source or destination (ES for INS)


def ioio_exitinfo(insn: Instruction, rdx: int) -> IoInsn | None:
    """``vc_ioio_exitinfo``: port, type, data and address size, REP, and segment.

    The port is the immediate (``in al, 0x80``) or DX; the data size is the width of
    the AL/AX/EAX operand or of the string element. INS always writes through ES;
    OUTS reads through DS or its override.
    """
    if insn.mnemonic not in _IO:
        return None
    is_in = insn.mnemonic in _IO_IN
    string = insn.mnemonic in _IO_STRING
    imm = next((op.value for op in insn.operands if isinstance(op, ImmOperand)), None)
    port = (imm if imm is not None else rdx) & 0xFFFF
    if string:
        mem = insn.mem
        assert mem is not None
        size = mem.size
    else:
        size = next(op.size for op in insn.operands if isinstance(op, RegOperand)
                    and op.name in ("al", "ax", "eax"))  # fmt: skip
    segment = "es" if is_in else effective_segment(insn)
    info = IoioInfo(port, size, 8 * insn.address_size, rep=string and insn.rep, string=string,
                    is_in=is_in, segment=SEGMENT_NUMBERS[segment] if string else 0)  # fmt: skip
    return IoInsn(info.encode(), port, size, is_in, string, segment)


# -- which exit code an instruction causes (vc_check_opcode_bytes) ----------------------


def exit_code_of(insn: Instruction) -> int | None:
    """The NAE exit code ``insn`` raises, for checking the #VC error code against it.

    Linux's ``vc_check_opcode_bytes``: a #VC whose error code does not match the
    instruction at RIP (an injected or raced #VC) must not be emulated. IOIO and NPF
    are checked by their own decoders.
    """
    if (
        insn.mnemonic == "mov"
        and insn.operands
        and any(isinstance(op, RegOperand) and op.name == "dr7" for op in insn.operands)
    ):
        first = insn.operands[0]
        writes = isinstance(first, RegOperand) and first.name == "dr7"
        return SvmExit.WRITE_DR7 if writes else SvmExit.READ_DR7
    return EXIT_BY_MNEMONIC.get(insn.mnemonic)
