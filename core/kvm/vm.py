"""KVM's SEV-ES VM: memory slots, vCPUs and the KVM_SEV_* launch commands.

``Kvm`` is ``/dev/kvm`` on one host :class:`~sevsim.hw.Platform`; ``Kvm.create_vm``
is KVM_CREATE_VM of type KVM_X86_SEV_ES_VM followed by KVM_SEV_INIT2, so the VM has
its SEV-ES ASID from the start. The launch methods issue the SEV firmware commands
the way ``sev.c`` does (LAUNCH_START is followed by ACTIVATE, LAUNCH_UPDATE_VMSA
syncs and encrypts every vCPU's VMSA).
"""

from __future__ import annotations

from typing import Any, Literal

from attrs import frozen

from sevsim.arch import ghcb_msr
from sevsim.errors import FOREIGN_FAULTS, SevFirmwareError, VcpuError
from sevsim.hw import LaunchMeasurement, LaunchSession, Platform, Policy
from sevsim.kvm.asid import AsidAllocator
from sevsim.kvm.buses import EmptyBus, EmptyMsrBus, GuestBus, MsrBus
from sevsim.kvm.compat import era as compat_era
from sevsim.kvm.context import VmView
from sevsim.kvm.cpuid import CpuidModel
from sevsim.kvm.dispatch import ExitHandler, ExitKind, ExitTable
from sevsim.kvm.events import EVENTS, EventSink, NullSink
from sevsim.kvm.extensions import Extensions
from sevsim.kvm.seal import Seal, unseal
from sevsim.kvm.vcpu import Vcpu

GHCB_VERSION_MIN = 1
GHCB_VERSION_MAX = 2
#: KVM_CAP_X86_SMM (``include/uapi/linux/kvm.h``): whether the VMM may give the guest SMM.
KVM_CAP_X86_SMM = 117


