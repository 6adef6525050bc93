"""What KVM must answer to one VMGEXIT of an SEV-ES guest: an independent model.

Written from ``REFERENCE.md`` (sections cited as §n), not from sevsim's ``kvm`` or
its plugins: the campaign compares sevsim with this model, and a rule that both got
wrong in the same way would go unseen if one had been derived from the other. The
model uses ``sevsim.arch`` only for numbers and layouts (exit codes, GHCB field
offsets); every rule, threshold and encoding is restated here from the reference.

The KVM modelled is sevsim's full hypervisor: every built-in feature plugin active
(MSR protocol, IOIO, MMIO, AP boot, NMI, CR traps, and KVM's own rows), one vCPU, an
SEV-ES (not SNP) VM with the era's default GHCB version, the VMM's devices in kernel
(port IO and MMIO complete without an exit to userspace).

:func:`expect` gives, for one VMGEXIT, an :class:`Expected`: how KVM_RUN ends, the
GHCB MSR the guest reads back, the reply in ``sw_exit_info_1/2``, RAX..RDX and the
valid bitmap the next VM entry writes into the GHCB, which other bytes of the page
KVM may write at all (an in-page scratch area it fills), and the event injected at
the next entry. Where the reference leaves freedom (device data, which MSRs and PMU
counters exist, CPUID bits that follow vCPU state, registers left stale by a 5.11
failure) the model says :data:`ANY` rather than guess.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Final

from attrs import define, field, frozen

from sevsim.arch.exits import GhcbErr, GhcbResp, SvmExit, VmgExit
from sevsim.arch.ghcb import GHCB_SAVE_AREA, Ghcb, valid_bit
from sevsim.arch.ghcb_msr import GhcbMsr
from sevsim.arch.ioio import IOIO_STR, IOIO_TYPE_IN, IoioInfo

NEWEST = "newest"
V5_11 = "v5.11"
ERAS = (NEWEST, V5_11)

U64 = (1 << 64) - 1
INT_MAX = 0x7FFF_FFFF
#: §2 setup_vmgexit_scratch: an in-page area lies within the shared buffer; one
#: elsewhere is at most GHCB_SCRATCH_AREA_LIMIT (16 pages).
SHARED_BUFFER = (0x800, 0xFF0)
SCRATCH_LIMIT = 16 * 4096
#: §3: the registers KVM writes back at every entry after a GHCB exit.
SYNCED_OUT = ("rax", "rbx", "rcx", "rdx")
#: §3: the valid bitmap the guest finds after any GHCB exit (bits 63, 97-99, 115, 116).
RETURNED_BITMAP = sum(1 << valid_bit(n) for n in (*SYNCED_OUT, "sw_exit_info_1", "sw_exit_info_2"))
_REG_BITS = sum(1 << valid_bit(n) for n in SYNCED_OUT)
_BITMAP_MASK = (1 << 128) - 1
_BITMAP_AT = GHCB_SAVE_AREA.offset("valid_bitmap")
_INFO_AT = (GHCB_SAVE_AREA.offset("sw_exit_info_1"), GHCB_SAVE_AREA.offset("sw_exit_info_2") + 8)
PAGE_SIZE = 4096
_SW_FIELDS = ("sw_exit_code", "sw_exit_info_1", "sw_exit_info_2")
#: §1.2: the SNP codes, which an SEV-ES guest gets refused with MISSING_INPUT (newest).
_SNP_CODES = frozenset(
    {VmgExit.PSC, VmgExit.GUEST_REQUEST, VmgExit.EXT_GUEST_REQUEST, VmgExit.AP_CREATION}
)
#: §4: SNP page requests through the MSR, which terminate a non-SNP guest (newest).
_SNP_MSR_REQUESTS = frozenset({GhcbMsr.PREF_GPA_REQ, GhcbMsr.REG_GPA_REQ, GhcbMsr.PSC_REQ})
#: §4 HV_FT and §1.2 HV_FEATURES: SNP | SNP_AP_CREATION.
HV_FEATURES = 0x3
#: CPUID functions with bits KVM rewrites from vCPU state (§3 "CPUID runtime refresh":
#: OSXSAVE and the APIC bit of leaf 1, OSPKE of leaf 7, the XSAVE sizes of leaf 0xD,
#: the APIC ID of leaves 1 and 0xB): the model does not follow that state.
_RUNTIME_LEAVES = frozenset({0x1, 0x7, 0xB, 0xD})
#: x86 vectors the reference names.
UD, GP = 6, 13


def event_inj(vector: int) -> int:
    """§2: an exception reply's sw_exit_info_2, EVENTINJ format: vector | type 3 | valid."""
    return vector | 3 << 8 | 1 << 31


