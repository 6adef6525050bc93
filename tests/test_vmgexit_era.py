"""The 5.11 era (``era="v5.11"``): fail-stop where newest KVM answers with a GHCB error.

REFERENCE.md sections 1.1, 2 and 4, column v5.11: a GHCB GPA of 0 or one that cannot
be mapped fails KVM_RUN with -EINVAL; malformed input fills KVM_EXIT_INTERNAL_ERROR
(suberror 4, data [exit code or 0, last vCPU]) and then fails KVM_RUN with -EINVAL
(5.11's ``sev_es_validate_vmgexit`` returns -EINVAL from ``sev_handle_vmgexit`` after
setting the exit reason), with no GHCB reply; an invalid scratch area and an unknown
MSR-protocol request fail KVM_RUN with -EINVAL.
"""

from __future__ import annotations

from typing import Any

import pytest
from test_vmgexit import (
    GHCB,
    PLUGINS,
    REQUESTS,
    SHARED,
    le,
    page,
    reply,
    without,
)

from sevsim.arch.exits import SvmExit, VmgExit
from sevsim.arch.ghcb_msr import GhcbMsr, cpuid_req, term_req
from sevsim.kvm.exits import InternalError, InternalErrorSub, RunFailed
from sevsim.testing import Delivered, ExitDriver, isolated_host
from sevsim.vmm.machine import MMIO_TEST_GPA


def v5_11(**vm_args: Any) -> ExitDriver:
    return ExitDriver(isolated_host(enable=PLUGINS).start(), era="v5.11", **vm_args)


def internal_error(out: Delivered) -> tuple[int, ...]:
    """The data words of the internal-error exit 5.11 fills before failing KVM_RUN with
    -EINVAL (suberror checked)."""
    assert isinstance(out.exit, RunFailed) and out.exit.errno == "EINVAL", out.exit
    filled = out.exit.exit
    assert isinstance(filled, InternalError), filled
    assert filled.suberror == InternalErrorSub.UNEXPECTED_EXIT_REASON == 4
    return filled.data


def einval(out: Delivered) -> bool:
    return isinstance(out.exit, RunFailed) and out.exit.errno == "EINVAL"


def test_ghcb_gpa_zero_fails_kvm_run_with_einval_and_writes_nothing():
    d = v5_11()
    g = page(SvmExit.CPUID, rax=0, rcx=0)
    out = d.vmgexit(g, ghcb_gpa=0)
    assert einval(out)
    assert out.ghcb is not None and out.ghcb.raw == g.raw


@pytest.mark.parametrize("gpa", [0x4000_0000, MMIO_TEST_GPA], ids=["beyond_ram", "mmio_hole"])
def test_unmappable_ghcb_gpa_fails_kvm_run_with_einval(gpa):
    assert einval(v5_11().msr_protocol(gpa))  # the GHCB MSR holds a page GPA


def test_ghcb_usage_is_an_internal_error_before_the_exit_code_is_read():
    g = page(SvmExit.CPUID, rax=0, rcx=0)
    g["ghcb_usage"] = 1
    assert internal_error(v5_11().vmgexit(g)) == (0, 0)


def test_internal_error_names_the_vcpu():
    d = v5_11()
    d.vcpu = d.vm.create_vcpu()  # deliver to vCPU 1
    g = page(SvmExit.CPUID, rax=0, rcx=0)
    g["ghcb_usage"] = 1
    assert internal_error(d.vmgexit(g)) == (0, 1)
    assert internal_error(d.vmgexit(page(SvmExit.XSETBV))) == (SvmExit.XSETBV, 1)


@pytest.mark.parametrize("field", ["sw_exit_code", "sw_exit_info_1", "sw_exit_info_2"])
def test_missing_sw_field_is_an_internal_error_with_the_exit_code(field):
    out = v5_11().vmgexit(without(page(SvmExit.CPUID, rax=0, rcx=0), field))
    assert internal_error(out) == (SvmExit.CPUID, 0)  # read even if not marked valid


