"""KVM's SEV-ES VM: memory slots, vCPUs and the KVM_SEV_* launch commands.

``Kvm`` is ``/dev/kvm`` on one host :class:`~sevsim.hw.Platform`; ``Kvm.create_vm``
is KVM_CREATE_VM of type KVM_X86_SEV_ES_VM followed by KVM_SEV_INIT2, so the VM has
its SEV-ES ASID from the start. The launch methods issue the SEV firmware commands
the way ``sev.c`` does (LAUNCH_START is followed by ACTIVATE, LAUNCH_UPDATE_VMSA
syncs and encrypts every vCPU's VMSA).
"""

from __future__ import annotations

from typing import Any

from sevsim.arch import ghcb_msr
from sevsim.errors import FOREIGN_FAULTS, SevFirmwareError, VcpuError
from sevsim.hw import LaunchMeasurement, LaunchSession, Platform, Policy
from sevsim.kvm.asid import AsidAllocator
from sevsim.kvm.buses import EmptyBus, GuestBus
from sevsim.kvm.compat import era as compat_era
from sevsim.kvm.cpuid import CpuidModel
from sevsim.kvm.dispatch import ExitHandler, ExitKind, ExitTable
from sevsim.kvm.events import EVENTS, EventSink, NullSink
from sevsim.kvm.ghcb_requests import ghcb_request_handlers
from sevsim.kvm.intercepts import core_handlers
from sevsim.kvm.vcpu import Vcpu

GHCB_VERSION_MIN = 1
GHCB_VERSION_MAX = 2


class Kvm:
    """The hypervisor on one host: creates SEV-ES VMs and owns the ASID allocator."""

    def __init__(self, platform: Platform | None = None) -> None:
        self.platform = platform or Platform()
        self.asids = AsidAllocator(self.platform.firmware, self.platform.caps)

    def create_vm(
        self,
        name: str = "vm",
        *,
        handlers: ExitTable | None = None,
        events: EventSink | None = None,
        era: str = "newest",
        ghcb_version: int | None = None,
        plugin_settings: dict[str, dict[str, Any]] | None = None,
        cpuid: CpuidModel | None = None,
    ) -> Vm:
        cpuid = cpuid or CpuidModel.default(self.platform.caps)
        if ghcb_version is None:  # KVM_SEV_INIT2's default; 5.11 only knew version 1
            ghcb_version = 1 if era == "v5.11" else GHCB_VERSION_MAX
        return Vm(self, name, handlers or ExitTable(), events or NullSink(), era, ghcb_version,
                  plugin_settings or {}, cpuid)  # fmt: skip


