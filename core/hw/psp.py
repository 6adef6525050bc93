"""The SEV firmware running on the AMD Secure Processor (PSP): platform, guests, launch.

The hypervisor never holds a guest's memory key; it asks the firmware to create a
guest context (LAUNCH_START), to bind the context's key to an ASID (ACTIVATE), and
to encrypt and measure the initial image in place (LAUNCH_UPDATE_DATA,
LAUNCH_UPDATE_VMSA). LAUNCH_MEASURE then proves to the guest owner what was
launched. This model follows AMD's SEV API specification and the order of checks of
AMD's published SEV firmware, so a failing command reports the status the real
firmware would (:class:`SevStatus`) as a :class:`SevFirmwareError`.

The firmware does not know how guest memory or the VMSA are implemented: it reaches
them through the two small protocols below, which the VM layer implements.
"""

from __future__ import annotations

from typing import NoReturn, Protocol

from attrs import Factory, define, field, frozen

from sevsim.arch.vmsa import VMSA_PAGE_SIZE
from sevsim.errors import GuestMemoryError, SevFirmwareError
from sevsim.hw.sev_api import (
    POLICY_RESERVED_MASK,
    FirmwareVersion,
    GuestState,
    PlatformState,
    Policy,
    SevStatus,
    policy_min_api,
)
from sevsim.hw.sev_caps import SevCapabilities
from sevsim.hw.sev_guest import (
    TRANSPORT_KEY_SIZE,
    GuestContext,
    LaunchMeasurement,
    LaunchSession,
)

__all__ = [
    "FirmwareVersion",
    "GuestStatus",
    "LaunchMeasurement",
    "LaunchMemory",
    "LaunchSession",
    "PlatformStatus",
    "Psp",
    "VmsaTarget",
]

#: LAUNCH_UPDATE_DATA addresses and lengths must be multiples of this (AES block).
LAUNCH_UPDATE_ALIGN = 16
#: LAUNCH_UPDATE_DATA works through its range in pieces of at most this many bytes,
#: at multiples of it in guest-physical space (so whole pages, never a page split
#: between two pieces). It measures the same bytes in the same order, but never holds
#: a copy of a whole image (2 MiB and more) just to hash it: a piece is still in the
#: CPU cache when it is hashed, and few enough that their per-call cost is noise.
LAUNCH_UPDATE_CHUNK = 256 << 10


class LaunchMemory(Protocol):
    """Guest memory as LAUNCH_UPDATE_DATA sees it."""

    def launch_encrypt(self, gpa: int, length: int, key: bytes) -> bytes | memoryview:
        """Return the plaintext of ``[gpa, gpa+length)`` as the host wrote it (a view is
        measured at once, before the memory can change) and make those pages private
        under ``key``; raise GuestMemoryError for a range outside RAM.

        LAUNCH_UPDATE_DATA calls it for consecutive pieces of its range, in order."""
        ...


class VmsaTarget(Protocol):
    """One vCPU's VMSA page as LAUNCH_UPDATE_VMSA sees it."""

    def launch_protect(self, key: bytes) -> bytes:
        """Return the 4096 plaintext bytes of the VMSA page and seal it."""
        ...


@frozen
class PlatformStatus:
    api_major: int
    api_minor: int
    build: int
    state: PlatformState
    guest_count: int
    es_enabled: bool


@frozen
class GuestStatus:
    handle: int
    state: GuestState
    asid: int
    policy: int


def _fail(command: str, status: SevStatus, detail: str) -> NoReturn:
    raise SevFirmwareError(command, status.name, detail)


