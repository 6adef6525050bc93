"""The kvm side of a GHCB VMGEXIT, newest era (REFERENCE.md sections 1-4, 10 and 12).

Every test plays the hardware with :class:`sevsim.testing.ExitDriver`: the guest's
GHCB page goes in, the GHCB as the guest finds it at its next VMRUN (and the KVM
exit, if any) comes out. No guest CPU runs. The 5.11 fail-stop era is in
``test_vmgexit_era.py``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sevsim.arch.exits import SVM_EXIT_SW, GhcbErr, GhcbResp, SvmExit, VmgExit
from sevsim.arch.ghcb import REGISTER_FIELDS, Ghcb, valid_bit
from sevsim.arch.ghcb_msr import GhcbMsr, cpuid_req, term_req
from sevsim.arch.vmcb import VMCB_CONTROL, EventInj
from sevsim.guest.image import GHCB_GPA
from sevsim.kvm import outcome as O
from sevsim.kvm.context import ExitContext
from sevsim.kvm.dispatch import ExitHandler, ExitKind, ExitTable
from sevsim.kvm.exits import InternalError, InternalErrorSub, KvmExit, RunFailed, SystemEvent
from sevsim.kvm.exits import SystemEventType as SysEv
from sevsim.kvm.ghcb_map import MappedGhcb
from sevsim.kvm.scratch import Scratch, setup_scratch
from sevsim.testing import Delivered, ExitDriver, isolated_host
from sevsim.vmm.machine import MMIO_TEST_GPA

GHCB = GHCB_GPA
SHARED = GHCB + 0x800  # the GHCB's shared buffer, 0x800..0xff0
OUTSIDE = 0x9000  # guest RAM outside the GHCB page
UNCLAIMED_MMIO = 0xE000_0000
#: A software exit code no built-in handler owns, for recording handlers.
SW_CODE = SVM_EXIT_SW + 1
PLUGINS = ("msr_protocol", "ioio", "mmio", "apboot", "nmi")
MALFORMED = GhcbResp.MALFORMED_INPUT
#: The valid bits KVM sets in the page it hands back: rax, rcx, rdx, rbx, info_1, info_2.
RETURNED_BITS = {63, 97, 98, 99, 115, 116}
U64 = (1 << 64) - 1

#: sw_exit_info_1 of an IOIO exit: port, 1-byte data, 64-bit addresses.
IOIO_OUT_POST = 0x80 << 16 | 1 << 4 | 4 << 7
IOIO_IN_DEBUG = 0x402 << 16 | 1 << 4 | 4 << 7 | 1
IOIO_STR = 1 << 2


# -- helpers ------------------------------------------------------------------------------


def page(code: int, info1: int = 0, info2: int = 0, **fields: int) -> Ghcb:
    """A GHCB as a well-behaved guest fills it: the three sw_* fields plus ``fields``."""
    g = Ghcb()
    g["sw_exit_code"], g["sw_exit_info_1"], g["sw_exit_info_2"] = code, info1, info2
    for name, value in fields.items():
        g[name] = value
    return g


def without(g: Ghcb, *names: str) -> Ghcb:
    """``g`` with the valid bits of ``names`` cleared (the values stay in the page)."""
    for name in names:
        g.set_valid(name, False)
    return g


def reply(d: Delivered) -> tuple[int, int]:
    assert d.ghcb is not None
    return d.ghcb["sw_exit_info_1"], d.ghcb["sw_exit_info_2"]


def bits(bitmap: int) -> set[int]:
    return {i for i in range(128) if bitmap >> i & 1}


def core(**vm_args: Any) -> ExitDriver:
    """kvm with its own rows only (the svm_intercepts and ghcb_protocol plugins)."""
    return ExitDriver(isolated_host().start(), **vm_args)


def full(**vm_args: Any) -> ExitDriver:
    """kvm with the built-in msr_protocol, ioio and mmio plugins."""
    return ExitDriver(isolated_host(enable=PLUGINS).start(), **vm_args)


def recording(
    act: Callable[[ExitContext], O.Outcome | None] | None = None,
    code: int = SW_CODE,
    requires: tuple[str, ...] = (),
    **vm_args: Any,
) -> tuple[ExitDriver, list[dict[str, Any]]]:
    """A driver whose table has one handler for ``code`` that records what it saw."""
    seen: list[dict[str, Any]] = []

    def handler(ctx: ExitContext) -> O.Outcome | None:
        assert ctx.ghcb is not None
        seen.append({
            "regs": dict(ctx.regs), "cpl": ctx.vcpu.cpl, "xcr0": ctx.vcpu.xcr0,
            "exit_info": (ctx.exit_info_1, ctx.exit_info_2),
            "ghcb_info": (ctx.ghcb["sw_exit_info_1"], ctx.ghcb["sw_exit_info_2"]),
            "bitmap": ctx.ghcb.valid_bitmap,
        })  # fmt: skip
        return act(ctx) if act is not None else None

    table = ExitTable([ExitHandler(ExitKind.VMGEXIT, code, handler, requires)])
    return ExitDriver(table, **vm_args), seen


def handle_only(d: ExitDriver, g: Ghcb, ghcb_gpa: int = GHCB) -> O.Outcome:
    """The #VMEXIT half of a VMGEXIT: kvm handles it; the next VMRUN has not happened.

    ``d.vcpu.prepare_switch_to_guest()`` is the other half.
    """
    d.vm.memory.write(ghcb_gpa, g.raw)
    VMCB_CONTROL.set(d.vcpu.vmcb, "exit_code", SvmExit.VMGEXIT)
    VMCB_CONTROL.set(d.vcpu.vmcb, "exit_code_hi", 0)
    VMCB_CONTROL.set(d.vcpu.vmcb, "ghcb_gpa", ghcb_gpa)
    return d.vcpu.handle_exit()


def deliver_gpa(d: ExitDriver, gpa: int) -> Delivered:
    """VMGEXIT with the GHCB MSR holding ``gpa`` (GHCBInfo 0: a GHCB page GPA)."""
    return d.msr_protocol(gpa)  # delivers whatever value the MSR holds


def vmcb(d: ExitDriver, name: str) -> int:
    return VMCB_CONTROL.get(d.vcpu.vmcb, name)


def le(text: bytes) -> int:
    return int.from_bytes(text, "little")


# -- 1. entry: GHCB GPA and ghcb_usage ------------------------------------------------------


def test_ghcb_gpa_zero_resumes_and_writes_nothing():
    d, seen = recording()
    g = page(SW_CODE, 0x1111, 0x2222, rax=5)
    d.vm.memory.write(0, bytes(0x1000))
    out = d.vmgexit(g, ghcb_gpa=0)
    assert out.exit is None and out.msr == 0
    assert out.ghcb is not None and out.ghcb.raw == g.raw  # not even the info fields
    assert seen == []


@pytest.mark.parametrize("gpa", [0x4000_0000, MMIO_TEST_GPA], ids=["beyond_ram", "mmio_hole"])
def test_unmappable_ghcb_gpa_resumes_and_writes_nothing(gpa):
    d, seen = recording()
    out = deliver_gpa(d, gpa)
    assert out.exit is None and out.msr == gpa and seen == []


@pytest.mark.parametrize("usage", [1, 0xFFFF_FFFF])
def test_ghcb_usage_not_zero_is_invalid_usage(usage):
    g = page(SvmExit.CPUID, rax=0, rcx=0)
    g["ghcb_usage"] = usage
    out = core().vmgexit(g)
    assert out.exit is None
    assert reply(out) == (MALFORMED, GhcbErr.INVALID_USAGE) == (2, 2)


def test_ghcb_usage_is_checked_before_the_valid_bits():
    g = without(page(SvmExit.CPUID, rax=0, rcx=0), "sw_exit_code", "sw_exit_info_1")
    g["ghcb_usage"] = 1
    assert reply(core().vmgexit(g)) == (2, GhcbErr.INVALID_USAGE)


def test_protocol_version_is_never_read():
    g = page(SvmExit.CPUID, rax=0, rcx=0)
    g["protocol_version"] = 0xFFFF
    out = core().vmgexit(g)
    assert reply(out) == (0, 0) and out.ghcb is not None and out.ghcb["rax"] == 0xD


# -- 2./3. the three sw_* fields and the exit code --------------------------------------------


@pytest.mark.parametrize("field", ["sw_exit_code", "sw_exit_info_1", "sw_exit_info_2"])
def test_missing_sw_field_valid_bit_is_missing_input(field):
    d, seen = recording()
    out = d.vmgexit(without(page(SW_CODE), field))
    assert out.exit is None and seen == []
    assert reply(out) == (MALFORMED, GhcbErr.MISSING_INPUT) == (2, 4)


@pytest.mark.parametrize(
    "code",
    [SvmExit.XSETBV, SvmExit.HLT, 0x8000_0F00, SvmExit.CR0_WRITE_TRAP, SvmExit.NPF,
     SvmExit.VMGEXIT, SVM_EXIT_SW, 1 << 32 | SvmExit.CPUID],
    ids=hex,
)  # fmt: skip
def test_unknown_exit_code_is_invalid_event(code):
    out = full().vmgexit(page(code, rax=0, rcx=0))
    assert out.exit is None
    assert reply(out) == (MALFORMED, GhcbErr.INVALID_EVENT) == (2, 6)


@pytest.mark.parametrize(
    "code",
    [VmgExit.PSC, VmgExit.GUEST_REQUEST, VmgExit.EXT_GUEST_REQUEST, VmgExit.AP_CREATION],
    ids=hex,
)
def test_snp_only_code_from_an_sev_es_guest_is_missing_input(code):
    g = page(code, GHCB, GHCB + 0x1000, rax=0, sw_scratch=SHARED)  # what SNP would need
    out = full().vmgexit(g)
    assert out.exit is None
    assert reply(out) == (MALFORMED, GhcbErr.MISSING_INPUT)


# -- 4. sev_es_sync_from_ghcb ---------------------------------------------------------------

SYNCED_IN = ("rax", "rbx", "rcx", "rdx", "rsi")
NOT_SYNCED = ("rsp", "rbp", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip")


def test_sync_from_ghcb_takes_valid_rax_rbx_rcx_rdx_rsi_and_zeroes_every_other_gpr():
    d, seen = recording()
    values = {name: 0x1000 + i for i, name in enumerate(SYNCED_IN + NOT_SYNCED)}
    d.vmgexit(page(SW_CODE, **values))  # rdi, r8, rip, ... are valid but never synced
    regs = seen[0]["regs"]
    assert {n: regs[n] for n in SYNCED_IN} == {n: values[n] for n in SYNCED_IN}
    assert {n: regs[n] for n in NOT_SYNCED} == dict.fromkeys(NOT_SYNCED, 0)


@pytest.mark.parametrize("name", SYNCED_IN)
def test_sync_from_ghcb_takes_a_gpr_only_with_its_valid_bit(name):
    d, seen = recording()
    d.vmgexit(page(SW_CODE, **{name: 0xABCD}))
    assert seen[0]["regs"] == {**dict.fromkeys(seen[0]["regs"], 0), name: 0xABCD}
    g = without(page(SW_CODE, **dict.fromkeys(SYNCED_IN, U64)), name)
    d.vmgexit(g)
    assert seen[1]["regs"][name] == 0


def test_sync_from_ghcb_zeroes_what_the_previous_exit_left():
    def scribble(ctx: ExitContext) -> None:
        ctx.regs.update(dict.fromkeys(ctx.regs, 0x77))

    d, seen = recording(scribble)
    d.vmgexit(page(SW_CODE, rax=1, rsi=2, cpl=3))
    d.vmgexit(page(SW_CODE))
    assert set(seen[1]["regs"].values()) == {0}
    assert seen[1]["cpl"] == 0


@pytest.mark.parametrize(("cpl", "valid", "seen_cpl"), [(3, True, 3), (0, True, 0), (3, False, 0)])
def test_cpl_comes_from_the_ghcb_if_valid_else_zero(cpl, valid, seen_cpl):
    d, seen = recording()
    g = page(SW_CODE, cpl=cpl)
    g.set_valid("cpl", valid)
    d.vmgexit(g)
    assert seen[0]["cpl"] == seen_cpl == d.vcpu.cpl


def test_xcr0_is_taken_only_when_valid():
    d, seen = recording()
    d.vmgexit(page(SW_CODE, xcr0=7))
    d.vmgexit(without(page(SW_CODE, xcr0=3), "xcr0"))
    assert [s["xcr0"] for s in seen] == [7, 7]


def test_handler_finds_the_guest_valid_bitmap_cleared():
    d, seen = recording()
    d.vmgexit(page(SW_CODE, rax=1, rdi=2, xcr0=1, cpl=0, sw_scratch=SHARED))
    # Only the info fields svm_vmgexit_success wrote are valid by the time it runs.
    assert bits(seen[0]["bitmap"]) == {valid_bit("sw_exit_info_1"), valid_bit("sw_exit_info_2")}


def test_vmcb_exit_info_is_copied_from_the_ghcb_regardless_of_valid_bits():
    d = core()
    d.vmgexit(without(page(SvmExit.CPUID, 0x1234, 0x5678, rax=0, rcx=0), "sw_exit_info_1"))
    assert (vmcb(d, "exit_info_1"), vmcb(d, "exit_info_2")) == (0x1234, 0x5678)




@pytest.mark.parametrize("code", [SvmExit.CPUID, 1 << 32 | SvmExit.CPUID], ids=hex)
def test_vmcb_exit_code_is_set_from_sw_exit_code(code):
    d = core()
    d.vmgexit(page(code, rax=0, rcx=0))
    assert (vmcb(d, "exit_code"), vmcb(d, "exit_code_hi")) == (code & 0xFFFF_FFFF, code >> 32)


# -- 5. success info written before dispatch --------------------------------------------------


def test_success_info_is_written_before_the_handler_runs():
    d, seen = recording()
    out = d.vmgexit(page(SW_CODE, 0xDEAD, 0xBEEF))
    assert seen[0]["ghcb_info"] == (0, 0)
    assert seen[0]["exit_info"] == (0xDEAD, 0xBEEF)  # the request, as the guest sent it
    assert reply(out) == (0, 0)


def test_success_info_stays_when_the_handler_exits_to_userspace():
    out = core().vmgexit(page(SvmExit.RDTSC, 0xDEAD, 0xBEEF))
    assert isinstance(out.exit, InternalError)
    assert reply(out) == (0, 0)


# -- 6. sev_es_sync_to_ghcb -----------------------------------------------------------------


def test_returned_bit_indexes_are_the_field_offsets_over_8():
    names = ("rax", "rcx", "rdx", "rbx", "sw_exit_info_1", "sw_exit_info_2")
    assert {valid_bit(n) for n in names} == RETURNED_BITS


EVERY_FIELD = {name: 0 for name in REGISTER_FIELDS if name not in ("sw_exit_code",)}

BITMAP_CASES = {
    "cpuid": page(SvmExit.CPUID, rax=0, rcx=0),
    "invd_no_outputs": page(SvmExit.INVD),
    "every_field_valid": page(SvmExit.WBINVD, **EVERY_FIELD),
    "unknown_code": page(SvmExit.XSETBV, rax=1, rcx=0, rdx=0, xcr0=7),
    "missing_input": without(page(SvmExit.CPUID, rax=1, rdi=1, r8=1), "rcx"),
    "bad_usage": page(SvmExit.CPUID, rax=0, rcx=0),
    "msr_gp": page(SvmExit.MSR, 0, 0, rcx=0x1234),
    "rdtsc_internal_error": page(SvmExit.RDTSC, rsi=1),
    "mmio_read": page(VmgExit.MMIO_READ, MMIO_TEST_GPA, 8, sw_scratch=SHARED),
}
BITMAP_CASES["bad_usage"]["ghcb_usage"] = 1


@pytest.mark.parametrize("name", BITMAP_CASES)
def test_returned_bitmap_is_exactly_rax_rbx_rcx_rdx_and_the_info_fields(name):
    g = BITMAP_CASES[name]
    assert g.valid_bitmap != 0
    out = full().vmgexit(Ghcb(g.raw))
    assert out.ghcb is not None and bits(out.ghcb.valid_bitmap) == RETURNED_BITS


def test_rax_to_rdx_go_back_unconditionally_and_nothing_else_does():
    values = {"rax": 0xA, "rbx": 0xB, "rcx": 0xC, "rdx": 0xD, "rsi": 0xE, "rdi": 0xF}
    out = core().vmgexit(page(SvmExit.INVD, **values))  # INVD produces no values
    assert out.ghcb is not None
    assert [out.ghcb[n] for n in ("rax", "rbx", "rcx", "rdx")] == [0xA, 0xB, 0xC, 0xD]
    assert not out.ghcb.is_valid("rsi") and not out.ghcb.is_valid("rdi")


def test_rax_to_rdx_the_guest_did_not_supply_go_back_as_zero():
    g = without(page(SvmExit.WBINVD, rax=U64, rbx=U64, rcx=U64, rdx=U64), "rax", "rbx", "rcx",
                "rdx")  # fmt: skip
    out = core().vmgexit(g)
    assert out.ghcb is not None
    assert [out.ghcb[n] for n in ("rax", "rbx", "rcx", "rdx")] == [0, 0, 0, 0]


def test_reply_is_in_the_page_at_once_registers_at_the_next_vmrun():
    """KVM writes the mapped page: the cleared bitmap and the reply are there when the
    exit is handled; sev_es_sync_to_ghcb adds RAX..RDX (and their bits) at entry."""
    d = core()
    g = page(SvmExit.CPUID, 0x11, 0x22, rax=0, rcx=0)
    assert handle_only(d, g) == O.RESUME
    now = Ghcb(d.vm.memory.read(GHCB, 0x1000))
    assert (now["sw_exit_info_1"], now["sw_exit_info_2"]) == (0, 0)
    assert bits(now.valid_bitmap) == {115, 116}  # cleared, then the info fields set
    assert now["rax"] == 0 and now["rbx"] == 0  # the result is not there yet
    d.vcpu.prepare_switch_to_guest()
    after = Ghcb(d.vm.memory.read(GHCB, 0x1000))
    assert after["rax"] == 0xD and bits(after.valid_bitmap) == RETURNED_BITS


def test_kvm_writes_only_the_fields_it_sets_into_the_page():
    """Bytes KVM does not write keep whatever is in the page by then: here what the
    VMM wrote into the shared buffer between the exit and the next entry."""
    d = core()
    g = page(SvmExit.CPUID, rax=0, rcx=0)
    g.raw[0x900:0x904] = b"gues"
    assert handle_only(d, g) == O.RESUME
    d.vm.memory.write(GHCB + 0x900, b"vmm!")
    d.vcpu.prepare_switch_to_guest()
    after = Ghcb(d.vm.memory.read(GHCB, 0x1000))
    assert after.raw[0x900:0x904] == b"vmm!" and after["rax"] == 0xD


def test_a_copied_scratch_area_overlapping_the_ghcb_page_is_written_back_intact():
    """KVM only checks where a scratch area starts: one starting 8 bytes below the GHCB
    is copied, and its write-back into the page is not undone by the GHCB's own."""
    d = full()
    d.devices.mmio_test.buffer[:16] = bytes(range(1, 17))
    out = d.vmgexit(page(VmgExit.MMIO_READ, MMIO_TEST_GPA + 0x100, 16, sw_scratch=GHCB - 8))
    assert reply(out) == (0, 0)
    assert d.vm.memory.read(GHCB - 8, 16) == bytes(range(1, 17))  # the device's bytes


