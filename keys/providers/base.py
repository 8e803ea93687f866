"""What a KEK provider is.

A provider hides its key-encryption key behind `wrap`/`unwrap`, like Tink's KMS envelope
AEAD. `wrap` unwraps its own output before returning it (Tink does this for fresh
keysets): a misconfigured provider or a broken HSM must fail when a key is created, not
months later when the only copy is needed.

`associated_data` binds a wrapped DEK to its keyring entry (column, purpose, id), so a
wrapped DEK copied onto another entry of the keyring does not unwrap.
"""

from __future__ import annotations

import hmac
from abc import ABC, abstractmethod


class ProviderError(Exception):
    """A KEK provider cannot be put to use (missing key file or variable, HSM token or KMS
    key unreachable): a configuration problem, reported without key material."""


class UnwrapError(Exception):
    """A wrapped key could not be unwrapped (wrong KEK, tampered blob, wrong entry)."""

    def __init__(self, message: str = "key unwrap failed") -> None:
        super().__init__(message)


class KekProvider(ABC):
    """Wraps DEKs under a KEK that this object holds or reaches, and never reveals."""

    #: provider kind as written in configuration: "local", "env", "pkcs11"
    kind: str = ""

    @property
    @abstractmethod
    def key_id(self) -> str:
        """Stable, non-secret identifier of the KEK, recorded in the keyring."""

    @property
    def description(self) -> str:
        """Human-readable, non-secret description (for `strongroom keys show`)."""
        return f"{self.kind} KEK {self.key_id}"

    @abstractmethod
    def _wrap(self, dek: bytes, associated_data: bytes) -> bytes: ...

    @abstractmethod
    def _unwrap(self, blob: bytes, associated_data: bytes) -> bytes: ...

    def wrap(self, dek: bytes, associated_data: bytes = b"") -> bytes:
        """Wrap a DEK, then unwrap the result once to prove it can be read back."""
        if not isinstance(dek, bytes) or not dek:
            raise ValueError("dek must be non-empty bytes")
        blob = self._wrap(dek, associated_data)
        try:
            check = self._unwrap(blob, associated_data)
        except UnwrapError:
            raise UnwrapError("fresh wrap did not unwrap: KEK provider is broken") from None
        if not hmac.compare_digest(check, dek):
            raise UnwrapError("fresh wrap unwrapped to another key: KEK provider is broken")
        return blob

    def unwrap(self, blob: bytes, associated_data: bytes = b"") -> bytes:
        """Unwrap a DEK; every failure is UnwrapError without details."""
        return self._unwrap(blob, associated_data)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.description}>"
