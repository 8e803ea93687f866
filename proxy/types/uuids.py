"""uuid: canonical form is the 16 raw bytes (the binary format).

Text input follows uuid_in: optional braces, 32 hex digits, a hyphen allowed after any
group of four; output is lower-case 8-4-4-4-12.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass
from typing import ClassVar

from proxy.types.base import INVALID_BINARY_REPRESENTATION, UTC, CodecError

_UUID_RE = re.compile(r"[0-9a-fA-F]{4}(?:-?[0-9a-fA-F]{4}){7}", re.ASCII)


@dataclass(frozen=True, slots=True)
class UuidCodec:
    name: str = "uuid"
    binary_is_canonical: ClassVar[bool] = True
    oid: int = 2950

    def from_text(self, data: bytes, tz: datetime.tzinfo = UTC) -> bytes:
        try:
            s = bytes(data).decode("ascii")
        except UnicodeDecodeError:
            raise CodecError("invalid input syntax for type uuid") from None
        if s.startswith("{") and s.endswith("}"):
            s = s[1:-1]
        if not _UUID_RE.fullmatch(s):
            raise CodecError("invalid input syntax for type uuid")
        return bytes.fromhex(s.replace("-", ""))

    def from_binary(self, data: bytes) -> bytes:
        if len(data) != 16:
            raise CodecError("incorrect binary data format for uuid", INVALID_BINARY_REPRESENTATION)
        return bytes(data)

    def to_text(self, canonical: bytes, tz: datetime.tzinfo = UTC) -> bytes:
        h = self.from_binary(canonical).hex()
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}".encode()

    def to_binary(self, canonical: bytes) -> bytes:
        return canonical

    def equality_key(self, canonical: bytes) -> bytes:
        return canonical


UUID = UuidCodec()