# -- 7. the reused SVM intercepts and the plugins: valid bits per exit code -------------------

#: (id, code, info1, info2, fields of a complete request, the valid bits it needs)
REQUESTS = [
    ("read_dr7", SvmExit.READ_DR7, 0, 0, {}, ()),
    ("write_dr7", SvmExit.WRITE_DR7, 0, 0, {"rax": 0x400}, ("rax",)),
    ("rdtsc", SvmExit.RDTSC, 0, 0, {}, ()),
    ("rdpmc", SvmExit.RDPMC, 0, 0, {"rcx": 0}, ("rcx",)),
    ("cpuid", SvmExit.CPUID, 0, 0, {"rax": 1, "rcx": 0}, ("rax", "rcx")),
    ("cpuid_0xd", SvmExit.CPUID, 0, 0, {"rax": 0xD, "rcx": 0, "xcr0": 1}, ("rax", "rcx", "xcr0")),
    ("cpuid_0xd_1", SvmExit.CPUID, 0, 0, {"rax": 0xD, "rcx": 1, "xcr0": 1},
     ("rax", "rcx", "xcr0")),
    ("invd", SvmExit.INVD, 0, 0, {}, ()),
    ("out", SvmExit.IOIO, IOIO_OUT_POST, 0, {"rax": 0x11}, ("rax",)),
    ("in", SvmExit.IOIO, IOIO_IN_DEBUG, 0, {}, ()),
    ("outs", SvmExit.IOIO, IOIO_OUT_POST | IOIO_STR, 1, {"sw_scratch": SHARED}, ("sw_scratch",)),
    ("ins", SvmExit.IOIO, IOIO_IN_DEBUG | IOIO_STR, 1, {"sw_scratch": SHARED}, ("sw_scratch",)),
    ("rdmsr", SvmExit.MSR, 0, 0, {"rcx": 0x1A0}, ("rcx",)),
    ("wrmsr", SvmExit.MSR, 1, 0, {"rcx": 0x2FF, "rax": 6, "rdx": 0}, ("rcx", "rax", "rdx")),
    ("vmmcall", SvmExit.VMMCALL, 0, 0, {"rax": 1, "cpl": 0}, ("rax", "cpl")),
    ("rdtscp", SvmExit.RDTSCP, 0, 0, {}, ()),
    ("wbinvd", SvmExit.WBINVD, 0, 0, {}, ()),
    ("monitor", SvmExit.MONITOR, 0, 0, {"rax": 0x1000, "rcx": 0, "rdx": 0},
     ("rax", "rcx", "rdx")),
    ("mwait", SvmExit.MWAIT, 0, 0, {"rax": 0, "rcx": 0}, ("rax", "rcx")),
    ("mmio_read", VmgExit.MMIO_READ, MMIO_TEST_GPA, 8, {"sw_scratch": SHARED}, ("sw_scratch",)),
    ("mmio_write", VmgExit.MMIO_WRITE, MMIO_TEST_GPA + 8, 8, {"sw_scratch": SHARED},
     ("sw_scratch",)),
    ("nmi_complete", VmgExit.NMI_COMPLETE, 0, 0, {}, ()),
    ("ap_hlt_loop", VmgExit.AP_HLT_LOOP, 0, 0, {}, ()),
    ("ap_jump_table_set", VmgExit.AP_JUMP_TABLE, 0, 0x9000, {}, ()),
    ("ap_jump_table_get", VmgExit.AP_JUMP_TABLE, 1, 0, {}, ()),
    ("hv_features", VmgExit.HV_FEATURES, 0, 0, {}, ()),
]  # fmt: skip


