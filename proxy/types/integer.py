"""int4 and int8: canonical form is the big-endian two's complement binary format.

Text input follows int4in/int8in of PostgreSQL 13-15: surrounding whitespace, a sign,
decimal digits. PostgreSQL 16's `0x`/`0o`/`0b` prefixes and `1_000` are refused, so the
proxy accepts the same inputs whatever server version sits behind it.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass
from typing import ClassVar

from proxy.types.base import (
    INVALID_BINARY_REPRESENTATION,
    NUMERIC_VALUE_OUT_OF_RANGE,
    UTC,
    CodecError,
    pg_strip,
)

_INT_RE = re.compile(r"[+-]?[0-9]+", re.ASCII)


def parse_int(text: str, what: str) -> int:
    """Parse PostgreSQL integer text (ASCII only; Python's int() would take other digits)."""
    s = pg_strip(text)
    if not _INT_RE.fullmatch(s):
        raise CodecError(f"invalid input syntax for type {what}")
    if len(s.lstrip("+-").lstrip("0")) > 20:  # beyond any int8; keeps int() off huge input
        raise CodecError(f"value is out of range for type {what}", NUMERIC_VALUE_OUT_OF_RANGE)
    return int(s)


@dataclass(frozen=True, slots=True)
class IntCodec:
    name: str
    oid: int
    binary_is_canonical: ClassVar[bool] = True
    size: int

    def _check(self, value: int) -> int:
        bits = self.size * 8 - 1
        if not -(1 << bits) <= value < (1 << bits):
            raise CodecError(
                f"value is out of range for type {self._pgname}", NUMERIC_VALUE_OUT_OF_RANGE
            )
        return value

    @property
    def _pgname(self) -> str:
        return "integer" if self.size == 4 else "bigint"

    def from_text(self, data: bytes, tz: datetime.tzinfo = UTC) -> bytes:
        try:
            s = bytes(data).decode("ascii")
        except UnicodeDecodeError:
            raise CodecError(f"invalid input syntax for type {self._pgname}") from None
        value = self._check(parse_int(s, self._pgname))
        return value.to_bytes(self.size, "big", signed=True)

    def from_binary(self, data: bytes) -> bytes:
        if len(data) != self.size:
            raise CodecError(
                f"incorrect binary data format for {self._pgname}", INVALID_BINARY_REPRESENTATION
            )
        return bytes(data)

    def to_text(self, canonical: bytes, tz: datetime.tzinfo = UTC) -> bytes:
        return str(int.from_bytes(self.from_binary(canonical), "big", signed=True)).encode()

    def to_binary(self, canonical: bytes) -> bytes:
        return canonical

    def equality_key(self, canonical: bytes) -> bytes:
        return canonical


INT4 = IntCodec("int4", 23, 4)
INT8 = IntCodec("int8", 20, 8)
