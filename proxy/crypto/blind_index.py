"""Blind index: a truncated HMAC-SHA256 of a value, stored beside a randomized column.

Equality search on a randomized column compares blind indexes instead of ciphertexts.
The HMAC key is derived with HKDF from each DEK of the column (bound to column and
logical type), so every proxy computes the same index for the same value and nothing
random is involved. The input is the type's equality key, so values PostgreSQL calls
equal (numeric 1.50 and 1.5) index equally.

Truncation makes collisions possible on purpose (fewer bits = less linkability); callers
must recheck the decrypted value, which the rewriter does.

During rotation the column has several live keys: `lookup_values` returns the index under
each (primary first) so a `WHERE bidx IN (...)` finds rows written under any of them.
"""

from __future__ import annotations

import hmac

from proxy.crypto.kdf import LABEL_BLIND_INDEX, derive
from proxy.crypto.keyview import ColumnKeys
from proxy.types import get_codec

DEFAULT_LENGTH = 16
MIN_LENGTH = 4
MAX_LENGTH = 32


class BlindIndex:
    """Computes blind index values for one column. Build once per keyring load."""

    __slots__ = ("_hmac_keys", "_normalize", "_primary", "column", "length", "logical_type")

    def __init__(
        self, column: str, logical_type: str, keys: ColumnKeys, length: int = DEFAULT_LENGTH
    ) -> None:
        if not MIN_LENGTH <= length <= MAX_LENGTH:
            raise ValueError(f"blind index length must be {MIN_LENGTH}..{MAX_LENGTH} bytes")
        if keys.column != column:
            raise ValueError("keys belong to another column")
        codec = get_codec(logical_type)
        self.column = column
        self.logical_type = codec.name
        self.length = length
        self._normalize = codec.equality_key
        self._hmac_keys = tuple(
            derive(keys.material(k), LABEL_BLIND_INDEX, column, 32, codec.name.encode())
            for k in keys.ids
        )
        self._primary = self._hmac_keys[0]

    def compute(self, plain: bytes) -> bytes:
        """Index of a canonical plaintext under the primary key (what writes store)."""
        return hmac.digest(self._primary, self._normalize(plain), "sha256")[: self.length]

    def lookup_values(self, plain: bytes) -> list[bytes]:
        """Index under every live key, primary first, duplicates removed (dual lookup)."""
        msg = self._normalize(plain)
        out: list[bytes] = []
        for key in self._hmac_keys:
            value = hmac.digest(key, msg, "sha256")[: self.length]
            if value not in out:
                out.append(value)
        return out

    def __repr__(self) -> str:
        return (
            f"BlindIndex(column={self.column!r}, logical_type={self.logical_type!r}, "
            f"length={self.length}, keys={len(self._hmac_keys)})"
        )
