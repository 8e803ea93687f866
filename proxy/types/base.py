"""What a logical type codec is, and the one error codecs raise.

A codec converts a value between PostgreSQL's wire formats (text and binary) and one
canonical plaintext byte string, which is what gets encrypted. The canonical form is
unique per displayed value, so a value written in text format and the same value written
in binary format encrypt (deterministically) and index identically.

`equality_key(canonical)` is a canonical form too (decodable by the same codec) that is
equal for values PostgreSQL's `=` calls equal (numeric 1.50 and 1.5). Deterministic
encryption and blind indexes use it; randomized encryption stores the canonical form so
the application reads back exactly what it wrote.
"""

from __future__ import annotations

import datetime
from typing import Protocol

UTC = datetime.UTC


class CodecError(ValueError):
    """A value is not valid for its type. Carries the SQLSTATE the proxy should report.

    Messages never include the value: it may be the plaintext of a protected column.
    """

    def __init__(self, message: str, sqlstate: str = "22P02") -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


# SQLSTATEs, named as in PostgreSQL's errcodes.txt
INVALID_TEXT_REPRESENTATION = "22P02"
INVALID_BINARY_REPRESENTATION = "22P03"
INVALID_DATETIME_FORMAT = "22007"
DATETIME_FIELD_OVERFLOW = "22008"
INVALID_TZ_DISPLACEMENT = "22009"
NUMERIC_VALUE_OUT_OF_RANGE = "22003"
CHARACTER_NOT_IN_REPERTOIRE = "22021"
UNTRANSLATABLE_CHARACTER = "22P05"


class Codec(Protocol):
    """One logical type. Text-format values are bytes in client_encoding UTF8."""

    name: str
    oid: int
    # Optional class attributes (absent: False): `to_text` / `to_binary` return the
    # canonical form unchanged, so the read path can skip the call.
    #   text_is_canonical: ClassVar[bool]
    #   binary_is_canonical: ClassVar[bool]
    # and `to_text` / `from_text` depend on `tz` (so a decrypt cache must not keep text):
    #   tz_dependent: ClassVar[bool]

    def from_text(self, data: bytes, tz: datetime.tzinfo = UTC) -> bytes:
        """Canonical form of a text-format value (tz: session TimeZone, for timestamptz)."""
        ...

    def from_binary(self, data: bytes) -> bytes:
        """Canonical form of a binary-format value."""
        ...

    def to_text(self, canonical: bytes, tz: datetime.tzinfo = UTC) -> bytes:
        """Text format as PostgreSQL prints it (DateStyle ISO, TimeZone tz)."""
        ...

    def to_binary(self, canonical: bytes) -> bytes:
        """Binary format as PostgreSQL's typsend produces it."""
        ...

    def equality_key(self, canonical: bytes) -> bytes:
        """Canonical form equal for PG-equal values; idempotent, decodable."""
        ...


def utf8(data: bytes, what: str) -> str:
    """Decode UTF-8 wire text; PostgreSQL rejects invalid sequences and NUL characters."""
    try:
        s = bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        raise CodecError(
            f"invalid byte sequence for encoding UTF8 in {what} value", CHARACTER_NOT_IN_REPERTOIRE
        ) from None
    if "\x00" in s:
        raise CodecError(f"{what} value contains a NUL byte", CHARACTER_NOT_IN_REPERTOIRE)
    return s


def pg_strip(s: str) -> str:
    """Trim the whitespace PostgreSQL's scanners skip (isspace in the C locale)."""
    return s.strip(" \t\n\r\v\f")
