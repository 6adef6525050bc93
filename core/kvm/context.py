"""What a plugin gets: the hypervisor's view of one exit, of its vCPU and of its VM.

KVM's handlers take a ``struct kvm_vcpu *`` and poke at ``svm->sev_es.ghcb``,
``vcpu->arch.regs`` and the VMCB. sevsim hands a plugin an :class:`ExitContext`
holding exactly that view — nothing a real hypervisor could not see — with named
ways to reply (``svm_vmgexit_success``, ``svm_vmgexit_inject_exception``,
``svm_vmgexit_bad_input``).

The vCPU and VM a plugin sees are *views* (:class:`VcpuView`, :class:`VmView`): they
carry the plugin's own per-vCPU and per-VM state and a fixed set of operations, and
nothing a plugin can reassign or delete to break the vCPU for everybody else. A
view holds its operations sealed (:mod:`sevsim.kvm.seal`): they are bound to the
vCPU, and held openly their ``__self__`` and closure cells would lead a plugin back
to the vCPU, its VM, KVM and the platform.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from operator import itemgetter
from typing import TYPE_CHECKING, Any

from attrs import frozen

from sevsim.arch.exits import GhcbErr, GhcbResp
from sevsim.arch.vmcb import EventInj
from sevsim.errors import PluginError
from sevsim.hw import CpuidLeaf
from sevsim.kvm.dispatch import ExitKind
from sevsim.kvm.ghcb_map import EXIT_INFO, MappedGhcb
from sevsim.kvm.outcome import Outcome
from sevsim.kvm.scratch import Scratch, setup_scratch
from sevsim.kvm.seal import Seal, unseal

if TYPE_CHECKING:
    from sevsim.kvm.buses import GuestBus
    from sevsim.kvm.cpuid import CpuidModel

#: The general-purpose registers of ``vcpu->arch.regs``.
GPRS = ("rax", "rbx", "rcx", "rdx", "rsp", "rbp", "rsi", "rdi",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip")  # fmt: skip
_U64 = (1 << 64) - 1
_ZEROS = dict.fromkeys(GPRS, 0)
_NO_ACTION = GhcbResp.NO_ACTION  # bound once: an Enum class attribute costs more than a global


class Regs(Mapping[str, int]):
    """KVM's ``vcpu->arch.regs`` for one exit: every GPR, each a u64.

    After ``sev_es_sync_from_ghcb`` every register is zero except those the guest
    marked valid (RAX, RBX, RCX, RDX, RSI); a handler sets results here, and RAX..RDX
    go back to the GHCB at the next VMRUN. The set of registers is fixed: a value
    that is not a u64, an unknown name or a deletion is the plugin's error.
    """

    __slots__ = ("_values",)

    def __init__(self) -> None:
        self._values = dict.fromkeys(GPRS, 0)

    def __getitem__(self, name: str) -> int:
        return self._values[name]

    def __setitem__(self, name: str, value: int) -> None:
        if name not in self._values:
            raise PluginError(f"regs[{name!r}]: no such register; expected one of {GPRS}")
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _U64:
            raise PluginError(f"regs[{name!r}] = {value!r}: expected a u64 (0..2**64-1)")
        self._values[name] = value

    def __delitem__(self, name: str) -> None:
        raise PluginError(f"del regs[{name!r}]: vcpu->arch.regs always holds every register")

    def update(self, *args: Mapping[str, int], **values: int) -> None:
        for source in (*args, values):
            for name, value in source.items():
                self[name] = value

    def pick(self, names: tuple[str, ...]) -> tuple[int, ...]:
        """The values of ``names``, in order (``regs[name]`` of each, in one call)."""
        if len(names) > 1:  # itemgetter's tuple: the lookups in one C call
            return itemgetter(*names)(self._values)
        return tuple(self._values[name] for name in names)

    def clear_all(self) -> None:
        """``sev_es_sync_from_ghcb`` starts by zeroing every register."""
        self._values.update(_ZEROS)

    def load_synced(self, rax: int, rbx: int, rcx: int, rdx: int, rsi: int) -> None:
        """``sev_es_sync_from_ghcb`` in one call: every register zeroed, then the five it
        takes from the GHCB set (each a u64 read from the page, 0 unless valid)."""
        values = self._values = _ZEROS.copy()
        values["rax"] = rax
        values["rbx"] = rbx
        values["rcx"] = rcx
        values["rdx"] = rdx
        values["rsi"] = rsi

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        shown = ", ".join(f"{n}={v:#x}" for n, v in self._values.items() if v)
        return f"Regs({shown})"


@frozen(eq=False)
class VmView:
    """A VM as one plugin sees it: what KVM knows of the guest, the VMM's buses, and
    the plugin's own per-VM ``state``."""

    name: str
    #: Which KVM the VM meets: "newest" or "v5.11" (``[kvm] era``).
    era: str
    #: The GHCB protocol version the VM offers (KVM_SEV_INIT2's ``ghcb_version``).
    ghcb_version: int
    #: The host's C-bit position (``sev_enc_bit``), as the SEV_INFO reply carries it.
    sev_enc_bit: int
    #: The guest's CPUID table (KVM_SET_CPUID2), before per-vCPU runtime bits.
    cpuid_table: CpuidModel
    io_bus: GuestBus
    mmio_bus: GuestBus
    state: Any