class Kvm:
    """The hypervisor on one host: creates SEV-ES VMs and owns the ASID allocator."""

    def __init__(self, platform: Platform | None = None) -> None:
        self.platform = platform or Platform()
        self.asids = AsidAllocator(self.platform.firmware, self.platform.caps)

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on /dev/kvm: with no VM to ask about, the host emulates
        SMBASE, so SMM is offered. sevsim answers only the capabilities it models (0
        for the rest, as KVM does for one it does not know)."""
        return 1 if cap == KVM_CAP_X86_SMM else 0

    def create_vm(
        self,
        name: str = "vm",
        *,
        handlers: ExitTable | Extensions | None = None,
        events: EventSink | None = None,
        era: str = "newest",
        ghcb_version: int | None = None,
        cpuid: CpuidModel | None = None,
    ) -> Vm:
        """KVM_CREATE_VM + KVM_SEV_INIT2. ``handlers`` is what the plugin host started
        (:class:`Extensions`), or a bare exit table."""
        cpuid = cpuid or CpuidModel.default(self.platform.caps)
        if ghcb_version is None:  # KVM_SEV_INIT2's default; 5.11 only knew version 1
            ghcb_version = 1 if era == "v5.11" else GHCB_VERSION_MAX
        if not isinstance(handlers, Extensions):
            handlers = Extensions(table=handlers if handlers is not None else ExitTable())
        return Vm(self, name, handlers, events or NullSink(), era, ghcb_version, cpuid)


class Vm:
    """One SEV-ES guest as KVM holds it."""

    def __init__(
        self,
        kvm: Kvm,
        name: str,
        extensions: Extensions,
        events: EventSink,
        era: str,
        ghcb_version: int,
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
        self.extensions = extensions
        self.compat = compat_era(era)
        self.ghcb_version = ghcb_version
        #: The guest's CPUID table (KVM_SET_CPUID2).
        self.cpuid = cpuid
        self._events = events
        self._wanted = frozenset(n for n in EVENTS if events.wants(n))
        self.memory = kvm.platform.new_memory()
        #: The VMM's port-IO and MMIO buses, and its MSR devices (``attach_buses``).
        self.io_bus: GuestBus = EmptyBus()
        self.mmio_bus: GuestBus = EmptyBus()
        self.msr_bus: MsrBus = EmptyMsrBus()
        self.asid = kvm.asids.new(es=True)
        self.handle: int | None = None
        self.vcpus: list[Vcpu] = []
        self.dead: str | None = None
        #: The plugin whose failure ended the VM, if one did.
        self.dead_plugin: str | None = None
        self.destroyed = False
        #: Each active plugin's per-VM state, by plugin name.
        self.plugin_states = {part.name: part.vm_state() for part in extensions.parts
                              if part.vm_state is not None}  # fmt: skip
        self._views: dict[str | None, VmView] = {}
        self.emit("vm_created", vm=self.info())

    def info(self) -> VmInfo:
        """What observers learn of this VM: its name, ASID, era and vCPU count."""
        return VmInfo(self.name, self.asid, self.compat.name, len(self.vcpus))

    def view(self, plugin: str | None) -> VmView:
        """This VM as ``plugin`` sees it (with its own state)."""
        view = self._views.get(plugin)
        if view is None:
            state = self.plugin_states.get(plugin) if plugin is not None else None
            view = self._views[plugin] = VmView(
                self.name, self.compat.name, self.ghcb_version, self.platform.caps.c_bit,
                self.cpuid, _BusView(self, "io_bus"), _BusView(self, "mmio_bus"), state,
            )  # fmt: skip
        return view

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM: an SEV-ES guest cannot have SMM, KVM could not
        save its state into SMRAM (``svm_has_emulated_msr(kvm, MSR_IA32_SMBASE)`` is
        false, in every era), so the VMM turns SMM off."""
        return 0 if cap == KVM_CAP_X86_SMM else self.kvm.check_extension(cap)

    def lookup(self, kind: ExitKind, code: int) -> ExitHandler | None:
        """The handler of an exit, if this VM's KVM has that row."""
        handler = self.extensions.table.lookup(kind, code)
        if handler is None or (handler.eras is not None and self.compat.name not in handler.eras):
            return None  # not ExitHandler.known_in(era), inline: this runs on every exit
        return handler

    # -- observers -------------------------------------------------------------------

    def wants(self, name: str) -> bool:
        """Whether an observer listens to event ``name``: an emitter that must work to
        build an event (or to watch for one) asks first, so that costs nothing unheard."""
        return name in self._wanted

    def emit(self, name: str, /, **fields: Any) -> None:
        """Tell the observers; one that fails ends this VM (naming it), not the host."""
        if name in self._wanted:
            try:
                self._events.emit(name, **fields)
            except FOREIGN_FAULTS as exc:
                self._wanted = frozenset()
                self.terminate(f"observer of {name!r} failed: {type(exc).__name__}: {exc}",
                               getattr(exc, "plugin", None))  # fmt: skip

    # -- memory and vCPUs ------------------------------------------------------------

    def add_ram(self, gpa: int, size: int, name: str = "ram", readonly: bool = False) -> None:
        """KVM_SET_USER_MEMORY_REGION for a new RAM slot (``readonly``: KVM_MEM_READONLY,
        guest writes exit as MMIO)."""
        self.memory.add_ram(gpa, size, name, readonly)

    def add_mmio(self, gpa: int, size: int, name: str) -> None:
        """A guest-physical range left without RAM, for the VMM's devices."""
        self.memory.add_mmio(gpa, size, name)

    def attach_buses(self, io_bus: GuestBus, mmio_bus: GuestBus,
                     msr_bus: MsrBus | None = None) -> None:  # fmt: skip
        """Give kvm the VMM's devices (in-kernel device registration / KVM_IOEVENTFD, and
        the MSRs the VMM handles itself, as KVM_X86_SET_MSR_FILTER exits would)."""
        self.io_bus, self.mmio_bus = io_bus, mmio_bus
        if msr_bus is not None:
            self.msr_bus = msr_bus

    def create_vcpu(self) -> Vcpu:
        if self.handle is not None:
            raise VcpuError(f"{self.name}: vCPUs must exist before LAUNCH_START")
        vcpu = Vcpu(self, len(self.vcpus))
        self.vcpus.append(vcpu)
        return vcpu

    def sev_info(self) -> int:
        """The SEV_INFO MSR-protocol response this VM gives (and preloads in the MSR):
        the host's C-bit (``sev_enc_bit``), whatever the guest's CPUID table says."""
        return ghcb_msr.sev_info_resp(self.ghcb_version, GHCB_VERSION_MIN,
                                      self.platform.caps.c_bit)  # fmt: skip

    # -- KVM_SEV_* launch commands ---------------------------------------------------------

    def _firmware(self, command: str, call: Any, *args: Any) -> Any:
        try:
            result = call(*args)
        except SevFirmwareError as err:
            self.emit("launch_command", vm=self.info(), command=command, status=err.status,
                      detail=err.detail)  # fmt: skip
            raise
        self.emit("launch_command", vm=self.info(), command=command, status="SUCCESS",
                  detail="")  # fmt: skip
        return result

    def _need_handle(self, command: str) -> int:
        if self.handle is None:
            raise SevFirmwareError(command, "INVALID_GUEST", f"{self.name}: LAUNCH_START first")
        return self.handle

    def launch_start(self, policy: int = Policy.ES, session: LaunchSession | None = None) -> int:
        """KVM_SEV_LAUNCH_START: a firmware guest context, bound to this VM's ASID.

        A VM that has a context already keeps it: the new one is decommissioned when
        ACTIVATE refuses it, as ``sev_launch_start`` does on its error path.
        """
        firmware = self.platform.firmware
        handle = self._firmware("LAUNCH_START", firmware.launch_start, policy, session)
        try:
            self._firmware("ACTIVATE", firmware.activate, handle, self.asid)
        except SevFirmwareError:
            firmware.decommission(handle)
            raise
        self.handle = handle
        return handle

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
            self._firmware("LAUNCH_UPDATE_VMSA", self.platform.firmware.launch_update_vmsa,
                           handle, vcpu.vmsa)  # fmt: skip
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

    def terminate(self, why: str, plugin: str | None = None) -> None:
        """Stop this VM for good (``plugin`` failed on its behalf); other VMs go on."""
        if self.dead is None:
            self.dead, self.dead_plugin = why, plugin

    def destroy(self) -> None:
        """KVM_DESTROY_VM: DEACTIVATE, DECOMMISSION, free the ASID, the host pages and
        guest memory; observers hear of it. A second call does nothing."""
        if self.destroyed:
            return
        self.destroyed = True
        firmware = self.platform.firmware
        if self.handle is not None:
            firmware.deactivate(self.handle)
            firmware.decommission(self.handle)
            self.handle = None
        for vcpu in self.vcpus:
            self.platform.free(vcpu.vmsa.pa)
            self.platform.free(vcpu.msrpm_pa)
        self.kvm.asids.free(self.asid)
        self.emit("vm_destroyed", vm=self.info(), why=self.dead or "KVM_DESTROY_VM")
        self.dead = self.dead or "destroyed"
        self.memory.release()


@frozen
class VmInfo:
    """A VM as an observer hears of it."""

    name: str
    asid: int
    era: str
    vcpus: int


class _BusView:
    """A plugin's reach to one of the VMM's buses: accesses only, whatever bus the VMM
    attaches later. It names its VM by a seal, never the VM or the bus (whose devices
    are the VMM's)."""

    __slots__ = ("_name", "_vm")

    def __init__(self, vm: Vm, name: Literal["io_bus", "mmio_bus"]) -> None:
        self._vm = Seal(vm, f"VM {vm.name!r}")
        self._name = name

    def read(self, address: int, size: int) -> bytes:
        return _attached(self).read(address, size)

    def write(self, address: int, data: bytes) -> None:
        _attached(self).write(address, data)


def _attached(view: _BusView) -> GuestBus:
    """The bus the VMM has attached now (a function, not a method: a method's result
    would hand the bus, and its devices, to whoever holds the view)."""
    bus: GuestBus = getattr(unseal(view._vm), view._name)
    return bus