class _Unspecified:
    """The reference leaves this value free."""

    _instance: _Unspecified | None = None

    def __new__(cls) -> _Unspecified:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "ANY"


#: A value the reference leaves free: any observation matches it.
ANY: Final = _Unspecified()

# -- how KVM_RUN ends ----------------------------------------------------------------------


@frozen
class Resume:
    """KVM re-enters the guest (an exit handler's ``return 1``)."""

    def __str__(self) -> str:
        return "resume"


@frozen
class Terminate:
    """KVM_EXIT_SYSTEM_EVENT of type SEV_TERM with ``data[0]``."""

    data: int

    def __str__(self) -> str:
        return f"SEV_TERM [{self.data:#x}]"


@frozen
class ResetHold:
    """KVM_EXIT_AP_RESET_HOLD: the vCPU parked until a SIPI (no in-kernel LAPIC)."""

    def __str__(self) -> str:
        return "AP_RESET_HOLD"


@frozen
class Internal:
    """KVM_EXIT_INTERNAL_ERROR, suberror UNEXPECTED_EXIT_REASON (4), with its data."""

    data: tuple[int, ...]

    def __str__(self) -> str:
        return f"internal error [{', '.join(f'{d:#x}' for d in self.data)}]"


@frozen
class Errno:
    """KVM_RUN fails with ``-errno``; ``internal`` is the internal-error data KVM filled
    in ``kvm_run`` before failing (5.11's validation), if any."""

    errno: str
    internal: tuple[int, ...] | None = None

    def __str__(self) -> str:
        filled = "" if self.internal is None else f" after {Internal(self.internal)}"
        return f"-{self.errno}{filled}"


End = Resume | Terminate | ResetHold | Internal | Errno
RESUME = Resume()


@frozen
class Masked:
    """A value of which only the ``mask`` bits are specified (the 64-bit GHCB MSR, the
    128-bit valid bitmap)."""

    value: int
    mask: int = U64

    def matches(self, seen: int) -> bool:
        return (seen ^ self.value) & self.mask == 0

    def __str__(self) -> str:
        if self.mask == (1 << self.mask.bit_length()) - 1:  # all of it
            return f"{self.value:#x}"
        return f"{self.value & self.mask:#x} (mask {self.mask:#x})"


RegValue = int | _Unspecified
Event = int | None | _Unspecified


@frozen
class Expected:
    """What one VMGEXIT must lead to.

    ``reply`` holds the allowed (sw_exit_info_1, sw_exit_info_2) pairs (None: KVM does
    not write them); ``regs`` RAX..RDX as the next entry writes them (None: it does
    not); ``bitmap`` the valid bitmap the guest then finds (None: KVM leaves it);
    ``scratch`` the bytes [start, end) of the page that KVM fills with data (a scratch
    area in the page, or one elsewhere whose copy-back reaches into it). Every other
    byte of the GHCB page must stay as the guest wrote it. ``event`` is the vector
    injected at the next entry (None: no event). ``rule`` names the reference's rule.
    """

    end: End
    msr: Masked
    rule: str
    reply: frozenset[tuple[int, int]] | _Unspecified | None = None
    regs: Mapping[str, RegValue] | None = None
    bitmap: Masked | None = None
    scratch: tuple[int, int] | None = None
    event: Event = None


# -- the environment and KVM's state --------------------------------------------------------


