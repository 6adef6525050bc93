"""The SEV firmware model: platform and guest state machines, every failing status,
ASIDs (ranges, CPUID 0x8000001F, KVM's allocator with reclaim and flush) and the
LAUNCH_MEASURE HMAC recomputed here from the SEV API specification's formula."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from attrs import define, field

from sevsim.errors import ConfigError, GuestMemoryError, SevFirmwareError
from sevsim.hw.psp import LAUNCH_UPDATE_CHUNK, FirmwareVersion, LaunchSession, Psp
from sevsim.hw.sev_api import GuestState, PlatformState, Policy
from sevsim.hw.sev_caps import CpuidLeaf, SevCapabilities
from sevsim.kvm.asid import AsidAllocator, AsidError

ES_POLICY = Policy.ES | Policy.NODBG
RAM_SIZE = 0x4000


@define
class FakeMemory:
    """RAM at gpa 0 that records every launch_encrypt call."""

    data: bytes = field(factory=lambda: bytes(range(256)) * (RAM_SIZE // 256))
    calls: list[tuple[int, int, bytes]] = field(factory=list)

    def launch_encrypt(self, gpa: int, length: int, key: bytes) -> bytes:
        if gpa + length > len(self.data):
            raise GuestMemoryError(f"[{gpa:#x}, {gpa + length:#x}) is outside RAM")
        self.calls.append((gpa, length, key))
        return self.data[gpa : gpa + length]


@define
class FakeVmsa:
    page: bytes = bytes(range(256)) * 16
    sealed_with: bytes | None = None

    def launch_protect(self, key: bytes) -> bytes:
        self.sealed_with = key
        return self.page


def fails(status: str, fn, *args, **kwargs) -> SevFirmwareError:
    with pytest.raises(SevFirmwareError) as info:
        fn(*args, **kwargs)
    assert info.value.status == status, info.value
    return info.value


@pytest.fixture
def psp() -> Psp:
    psp = Psp(SevCapabilities(max_sev_asid=8, min_sev_asid=4))
    psp.init()
    psp.df_flush()
    return psp


def launched(psp: Psp, policy: int = ES_POLICY, asid: int = 1, **kw) -> int:
    """A guest in LUPDATE, bound to ``asid``."""
    handle = psp.launch_start(policy, **kw)
    psp.activate(handle, asid)
    return handle


def running(psp: Psp, asid: int = 1) -> int:
    handle = launched(psp, asid=asid)
    psp.launch_update_data(handle, FakeMemory(), 0, 0x1000)
    psp.launch_update_vmsa(handle, FakeVmsa())
    psp.launch_measure(handle)
    psp.launch_finish(handle)
    return handle


# -- platform ---------------------------------------------------------------------


def test_platform_goes_uninit_init_working_and_back():
    psp = Psp(version=FirmwareVersion(1, 51, 3))
    status = psp.platform_status()
    assert (status.state, status.guest_count, status.es_enabled) == (PlatformState.UNINIT, 0, False)
    assert (status.api_major, status.api_minor, status.build) == (1, 51, 3)
    psp.init()
    assert psp.platform_status().state is PlatformState.INIT
    assert psp.platform_status().es_enabled
    handle = psp.launch_start(ES_POLICY)
    assert psp.platform_status().state is PlatformState.WORKING
    assert psp.platform_status().guest_count == 1
    psp.decommission(handle)
    assert psp.platform_status().state is PlatformState.INIT


@pytest.mark.parametrize("field", ["api_major", "api_minor", "build"])
def test_firmware_version_fields_are_bytes(field):
    with pytest.raises(ConfigError, match=f"firmware {field} 256 must fit one byte"):
        FirmwareVersion(**{field: 256})


def test_init_twice_is_refused(psp):
    err = fails("INVALID_PLATFORM_STATE", psp.init)
    assert "INIT" in err.detail and "UNINIT" in err.detail


@pytest.mark.parametrize(
    ("command", "args"),
    [("launch_start", (ES_POLICY,)), ("df_flush", ()), ("guest_status", (1,))],
)
def test_commands_need_init(command, args):
    err = fails("INVALID_PLATFORM_STATE", getattr(Psp(), command), *args)
    assert "issue INIT" in err.detail


@pytest.mark.parametrize(
    ("command", "args"),
    [
        ("activate", (1, 1)),
        ("deactivate", (1,)),
        ("decommission", (1,)),
        ("launch_update_data", (1, FakeMemory(), 0, 16)),
        ("launch_update_vmsa", (1, FakeVmsa())),
        ("launch_measure", (1,)),
        ("launch_finish", (1,)),
    ],
)
def test_guest_commands_need_a_working_platform(psp, command, args):
    err = fails("INVALID_PLATFORM_STATE", getattr(psp, command), *args)
    assert "WORKING" in err.detail


@pytest.mark.parametrize(
    ("command", "args"),
    [
        ("activate", (9, 2)),
        ("deactivate", (9,)),
        ("decommission", (9,)),
        ("guest_status", (9,)),
        ("launch_update_data", (9, FakeMemory(), 0, 16)),
        ("launch_update_vmsa", (9, FakeVmsa())),
        ("launch_measure", (9,)),
        ("launch_finish", (9,)),
        ("launch_digest", (9,)),
    ],
)
def test_unknown_handle_is_invalid_guest(psp, command, args):
    launched(psp)
    err = fails("INVALID_GUEST", getattr(psp, command), *args)
    assert "handle 9" in err.detail and "[1]" in err.detail


def test_error_names_command_and_status(psp):
    launched(psp)
    err = fails("INVALID_GUEST", psp.launch_measure, 5)
    assert err.command == "LAUNCH_MEASURE"
    assert str(err).startswith("LAUNCH_MEASURE failed: INVALID_GUEST: ")


# -- guest state machine -------------------------------------------------------------


def test_launch_walks_lupdate_lsecret_running(psp):
    handle = psp.launch_start(ES_POLICY)
    status = psp.guest_status(handle)
    assert (status.handle, status.state, status.asid, status.policy) == (
        handle, GuestState.LUPDATE, 0, ES_POLICY)  # fmt: skip
    psp.activate(handle, 2)
    assert psp.guest_status(handle).asid == 2
    psp.launch_update_data(handle, FakeMemory(), 0, 0x100)
    psp.launch_update_vmsa(handle, FakeVmsa())
    psp.launch_measure(handle)
    assert psp.guest_status(handle).state is GuestState.LSECRET
    psp.launch_finish(handle)
    assert psp.guest_status(handle).state is GuestState.RUNNING
    psp.deactivate(handle)
    assert psp.guest_status(handle).asid == 0
    psp.decommission(handle)
    fails("INVALID_GUEST", psp.guest_status, handle)


def test_commands_in_the_wrong_guest_state(psp):
    handle = launched(psp)
    err = fails("INVALID_GUEST_STATE", psp.launch_finish, handle)
    assert "LUPDATE" in err.detail and "needs LSECRET" in err.detail
    err = fails("INVALID_GUEST_STATE", psp.launch_digest, handle)
    assert "after LAUNCH_MEASURE" in err.detail
    psp.launch_measure(handle)
    for command, args in [
        (psp.launch_update_data, (handle, FakeMemory(), 0, 16)),
        (psp.launch_update_vmsa, (handle, FakeVmsa())),
        (psp.launch_measure, (handle,)),
    ]:
        err = fails("INVALID_GUEST_STATE", command, *args)
        assert "LSECRET" in err.detail and "needs LUPDATE" in err.detail
    psp.launch_finish(handle)
    fails("INVALID_GUEST_STATE", psp.launch_finish, handle)
    fails("INVALID_GUEST_STATE", psp.launch_measure, handle)
    assert len(psp.launch_digest(handle)) == 32


def test_handles_are_the_lowest_free_and_limited(psp):
    psp = Psp(SevCapabilities(max_sev_asid=8, min_sev_asid=4), max_guests=2)
    psp.init()
    assert [psp.launch_start(0), psp.launch_start(0)] == [1, 2]
    err = fails("RESOURCE_LIMIT", psp.launch_start, 0)
    assert "all 2 guest handles" in err.detail
    psp.decommission(1)
    assert psp.launch_start(0) == 1


# -- LAUNCH_START ----------------------------------------------------------------------


@pytest.mark.parametrize("bit", range(6, 16))
def test_reserved_policy_bits_fail(psp, bit):
    err = fails("POLICY_FAILURE", psp.launch_start, ES_POLICY | (1 << bit))
    assert f"{1 << bit:#x}" in err.detail


def test_policy_api_version_must_not_exceed_the_firmware():
    psp = Psp(version=FirmwareVersion(1, 51, 0))
    psp.init()
    psp.launch_start((1 << 16) | (51 << 24))  # exactly 1.51: accepted
    err = fails("POLICY_FAILURE", psp.launch_start, (1 << 16) | (52 << 24))
    assert ">= 1.52" in err.detail and "1.51" in err.detail
    fails("POLICY_FAILURE", psp.launch_start, 2 << 16)


@pytest.mark.parametrize("policy", [-1, 1 << 32])
def test_policy_must_fit_u32(psp, policy):
    fails("INVALID_PARAM", psp.launch_start, policy)


def test_es_policy_needs_sev_es_asids():
    psp = Psp(SevCapabilities(max_sev_asid=8, min_sev_asid=1))
    psp.init()
    err = fails("UNSUPPORTED", psp.launch_start, ES_POLICY)
    assert "min_sev_asid is 1" in err.detail
    psp.launch_start(Policy.NODBG)  # plain SEV still works


@pytest.mark.parametrize(("tek", "tik"), [(bytes(15), bytes(16)), (bytes(16), bytes(32))])
def test_session_keys_must_be_16_bytes(psp, tek, tik):
    err = fails("INVALID_LENGTH", psp.launch_start, ES_POLICY, LaunchSession(tek, tik))
    assert "expected 16" in err.detail


def test_each_guest_gets_its_own_xts_key(psp):
    first, second = launched(psp, asid=1), launched(psp, asid=2)
    keys = [psp.key_for_asid(1), psp.key_for_asid(2)]
    assert all(len(k) == 64 and k[:32] != k[32:] for k in keys)
    assert keys[0] != keys[1]
    assert psp.key_for_asid(3) is None
    assert {first, second} == {1, 2}


# -- LAUNCH_UPDATE_DATA / LAUNCH_UPDATE_VMSA -----------------------------------------


def test_update_data_encrypts_under_the_guest_key_and_measures_in_order(psp):
    memory = FakeMemory()
    handle = launched(psp)
    psp.launch_update_data(handle, memory, 0x1000, 0x20)
    psp.launch_update_data(handle, memory, 0x10, 0x30)
    assert [(g, n) for g, n, _ in memory.calls] == [(0x1000, 0x20), (0x10, 0x30)]
    assert {key for _, _, key in memory.calls} == {psp.key_for_asid(1)}
    psp.launch_measure(handle)
    expected = hashlib.sha256(memory.data[0x1000:0x1020] + memory.data[0x10:0x40]).digest()
    assert psp.launch_digest(handle) == expected


def test_update_data_measures_a_long_range_piece_by_piece_as_one(psp):
    # An image larger than LAUNCH_UPDATE_CHUNK, not starting on a piece boundary: the
    # pieces end at multiples of the chunk size, and the digest is that of the range.
    size = 3 * LAUNCH_UPDATE_CHUNK
    memory = FakeMemory(data=bytes(range(256)) * (size // 256))
    handle = launched(psp)
    gpa, length = 0x10, size - 0x30
    psp.launch_update_data(handle, memory, gpa, length)
    pieces = [(g, n) for g, n, _ in memory.calls]
    assert pieces[0] == (gpa, LAUNCH_UPDATE_CHUNK - gpa)
    assert all(g % LAUNCH_UPDATE_CHUNK == 0 for g, _ in pieces[1:])
    assert sum(n for _, n in pieces) == length
    psp.launch_measure(handle)
    assert psp.launch_digest(handle) == hashlib.sha256(memory.data[gpa : gpa + length]).digest()


def test_update_data_that_fails_part_way_leaves_the_digest_alone(psp):
    memory = FakeMemory(data=bytes(range(256)) * (2 * LAUNCH_UPDATE_CHUNK // 256))
    handle = launched(psp)
    psp.launch_update_data(handle, memory, 0, 0x100)
    # The range's first piece is in RAM, its second runs past the end of RAM.
    gpa = LAUNCH_UPDATE_CHUNK + 0x1000
    fails("INVALID_ADDRESS", psp.launch_update_data, handle, memory, gpa, LAUNCH_UPDATE_CHUNK)
    assert [g for g, _, _ in memory.calls] == [0, gpa]  # the first piece went through
    psp.launch_measure(handle)
    assert psp.launch_digest(handle) == hashlib.sha256(memory.data[:0x100]).digest()


@pytest.mark.parametrize("gpa", [0x8, 0x1001, 0xF])
def test_update_data_address_must_be_16_byte_aligned(psp, gpa):
    err = fails("INVALID_ADDRESS", psp.launch_update_data, launched(psp), FakeMemory(), gpa, 16)
    assert f"{gpa:#x}" in err.detail and "16-byte aligned" in err.detail


@pytest.mark.parametrize("length", [0, 8, 0x1001, -16])
def test_update_data_length_must_be_a_nonzero_multiple_of_16(psp, length):
    err = fails("INVALID_LENGTH", psp.launch_update_data, launched(psp), FakeMemory(), 0, length)
    assert "non-zero multiple of 16" in err.detail


def test_update_data_outside_ram_is_invalid_address(psp):
    handle = launched(psp)
    err = fails("INVALID_ADDRESS", psp.launch_update_data, handle, FakeMemory(), RAM_SIZE, 0x10)
    assert "not guest RAM" in err.detail and "outside RAM" in err.detail
    assert isinstance(err.__cause__, GuestMemoryError)


def test_update_needs_an_active_guest(psp):
    handle = psp.launch_start(ES_POLICY)
    err = fails("INACTIVE", psp.launch_update_data, handle, FakeMemory(), 0, 16)
    assert "ACTIVATE" in err.detail
    fails("INACTIVE", psp.launch_update_vmsa, handle, FakeVmsa())


def test_update_vmsa_seals_with_the_guest_key_and_measures_the_page(psp):
    handle, vmsa = launched(psp), FakeVmsa()
    psp.launch_update_vmsa(handle, vmsa)
    assert vmsa.sealed_with == psp.key_for_asid(1)
    psp.launch_measure(handle)
    assert psp.launch_digest(handle) == hashlib.sha256(vmsa.page).digest()


def test_update_vmsa_needs_an_es_guest(psp):
    handle = launched(psp, policy=Policy.NODBG, asid=4)
    err = fails("UNSUPPORTED", psp.launch_update_vmsa, handle, FakeVmsa())
    assert "ES bit" in err.detail


def test_update_vmsa_needs_a_whole_page(psp):
    err = fails("INVALID_LENGTH", psp.launch_update_vmsa, launched(psp), FakeVmsa(bytes(1648)))
    assert "1648 bytes, expected 4096" in err.detail


# -- LAUNCH_MEASURE -----------------------------------------------------------------


def test_measurement_is_the_spec_hmac_under_the_owners_tik():
    version = FirmwareVersion(api_major=1, api_minor=55, build=21)
    psp = Psp(version=version)
    psp.init()
    psp.df_flush()
    tik = bytes(range(16, 32))
    policy = ES_POLICY | Policy.NOKS
    handle = launched(psp, policy=policy, session=LaunchSession(tek=bytes(16), tik=tik))
    psp.launch_update_data(handle, FakeMemory(), 0, 0x2000)
    psp.launch_update_vmsa(handle, FakeVmsa())
    result = psp.launch_measure(handle)
    digest = hashlib.sha256(FakeMemory().data[:0x2000] + FakeVmsa().page).digest()
    assert psp.launch_digest(handle) == digest
    message = (
        b"\x04" + bytes([1, 55, 21]) + int(policy).to_bytes(4, "little") + digest + result.mnonce
    )
    assert len(result.mnonce) == 16
    assert result.measurement == hmac.new(tik, message, hashlib.sha256).digest()


def test_each_measurement_has_a_fresh_nonce(psp):
    session = LaunchSession(tek=bytes(16), tik=bytes(16))
    results = []
    for asid in (1, 2):
        handle = launched(psp, asid=asid, session=session)
        results.append(psp.launch_measure(handle))
    assert results[0].mnonce != results[1].mnonce
    assert results[0].measurement != results[1].measurement


# -- ACTIVATE / DEACTIVATE / DECOMMISSION and dirty ASIDs ----------------------------


@pytest.mark.parametrize("asid", [0, 9])
def test_activate_asid_out_of_range(psp, asid):
    err = fails("INVALID_ASID", psp.activate, psp.launch_start(ES_POLICY), asid)
    assert f"ASID {asid}" in err.detail and "1..max_sev_asid (8)" in err.detail


def test_es_and_sev_guests_need_asids_of_their_range(psp):
    err = fails("INVALID_ASID", psp.activate, psp.launch_start(ES_POLICY), 4)
    assert "SEV-ES" in err.detail and "1..3" in err.detail
    err = fails("INVALID_ASID", psp.activate, psp.launch_start(Policy.NODBG), 3)
    assert "non-ES" in err.detail and "4..8" in err.detail


def test_activate_refuses_an_owned_asid_and_a_second_binding(psp):
    first = launched(psp, asid=1)
    err = fails("ASID_OWNED", psp.activate, psp.launch_start(ES_POLICY), 1)
    assert f"handle {first}" in err.detail
    err = fails("ACTIVE", psp.activate, first, 2)
    assert "already active on ASID 1" in err.detail


def test_asids_are_dirty_after_init_until_df_flush():
    psp = Psp()
    psp.init()
    handle = psp.launch_start(ES_POLICY)
    err = fails("DFFLUSH_REQUIRED", psp.activate, handle, 1)
    assert "DF_FLUSH" in err.detail
    psp.df_flush()
    psp.activate(handle, 1)


def test_a_guest_that_ran_leaves_its_asid_dirty(psp):
    handle = running(psp, asid=2)
    psp.deactivate(handle)
    assert psp.key_for_asid(2) is None
    psp.decommission(handle)
    again = psp.launch_start(ES_POLICY)
    fails("DFFLUSH_REQUIRED", psp.activate, again, 2)
    psp.df_flush()
    psp.activate(again, 2)


def test_a_guest_that_never_ran_leaves_its_asid_clean(psp):
    handle = launched(psp, asid=2)
    psp.deactivate(handle)
    psp.activate(handle, 2)  # no DF_FLUSH needed


def test_deactivate_an_inactive_guest(psp):
    launched(psp)
    err = fails("INACTIVE", psp.deactivate, psp.launch_start(ES_POLICY))
    assert "not bound" in err.detail


def test_decommission_an_active_guest(psp):
    err = fails("ACTIVE", psp.decommission, launched(psp, asid=3))
    assert "ASID 3" in err.detail and "DEACTIVATE first" in err.detail


# -- capabilities and CPUID 0x8000001F --------------------------------------------------


def test_cpuid_reports_features_c_bit_and_asid_ranges():
    caps = SevCapabilities(max_sev_asid=509, min_sev_asid=100, c_bit=51)
    assert caps.cpuid() == CpuidLeaf(eax=0b1010, ebx=51, ecx=509, edx=100)
    assert caps.es_asids == range(1, 100)
    assert caps.sev_asids == range(100, 510)


def test_cpuid_without_sev_es_asids_has_no_es_bit():
    caps = SevCapabilities(max_sev_asid=16, min_sev_asid=1, c_bit=47)
    assert caps.cpuid() == CpuidLeaf(eax=0b0010, ebx=47, ecx=16, edx=1)
    assert not caps.sev_es_enabled and caps.es_asids == range(1, 1)


def test_all_asids_may_be_sev_es():
    caps = SevCapabilities(max_sev_asid=4, min_sev_asid=5)
    assert caps.es_asids == range(1, 5) and not caps.sev_asids


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_sev_asid": 0}, "max_sev_asid 0"),
        ({"max_sev_asid": 4, "min_sev_asid": 6}, "min_sev_asid 6 must be 1..max_sev_asid+1 (5)"),
        ({"min_sev_asid": 0}, "min_sev_asid 0"),
        ({"c_bit": 64}, "C-bit position 64"),
    ],
)
def test_bad_capabilities_are_config_errors(kwargs, message):
    with pytest.raises(
        ConfigError, match=message.replace("+", r"\+").replace("(", r"\(").replace(")", r"\)")
    ):
        SevCapabilities(**kwargs)


# -- KVM's ASID allocator ----------------------------------------------------------------


@pytest.fixture
def asids(psp) -> AsidAllocator:
    return AsidAllocator(psp, psp.caps)


def test_allocator_hands_out_the_lowest_asid_of_each_kind(asids):
    assert [asids.new(es=True) for _ in range(3)] == [1, 2, 3]
    assert [asids.new(es=False) for _ in range(5)] == [4, 5, 6, 7, 8]
    with pytest.raises(AsidError, match=r"no free SEV-ES ASID in 1\.\.3"):
        asids.new(es=True)
    with pytest.raises(AsidError, match=r"no free SEV ASID in 4\.\.8"):
        asids.new(es=False)


def test_freed_asids_wait_for_a_flush(asids, psp):
    first, second, _ = (asids.new(es=True) for _ in range(3))
    handle = running(psp, asid=first)
    psp.deactivate(handle)
    asids.free(first)
    assert asids.reclaimable == {first}
    asids.free(second)
    # Exhausted: one DF_FLUSH, then the lowest reclaimed ASID; its dirt is gone too.
    assert asids.new(es=True) == first
    assert asids.reclaimable == frozenset()
    psp.activate(psp.launch_start(ES_POLICY), first)
    assert asids.new(es=True) == second


def test_no_flush_while_free_asids_remain(asids, psp):
    first = asids.new(es=True)
    handle = running(psp, asid=first)
    psp.deactivate(handle)
    asids.free(first)
    assert asids.new(es=True) == 2  # not the reclaimed 1
    assert asids.reclaimable == {first}
    fails("DFFLUSH_REQUIRED", psp.activate, psp.launch_start(ES_POLICY), first)


def test_a_flush_reclaims_both_kinds(asids):
    es = [asids.new(es=True) for _ in range(3)]
    sev = asids.new(es=False)
    asids.free(sev)
    asids.free(es[0])
    assert asids.new(es=True) == es[0]
    assert asids.reclaimable == frozenset()
    assert asids.new(es=False) == sev


def test_nothing_to_reclaim_in_range_means_no_flush(asids):
    sev = asids.new(es=False)
    asids.free(sev)
    for _ in range(3):
        asids.new(es=True)
    with pytest.raises(AsidError):
        asids.new(es=True)
    assert asids.reclaimable == {sev}


def test_free_of_an_unallocated_asid(asids):
    with pytest.raises(AsidError, match="ASID 2 is not allocated"):
        asids.free(2)
    asid = asids.new(es=True)
    asids.free(asid)
    with pytest.raises(AsidError, match=f"ASID {asid} is not allocated"):
        asids.free(asid)


def test_no_es_asids_when_min_sev_asid_is_one():
    psp = Psp(SevCapabilities(max_sev_asid=4, min_sev_asid=1))
    psp.init()
    with pytest.raises(AsidError, match="no free SEV-ES ASID in an empty range"):
        AsidAllocator(psp, psp.caps).new(es=True)


def test_a_failing_flush_fails_the_allocation():
    psp = Psp(SevCapabilities(max_sev_asid=2, min_sev_asid=2))
    asids = AsidAllocator(psp, psp.caps)
    asids.free(asids.new(es=True))
    with pytest.raises(AsidError, match="cannot reclaim ASIDs \\[1\\]: DF_FLUSH failed"):
        asids.new(es=True)
