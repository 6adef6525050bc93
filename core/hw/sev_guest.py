"""One guest as the SEV firmware knows it: its keys and its launch measurement.

Split from the command handlers in :mod:`sevsim.hw.psp` because this is where the
secrets live (the memory key, the transport keys) and where the guest owner's
expected values come from: a reader checking the measurement formula needs only
this file.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from attrs import define, field, frozen

from sevsim.hw.crypto import new_key
from sevsim.hw.sev_api import FirmwareVersion, GuestState, Policy

#: Size of the transport keys (TEK, TIK) and of the measurement nonce.
TRANSPORT_KEY_SIZE = 16
MNONCE_SIZE = 16
#: Context byte that starts the LAUNCH_MEASURE HMAC input (SEV API spec).
MEASURE_CONTEXT = 0x04


@frozen
class LaunchSession:
    """The transport keys the guest owner wraps for LAUNCH_START.

    Real firmware unwraps them with a Diffie-Hellman exchange; here the owner hands
    them over directly, so a test can recompute the measurement HMAC with the TIK.
    """

    tek: bytes
    tik: bytes

    @classmethod
    def generate(cls) -> LaunchSession:
        """Fresh random keys, for a launch without a guest owner's session."""
        return cls(os.urandom(TRANSPORT_KEY_SIZE), os.urandom(TRANSPORT_KEY_SIZE))


@frozen
class LaunchMeasurement:
    """LAUNCH_MEASURE's output: HMAC-SHA256 under the TIK, and the nonce it covers."""

    measurement: bytes
    mnonce: bytes


def launch_measurement(
    tik: bytes, version: FirmwareVersion, policy: int, digest: bytes, mnonce: bytes
) -> bytes:
    """HMAC-SHA256(TIK; 0x04 || API_MAJOR || API_MINOR || BUILD || POLICY || LD || MNONCE).

    Version fields are one byte each, the policy a little-endian u32, LD the 32-byte
    launch digest: the definition of LAUNCH_MEASURE in the SEV API specification.
    """
    message = (
        bytes([MEASURE_CONTEXT, version.api_major, version.api_minor, version.build])
        + policy.to_bytes(4, "little")
        + digest
        + mnonce
    )
    return hmac.new(tik, message, hashlib.sha256).digest()


@define
class GuestContext:
    """The firmware's record of one guest (GCTX): keys, state, ASID, launch digest.

    ``ld`` is the running SHA-256 over everything launched, in order; LAUNCH_MEASURE
    closes it into ``launch_digest``, which the firmware keeps for attestation.
    """

    handle: int
    policy: int
    session: LaunchSession = field(repr=False)
    key: bytes = field(factory=new_key, repr=False)
    state: GuestState = GuestState.LUPDATE
    asid: int = 0
    ld: hashlib._Hash = field(factory=hashlib.sha256, repr=False)
    launch_digest: bytes | None = None

    @property
    def es(self) -> bool:
        return bool(self.policy & Policy.ES)

    def measure(self, version: FirmwareVersion) -> LaunchMeasurement:
        """Close the launch digest and MAC it with a fresh nonce."""
        self.launch_digest = self.ld.digest()
        mnonce = os.urandom(MNONCE_SIZE)
        tik = self.session.tik
        return LaunchMeasurement(
            launch_measurement(tik, version, self.policy, self.launch_digest, mnonce), mnonce
        )
