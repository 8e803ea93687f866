"""Logical type codecs by name and by PostgreSQL type OID."""

from __future__ import annotations

from types import MappingProxyType

from proxy.types.base import Codec
from proxy.types.boolean import BOOL
from proxy.types.datetimes import DATE, TIMESTAMPTZ
from proxy.types.integer import INT4, INT8
from proxy.types.jsonb import JSONB
from proxy.types.numeric import NUMERIC
from proxy.types.text import TEXT, VARCHAR
from proxy.types.uuids import UUID

_ALL: tuple[Codec, ...] = (TEXT, VARCHAR, NUMERIC, INT4, INT8, DATE, TIMESTAMPTZ, BOOL, UUID, JSONB)

BY_NAME = MappingProxyType({c.name: c for c in _ALL})
BY_OID = MappingProxyType({c.oid: c for c in _ALL})
ALIASES = MappingProxyType(
    {
        "character varying": "varchar",
        "integer": "int4",
        "int": "int4",
        "bigint": "int8",
        "boolean": "bool",
        "decimal": "numeric",
        "timestamp with time zone": "timestamptz",
    }
)


def get_codec(key: str | int) -> Codec:
    """Codec for a type name (or SQL alias like `integer`) or an OID; KeyError if unsupported."""
    if isinstance(key, int):
        return BY_OID[key]
    name = key.strip().lower()
    return BY_NAME[ALIASES.get(name, name)]
