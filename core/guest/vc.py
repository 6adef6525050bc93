"""The modeled #VC handler: an SEV-ES guest's exception handler, written in Python.

It does what Linux's guest handler does (``arch/x86/coco/sev/``: ``vc_handle_exitcode``
and the ``vc_handle_*`` functions): decode the instruction at RIP in the CPU's
current mode, fill the GHCB with the exit code, the exit information and the
registers the hypervisor needs (each with its valid bit, in a fresh bitmap), write
the GHCB's guest-physical address to the GHCB MSR, VMGEXIT, check the reply
(``verify_exception_info``), write the results back as the instruction would have,
and move RIP past it.

It is guest software: it sees the guest's registers and plaintext memory through a
:class:`~sevsim.hw.vc_model.GuestView`, and reaches the hypervisor only through guest memory
(the GHCB page, mapped shared), the GHCB MSR, and VMGEXIT — which it performs by
``yield``-ing. Load one instance per vCPU (it keeps that vCPU's DR7, as Linux's
per-CPU runtime data does)::

    launch_image(Kvm(), image, handlers=..., vc_model=VcHandler())

What the hypervisor may answer and what the handler then does:

- ``sw_exit_info_1[31:0]`` 0: success; results are read from the GHCB.
- 1 with a valid #GP or #UD exception event in ``sw_exit_info_2``: that exception is
  raised in the guest, at the instruction (RIP unchanged).
- anything else, a missing result register, or an instruction the handler cannot
  emulate: the guest gives up as Linux does — it asks for termination through the
  GHCB MSR protocol (``GHCB_MSR_TERM_REQ``, reason set 0, code 0: a general request)
  and VMGEXITs. If the hypervisor resumes it anyway, Linux panics ("Returned from
  Terminate-Request to Hypervisor"); here :class:`GuestPanic` ends the handler and the
  hardware reports the lost vCPU as a SHUTDOWN exit naming the reason. ``log`` keeps
  the handler's messages, as the kernel log would.

Where this handler departs from Linux, on purpose:

- results are written with the architectural width (RDMSR/CPUID/RDPMC zero-extend
  EAX/EDX into RAX/RDX; ``in al, dx`` keeps RAX's upper bits; a read into AH writes
  AH), where Linux copies whole 64-bit values;
- INVD, MONITOR and MWAIT are sent to the hypervisor (as OVMF does), where Linux
  refuses INVD and treats MONITOR/MWAIT as no-ops so as not to leak an address;
- a REP string operation that needs more than one exchange, or a MOVS with more
  elements to go, leaves RIP in place (``ES_RETRY``) so the CPU re-executes it, which
  raises the next #VC; only REP forms retry (Linux retries whenever RCX is non-zero);
- CPL 3 failures terminate the VM (Linux sends SIGBUS to the process instead), and a
  fault on guest memory forwards #PF without an error code or CR2 (a
  :data:`~sevsim.hw.vc_model.VcModel` returns only a vector);
- when the handler's own read of the instruction, or of a string IO buffer, reaches
  an address the guest maps but that has no RAM behind it (MMIO: a jump into an MMIO
  region, ``rep outsb`` from one), guest code would take a #VC inside its #VC
  handler. The native handler (``sevsim.guest.vc_native``) cannot handle that and
  terminates with its own reason set and code ``NESTED_VC``; this handler ends the
  same guest the same way (:class:`NestedVc`), so that both handlers agree. Linux
  would take that nested #VC on its backup GHCB and emulate the read.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from enum import Enum
from typing import ClassVar

from attrs import define, field

from sevsim.arch.exits import GhcbResp, SvmExit, VmgExit
from sevsim.arch.ghcb import (
    GHCB_PAGE_SIZE,
    GHCB_USAGE_DEFAULT,
    SHARED_BUFFER_END,
    SHARED_BUFFER_START,
    Ghcb,
)
from sevsim.arch.ghcb_msr import TERM_REASON_SET, TermReason, term_req
from sevsim.arch.msr import DR7_RESET_VALUE, X86_EFLAGS_DF
from sevsim.arch.vectors import Vector
from sevsim.arch.vmcb import EventInj
from sevsim.guest.decode import (
    GPR_PARTS,
    MAX_INSN,
    Instruction,
    IoInsn,
    MmioInsn,
    MmioType,
    RegOperand,
    decode,
    decode_mmio,
    effective_segment,
    exit_code_of,
    extend,
    ioio_exitinfo,
    is_gpr,
    linear_address,
    merge_register,
    read_register,
    segment_base,
)
from sevsim.guest.image import GHCB_GPA
from sevsim.hw.vc_model import GuestFault, GuestView

#: The newest GHCB protocol version Linux speaks (``GHCB_PROTOCOL_MAX``).
GHCB_PROTOCOL_MAX = 2
#: Termination reason: set 0 (general), code 0 (general request).
SEV_TERM_SET_GEN = 0
GHCB_SEV_ES_GEN_REQ = 0
GP_VECTOR, UD_VECTOR, PF_VECTOR = Vector.GP, Vector.UD, Vector.PF
SHARED_BUFFER_SIZE = SHARED_BUFFER_END - SHARED_BUFFER_START
_EVTINJ_TYPE_MASK = 7 << EventInj.TYPE_SHIFT

VcGenerator = Generator[None, None, int | None]
Exchange = Generator[None, None, None]


class EsResult(Enum):
    """How an emulation ended when it did not fail (``ES_OK``, ``ES_RETRY``)."""

    OK = "ok"  # move RIP past the instruction
    RETRY = "retry"  # leave RIP: the CPU re-executes the instruction


class VcFailure(Exception):
    """The handler cannot go on (``ES_UNSUPPORTED``, ``ES_VMM_ERROR``, ``ES_DECODE_FAILED``).

    ``template`` is the kernel's log line for that result; ``reason`` the (set, code)
    of the termination request it ends in.
    """

    template: ClassVar[str]
    reason: ClassVar[tuple[int, int]] = (SEV_TERM_SET_GEN, GHCB_SEV_ES_GEN_REQ)

    def line(self, exit_code: int, rip: int) -> str:
        return f"{self.template.format(code=exit_code, ip=rip)}: {self}"


class Unsupported(VcFailure):
    template = "Unsupported exit-code {code:#04x} in #VC exception (IP: {ip:#x})"


class VmmError(VcFailure):
    template = "Failure in communication with VMM (exit-code {code:#04x} IP: {ip:#x})"


class DecodeFailed(VcFailure):
    template = "Failed to decode instruction (exit-code {code:#04x} IP: {ip:#x})"


class NestedVc(VcFailure):
    """The handler's own access would raise a #VC (it reaches MMIO): the native
    handler's ``NESTED_VC``, with its reason set, so that both end the guest alike."""

    template = "#VC inside the #VC handler (exit-code {code:#04x} IP: {ip:#x})"
    reason = (TERM_REASON_SET, int(TermReason.NESTED_VC))


