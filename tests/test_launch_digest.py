"""The launch digest our VMM + firmware compute equals the one a guest owner predicts.

Everything on our side is sevsim's own code: firmware loading and its footer table,
the vCPU signature, the reset VMSA, and the PSP's LAUNCH_* commands. sev-snp-measure
is only the oracle (SEV-ES mode, QEMU VMM type). The fake memory and VMSA targets
stand in for the VM; :func:`launch_sev_es` is the QEMU launch sequence to reuse.
"""

from __future__ import annotations

import struct
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from attrs import define, field
from sevsnpmeasure.guest import calc_launch_digest
from sevsnpmeasure.ovmf import OVMF
from sevsnpmeasure.sev_mode import SevMode
from sevsnpmeasure.vcpu_types import CPU_SIGS
from sevsnpmeasure.vmsa import VMSA as OracleVmsa

from sevsim.arch.vmsa import VMSA, VMSA_PAGE_SIZE
from sevsim.errors import ConfigError, GuestMemoryError
from sevsim.hw.psp import LaunchMemory, Psp, VmsaTarget
from sevsim.hw.sev_api import Policy
from sevsim.kvm.svm_setup import sync_vmsa_fields
from sevsim.kvm.vm import Kvm
from sevsim.vmm.cpu_types import VCPU_TYPES, cpuid_signature, vcpu_signature
from sevsim.vmm.firmware import (
    FOUR_GIB,
    SEV_HASH_TABLE_GUID,
    SEV_METADATA_GUID,
    FirmwareError,
    FirmwareImage,
    GpaRange,
    SevSectionType,
    build_firmware_image,
    load_firmware,
    parse_firmware,
)
from sevsim.vmm.launch import launch_firmware
from sevsim.vmm.reset import BSP_RESET_EIP, reset_vmsa_fields

OVMF_DIR = Path("/usr/share/OVMF")
NO_OVMF = "needs Debian's OVMF (/usr/share/OVMF/{}): install Debian's ovmf package"


def debian_ovmf(name: str):
    path = OVMF_DIR / name
    marks = [pytest.mark.ovmf, pytest.mark.skipif(not path.exists(), reason=NO_OVMF.format(name))]
    return pytest.param(path, marks=marks, id=name)


DEBIAN_OVMF = [debian_ovmf("OVMF_CODE_4M.fd"), debian_ovmf("OVMF_CODE.fd")]


# -- the stand-ins for the VM -----------------------------------------------------------


@define
class FakeLaunchMemory:
    """Guest RAM reduced to the firmware image mapped below 4 GiB."""

    image: FirmwareImage
    private: list[tuple[int, int, bytes]] = field(factory=list)

    def launch_encrypt(self, gpa: int, length: int, key: bytes) -> bytes:
        start = gpa - self.image.gpa
        if start < 0 or start + length > self.image.size:
            raise GuestMemoryError(f"[{gpa:#x}, {gpa + length:#x}) is not mapped")
        self.private.append((gpa, length, key))
        return self.image.data[start : start + length]


@define
class FakeVmsa:
    page: bytes
    sealed_with: bytes | None = None

    def launch_protect(self, key: bytes) -> bytes:
        self.sealed_with = key
        return self.page


def reset_vmsa(eip: int, vcpu_sig: int) -> bytes:
    """The VMSA KVM seals for a vCPU QEMU reset at ``eip``: QEMU's state with KVM's
    ``sev_es_sync_vmsa`` adjustments."""
    fields = sync_vmsa_fields(reset_vmsa_fields(eip, vcpu_sig), sev_features=0)
    return bytes(VMSA.pack(fields, size=VMSA_PAGE_SIZE))


def reset_vmsa_pages(image: FirmwareImage, vcpus: int, vcpu_sig: int) -> list[bytes]:
    """Each vCPU's VMSA at reset: the BSP at the reset vector, APs at the reset block."""
    eips = [BSP_RESET_EIP] + [image.sev_es_reset_eip()] * (vcpus - 1)
    return [reset_vmsa(eip, vcpu_sig) for eip in eips]


def launch_sev_es(
    psp: Psp, asid: int, memory: LaunchMemory, image: FirmwareImage,
    vmsas: Sequence[VmsaTarget], policy: int = Policy.ES | Policy.NODBG,
) -> int:  # fmt: skip
    """QEMU's SEV-ES launch: start, bind, encrypt the flash, seal each VMSA, measure."""
    handle = psp.launch_start(policy)
    psp.activate(handle, asid)
    psp.launch_update_data(handle, memory, image.gpa, image.size)
    for vmsa in vmsas:
        psp.launch_update_vmsa(handle, vmsa)
    psp.launch_measure(handle)
    return handle