@frozen
class Env:
    """What the VMM set up and the hardware is: facts the model takes as given.

    ``ram`` holds the [start, end) guest-physical ranges with memory behind them (KVM's
    memslots); ``cpuid_table`` the VMM's CPUID table (KVM_SET_CPUID2), by (function,
    index); ``c_bit`` the host's C-bit position (CPUID 0x8000001F EBX[5:0]).
    """

    era: str
    ram: tuple[tuple[int, int], ...]
    cpuid_table: Mapping[tuple[int, int], tuple[int, int, int, int]]
    c_bit: int
    vcpu_id: int = 0

    @property
    def newest(self) -> bool:
        return self.era == NEWEST

    @property
    def ghcb_version(self) -> int:
        """§4: KVM_SEV_INIT2's default is 2; 5.11 knew version 1 only."""
        return 2 if self.newest else 1

    def is_ram(self, gpa: int, length: int) -> bool:
        """Whether every byte of [gpa, gpa + length) is guest memory (0 bytes always are)."""
        end = gpa + length
        for start, stop in sorted(self.ram):
            if gpa >= end:
                break
            if start <= gpa < stop:
                gpa = stop
        return gpa >= end

    def cpuid(self, function: int, index: int) -> tuple[int, int, int, int] | _Unspecified:
        """The table's leaf, where the table alone decides it."""
        leaf = self.cpuid_table.get((function, index))
        if leaf is None or function in _RUNTIME_LEAVES:
            return ANY
        return leaf


@define
class State:
    """What KVM remembers between exits that the model needs: the VM's AP jump table."""

    jump_table: int = 0


# -- the GHCB MSR protocol (§4) ----------------------------------------------------------------


def msr_protocol(env: Env, value: int) -> Expected:
    """A VMGEXIT with GHCBInfo (bits 11:0) non-zero: an MSR-protocol request."""
    code = value & 0xFFF
    same = Masked(value)
    if code == GhcbMsr.SEV_INFO_REQ:
        version = env.ghcb_version
        reply = version << 48 | 1 << 32 | env.c_bit << 24 | GhcbMsr.SEV_INFO_RESP
        return Expected(RESUME, Masked(reply), "§4 SEV_INFO: max, min 1, C-bit, 0x001")
    if code == GhcbMsr.CPUID_REQ:
        kept = value & 0xFFFF_F000 | GhcbMsr.CPUID_RESP  # bits 31:12 keep the request
        leaf = env.cpuid(value >> 32, 0)
        rule = "§4 CPUID: [63:32] = the register of leaf (fn, 0), bits 31:12 kept, 0x005"
        if isinstance(leaf, _Unspecified):
            return Expected(RESUME, Masked(kept, 0xFFFF_FFFF), rule)
        return Expected(RESUME, Masked(leaf[value >> 30 & 3] << 32 | kept), rule)
    if not env.newest:
        return Expected(Errno("EINVAL"), same, "§4 v5.11: any other request fails KVM_RUN")
    if code == GhcbMsr.AP_RESET_HOLD_REQ:
        return Expected(ResetHold(), Masked(GhcbMsr.AP_RESET_HOLD_RESP),
                        "§4/§6 AP_RESET_HOLD: park; result 0, code 0x007")  # fmt: skip
    if code == GhcbMsr.HV_FT_REQ:
        return Expected(RESUME, Masked(HV_FEATURES << 12 | GhcbMsr.HV_FT_RESP),
                        "§4 HV_FT: [63:12] = 0x3, code 0x081")  # fmt: skip
    if code in _SNP_MSR_REQUESTS:
        return Expected(Terminate(value), same, "§4 SNP request from a non-SNP guest: terminate")
    if code == GhcbMsr.TERM_REQ:
        return Expected(Terminate(value), same, "§4 TERM_REQ: SEV_TERM, data[0] = the MSR")
    return Expected(RESUME, same, "§4 unknown request: MSR unchanged, resume")


# -- GHCB-page VMGEXITs (§1, §2, §3) -------------------------------------------------------------


@frozen
class _Action:
    """What a handler does beyond the success reply (0, 0) written before it runs."""

    end: End = RESUME
    reply: frozenset[tuple[int, int]] = frozenset({(0, 0)})
    regs: Mapping[str, RegValue] = field(factory=dict)
    scratch: tuple[int, int] | None = None
    event: Event = None


def _bad_input(error: GhcbErr) -> _Action:
    """§2 ``svm_vmgexit_bad_input``: info_1 = 2, info_2 = the GHCB_ERR_* code."""
    return _Action(reply=frozenset({(GhcbResp.MALFORMED_INPUT, error)}))


