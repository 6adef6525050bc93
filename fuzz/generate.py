"""Cases biased toward the boundaries where KVM's rules change.

Every generator here is written once, against :class:`Draw`: a seeded
``random.Random`` drives it in long campaigns (:class:`RandomDraw`, cheap and
reproducible from the seed), hypothesis drives it in tests (:func:`cases`, which
shrinks a failing case). The bias: valid bits mostly right with single bits dropped,
sizes 0/1/2/4/8 and odd ones, scratch areas on and just across the shared buffer's
edges, lengths at and past the limits, codes known and unknown, reserved bits set.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol, TypeVar

from fuzz.cases import FREE_RAM, Case, CodeCase, PageSpec, Step
from fuzz.oracle import INT_MAX, U64
from sevsim.arch.exits import SVM_EXIT_SW, SvmExit, VmgExit
from sevsim.arch.ghcb import valid_bit
from sevsim.arch.ghcb_msr import GhcbMsr
from sevsim.arch.ioio import IOIO_REP, IOIO_STR, IOIO_TYPE_IN, IoioInfo
from sevsim.arch.msr import MSR_AMD64_SEV_ES_GHCB
from sevsim.guest.image import CODE, GHCB_GPA, IMAGE_END
from sevsim.vmm.machine import MMIO_TEST_GPA

if TYPE_CHECKING:
    from hypothesis.strategies import DrawFn, SearchStrategy

T = TypeVar("T")

#: The last page of the driver's RAM (``ExitDriver`` maps 2 MiB).
LAST_PAGE = IMAGE_END - 0x1000
NOT_RAM = 0x4000_0000
GHCB_GPAS = (0, LAST_PAGE, NOT_RAM, MMIO_TEST_GPA, 1 << 51, U64 & ~0xFFF)
#: Values at which 64-bit fields change meaning somewhere.
EDGES = (0, 1, 2, 3, 4, 7, 8, 0xD, 0xFF, 0x7FF, 0x800, 0xFF0, 0xFFF, 0x1000, 0xFFFF, 0x1_0000,
         0x1_0001, INT_MAX, INT_MAX + 1, 0xFFFF_FFFF, 1 << 32, 1 << 63, U64 - 1, U64)  # fmt: skip
#: Codes REFERENCE.md section 1.2 lists (handled in some era, or refused on purpose),
#: then the other automatic exit codes, and neighbours of known codes that mean nothing.
NAE_CODES = (SvmExit.READ_DR7, SvmExit.WRITE_DR7, SvmExit.RDTSC, SvmExit.RDPMC, SvmExit.CPUID,
             SvmExit.INVD, SvmExit.IOIO, SvmExit.MSR, SvmExit.VMMCALL, SvmExit.RDTSCP,
             SvmExit.WBINVD, SvmExit.MONITOR, SvmExit.MWAIT, *VmgExit)  # fmt: skip
UNKNOWN_CODES = (0, SVM_EXIT_SW, SVM_EXIT_SW + 1, 0x8000_0000, 0x8000_0006, 0x8000_FFFC,
                 1 << 32 | SvmExit.CPUID, 1 << 63 | VmgExit.MMIO_READ, U64)  # fmt: skip
#: Requests (even codes), and a reply sent as a request (the MSR's value at reset).
MSR_REQUESTS = (*(code for code in GhcbMsr if code & 1 == 0), GhcbMsr.SEV_INFO_RESP)
CPUID_FUNCTIONS = (0, 1, 7, 0xB, 0xD, 0x8000_0000, 0x8000_0001, 0x8000_0008, 0x8000_001F,
                   0x4000_0000, 0x8000_0021, 0xFFFF_FFFF)  # fmt: skip
PORTS = (0x80, 0x402, 0x3F8, 0x3FD, 0x3FF, 0x400, 0xCF8, 0xFFFF)
MSRS = (MSR_AMD64_SEV_ES_GHCB, 0xC001_0131, 0x1B, 0x10, 0xC000_0080, 0x277, 0xDA0, 0x8B,
        0x80B, 0xC000_0100, 0x4000_0000)  # fmt: skip
#: Fields the generator fills; those a code needs are usually marked valid too.
REGISTERS = ("rax", "rbx", "rcx", "rdx", "rsi", "cpl", "xcr0", "sw_scratch")
_SW_FIELDS = ("sw_exit_code", "sw_exit_info_1", "sw_exit_info_2")


class Draw(Protocol):
    """Where a generator's choices come from."""

    def integer(self, low: int, high: int) -> int: ...

    def choice(self, options: Sequence[T]) -> T: ...

    def chance(self, percent: int) -> bool: ...

    def raw(self, size: int) -> bytes: ...