class Vm:
    """One SEV-ES guest as KVM holds it."""

    def __init__(
        self,
        kvm: Kvm,
        name: str,
        handlers: ExitTable,
        events: EventSink,
        era: str,
        ghcb_version: int,
        plugin_settings: dict[str, dict[str, Any]],
        cpuid: CpuidModel,
    ) -> None:
        if not GHCB_VERSION_MIN <= ghcb_version <= GHCB_VERSION_MAX:
            raise VcpuError(
                f"GHCB protocol version {ghcb_version} is outside what KVM supports "
                f"({GHCB_VERSION_MIN}..{GHCB_VERSION_MAX})"
            )
        self.kvm = kvm
        self.platform = kvm.platform
        self.name = name
        self.handlers = handlers
        #: KVM's own handlers (reused SVM intercepts, the protocol requests of its own
        #: switch); a plugin's claim takes precedence.
        self.core_handlers = ExitTable([*core_handlers(), *ghcb_request_handlers()])
        self.compat = compat_era(era)
        self.ghcb_version = ghcb_version
        self.plugin_settings = plugin_settings
        #: The guest's CPUID table (KVM_SET_CPUID2).
        self.cpuid = cpuid
        self._events = events
        self._wanted = frozenset(n for n in EVENTS if events.wants(n))
        self.memory = kvm.platform.new_memory()
        #: The VMM's port-IO and MMIO buses (``attach_buses``).
        self.io_bus: GuestBus = EmptyBus()
        self.mmio_bus: GuestBus = EmptyBus()
        self.asid = kvm.asids.new(es=True)
        #: ``sev->ap_jump_table``: where the guest said its APs restart (AP_JUMP_TABLE).
        self.ap_jump_table = 0
        self.handle: int | None = None
        self.vcpus: list[Vcpu] = []
        self.dead: str | None = None
        self.emit("vm_created", vm=self)

    def lookup(self, kind: ExitKind, code: int) -> ExitHandler | None:
        """The handler of an exit: a plugin's, else KVM's own."""
        return self.handlers.lookup(kind, code) or self.core_handlers.lookup(kind, code)

    # -- observers -------------------------------------------------------------------

    def emit(self, name: str, **fields: Any) -> None:
        """Tell the observers; one that raises ends this VM (with its message), not the host."""
        if name in self._wanted:
            try:
                self._events.emit(name, **fields)
            except FOREIGN_FAULTS as exc:
                self._wanted = frozenset()
                self.terminate(f"observer of {name!r} failed: {type(exc).__name__}: {exc}")

    # -- memory and vCPUs ------------------------------------------------------------

    def add_ram(self, gpa: int, size: int, name: str = "ram") -> None:
        """KVM_SET_USER_MEMORY_REGION for a new RAM slot."""
        self.memory.add_ram(gpa, size, name)

    def add_mmio(self, gpa: int, size: int, name: str) -> None:
        """A guest-physical range left without RAM, for the VMM's devices."""
        self.memory.add_mmio(gpa, size, name)

    def attach_buses(self, io_bus: GuestBus, mmio_bus: GuestBus) -> None:
        """Give kvm the VMM's device buses (KVM_IOEVENTFD / in-kernel device registration)."""
        self.io_bus, self.mmio_bus = io_bus, mmio_bus

    def create_vcpu(self) -> Vcpu:
        if self.handle is not None:
            raise VcpuError(f"{self.name}: vCPUs must exist before LAUNCH_START")
        vcpu = Vcpu(self, len(self.vcpus))
        self.vcpus.append(vcpu)
        return vcpu

    def sev_info(self) -> int:
        """The SEV_INFO MSR-protocol response this VM gives (and preloads in the MSR)."""
        return ghcb_msr.sev_info_resp(self.ghcb_version, GHCB_VERSION_MIN,
                                      self.platform.caps.c_bit)  # fmt: skip

    # -- KVM_SEV_* launch commands ---------------------------------------------------------

    def _firmware(self, command: str, call: Any, *args: Any) -> Any:
        try:
            result = call(*args)
        except SevFirmwareError as err:
            self.emit("launch_command", vm=self, command=command, status=err.status,
                      detail=err.detail)  # fmt: skip
            raise
        self.emit("launch_command", vm=self, command=command, status="SUCCESS", detail="")
        return result

    def _need_handle(self, command: str) -> int:
        if self.handle is None:
            raise SevFirmwareError(command, "INVALID_GUEST", f"{self.name}: LAUNCH_START first")
        return self.handle

    def launch_start(self, policy: int = Policy.ES, session: LaunchSession | None = None) -> int:
        """KVM_SEV_LAUNCH_START: a firmware guest context, bound to this VM's ASID."""
        psp = self.platform.firmware
        self.handle = self._firmware("LAUNCH_START", psp.launch_start, policy, session)
        self._firmware("ACTIVATE", psp.activate, self.handle, self.asid)
        return self.handle

    def launch_update_data(self, gpa: int, length: int) -> None:
        """KVM_SEV_LAUNCH_UPDATE_DATA: measure and encrypt what the VMM placed there."""
        handle = self._need_handle("LAUNCH_UPDATE_DATA")
        self._firmware("LAUNCH_UPDATE_DATA", self.platform.firmware.launch_update_data, handle,
                       self.memory, gpa, length)  # fmt: skip

    def launch_update_vmsa(self) -> None:
        """KVM_SEV_LAUNCH_UPDATE_VMSA: sync, measure and protect every vCPU's VMSA."""
        handle = self._need_handle("LAUNCH_UPDATE_VMSA")
        protected = [vcpu.id for vcpu in self.vcpus if vcpu.guest_state_protected]
        if protected:
            raise VcpuError(f"{self.name}: vCPU(s) {protected} already have a protected VMSA; "
                            "LAUNCH_UPDATE_VMSA runs once (-EINVAL)")  # fmt: skip
        for vcpu in self.vcpus:
            vcpu.sync_vmsa()
            self._firmware("LAUNCH_UPDATE_VMSA", self.platform.firmware.launch_update_vmsa, handle,
                           vcpu.vmsa)  # fmt: skip
            vcpu.guest_state_protected = True

    def launch_measure(self) -> LaunchMeasurement:
        handle = self._need_handle("LAUNCH_MEASURE")
        return self._firmware("LAUNCH_MEASURE", self.platform.firmware.launch_measure, handle)

    def launch_finish(self) -> None:
        handle = self._need_handle("LAUNCH_FINISH")
        self._firmware("LAUNCH_FINISH", self.platform.firmware.launch_finish, handle)

    def launch_digest(self) -> bytes:
        """The launch digest the firmware measured (after LAUNCH_MEASURE)."""
        return self.platform.firmware.launch_digest(self._need_handle("launch_digest"))

    # -- the end ---------------------------------------------------------------------------

    def terminate(self, why: str) -> None:
        """Stop this VM for good (a plugin failed on its behalf); other VMs go on."""
        if self.dead is None:
            self.dead = why

    def destroy(self) -> None:
        """KVM_DESTROY_VM: DEACTIVATE, DECOMMISSION, free the ASID and host pages."""
        psp = self.platform.firmware
        if self.handle is not None:
            psp.deactivate(self.handle)
            psp.decommission(self.handle)
            self.handle = None
        for vcpu in self.vcpus:
            self.platform.free(vcpu.vmsa.pa)
            self.platform.free(vcpu.msrpm_pa)
        self.kvm.asids.free(self.asid)
        self.emit("vm_destroyed", vm=self, why=self.dead or "destroyed")
        self.dead = self.dead or "destroyed"