def _scratch(env: Env, page: Ghcb, ghcb_gpa: int, length: int, sync: bool) -> _Action:
    """§2 ``setup_vmgexit_scratch``: the area is fine (nothing more to say, or the
    in-page bytes KVM fills), refused (newest: INVALID_SCRATCH_AREA; 5.11: -EINVAL) or
    unreadable (newest: -EFAULT; 5.11: -EINVAL)."""
    gpa = page.get_if_valid("sw_scratch") if env.newest else page["sw_scratch"]
    end = gpa + length
    inside = gpa & ~0xFFF == ghcb_gpa
    low, high = SHARED_BUFFER
    bad = (gpa == 0 or end > U64
           or (inside and (gpa < ghcb_gpa + low or end > ghcb_gpa + high))
           or (not inside and length > SCRATCH_LIMIT))  # fmt: skip
    if bad:
        if env.newest:
            return _bad_input(GhcbErr.INVALID_SCRATCH_AREA)
        return _Action(end=Errno("EINVAL"))
    if not inside and not env.is_ram(gpa, length):
        return _Action(end=Errno("EFAULT" if env.newest else "EINVAL"))
    # In the page, KVM fills the area in place; a copy elsewhere goes back to the guest
    # at the next entry, before RAX..RDX are written, over whatever part of the GHCB
    # page it covers.
    start, stop = max(gpa, ghcb_gpa), min(end, ghcb_gpa + PAGE_SIZE)
    if not sync or start >= stop:
        return _Action()
    return _Action(scratch=(start - ghcb_gpa, stop - ghcb_gpa))


def _ioio(env: Env, state: State, page: Ghcb, gpa: int) -> _Action:
    """§1.2 IOIO: a plain IN returns device data in RAX; a string moves ``count``
    elements of ``size`` bytes through the scratch area (5.11 sized it in bytes)."""
    info1, count = page["sw_exit_info_1"], page["sw_exit_info_2"]
    is_in, size = bool(info1 & IOIO_TYPE_IN), IoioInfo.decode(info1).size
    if not info1 & IOIO_STR:
        return _Action(regs={"rax": ANY} if is_in else {})
    if count > INT_MAX or count * size > INT_MAX:
        return _Action(end=Errno("EINVAL"))
    return _scratch(env, page, gpa, count * size if env.newest else count, sync=is_in)


def _mmio(sync: bool) -> Callable[[Env, State, Ghcb, int], _Action]:
    """§1.2 MMIO_READ / MMIO_WRITE: ``sw_exit_info_2`` bytes through the scratch area."""

    def act(env: Env, state: State, page: Ghcb, gpa: int) -> _Action:
        return _scratch(env, page, gpa, page["sw_exit_info_2"], sync)

    return act


def _cpuid(env: Env, state: State, page: Ghcb, gpa: int) -> _Action:
    """§1.2 CPUID: RAX..RDX from the table for (EAX, ECX)."""
    leaf = env.cpuid(page["rax"] & 0xFFFF_FFFF, page["rcx"] & 0xFFFF_FFFF)
    values = (ANY,) * 4 if isinstance(leaf, _Unspecified) else leaf
    return _Action(regs=dict(zip(("rax", "rbx", "rcx", "rdx"), values, strict=True)))


def _msr(env: Env, state: State, page: Ghcb, gpa: int) -> _Action:
    """§1.2 MSR: a read returns RAX/RDX; either may fail with the #GP reply."""
    replies = frozenset({(0, 0), (GhcbResp.ISSUE_EXCEPTION, event_inj(GP))})
    write = page["sw_exit_info_1"] != 0
    return _Action(reply=replies, regs={} if write else {"rax": ANY, "rdx": ANY})


def _ap_jump_table(env: Env, state: State, page: Ghcb, gpa: int) -> _Action:
    """§6: subcode 0 stores info_2 for the VM, 1 returns it; others are errors (§2)."""
    subcode = page["sw_exit_info_1"]
    if subcode == 0:
        state.jump_table = page["sw_exit_info_2"]
        return _Action()
    if subcode == 1:
        return _Action(reply=frozenset({(0, state.jump_table)}))
    if env.newest:
        return _bad_input(GhcbErr.INVALID_INPUT)
    return _Action(reply=frozenset({(GhcbResp.ISSUE_EXCEPTION, event_inj(UD))}))


