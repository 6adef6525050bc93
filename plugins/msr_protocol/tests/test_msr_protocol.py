"""The GHCB MSR protocol plugin, request by request, and on real guest code."""

import pytest

from sevsim.arch.ghcb_msr import GhcbMsr, cpuid_req, term_req
from sevsim.errors import PluginError
from sevsim.kvm.exits import Hlt, SystemEvent, SystemEventType
from sevsim.testing import ExitDriver, isolated_host, run_guest


def driver(**settings) -> ExitDriver:
    host = isolated_host(enable=["msr_protocol"], settings={"msr_protocol": settings})
    return ExitDriver(host.start())


def test_sev_info_reports_versions_and_the_c_bit():
    reply = driver().msr_protocol(GhcbMsr.SEV_INFO_REQ)
    assert reply.exit is None
    assert reply.msr == 2 << 48 | 1 << 32 | 51 << 24 | 0x001


def test_sev_info_versions_come_from_settings():
    reply = driver(min_version=1, max_version=1).msr_protocol(GhcbMsr.SEV_INFO_REQ)
    assert reply.msr == 1 << 48 | 1 << 32 | 51 << 24 | 0x001


@pytest.mark.parametrize(
    ("settings", "message"),
    [({"max_version": 3}, "max_version = 3"), ({"min_version": 2, "max_version": 1}, "above"),
     ({"max_version": "2"}, "max_version = '2'"), ({"maxversion": 2}, "unknown setting")],
)  # fmt: skip
def test_bad_settings_stop_start_up_naming_the_value(settings, message):
    with pytest.raises(PluginError, match=message):
        driver(**settings)


def test_cpuid_returns_one_register_and_keeps_bits_31_12():
    reserved = 0x2_ABCD << 12  # bits 29:12 hold junk the guest left there
    reply = driver().msr_protocol(cpuid_req(0, 1) | reserved)
    assert reply.msr == 0x6874_7541 << 32 | 1 << 30 | reserved | GhcbMsr.CPUID_RESP  # "Auth"
    edx = driver().msr_protocol(cpuid_req(0, 3)).msr >> 32
    ecx = driver().msr_protocol(cpuid_req(0, 2)).msr >> 32
    assert (edx.to_bytes(4, "little") + ecx.to_bytes(4, "little")) == b"enticAMD"


def test_cpuid_0x8000001f_reports_sev_es_and_the_c_bit():
    d = driver()
    eax = d.msr_protocol(cpuid_req(0x8000_001F, 0)).msr >> 32
    ebx = d.msr_protocol(cpuid_req(0x8000_001F, 1)).msr >> 32
    assert eax & 0b1010 == 0b1010  # SEV (bit 1) and SEV-ES (bit 3)
    assert ebx & 0x3F == 51


def test_cpuid_of_an_unknown_leaf_is_zero():
    assert driver().msr_protocol(cpuid_req(0x4000_0100, 0)).msr == GhcbMsr.CPUID_RESP


def test_hv_features():
    assert driver().msr_protocol(GhcbMsr.HV_FT_REQ).msr == 0x3 << 12 | 0x081


@pytest.mark.parametrize("request_", [term_req(0, 0), term_req(1, 4)])
def test_termination_request_stops_the_vm_with_the_raw_value(request_):
    reply = driver().msr_protocol(request_)
    assert reply.exit == SystemEvent(SystemEventType.SEV_TERM, (request_,))


@pytest.mark.parametrize("code", [0x010, 0x012, 0x014])
def test_snp_only_requests_terminate_an_sev_es_guest(code):
    value = 0x1234 << 12 | code
    assert driver().msr_protocol(value).exit == SystemEvent(SystemEventType.SEV_TERM, (value,))


@pytest.mark.parametrize("code", [0x006, 0x016, 0x0FF, 0xFFF])
def test_requests_nobody_owns_are_ignored(code):
    reply = driver().msr_protocol(0xABC << 12 | code)
    assert reply.exit is None and reply.msr == 0xABC << 12 | code


def test_sev_smoke_test_through_the_plugin():
    run = run_guest("""
        mov ecx, 0xC0010131
        rdmsr
        and eax, 3
        cmp eax, 3
        jne fail
        mov ecx, 0xC0010130
        mov eax, 0x100
        xor edx, edx
        wrmsr
        rep vmmcall
    fail:
        ud2
    """, enable=["msr_protocol"])
    assert run.exit == SystemEvent(SystemEventType.SEV_TERM, (0x100,))
    assert any("TERM_REQ set 0 code 0 (GHCB_SEV_ES_GEN_REQ)" in line for line in run.trace.lines)


NEGOTIATE = """
    mov ecx, 0xC0010130
    mov eax, 0x002              /* SEV_INFO_REQ */
    xor edx, edx
    wrmsr
    rep vmmcall
    rdmsr
    and eax, 0xfff
    cmp eax, 0x001
    jne unsupported
    hlt
unsupported:
    mov eax, 0x10100            /* TERM_REQ set 0 code 1 */
    xor edx, edx
    wrmsr
    rep vmmcall
    hlt
"""


def test_a_guest_negotiates_with_the_plugin_and_gives_up_without_it():
    run = run_guest(NEGOTIATE, enable=["msr_protocol"])
    assert isinstance(run.exit, Hlt)
    assert any("SEV_INFO_RESP max 2 min 1 C-bit 51" in line for line in run.trace.lines)
    assert not any("TERM_REQ" in line for line in run.trace.lines)
    run = run_guest(NEGOTIATE)  # no plugin: SEV_INFO is ignored, then TERM_REQ too
    assert isinstance(run.exit, Hlt)
    assert any("GHCB_SEV_ES_PROT_UNSUPPORTED" in line for line in run.trace.lines)
    assert sum("ignored" in line for line in run.trace.lines) == 2
