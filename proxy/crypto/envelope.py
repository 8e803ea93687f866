"""Envelope format of one encrypted column value, and the per-column cipher.

Layout (all integers big-endian)::

    version (1) | algorithm (1) | key id (4) | nonce (12, randomized only) | ciphertext ‖ tag

The 6-byte header is checked first (like Fernet's version byte) and names the key, so a
reader holding several live keys (rotation) picks the right one without trial decryption
(like Tink's key-id prefix). Associated data binds the header, the column's
`schema.table.column` and its logical type name, so a value copied into another column, or
relabelled with another type, fails authentication instead of decrypting into garbage.

Version 2 (`VERSION`, the only one written) also binds the *database*: the associated
data ends with the database identifier (its name as the server reports it,
`current_database()`, or the operator's `keys.database_binding.bind_as` alias). An
envelope copied into another database that the same proxy fronts, with the same table and
column names (a backup or ETL dump loaded into a scratch database), then fails
authentication there: the proxy cannot be used to read it past the source database's
grants and row-level security. The database goes into the associated data, not into the
key derivation, so one set of working keys serves every database and the binding costs
nothing per value.

Version 1 (`VERSION_UNBOUND`) envelopes were written before the binding existed; they
still open (no data is lost by upgrading) unless the column's cipher is built with
`accept_unbound=False` (`keys.database_binding.require`), and every one opened is counted
(`unbound_opened`) so the operator sees what `strongroom keys rotate` still has to
rewrite: rotation writes version 2, bound to the database it connects to.

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

VERSION = 2  # bound to a database: the only version written
VERSION_UNBOUND = 1  # before database binding: read (unless required), never written
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


def associated_data(header: bytes, column: str, logical_type: str,
                    database: str | None = None) -> bytes:
    """AD for the GCM envelope: header ‖ len-prefixed column ‖ len-prefixed type name
    (‖ len-prefixed database identifier for a version 2 header; None: version 1).

    Length prefixes keep ("a.b.cd", "e") and ("a.b.c", "de") apart. The version byte in
    the header is itself authenticated, so a bound envelope relabelled as version 1 (to
    skip the database) fails too.
    """
    ad = header + _part(column.encode()) + _part(logical_type.encode())
    return ad if database is None else ad + _part(database.encode())


def siv_associated_data(header: bytes, column: str, logical_type: str,
                        database: str | None = None) -> list[bytes]:
    """AD components for the SIV envelope (AES-SIV takes a vector: no length prefixes
    needed); the database identifier is the last component of a version 2 header."""
    ad = [header, column.encode(), logical_type.encode()]
    return ad if database is None else [*ad, database.encode()]


class ColumnCipher:
    """Encrypts and decrypts the values of one protected column in one database.

    `plain` is the canonical plaintext produced by the column's logical type codec
    (`proxy.types`). Encrypt uses the primary key; decrypt uses the key named in the
    header, which must be live (active or decrypt-only) for this column.

    `database` is the identifier bound into every envelope written here (version 2) and
    required of every bound envelope opened here: a cipher of another database cannot
    open them. It is learned from the server the values live in (never from a client):
    see `proxy.encryption.DatabaseBinding`. Version 1 envelopes (written before the
    binding) open when `accept_unbound`, each counted in `unbound_opened`.

    In deterministic mode `encrypt` first replaces the value by its type's equality key
    (e.g. numeric `1.50` becomes `1.5`) so that values PostgreSQL calls equal encrypt to
    equal ciphertexts; such a column reads back the normalized value. Randomized columns
    read back exactly what was written. Binding the database in the SIV associated data
    keeps equality exact within one database (one identifier, one ciphertext per value)
    and makes equal values of two databases unlinkable.

    AEAD objects and associated data are built once per key here, not per value.
    """

    __slots__ = ("_normalize", "_only", "_readers", "_writer", "accept_unbound", "column",
                 "database", "logical_type", "mode", "unbound_opened")

    def __init__(self, column: str, logical_type: str, mode: Mode | str, keys: ColumnKeys,
                 *, database: str, accept_unbound: bool = True) -> None:
        codec = get_codec(logical_type)  # KeyError for unknown types
        if keys.purpose is not Purpose.ENCRYPT:
            raise ValueError("ColumnCipher needs keys with purpose 'encrypt'")
        if keys.column != column:
            raise ValueError("keys belong to another column")
        if not database:
            raise ValueError("ColumnCipher needs the database identifier it binds")
        self.column = column
        self.logical_type = codec.name
        self.mode = Mode(mode)
        self.database = database
        self.accept_unbound = accept_unbound
        self.unbound_opened = 0
        self._normalize: Callable[[bytes], bytes] | None = (
            codec.equality_key if self.mode is Mode.DETERMINISTIC else None
        )
        self._readers: dict[bytes, Callable[[bytes], bytes]] = {}
        make = self._gcm if self.mode is Mode.RANDOMIZED else self._siv
        writer = None
        only: Callable[[bytes], bytes] | None = None
        for key_id in keys.ids:
            dek = keys.material(key_id)
            fallback = None
            if accept_unbound:
                _, legacy_dec, legacy_only = make(key_id, dek, None)
                self._readers[HEADER.pack(VERSION_UNBOUND, self._algorithm, key_id)] = (
                    self._counted(legacy_dec))
                fallback = self._counted(legacy_only)
            enc, dec, only = make(key_id, dek, database, fallback)
            self._readers[HEADER.pack(VERSION, self._algorithm, key_id)] = dec
            if key_id == keys.primary_id:
                writer = enc
        assert writer is not None  # ColumnKeys guarantees the primary is live
        self._writer: Callable[[bytes], bytes] = writer
        # With one live key (no rotation under way) `decrypt` is one closure that checks
        # the header by comparison instead of a dict lookup and a second call (a
        # version 1 envelope takes one more call, to the fallback).
        self._only = only if len(keys.ids) == 1 else None

    @property
    def _algorithm(self) -> Algorithm:
        return Algorithm.AES_256_GCM if self.mode is Mode.RANDOMIZED else Algorithm.AES_SIV

    def _counted(self, dec: _Fn) -> _Fn:
        """A version 1 reader that counts what it opens (failures are not counted)."""
        def counted(blob: bytes) -> bytes:
            plain = dec(blob)
            self.unbound_opened += 1
            return plain

        return counted

    def _gcm(self, key_id: int, dek: bytes, database: str | None,
             fallback: _Fn | None = None) -> tuple[_Fn, _Fn, _Fn]:
        """(seal, open without header check, open with header check and DecryptError)
        for version 2 bound to `database`, or version 1 when `database` is None. The
        third hands an envelope with another header to `fallback` (the version 1
        opener of the same key) if there is one."""
        aead = AESGCM(derive(dek, LABEL_GCM, self.column, 32))
        version = VERSION_UNBOUND if database is None else VERSION
        header = HEADER.pack(version, Algorithm.AES_256_GCM, key_id)
        ad = associated_data(header, self.column, self.logical_type, database)
        urandom, seal, open_ = os.urandom, aead.encrypt, aead.decrypt

        def enc(plain: bytes) -> bytes:
            nonce = urandom(NONCE_LEN)
            return header + nonce + seal(nonce, plain, ad)

        def dec(blob: bytes) -> bytes:
            return open_(blob[HEADER_LEN:_BODY], blob[_BODY:], ad)

        def only(blob: bytes) -> bytes:
            if blob[:HEADER_LEN] != header:
                if fallback is None:
                    raise DecryptError
                return fallback(blob)
            try:
                return open_(blob[HEADER_LEN:_BODY], blob[_BODY:], ad)
            except _FAILURES:
                raise DecryptError from None

        return enc, dec, only

    def _siv(self, key_id: int, dek: bytes, database: str | None,
             fallback: _Fn | None = None) -> tuple[_Fn, _Fn, _Fn]:
        aead = AESSIV(derive(dek, LABEL_SIV, self.column, 64))
        version = VERSION_UNBOUND if database is None else VERSION
        header = HEADER.pack(version, Algorithm.AES_SIV, key_id)
        ad = siv_associated_data(header, self.column, self.logical_type, database)
        seal, open_ = aead.encrypt, aead.decrypt

        def enc(plain: bytes) -> bytes:
            return header + seal(plain, ad)

        def dec(blob: bytes) -> bytes:
            return open_(blob[HEADER_LEN:], ad)

        def only(blob: bytes) -> bytes:
            if blob[:HEADER_LEN] != header:
                if fallback is None:
                    raise DecryptError
                return fallback(blob)
            try:
                return open_(blob[HEADER_LEN:], ad)
            except _FAILURES:
                raise DecryptError from None

        return enc, dec, only

    def encrypt(self, plain: bytes) -> bytes:
        """Seal one canonical plaintext under the primary key, bound to the database."""
        if self._normalize is not None:
            plain = self._normalize(plain)
        return self._writer(plain)

    def decrypt(self, blob: bytes) -> bytes:
        """Open one envelope; any malformation, key not in the view, another database,
        a refused version 1 envelope, or tamper is DecryptError."""
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
        if version not in (VERSION, VERSION_UNBOUND) or algorithm != self._algorithm:
            raise DecryptError
        return key_id

    @staticmethod
    def is_bound(blob: bytes) -> bool:
        """Whether an envelope is of the database-bound version (what rotation writes)."""
        return blob[:1] == bytes((VERSION,))

    def rotate(self, blob: bytes) -> bytes:
        """Re-encrypt a value under the primary key (MultiFernet.rotate for one column),
        bound to this cipher's database whatever version it was."""
        return self._writer(self.decrypt(blob))

    def __repr__(self) -> str:
        ids = sorted({HEADER.unpack(h)[2] for h in self._readers})
        return (
            f"ColumnCipher(column={self.column!r}, logical_type={self.logical_type!r}, "
            f"mode={self.mode.value!r}, database={self.database!r}, key_ids={ids})"
        )