@pytest.mark.parametrize(("code", "info1", "info2", "fields"),
                         [pytest.param(*r[1:5], id=r[0]) for r in REQUESTS])  # fmt: skip
def test_request_with_exactly_its_required_fields_is_accepted(code, info1, info2, fields):
    out = full().vmgexit(page(code, info1, info2, **fields))
    assert reply(out)[0] != MALFORMED


@pytest.mark.parametrize(
    ("code", "info1", "info2", "fields", "missing"),
    [pytest.param(*r[1:5], m, id=f"{r[0]}-{m}") for r in REQUESTS for m in r[5]],
)
def test_request_missing_a_required_valid_bit_is_missing_input(code, info1, info2, fields,
                                                               missing):  # fmt: skip
    out = full().vmgexit(without(page(code, info1, info2, **fields), missing))
    assert out.exit is None
    assert reply(out) == (MALFORMED, GhcbErr.MISSING_INPUT)


# -- 7. results, code by code -----------------------------------------------------------------


def out_regs(out: Delivered) -> tuple[int, int, int, int]:
    assert out.ghcb is not None
    return out.ghcb["rax"], out.ghcb["rbx"], out.ghcb["rcx"], out.ghcb["rdx"]


def test_cpuid_0_returns_the_max_leaf_and_the_vendor():
    out = core().vmgexit(page(SvmExit.CPUID, rax=0, rcx=0))
    assert reply(out) == (0, 0)
    assert out_regs(out) == (0xD, le(b"Auth"), le(b"cAMD"), le(b"enti"))


