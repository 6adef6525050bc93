"""A native #VC handler in x86-64 assembly: guest code that speaks the GHCB protocol.

This is the guest side of every NAE event, written the way guest firmware writes it
(no Python runs in the guest): the hardware delivers #VC (vector 29) through the IDT
with the SVM exit code as error code and RIP at the faulting instruction; the handler
decodes the instruction, fills the GHCB, writes the GHCB GPA to the GHCB MSR,
executes VMGEXIT, checks the reply, writes the results back into the interrupted
registers, moves RIP past the instruction and returns with IRETQ. It follows Linux's
``vc_handle_exitcode`` and friends (``arch/x86/coco/sev``), with the exceptions noted
below. sevsim's modeled handler (Python, capstone) does the same job from outside the
guest; this one is what a test or the demo runs when it wants guest code doing it,
instruction by instruction, with every step visible in the trace.

Use::

    code, entry = build_vc_handler()            # at VC_HANDLER_ADDRESS (0x40000)
    image = GuestImage(main_code, idt={29: entry}, data={VC_HANDLER_ADDRESS: code},
                       ist_vectors=frozenset({29}))
    # or: GuestImage(main_code, **vc_image_args())

Source
======

The handler is assembly, kept as ``.s`` files in this package (package data) and
assembled with keystone for each address: :data:`SOURCES` in order, the entry point
first: ``entry.s`` (entry, dispatch on the exit code, the two ways out),
``prefixes.s``, ``ghcb.s`` (the GHCB call), ``terminate.s``, ``forward.s``
(exception forwarding), then one file per exit type (``cpuid.s``, ``msr.s``,
``rdpmc.s``, ``rdtscp.s``, ``cache.s``, ``monitor.s``, ``vmmcall.s``, ``dr7.s``,
``ioio.s``, ``mmio.s``) and the helpers they share (``segment.s``, ``modrm.s``,
``page_walk.s``). ``frame.s`` (the stack frame) and ``macros.s`` emit no code. The
files name every number they take from elsewhere; :mod:`.symbols` defines those names
from ``sevsim.arch`` and the build's parameters in a generated ``.equ`` prelude.

Layout (position-dependent: assembled for one address, ``HANDLER_SIZE`` bytes)
==============================================================================

=====================  =========================================================
``address``            code, entry point first (at most ``CODE_LIMIT``, 8 KiB)
``address + 0x2000``   private state page (``STATE_OFFSET``), see ``STATE_*``:
                       +0x00 #VCs taken, +0x08 last exit code, +0x10 last RIP,
                       +0x18 DR7 as the guest last wrote it (reset 0x400),
                       +0x20/+0x28 sw_exit_info_1/2 of a failed VMGEXIT,
                       +0x30 1 while a #VC is being handled (``STATE_IN_VC``)
=====================  =========================================================

The state lives on its own page because a write to a page the CPU model has scanned
for code makes it rescan that page. Everything else lives on the stack the #VC runs
on (IST1 if the gate says so, else the interrupted stack): 0x100 bytes below the
interrupt frame, the 16 GPRs indexed by their x86 register number (slot 4 holds the
interrupted RSP, so ``[rsp + ...]`` operands decode like any other base) and the
decoder's locals. Nothing in the handler itself raises a #VC when the guest is sane
(the GHCB MSR and the FS/GS base MSRs are not intercepted; CR4 and XCR0 reads run
natively), but its reads of the instruction and of string IO buffers do when those
lie in MMIO (a jump into an MMIO region, ``rep outsb`` from one), and an exception the
hypervisor injects right after its VMGEXIT runs the guest's own handler inside it.
Such a nested #VC cannot be handled: on IST1 its frame overwrites the outer #VC's
(the stack is not shifted as Linux shifts it), and on any stack it would reuse the
one GHCB page while the outer #VC still owns it (Linux has a backup GHCB for one
level of nesting and gives up on the next). So the handler keeps an "in #VC" flag
(``STATE_IN_VC``), set on entry and cleared just before it IRETQs or jumps to a
forwarded exception's handler, and a #VC that finds it set terminates the guest
with ``NESTED_VC`` instead of looping or corrupting the outer one. The flag lives
in the one state page: one vCPU, as for the GHCB.

Supported (64-bit code only; prefixes 66, 67, F2/F3, REX, FS/GS, and the ignored
null segment overrides and LOCK)
=================================================================================

- CPUID (0x72): RAX, RCX and XCR0 (XGETBV if CR4.OSXSAVE, else 1) -> EAX..EDX.
- IOIO (0x7b): IN/OUT with imm8 and DX ports, sizes 1/2/4; IN into AL/AX keeps the
  upper bits of RAX and IN into EAX zero-extends, as the hardware does. INS/OUTS with
  and without REP (F3 or F2), address size 64 or 32 (67), DF honoured, FS/GS source
  override for OUTS: at most one shared buffer (2032 bytes) per VMGEXIT, through the
  scratch area at GHCB+0x800 with the element count in exit_info_2; a longer REP
  leaves RIP in place with RCX/RSI/RDI advanced, so the instruction runs again (as
  Linux's ES_RETRY).
- MSR (0x7c): RDMSR (exit_info_1 0, RCX -> EDX:EAX) and WRMSR (1, RCX, RAX, RDX).
- RDPMC (0x6f), RDTSCP (0x87), WBINVD (0x89), INVD (0x76), MONITOR (0x8a),
  MWAIT (0x8b): the GHCB call with the registers KVM requires.
- VMMCALL (0x81): RAX, RBX, RCX, RDX, RSI and the CPL of the interrupted code -> RAX.
- DR7: a write is sent (WRITE_DR7, RAX) and remembered, as Linux does: reserved bits
  cleared and bit 10 set, #GP if the upper half is not zero; a read returns the
  remembered value without an exit (the hypervisor cannot know the real one).
- MMIO (NPF, 0x400) for ``mov r/m, reg`` (88, 89), ``mov reg, r/m`` (8A, 8B),
  ``mov r/m, imm`` (C6, C7: imm8/16/32, sign-extended for REX.W), ``movzx``/``movsx``
  byte/word loads (0F B6/B7/BE/BF) and the ``moffs`` forms (A0-A3): ModRM with SIB,
  disp8/disp32, RIP-relative, any base and index incl. RSP/R12/R13, 32-bit address
  size, FS/GS bases. AH/CH/DH/BH are honoured for byte registers without REX.
  The guest-physical address comes from a walk of the guest's own 4-level page tables
  (1 GiB/2 MiB/4 KiB pages, C-bit and flags masked off), which must be identity
  mapped; exit MMIO_READ 0x80000001 / MMIO_WRITE 0x80000002 with exit_info_1 = GPA,
  exit_info_2 = length and sw_scratch = the GHCB shared buffer.

Replies: sw_exit_info_1[31:0] = 0 is success (and the valid bits of the registers
the handler reads back are checked, as Linux does); 1 with a valid exception event in
sw_exit_info_2 is delivered as the hardware would deliver it from the faulting
instruction: the handler reads the guest's IDT gate, builds the frame (RIP = the
instruction, error code from the event or 0 for vectors that push one) on the
interrupted stack, or on the gate's IST or the TSS RSP0 stack, and jumps to the
guest's handler (which returns to the faulting instruction with IRETQ, or skips it);
anything else is a VMM error.

Unsupported: an exit code it does not handle, an instruction it cannot decode (MMIO
through MOVS, XCHG, arithmetic on memory, a register operand, ...), a VMM error, an
exception it may not forward (NMI, #DF, #MC, #VC, a vector above 31, or an absent
gate), an MMIO address the page walk cannot translate, or a #VC taken inside the
handler (an instruction fetched from MMIO among them). Each ends the guest the way
Linux's ``sev_es_terminate`` does: the GHCB MSR protocol TERM_REQ with reason set
``TERM_REASON_SET`` (2, sevsim's own) and the code from
:class:`~sevsim.arch.ghcb_msr.TermReason`, then a HLT loop in case the hypervisor
resumes it.

Not done: 16/32-bit code (compatibility mode) and real mode, MMIO string moves, an
MMIO access that crosses a page, more than one vCPU sharing the one GHCB, NMI_COMPLETE.
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any

from sevsim.arch.ghcb_msr import TERM_REASON_SET, TermReason, term_req
from sevsim.arch.msr import DR7_RESET_VALUE
from sevsim.arch.vectors import Vector
from sevsim.guest.asm import AssemblyError, assemble
from sevsim.guest.image import GHCB_GPA, IMAGE_END
from sevsim.guest.vc_native.layout import (
    CODE_LIMIT,
    HANDLER_SIZE,
    PROTOCOL_VERSION,
    STATE_DR7,
    STATE_FAILED_INFO1,
    STATE_FAILED_INFO2,
    STATE_IN_VC,
    STATE_LAST_EXIT_CODE,
    STATE_LAST_RIP,
    STATE_OFFSET,
    STATE_VC_COUNT,
    VC_HANDLER_ADDRESS,
    VC_STATE,
)
from sevsim.guest.vc_native.symbols import arch_symbols, build_symbols, prelude

__all__ = [
    "CODE_LIMIT",
    "HANDLER_SIZE",
    "PROTOCOL_VERSION",
    "SOURCES",
    "STATE_DR7",
    "STATE_FAILED_INFO1",
    "STATE_FAILED_INFO2",
    "STATE_IN_VC",
    "STATE_LAST_EXIT_CODE",
    "STATE_LAST_RIP",
    "STATE_OFFSET",
    "STATE_VC_COUNT",
    "VC_HANDLER_ADDRESS",
    "VC_VECTOR",
    "TermReason",
    "build_vc_handler",
    "handler_source",
    "term_request",
    "vc_image_args",
]

VC_VECTOR = Vector.VC

#: The handler's assembly files, in the order they are assembled (the entry point is
#: the first instruction of the first file that emits code).
SOURCES = (
    "frame.s", "macros.s",
    "entry.s", "prefixes.s", "ghcb.s", "terminate.s", "forward.s",
    "cpuid.s", "msr.s", "rdpmc.s", "rdtscp.s", "cache.s", "monitor.s", "vmmcall.s",
    "dr7.s", "ioio.s", "segment.s", "mmio.s", "modrm.s", "page_walk.s",
)  # fmt: skip


def term_request(reason: TermReason) -> int:
    """The GHCB MSR value of the handler's TERM_REQ (what a SEV_TERM exit carries)."""
    return term_req(TERM_REASON_SET, reason)


