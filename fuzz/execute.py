"""Run a case against sevsim and hold what happened against the oracle.

Two ways to reach kvm with the same case:

- ``driver``: :class:`sevsim.testing.ExitDriver` plays the hardware; the page is put
  in guest memory, the GHCB MSR in the VMCB, kvm handles the exit and the next VM
  entry is prepared. No guest CPU: ~1 ms a case.
- ``guest``: guest code copies the page into its shared GHCB, writes the GHCB MSR
  and executes VMGEXIT; after the exit it records the GHCB MSR it reads back, or the
  vector of an exception it took, in a second shared page, and halts. This checks
  that the hardware and the run loop carry what kvm did to the guest; it costs a
  launch (~50 ms), so a campaign sends only a fraction of its cases this way.

Random guest code is run as a guest too (:func:`run_code`): nothing it does may raise
out of KVM_RUN, make a built-in plugin fail, or break the simulator itself.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

from attrs import frozen

from fuzz.cases import FREE_RAM, Case, CodeCase, Step, page_gpa
from fuzz.oracle import (
    ANY,
    RESUME,
    End,
    Env,
    Errno,
    Expected,
    Internal,
    ResetHold,
    State,
    Terminate,
    expect,
)
from sevsim.arch.ghcb import GHCB_PAGE_SIZE, GHCB_SAVE_AREA, Ghcb
from sevsim.arch.msr import MSR_AMD64_SEV_ES_GHCB
from sevsim.arch.vmcb import VMCB_CONTROL, EventInj
from sevsim.guest.asm import assemble
from sevsim.guest.image import CODE, GHCB_GPA, GuestImage
from sevsim.hw import Platform
from sevsim.kvm.exits import (
    ApResetHold,
    Hlt,
    InternalError,
    InternalErrorSub,
    KvmExit,
    RunFailed,
    SystemEvent,
    SystemEventType,
)
from sevsim.kvm.extensions import Extensions
from sevsim.kvm.vm import Kvm, Vm
from sevsim.testing import ExitDriver, SimLog, isolated_host
from sevsim.vmm.launch import launch_image

#: The feature plugins the oracle models, beside KVM's own rows.
PLUGINS = ("msr_protocol", "ioio", "mmio", "apboot", "nmi", "crtraps")
#: Guest layout of the guest path and of random code: results, the case, the stubs.
RESULT = 0x14000
BLOB = 0x15000
STUBS = 0x17000
#: RESULT + 8: what the guest reached after its VMGEXIT (0: nothing yet).
RESUMED = 0xFFFF
VECTOR_SEEN = 0x100
#: Guest RAM of the guest path (the driver has 2 MiB).
GUEST_RAM = 16 << 20
#: A guest run is bounded by this (seconds), as ``sevsim run --timeout`` bounds it.
GUEST_TIMEOUT = 2.0
_FIELDS = {name: (GHCB_SAVE_AREA.offset(name), GHCB_SAVE_AREA[name].size)
           for name in ("sw_exit_info_1", "sw_exit_info_2", "rax", "rbx", "rcx", "rdx",
                        "valid_bitmap")}  # fmt: skip


def kvm_table() -> Extensions:
    """The exit table of sevsim's full hypervisor, started now (so that a plugin
    patched before is the one used)."""
    return isolated_host(enable=PLUGINS).start()


def env_of(vm: Vm) -> Env:
    """The oracle's view of a VM's environment: its RAM, CPUID table and host C-bit."""
    table = {key: (leaf.eax, leaf.ebx, leaf.ecx, leaf.edx) for key, leaf in vm.cpuid.leaves.items()}
    ram = tuple((r.gpa, r.gpa + r.size) for r in vm.memory.ram)
    return Env(vm.compat.name, ram, table, vm.platform.caps.c_bit)


# -- what happened -------------------------------------------------------------------------


@frozen
class Other:
    """An end the oracle never expects (a shutdown, a plugin's failure, ...)."""

    text: str

    def __str__(self) -> str:
        return self.text


@frozen
class Observed:
    """What one exit led to: the end of KVM_RUN, the GHCB MSR the guest reads back,
    the page afterwards, the vector injected at the next entry (None: none)."""

    end: End | Other
    msr: int
    page: bytes
    event: int | None
    #: The plugin KVM_RUN named as failing, if any: a built-in plugin must never fail.
    plugin: str | None = None


def end_of(exit_: KvmExit | None) -> End | Other:
    """A KVM exit (None: kvm resumed the guest) in the oracle's words."""
    if exit_ is None:
        return RESUME
    if isinstance(exit_, SystemEvent) and exit_.type is SystemEventType.SEV_TERM:
        return Terminate(exit_.data[0]) if len(exit_.data) == 1 else Other(exit_.describe())
    if isinstance(exit_, ApResetHold):
        return ResetHold()
    unexpected = InternalErrorSub.UNEXPECTED_EXIT_REASON
    if isinstance(exit_, InternalError) and exit_.suberror is unexpected:
        return Internal(exit_.data)
    if isinstance(exit_, RunFailed) and exit_.plugin is None:
        filled = exit_.exit
        if filled is None or isinstance(filled, InternalError):
            return Errno(exit_.errno, None if filled is None else filled.data)
    return Other(exit_.describe())


def _event(vmcb: bytearray) -> int | None:
    """The vector EVENTINJ holds for the next VMRUN, which then takes it."""
    value = VMCB_CONTROL.get(vmcb, "event_inj")
    VMCB_CONTROL.set(vmcb, "event_inj", 0)
    return value & EventInj.VECTOR_MASK if value & EventInj.VALID else None


# -- holding it against the oracle -----------------------------------------------------------


def _writable(expected: Expected) -> Iterator[tuple[int, int]]:
    """Byte ranges of the page KVM may write in this exit."""
    names = [*(("sw_exit_info_1", "sw_exit_info_2") if expected.reply is not None else ()),
             *(("rax", "rbx", "rcx", "rdx") if expected.regs is not None else ()),
             *(("valid_bitmap",) if expected.bitmap is not None else ())]  # fmt: skip
    for name in names:
        offset, size = _FIELDS[name]
        yield offset, offset + size
    if expected.scratch is not None:
        yield expected.scratch


def _changed_bytes(before: bytes, after: bytes, allowed: list[tuple[int, int]]) -> list[str]:
    """Ranges of bytes that changed outside ``allowed`` (at most a few, as hex spans)."""
    a, b = bytearray(before), bytearray(after)
    for start, end in allowed:
        a[start:end] = b[start:end]
    if a == b:  # the usual case, decided without a loop in Python
        return []
    spans: list[list[int]] = []
    for i in (i for i in range(len(a)) if a[i] != b[i]):
        if spans and spans[-1][1] == i:
            spans[-1][1] = i + 1
        else:
            spans.append([i, i + 1])
    return [f"[{s:#x}, {e:#x})" for s, e in spans[:4]]


def compare(expected: Expected, observed: Observed, before: bytes) -> list[str]:
    """Each way ``observed`` departs from ``expected``, in words (empty: agreement)."""
    problems = []
    if observed.plugin is not None:
        problems.append(f"plugin {observed.plugin!r} failed: {observed.end}")
    elif observed.end != expected.end:
        problems.append(f"end: expected {expected.end}, got {observed.end}")
    if not expected.msr.matches(observed.msr):
        problems.append(f"GHCB MSR: expected {expected.msr}, got {observed.msr:#x}")
    if expected.event is not ANY and observed.event != expected.event:
        problems.append(f"event: expected vector {expected.event}, got {observed.event}")
    stray = _changed_bytes(before, observed.page, list(_writable(expected)))
    if stray:
        problems.append(f"GHCB bytes KVM must not write changed: {', '.join(stray)}")
    after = Ghcb(observed.page)
    reply = (after["sw_exit_info_1"], after["sw_exit_info_2"])
    if isinstance(expected.reply, frozenset) and reply not in expected.reply:
        allowed = " or ".join(f"({a:#x}, {b:#x})" for a, b in sorted(expected.reply))
        problems.append(f"reply: expected {allowed}, got ({reply[0]:#x}, {reply[1]:#x})")
    for name, value in (expected.regs or {}).items():
        if value is not ANY and after[name] != value:
            problems.append(f"{name}: expected {value:#x}, got {after[name]:#x}")
    bitmap = expected.bitmap
    if bitmap is not None and not bitmap.matches(after.valid_bitmap):
        problems.append(f"valid bitmap: expected {bitmap}, got {after.valid_bitmap:#x}")
    return problems


@frozen
class StepResult:
    step: Step
    expected: Expected
    observed: Observed
    problems: tuple[str, ...]

    def describe(self) -> str:
        lines = [f"GHCB MSR {self.step.msr:#x}: rule {self.expected.rule}",
                 f"  expected: {self.expected.end}, MSR {self.expected.msr}",
                 f"  observed: {self.observed.end}, MSR {self.observed.msr:#x}"]  # fmt: skip
        lines += [f"  DISAGREES: {problem}" for problem in self.problems]
        return "\n".join(lines)


# -- the driver path ---------------------------------------------------------------------------


def run_driver(case: Case, table: Extensions) -> list[StepResult]:
    """Each step through ``ExitDriver`` on a fresh VM, until one does not resume."""
    driver = ExitDriver(table, era=case.era)
    vm = driver.vm
    try:
        env, state = env_of(vm), State()
        results = []
        for step in case.steps:
            where = page_gpa(step.msr, env.is_ram)
            page = step.page.build()
            vm.memory.write(where, page)
            expected = expect(env, state, step.msr, page)
            delivered = driver.msr_protocol(step.msr)
            exit_ = delivered.exit
            plugin = exit_.plugin if isinstance(exit_, RunFailed) else None
            observed = Observed(end_of(exit_), delivered.msr, vm.memory.read(where, GHCB_PAGE_SIZE),
                                _event(driver.vcpu.vmcb), plugin)  # fmt: skip
            results.append(StepResult(step, expected, observed,
                                      tuple(compare(expected, observed, page))))  # fmt: skip
            if observed.end != RESUME:
                break
        return results
    finally:
        vm.destroy()


# -- guests --------------------------------------------------------------------------------------


#: Every exception vector to its stub.
_IDT = {v: STUBS + 16 * v for v in range(32)}


@functools.cache
def _stubs() -> bytes:
    """Exception handlers for vectors 0..31, 16 bytes apart: record the vector, halt."""
    return b"".join(
        assemble(f"mov rdi, {RESULT}; mov qword ptr [rdi + 8], {VECTOR_SEEN | v}; hlt",
                 STUBS + 16 * v)
        .ljust(16, b"\xcc") for v in range(32)
    )  # fmt: skip


@functools.cache
def _program() -> bytes:
    """Copy the case's page into the GHCB, VMGEXIT with its MSR, record what follows."""
    return assemble(f"""
        mov rsi, {BLOB}; mov rdi, {GHCB_GPA}; mov ecx, {GHCB_PAGE_SIZE // 8}; rep movsq
        mov rax, [rsi]; mov rdx, rax; shr rdx, 32
        mov ecx, {MSR_AMD64_SEV_ES_GHCB}; wrmsr
        rep vmmcall
        mov ecx, {MSR_AMD64_SEV_ES_GHCB}; rdmsr
        mov rdi, {RESULT}; mov [rdi], eax; mov [rdi + 4], edx
        mov qword ptr [rdi + 8], {RESUMED}
        hlt
    """, CODE)  # fmt: skip


def _launch(image: GuestImage, table: Extensions, era: str) -> tuple[Vm, SimLog]:
    sim = SimLog()
    vm = launch_image(Kvm(Platform(sim=sim)), image, ram_size=GUEST_RAM, handlers=table, era=era)
    return vm, sim


def guest_eligible(case: Case) -> bool:
    """Whether a guest can send the case as the driver does: one step whose page kvm
    reads, if any, is the guest's shared GHCB page (the others are private), and whose
    scratch area cannot be written back over the guest's own structures (its code,
    stack, IDT and page tables all sit below ``FREE_RAM``)."""
    if len(case.steps) != 1:
        return False
    (step,) = case.steps
    gpa = step.msr & ~0xFFF
    if step.msr & 0xFFF or gpa == 0 or gpa >= GUEST_RAM:
        return True  # kvm does not read the page
    scratch = step.page.fields.get("sw_scratch", 0)
    return gpa == GHCB_GPA and (scratch & ~0xFFF == GHCB_GPA or scratch >= FREE_RAM)


def run_guest_case(case: Case, table: Extensions) -> list[StepResult]:
    """The case's one step sent by guest code (see :func:`guest_eligible`)."""
    (step,) = case.steps
    page = step.page.build()
    blob = page + step.msr.to_bytes(8, "little")
    image = GuestImage(_program(), shared=frozenset({GHCB_GPA, RESULT}), idt=_IDT,
                       data={BLOB: blob, STUBS: _stubs()})  # fmt: skip
    vm, _ = _launch(image, table, case.era)
    try:
        vcpu = vm.vcpus[0]
        env = env_of(vm)
        expected = expect(env, State(), step.msr, page)
        exit_ = vcpu.run(GUEST_TIMEOUT)
        reached = int.from_bytes(vm.memory.read(RESULT + 8, 8), "little")
        msr = VMCB_CONTROL.get(vcpu.vmcb, "ghcb_gpa")
        if isinstance(exit_, Hlt) and reached == RESUMED:
            end, event = RESUME, None
            msr = int.from_bytes(vm.memory.read(RESULT, 8), "little")
        elif isinstance(exit_, Hlt) and reached & VECTOR_SEEN:
            end, event = RESUME, reached & 0xFF
        else:
            vcpu.prepare_switch_to_guest()  # the next entry's GHCB write-back
            end, event = end_of(exit_), _event(vcpu.vmcb)
        plugin = exit_.plugin if isinstance(exit_, RunFailed) else None
        observed = Observed(end, msr, vm.memory.read(GHCB_GPA, GHCB_PAGE_SIZE), event, plugin)
        return [StepResult(step, expected, observed, tuple(compare(expected, observed, page)))]
    finally:
        vm.destroy()


def run_case(case: Case, table: Extensions) -> list[StepResult]:
    run: Callable[[Case, Extensions], list[StepResult]]
    run = run_guest_case if case.path == "guest" else run_driver
    return run(case, table)


#: KVM_RUN calls a random program gets (it goes on after a halt or an interrupted run).
CODE_RUNS = 3


def run_code(case: CodeCase, table: Extensions, timeout: float = 0.05) -> list[str]:
    """Run random code; what went wrong on the host's side (empty: nothing)."""
    idt = _IDT if case.idt else {}
    image = GuestImage(case.code, idt=idt, data={STUBS: _stubs()} if case.idt else {})
    vm, sim = _launch(image, table, case.era)
    problems = []
    try:
        for _ in range(CODE_RUNS):
            exit_ = vm.vcpus[0].run(timeout)
            if isinstance(exit_, RunFailed) and exit_.plugin is not None:
                problems.append(f"plugin {exit_.plugin!r} failed: {exit_.why}")
            if not isinstance(exit_, Hlt) and not (
                    isinstance(exit_, RunFailed) and exit_.errno == "EINTR"):  # fmt: skip
                break
        faults = {f["why"] for name, f in sim.events if name == "sim_exit"
                  and "simulator fault" in f["why"]}  # fmt: skip
        problems += sorted(faults)
        return problems
    finally:
        vm.destroy()
