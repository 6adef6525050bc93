"""SVM as the silicon implements it for SEV-ES: VMSA pages, VMRUN and #VMEXIT.

The VMSA page lives in host memory at ``vmsa_pa``. Until LAUNCH_UPDATE_VMSA it is an
ordinary page the hypervisor fills in; from then on the hardware owns it: the host
reads ciphertext and any change it makes is caught by the integrity check on the
next VMRUN, which then fails with a SHUTDOWN exit.

Performance rule: the decrypted register state stays in the vCPU's CPU model between
runs; the encrypted page is produced only when the host reads it.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from attrs import define, field, frozen

from sevsim.arch import msr as M
from sevsim.arch.exits import SvmExit
from sevsim.arch.vmcb import (
    V_IRQ,
    VMCB_EVENT_INJ,
    VMCB_EXIT,
    VMCB_GHCB_GPA,
    VMCB_INT_STATE,
    VMCB_VMRUN,
    EventInj,
    IntState,
    NestedCtl,
)
from sevsim.arch.vmsa import SEGMENT_NAMES, VMSA, VMSA_PAGE_SIZE, Segment
from sevsim.errors import FOREIGN_FAULTS, GuestMemoryError
from sevsim.hw.cpu import GuestCpu, HwExit
from sevsim.hw.crypto import PageCipher
from sevsim.hw.memory import GuestMemory
from sevsim.hw.sim import SimSink
from sevsim.hw.vc_model import VcModel

#: Intercept vector bit numbers (APM vol. 2 appendix B; Linux ``INTERCEPT_*``).
_INTERCEPT_BIT = {
    SvmExit.READ_DR7: 39, SvmExit.WRITE_DR7: 55, SvmExit.VINTR: 100, SvmExit.RDTSC: 110,
    SvmExit.RDPMC: 111, SvmExit.CPUID: 114, SvmExit.INVD: 118, SvmExit.HLT: 120,
    SvmExit.INVLPGA: 122, SvmExit.IOIO: 123, SvmExit.MSR: 124, SvmExit.SHUTDOWN: 127,
    SvmExit.VMRUN: 128, SvmExit.VMMCALL: 129, SvmExit.VMLOAD: 130, SvmExit.VMSAVE: 131,
    SvmExit.STGI: 132, SvmExit.CLGI: 133, SvmExit.SKINIT: 134, SvmExit.RDTSCP: 135,
    SvmExit.WBINVD: 137, SvmExit.MONITOR: 138, SvmExit.MWAIT: 139, SvmExit.XSETBV: 141,
    SvmExit.RDPRU: 142, SvmExit.EFER_WRITE_TRAP: 143,
    **{SvmExit.CR0_WRITE_TRAP + cr: 144 + cr for cr in range(16)},
}  # fmt: skip

#: MSR permission map ranges: (first MSR, byte offset of its 2-bit entries).
_MSRPM_RANGES = ((0x0000_0000, 0x000), (0xC000_0000, 0x800), (0xC001_0000, 0x1000))
MSRPM_SIZE = 0x2000


def intercept_bit(exit_code: int) -> int | None:
    return _INTERCEPT_BIT.get(exit_code)


def msrpm_bit(msr: int, write: bool) -> tuple[int, int] | None:
    """(byte, bit) of an MSR's read or write intercept in the MSR permission map."""
    for first, base in _MSRPM_RANGES:
        if first <= msr < first + 0x2000:
            index = (msr - first) * 2 + (1 if write else 0)
            return base + index // 8, index % 8
    return None


@frozen
class Usage:
    """What one VMRUN used, as the host's performance counters see it: nanoseconds
    in guest mode, and instructions retired (counted in runs with a budget only)."""

    guest_ns: int
    retired: int