class ForwardException(Exception):
    """``ES_EXCEPTION``: raise ``vector`` in the guest instead of completing the instruction."""

    def __init__(self, vector: int) -> None:
        super().__init__(f"exception {vector}")
        self.vector = vector


class GuestPanic(Exception):
    """The hypervisor resumed a guest that asked to be terminated: Linux panics."""


@define(eq=False)
class EmCtxt:
    """One #VC being handled (Linux's ``struct es_em_ctxt``): the view, the exit, the insn."""

    view: GuestView
    exit_code: int
    insn: Instruction

    def reg(self, name: str) -> int:
        """A register or register part by its assembler name (``eax``, ``r9w``, ``ah``)."""
        return read_register(self.view.reg, name)

    def set_reg(self, name: str, value: int) -> None:
        """Write a register part with the hardware's rules (32-bit writes zero-extend)."""
        full = GPR_PARTS[name][0]
        self.view.set_reg(full, merge_register(self.view.reg(full), name, value))

    def address(self, offset_reg: str, segment: str) -> int:
        """Linear address of a string operand: ``segment:[rSI]`` or ``es:[rDI]``."""
        mask = (1 << (8 * self.insn.address_size)) - 1
        base = segment_base(self.insn, segment, self.view.segment_base)
        width = (1 << 64) - 1 if self.insn.bits == 64 else 0xFFFF_FFFF
        return (base + (self.view.reg(offset_reg) & mask)) & width

    def advance(self, name: str, delta: int) -> None:
        """Add ``delta`` to rSI/rDI/rCX in the instruction's address size, wrapping there."""
        mask = (1 << (8 * self.insn.address_size)) - 1
        old = self.view.reg(name)
        self.view.set_reg(name, (old & ~mask) | ((old + delta) & mask))

    def counter(self) -> int:
        """rCX in the address size: the REP count."""
        return self.view.reg("rcx") & ((1 << (8 * self.insn.address_size)) - 1)

    @property
    def direction(self) -> int:
        """+1, or -1 when RFLAGS.DF makes string operations go down."""
        return -1 if self.view.reg("rflags") & X86_EFLAGS_DF else 1