def our_digest(image: FirmwareImage, vcpus: int, vcpu_type: str) -> bytes:
    """The digest of a real launch: Kvm, Vm, guest memory, VMSA pages, the PSP."""
    vm = launch_firmware(Kvm(), image, vcpus=vcpus, vcpu_type=vcpu_type)
    vm.launch_measure()
    return vm.launch_digest()


def oracle_digest(path: Path, vcpus: int, vcpu_type: str) -> bytes:
    return calc_launch_digest(SevMode.SEV_ES, vcpus, CPU_SIGS[vcpu_type], str(path),
                              None, None, None, 0)  # fmt: skip


# -- a synthetic OVMF-like image ----------------------------------------------------------

SYNTH_SIZE = 0x20000
SYNTH_BASE = FOUR_GIB - SYNTH_SIZE
AP_RESET_EIP = SYNTH_BASE + 0x1000
RESET_VECTOR = bytes.fromhex("90 90 e9 0b f0")  # nop; nop; jmp near 0xf000 (CS base 0xffff0000)
METADATA_GPA = SYNTH_BASE + 0x2000
METADATA = (
    b"ASEV" + (16 + 2 * 12).to_bytes(4, "little") + (1).to_bytes(4, "little")
    + (2).to_bytes(4, "little")
    + b"".join(n.to_bytes(4, "little") for n in (0x80_0000, 0x9000, 1, 0x80_9000, 0x1000, 3))
)  # fmt: skip


def synthetic_image() -> bytes:
    return build_firmware_image(
        AP_RESET_EIP,
        RESET_VECTOR,
        size=SYNTH_SIZE,
        code={AP_RESET_EIP: b"\xf4", METADATA_GPA: METADATA},
        entries=[
            (SEV_HASH_TABLE_GUID, struct.pack("<II", 0x80_A000, 0x400)),
            (SEV_METADATA_GUID, (FOUR_GIB - METADATA_GPA).to_bytes(4, "little")),
        ],
    )


@pytest.fixture(scope="module")
def synthetic_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fw") / "synthetic.fd"
    path.write_bytes(synthetic_image())
    return path


# -- launch digest == sev-snp-measure ---------------------------------------------------


@pytest.mark.parametrize("vcpus", [1, 2, 4])
@pytest.mark.parametrize("vcpu_type", ["EPYC", "EPYC-Rome-v2", "EPYC-Milan", "EPYC-Genoa-v1"])
def test_digest_on_synthetic_image(synthetic_path, vcpus, vcpu_type):
    image = load_firmware(synthetic_path)
    assert our_digest(image, vcpus, vcpu_type) == oracle_digest(synthetic_path, vcpus, vcpu_type)


@pytest.mark.parametrize("path", DEBIAN_OVMF)
@pytest.mark.parametrize("vcpus", [1, 2, 4])
@pytest.mark.parametrize("vcpu_type", ["EPYC-v4", "EPYC-Milan-v2", "EPYC-Turin"])
def test_digest_on_debian_ovmf(path, vcpus, vcpu_type):
    image = load_firmware(path)
    assert our_digest(image, vcpus, vcpu_type) == oracle_digest(path, vcpus, vcpu_type)


