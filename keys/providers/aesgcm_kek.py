"""Software KEK shared by the `local` and `env` providers: AES-256-GCM with AD.

Wrapped blob: `0x01 | nonce (12) | ciphertext ‖ tag`. AES-GCM rather than AES-KW because
it authenticates associated data (the keyring entry the DEK belongs to); a 96-bit random
nonce is safe for the few thousand wraps a keyring sees in its life.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keys.providers.base import KekProvider, UnwrapError

KEK_LEN = 32
WRAP_VERSION = 1
_AD_LABEL = b"strongroom/v1/kek-wrap\x00"


def kek_fingerprint(kind: str, kek: bytes) -> str:
    """Non-secret id of a KEK: HMAC of a label under the KEK, first 8 bytes, hex."""
    tag = hmac.new(kek, b"strongroom/v1/kek-id", hashlib.sha256).hexdigest()[:16]
    return f"{kind}:{tag}"


class AesGcmKek(KekProvider):
    """A KEK held in process memory. Subclasses decide where the 32 bytes come from."""

    def __init__(self, kek: bytes) -> None:
        if not isinstance(kek, bytes) or len(kek) != KEK_LEN:
            raise ValueError(f"a KEK must be exactly {KEK_LEN} bytes")
        self.__aead = AESGCM(kek)
        self.__key_id = kek_fingerprint(self.kind, kek)

    @property
    def key_id(self) -> str:
        return self.__key_id

    def _wrap(self, dek: bytes, associated_data: bytes) -> bytes:
        nonce = os.urandom(12)
        sealed = self.__aead.encrypt(nonce, dek, _AD_LABEL + associated_data)
        return bytes((WRAP_VERSION,)) + nonce + sealed

    def _unwrap(self, blob: bytes, associated_data: bytes) -> bytes:
        if len(blob) < 1 + 12 + 16 or blob[0] != WRAP_VERSION:
            raise UnwrapError
        try:
            return self.__aead.decrypt(blob[1:13], blob[13:], _AD_LABEL + associated_data)
        except InvalidTag:
            raise UnwrapError from None