def _rdtscp(env: Env, state: State, page: Ghcb, gpa: int) -> _Action:
    """§1.2: #UD through EVENTINJ since 5.13; 5.11 had no handler (internal error)."""
    if env.newest:
        return _Action(event=UD)
    return _Action(end=Internal((SvmExit.RDTSCP, env.vcpu_id)))


def _rdtsc(env: Env, state: State, page: Ghcb, gpa: int) -> _Action:
    """§1.2: KVM never intercepts RDTSC, so no handler: an internal error."""
    return _Action(end=Internal((SvmExit.RDTSC, env.vcpu_id)))


def _term_request(env: Env, state: State, page: Ghcb, gpa: int) -> _Action:
    """§1.2 TERM_REQUEST: SEV_TERM with the GHCB's GPA as data[0]."""
    return _Action(end=Terminate(gpa))


def _fixed(action: _Action) -> Callable[[Env, State, Ghcb, int], _Action]:
    """A handler whose action does not depend on the request."""
    return lambda env, state, page, gpa: action


def _needs(*names: str) -> Callable[[Ghcb], tuple[str, ...]]:
    return lambda page: names


def _cpuid_needs(page: Ghcb) -> tuple[str, ...]:
    """§1.2: XCR0 too when RAX (the whole register) is 0xD."""
    return ("rax", "rcx", "xcr0") if page["rax"] == 0xD else ("rax", "rcx")


def _ioio_needs(page: Ghcb) -> tuple[str, ...]:
    """§1.2: a string needs sw_scratch, a plain OUT needs RAX."""
    info1 = page["sw_exit_info_1"]
    if info1 & IOIO_STR:
        return ("sw_scratch",)
    return () if info1 & IOIO_TYPE_IN else ("rax",)


def _msr_needs(page: Ghcb) -> tuple[str, ...]:
    """§1.2: RCX, and RAX and RDX for a write (sw_exit_info_1 non-zero)."""
    return ("rcx", "rax", "rdx") if page["sw_exit_info_1"] else ("rcx",)


@frozen
class _Row:
    needs: Callable[[Ghcb], tuple[str, ...]]
    act: Callable[[Env, State, Ghcb, int], _Action]
    eras: frozenset[str] = frozenset(ERAS)


_NOP = _fixed(_Action())
_HV_FEATURES_REPLY = _Action(reply=frozenset({(0, HV_FEATURES)}))
_NEWEST_ONLY = frozenset({NEWEST})
#: §1.2, row by row: the extra valid bits each code needs, and what KVM does.
_ROWS: dict[int, _Row] = {
    SvmExit.READ_DR7: _Row(_needs(), _NOP),
    SvmExit.WRITE_DR7: _Row(_needs("rax"), _NOP),
    SvmExit.RDTSC: _Row(_needs(), _rdtsc),
    SvmExit.RDPMC: _Row(_needs("rcx"), _fixed(_Action(regs={"rax": ANY, "rdx": ANY}, event=ANY))),
    SvmExit.CPUID: _Row(_cpuid_needs, _cpuid),
    SvmExit.INVD: _Row(_needs(), _NOP),
    SvmExit.IOIO: _Row(_ioio_needs, _ioio),
    SvmExit.MSR: _Row(_msr_needs, _msr),
    SvmExit.VMMCALL: _Row(_needs("rax", "cpl"), _fixed(_Action(regs={"rax": ANY}))),
    SvmExit.RDTSCP: _Row(_needs(), _rdtscp),
    SvmExit.WBINVD: _Row(_needs(), _NOP),
    SvmExit.MONITOR: _Row(_needs("rax", "rcx", "rdx"), _NOP),
    SvmExit.MWAIT: _Row(_needs("rax", "rcx"), _NOP),
    VmgExit.MMIO_READ: _Row(_needs("sw_scratch"), _mmio(sync=True)),
    VmgExit.MMIO_WRITE: _Row(_needs("sw_scratch"), _mmio(sync=False)),
    VmgExit.NMI_COMPLETE: _Row(_needs(), _NOP),
    VmgExit.AP_HLT_LOOP: _Row(_needs(), _fixed(_Action(end=ResetHold()))),
    VmgExit.AP_JUMP_TABLE: _Row(_needs(), _ap_jump_table),
    VmgExit.HV_FEATURES: _Row(_needs(), _fixed(_HV_FEATURES_REPLY), _NEWEST_ONLY),
    VmgExit.TERM_REQUEST: _Row(_needs(), _term_request, _NEWEST_ONLY),
    VmgExit.UNSUPPORTED_EVENT: _Row(_needs(), _fixed(_Action(end=Errno("EINVAL")))),
}