@pytest.mark.parametrize(
    "code",
    [SvmExit.XSETBV, SvmExit.HLT, 0x8000_0F00, 1 << 32 | SvmExit.CPUID, VmgExit.PSC,
     VmgExit.AP_CREATION],
    ids=hex,
)  # fmt: skip
def test_unknown_exit_code_is_an_internal_error_with_the_exit_code(code):
    assert internal_error(v5_11().vmgexit(page(code, rax=0, rcx=0))) == (code, 0)


@pytest.mark.parametrize(
    ("code", "info1", "info2", "fields", "missing"),
    [pytest.param(*r[1:5], m, id=f"{r[0]}-{m}") for r in REQUESTS for m in r[5]],
)
def test_missing_required_valid_bit_is_an_internal_error(code, info1, info2, fields, missing):
    out = v5_11().vmgexit(without(page(code, info1, info2, **fields), missing))
    assert internal_error(out) == (code, 0)


def test_validation_failure_writes_no_ghcb_reply():
    out = v5_11().vmgexit(page(SvmExit.XSETBV, 0x1234, 0x5678))
    assert internal_error(out) == (SvmExit.XSETBV, 0)
    assert reply(out) == (0x1234, 0x5678)  # the guest's own values, not 2 / GHCB_ERR_*




@pytest.mark.parametrize(
    ("scratch", "length"),
    [(0, 8), (GHCB + 0x7F8, 16), (GHCB + 0xFE9, 8), (0x10000, 0x1_0001)],
    ids=["zero", "below_shared_buffer", "past_0xff0", "over_64k"],
)
def test_invalid_scratch_area_fails_kvm_run_with_einval(scratch, length):
    out = v5_11().vmgexit(page(VmgExit.MMIO_READ, MMIO_TEST_GPA, length, sw_scratch=scratch))
    assert einval(out)


def test_valid_requests_are_answered_as_in_the_newest_era():
    d = v5_11()
    out = d.vmgexit(page(SvmExit.CPUID, 0xDEAD, 0xBEEF, rax=0, rcx=0, rdi=5))
    assert out.exit is None and reply(out) == (0, 0)
    assert out.ghcb is not None and out.ghcb["rax"] == 0xD
    out = d.vmgexit(page(VmgExit.MMIO_READ, MMIO_TEST_GPA, 4, sw_scratch=SHARED))
    assert out.ghcb is not None and out.ghcb.raw[0x800:0x804] == b"SVES"


@pytest.mark.parametrize("value", [0x0FF, 0xFFF, 0x006])
def test_unknown_msr_request_fails_kvm_run_with_einval(value):
    assert einval(v5_11().msr_protocol(value))


def test_msr_request_without_any_handler_fails_kvm_run_with_einval():
    d = ExitDriver(isolated_host().start(), era="v5.11")
    assert einval(d.msr_protocol(GhcbMsr.SEV_INFO_REQ))


def test_sev_info_and_cpuid_requests_are_answered():
    d = v5_11()
    assert d.msr_protocol(GhcbMsr.SEV_INFO_REQ).exit is None
    out = d.msr_protocol(cpuid_req(0, 1))
    assert out.exit is None and out.msr == le(b"Auth") << 32 | 1 << 30 | GhcbMsr.CPUID_RESP




def test_term_request_fails_kvm_run_with_einval():
    assert einval(v5_11().msr_protocol(term_req(0, 0)))




@pytest.mark.parametrize(
    "request_",
    [GhcbMsr.HV_FT_REQ, GhcbMsr.AP_RESET_HOLD_REQ, GhcbMsr.PREF_GPA_REQ, GhcbMsr.REG_GPA_REQ,
     GhcbMsr.PSC_REQ],
    ids=lambda v: v.name,
)
def test_requests_added_after_5_11_fail_kvm_run_with_einval(request_):
    assert einval(v5_11().msr_protocol(request_))


@pytest.mark.parametrize("code", [VmgExit.HV_FEATURES, VmgExit.TERM_REQUEST], ids=hex)
def test_ghcb_protocol_2_requests_are_invalid_events(code):
    """5.11 had no HV_FEATURES or TERM_REQUEST case: the exit code fails validation."""
    assert internal_error(v5_11().vmgexit(page(code))) == (code, 0)


def test_unsupported_event_fails_kvm_run_with_einval():
    assert einval(v5_11().vmgexit(page(VmgExit.UNSUPPORTED_EVENT)))
