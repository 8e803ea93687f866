"""Per-use working keys derived from one DEK with HKDF-SHA256.

A DEK is 32 random bytes. Each use (GCM, SIV, blind index) gets its own key bound to a
label and the column name, so the same DEK can never be used for two algorithms, and a DEK
copied to another column's entry still yields unrelated working keys.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

LABEL_GCM = b"strongroom/v1/aes-256-gcm"
LABEL_SIV = b"strongroom/v1/aes-siv-512"
LABEL_BLIND_INDEX = b"strongroom/v1/blind-index-hmac-sha256"


def _part(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def derive(dek: bytes, label: bytes, column: str, length: int, extra: bytes = b"") -> bytes:
    """HKDF-SHA256(dek, info = len-prefixed label ‖ column ‖ extra) of `length` bytes."""
    info = _part(label) + _part(column.encode()) + _part(extra)
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(dek)
