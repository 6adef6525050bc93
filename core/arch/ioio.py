"""SVM_EXIT_IOIO's ``exit_info_1``: which port, how wide, string or not, in or out.

The hardware fills it for a normal guest; an SEV-ES guest's #VC handler fills
``sw_exit_info_1`` the same way (APM vol. 2, 15.10.2).
"""

from __future__ import annotations

from attrs import frozen

IOIO_TYPE_IN = 1 << 0
IOIO_STR = 1 << 2
IOIO_REP = 1 << 3


@frozen
class IoioInfo:
    """``sw_exit_info_1`` of an IOIO exit, decoded."""

    port: int
    size: int
    address_size: int
    rep: bool
    string: bool
    is_in: bool

    @classmethod
    def decode(cls, info1: int) -> IoioInfo:
        """The fields as given. The size field is one-hot (1, 2, 4) when the hardware
        fills it, but a guest can write anything, and KVM's ``io_interception`` uses
        the value as it is (0..7 bytes)."""
        size = (info1 >> 4) & 7
        asize = {1: 16, 2: 32, 4: 64}.get((info1 >> 7) & 7, 0)
        return cls(info1 >> 16 & 0xFFFF, size, asize, bool(info1 & IOIO_REP),
                   bool(info1 & IOIO_STR), bool(info1 & IOIO_TYPE_IN))  # fmt: skip

    def describe(self) -> str:
        op = ("in" if self.is_in else "out") + ("s" if self.string else "")
        return f"{'rep ' if self.rep else ''}{op} port {self.port:#x} size {self.size}"