def test_cpuid_0x8000001f_reports_sev_es_the_c_bit_and_the_asids():
    d = core()
    caps = d.vm.platform.caps
    out = d.vmgexit(page(SvmExit.CPUID, rax=0x8000_001F, rcx=0))
    # EAX: SEV (bit 1) | SEV-ES (bit 3); EBX[5:0] C-bit; ECX max_sev_asid; EDX min_sev_asid.
    assert out_regs(out) == (0b1010, caps.c_bit, caps.max_sev_asid, caps.min_sev_asid)
    assert out_regs(out) == (0xA, 51, 15, 5)


def test_cpuid_function_is_the_low_32_bits_of_rax():
    out = core().vmgexit(page(SvmExit.CPUID, rax=0xFFFF_FFFF_0000_0000, rcx=0xFFFF_FFFF_0000_0000))
    assert out_regs(out)[0] == 0xD


@pytest.mark.parametrize(("xcr0", "ebx"), [(0x1, 0x240), (0x3, 0x240), (0x7, 0x340)])
def test_cpuid_0xd_ebx_is_the_xsave_size_of_the_xcr0_the_guest_sent(xcr0, ebx):
    out = core().vmgexit(page(SvmExit.CPUID, rax=0xD, rcx=0, xcr0=xcr0))
    assert reply(out) == (0, 0)
    assert out_regs(out) == (0x7, ebx, 0x340, 0)