@define(eq=False)
class VmsaPage:
    """A VMSA page in host memory, and the hardware's protected copy of its state."""

    pa: int
    #: Which vCPU this VMSA is, for the simulator's own view (sim events).
    label: tuple[str, int]
    _plain: bytearray = field(factory=lambda: bytearray(VMSA_PAGE_SIZE), alias="plain")
    _cipher: PageCipher | None = field(default=None, alias="cipher")
    #: The launched fields, decoded; the CPU model starts from them.
    state: dict[str, Any] = field(factory=dict)
    cpu: GuestCpu | None = None
    #: Guest software the model runs as the #VC handler, bound before launch.
    vc_model: VcModel | None = None
    #: Ciphertext the host wrote over the protected page, checked on VMRUN.
    _host_bytes: bytes | None = field(default=None, alias="host_bytes")
    _key: bytes | None = field(default=None, alias="key", repr=False)

    @property
    def protected(self) -> bool:
        return self._cipher is not None

    # -- the host's view --------------------------------------------------------

    def host_read(self, offset: int = 0, size: int = VMSA_PAGE_SIZE) -> bytes:
        if not self.protected:
            return bytes(self._plain[offset : offset + size])
        page = self._host_bytes if self._host_bytes is not None else self._ciphertext()
        return page[offset : offset + size]

    def host_write(self, offset: int, data: bytes) -> None:
        if offset < 0 or offset + len(data) > VMSA_PAGE_SIZE:
            raise GuestMemoryError(
                f"VMSA write at offset {offset:#x} of {len(data)} bytes leaves the 4 KiB page"
            )
        if not self.protected:
            self._plain[offset : offset + len(data)] = data
            return
        page = bytearray(self.host_read())
        page[offset : offset + len(data)] = data
        self._host_bytes = bytes(page)

    def _ciphertext(self) -> bytes:
        assert self._cipher is not None
        return self._cipher.encrypt(self.pa, self.plaintext())

    def plaintext(self) -> bytes:
        """The page as the hardware would decrypt it: the current register state."""
        if self.cpu is None:
            return bytes(self._plain) if not self.protected else _pack(self.state)
        return _pack({**self.state, **self.cpu.save_state()})

    # -- the SEV firmware's side --------------------------------------------------

    def launch_protect(self, key: bytes) -> bytes:
        """LAUNCH_UPDATE_VMSA: decode and seal the page; return what gets measured."""
        if self.protected:
            raise GuestMemoryError(f"VMSA page {self.pa:#x} is already protected")
        measured = bytes(self._plain)
        self.state = decode_vmsa(measured)
        self._cipher = PageCipher(key)
        self._key = key
        return measured

    def sealed_with(self, key: bytes | None) -> bool:
        """Whether ``key`` decrypts this VMSA: VMRUN under another guest's ASID cannot."""
        return key is not None and key == self._key

    # -- VMRUN's integrity check ------------------------------------------------------

    def integrity_ok(self) -> bool:
        """False if the host changed the protected page since the hardware wrote it."""
        if self._host_bytes is None:
            return True
        if self._host_bytes == self._ciphertext():
            self._host_bytes = None
            return True
        return False


def _pack(state: dict[str, Any]) -> bytes:
    values = {k: (v.pack() if isinstance(v, Segment) else v) for k, v in state.items() if k in VMSA}
    return bytes(VMSA.pack(values, size=VMSA_PAGE_SIZE))


def decode_vmsa(page: bytes) -> dict[str, Any]:
    """VMSA fields as values: integers, byte strings, and :class:`Segment` for segments."""
    fields = VMSA.unpack(page)
    for name in SEGMENT_NAMES:
        fields[name] = Segment.unpack(fields[name])
    return fields


class HostPages:
    """Host physical pages the hypervisor hands to the hardware: VMSAs, MSR maps."""

    #: Host physical addresses handed out start here, far from any guest's view.
    BASE = 0x1_0000_0000_0000

    def __init__(self) -> None:
        self._vmsas: dict[int, VmsaPage] = {}
        self._buffers: dict[int, bytearray] = {}
        self._next = self.BASE

    def _take(self, size: int) -> int:
        pa = self._next
        self._next += (size + 0xFFF) & ~0xFFF
        return pa

    def alloc_vmsa(self, label: tuple[str, int]) -> VmsaPage:
        page = VmsaPage(self._take(VMSA_PAGE_SIZE), label)
        self._vmsas[page.pa] = page
        return page

    def alloc_buffer(self, size: int) -> int:
        """Zeroed host memory (an MSR permission map); returns its address."""
        pa = self._take(size)
        self._buffers[pa] = bytearray(size)
        return pa

    def buffer(self, pa: int) -> bytearray | None:
        return self._buffers.get(pa)

    def vmsa_at(self, pa: int) -> VmsaPage | None:
        return self._vmsas.get(pa)

    def free(self, pa: int) -> None:
        self._buffers.pop(pa, None)
        page = self._vmsas.pop(pa, None)
        if page is not None and page.cpu is not None:
            page.cpu.close()
            page.cpu = None