@frozen
class VcpuOps:
    """The operations a vCPU offers its plugins (bound to one vCPU, which owns them;
    views hold them sealed)."""

    queue_event: Callable[[int, int], None]
    event_pending: Callable[[], bool]
    cpuid: Callable[[int, int], CpuidLeaf]
    set_cpuid_runtime: Callable[..., None]
    get_msr: Callable[[int], int | None]
    set_msr: Callable[[int, int], bool]
    park: Callable[[], None]
    inject_nmi: Callable[[], None]
    mapped_ghcb: Callable[[], MappedGhcb | None]
    flush_ghcb: Callable[[], None]
    set_ghcb_msr: Callable[[int], None]
    cpl: Callable[[], int]
    xcr0: Callable[[], int]
    initial_state: Callable[[], Mapping[str, Any]]


class VcpuView:
    """A vCPU as one plugin sees it: its id, the plugin's per-vCPU ``state``, and the
    operations KVM's SEV-ES code performs on a vCPU."""

    __slots__ = ("_id", "_ops", "_state", "_vm")

    def __init__(self, vcpu_id: int, state: Any, vm: VmView, ops: VcpuOps) -> None:
        self._id = vcpu_id
        self._state = state
        self._vm = vm
        self._ops = Seal(ops, f"vCPU {vcpu_id} of VM {vm.name!r}")

    @property
    def id(self) -> int:
        return self._id

    @property
    def state(self) -> Any:
        """This plugin's per-vCPU state (what its ``sevsim_vcpu_state`` made)."""
        return self._state

    @property
    def vm(self) -> VmView:
        return self._vm

    @property
    def cpl(self) -> int:
        """The CPL the guest reported in the GHCB (the VMCB save area's CPL for SEV-ES)."""
        return unseal(self._ops).cpl()

    @property
    def xcr0(self) -> int:
        return unseal(self._ops).xcr0()

    @property
    def initial_state(self) -> Mapping[str, Any]:
        """The register state the VMM gave before launch (KVM_SET_REGS/SREGS), which
        KVM wrote into the VMSA: all KVM ever knows of the guest's registers."""
        return unseal(self._ops).initial_state()

    def cpuid(self, function: int, index: int = 0) -> CpuidLeaf:
        """``kvm_cpuid``: the guest's table, with this vCPU's runtime bits."""
        return unseal(self._ops).cpuid(function, index)

    def set_cpuid_runtime(self, **bits: int) -> None:
        """``kvm_update_cpuid_runtime``: what CPUID reflects of this vCPU's state
        (``cr4``, ``xcr0``, ``xss``, ``apic_base``)."""
        unseal(self._ops).set_cpuid_runtime(**bits)

    def get_msr(self, index: int) -> int | None:
        """``kvm_get_msr``: None when the read fails (the guest gets #GP)."""
        return unseal(self._ops).get_msr(index)

    def set_msr(self, index: int, value: int) -> bool:
        """``kvm_set_msr``: False when the write fails (the guest gets #GP)."""
        return unseal(self._ops).set_msr(index, value)

    def queue_event(self, event_inj: int, error_code: int = 0) -> None:
        """Write EVENTINJ for the next VMRUN (an exception, NMI or interrupt)."""
        unseal(self._ops).queue_event(event_inj, error_code)

    @property
    def event_pending(self) -> bool:
        """Whether EVENTINJ already holds an event for the next VMRUN."""
        return unseal(self._ops).event_pending()

    def inject_nmi(self) -> None:
        """``kvm_inject_nmi``: an NMI raised inside KVM (by its PMU or local APIC), taken
        like KVM_NMI; it needs the ``nmi`` plugin."""
        unseal(self._ops).inject_nmi()

    def park(self) -> None:
        """``kvm_emulate_ap_reset_hold``: the vCPU waits (KVM_MP_STATE_AP_RESET_HOLD)
        until a SIPI or an event wakes it."""
        unseal(self._ops).park()

    @property
    def mapped_ghcb(self) -> MappedGhcb | None:
        """The GHCB page KVM still has mapped from this vCPU's last exit, if any."""
        return unseal(self._ops).mapped_ghcb()

    def flush_ghcb(self) -> None:
        """Write what KVM changed in the mapped GHCB into guest memory now."""
        unseal(self._ops).flush_ghcb()

    def set_ghcb_msr(self, value: int) -> None:
        """The GHCB MSR value the guest reads at its next VMRUN (an MSR-protocol reply)."""
        unseal(self._ops).set_ghcb_msr(value)


