"""The memory-encryption engine's cipher: AES-256-XTS, tweaked by the page address.

Real hardware tweaks with the physical address, so the same plaintext at two
addresses encrypts differently; the host can never spot equal guest pages. We
tweak per 4 KiB page (a data unit of one page), which keeps that property and
lets whole pages be converted at once.
"""

from __future__ import annotations

import os

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

PAGE_SIZE = 4096
KEY_SIZE = 64  # AES-256-XTS: two 256-bit keys


def new_key() -> bytes:
    """A fresh random key, as the SEV firmware generates one per guest (VEK/TEK)."""
    while True:
        key = os.urandom(KEY_SIZE)
        if key[:32] != key[32:]:  # XTS refuses equal halves
            return key


class PageCipher:
    """Encrypts and decrypts whole pages under one guest's key."""

    __slots__ = ("_algorithm",)

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_SIZE:
            raise ValueError(f"an AES-256-XTS key is {KEY_SIZE} bytes, got {len(key)}")
        self._algorithm = algorithms.AES(key)

    def _cipher(self, page_addr: int) -> Cipher:
        return Cipher(self._algorithm, modes.XTS(page_addr.to_bytes(16, "little")))

    def encrypt(self, page_addr: int, plaintext: bytes | bytearray | memoryview) -> bytes:
        enc = self._cipher(page_addr).encryptor()
        return enc.update(plaintext) + enc.finalize()

    def decrypt(self, page_addr: int, ciphertext: bytes | bytearray | memoryview) -> bytes:
        dec = self._cipher(page_addr).decryptor()
        return dec.update(ciphertext) + dec.finalize()
