"""bool: canonical form is one byte, 0 or 1 (the binary format).

Text input follows boolin: case-insensitive `true/false/yes/no/on/off/1/0` and their
unambiguous prefixes (`t`, `ye`, `of`, ...), surrounding whitespace allowed. Output `t`/`f`.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from proxy.types.base import INVALID_BINARY_REPRESENTATION, UTC, CodecError, pg_strip


def parse_bool(s: str) -> bool:
    """boolin's rules: `o` alone is ambiguous (on/off) and rejected, as in PostgreSQL."""
    t = pg_strip(s).lower()
    if t in ("1", "0"):
        return t == "1"
    if t and t[0] != "o":
        for word, value in (("true", True), ("false", False), ("yes", True), ("no", False)):
            if word.startswith(t):
                return value
    elif t == "on":
        return True
    elif len(t) >= 2 and "off".startswith(t):
        return False
    raise CodecError("invalid input syntax for type boolean")


@dataclass(frozen=True, slots=True)
class BoolCodec:
    name: str = "bool"
    oid: int = 16

    def from_text(self, data: bytes, tz: datetime.tzinfo = UTC) -> bytes:
        try:
            s = bytes(data).decode("ascii")
        except UnicodeDecodeError:
            raise CodecError("invalid input syntax for type boolean") from None
        return b"\x01" if parse_bool(s) else b"\x00"

    def from_binary(self, data: bytes) -> bytes:
        # boolrecv accepts any byte and treats non-zero as true.
        if len(data) != 1:
            raise CodecError(
                "incorrect binary data format for boolean", INVALID_BINARY_REPRESENTATION
            )
        return b"\x00" if data[0] == 0 else b"\x01"

    def to_text(self, canonical: bytes, tz: datetime.tzinfo = UTC) -> bytes:
        return b"t" if self.from_binary(canonical) == b"\x01" else b"f"

    def to_binary(self, canonical: bytes) -> bytes:
        return self.from_binary(canonical)

    def equality_key(self, canonical: bytes) -> bytes:
        return canonical


BOOL = BoolCodec()