def test_cpuid_other_than_0xd_does_not_need_xcr0():
    out = core().vmgexit(page(SvmExit.CPUID, rax=1, rcx=0))
    assert reply(out) == (0, 0)




def test_cpuid_xcr0_requirement_looks_at_all_64_bits_of_rax():
    out = core().vmgexit(page(SvmExit.CPUID, rax=1 << 32 | 0xD, rcx=0))
    assert reply(out) == (0, 0)
    assert out_regs(out)[0] == 0x7  # still function 0xD: kvm_emulate_cpuid takes EAX


def test_rdmsr_returns_the_value_in_edx_eax():
    out = core().vmgexit(page(SvmExit.MSR, 0, 0, rcx=0x1A0))  # IA32_MISC_ENABLE
    assert reply(out) == (0, 0)
    assert (out_regs(out)[0], out_regs(out)[3]) == (1, 0)


def test_wrmsr_then_rdmsr_reads_back_edx_eax():
    d = core()
    out = d.vmgexit(page(SvmExit.MSR, 1, 0, rcx=0x2FF, rax=0xFFFF_FFFF_0000_0C06, rdx=0x1))
    assert reply(out) == (0, 0)
    out = d.vmgexit(page(SvmExit.MSR, 0, 0, rcx=0x2FF))
    assert reply(out) == (0, 0)
    assert (out_regs(out)[0], out_regs(out)[3]) == (0xC06, 0x1)


@pytest.mark.parametrize(
    ("info1", "fields"),
    [(0, {"rcx": 0x1234}), (1, {"rcx": 0x1234, "rax": 0, "rdx": 0}),
     (1, {"rcx": 0xFE, "rax": 0, "rdx": 0})],
    ids=["read_unknown", "write_unknown", "write_read_only"],
)  # fmt: skip
def test_failed_msr_access_replies_gp(info1, fields):
    out = core().vmgexit(page(SvmExit.MSR, info1, 0, **fields))
    assert out.exit is None
    assert reply(out) == (GhcbResp.ISSUE_EXCEPTION, 0x8000_030D) == (1, EventInj.exception(13))


@pytest.mark.parametrize(("nr", "cpl", "rax"), [(0x1234, 0, -1000 & U64), (1, 3, U64)],
                         ids=["unknown_nr", "cpl3"])  # fmt: skip
def test_vmmcall_result_in_rax(nr, cpl, rax):
    out = core().vmgexit(page(SvmExit.VMMCALL, rax=nr, cpl=cpl, rbx=2, rcx=3, rdx=4))
    assert reply(out) == (0, 0)
    assert out_regs(out) == (rax, 2, 3, 4)


def test_rdtsc_is_a_kvm_internal_error():
    out = core().vmgexit(page(SvmExit.RDTSC))
    assert isinstance(out.exit, InternalError)
    assert out.exit.suberror == InternalErrorSub.UNEXPECTED_EXIT_REASON == 4
    assert out.exit.data == (0x6E, 0)  # [exit code, last vCPU entry]


def test_hv_features_replies_the_feature_bitmap_in_info_2():
    out = core().vmgexit(page(VmgExit.HV_FEATURES))
    assert out.exit is None
    assert reply(out) == (0, 0x3)  # GHCB_HV_FT_SNP | GHCB_HV_FT_SNP_AP_CREATION


def test_term_request_ends_kvm_run_with_sev_term_carrying_the_ghcb_gpa():
    out = core().vmgexit(page(VmgExit.TERM_REQUEST, 1 | 4 << 4))  # set 1, code 4 (CPUID)
    assert out.exit == SystemEvent(SysEv.SEV_TERM, (GHCB,))


def test_unsupported_event_fails_kvm_run_with_einval():
    out = core().vmgexit(page(VmgExit.UNSUPPORTED_EVENT, 0x1D, 0x400))
    assert isinstance(out.exit, RunFailed) and out.exit.errno == "EINVAL"
    assert "exit_info_1 0x1d, exit_info_2 0x400" in out.exit.why


@pytest.mark.parametrize(
    "code",
    [VmgExit.HV_FEATURES, VmgExit.TERM_REQUEST, VmgExit.UNSUPPORTED_EVENT,
     VmgExit.NMI_COMPLETE, VmgExit.AP_HLT_LOOP, VmgExit.AP_JUMP_TABLE],
    ids=hex,
)  # fmt: skip
@pytest.mark.parametrize("field", ["sw_exit_code", "sw_exit_info_1", "sw_exit_info_2"])
def test_codes_without_extra_inputs_still_need_the_three_sw_fields(code, field):
    out = full().vmgexit(without(page(code), field))
    assert out.exit is None
    assert reply(out) == (MALFORMED, GhcbErr.MISSING_INPUT)


def test_rdpmc_counter_0_reads_zero():
    d = core()
    out = d.vmgexit(page(SvmExit.RDPMC, rcx=0, rax=U64, rdx=U64))
    assert reply(out) == (0, 0) and vmcb(d, "event_inj") == 0
    assert (out_regs(out)[0], out_regs(out)[3]) == (0, 0)




def test_rdpmc_bad_counter_injects_gp_through_eventinj():
    d = core()
    out = d.vmgexit(page(SvmExit.RDPMC, rcx=9))
    assert out.exit is None
    assert reply(out) == (0, 0)
    assert (vmcb(d, "event_inj"), vmcb(d, "event_inj_err")) == (EventInj.exception(13, 0), 0)
    assert EventInj.exception(13, 0) == 0x8000_0B0D




