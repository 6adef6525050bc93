"""Values defined by AMD's SEV API specification (pub. 55766): status codes, states, policy.

They are kept apart from the firmware model so that a reader can check them
against the specification (and Linux's ``include/uapi/linux/psp-sev.h``, which
copies the status codes) without reading any behaviour.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag

from attrs import frozen

from sevsim.errors import ConfigError


class SevStatus(IntEnum):
    """Firmware status codes; a failing command reports one by name."""

    SUCCESS = 0x00
    INVALID_PLATFORM_STATE = 0x01
    INVALID_GUEST_STATE = 0x02
    INVALID_CONFIG = 0x03
    INVALID_LENGTH = 0x04
    ALREADY_OWNED = 0x05
    INVALID_CERTIFICATE = 0x06
    POLICY_FAILURE = 0x07
    INACTIVE = 0x08
    INVALID_ADDRESS = 0x09
    BAD_SIGNATURE = 0x0A
    BAD_MEASUREMENT = 0x0B
    ASID_OWNED = 0x0C
    INVALID_ASID = 0x0D
    WBINVD_REQUIRED = 0x0E
    DFFLUSH_REQUIRED = 0x0F
    INVALID_GUEST = 0x10
    INVALID_COMMAND = 0x11
    ACTIVE = 0x12
    HWERROR_PLATFORM = 0x13
    HWERROR_UNSAFE = 0x14
    UNSUPPORTED = 0x15
    INVALID_PARAM = 0x16
    RESOURCE_LIMIT = 0x17
    SECURE_DATA_INVALID = 0x18


class PlatformState(IntEnum):
    """PSTATE: UNINIT until INIT; WORKING while at least one guest exists."""

    UNINIT = 0
    INIT = 1
    WORKING = 2


class GuestState(IntEnum):
    """GSTATE of one guest context (the launch and migration states)."""

    UNINIT = 0
    LUPDATE = 1
    LSECRET = 2
    RUNNING = 3
    SUPDATE = 4
    RUPDATE = 5
    SENT = 6


class Policy(IntFlag):
    """Guest policy bits, fixed at LAUNCH_START and covered by the measurement.

    Bits 6..15 are reserved (must be zero); bits 16..23 and 24..31 hold the minimum
    firmware API major and minor version the guest owner accepts.
    """

    NODBG = 1 << 0
    NOKS = 1 << 1
    ES = 1 << 2
    NOSEND = 1 << 3
    DOMAIN = 1 << 4
    SEV = 1 << 5


POLICY_RESERVED_MASK = 0xFFC0
POLICY_API_MAJOR_SHIFT = 16
POLICY_API_MINOR_SHIFT = 24


def policy_min_api(policy: int) -> tuple[int, int]:
    """The (major, minor) firmware API version a policy requires at least."""
    return (policy >> POLICY_API_MAJOR_SHIFT) & 0xFF, (policy >> POLICY_API_MINOR_SHIFT) & 0xFF


@frozen
class FirmwareVersion:
    """API version and build the firmware reports; they enter every measurement.

    The defaults are plausible values of a current part, not those of a specific one.
    """

    api_major: int = 1
    api_minor: int = 55
    build: int = 21

    def __attrs_post_init__(self) -> None:
        for name in ("api_major", "api_minor", "build"):
            value = getattr(self, name)
            if not 0 <= value <= 0xFF:
                raise ConfigError(f"firmware {name} {value} must fit one byte (0..255)")