class ExitContext:
    """One exit being handled.

    ``regs`` is KVM's ``vcpu->arch.regs`` after ``sev_es_sync_from_ghcb``; for MSR
    protocol exits, ``msr`` holds the GHCB MSR value: set it to reply. ``notes`` take
    what the handler wants the trace to say about the exit.
    """

    __slots__ = ("_compat", "_memory", "_msr", "_scratch", "code", "exit_info_1", "exit_info_2",
                 "ghcb", "kind", "notes", "regs", "vcpu")  # fmt: skip

    def __init__(
        self, vcpu: VcpuView, kind: ExitKind, code: int, exit_info_1: int = 0,
        exit_info_2: int = 0, *, ghcb: MappedGhcb | None = None, msr: int = 0,
        regs: Regs | None = None, memory: Any = None, compat: Any = None,
    ) -> None:  # fmt: skip
        self.vcpu = vcpu
        self.kind = kind
        self.code = code
        self.exit_info_1 = exit_info_1
        self.exit_info_2 = exit_info_2
        self.ghcb = ghcb
        self.regs = regs if regs is not None else Regs()
        self.notes: dict[str, Any] = {}
        self._msr = msr
        self._scratch: Scratch | None = None
        self._memory = memory
        self._compat = compat

    @property
    def vm(self) -> VmView:
        return self.vcpu._vm  # self.vcpu.vm, without the second property call

    @property
    def msr(self) -> int:
        """The GHCB MSR (MSR-protocol exits): the request, then whatever reply is set."""
        return self._msr

    @msr.setter
    def msr(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _U64:
            raise PluginError(f"ctx.msr = {value!r}: expected a u64 (0..2**64-1)")
        self._msr = value

    @property
    def scratch(self) -> Scratch | None:
        """The scratch area of this exit, once a handler mapped it (:meth:`map_scratch`)."""
        return self._scratch

    # -- GHCB replies (sw_exit_info_1 / sw_exit_info_2) -------------------------------

    def _ghcb(self) -> MappedGhcb:
        if self.ghcb is None:
            raise PluginError(f"{self.kind.value} exit {self.code:#x} has no GHCB to answer in")
        return self.ghcb

    def set_exit_info(self, info1: int, info2: int) -> None:
        """``svm_vmgexit_set_return_code``: write both response fields."""
        ghcb = self._ghcb()
        if (isinstance(info1, int) and isinstance(info2, int)
                and 0 <= info1 <= _U64 and 0 <= info2 <= _U64):  # fmt: skip
            ghcb.put_exit_info(info1, info2)
        else:  # field by field: refused as ghcb[name] = value refuses it, after the first
            ghcb.set_fields(EXIT_INFO, (info1, info2))

    def success(self, info2: int = 0) -> None:
        """``svm_vmgexit_success``: info_1 = 0, info_2 = ``info2``."""
        self.set_exit_info(_NO_ACTION, info2)

    def inject_exception(self, vector: int) -> None:
        """Ask the guest to raise ``vector`` (info_1 = 1, info_2 = the event, as KVM)."""
        self.set_exit_info(GhcbResp.ISSUE_EXCEPTION, EventInj.exception(vector))

    def queue_exception(self, vector: int, error_code: int | None = None) -> None:
        """``kvm_queue_exception``: EVENTINJ, delivered by the next VMRUN.

        For an SEV-ES guest that lands wherever the guest is when it resumes: inside
        its #VC handler, right after VMGEXIT. KVM does this for RDPMC and RDTSCP;
        :meth:`inject_exception` (the GHCB reply) is the way the guest can handle.
        """
        self.vcpu.queue_event(EventInj.exception(vector, error_code), error_code or 0)

    def bad_input(self, error: GhcbErr) -> None:
        """``svm_vmgexit_bad_input``: info_1 = 2, info_2 = the GHCB_ERR_* code."""
        self.set_exit_info(GhcbResp.MALFORMED_INPUT, error)

    def map_scratch(self, length: int, sync: bool) -> Scratch | Outcome:
        """``setup_vmgexit_scratch``: the scratch area of this exit, or the outcome to
        return instead (the guest already told INVALID_SCRATCH_AREA, or -EFAULT).

        The area is the snapshot's ``sw_scratch`` (0, and so invalid, when the guest
        did not mark it valid), as newest KVM takes it.
        """
        ghcb = self._ghcb()
        result = setup_scratch(ghcb, ghcb.snapshot_scratch, length, sync, self._memory)
        if isinstance(result, GhcbErr):
            return self._compat.bad_scratch(self, result)
        if isinstance(result, str):  # the guest's buffer cannot be read at all
            return self._compat.unreadable_scratch(result)
        self._scratch = result
        return result