@define(eq=False)
class VcHandler:
    """The modeled #VC handler of one vCPU: call it as a :data:`~sevsim.hw.vc_model.VcModel`.

    ``ghcb_vaddr`` is where the guest maps its GHCB (shared, C=0); ``protocol_version``
    the GHCB version it negotiated at boot (KVM ignores the field); ``xcr0`` the XCR0
    it reports with CPUID (the reset value 1 unless the guest enabled XSAVE, since
    the view offers no XGETBV).
    """

    ghcb_vaddr: int = GHCB_GPA
    protocol_version: int = GHCB_PROTOCOL_MAX
    xcr0: int = 1
    #: DR7 as the guest last wrote it (``runtime_data->dr7``): reads are answered from here.
    dr7: int = DR7_RESET_VALUE
    #: The handler's messages, in the kernel's words ("Unsupported exit-code ...").
    log: list[str] = field(factory=list)
    #: The GHCB page as the handler last wrote or read it (Linux's ``struct ghcb``).
    _page: Ghcb | None = field(init=False, default=None, repr=False)
    _gpa: int | None = field(init=False, default=None, repr=False)

    def __call__(self, view: GuestView, error_code: int) -> VcGenerator:
        """``vc_raw_handle_exception``: emulate, forward an exception, or terminate."""
        rip = view.reg("rip")
        try:
            ctxt = self.init_em_ctxt(view, error_code)
            result = yield from self.handle_exitcode(ctxt)
        except ForwardException as exc:
            return exc.vector
        except VcFailure as exc:
            yield from self.terminate(view, exc.line(error_code, rip), exc.reason)
            return None  # not reached: terminate() does not come back
        except GuestFault as exc:
            yield from self.terminate(view, f"#VC handler fault at IP {rip:#x}: {exc}")
            return None
        if result is EsResult.OK:
            self.finish_insn(ctxt)
        return None

    # -- the frame: decode, exchange, verify, finish -----------------------------------

    def init_em_ctxt(self, view: GuestView, exit_code: int) -> EmCtxt:
        """``vc_init_em_ctxt``: decode the instruction at CS:RIP in the current mode."""
        rip = view.reg("rip")
        linear = view.segment_base("cs") + rip
        try:
            code = view.read(linear, MAX_INSN)
        except GuestFault:  # the instruction ends before an unmapped page
            try:
                code = view.read(linear, 0x1000 - (linear & 0xFFF))
            except GuestFault:
                if reaches_mmio(view, linear):  # a fetch from MMIO: #VC(NPF) at RIP
                    raise NestedVc(f"the instruction at {linear:#x} is in MMIO") from None
                raise
        insn = decode(code, rip, view.bits)
        if insn is None:
            after = linear + len(code)
            if len(code) < MAX_INSN and reaches_mmio(view, after):  # runs into MMIO
                raise NestedVc(f"the instruction at {linear:#x} runs into MMIO at {after:#x}")
            raise DecodeFailed(f"cannot decode {code.hex()} in {view.bits}-bit mode")
        return EmCtxt(view, exit_code, insn)

    def finish_insn(self, ctxt: EmCtxt) -> None:
        """``vc_finish_insn``: RIP past the instruction, wrapping at the code size."""
        mask = (1 << ctxt.insn.bits) - 1
        ctxt.view.set_reg("rip", (ctxt.insn.address + ctxt.insn.length) & mask)

    def ghcb(self, view: GuestView) -> Ghcb:
        """The GHCB, invalidated for a new request (``vc_ghcb_invalidate``).

        The handler owns the page: it is read from guest memory once, then each
        request is written out whole and each reply read back whole.
        """
        if self._page is None:
            self._page = Ghcb(view.read(self.ghcb_vaddr, GHCB_PAGE_SIZE))
        self._page["sw_exit_code"] = 0
        self._page.valid_bitmap = 0
        return self._page

    def ghcb_gpa(self, view: GuestView) -> int:
        """``__pa(ghcb)``: the GHCB's guest-physical address.

        Linux computes it from the direct map without a walk; the model walks the
        guest's tables once and keeps the answer, as the mapping never changes.
        """
        if self._gpa is None:
            self._gpa = view.translate(self.ghcb_vaddr)[0]
        return self._gpa

    def hv_call(
        self, view: GuestView, ghcb: Ghcb, exit_code: int, info1: int, info2: int
    ) -> Exchange:
        """``sev_es_ghcb_hv_call``: fill in the exit, publish the GHCB, VMGEXIT, verify.

        The reply is read back into ``ghcb``.
        """
        ghcb["protocol_version"] = self.protocol_version
        ghcb["ghcb_usage"] = GHCB_USAGE_DEFAULT
        ghcb["sw_exit_code"] = exit_code
        ghcb["sw_exit_info_1"] = info1
        ghcb["sw_exit_info_2"] = info2
        view.write(self.ghcb_vaddr, bytes(ghcb.raw))
        view.ghcb_msr = self.ghcb_gpa(view)
        yield  # VMGEXIT
        ghcb.raw[:] = view.read(self.ghcb_vaddr, GHCB_PAGE_SIZE)
        verify_exception_info(ghcb)

    def terminate(
        self,
        view: GuestView,
        why: str,
        reason: tuple[int, int] = VcFailure.reason,
    ) -> Exchange:
        """``sev_es_terminate``: ask for termination; a hypervisor that resumes us gets a panic."""
        self.log.append(why)
        view.ghcb_msr = term_req(*reason)
        yield  # VMGEXIT
        raise GuestPanic(f"Returned from Terminate-Request to Hypervisor after: {why}")

    # -- dispatch -----------------------------------------------------------------------

    def handle_exitcode(self, ctxt: EmCtxt) -> Generator[None, None, EsResult]:
        """``vc_handle_exitcode`` after ``vc_check_opcode_bytes``."""
        code = ctxt.exit_code
        handler = _HANDLERS.get(code)
        if handler is None:
            raise Unsupported(f"no emulation for exit code {code:#x}")
        if code not in (SvmExit.IOIO, SvmExit.NPF) and exit_code_of(ctxt.insn) != code:
            raise Unsupported(f"wrong/unhandled opcode bytes for this exit: {ctxt.insn.describe()}")
        result = yield from handler(self, ctxt)
        return result

    # -- the NAE events -------------------------------------------------------------------

    def handle_cpuid(self, ctxt: EmCtxt) -> Generator[None, None, EsResult]:
        """``vc_handle_cpuid``: function RAX, index RCX, and XCR0 (KVM sizes leaf 0xD by it)."""
        view = ctxt.view
        ghcb = self.ghcb(view)
        ghcb["rax"] = view.reg("rax")
        ghcb["rcx"] = view.reg("rcx")
        ghcb["xcr0"] = self.xcr0
        yield from self.hv_call(view, ghcb, SvmExit.CPUID, 0, 0)
        regs = ("rax", "rbx", "rcx", "rdx")
        _require(ghcb, *regs)
        for name in regs:
            view.set_reg(name, ghcb[name] & 0xFFFF_FFFF)
        return EsResult.OK

    def handle_msr(self, ctxt: EmCtxt) -> Generator[None, None, EsResult]:
        """``vc_handle_msr``: ECX, and EDX:EAX for WRMSR (exit_info_1 = 1)."""
        view = ctxt.view
        write = ctxt.insn.mnemonic == "wrmsr"
        ghcb = self.ghcb(view)
        ghcb["rcx"] = view.reg("rcx")
        if write:
            ghcb["rax"] = view.reg("rax")
            ghcb["rdx"] = view.reg("rdx")
        yield from self.hv_call(view, ghcb, SvmExit.MSR, int(write), 0)
        if not write:
            _take_edx_eax(view, ghcb)
        return EsResult.OK

    def handle_rdpmc(self, ctxt: EmCtxt) -> Generator[None, None, EsResult]:
        """``vc_handle_rdpmc``: counter in ECX, value back in EDX:EAX."""
        view = ctxt.view
        ghcb = self.ghcb(view)
        ghcb["rcx"] = view.reg("rcx")
        yield from self.hv_call(view, ghcb, SvmExit.RDPMC, 0, 0)
        _take_edx_eax(view, ghcb)
        return EsResult.OK

    def handle_rdtsc(self, ctxt: EmCtxt) -> Generator[None, None, EsResult]:
        """``vc_handle_rdtsc``: RDTSC and RDTSCP; KVM answers RDTSCP with #UD."""
        view = ctxt.view
        rdtscp = ctxt.exit_code == SvmExit.RDTSCP
        ghcb = self.ghcb(view)
        yield from self.hv_call(view, ghcb, ctxt.exit_code, 0, 0)
        if rdtscp:
            _require(ghcb, "rcx")
        _take_edx_eax(view, ghcb)
        if rdtscp:
            view.set_reg("rcx", ghcb["rcx"] & 0xFFFF_FFFF)
        return EsResult.OK

    def handle_vmmcall(self, ctxt: EmCtxt) -> Generator[None, None, EsResult]:
        """``vc_handle_vmmcall`` with the KVM guest's ``sev_es_hcall_prepare``.

        The hypercall number (RAX) and its arguments (RBX, RCX, RDX, RSI), and the CPL
        so that KVM can refuse hypercalls from user mode; the result comes back in RAX.
        """
        view = ctxt.view
        ghcb = self.ghcb(view)
        for name in ("rax", "rbx", "rcx", "rdx", "rsi"):
            ghcb[name] = view.reg(name)
        ghcb["cpl"] = 3 if view.cpl else 0
        yield from self.hv_call(view, ghcb, SvmExit.VMMCALL, 0, 0)
        _require(ghcb, "rax")
        view.set_reg("rax", ghcb["rax"])
        return EsResult.OK

    def handle_dr7_write(self, ctxt: EmCtxt) -> Generator[None, None, EsResult]:
        """``vc_handle_dr7_write``: upper half must be zero, reserved bits cleared, bit 10 set."""
        view = ctxt.view
        value = ctxt.reg(_gpr_operand(ctxt.insn))
        if value >> 32:
            raise ForwardException(GP_VECTOR)
        value = (value & 0xFFFF_23FF) | DR7_RESET_VALUE
        ghcb = self.ghcb(view)
        ghcb["rax"] = value
        yield from self.hv_call(view, ghcb, SvmExit.WRITE_DR7, 0, 0)
        self.dr7 = value
        return EsResult.OK

    def handle_dr7_read(self, ctxt: EmCtxt) -> Generator[None, None, EsResult]:
        """``vc_handle_dr7_read``: answered from the guest's own copy, no exit (as Linux)."""
        yield from ()  # no exchange with the hypervisor
        ctxt.set_reg(_gpr_operand(ctxt.insn), self.dr7)
        return EsResult.OK

    def handle_no_input(self, ctxt: EmCtxt) -> Generator[None, None, EsResult]:
        """``vc_handle_wbinvd`` (and INVD): the exit code alone."""
        view = ctxt.view
        yield from self.hv_call(view, self.ghcb(view), ctxt.exit_code, 0, 0)
        return EsResult.OK

    def handle_monitor(self, ctxt: EmCtxt) -> Generator[None, None, EsResult]:
        """MONITOR/MONITORX: address in RAX, extensions in ECX, hints in EDX (OVMF's way)."""
        return (yield from self._send_regs(ctxt, ("rax", "rcx", "rdx")))

    def handle_mwait(self, ctxt: EmCtxt) -> Generator[None, None, EsResult]:
        """MWAIT/MWAITX: hints in EAX, extensions in ECX (OVMF's way)."""
        return (yield from self._send_regs(ctxt, ("rax", "rcx")))

    def _send_regs(self, ctxt: EmCtxt, names: tuple[str, ...]) -> Generator[None, None, EsResult]:
        view = ctxt.view
        ghcb = self.ghcb(view)
        for name in names:
            ghcb[name] = view.reg(name)
        yield from self.hv_call(view, ghcb, ctxt.exit_code, 0, 0)
        return EsResult.OK

    # -- IOIO -----------------------------------------------------------------------------

    def handle_ioio(self, ctxt: EmCtxt) -> Generator[None, None, EsResult]:
        """``vc_handle_ioio``: IN/OUT through RAX, INS/OUTS through the shared buffer."""
        io = ioio_exitinfo(ctxt.insn, ctxt.view.reg("rdx"))
        if io is None:
            raise DecodeFailed(f"not an IO instruction: {ctxt.insn.describe()}")
        if io.string:
            return (yield from self.string_io(ctxt, io))
        view = ctxt.view
        ghcb = self.ghcb(view)
        mask = (1 << (8 * io.size)) - 1
        ghcb["rax"] = 0 if io.is_in else view.reg("rax") & mask
        yield from self.hv_call(view, ghcb, SvmExit.IOIO, io.exit_info_1, 0)
        if io.is_in:
            _require(ghcb, "rax")
            ctxt.set_reg({1: "al", 2: "ax", 4: "eax"}[io.size], ghcb["rax"] & mask)
        return EsResult.OK

    def string_io(self, ctxt: EmCtxt, io: IoInsn) -> Generator[None, None, EsResult]:
        """(REP) INS/OUTS: as many elements as the shared buffer holds per exchange.

        The element count goes in exit_info_2 and the data through the scratch area,
        the GHCB's shared buffer. rSI/rDI move by the bytes done (down when DF is
        set), rCX counts down for REP; elements left over mean another round.
        """
        view = ctxt.view
        count = ctxt.counter() if ctxt.insn.rep else 1
        n = min(count, SHARED_BUFFER_SIZE // io.size)
        nbytes = n * io.size
        ghcb = self.ghcb(view)
        if not io.is_in:
            src = ctxt.address("rsi", io.segment)
            data = _read_elements(view, src, io.size, n, ctxt.direction)
            ghcb.raw[SHARED_BUFFER_START : SHARED_BUFFER_START + nbytes] = data
        ghcb["sw_scratch"] = self.ghcb_gpa(view) + SHARED_BUFFER_START
        yield from self.hv_call(view, ghcb, SvmExit.IOIO, io.exit_info_1, n)
        if io.is_in:
            dst = ctxt.address("rdi", "es")
            data = bytes(ghcb.raw[SHARED_BUFFER_START : SHARED_BUFFER_START + nbytes])
            _write_elements(view, dst, io.size, data, ctxt.direction)
        ctxt.advance("rdi" if io.is_in else "rsi", ctxt.direction * nbytes)
        if ctxt.insn.rep:
            ctxt.advance("rcx", -n)
            if ctxt.counter():
                return EsResult.RETRY
        return EsResult.OK

    # -- MMIO -----------------------------------------------------------------------------

    def handle_mmio(self, ctxt: EmCtxt) -> Generator[None, None, EsResult]:
        """``vc_handle_mmio``: #VC(NPF) on a MOV form, emulated by MMIO_READ/MMIO_WRITE."""
        mmio = decode_mmio(ctxt.insn)
        if mmio is None:
            raise DecodeFailed(f"not an MMIO instruction: {ctxt.insn.describe()}")
        if ctxt.view.cpl:
            raise Unsupported("MMIO from user mode")
        if mmio.type is MmioType.MOVS:
            return (yield from self.handle_mmio_movs(ctxt, mmio))
        view = ctxt.view
        vaddr = linear_address(ctxt.insn, mmio.mem, view.reg, view.segment_base)
        if mmio.type in (MmioType.WRITE, MmioType.WRITE_IMM):
            value = mmio.imm if mmio.reg is None else ctxt.reg(mmio.reg.name)
            assert value is not None
            yield from self.do_mmio_write(view, vaddr, value.to_bytes(mmio.bytes, "little"))
            return EsResult.OK
        data = yield from self.do_mmio_read(view, vaddr, mmio.bytes)
        _write_mmio_result(ctxt, mmio, int.from_bytes(data, "little"))
        return EsResult.OK

    def handle_mmio_movs(self, ctxt: EmCtxt, mmio: MmioInsn) -> Generator[None, None, EsResult]:
        """``vc_handle_mmio_movs``: one element from DS:rSI to ES:rDI, either side MMIO.

        Linux copies with ordinary loads and stores and lets the MMIO side raise a
        nested #VC; the model tries guest memory first and turns a mapped address
        without RAM behind it into an MMIO exchange, which is what that nested #VC
        does. REP forms count down rCX and retry until it reaches zero.
        """
        view = ctxt.view
        size = mmio.bytes
        src = ctxt.address("rsi", effective_segment(ctxt.insn))
        dst = ctxt.address("rdi", "es")
        try:
            data = view.read(src, size)
        except GuestFault:
            data = yield from self.do_mmio_read(view, src, size)
        try:
            view.write(dst, data)
        except GuestFault:
            yield from self.do_mmio_write(view, dst, data)
        step = ctxt.direction * size
        ctxt.advance("rsi", step)
        ctxt.advance("rdi", step)
        if not ctxt.insn.rep:
            return EsResult.OK
        ctxt.advance("rcx", -1)
        return EsResult.RETRY if ctxt.counter() else EsResult.OK

    def do_mmio_read(self, view: GuestView, vaddr: int, size: int) -> Generator[None, None, bytes]:
        """``vc_do_mmio`` for a read: MMIO_READ of ``size`` bytes at the address's GPA."""
        ghcb = self.ghcb(view)
        yield from self._do_mmio(view, ghcb, vaddr, size, VmgExit.MMIO_READ)
        return bytes(ghcb.raw[SHARED_BUFFER_START : SHARED_BUFFER_START + size])

    def do_mmio_write(self, view: GuestView, vaddr: int, data: bytes) -> Exchange:
        """``vc_do_mmio`` for a write: the bytes go through the shared buffer."""
        ghcb = self.ghcb(view)
        ghcb.raw[SHARED_BUFFER_START : SHARED_BUFFER_START + len(data)] = data
        yield from self._do_mmio(view, ghcb, vaddr, len(data), VmgExit.MMIO_WRITE)

    def _do_mmio(self, view: GuestView, ghcb: Ghcb, vaddr: int, size: int, code: int) -> Exchange:
        try:
            gpa, _ = view.translate(vaddr)  # vc_slow_virt_to_phys
        except GuestFault:
            raise ForwardException(PF_VECTOR) from None
        ghcb["sw_scratch"] = self.ghcb_gpa(view) + SHARED_BUFFER_START
        yield from self.hv_call(view, ghcb, code, gpa, size)


#: The emulation of each exit code (keyed by the #VC error code, an int).
_HANDLERS: dict[int, Callable[[VcHandler, EmCtxt], Generator[None, None, EsResult]]] = {
    SvmExit.READ_DR7: VcHandler.handle_dr7_read,
    SvmExit.WRITE_DR7: VcHandler.handle_dr7_write,
    SvmExit.RDTSC: VcHandler.handle_rdtsc,
    SvmExit.RDTSCP: VcHandler.handle_rdtsc,
    SvmExit.RDPMC: VcHandler.handle_rdpmc,
    SvmExit.CPUID: VcHandler.handle_cpuid,
    SvmExit.INVD: VcHandler.handle_no_input,
    SvmExit.WBINVD: VcHandler.handle_no_input,
    SvmExit.IOIO: VcHandler.handle_ioio,
    SvmExit.MSR: VcHandler.handle_msr,
    SvmExit.VMMCALL: VcHandler.handle_vmmcall,
    SvmExit.MONITOR: VcHandler.handle_monitor,
    SvmExit.MWAIT: VcHandler.handle_mwait,
    SvmExit.NPF: VcHandler.handle_mmio,
}


def verify_exception_info(ghcb: Ghcb) -> None:
    """``verify_exception_info``: success, a sane #GP/#UD to forward, or a VMM error."""
    result = ghcb["sw_exit_info_1"] & 0xFFFF_FFFF
    if result == GhcbResp.NO_ACTION:
        return
    if result == GhcbResp.ISSUE_EXCEPTION:
        info = ghcb["sw_exit_info_2"]
        vector = info & EventInj.VECTOR_MASK
        exception = EventInj.TYPE_EXEPT << EventInj.TYPE_SHIFT
        if (
            info & EventInj.VALID
            and vector in (GP_VECTOR, UD_VECTOR)
            and (info & _EVTINJ_TYPE_MASK == exception)
        ):
            raise ForwardException(vector)
    raise VmmError(f"hypervisor replied sw_exit_info_1 {ghcb['sw_exit_info_1']:#x}, "
                   f"sw_exit_info_2 {ghcb['sw_exit_info_2']:#x}")  # fmt: skip


def _take_edx_eax(view: GuestView, ghcb: Ghcb) -> None:
    """A 64-bit result returned in EDX:EAX (RDMSR, RDPMC, RDTSC): both must be valid."""
    _require(ghcb, "rax", "rdx")
    view.set_reg("rax", ghcb["rax"] & 0xFFFF_FFFF)
    view.set_reg("rdx", ghcb["rdx"] & 0xFFFF_FFFF)


def _require(ghcb: Ghcb, *names: str) -> None:
    """A result register the hypervisor did not mark valid is a VMM error, as in Linux."""
    missing = [name for name in names if not ghcb.is_valid(name)]
    if missing:
        raise VmmError(f"hypervisor reply lacks valid {', '.join(missing)}")


def _gpr_operand(insn: Instruction) -> str:
    """The general-purpose register of ``mov dr7, reg`` / ``mov reg, dr7``."""
    for op in insn.operands:
        if isinstance(op, RegOperand) and is_gpr(op.name):
            return op.name
    raise DecodeFailed(f"no general-purpose register in {insn.describe()}")


def _write_mmio_result(ctxt: EmCtxt, mmio: MmioInsn, value: int) -> None:
    """Put an MMIO read into its register: plain, zero- or sign-extended to its width."""
    assert mmio.reg is not None
    signed = mmio.type is MmioType.READ_SIGN_EXTEND
    ctxt.set_reg(mmio.reg.name, extend(value, mmio.bytes, mmio.reg.size, signed))


def _read_elements(view: GuestView, start: int, size: int, count: int, direction: int) -> bytes:
    """``vc_insn_string_read``: ``count`` elements from ``start`` on, in the order of DF."""
    if direction > 0:
        return _guest_read(view, start, size * count)
    low = start - size * (count - 1)
    block = _guest_read(view, low, size * count)
    return b"".join(block[i * size : (i + 1) * size] for i in reversed(range(count)))


def _write_elements(view: GuestView, start: int, size: int, data: bytes, direction: int) -> None:
    """``vc_insn_string_write``: element i goes to ``start + i*size`` (minus, with DF)."""
    count = len(data) // size
    if direction < 0:
        data = b"".join(data[i * size : (i + 1) * size] for i in reversed(range(count)))
        start -= size * (count - 1)
    if data:
        _guest_write(view, start, data)


def reaches_mmio(view: GuestView, vaddr: int) -> bool:
    """Whether guest code touching ``vaddr`` takes a #VC(NPF): the guest's tables map
    it, but no RAM is behind it (MMIO). Not mapped at all is a #PF instead."""
    try:
        view.translate(vaddr)
    except GuestFault:
        return False
    try:
        view.read(vaddr, 1)
    except GuestFault:
        return True
    return False


def _buffer_fault(view: GuestView, vaddr: int, size: int) -> Exception:
    """What a fault on a string IO buffer becomes: a nested #VC if a page of it is
    MMIO (the first page the access cannot read decides), else #PF."""
    page = vaddr & ~0xFFF
    while page < vaddr + size:
        at = max(page, vaddr)
        try:
            view.read(at, 1)
        except GuestFault:
            if reaches_mmio(view, at):
                return NestedVc(f"the string IO buffer reaches MMIO at {at:#x}")
            break
        page += 0x1000
    return ForwardException(PF_VECTOR)


def _guest_read(view: GuestView, vaddr: int, size: int) -> bytes:
    if not size:
        return b""
    try:
        return view.read(vaddr, size)
    except GuestFault:
        raise _buffer_fault(view, vaddr, size) from None


def _guest_write(view: GuestView, vaddr: int, data: bytes) -> None:
    try:
        view.write(vaddr, data)
    except GuestFault:
        raise _buffer_fault(view, vaddr, len(data)) from None