def test_rdtscp_injects_ud_through_eventinj():
    d = core()
    out = d.vmgexit(page(SvmExit.RDTSCP))
    assert out.exit is None
    assert reply(out) == (0, 0)
    assert (vmcb(d, "event_inj"), vmcb(d, "event_inj_err")) == (0x8000_0306, 0)


@pytest.mark.parametrize(("fields", "rax"), [({"rax": 0x1234}, 0x1234), ({}, 0)],
                         ids=["rax_supplied", "no_rax"])  # fmt: skip
def test_read_dr7_returns_rax_unchanged(fields, rax):
    out = core().vmgexit(page(SvmExit.READ_DR7, **fields))
    assert reply(out) == (0, 0) and out_regs(out)[0] == rax


@pytest.mark.parametrize(
    ("code", "fields"),
    [(SvmExit.WRITE_DR7, {"rax": 0x401}), (SvmExit.INVD, {}), (SvmExit.WBINVD, {}),
     (SvmExit.MONITOR, {"rax": 0x1000, "rcx": 0, "rdx": 0}),
     (SvmExit.MWAIT, {"rax": 0, "rcx": 0})],
    ids=["write_dr7", "invd", "wbinvd", "monitor", "mwait"],
)  # fmt: skip
def test_no_op_exits_succeed_and_hand_registers_back(code, fields):
    out = core().vmgexit(page(code, rbx=0x5, **fields))
    assert out.exit is None and reply(out) == (0, 0)
    assert out_regs(out) == (fields.get("rax", 0), 5, fields.get("rcx", 0), fields.get("rdx", 0))


def test_ioio_out_reaches_the_device_and_in_returns_rax():
    d = full()
    out = d.vmgexit(page(SvmExit.IOIO, IOIO_OUT_POST, 0, rax=0x1255))
    assert reply(out) == (0, 0) and d.devices.post.codes == [0x55]
    out = d.vmgexit(page(SvmExit.IOIO, IOIO_IN_DEBUG, 0))
    assert reply(out) == (0, 0) and out_regs(out)[0] == 0xE9


def test_mmio_read_and_write_through_the_shared_buffer():
    d = full()
    g = page(VmgExit.MMIO_WRITE, MMIO_TEST_GPA + 8, 8, sw_scratch=SHARED)
    g.raw[0x800:0x808] = (0x1122_3344_5566_7788).to_bytes(8, "little")
    assert reply(d.vmgexit(g)) == (0, 0)
    assert d.devices.mmio_test.scratch == 0x1122_3344_5566_7788
    out = d.vmgexit(page(VmgExit.MMIO_READ, MMIO_TEST_GPA, 4, sw_scratch=SHARED))
    assert reply(out) == (0, 0)
    assert out.ghcb is not None and out.ghcb.raw[0x800:0x804] == b"SVES"  # ID 0x53455653


# -- 8. the scratch area (setup_vmgexit_scratch) ----------------------------------------------


def mmio_read(d: ExitDriver, scratch: int, length: int, gpa: int = MMIO_TEST_GPA + 0x100):
    return d.vmgexit(page(VmgExit.MMIO_READ, gpa, length, sw_scratch=scratch))


def test_scratch_gpa_zero_is_invalid_scratch_area():
    out = mmio_read(full(), 0, 8)
    assert out.exit is None
    assert reply(out) == (MALFORMED, GhcbErr.INVALID_SCRATCH_AREA) == (2, 3)


@pytest.mark.parametrize(
    ("offset", "length", "ok"),
    [(0x800, 0x7F0, True), (0x800, 8, True), (0xFE8, 8, True), (0xFEF, 1, True),
     (0x800, 0x7F1, False), (0x7FF, 1, False), (0x000, 8, False), (0x7F8, 16, False),
     (0xFE9, 8, False), (0xFF0, 1, False), (0xFF8, 8, False)],
    ids=lambda v: hex(v) if isinstance(v, int) and not isinstance(v, bool) else str(v),
)  # fmt: skip
def test_scratch_inside_the_ghcb_must_stay_within_0x800_to_0xff0(offset, length, ok):
    d = full()
    d.devices.mmio_test.buffer[:] = bytes(range(256)) * 15
    out = mmio_read(d, GHCB + offset, length)
    assert out.ghcb is not None
    if ok:
        assert reply(out) == (0, 0)
        assert out.ghcb.raw[offset : offset + length] == bytes(d.devices.mmio_test.buffer[:length])
    else:
        assert reply(out) == (MALFORMED, GhcbErr.INVALID_SCRATCH_AREA)


@pytest.mark.parametrize(("length", "ok"), [(0x1_0000, True), (0x1_0001, False)])
def test_scratch_outside_the_ghcb_is_limited_to_64_kib(length, ok):
    out = full().vmgexit(page(VmgExit.MMIO_WRITE, UNCLAIMED_MMIO, length, sw_scratch=0x10000))
    assert out.exit is None
    assert reply(out) == ((0, 0) if ok else (MALFORMED, GhcbErr.INVALID_SCRATCH_AREA))


def test_scratch_in_the_page_after_the_ghcb_counts_as_outside():
    d = full()
    out = mmio_read(d, GHCB + 0x1000, 8, gpa=MMIO_TEST_GPA)
    assert reply(out) == (0, 0)
    assert d.vm.memory.read(GHCB + 0x1000, 4) == b"SVES"


class ReadableEverywhere:
    """Guest memory that reads as zeros at any GPA: only the range checks can refuse."""

    def read(self, gpa: int, size: int) -> bytes:
        return bytes(size)




@pytest.mark.parametrize(
    ("gpa", "length"),
    [((1 << 64) - 0x1000, 0x1000), ((1 << 64) - 0x800, 0x1000), (U64, 2)],
    ids=["ends_exactly_at_2_64", "ends_past_2_64", "last_byte_plus_one"],
)  # fmt: skip
def test_scratch_that_wraps_past_2_64_is_invalid_scratch_area(gpa, length):
    result = setup_scratch(MappedGhcb(bytes(0x1000), GHCB), gpa, length, False,
                           ReadableEverywhere())  # type: ignore[arg-type]
    assert result == GhcbErr.INVALID_SCRATCH_AREA




@pytest.mark.parametrize("scratch", [0x4000_0000, MMIO_TEST_GPA], ids=["beyond_ram", "mmio_hole"])
def test_scratch_outside_guest_ram_fails_kvm_run_with_efault(scratch):
    out = mmio_read(full(), scratch, 8)
    assert isinstance(out.exit, RunFailed) and out.exit.errno == "EFAULT"