def _validate(env: Env, page: Ghcb, code: int) -> tuple[_Row | None, GhcbErr | None]:
    """§1.1 and §2 ``sev_es_validate_vmgexit``: usage, the three sw_* bits, the code,
    the code's own bits, in that order."""
    if page["ghcb_usage"] != 0:
        return None, GhcbErr.INVALID_USAGE
    if not all(page.is_valid(name) for name in _SW_FIELDS):
        return None, GhcbErr.MISSING_INPUT
    row = _ROWS.get(code)
    if row is None or env.era not in row.eras:
        snp = env.newest and code in _SNP_CODES
        return None, GhcbErr.MISSING_INPUT if snp else GhcbErr.INVALID_EVENT
    if not all(page.is_valid(name) for name in row.needs(page)):
        return None, GhcbErr.MISSING_INPUT
    return row, None


def vmgexit(env: Env, state: State, gpa: int, page: Ghcb) -> Expected:
    """A VMGEXIT with the GHCB MSR holding ``gpa`` (GHCBInfo 0) and ``page`` there."""
    msr = Masked(gpa)
    if gpa == 0 or not env.is_ram(gpa, 4096):
        if env.newest:
            return Expected(RESUME, msr, "§1.1 GPA 0 or unmappable: resume, write nothing")
        return Expected(Errno("EINVAL"), msr, "§1.1 v5.11 GPA 0 or unmappable: -EINVAL")
    # §3 sev_es_sync_from_ghcb: every GPR zeroed, the valid ones taken from the page.
    synced: dict[str, RegValue] = {name: page.get_if_valid(name) for name in SYNCED_OUT}
    code = page["sw_exit_code"]
    row, error = _validate(env, page, code)
    if error is not None and not env.newest:
        # §2 v5.11: internal error data [exit code (0 for a bad usage), vCPU], then
        # -EINVAL; no reply; validation ran before the sync, so the GPRs written back
        # at the next entry are stale and the guest's valid bits stay.
        data = (0 if error is GhcbErr.INVALID_USAGE else code, env.vcpu_id)
        return Expected(Errno("EINVAL", data), msr, f"§2 v5.11 {error.name}: fail-stop",
                        regs=dict.fromkeys(SYNCED_OUT, ANY),
                        bitmap=Masked(page.valid_bitmap | _REG_BITS, _BITMAP_MASK))  # fmt: skip
    if error is not None:
        action, rule = _bad_input(error), f"§2 {error.name}: reply (2, {error.value})"
    else:
        assert row is not None
        action, rule = row.act(env, state, page, gpa), f"§1.2 {code:#x}"
    reply: frozenset[tuple[int, int]] | _Unspecified = action.reply
    bitmap = Masked(RETURNED_BITMAP, _BITMAP_MASK)
    if action.scratch is not None:
        start, stop = action.scratch
        if start < _INFO_AT[1] and _INFO_AT[0] < stop:
            reply = ANY  # the reply is written first, the copy-back lands on it
        covered = sum(0xFF << 8 * (i - _BITMAP_AT) for i in range(start, stop)
                      if _BITMAP_AT <= i < _BITMAP_AT + 16)  # fmt: skip
        # ghcb_set_* sets the registers' bits on whatever the copy-back left there.
        bitmap = Masked(RETURNED_BITMAP, _BITMAP_MASK & ~covered | _REG_BITS)
    return Expected(action.end, msr, rule, reply=reply, regs={**synced, **action.regs},
                    bitmap=bitmap, scratch=action.scratch, event=action.event)  # fmt: skip


def expect(env: Env, state: State, msr: int, page: bytes) -> Expected:
    """What KVM must do when the guest executes VMGEXIT with the GHCB MSR at ``msr``;
    ``page`` is what the page at that GPA holds when GHCBInfo is 0."""
    if msr & 0xFFF:
        return msr_protocol(env, msr)
    return vmgexit(env, state, msr, Ghcb(page))