@pytest.mark.parametrize("path", DEBIAN_OVMF)
def test_digest_equals_the_cli(path):
    out = subprocess.run(
        [Path(sys.executable).parent / "sev-snp-measure", "--mode", "seves", "--ovmf", str(path),
         "--vcpus", "2", "--vcpu-type", "EPYC-Milan", "--output-format", "hex"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    assert our_digest(load_firmware(path), 2, "EPYC-Milan").hex() == out.strip()


def test_launch_encrypts_the_image_and_seals_every_vmsa(synthetic_path):
    image = load_firmware(synthetic_path)
    psp = Psp()
    psp.init()
    psp.df_flush()
    memory = FakeLaunchMemory(image)
    vmsas = [FakeVmsa(p) for p in reset_vmsa_pages(image, 3, vcpu_signature("EPYC"))]
    launch_sev_es(psp, 2, memory, image, vmsas)
    key = psp.key_for_asid(2)
    # The firmware works through the image in pieces: together, in order, all of it.
    at = SYNTH_BASE
    for gpa, length, used in memory.private:
        assert (gpa, used) == (at, key)
        at += length
    assert at == SYNTH_BASE + SYNTH_SIZE
    assert [v.sealed_with for v in vmsas] == [key] * 3


# -- the reset VMSA ------------------------------------------------------------------------


@pytest.mark.parametrize("eip", [BSP_RESET_EIP, AP_RESET_EIP, 0x80_B004])
@pytest.mark.parametrize("vcpu_type", ["EPYC", "EPYC-Genoa"])
def test_reset_vmsa_equals_sev_snp_measure(eip, vcpu_type):
    sig = vcpu_signature(vcpu_type)
    assert reset_vmsa(eip, sig) == bytes(OracleVmsa.build_save_area(eip, 0, sig))


def test_reset_vmsa_splits_eip_into_cs_base_and_ip():
    page = reset_vmsa(0x80_B004, 0x800F12)
    cs = VMSA.unpack(page)
    assert cs["rip"] == 0xB004 and cs["rdx"] == 0x800F12
    assert VMSA.get(page, "cs")[:2] == (0xF000).to_bytes(2, "little")
    assert int.from_bytes(VMSA.get(page, "cs")[8:], "little") == 0x80_0000


# -- firmware images ------------------------------------------------------------------------


def test_synthetic_image_maps_below_4gib_with_its_footer_entries():
    image = parse_firmware(synthetic_image(), "synth")
    assert (image.size, image.gpa) == (SYNTH_SIZE, SYNTH_BASE)
    assert image.data[-16 : -16 + len(RESET_VECTOR)] == RESET_VECTOR
    assert image.data[AP_RESET_EIP - SYNTH_BASE] == 0xF4
    assert image.sev_es_reset_eip() == AP_RESET_EIP
    assert image.sev_hash_table() == GpaRange(0x80_A000, 0x400)
    assert [(s.gpa, s.size, s.kind) for s in image.sev_metadata()] == [
        (0x80_0000, 0x9000, SevSectionType.SNP_SEC_MEM), (0x80_9000, 0x1000, SevSectionType.CPUID)
    ]  # fmt: skip


def test_synthetic_footer_parses_like_sev_snp_measure(synthetic_path):
    oracle = OVMF(str(synthetic_path))
    image = load_firmware(synthetic_path)
    assert {str(g): d for g, d in image.table.items()} == oracle._table
    assert image.sev_es_reset_eip() == oracle.sev_es_reset_eip()


@pytest.mark.parametrize("path", DEBIAN_OVMF)
def test_debian_ovmf_footer_matches_sev_snp_measure(path):
    oracle, image = OVMF(str(path)), load_firmware(path)
    assert image.gpa == oracle.gpa()
    assert {str(g): d for g, d in image.table.items()} == oracle._table
    assert image.sev_es_reset_eip() == oracle.sev_es_reset_eip()
    if oracle.metadata_items():
        ours = [(s.gpa, s.size, int(s.kind)) for s in image.sev_metadata()]
        assert ours == [(d.gpa, d.size, d.section_type_int) for d in oracle.metadata_items()]


@pytest.mark.parametrize("size", [0, 0x1800, (8 << 20) + 0x1000])
def test_image_size_must_be_whole_sectors_within_8mib(size):
    with pytest.raises(FirmwareError, match=f"firmware odd.fd is {size:#x} bytes"):
        parse_firmware(bytes(size), "odd.fd")


def test_image_without_footer_loads_but_has_no_reset_block():
    image = parse_firmware(bytes(0x1000), "blank.fd")
    assert image.table == {}
    with pytest.raises(FirmwareError, match=r"blank\.fd has no OVMF footer table"):
        image.sev_es_reset_eip()


def test_missing_entries_are_named():
    image = parse_firmware(build_firmware_image(0xFFFF_F000, b""), "plain.fd")
    missing = rf"plain\.fd has no SEV metadata entry \(GUID {SEV_METADATA_GUID}\)"
    with pytest.raises(FirmwareError, match=missing):
        image.sev_metadata()
    with pytest.raises(FirmwareError, match="no SEV hash table entry"):
        image.sev_hash_table()


def corrupt(data: bytes, offset_from_end: int, value: bytes) -> bytes:
    buf = bytearray(data)
    buf[len(buf) - offset_from_end : len(buf) - offset_from_end + len(value)] = value
    return bytes(buf)


def test_bad_footer_and_entry_sizes_are_reported():
    good = build_firmware_image(0xFFFF_F000, b"")
    footer_size_at = 32 + 18  # u16 size of the footer entry
    with pytest.raises(FirmwareError, match=r"bad\.fd: footer table size 0x5"):
        parse_firmware(corrupt(good, footer_size_at, (5).to_bytes(2, "little")), "bad.fd")
    entry_size_at = footer_size_at + 18  # u16 size of the reset block entry
    with pytest.raises(
        FirmwareError, match=r"bad\.fd: footer entry 00f771de-\S+ ending at 0xffce has size 0x3"
    ):
        parse_firmware(corrupt(good, entry_size_at, (3).to_bytes(2, "little")), "bad.fd")
    grown = corrupt(good, footer_size_at, (18 + 22 + 7).to_bytes(2, "little"))
    with pytest.raises(FirmwareError, match="7 stray bytes"):
        parse_firmware(grown, "bad.fd")


def test_reset_block_contents_are_checked():
    image = parse_firmware(build_firmware_image(0xFFFF_F000, b""), "zero.fd")
    zeroed = corrupt(image.data, 32 + 18 + 18 + 4, bytes(4))
    with pytest.raises(FirmwareError, match=r"zero\.fd: the SEV-ES reset block holds address 0"):
        parse_firmware(zeroed, "zero.fd").sev_es_reset_eip()


def test_bad_metadata_is_reported():
    entry = (SEV_METADATA_GUID, (0x100).to_bytes(4, "little"))
    image = parse_firmware(build_firmware_image(0xFFFF_F000, b"", entries=[entry]), "m.fd")
    with pytest.raises(FirmwareError, match=r"m.fd: SEV metadata at 0xff00 has signature"):
        image.sev_metadata()
    entry = (SEV_METADATA_GUID, (0x20000).to_bytes(4, "little"))
    image = parse_firmware(build_firmware_image(0xFFFF_F000, b"", entries=[entry]), "m.fd")
    with pytest.raises(FirmwareError, match="points outside the 0x10000-byte image"):
        image.sev_metadata()


def test_load_firmware_names_a_missing_file(tmp_path):
    with pytest.raises(FirmwareError, match=f"cannot read firmware {tmp_path / 'none.fd'}"):
        load_firmware(tmp_path / "none.fd")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ap_reset_eip": 0x1000, "reset_vector": bytes(17)}, "reset vector is 17 bytes"),
        ({"ap_reset_eip": 0, "reset_vector": b""}, "AP reset address 0x0"),
        ({"ap_reset_eip": 0x1000, "reset_vector": b"", "code": {FOUR_GIB - 0x40: b"\x90"}},
         "code at 0xffffffc0"),
        ({"ap_reset_eip": 0x1000, "reset_vector": b"", "code": {0x1000: b"\x90"}},
         "code at 0x1000"),
    ],
)  # fmt: skip
def test_builder_refuses_what_does_not_fit(kwargs, message):
    with pytest.raises(FirmwareError, match=message):
        build_firmware_image(**kwargs)


# -- vCPU types ---------------------------------------------------------------------------


def test_every_vcpu_type_has_the_oracles_signature():
    assert set(VCPU_TYPES) >= set(CPU_SIGS)
    for name, sig in CPU_SIGS.items():
        assert vcpu_signature(name) == sig, name


@pytest.mark.parametrize(
    ("name", "signature"),
    [("EPYC", 0x800F12), ("EPYC-Rome", 0x830F10), ("EPYC-Milan", 0xA00F11),
     ("EPYC-Genoa", 0xA10F10), ("EPYC-Turin", 0xB00F00)],
)  # fmt: skip
def test_known_signatures(name, signature):
    assert vcpu_signature(name) == signature


def test_unknown_vcpu_type_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="unknown vCPU type 'EPYC-Zen9'; valid types: EPYC, "):
        vcpu_signature("EPYC-Zen9")


def test_signature_formula_below_the_extended_families():
    assert cpuid_signature(6, 0xF, 3) == 0x6F3
    with pytest.raises(ConfigError, match="model 16 cannot be encoded for family 0x6"):
        cpuid_signature(6, 16, 0)
    with pytest.raises(ConfigError, match="stepping 16"):
        cpuid_signature(25, 1, 16)
