"""Attack scenarios: what a malicious guest, host or plugin tries, and what must hold.

Each :class:`Scenario` takes one seat — the guest (hostile code inside an SEV-ES
guest), the host (a hypervisor with physical access tampering with VMCBs, VMSAs and
firmware commands) or a plugin (hostile or broken code sevsim runs on the host's
behalf) — tries one thing, and checks the property the architecture or sevsim's
design promises. :meth:`Scenario.run` gives a :class:`ScenarioResult`: ``held`` and a
detail that says what happened. A Python exception escaping the attack is itself a
failure of the property (nothing an adversary does may crash the host).

The scenarios drive sevsim only through its public surface: launched guests
(:func:`sevsim.vmm.launch.launch_image`), KVM's ``Vm``/``Vcpu`` and the VMCB a real
hypervisor owns, the hardware handles of :mod:`sevsim.hw`, plugin hosts from
:mod:`sevsim.testing`. Run them with :func:`run_all`, or one with :func:`run_scenario`.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from attrs import field, frozen
from attrs.validators import in_

from sevsim import hookimpl
from sevsim.arch.exits import GhcbErr, GhcbResp, SvmExit
from sevsim.arch.ghcb import GHCB_PAGE_SIZE, GHCB_SAVE_AREA, Ghcb
from sevsim.arch.ghcb_msr import GhcbMsr
from sevsim.arch.vectors import Vector
from sevsim.arch.vmcb import VMCB_CONTROL, EventInj
from sevsim.arch.vmsa import VMSA, Segment
from sevsim.errors import FOREIGN_FAULTS, SevFirmwareError, SevsimError, VcpuError
from sevsim.guest.asm import assemble
from sevsim.guest.demo import demo_image
from sevsim.guest.image import CODE, GHCB_GPA, GuestImage
from sevsim.guest.snippets import TERMINATE
from sevsim.guest.vc_native import TermReason, term_request, vc_image_args
from sevsim.hw import Platform
from sevsim.kvm.context import ExitContext
from sevsim.kvm.dispatch import ExitHandler, ExitKind, Handler
from sevsim.kvm.exits import (
    FailEntry,
    Hlt,
    KvmExit,
    RunFailed,
    Shutdown,
    SystemEvent,
    SystemEventType,
)
from sevsim.kvm.vm import Kvm, Vm
from sevsim.plugin.host import PluginHost
from sevsim.testing import SimLog, isolated_host
from sevsim.vmm.launch import launch_image
from sevsim.vmm.machine import MMIO_TEST_GPA

SEATS = ("guest", "host", "plugin")
#: Every guest run of a scenario is bounded by this (seconds).
RUN_TIMEOUT = 5.0
#: A shared page the scenarios' guests write what they saw into (beside the GHCB).
RECORD = GHCB_GPA + 0x900
#: How the scenarios' guests end when nothing went wrong: TERM_REQ set 0 code 0.
_NORMAL_END = SystemEvent(SystemEventType.SEV_TERM, (0x100,))


class UnknownScenario(SevsimError):
    """No scenario has that name."""


@frozen
class ScenarioResult:
    held: bool
    detail: str


@frozen
class Scenario:
    """One attack: who (``seat``), what it ``tries``, what ``must_hold``."""

    name: str
    seat: str = field(validator=in_(SEATS))
    tries: str
    must_hold: str
    probe: Callable[[], ScenarioResult] = field(repr=False)

    def run(self) -> ScenarioResult:
        """Run the attack; an exception out of sevsim is the property failing."""
        try:
            return self.probe()
        except FOREIGN_FAULTS as exc:
            return ScenarioResult(False, f"the host raised {type(exc).__name__}: {exc}")


# -- a machine to attack ------------------------------------------------------------------------


class _Machine:
    """A host (one ``Kvm``) whose simulator's view the scenario reads, and the VMs it
    launched, destroyed together at the end."""

    def __init__(self, plugins: Mapping[str, object] | None = None,
                 enable: Iterable[str] = ("msr_protocol",)) -> None:  # fmt: skip
        self.sim = SimLog()
        self.kvm = Kvm(Platform(sim=self.sim))
        self.host = isolated_host(plugins, enable=enable)
        self.vms: list[Vm] = []

    def launch(self, code: bytes | GuestImage, host: PluginHost | None = None,
               **image_args: Any) -> Vm:  # fmt: skip
        """Launch a guest (its code, or a whole image) on this host with the machine's
        plugins (or ``host``'s)."""
        host = host or self.host
        image = code if isinstance(code, GuestImage) else GuestImage(code, **image_args)
        vm = launch_image(self.kvm, image, handlers=host.start(), events=host.events)
        self.vms.append(vm)
        return vm

    def run_once(self, image: GuestImage, host: PluginHost | None = None) -> KvmExit:
        """Launch ``image``, run it to its first exit to userspace and destroy it (a
        host has few SEV-ES ASIDs)."""
        vm = self.launch(image, host)
        exit_ = vm.vcpus[0].run(RUN_TIMEOUT)
        vm.destroy()
        return exit_

    def simulator_faults(self) -> list[str]:
        """What the simulator itself got wrong while guests ran (must be nothing)."""
        return [f["why"] for name, f in self.sim.events
                if name == "sim_exit" and "simulator fault" in f["why"]]  # fmt: skip

    def __enter__(self) -> _Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        for vm in self.vms:
            vm.destroy()


def _describe(exit_: KvmExit, sim: SimLog) -> str:
    why = sim.why()
    return exit_.describe() + (f" ({why})" if why and isinstance(exit_, Shutdown) else "")


def _verdict(problems: list[str], fine: str) -> ScenarioResult:
    return ScenarioResult(not problems, "; ".join(problems) if problems else fine)


# -- the guest's seat ------------------------------------------------------------------------------

#: Code that makes the CPU read the GDT: a data segment load, an exception (its
#: handler's CS), and IRETQ (CS and SS).
_GDT_USERS = {
    "segment load": "mov ax, 0x10; mov ds, ax",
    "exception delivery": "ud2",
    "iretq": "mov rax, rsp; push 0x10; push rax; pushfq; push 0x08; "
             "lea rax, [rip + 4]; push rax; iretq; nop; nop; nop; nop",
}  # fmt: skip
#: GDT bases with no RAM behind them: a device's MMIO, a hole, a non-canonical address.
_GDT_BASES = {"MMIO device": MMIO_TEST_GPA, "no memory": 0x4000_0000, "non-canonical": 1 << 63}
#: The #UD handler of those guests (reached only if the CPU could read the GDT).
_UD_HANDLER = 0x30000


def gdtr_at_mmio() -> ScenarioResult:
    """A VMSA whose GDTR points where no memory is, then code that needs the GDT."""
    problems, ends = [], set()
    handler = assemble(TERMINATE, _UD_HANDLER)
    with _Machine() as machine:
        for where, base in _GDT_BASES.items():
            registers = {"gdtr": Segment(0, 0, 0x37, base)}
            for what, source in _GDT_USERS.items():
                vm = machine.launch(assemble(source + TERMINATE, CODE), registers=registers,
                                    idt={6: _UD_HANDLER}, data={_UD_HANDLER: handler})  # fmt: skip
                exit_ = vm.vcpus[0].run(RUN_TIMEOUT)
                vm.destroy()  # a host has few SEV-ES ASIDs
                if not isinstance(exit_, Shutdown | SystemEvent):
                    problems.append(f"{what} with the GDT at {where}: {exit_.describe()}")
                ends.add(type(exit_).__name__)
        problems += machine.simulator_faults()
    return _verdict(problems, f"every guest faulted (shutdown) or ran on: {sorted(ends)}")


#: SVM instructions a guest may try on the hardware, as bytes (0F 01 D8..DF).
SVM_INSTRUCTIONS = {
    "VMRUN": (b"\x0f\x01\xd8", SvmExit.VMRUN), "VMLOAD": (b"\x0f\x01\xda", SvmExit.VMLOAD),
    "VMSAVE": (b"\x0f\x01\xdb", SvmExit.VMSAVE), "STGI": (b"\x0f\x01\xdc", SvmExit.STGI),
    "CLGI": (b"\x0f\x01\xdd", SvmExit.CLGI), "SKINIT": (b"\x0f\x01\xde", SvmExit.SKINIT),
    "INVLPGA": (b"\x0f\x01\xdf", SvmExit.INVLPGA),
}  # fmt: skip
#: Where the scenarios' exception handlers go (below the native #VC handler).
_RECORDER = 0x30000


def _frame_recorder() -> bytes:
    """An exception handler that copies the top two words of its interrupt frame (the
    error code and RIP, or RIP and CS when nothing pushed an error code) to
    :data:`RECORD`, then asks for termination normally."""
    return assemble(f"""
        mov rsi, {RECORD}; mov rax, [rsp]; mov [rsi], rax; mov rax, [rsp + 8]; mov [rsi + 8], rax
    """ + TERMINATE, _RECORDER)  # fmt: skip


def svm_instructions() -> ScenarioResult:
    """Each SVM instruction in a guest whose #VC handler records the error code and the
    RIP it interrupted, then asks for termination."""
    recorder = _frame_recorder()
    problems, seen = [], []
    with _Machine() as machine:
        for name, (opcode, code) in SVM_INSTRUCTIONS.items():
            vm = machine.launch(opcode + b"\xf4", idt={29: _RECORDER},
                                data={_RECORDER: recorder})  # fmt: skip
            exit_ = vm.vcpus[0].run(RUN_TIMEOUT)
            error_code, rip = (int.from_bytes(vm.memory.read(RECORD + i, 8), "little")
                               for i in (0, 8))  # fmt: skip
            vm.destroy()
            if not isinstance(exit_, SystemEvent) or (error_code, rip) != (code, CODE):
                problems.append(f"{name}: {_describe(exit_, machine.sim)}, #VC error code "
                                f"{error_code:#x} at {rip:#x}, expected {code:#x} at {CODE:#x}")
            else:
                seen.append(f"{name} {code:#x}")
        problems += machine.simulator_faults()
    return _verdict(problems, "each raised #VC in front of itself: " + ", ".join(seen))


# -- the host's seat -------------------------------------------------------------------------------

_A_SECRET, _B_SECRET = 0xA77A_C4E2_0000_0A0A, 0x5EC2_E7B0_0000_0B0B
#: Copy the 8 bytes at 0x31000 (private) into the GHCB page (shared), then terminate.
_COPIER = f"mov rsi, 0x31000; mov rax, [rsi]; mov rdi, {RECORD}; mov [rdi], rax" + TERMINATE


def foreign_asid_and_vmsa() -> ScenarioResult:
    """Two VMs run the same code, copying a private value into their shared page. The
    host points VM A's vCPU at VM B's ASID and VMSA and runs it: B's state and key over
    A's memory. Were a page readable under a key it was not written with, B would run
    A's code and copy A's value; instead it fetches garbage."""
    problems = []
    with _Machine() as machine:
        a, b = (machine.launch(assemble(_COPIER, CODE),
                               data={0x31000: secret.to_bytes(8, "little")})
                for secret in (_A_SECRET, _B_SECRET))  # fmt: skip
        vmcb = a.vcpus[0].vmcb
        VMCB_CONTROL.set(vmcb, "asid", b.asid)
        VMCB_CONTROL.set(vmcb, "vmsa_pa", b.vcpus[0].vmsa.pa)
        exit_ = a.vcpus[0].run(RUN_TIMEOUT)
        secrets = {_A_SECRET.to_bytes(8, "little"): "A's", _B_SECRET.to_bytes(8, "little"): "B's"}
        for vm, label in ((a, "A"), (b, "B")):
            for gpa in (GHCB_GPA, 0x31000):
                seen = vm.memory.read(gpa, 0x1000)
                problems += [f"{whose} plaintext reached {label}'s page {gpa:#x} as the host "
                             f"reads it" for plain, whose in secrets.items() if plain in seen]
        if isinstance(exit_, SystemEvent):
            problems.append(f"B's state ran A's code coherently to the end ({exit_.describe()})")
        problems += machine.simulator_faults()
    return _verdict(problems, "B's key over A's pages fetched garbage (the run ended without "
                    "running A's code); the host sees ciphertext of both guests' private pages")


def second_launch_start() -> ScenarioResult:
    """LAUNCH_START again on a VM that is running: the firmware must refuse to bind a
    second context to its ASID, leave no context behind, the VM must run on, and after
    destroy its ASID must come back (more VMs launched than there are SEV-ES ASIDs)."""
    problems = []
    with _Machine() as machine:
        firmware = machine.kvm.platform.firmware
        vm = machine.launch(assemble("hlt" + TERMINATE, CODE))
        vm.vcpus[0].run(RUN_TIMEOUT)
        handle, guests = vm.handle, firmware.platform_status().guest_count
        try:
            vm.launch_start()
            problems.append("a second LAUNCH_START on a running VM succeeded")
        except SevFirmwareError as err:
            refused = f"refused ({err.status})"
        else:
            refused = "accepted"
        if (vm.handle, firmware.platform_status().guest_count) != (handle, guests):
            problems.append(f"the guest context changed: handle {handle} -> {vm.handle}, "
                            f"{guests} -> {firmware.platform_status().guest_count} contexts")
        exit_ = vm.vcpus[0].run(RUN_TIMEOUT)
        if not isinstance(exit_, SystemEvent):
            problems.append(f"the VM did not run on: {exit_.describe()}")
        vm.destroy()
        asids = machine.kvm.platform.caps.asids_for(es=True)
        for _ in range(len(asids) + 2):  # more VMs than SEV-ES ASIDs, one at a time
            machine.launch(assemble("hlt", CODE)).destroy()
        if firmware.platform_status().guest_count != guests - 1:
            problems.append(f"{firmware.platform_status().guest_count} guest contexts remain "
                            f"after destroying every VM but {guests - 1}")  # fmt: skip
    return _verdict(problems, f"second LAUNCH_START {refused}; the VM ran on; destroy freed "
                    f"its ASID ({len(asids) + 2} VMs launched after it on {len(asids)} ASIDs)")


def vmsa_tamper() -> ScenarioResult:
    """The host flips one bit of a launched vCPU's VMSA (its RIP) between two runs."""
    with _Machine() as machine:
        vm = machine.launch(assemble("hlt" + TERMINATE, CODE))
        vcpu = vm.vcpus[0]
        vcpu.run(RUN_TIMEOUT)
        offset = VMSA.offset("rip")
        byte = vcpu.vmsa.host_read(offset, 1)[0]
        vcpu.vmsa.host_write(offset, bytes([byte ^ 1]))
        exit_ = vcpu.run(RUN_TIMEOUT)
        held = isinstance(exit_, Shutdown) and "integrity" in machine.sim.why()
        return ScenarioResult(held, f"the next VMRUN: {_describe(exit_, machine.sim)}")


def read_private_memory() -> ScenarioResult:
    """The host reads a page the guest holds private (a launched page full of a known
    value) after the guest ran: it sees ciphertext, never the value."""
    secret = _A_SECRET.to_bytes(8, "little")
    with _Machine() as machine:
        vm = machine.launch(assemble("hlt" + TERMINATE, CODE), data={0x31000: secret * 512})
        exit_ = vm.vcpus[0].run(RUN_TIMEOUT)
        seen = vm.memory.read(0x31000, 0x1000)
    held = isinstance(exit_, Hlt) and secret not in seen and len(set(seen)) > 16
    # Each launch has a fresh key: the ciphertext itself is not part of the detail.
    return ScenarioResult(held, f"the guest ran ({exit_.describe()}); the host read "
                          f"{'ciphertext' if held else 'the value in plaintext'}")


def vmsa_replay() -> ScenarioResult:
    """The host keeps a copy of a VMSA (ciphertext) after one run and writes it back
    after the next: an old state, validly encrypted, must not be accepted."""
    with _Machine() as machine:
        vm = machine.launch(assemble("hlt; hlt" + TERMINATE, CODE))
        vcpu = vm.vcpus[0]
        vcpu.run(RUN_TIMEOUT)
        old = vcpu.vmsa.host_read()
        vcpu.run(RUN_TIMEOUT)
        vcpu.vmsa.host_write(0, old)
        exit_ = vcpu.run(RUN_TIMEOUT)
        held = isinstance(exit_, Shutdown) and "integrity" in machine.sim.why()
        return ScenarioResult(held, f"the VMRUN after the replay: {_describe(exit_, machine.sim)}")


#: The values of the ciphertext scenario: launched (A), written by the guest later (B)
#: and the other private page's own value (C).
_OLD, _NEW, _OTHER = 0x01D0_01D0_01D0_01D0, 0x2E02_2E02_2E02_2E02, 0x07E2_07E2_07E2_07E2
_PAGE, _ELSEWHERE = 0x31000, 0x32000
_CIPHERTEXT_GUEST = f"""
    mov rax, {_OTHER:#x}; mov [{_ELSEWHERE:#x}], rax; mov [{_ELSEWHERE + 8:#x}], rax
    hlt
    mov rax, {_NEW:#x}; mov [{_PAGE:#x}], rax; mov [{_PAGE + 8:#x}], rax
    hlt
    mov rdi, {RECORD:#x}
    mov rax, [{_PAGE:#x}]; mov [rdi], rax; mov rax, [{_PAGE + 8:#x}]; mov [rdi + 8], rax
    mov rax, [{_ELSEWHERE:#x}]; mov [rdi + 16], rax; mov rax, [{_ELSEWHERE + 8:#x}]
    mov [rdi + 24], rax
""" + TERMINATE


def ciphertext_move_and_replay() -> ScenarioResult:
    """The host keeps the ciphertext of a private page while it holds an old value;
    after the guest has written a new one, the host writes the old ciphertext back in
    place and copies it onto another private page of the same guest. SEV-ES encrypts
    but does not check what it decrypts: the page in place gives the old plaintext
    back (replay works), the copy decrypts with another tweak (the address) to
    garbage. SEV-SNP's RMP would refuse both writes; SEV-ES has nothing to refuse
    them with."""
    words = {_OLD: "the old value", _NEW: "the new value", _OTHER: "the page's own value"}
    with _Machine() as machine:
        vm = machine.launch(assemble(_CIPHERTEXT_GUEST, CODE),
                            data={_PAGE: _OLD.to_bytes(8, "little") * 512})  # fmt: skip
        vcpu = vm.vcpus[0]
        first = vcpu.run(RUN_TIMEOUT)
        old = vm.memory.read(_PAGE, 0x1000)  # the hypervisor's view: ciphertext
        second = vcpu.run(RUN_TIMEOUT)
        vm.memory.write(_PAGE, old)
        vm.memory.write(_ELSEWHERE, old)
        end = vcpu.run(RUN_TIMEOUT)
        seen = vm.memory.read(RECORD, 32)
        runs = zip((first, second, end), (Hlt, Hlt, SystemEvent), strict=True)
        problems = [f"run {i}: {_describe(e, machine.sim)}"
                    for i, (e, kind) in enumerate(runs, 1) if not isinstance(e, kind)]  # fmt: skip
        replayed = [int.from_bytes(seen[i : i + 8], "little") for i in (0, 8)]
        moved = [int.from_bytes(seen[i : i + 8], "little") for i in (16, 24)]
        if replayed != [_OLD, _OLD]:
            problems.append("the replayed page read " + ", ".join(
                words.get(v, f"{v:#x}") for v in replayed) + ", not the old value")  # fmt: skip
        problems += [f"the moved ciphertext decrypted to {words[v]}" for v in moved if v in words]
        problems += machine.simulator_faults()
    return _verdict(problems, "the guest read its old value where the host replayed the old "
                    "ciphertext (SEV-ES has no memory integrity) and garbage where the host "
                    "copied it to another address (the XTS tweak is the address)")


# -- corrupted GHCB replies --------------------------------------------------------------

_CPUID_GUEST = "xor eax, eax; xor ecx, ecx; cpuid" + TERMINATE
_IOIO_GUEST = "mov al, 1; out 0x80, al" + TERMINATE
#: What a CPUID result in the GHCB carries, and what only the guest's request does.
_CPUID_RESULTS, _REQUEST_ONLY = ("rax", "rbx", "rcx", "rdx"), "xcr0"
_BITMAP = GHCB_SAVE_AREA.offset("valid_bitmap")
#: One-instruction slices the race below may take before it gives up.
_MAX_SLICES = 10_000
#: Linux's ``sev_es_terminate(SEV_TERM_SET_LINUX, GHCB_TERM_CPUID)``: what the demo sends.
GHCB_TERM_CPUID = 0x100 | 1 << 12 | 4 << 16


def _exit_info(info1: int, info2: int) -> Callable[[ExitContext], None]:
    def reply(ctx: ExitContext) -> None:
        ctx.set_exit_info(info1, info2)

    return reply


def _garbage_msr(ctx: ExitContext) -> None:
    ctx.msr = 0x4141_4141_4141_4141  # GHCBInfo 0x141: no response code of the protocol


@frozen
class _Lie:
    """A hostile plugin's reply to one exit, the guest it is told to, and the
    termination request (the GHCB MSR value) the guest's checks must make of it."""

    kind: ExitKind
    code: int
    reply: Callable[[ExitContext], None]
    guest: Callable[[], GuestImage]
    request: int

    def owners(self) -> dict[str | int, str]:
        """The ``[plugins.owners]`` rule that gives the liar the code a built-in owns."""
        if self.kind is ExitKind.MSR_PROTOCOL:
            return {f"msr_protocol:{self.code:#05x}": "liar"}
        return {f"{self.code:#x}": "liar"}


def _with_vc_handler(source: str) -> Callable[[], GuestImage]:
    return lambda: GuestImage(assemble(source, CODE), **vc_image_args())


_LIES = {
    "CPUID answered with sw_exit_info_1 = 0xdead": _Lie(
        ExitKind.VMGEXIT, SvmExit.CPUID, _exit_info(0xDEAD, 0), _with_vc_handler(_CPUID_GUEST),
        term_request(TermReason.VMM_ERROR)),
    "IOIO answered with an error the guest did not make (INVALID_INPUT)": _Lie(
        ExitKind.VMGEXIT, SvmExit.IOIO, _exit_info(GhcbResp.MALFORMED_INPUT, GhcbErr.INVALID_INPUT),
        _with_vc_handler(_IOIO_GUEST), term_request(TermReason.VMM_ERROR)),
    "CPUID answered by asking the guest to raise #VC": _Lie(
        ExitKind.VMGEXIT, SvmExit.CPUID,
        _exit_info(GhcbResp.ISSUE_EXCEPTION, EventInj.exception(Vector.VC)),
        _with_vc_handler(_CPUID_GUEST), term_request(TermReason.BAD_EXCEPTION)),
    "the demo's MSR-protocol CPUID answered with no CPUID response code": _Lie(
        ExitKind.MSR_PROTOCOL, GhcbMsr.CPUID_REQ, _garbage_msr,
        lambda: demo_image(MMIO_TEST_GPA), GHCB_TERM_CPUID),
}  # fmt: skip


def _sliced(exit_: KvmExit) -> bool:
    """KVM_RUN ended by its instruction budget (the host's timer), not by the guest."""
    return isinstance(exit_, RunFailed) and exit_.errno == "EINTR" and exit_.plugin is None


def _race_valid_bits(vm: Vm) -> KvmExit:
    """An honest KVM answers the guest's CPUID; the host, running the guest in
    one-instruction slices, watches the shared GHCB and clears the result registers'
    valid bits as soon as KVM's reply is there (the result bits, without the ``xcr0``
    bit of the guest's own request), before the guest's handler looks at them."""
    vcpu = vm.vcpus[0]
    for _ in range(_MAX_SLICES):
        exit_ = vcpu.run(RUN_TIMEOUT, budget=1)
        if not _sliced(exit_):
            return exit_
        ghcb = Ghcb(vm.memory.read(GHCB_GPA, GHCB_PAGE_SIZE))
        if all(map(ghcb.is_valid, _CPUID_RESULTS)) and not ghcb.is_valid(_REQUEST_ONLY):
            for name in _CPUID_RESULTS:
                ghcb.set_valid(name, False)
            vm.memory.write(GHCB_GPA + _BITMAP, ghcb.raw[_BITMAP : _BITMAP + 16])
            break
    return vcpu.run(RUN_TIMEOUT)


def corrupt_ghcb_replies() -> ScenarioResult:
    """A hostile hypervisor answers through the GHCB (page or MSR) with what KVM never
    would. Nothing in the hardware checks a reply: the guest's own checks must catch
    it and ask to be terminated with their reason, as Linux and OVMF do (a reply that
    is neither success nor a deliverable exception, a result without its valid bit, an
    MSR reply without the response code asked for). An honest host, for comparison,
    gets the guest's normal end."""
    problems: list[str] = []
    caught: list[str] = []
    raced_want = SystemEvent(SystemEventType.SEV_TERM, (term_request(TermReason.VMM_ERROR),))
    with _Machine() as machine:
        normal = machine.run_once(_with_vc_handler(_CPUID_GUEST)())
        if normal != _NORMAL_END:
            problems.append(f"the honest host's run: {_describe(normal, machine.sim)}")
        for what, lie in _LIES.items():
            host = isolated_host({"liar": _HandlerPlugin(lie.reply, lie.kind, lie.code)},
                                 enable=["msr_protocol", "ioio"], owners=lie.owners())  # fmt: skip
            exit_ = machine.run_once(lie.guest(), host)
            want = SystemEvent(SystemEventType.SEV_TERM, (lie.request,))
            (caught if exit_ == want else problems).append(f"{what}: {exit_.describe()}")
        vm = machine.launch(_with_vc_handler(_CPUID_GUEST)())
        raced = _race_valid_bits(vm)
        vm.destroy()
        what = "CPUID result valid bits cleared by the host after KVM's reply"
        (caught if raced == raced_want else problems).append(f"{what}: {raced.describe()}")
        problems += machine.simulator_faults()
    if problems:
        return ScenarioResult(False, "; ".join(problems))
    return ScenarioResult(True, "the guest's checks asked for termination each time: "
                          + "; ".join(caught))


# -- events the host injects ------------------------------------------------------------------

#: A halt (the host injects while the guest is stopped there), then a normal end.
_INJECTED_GUEST = "hlt; nop; nop" + TERMINATE
_RESUME_RIP = CODE + 1  # after the HLT


@frozen
class _Injection:
    """EVENTINJ as the host writes it into the VMCB, the IDT gates the guest has
    beside its #VC handler, and what the hardware does: the exit, and the interrupt
    frame's top two words the guest's handler finds (None: no handler runs)."""

    event_inj: int
    error_code: int
    gates: tuple[int, ...]
    exit: KvmExit
    frame: tuple[int, int] | None = None


_EXCEPTION = EventInj.VALID | EventInj.TYPE_EXEPT << EventInj.TYPE_SHIFT

#: What the hardware delivers (APM 15.20: any exception vector, any interrupt vector; the
#: error code exactly as EV says; SEV-ES has no restricted injection, so #VC too, as the
#: WeSee attack, CVE-2024-25742, did on real parts).
_DELIVERED = {
    "#VC with CPUID's exit code, at an instruction that is not CPUID": _Injection(
        EventInj.exception(Vector.VC, SvmExit.CPUID) & 0xFFFF_FFFF, SvmExit.CPUID, (),
        SystemEvent(SystemEventType.SEV_TERM, (term_request(TermReason.UNSUPPORTED_INSN),))),
    "interrupt 0x40, which the guest's IDT lacks": _Injection(
        EventInj.VALID | 0x40, 0, (), Shutdown()),
    "#UD with an error code (EV set)": _Injection(
        _EXCEPTION | EventInj.EV | Vector.UD, 0x1234, (Vector.UD,), _NORMAL_END,
        (0x1234, _RESUME_RIP)),
}  # fmt: skip
#: What the hardware refuses, and an exception without EV (APM 15.20: VMRUN exits with
#: VMEXIT_INVALID for a reserved TYPE, or TYPE 3 with a vector that is not an
#: exception, NMI's 2 included; without EV no error code is pushed).
_REFUSED = {
    "an exception with vector 2 (the NMI)": _Injection(
        _EXCEPTION | Vector.NMI, 0, (), FailEntry(SvmExit.ERR)),
    "an exception with the reserved vector 31": _Injection(
        _EXCEPTION | 31, 0, (), FailEntry(SvmExit.ERR)),
    "the reserved event type 1": _Injection(
        EventInj.VALID | 1 << EventInj.TYPE_SHIFT | Vector.GP, 0, (), FailEntry(SvmExit.ERR)),
    "#GP without an error code (EV clear)": _Injection(
        _EXCEPTION | Vector.GP, 0, (Vector.GP,), _NORMAL_END, (_RESUME_RIP, 0x08)),
}  # fmt: skip


def _inject(machine: _Machine, injection: _Injection) -> tuple[KvmExit, tuple[int, int]]:
    """Run the guest to its HLT, write EVENTINJ into its VMCB (the host owns the VMCB:
    no KVM path needed) and run it again; the exit and the frame its handler saw."""
    recorder = _frame_recorder()
    args = vc_image_args(idt=dict.fromkeys(injection.gates, _RECORDER),
                         data={_RECORDER: recorder})  # fmt: skip
    vm = machine.launch(assemble(_INJECTED_GUEST, CODE), **args)
    vcpu = vm.vcpus[0]
    exit_ = vcpu.run(RUN_TIMEOUT)
    if isinstance(exit_, Hlt):
        VMCB_CONTROL.set(vcpu.vmcb, "event_inj", injection.event_inj)
        VMCB_CONTROL.set(vcpu.vmcb, "event_inj_err", injection.error_code)
        exit_ = vcpu.run(RUN_TIMEOUT)
    frame = vm.memory.read(RECORD, 16)
    vm.destroy()  # a host has few SEV-ES ASIDs
    return exit_, (int.from_bytes(frame[:8], "little"), int.from_bytes(frame[8:], "little"))


def _injections(injections: Mapping[str, _Injection], fine: str) -> ScenarioResult:
    problems, seen = [], []
    with _Machine() as machine:
        for what, injection in injections.items():
            exit_, frame = _inject(machine, injection)
            got = f"{what}: {exit_.describe()}"
            if injection.frame is not None:
                got += f", frame {frame[0]:#x} {frame[1]:#x}"
            if exit_ != injection.exit or injection.frame not in (None, frame):
                want = injection.exit.describe() + ("" if injection.frame is None else
                       f", frame {injection.frame[0]:#x} {injection.frame[1]:#x}")  # fmt: skip
                problems.append(f"{got}; the hardware gives {want}")
            else:
                seen.append(got)
        problems += machine.simulator_faults()
    return _verdict(problems, fine + ": " + "; ".join(seen))


def inject_events() -> ScenarioResult:
    """The host injects, through EVENTINJ, events the guest did not cause: a #VC with a
    made-up exit code (the guest's handler checks the instruction at RIP, as Linux and
    OVMF do since CVE-2024-25742, and terminates), an interrupt with no IDT gate (the
    guest triple-faults), an exception with an error code."""
    return _injections(_DELIVERED, "the hardware delivered each; the guest coped or died")


def inject_malformed_events() -> ScenarioResult:
    """The host writes EVENTINJ values the APM makes VMRUN refuse (a reserved type, an
    exception type with a vector that is no exception) and an exception that pushes an
    error code, with EV clear: VMRUN fails for the first (KVM_EXIT_FAIL_ENTRY, the
    guest never sees them), and the #GP arrives without an error code."""
    return _injections(_REFUSED, "VMRUN refused the malformed events; EV decided the frame")


# -- the plugin's seat -----------------------------------------------------------------------------


class _HandlerPlugin:
    """A plugin owning one exit with ``handler`` (by default the MSR protocol's
    termination request)."""

    def __init__(
        self,
        handler: Handler,
        kind: ExitKind = ExitKind.MSR_PROTOCOL,
        code: int = GhcbMsr.TERM_REQ,
    ) -> None:
        self.handler, self.kind, self.code = handler, kind, code

    @hookimpl
    def sevsim_exit_handlers(self) -> Iterable[ExitHandler]:
        yield ExitHandler(self.kind, self.code, self.handler)


#: How long a run with a looping plugin may take beyond its timeout, and when the
#: scenario releases the plugin if sevsim has not stopped it by then.
LOOP_TIMEOUT, LOOP_GRACE = 0.3, 1.0


def plugin_loops_forever() -> ScenarioResult:
    """A plugin's handler that never returns. The scenario's plugin spins until the
    scenario releases it (so that a sevsim that cannot stop it does not hang its
    caller for ever); KVM_RUN must end by itself within its timeout plus a grace
    period, naming the plugin."""
    released = threading.Event()

    def spin(ctx: ExitContext) -> None:
        while not released.is_set():
            pass

    with _Machine({"looper": _HandlerPlugin(spin)}, enable=()) as machine:
        vm = machine.launch(assemble(TERMINATE, CODE))
        timer = threading.Timer(LOOP_TIMEOUT + LOOP_GRACE, released.set)
        timer.start()
        start = time.monotonic()
        try:
            exit_ = vm.vcpus[0].run(LOOP_TIMEOUT)
        finally:
            released.set()
            timer.cancel()
        in_time = time.monotonic() - start < LOOP_TIMEOUT + LOOP_GRACE
    if in_time and isinstance(exit_, RunFailed) and exit_.plugin == "looper":
        # Where the plugin was interrupted varies from run to run: not in the detail.
        return ScenarioResult(True, f"KVM_RUN ended in time (-{exit_.errno}), naming plugin "
                              f"{exit_.plugin!r}, the VM ended: {vm.dead_plugin is not None}")
    if in_time:
        return ScenarioResult(False, f"KVM_RUN ended in time without naming the plugin: "
                              f"{exit_.describe()}")  # fmt: skip
    return ScenarioResult(False, (
        f"KVM_RUN(timeout={LOOP_TIMEOUT} s) returned only when the scenario released the "
        f"plugin {LOOP_GRACE} s later, with {exit_.describe()}: sevsim does not bound the "
        "time a plugin's handler takes (the host timer stops guest code only)"
    ))  # fmt: skip


def plugin_calls_sys_exit() -> ScenarioResult:
    """A plugin's handler calls ``sys.exit(3)``; KVM_RUN must end, naming it, and the
    process must go on."""

    def leave(ctx: ExitContext) -> None:
        sys.exit(3)

    with _Machine({"quitter": _HandlerPlugin(leave)}, enable=()) as machine:
        vm = machine.launch(assemble(TERMINATE, CODE))
        exit_ = vm.vcpus[0].run(RUN_TIMEOUT)
        held = (isinstance(exit_, RunFailed) and exit_.plugin == "quitter"
                and "SystemExit" in exit_.why and vm.dead is not None)  # fmt: skip
        return ScenarioResult(held, exit_.describe())


class _BrokenObserver:
    """An observer of every #VMEXIT that raises."""

    @hookimpl
    def sevsim_vmexit(self, exit_code: int) -> None:
        raise RuntimeError(f"observer broke on exit {exit_code:#x}")


def observer_raises() -> ScenarioResult:
    """An observer hook raises on the first exit. Its VM must stop with a reason that
    names the observer, no further guest code may run, and another VM on the same host
    (with sound plugins) must run to its end."""
    problems = []
    with _Machine({"observer": _BrokenObserver()}) as machine:
        vm = machine.launch(assemble("hlt" + TERMINATE, CODE))
        first = vm.vcpus[0].run(RUN_TIMEOUT)
        if vm.dead is None or "'observer'" not in vm.dead:
            problems.append(f"the VM was not stopped naming the observer ({vm.dead!r})")
        try:
            again = vm.vcpus[0].run(RUN_TIMEOUT)
            if not isinstance(again, RunFailed):
                problems.append(f"the VM ran on after its observer failed: {again.describe()}")
        except VcpuError:
            pass  # KVM_RUN refused: the VM is terminated
        other = machine.launch(assemble(TERMINATE, CODE), isolated_host(enable=["msr_protocol"]))
        after = other.vcpus[0].run(RUN_TIMEOUT)
        if not isinstance(after, SystemEvent):
            problems.append(f"another VM on the host did not run: {after.describe()}")
    return _verdict(problems, f"first run: {first.describe()}; the VM ended: {vm.dead}; "
                    "another VM ran to its end")  # fmt: skip


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("gdtr-at-mmio", "guest",
             "launch with the VMSA's GDTR on MMIO, a hole and a non-canonical address, then "
             "load a segment, take an exception, IRETQ",
             "the host survives; the guest faults (shutdown) or runs on", gdtr_at_mmio),
    Scenario("svm-instructions", "guest",
             "execute VMRUN, VMLOAD, VMSAVE, STGI, CLGI, SKINIT and INVLPGA",
             "each raises #VC with its exit code, in front of the instruction",
             svm_instructions),
    Scenario("foreign-asid-and-vmsa", "host",
             "point a vCPU's VMCB at another VM's ASID and VMSA and run it",
             "the other VM's key over this VM's pages gives garbage, and no private value "
             "reaches the host in plaintext", foreign_asid_and_vmsa),
    Scenario("second-launch-start", "host", "LAUNCH_START again on a running VM",
             "refused without leaking a guest context; the VM runs on; destroy frees its ASID",
             second_launch_start),
    Scenario("vmsa-tamper", "host", "flip a bit of a protected VMSA between runs",
             "the next VMRUN fails with SHUTDOWN (integrity check)", vmsa_tamper),
    Scenario("read-private-memory", "host", "read a guest's private page",
             "ciphertext only", read_private_memory),
    Scenario("vmsa-replay", "host", "write back a VMSA saved from an earlier run",
             "the next VMRUN fails with SHUTDOWN (integrity check)", vmsa_replay),
    Scenario("ciphertext-move-and-replay", "host",
             "write a private page's old ciphertext back in place, and copy it to another "
             "private page of the same guest",
             "the guest reads its old value in place (SEV-ES has no memory integrity: replay "
             "works) and garbage at the other address (the tweak is the address)",
             ciphertext_move_and_replay),
    Scenario("corrupt-ghcb-replies", "host",
             "answer CPUID, IOIO and an MSR-protocol CPUID with garbage, an error the guest "
             "did not make or a #VC to raise; clear a reply's valid bits on the shared page",
             "the guest's own checks ask for termination with their reason each time",
             corrupt_ghcb_replies),
    Scenario("inject-events", "host",
             "inject through EVENTINJ a #VC with a made-up exit code, an interrupt the IDT "
             "lacks, an exception with an error code",
             "the hardware delivers each; the guest's #VC handler rejects the forged #VC, "
             "the missing gate triple-faults (shutdown), the frame holds the error code",
             inject_events),
    Scenario("inject-malformed-events", "host",
             "inject an exception with vector 2 (NMI) or the reserved 31, an event of the "
             "reserved type 1, a #GP with EV clear",
             "VMRUN fails (KVM_EXIT_FAIL_ENTRY) for the first three; the #GP arrives "
             "without an error code", inject_malformed_events),
    Scenario("plugin-loops-forever", "plugin", "an exit handler that never returns",
             "KVM_RUN ends within its timeout (plus grace), naming the plugin",
             plugin_loops_forever),
    Scenario("plugin-sys-exit", "plugin", "an exit handler that calls sys.exit()",
             "KVM_RUN ends naming the plugin; the process goes on", plugin_calls_sys_exit),
    Scenario("observer-raises", "plugin", "an observer hook that raises",
             "its VM stops naming the observer; other VMs run", observer_raises),
)  # fmt: skip


def list_scenarios() -> tuple[Scenario, ...]:
    return SCENARIOS


def run_scenario(name: str) -> ScenarioResult:
    for scenario in SCENARIOS:
        if scenario.name == name:
            return scenario.run()
    raise UnknownScenario(f"no attack scenario {name!r}; expected one of "
                          f"{', '.join(s.name for s in SCENARIOS)}")  # fmt: skip


def run_all() -> dict[str, ScenarioResult]:
    """Every scenario's result, by name, in the order of :data:`SCENARIOS`."""
    return {scenario.name: scenario.run() for scenario in SCENARIOS}