class Svm:
    """The SVM unit of a physical CPU: VMRUN an SEV-ES guest, report the #VMEXIT."""

    def __init__(self, pages: HostPages, cbit: int, sim: SimSink) -> None:
        self.pages = pages
        self.cbit = cbit
        self.sim = sim
        #: VMRUN decodes the intercept vector and finds the MSR permission map of a
        #: VMCB on every entry; the same few values come back each time, so each
        #: decoding is kept (bounded): intercept bytes -> the exit codes intercepted,
        #: msrpm_base_pa -> (its buffer, the test over it).
        self._intercepts: dict[bytes, frozenset[int]] = {}
        self._msrpms: dict[int, tuple[bytearray | None, Callable[[int, bool], bool]]] = {}

    def vmrun(
        self, vmcb: bytearray, memory: GuestMemory, key: bytes | None, deadline: float | None,
        budget: int | None = None, guest_ns: int | None = None,
    ) -> Usage:  # fmt: skip
        """Run the guest of ``vmcb`` until the next #VMEXIT, recorded in ``vmcb``.

        ``memory`` stands for the nested page tables (the guest-physical space),
        ``key`` for the memory controller's key slot of the VMCB's ASID and
        ``deadline`` (time.monotonic), ``budget`` (instructions) or ``guest_ns``
        (guest time) for the host timer's next tick (an INTR exit). Returns what the
        run used.
        """
        entry = VMCB_VMRUN.get(vmcb)
        nested, vmsa_pa = entry[3], entry[7]  # (VMCB_VMRUN's order)
        vmsa = self.pages.vmsa_at(vmsa_pa)
        # VmsaPage's checks, inline where they are one comparison (every VMRUN):
        # protected, sealed_with, and integrity_ok's fast case.
        if vmsa is None or vmsa._cipher is None or nested & _SEV_ES != _SEV_ES:
            self._record(vmcb, None, HwExit(SvmExit.ERR, why="invalid vmsa_pa or SEV-ES off"))
            return Usage(0, 0)
        if key is None or key != vmsa._key:
            why = "the VMSA was sealed under another guest's key than this ASID's"
            self._record(vmcb, vmsa, HwExit(SvmExit.ERR, why=why))
            return Usage(0, 0)
        if vmsa._host_bytes is not None and not vmsa.integrity_ok():
            self._record(vmcb, vmsa, HwExit(SvmExit.SHUTDOWN, why="VMSA integrity check failed"))
            return Usage(0, 0)
        cpu = vmsa.cpu
        before = (cpu.guest_ns, cpu.retired) if cpu is not None else (0, 0)
        try:
            hw_exit = self._run(vmcb, entry, memory, vmsa, key, deadline, budget, guest_ns)
        except FOREIGN_FAULTS as exc:  # nothing a guest does may take the host down
            hw_exit = HwExit(SvmExit.SHUTDOWN, why=f"simulator fault: {type(exc).__name__}: {exc}")
        self._record(vmcb, vmsa, hw_exit)
        cpu = vmsa.cpu
        if cpu is None:
            return Usage(0, 0)
        return Usage(cpu.guest_ns - before[0], cpu.retired - before[1])

    def _run(
        self, vmcb: bytearray, entry: tuple[Any, ...], memory: GuestMemory, vmsa: VmsaPage,
        key: bytes | None, deadline: float | None, budget: int | None, guest_ns: int | None,
    ) -> HwExit:  # fmt: skip
        """VMRUN proper, ``entry`` being the control fields read (:data:`VMCB_VMRUN`)."""
        intercepts, msrpm_pa, int_ctl, _, ghcb_gpa, event_inj, event_inj_err, _ = entry
        cpu = vmsa.cpu
        if cpu is None:
            cpu = vmsa.cpu = self._new_cpu(memory, vmsa)
        if memory is not cpu.memory:
            cpu.rebind(memory)
        kid = memory.key_id(key)
        if kid != cpu.mmu.kid:
            cpu.set_key(kid)
        cpu.deadline = deadline
        cpu.budget = budget
        cpu.guest_limit = None if guest_ns is None else cpu.guest_ns + guest_ns
        cpu.ghcb_msr = ghcb_gpa
        intercepted = self._intercepted_codes(intercepts)
        cpu.intercepted = intercepted.__contains__
        cpu.msr_intercepted = self._msr_test(msrpm_pa)
        cpu.virq_pending = bool(int_ctl & V_IRQ) and _VINTR in intercepted
        VMCB_EVENT_INJ.set(vmcb, 0, event_inj_err)
        injected = cpu.inject(event_inj, event_inj_err) if event_inj & EventInj.VALID else None
        hw_exit = injected or cpu.run()
        VMCB_GHCB_GPA.set(vmcb, cpu.ghcb_msr)
        # SEV-ES: the hardware tells the hypervisor the guest's IF in int_state, beside
        # the interrupt shadow (KVM's svm_interrupt_blocked reads both).
        int_state = (IntState.GUEST_INTERRUPT_MASK if cpu.interrupts_enabled() else 0) | (
            IntState.INTERRUPT_SHADOW if cpu.interrupt_shadow() else 0)  # fmt: skip
        VMCB_INT_STATE.set(vmcb, int_state)
        return hw_exit

    def _intercepted_codes(self, raw: bytes) -> frozenset[int]:
        """The exit codes the intercept vector ``raw`` (the VMCB's 24 bytes) intercepts."""
        codes = self._intercepts.get(raw)
        if codes is None:
            intercepts = int.from_bytes(raw, "little")
            codes = frozenset(code for code in _INTERCEPT_BIT if _intercepted(intercepts, code))
            if len(self._intercepts) >= _DECODED_KEPT:
                self._intercepts.clear()
            self._intercepts[raw] = codes
        return codes

    def _msr_test(self, pa: int) -> Callable[[int, bool], bool]:
        """(msr, write) -> intercepted?, by the MSR permission map at ``pa`` (always,
        for an address that holds none)."""
        buffer = self.pages.buffer(pa)
        known = self._msrpms.get(pa)
        if known is None or known[0] is not buffer:
            msrpm = buffer or bytes(MSRPM_SIZE)
            if len(self._msrpms) >= _DECODED_KEPT:
                self._msrpms.clear()
            known = self._msrpms[pa] = (buffer, partial(_msr_intercepted, msrpm))
        return known[1]

    def _new_cpu(self, memory: GuestMemory, vmsa: VmsaPage) -> GuestCpu:
        on_vc = None
        if self.sim.wants("sim_vc"):
            vm, vcpu = vmsa.label

            def on_vc(exit_code: int, rip: int, insn: bytes, bits: int) -> None:
                self.sim.emit("sim_vc", vm=vm, vcpu=vcpu, exit_code=exit_code, rip=rip,
                              insn=insn, bits=bits)  # fmt: skip

        status = M.MSR_AMD64_SEV_ENABLED | M.MSR_AMD64_SEV_ES_ENABLED
        cpu = GuestCpu(memory, cbit=self.cbit, sev_status=status, on_vc=on_vc)
        cpu.load_state(vmsa.state)
        cpu.vc_model = vmsa.vc_model
        return cpu

    def _record(self, vmcb: bytearray, vmsa: VmsaPage | None, hw_exit: HwExit) -> None:
        code = hw_exit.exit_code & 0xFFFF_FFFF_FFFF_FFFF
        VMCB_EXIT.set(vmcb, code & 0xFFFF_FFFF, code >> 32, hw_exit.info1, hw_exit.info2)
        if vmsa is not None and self.sim.wants("sim_exit"):
            vm, vcpu = vmsa.label
            rip, insn, bits = vmsa.cpu.exit_site() if vmsa.cpu is not None else (None, b"", 64)
            self.sim.emit("sim_exit", vm=vm, vcpu=vcpu, exit_code=code, rip=rip, insn=insn,
                          bits=bits, why=hw_exit.why)  # fmt: skip


_VINTR = SvmExit.VINTR  # bound once: an Enum class attribute costs more than a global
#: ``nested_ctl`` bits an SEV-ES guest's VMCB must have.
_SEV_ES = int(NestedCtl.SEV_ENABLE | NestedCtl.SEV_ES_ENABLE)
#: Decoded intercept vectors and MSR maps an Svm keeps before it starts over.
_DECODED_KEPT = 64


def _msr_intercepted(msrpm: bytes | bytearray, msr: int, write: bool) -> bool:
    """MSRs outside the map's ranges are always intercepted (APM 15.11)."""
    where = msrpm_bit(msr, write)
    return where is None or bool(msrpm[where[0]] >> where[1] & 1)


def _intercepted(intercepts: int, exit_code: int) -> bool:
    bit = intercept_bit(exit_code)
    return bit is not None and bool(intercepts >> bit & 1)