def test_mmio_read_outside_the_ghcb_is_written_back_at_the_next_vmrun():
    d = full()
    d.vm.memory.write(OUTSIDE, b"\x00" * 8)
    g = page(VmgExit.MMIO_READ, MMIO_TEST_GPA, 8, sw_scratch=OUTSIDE)
    assert handle_only(d, g) == O.RESUME
    assert d.vm.memory.read(OUTSIDE, 8) == bytes(8)
    d.vcpu.prepare_switch_to_guest()
    assert d.vm.memory.read(OUTSIDE, 8) == b"SVES" + bytes(4)


def test_string_in_outside_the_ghcb_is_written_back():
    d = full()
    out = d.vmgexit(page(SvmExit.IOIO, IOIO_IN_DEBUG | IOIO_STR, 4, sw_scratch=OUTSIDE))
    assert reply(out) == (0, 0)
    assert d.vm.memory.read(OUTSIDE, 4) == b"\xe9" * 4


def test_string_out_outside_the_ghcb_reads_guest_memory():
    d = full()
    d.vm.memory.write(OUTSIDE, b"\x01\x02\x03")
    out = d.vmgexit(page(SvmExit.IOIO, IOIO_OUT_POST | IOIO_STR, 3, sw_scratch=OUTSIDE))
    assert reply(out) == (0, 0) and d.devices.post.codes == [1, 2, 3]


@pytest.mark.parametrize(
    ("count", "size", "result"),
    [(0x8000_0000, 1, "EINVAL"), (0x4000_0000, 2, "EINVAL"), (0x2000_0000, 4, "EINVAL"),
     (0x7FFF_FFFF, 1, GhcbErr.INVALID_SCRATCH_AREA), (0x2000_0000, 2, GhcbErr.INVALID_SCRATCH_AREA),
     (1 << 63, 1, "EINVAL")],
    ids=lambda v: hex(v) if isinstance(v, int) else str(v),
)  # fmt: skip
def test_string_io_count_over_int_max_or_overflowing_fails_kvm_run(count, size, result):
    info1 = 0x80 << 16 | size << 4 | 4 << 7 | IOIO_STR
    out = full().vmgexit(page(SvmExit.IOIO, info1, count, sw_scratch=OUTSIDE))
    if result == "EINVAL":
        assert isinstance(out.exit, RunFailed) and out.exit.errno == "EINVAL"
    else:
        assert out.exit is None and reply(out) == (MALFORMED, result)


def scribbling_handler(sync: bool) -> Callable[[ExitContext], None]:
    """An MMIO-like handler that maps the scratch area and overwrites the buffer."""

    def handler(ctx: ExitContext) -> None:
        scratch = ctx.map_scratch(ctx.exit_info_2, sync)
        assert isinstance(scratch, Scratch)
        scratch.data[:] = b"\xaa" * scratch.length

    return handler


@pytest.mark.parametrize(("sync", "after"), [(False, b"guest"), (True, b"\xaa" * 5)],
                         ids=["write_not_synced", "read_synced"])  # fmt: skip
def test_scratch_outside_the_ghcb_goes_back_only_for_read_type_operations(sync, after):
    d, _ = recording(scribbling_handler(sync), requires=("sw_scratch",))
    d.vm.memory.write(OUTSIDE, b"guest")
    out = d.vmgexit(page(SW_CODE, 0, 5, sw_scratch=OUTSIDE))
    assert reply(out) == (0, 0)
    assert d.vm.memory.read(OUTSIDE, 5) == after


@pytest.mark.parametrize("sync", [False, True])
def test_scratch_inside_the_ghcb_is_worked_on_in_place(sync):
    d, _ = recording(scribbling_handler(sync), requires=("sw_scratch",))
    out = d.vmgexit(page(SW_CODE, 0, 5, sw_scratch=SHARED + 0x10))
    assert out.ghcb is not None and out.ghcb.raw[0x810:0x815] == b"\xaa" * 5


# -- 9. the GHCB MSR protocol -------------------------------------------------------------------


def test_msr_sev_info_reply_with_the_plugin():
    out = full().msr_protocol(GhcbMsr.SEV_INFO_REQ)
    assert out.exit is None
    assert out.msr == 2 << 48 | 1 << 32 | 51 << 24 | 0x001 == 0x0002_0001_3300_0001




@pytest.mark.parametrize(
    "ghcb_version",
    [2, 1],
)
def test_msr_sev_info_reply_equals_the_value_preloaded_at_reset(ghcb_version):
    d = full(ghcb_version=ghcb_version)
    preloaded = vmcb(d, "ghcb_gpa")
    assert preloaded == ghcb_version << 48 | 1 << 32 | 51 << 24 | 0x001
    assert d.msr_protocol(GhcbMsr.SEV_INFO_REQ).msr == preloaded


def test_msr_cpuid_uses_subleaf_0_and_keeps_bits_31_12():
    junk = 0x2_ABCD << 12
    out = full().msr_protocol(cpuid_req(0x8000_001F, 1) | junk)
    assert out.exit is None
    assert out.msr == 51 << 32 | 1 << 30 | junk | GhcbMsr.CPUID_RESP




def test_msr_cpuid_0xd_ebx_follows_the_vcpu_xcr0_like_the_cpuid_handler():
    d = full()
    assert reply(d.vmgexit(page(SvmExit.CPUID, rax=0xD, rcx=0, xcr0=7))) == (0, 0)
    assert d.msr_protocol(cpuid_req(0xD, 1)).msr >> 32 == 0x340


def test_msr_hv_features_and_term_request():
    d = full()
    assert d.msr_protocol(GhcbMsr.HV_FT_REQ).msr == 0x3 << 12 | 0x081
    out = d.msr_protocol(term_req(1, 4))
    assert out.exit == SystemEvent(SysEv.SEV_TERM, (term_req(1, 4),))
    assert full().msr_protocol(0x100).exit == SystemEvent(SysEv.SEV_TERM, (0x100,))


@pytest.mark.parametrize("value", [0x0FF, 0xFFF, 0x1234_5678_9ABC_D003, 0x008])
def test_unknown_msr_request_leaves_the_msr_and_resumes(value):
    out = full().msr_protocol(value)
    assert out.exit is None and out.msr == value