class RandomDraw:
    """Choices from a seeded ``random.Random``: a campaign is reproducible from its seed."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def integer(self, low: int, high: int) -> int:
        return self.rng.randint(low, high)

    def choice(self, options: Sequence[T]) -> T:
        return options[self.rng.randrange(len(options))]

    def chance(self, percent: int) -> bool:
        return self.rng.randrange(100) < percent

    def raw(self, size: int) -> bytes:
        return self.rng.randbytes(size)


class HypothesisDraw:
    """Choices from hypothesis, which can then shrink a failing case."""

    def __init__(self, draw: DrawFn) -> None:
        from hypothesis import strategies  # a test dependency: campaigns run without it

        self._draw = draw
        self._st = strategies

    def integer(self, low: int, high: int) -> int:
        return self._draw(self._st.integers(low, high))

    def choice(self, options: Sequence[T]) -> T:
        return self._draw(self._st.sampled_from(options))

    def chance(self, percent: int) -> bool:
        return self._draw(self._st.integers(0, 99)) < percent

    def raw(self, size: int) -> bytes:
        return self._draw(self._st.binary(min_size=size, max_size=size))


# -- values ----------------------------------------------------------------------------------


def u64(d: Draw) -> int:
    """A 64-bit value: an edge, a small number, or anything."""
    pick = d.integer(0, 9)
    if pick < 5:
        return d.choice(EDGES)
    if pick < 8:
        return d.integer(0, 0x1_0000)
    return d.integer(0, U64)


def sometimes(d: Draw, value: int, percent: int = 15) -> int:
    """``value``, or now and then any 64-bit value instead."""
    return u64(d) if d.chance(percent) else value


def length(d: Draw) -> int:
    """A byte count around the limits: element sizes, odd ones, the shared buffer's
    2032 bytes, the 64 KiB outside it, past them."""
    if d.chance(15):
        return u64(d)
    return d.choice((0, 1, 2, 3, 4, 5, 7, 8, 9, 16, 0x7EF, 0x7F0, 0x7F1, 0xFFF, 0x1000,
                     0xFFFF, 0x1_0000, 0x1_0001, INT_MAX, U64))  # fmt: skip


def scratch_gpa(d: Draw, ghcb: int, size: int) -> int:
    """A scratch address on, just inside or just past each edge the rules draw."""
    low, high = ghcb + 0x800, ghcb + 0xFF0
    return d.choice((
        low, low - 1, low - 8, low + d.integer(0, 0x7F0), high - size, high - size + 1, high,
        ghcb, ghcb + 0xFFF, ghcb - 8, FREE_RAM, FREE_RAM + 0xFFF, IMAGE_END - size,
        IMAGE_END - size + 1, NOT_RAM, MMIO_TEST_GPA, 0, U64 - size + 1, u64(d),
    )) & U64  # fmt: skip


# -- GHCB pages ----------------------------------------------------------------------------


def info_for(d: Draw, code: int) -> tuple[int, int, dict[str, int]]:
    """sw_exit_info_1, sw_exit_info_2 and register values a guest would send for
    ``code``, each now and then replaced by anything."""
    regs: dict[str, int] = {}
    info1, info2 = u64(d), u64(d)
    if code == SvmExit.IOIO:
        size = d.choice((1, 2, 4, 1, 2, 4, 0, 3, 5, 6, 7))
        info1 = (d.choice(PORTS) << 16 | size << 4 | d.choice((1, 2, 4, 0)) << 7
                 | (IOIO_STR if d.chance(40) else 0) | (IOIO_REP if d.chance(30) else 0)
                 | (IOIO_TYPE_IN if d.chance(50) else 0))  # fmt: skip
        info2 = length(d)
    elif code in (VmgExit.MMIO_READ, VmgExit.MMIO_WRITE):
        info1 = d.choice((MMIO_TEST_GPA, MMIO_TEST_GPA + d.integer(0, 0xFFF), FREE_RAM, NOT_RAM,
                          0, u64(d)))  # fmt: skip
        info2 = length(d)
    elif code == SvmExit.MSR:
        info1 = d.choice((0, 1, u64(d)))
        regs["rcx"] = d.choice(MSRS) if d.chance(80) else d.integer(0, 0xFFFF_FFFF)
    elif code == SvmExit.CPUID:
        regs["rax"] = d.choice(CPUID_FUNCTIONS) if d.chance(80) else u64(d)
        regs["rcx"] = d.choice((0, 0, 1, 2)) if d.chance(80) else u64(d)
        regs["xcr0"] = d.choice((1, 3, 7, 0, U64))
    elif code == VmgExit.AP_JUMP_TABLE:
        info1 = d.choice((0, 1, 0, 1, 2, u64(d)))
    elif code == SvmExit.VMMCALL:
        regs["rax"] = d.choice((1, 5, 11, 12, u64(d)))
        regs["cpl"] = d.choice((0, 0, 3, 0xFF))
    return sometimes(d, info1, 5), sometimes(d, info2, 5), regs


def scratch_length(code: int, info1: int, info2: int) -> int:
    """The scratch length a request implies, for placing its area on the edges."""
    if code == SvmExit.IOIO:
        return info2 * IoioInfo.decode(info1).size
    return info2 if info2 <= 0x1_0000 else 8


def ghcb_page(d: Draw, code: int, ghcb: int) -> PageSpec:
    """A page for ``code``: mostly well-formed, with single faults."""
    info1, info2, regs = info_for(d, code)
    fields = {"sw_exit_code": code, "sw_exit_info_1": info1, "sw_exit_info_2": info2}
    for name in REGISTERS:
        fields[name] = regs.get(name, u64(d) if d.chance(50) else 0)
    fields["cpl"] &= 0xFF
    fields["sw_scratch"] = scratch_gpa(d, ghcb, scratch_length(code, info1, info2))
    bitmap = 0
    for name in _SW_FIELDS:
        bitmap |= 0 if d.chance(4) else 1 << valid_bit(name)
    for name in REGISTERS:
        bitmap |= 1 << valid_bit(name) if d.chance(85) else 0
    if d.chance(10):
        bitmap |= d.integer(0, (1 << 128) - 1)  # reserved and unrelated bits too
    usage = 0 if d.chance(90) else d.choice((1, 2, 0xFFFF_FFFF, d.integer(0, 0xFFFF_FFFF)))
    version = d.choice((0, 1, 2, 0xFFFF)) if d.chance(20) else 0
    buffer = d.raw(d.integer(0, 64)) if d.chance(20) else b""
    return PageSpec(fields, bitmap, usage, version, buffer)


def exit_code(d: Draw) -> int:
    pick = d.integer(0, 19)
    if pick < 15:
        return int(d.choice(NAE_CODES))
    if pick < 17:
        return int(d.choice(tuple(SvmExit)))
    if pick < 19:
        return d.choice(UNKNOWN_CODES)
    return u64(d)


# -- MSR-protocol values ---------------------------------------------------------------------


def msr_request(d: Draw) -> int:
    """A GHCB MSR value with GHCBInfo non-zero: known requests with their fields, reply
    codes sent as requests, unknown codes, reserved data bits."""
    code = d.choice(MSR_REQUESTS) if d.chance(80) else d.integer(1, 0xFFF)
    if code == GhcbMsr.CPUID_REQ:
        function = d.choice(CPUID_FUNCTIONS) if d.chance(80) else d.integer(0, 0xFFFF_FFFF)
        middle = 0 if d.chance(80) else d.integer(0, (1 << 18) - 1)  # bits 29:12
        return function << 32 | d.integer(0, 3) << 30 | middle << 12 | code
    if code == GhcbMsr.TERM_REQ and d.chance(70):
        return d.integer(0, 0xFF) << 16 | d.integer(0, 0xF) << 12 | code
    data = d.choice((0, 0, 1, (1 << 52) - 1, d.integer(0, (1 << 52) - 1)))
    return data << 12 | code


def step(d: Draw) -> Step:
    if d.chance(35):
        return Step(msr_request(d), ghcb_page(d, exit_code(d), GHCB_GPA) if d.chance(30)
                    else PageSpec())  # fmt: skip
    gpa = GHCB_GPA if d.chance(85) else d.choice(GHCB_GPAS)
    return Step(gpa, ghcb_page(d, exit_code(d), gpa))


def case(d: Draw, era: str) -> Case:
    """One to three exits on one vCPU."""
    count = d.choice((1, 1, 1, 1, 1, 1, 1, 2, 2, 3))
    return Case(era, tuple(step(d) for _ in range(count)))


# -- random guest code -----------------------------------------------------------------------

#: Instructions a guest may try on the hypervisor, as bytes (no assembler needed).
SENSITIVE = (
    b"\x0f\xa2", b"\xec", b"\xee", b"\xe5\x80", b"\xe7\x80", b"\x0f\x32", b"\x0f\x30",
    b"\xf3\x0f\x01\xd9", b"\x0f\x01\xd9", b"\x0f\x01\xd8", b"\x0f\x01\xda", b"\x0f\x01\xdb",
    b"\x0f\x01\xdc", b"\x0f\x01\xdd", b"\x0f\x01\xde", b"\x0f\x01\xdf", b"\x0f\x01\xf9",
    b"\x0f\x01\xc8", b"\x0f\x01\xc9", b"\x0f\x01\xfd", b"\x0f\x01\xd1", b"\x0f\x08", b"\x0f\x09",
    b"\x0f\x31", b"\x0f\x33", b"\xf4", b"\xcc", b"\x0f\x0b", b"\x48\xcf", b"\x0f\x05",
    b"\x0f\x22\xc0", b"\x0f\x22\xe0", b"\x0f\x22\xd8", b"\x44\x0f\x22\xc0", b"\x44\x0f\x20\xc0",
    b"\x0f\x23\xf8", b"\x0f\x21\xf8", b"\x0f\x01\x10", b"\x0f\x01\x18", b"\x0f\x00\xd8",
    b"\xf3\x6c", b"\xf3\x6e", b"\xf3\x6d", b"\xf3\xa4", b"\x48\x89\x18", b"\x48\x8b\x18",
    b"\x0f\xae\x20", b"\xfa", b"\xfb", b"\xff\xd0", b"\xff\xe0", b"\xcd\x1d", b"\xcd\x0d",
    b"\x9c", b"\x9d", b"\x0f\x01\xf8", b"\x0f\xc7\xf0",
)  # fmt: skip
#: Register values that aim instructions at interesting places.
TARGETS = (GHCB_GPA, GHCB_GPA + 0x800, MMIO_TEST_GPA, NOT_RAM, CODE, 0x1000, 0x6000,
           MSR_AMD64_SEV_ES_GHCB, GhcbMsr.TERM_REQ, GhcbMsr.AP_RESET_HOLD_REQ,
           GhcbMsr.CPUID_REQ, 0x402, 0x3F8, 0)  # fmt: skip


def movabs(register: int, value: int) -> bytes:
    """``mov r64, imm64`` (REX.W B8+r)."""
    return bytes([0x48 | register >> 3, 0xB8 | register & 7]) + value.to_bytes(8, "little")


def guest_code(d: Draw) -> bytes:
    """Registers aimed at interesting places, then random bytes interleaved with
    sensitive instructions."""
    code = b"".join(movabs(r, d.choice(TARGETS) if d.chance(70) else u64(d)) for r in range(16)
                    if r != 4 and d.chance(60))  # fmt: skip
    for _ in range(d.integer(1, 24)):
        code += d.choice(SENSITIVE) if d.chance(50) else d.raw(d.integer(1, 12))
    return code


def code_case(d: Draw, era: str) -> CodeCase:
    return CodeCase(era, guest_code(d), d.chance(70))


def cases(era: str) -> SearchStrategy[Case]:
    """The hypothesis strategy of :func:`case`."""
    return _strategy(case, era)


def code_cases(era: str) -> SearchStrategy[CodeCase]:
    """The hypothesis strategy of :func:`code_case`."""
    return _strategy(code_case, era)


def _strategy(make: Callable[[Draw, str], T], era: str) -> SearchStrategy[T]:
    from hypothesis import strategies

    return strategies.composite(lambda draw: make(HypothesisDraw(draw), era))()