@define
class Psp:
    """The SEV firmware: one platform, its guest contexts and the ASIDs they own.

    The firmware tracks ASIDs that may still have guest data in caches ("dirty"):
    all of them after INIT, and a running guest's after DEACTIVATE. ACTIVATE refuses
    a dirty ASID until DF_FLUSH (Linux's ccp driver issues DF_FLUSH right after INIT,
    and KVM before reusing freed ASIDs). The WBINVD that real DF_FLUSH requires
    first has no cache to act on here and is not modelled.
    """

    caps: SevCapabilities = Factory(SevCapabilities)
    version: FirmwareVersion = Factory(FirmwareVersion)
    max_guests: int = Factory(lambda self: self.caps.max_sev_asid, takes_self=True)
    state: PlatformState = field(default=PlatformState.UNINIT, init=False)
    _guests: dict[int, GuestContext] = field(factory=dict, init=False, repr=False)
    _asid_owner: dict[int, int] = field(factory=dict, init=False, repr=False)
    _dirty_asids: set[int] = field(factory=set, init=False, repr=False)

    # -- platform commands -------------------------------------------------------

    def init(self) -> None:
        """INIT: UNINIT -> INIT; every ASID starts dirty."""
        if self.state is not PlatformState.UNINIT:
            _fail(
                "INIT",
                SevStatus.INVALID_PLATFORM_STATE,
                f"platform is {self.state.name}, INIT needs UNINIT",
            )
        self._dirty_asids = set(range(1, self.caps.max_sev_asid + 1))
        self.state = PlatformState.INIT

    def platform_status(self) -> PlatformStatus:
        """PLATFORM_STATUS: version, state and guest count (valid in every state)."""
        return PlatformStatus(
            api_major=self.version.api_major,
            api_minor=self.version.api_minor,
            build=self.version.build,
            state=self.state,
            guest_count=len(self._guests),
            es_enabled=self.state is not PlatformState.UNINIT and self.caps.sev_es_enabled,
        )

    def df_flush(self) -> None:
        """DF_FLUSH: every dirty ASID becomes usable by ACTIVATE again."""
        self._require_initialized("DF_FLUSH")
        self._dirty_asids.clear()

    def key_for_asid(self, asid: int) -> bytes | None:
        """The key the memory controller uses for ``asid``, None when no guest is bound.

        Not a firmware command: this is the key slot ACTIVATE programs, read by the
        memory-encryption engine when a vCPU runs with that ASID.
        """
        handle = self._asid_owner.get(asid)
        return None if handle is None else self._guests[handle].key

    # -- guest management --------------------------------------------------------

    def activate(self, handle: int, asid: int) -> None:
        """ACTIVATE: bind the guest's key to ``asid``."""
        cmd = "ACTIVATE"
        guest = self._working_guest(cmd, handle)
        if not 1 <= asid <= self.caps.max_sev_asid:
            _fail(
                cmd,
                SevStatus.INVALID_ASID,
                f"ASID {asid} is outside 1..max_sev_asid ({self.caps.max_sev_asid})",
            )
        owner = self._asid_owner.get(asid)
        if owner is not None:
            _fail(cmd, SevStatus.ASID_OWNED, f"ASID {asid} is bound to guest handle {owner}")
        if guest.asid:
            _fail(
                cmd,
                SevStatus.ACTIVE,
                f"guest {handle} is already active on ASID {guest.asid}; DEACTIVATE first",
            )
        if asid in self._dirty_asids:
            _fail(
                cmd,
                SevStatus.DFFLUSH_REQUIRED,
                f"ASID {asid} may still be cached for an earlier guest; issue DF_FLUSH",
            )
        allowed = self.caps.asids_for(guest.es)
        if asid not in allowed:
            kind = "an SEV-ES" if guest.es else "an SEV (non-ES)"
            _fail(
                cmd,
                SevStatus.INVALID_ASID,
                f"ASID {asid} cannot hold {kind} guest; expected "
                f"{allowed.start}..{allowed.stop - 1}",
            )
        guest.asid = asid
        self._asid_owner[asid] = handle

    def deactivate(self, handle: int) -> None:
        """DEACTIVATE: unbind the guest from its ASID; a guest that ran leaves it dirty."""
        cmd = "DEACTIVATE"
        guest = self._working_guest(cmd, handle)
        if not guest.asid:
            _fail(cmd, SevStatus.INACTIVE, f"guest {handle} is not bound to an ASID")
        if guest.state is GuestState.RUNNING:
            self._dirty_asids.add(guest.asid)
        del self._asid_owner[guest.asid]
        guest.asid = 0

    def decommission(self, handle: int) -> None:
        """DECOMMISSION: delete the guest context; the last one returns the platform to INIT."""
        cmd = "DECOMMISSION"
        guest = self._working_guest(cmd, handle)
        if guest.asid:
            _fail(
                cmd,
                SevStatus.ACTIVE,
                f"guest {handle} is still active on ASID {guest.asid}; DEACTIVATE first",
            )
        del self._guests[handle]
        if not self._guests:
            self.state = PlatformState.INIT

    def guest_status(self, handle: int) -> GuestStatus:
        """GUEST_STATUS: state, ASID (0 when inactive) and policy of one guest."""
        self._require_initialized("GUEST_STATUS")
        guest = self._guest("GUEST_STATUS", handle)
        return GuestStatus(handle, guest.state, guest.asid, guest.policy)

    # -- launch ------------------------------------------------------------------

    def launch_start(self, policy: int, session: LaunchSession | None = None) -> int:
        """LAUNCH_START: create a guest context with a fresh key; returns its handle.

        Without a session the TEK and TIK are generated, as when the guest owner
        provides no Diffie-Hellman certificate.
        """
        cmd = "LAUNCH_START"
        self._require_initialized(cmd)
        if not 0 <= policy <= 0xFFFF_FFFF:
            _fail(cmd, SevStatus.INVALID_PARAM, f"policy {policy:#x} does not fit a u32")
        if policy & POLICY_RESERVED_MASK:
            _fail(
                cmd,
                SevStatus.POLICY_FAILURE,
                f"policy {policy:#x} sets reserved bits {policy & POLICY_RESERVED_MASK:#x}",
            )
        need = policy_min_api(policy)
        have = (self.version.api_major, self.version.api_minor)
        if need > have:
            _fail(
                cmd,
                SevStatus.POLICY_FAILURE,
                f"policy requires firmware API >= {need[0]}.{need[1]}, "
                f"this firmware is {have[0]}.{have[1]}",
            )
        if policy & Policy.ES and not self.caps.sev_es_enabled:
            _fail(
                cmd,
                SevStatus.UNSUPPORTED,
                f"policy {policy:#x} asks for SEV-ES, but min_sev_asid is 1: "
                "the platform has no SEV-ES ASIDs",
            )
        if session is not None:
            for name in ("tek", "tik"):
                if len(getattr(session, name)) != TRANSPORT_KEY_SIZE:
                    _fail(
                        cmd,
                        SevStatus.INVALID_LENGTH,
                        f"session {name.upper()} is {len(getattr(session, name))} bytes, "
                        f"expected {TRANSPORT_KEY_SIZE}",
                    )
        handle = next((h for h in range(1, self.max_guests + 1) if h not in self._guests), None)
        if handle is None:
            _fail(
                cmd,
                SevStatus.RESOURCE_LIMIT,
                f"all {self.max_guests} guest handles are in use; DECOMMISSION a guest",
            )
        self._guests[handle] = GuestContext(
            handle, int(policy), session or LaunchSession.generate()
        )
        self.state = PlatformState.WORKING
        return handle

    def launch_update_data(self, handle: int, memory: LaunchMemory, gpa: int, length: int) -> None:
        """LAUNCH_UPDATE_DATA: measure ``[gpa, gpa+length)`` and encrypt it in place
        (piece by piece, :data:`LAUNCH_UPDATE_CHUNK`)."""
        cmd = "LAUNCH_UPDATE_DATA"
        guest = self._launching_guest(cmd, handle)
        if gpa < 0 or gpa % LAUNCH_UPDATE_ALIGN:
            _fail(
                cmd,
                SevStatus.INVALID_ADDRESS,
                f"address {gpa:#x} is not {LAUNCH_UPDATE_ALIGN}-byte aligned",
            )
        if length <= 0 or length % LAUNCH_UPDATE_ALIGN:
            _fail(
                cmd,
                SevStatus.INVALID_LENGTH,
                f"length {length:#x} must be a non-zero multiple of {LAUNCH_UPDATE_ALIGN}",
            )
        ld = guest.ld.copy()  # a command that fails leaves the digest as it was
        at, end = gpa, gpa + length
        try:
            while at < end:
                stop = min(end, (at // LAUNCH_UPDATE_CHUNK + 1) * LAUNCH_UPDATE_CHUNK)
                ld.update(memory.launch_encrypt(at, stop - at, guest.key))
                at = stop
        except GuestMemoryError as exc:
            detail = f"[{gpa:#x}, {end:#x}) is not guest RAM: {exc}"
            raise SevFirmwareError(cmd, SevStatus.INVALID_ADDRESS.name, detail) from exc
        guest.ld = ld

    def launch_update_vmsa(self, handle: int, vmsa: VmsaTarget) -> None:
        """LAUNCH_UPDATE_VMSA: measure one vCPU's VMSA page and seal it (SEV-ES guests).

        The length check comes after the target has sealed its page (the protocol
        hands over the bytes only then); a page of the wrong size is not measured.
        """
        cmd = "LAUNCH_UPDATE_VMSA"
        guest = self._launching_guest(cmd, handle, need_es=True)
        page = vmsa.launch_protect(guest.key)
        if len(page) != VMSA_PAGE_SIZE:
            _fail(
                cmd,
                SevStatus.INVALID_LENGTH,
                f"VMSA is {len(page)} bytes, expected {VMSA_PAGE_SIZE}",
            )
        guest.ld.update(page)

    def launch_measure(self, handle: int) -> LaunchMeasurement:
        """LAUNCH_MEASURE: close the launch digest and MAC it for the guest owner."""
        cmd = "LAUNCH_MEASURE"
        guest = self._working_guest(cmd, handle)
        self._require_state(cmd, guest, GuestState.LUPDATE)
        measurement = guest.measure(self.version)
        guest.state = GuestState.LSECRET
        return measurement

    def launch_finish(self, handle: int) -> None:
        """LAUNCH_FINISH: LSECRET -> RUNNING; the guest can now be run."""
        cmd = "LAUNCH_FINISH"
        guest = self._working_guest(cmd, handle)
        self._require_state(cmd, guest, GuestState.LSECRET)
        guest.state = GuestState.RUNNING

    def launch_digest(self, handle: int) -> bytes:
        """The SHA-256 launch digest LAUNCH_MEASURE closed (kept for attestation).

        Not a firmware command; it exposes what the firmware keeps so that a guest
        owner's expected value (sev-snp-measure) can be compared directly.
        """
        guest = self._guest("launch_digest", handle)
        if guest.launch_digest is None:
            _fail(
                "launch_digest",
                SevStatus.INVALID_GUEST_STATE,
                f"guest {handle} is {guest.state.name}; the digest exists after LAUNCH_MEASURE",
            )
        return guest.launch_digest

    # -- checks, in the order the firmware makes them -----------------------------

    def _require_initialized(self, cmd: str) -> None:
        if self.state is PlatformState.UNINIT:
            _fail(cmd, SevStatus.INVALID_PLATFORM_STATE, "platform is UNINIT; issue INIT first")

    def _guest(self, cmd: str, handle: int) -> GuestContext:
        guest = self._guests.get(handle)
        if guest is None:
            known = sorted(self._guests) or "none"
            _fail(cmd, SevStatus.INVALID_GUEST, f"no guest with handle {handle} (known: {known})")
        return guest

    def _working_guest(self, cmd: str, handle: int) -> GuestContext:
        if self.state is not PlatformState.WORKING:
            _fail(
                cmd,
                SevStatus.INVALID_PLATFORM_STATE,
                f"platform is {self.state.name}, {cmd} needs WORKING (a launched guest)",
            )
        return self._guest(cmd, handle)

    @staticmethod
    def _require_state(cmd: str, guest: GuestContext, expected: GuestState) -> None:
        if guest.state is not expected:
            _fail(
                cmd,
                SevStatus.INVALID_GUEST_STATE,
                f"guest {guest.handle} is {guest.state.name}, {cmd} needs {expected.name}",
            )

    def _launching_guest(self, cmd: str, handle: int, need_es: bool = False) -> GuestContext:
        guest = self._working_guest(cmd, handle)
        self._require_state(cmd, guest, GuestState.LUPDATE)
        if need_es and not guest.es:
            _fail(
                cmd,
                SevStatus.UNSUPPORTED,
                f"guest {handle} policy {guest.policy:#x} lacks the ES bit",
            )
        if not guest.asid:
            _fail(
                cmd,
                SevStatus.INACTIVE,
                f"guest {handle} has no ASID to encrypt with; ACTIVATE it first",
            )
        return guest
