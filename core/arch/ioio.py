"""SVM_EXIT_IOIO's ``exit_info_1``: which port, how wide, string or not, in or out.

The hardware fills it for a normal guest; an SEV-ES guest's #VC handler fills
``sw_exit_info_1`` the same way (APM vol. 2, 15.10.2; Linux's guest-side ``IOIO_*``
and KVM's ``SVM_IOIO_*``). This is the one definition of its bits: the modeled #VC
handler encodes with :meth:`IoioInfo.encode`, the native one assembles the same
constants (``sevsim.guest.vc_native``'s prelude), and the hypervisor side decodes
with :meth:`IoioInfo.decode`.

=========  ==========================================================
bit 0      IN / INS (else OUT / OUTS)
bit 2      string (INS / OUTS)
bit 3      REP
bits 6:4   data size in bytes, one-hot: bit 4 = 1, bit 5 = 2, bit 6 = 4
bits 9:7   address size, one-hot: bit 7 = 16, bit 8 = 32, bit 9 = 64
bits 12:10 segment of a string operand (0 ES .. 5 GS)
bits 31:16 port
=========  ==========================================================
"""

from __future__ import annotations

from functools import lru_cache

from attrs import frozen

IOIO_TYPE_IN = 1 << 0
IOIO_STR = 1 << 2
IOIO_REP = 1 << 3
IOIO_SIZE_SHIFT = 4
IOIO_SIZE_MASK = 7 << IOIO_SIZE_SHIFT
IOIO_ADDR_SHIFT = 7
IOIO_ADDR_16 = 1 << IOIO_ADDR_SHIFT
IOIO_ADDR_32 = 2 << IOIO_ADDR_SHIFT
IOIO_ADDR_64 = 4 << IOIO_ADDR_SHIFT
IOIO_SEG_SHIFT = 10
IOIO_SEG_MASK = 7 << IOIO_SEG_SHIFT
IOIO_PORT_SHIFT = 16

#: Address size in bits -> its one-hot bit.
IOIO_ADDR = {16: IOIO_ADDR_16, 32: IOIO_ADDR_32, 64: IOIO_ADDR_64}
_ADDR_BITS = {bit >> IOIO_ADDR_SHIFT: size for size, bit in IOIO_ADDR.items()}

#: Segment register numbers, as the SEG field (and the ModRM sreg encoding) gives them.
SEGMENT_NUMBERS = {"es": 0, "cs": 1, "ss": 2, "ds": 3, "fs": 4, "gs": 5}


@frozen
class IoioInfo:
    """``sw_exit_info_1`` of an IOIO exit, decoded."""

    port: int
    size: int
    address_size: int
    rep: bool
    string: bool
    is_in: bool
    #: The SEG field: the segment register number of a string operand.
    segment: int = 0

    @classmethod
    def decode(cls, info1: int) -> IoioInfo:
        """The fields as given. The size field is one-hot (1, 2, 4) when the hardware
        fills it, but a guest can write anything, and KVM's ``io_interception`` uses
        the value as it is (0..7 bytes)."""
        if cls is IoioInfo:  # a frozen value: one per distinct info1, kept (every IOIO exit)
            return _decoded(info1)
        return cls._decode(info1)

    @classmethod
    def _decode(cls, info1: int) -> IoioInfo:
        size = (info1 & IOIO_SIZE_MASK) >> IOIO_SIZE_SHIFT
        asize = _ADDR_BITS.get((info1 >> IOIO_ADDR_SHIFT) & 7, 0)
        return cls(info1 >> IOIO_PORT_SHIFT & 0xFFFF, size, asize, bool(info1 & IOIO_REP),
                   bool(info1 & IOIO_STR), bool(info1 & IOIO_TYPE_IN),
                   (info1 & IOIO_SEG_MASK) >> IOIO_SEG_SHIFT)  # fmt: skip

    def encode(self) -> int:
        """The ``exit_info_1`` value, as a #VC handler builds it (``vc_ioio_exitinfo``).

        An address size the field cannot express (0, as :meth:`decode` gives for a
        value with no or several address-size bits) sets none.
        """
        return (
            (self.port & 0xFFFF) << IOIO_PORT_SHIFT
            | (self.size << IOIO_SIZE_SHIFT) & IOIO_SIZE_MASK
            | IOIO_ADDR.get(self.address_size, 0)
            | (self.segment << IOIO_SEG_SHIFT) & IOIO_SEG_MASK
            | (IOIO_REP if self.rep else 0)
            | (IOIO_STR if self.string else 0)
            | (IOIO_TYPE_IN if self.is_in else 0)
        )

    def describe(self) -> str:
        op = ("in" if self.is_in else "out") + ("s" if self.string else "")
        return f"{'rep ' if self.rep else ''}{op} port {self.port:#x} size {self.size}"


@lru_cache(maxsize=1024)
def _decoded(info1: int) -> IoioInfo:
    return IoioInfo._decode(info1)
