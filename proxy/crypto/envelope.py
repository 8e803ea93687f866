"""Envelope format of one encrypted column value, and the per-column cipher.

Layout (all integers big-endian)::

    version (1) | algorithm (1) | key id (4) | nonce (12, randomized only) | ciphertext ‖ tag

The 6-byte header is checked first (like Fernet's version byte) and names the key, so a
reader holding several live keys (rotation) picks the right one without trial decryption
(like Tink's key-id prefix). Associated data binds the header, the column's
`schema.table.column` and its logical type name, so a value copied into another column, or
relabelled with another type, fails authentication instead of decrypting into garbage.

Every failure is one `DecryptError` with a fixed message and no chained cause: a caller
(or an attacker reading error text) learns nothing about which check failed.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from enum import IntEnum, StrEnum

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV

from proxy.crypto.kdf import LABEL_GCM, LABEL_SIV, derive
from proxy.crypto.keyview import ColumnKeys, Purpose
from proxy.types import get_codec

VERSION = 1
HEADER = struct.Struct("!BBI")
HEADER_LEN = HEADER.size  # 6
NONCE_LEN = 12
TAG_LEN = 16
_BODY = HEADER_LEN + NONCE_LEN
_FAILURES = (InvalidTag, ValueError, TypeError, OverflowError)
_Fn = Callable[[bytes], bytes]


class Algorithm(IntEnum):
    """Algorithm byte of the envelope."""

    AES_256_GCM = 1  # randomized
    AES_SIV = 2  # deterministic, 512-bit key


class Mode(StrEnum):
    """Column encryption mode, as written in the `protect:` configuration."""

    RANDOMIZED = "randomized"
    DETERMINISTIC = "deterministic"


class DecryptError(Exception):
    """A value could not be decrypted. Deliberately says nothing more."""

    def __init__(self) -> None:
        super().__init__("decryption failed")


def _part(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def associated_data(header: bytes, column: str, logical_type: str) -> bytes:
    """AD for the GCM envelope: header ‖ len-prefixed column ‖ len-prefixed type name.

    Length prefixes keep ("a.b.cd", "e") and ("a.b.c", "de") apart.
    """
    return header + _part(column.encode()) + _part(logical_type.encode())


class ColumnCipher:
    """Encrypts and decrypts the values of one protected column.

    `plain` is the canonical plaintext produced by the column's logical type codec
    (`proxy.types`). Encrypt uses the primary key; decrypt uses the key named in the
    header, which must be live (active or decrypt-only) for this column.

    In deterministic mode `encrypt` first replaces the value by its type's equality key
    (e.g. numeric `1.50` becomes `1.5`) so that values PostgreSQL calls equal encrypt to
    equal ciphertexts; such a column reads back the normalized value. Randomized columns
    read back exactly what was written.

    AEAD objects and associated data are built once per key here, not per value.
    """

    __slots__ = ("_normalize", "_only", "_readers", "_writer", "column", "logical_type", "mode")

    def __init__(self, column: str, logical_type: str, mode: Mode | str, keys: ColumnKeys) -> None:
        codec = get_codec(logical_type)  # KeyError for unknown types
        if keys.purpose is not Purpose.ENCRYPT:
            raise ValueError("ColumnCipher needs keys with purpose 'encrypt'")
        if keys.column != column:
            raise ValueError("keys belong to another column")
        self.column = column
        self.logical_type = codec.name
        self.mode = Mode(mode)
        self._normalize: Callable[[bytes], bytes] | None = (
            codec.equality_key if self.mode is Mode.DETERMINISTIC else None
        )
        self._readers: dict[bytes, Callable[[bytes], bytes]] = {}
        writer = None
        only: Callable[[bytes], bytes] | None = None
        for key_id in keys.ids:
            dek = keys.material(key_id)
            if self.mode is Mode.RANDOMIZED:
                enc, dec, only = self._gcm(key_id, dek)
            else:
                enc, dec, only = self._siv(key_id, dek)
            header = HEADER.pack(VERSION, self._algorithm, key_id)
            self._readers[header] = dec
            if key_id == keys.primary_id:
                writer = enc
        assert writer is not None  # ColumnKeys guarantees the primary is live
        self._writer: Callable[[bytes], bytes] = writer
        # With one live key (no rotation under way) `decrypt` is one closure that checks
        # the header by comparison instead of a dict lookup and a second call.
        self._only = only if len(self._readers) == 1 else None

    @property
    def _algorithm(self) -> Algorithm:
        return Algorithm.AES_256_GCM if self.mode is Mode.RANDOMIZED else Algorithm.AES_SIV

    def _gcm(self, key_id: int, dek: bytes) -> tuple[_Fn, _Fn, _Fn]:
        """(seal, open without header check, open with header check and DecryptError)."""
        aead = AESGCM(derive(dek, LABEL_GCM, self.column, 32))
        header = HEADER.pack(VERSION, Algorithm.AES_256_GCM, key_id)
        ad = associated_data(header, self.column, self.logical_type)
        urandom, seal, open_ = os.urandom, aead.encrypt, aead.decrypt

        def enc(plain: bytes) -> bytes:
            nonce = urandom(NONCE_LEN)
            return header + nonce + seal(nonce, plain, ad)

        def dec(blob: bytes) -> bytes:
            return open_(blob[HEADER_LEN:_BODY], blob[_BODY:], ad)

        def only(blob: bytes) -> bytes:
            if blob[:HEADER_LEN] != header:
                raise DecryptError
            try:
                return open_(blob[HEADER_LEN:_BODY], blob[_BODY:], ad)
            except _FAILURES:
                raise DecryptError from None

        return enc, dec, only

    def _siv(self, key_id: int, dek: bytes) -> tuple[_Fn, _Fn, _Fn]:
        aead = AESSIV(derive(dek, LABEL_SIV, self.column, 64))
        header = HEADER.pack(VERSION, Algorithm.AES_SIV, key_id)
        ad = [header, self.column.encode(), self.logical_type.encode()]
        seal, open_ = aead.encrypt, aead.decrypt

        def enc(plain: bytes) -> bytes:
            return header + seal(plain, ad)

        def dec(blob: bytes) -> bytes:
            return open_(blob[HEADER_LEN:], ad)

        def only(blob: bytes) -> bytes:
            if blob[:HEADER_LEN] != header:
                raise DecryptError
            try:
                return open_(blob[HEADER_LEN:], ad)
            except _FAILURES:
                raise DecryptError from None

        return enc, dec, only

    def encrypt(self, plain: bytes) -> bytes:
        """Seal one canonical plaintext under the primary key."""
        if self._normalize is not None:
            plain = self._normalize(plain)
        return self._writer(plain)

    def decrypt(self, blob: bytes) -> bytes:
        """Open one envelope; any malformation, key not in the view, or tamper is DecryptError."""
        if self._only is not None:
            return self._only(blob)
        header = blob[:HEADER_LEN]
        if type(header) is not bytes:
            header = bytes(header)
        reader = self._readers.get(header)
        if reader is None:
            raise DecryptError
        try:
            return reader(blob)
        except _FAILURES:
            raise DecryptError from None

    def opener(self) -> Callable[[bytes], bytes]:
        """`decrypt` as the cheapest callable for a read loop: the same values and the
        same DecryptError, one Python call per value when one key is live."""
        return self._only if self._only is not None else self.decrypt

    def key_id_of(self, blob: bytes) -> int:
        """Key id named by an envelope header (for rotation progress); DecryptError if malformed."""
        try:
            version, algorithm, key_id = HEADER.unpack_from(blob)
        except (struct.error, TypeError):
            raise DecryptError from None
        if version != VERSION or algorithm != self._algorithm:
            raise DecryptError
        return key_id

    def rotate(self, blob: bytes) -> bytes:
        """Re-encrypt a value under the primary key (MultiFernet.rotate for one column)."""
        return self._writer(self.decrypt(blob))

    def __repr__(self) -> str:
        return (
            f"ColumnCipher(column={self.column!r}, logical_type={self.logical_type!r}, "
            f"mode={self.mode.value!r}, key_ids={[HEADER.unpack(h)[2] for h in self._readers]})"
        )
