"""The one IOIO ``exit_info_1`` layout (``sevsim.arch.ioio``): encode and decode agree."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from sevsim.arch.ioio import IOIO_ADDR_32, IOIO_REP, IOIO_STR, IOIO_TYPE_IN, IoioInfo

infos = st.builds(
    IoioInfo,
    port=st.integers(0, 0xFFFF),
    size=st.sampled_from([1, 2, 4]),
    address_size=st.sampled_from([16, 32, 64]),
    rep=st.booleans(),
    string=st.booleans(),
    is_in=st.booleans(),
    segment=st.integers(0, 5),
)


@given(infos)
def test_decode_reads_back_what_encode_wrote(info):
    assert IoioInfo.decode(info.encode()) == info


def test_the_bits_are_the_apms():
    # rep insw with 32-bit addresses from port 0x3f8, ES (APM vol. 2, 15.10.2)
    info = IoioInfo(0x3F8, 2, 32, rep=True, string=True, is_in=True)
    assert info.encode() == 0x3F8 << 16 | 2 << 4 | IOIO_ADDR_32 | IOIO_REP | IOIO_STR | IOIO_TYPE_IN
    assert IoioInfo(0x80, 1, 64, rep=False, string=True, is_in=False, segment=3).encode() == (
        0x80 << 16 | 0x10 | 0x200 | IOIO_STR | 3 << 10)  # fmt: skip


def test_a_value_without_an_address_size_decodes_as_size_0_and_encodes_none():
    info = IoioInfo.decode(0x80 << 16 | 0x10)
    assert info.address_size == 0 and info.encode() == 0x80 << 16 | 0x10