@functools.cache
def _sources() -> str:
    """The .s files, read once from the package (they do not change while it runs)."""
    folder = resources.files(__package__)
    return "".join(f"\n# ---- {name}\n" + folder.joinpath(name).read_text() for name in SOURCES)


def handler_source(
    address: int = VC_HANDLER_ADDRESS,
    *,
    ghcb: int = GHCB_GPA,
    ghcb_gpa: int | None = None,
    cbit: int = 51,
    protocol_version: int = PROTOCOL_VERSION,
) -> str:
    """The assembly source of the handler for these addresses (keystone syntax): the
    generated prelude, then :data:`SOURCES`."""
    symbols = {
        **arch_symbols(),
        **build_symbols(address, ghcb=ghcb, ghcb_gpa=ghcb if ghcb_gpa is None else ghcb_gpa,
                        cbit=cbit, protocol_version=protocol_version),
    }  # fmt: skip
    return prelude(symbols) + _sources()


@functools.lru_cache(maxsize=16)
def build_vc_handler(
    address: int = VC_HANDLER_ADDRESS,
    *,
    ghcb: int = GHCB_GPA,
    ghcb_gpa: int | None = None,
    cbit: int = 51,
    protocol_version: int = PROTOCOL_VERSION,
) -> tuple[bytes, int]:
    """Assemble the handler for ``address``: (bytes to place there, entry address).

    ``ghcb`` is the GHCB page's linear address (mapped shared), ``ghcb_gpa`` its
    guest-physical address when the two differ, ``cbit`` the C-bit position the page
    walk masks off. The bytes are ``HANDLER_SIZE`` long: code, zero padding, and the
    state page with DR7 at its reset value; all of it is private memory to measure.
    """
    if address & 0xFFF or ghcb & 0xFFF or (ghcb_gpa or 0) & 0xFFF:
        raise ValueError(f"handler {address:#x} and GHCB {ghcb:#x} must be page aligned")
    if not 12 < cbit < 52:
        raise ValueError(f"the C-bit must be a physical-address bit (12..51), got {cbit}")
    source = handler_source(address, ghcb=ghcb, ghcb_gpa=ghcb_gpa, cbit=cbit,
                            protocol_version=protocol_version)  # fmt: skip
    code = assemble(source, address)
    if len(code) > CODE_LIMIT:
        raise AssemblyError(f"the #VC handler is {len(code):#x} bytes, over {CODE_LIMIT:#x}")
    state = VC_STATE.pack({"dr7": DR7_RESET_VALUE})
    return code.ljust(STATE_OFFSET, b"\0") + bytes(state), address


def vc_image_args(
    address: int = VC_HANDLER_ADDRESS,
    *,
    ist: bool = True,
    idt: dict[int, int] | None = None,
    data: dict[int, bytes] | None = None,
    **build_args: Any,
) -> dict[str, Any]:
    """``GuestImage`` keyword arguments that install the handler as vector 29.

    Merges with the caller's own ``idt`` and ``data``; with ``ist`` the #VC gate uses
    IST1, so a #VC taken on a bad stack still has a good one (Linux does the same).
    """
    code, entry = build_vc_handler(address, **build_args)
    if address + len(code) > IMAGE_END:
        raise ValueError(f"the handler at {address:#x} does not fit below {IMAGE_END:#x}")
    args: dict[str, Any] = {
        "idt": {**(idt or {}), VC_VECTOR: entry},
        "data": {**(data or {}), address: code},
    }
    if ist:
        args["ist_vectors"] = frozenset({VC_VECTOR})
    return args
