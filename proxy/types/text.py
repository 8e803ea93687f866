"""text and varchar: the canonical form is the UTF-8 bytes themselves.

Both wire formats carry the same bytes (client_encoding is assumed UTF8, which every
driver we support uses). Invalid UTF-8 and NUL are refused as PostgreSQL does. varchar(n)
length limits are left to the application/DDL: the proxy does not know n.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import ClassVar

from proxy.types.base import UTC, utf8


@dataclass(frozen=True, slots=True)
class TextCodec:
    name: str
    oid: int
    text_is_canonical: ClassVar[bool] = True
    binary_is_canonical: ClassVar[bool] = True

    def from_text(self, data: bytes, tz: datetime.tzinfo = UTC) -> bytes:
        utf8(data, self.name)
        return bytes(data)

    def from_binary(self, data: bytes) -> bytes:
        utf8(data, self.name)
        return bytes(data)

    def to_text(self, canonical: bytes, tz: datetime.tzinfo = UTC) -> bytes:
        return canonical

    def to_binary(self, canonical: bytes) -> bytes:
        return canonical

    def equality_key(self, canonical: bytes) -> bytes:
        """Bytewise: matches `=` under deterministic collations (all but ICU nondeterministic)."""
        return canonical


TEXT = TextCodec("text", 25)
VARCHAR = TextCodec("varchar", 1043)