@pytest.mark.parametrize(
    "value", [GhcbMsr.SEV_INFO_REQ, cpuid_req(0, 0), GhcbMsr.TERM_REQ, GhcbMsr.AP_RESET_HOLD_REQ]
)
def test_msr_request_without_the_plugin_is_ignored(value):
    out = core().msr_protocol(value)
    assert out.exit is None and out.msr == value


def test_msr_protocol_exit_does_not_touch_the_last_ghcb():
    d = full()
    d.vmgexit(page(SvmExit.CPUID, rax=0, rcx=0))
    guest = page(SvmExit.CPUID, rax=1, rcx=0).raw
    d.vm.memory.write(GHCB, guest)
    assert d.msr_protocol(GhcbMsr.SEV_INFO_REQ).exit is None
    assert d.vm.memory.read(GHCB, 0x1000) == guest


# -- 10. observer events ------------------------------------------------------------------------

VMGEXIT_EVENTS = {"vmgexit_enter", "vmgexit_exit", "msr_protocol_enter", "msr_protocol_exit"}


class Rec:
    def __init__(self, want: bool = True) -> None:
        self.want = want
        self.events: list[tuple[str, dict[str, Any]]] = []

    def wants(self, name: str) -> bool:
        return self.want

    def emit(self, name: str, **fields: Any) -> None:
        self.events.append((name, fields))

    def ours(self) -> list[tuple[str, dict[str, Any]]]:
        return [(n, f) for n, f in self.events if n in VMGEXIT_EVENTS]


def test_vmgexit_enter_has_the_request_and_exit_the_reply_at_the_next_vmrun():
    rec = Rec()
    d = ExitDriver(isolated_host().start(), events=rec)
    assert handle_only(d, page(SvmExit.XSETBV, 0x11, 0x22)) == O.RESUME
    enter = ("vmgexit_enter", {"vcpu_id": 0, "exit_reason": 0x8D, "info1": 0x11, "info2": 0x22})
    assert rec.ours() == [enter]
    d.vcpu.prepare_switch_to_guest()
    exit_ = ("vmgexit_exit", {"vcpu_id": 0, "exit_reason": 0x8D, "info1": 2, "info2": 6})
    assert rec.ours() == [enter, exit_]


def test_vmgexit_enter_reads_fields_without_valid_bits():
    rec = Rec()
    d = ExitDriver(isolated_host().start(), events=rec)
    d.vmgexit(without(page(SvmExit.CPUID, 0x33, 0x44, rax=0, rcx=0), "sw_exit_code",
                      "sw_exit_info_1", "sw_exit_info_2"))  # fmt: skip
    assert rec.ours() == [
        ("vmgexit_enter", {"vcpu_id": 0, "exit_reason": 0x72, "info1": 0x33, "info2": 0x44}),
        ("vmgexit_exit", {"vcpu_id": 0, "exit_reason": 0x72, "info1": 2, "info2": 4}),
    ]


@pytest.mark.parametrize("gpa", [0, 0x4000_0000])
def test_no_vmgexit_events_without_a_mapped_ghcb(gpa):
    rec = Rec()
    deliver_gpa(ExitDriver(isolated_host().start(), events=rec), gpa)
    assert rec.ours() == []


@pytest.mark.parametrize(
    ("value", "reply_value"),
    [(GhcbMsr.SEV_INFO_REQ, 0x0002_0001_3300_0001), (0x0FF, 0x0FF)],
    ids=["sev_info", "unknown"],
)
def test_msr_protocol_events_carry_the_raw_values(value, reply_value):
    rec = Rec()
    ExitDriver(isolated_host(enable=PLUGINS).start(), events=rec).msr_protocol(value)
    assert rec.ours() == [
        ("msr_protocol_enter", {"vcpu_id": 0, "ghcb_gpa": value}),
        ("msr_protocol_exit", {"vcpu_id": 0, "ghcb_gpa": reply_value, "result": 1}),
    ]


def test_msr_protocol_terminate_skips_the_exit_event():
    rec = Rec()
    ExitDriver(isolated_host(enable=PLUGINS).start(), events=rec).msr_protocol(0x100)
    assert rec.ours() == [("msr_protocol_enter", {"vcpu_id": 0, "ghcb_gpa": 0x100})]


def test_no_events_reach_a_sink_that_wants_none():
    rec = Rec(want=False)
    d = ExitDriver(isolated_host(enable=PLUGINS).start(), events=rec)
    d.vmgexit(page(SvmExit.CPUID, rax=0, rcx=0))
    d.vmgexit(page(SvmExit.XSETBV))
    d.msr_protocol(GhcbMsr.SEV_INFO_REQ)
    d.msr_protocol(0x0FF)
    assert rec.events == []


# -- nothing a guest puts in a GHCB raises --------------------------------------------------------

_FUZZ_CODES = [r[1] for r in REQUESTS] + [SvmExit.XSETBV, VmgExit.PSC, SW_CODE, 0]
_FIELD_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "cpl", "xcr0", "sw_scratch")


@functools.cache
def fuzz_driver() -> ExitDriver:
    """One driver for every example: state left by earlier requests is part of the input."""
    return full()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    code=st.sampled_from(_FUZZ_CODES) | st.integers(0, U64),
    info1=st.sampled_from([0, 1, IOIO_IN_DEBUG | IOIO_STR, 0x70, MMIO_TEST_GPA])
    | st.integers(0, U64),
    info2=st.integers(0, 0x2_0000) | st.integers(0, U64),
    values=st.fixed_dictionaries({n: st.sampled_from([0, SHARED, OUTSIDE, 0xD, U64]) | st.integers(
        0, U64) for n in _FIELD_NAMES}),
    valid=st.sets(st.sampled_from(("sw_exit_code", "sw_exit_info_1", "sw_exit_info_2",
                                   *_FIELD_NAMES))),
    usage=st.sampled_from([0, 0, 0, 1]),
)  # fmt: skip
def test_no_ghcb_content_raises_out_of_kvm(code, info1, info2, values, valid, usage):
    g = page(code, info1, info2, **{n: v & 0xFF if n == "cpl" else v for n, v in values.items()})
    g["ghcb_usage"] = usage
    g.valid_bitmap = 0
    for name in valid:
        g.set_valid(name)
    out = fuzz_driver().vmgexit(g)
    assert out.exit is None or isinstance(out.exit, KvmExit)
    assert out.ghcb is not None and bits(out.ghcb.valid_bitmap) == RETURNED_BITS
    if usage:
        assert reply(out) == (MALFORMED, GhcbErr.INVALID_USAGE)
