"""Pure encoders/decoders for the row-carrying messages the encryption layer rewrites.

RowDescription, DataRow, ParameterDescription, Bind and CommandComplete are decoded only
for statements that touch protected columns; everything else is forwarded untouched.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from proxy.protocol.messages import ProtocolViolation, message

_HH = struct.Struct("!H")
"""Every count on the wire (fields, cells, parameters, format codes) is an Int16 that
PostgreSQL reads unsigned (`pq_getmsgint(msg, 2)`): a Parse or Bind may carry up to
65,535 parameters. Read as signed, a count above 32,767 went negative and a valid
message was refused as a protocol violation."""
_I = struct.Struct("!i")
_FIELD = struct.Struct("!IhIhih")  # table oid, attnum, type oid, typlen, typmod, format


@dataclass(slots=True)
class Field:
    """One RowDescription field. Mutable: the rewriter swaps in the logical type."""

    name: bytes
    table_oid: int
    attnum: int
    type_oid: int
    typlen: int
    typmod: int
    format: int


def decode_row_description(body: bytes | memoryview) -> list[Field]:
    raw = bytes(body)
    (count,) = _HH.unpack_from(raw, 0)
    pos = 2
    fields = []
    for _ in range(count):
        end = raw.index(b"\0", pos)
        name = raw[pos:end]
        pos = end + 1
        toid, attnum, typ, typlen, typmod, fmt = _FIELD.unpack_from(raw, pos)
        pos += _FIELD.size
        fields.append(Field(name, toid, attnum, typ, typlen, typmod, fmt))
    return fields


def encode_row_description(fields: list[Field]) -> bytes:
    parts = [_HH.pack(len(fields))]
    for f in fields:
        parts.append(f.name + b"\0")
        parts.append(
            _FIELD.pack(f.table_oid, f.attnum, f.type_oid, f.typlen, f.typmod, f.format)
        )
    return message(b"T", b"".join(parts))


def decode_data_row(body: bytes | memoryview) -> list[bytes | None]:
    raw = bytes(body)
    (count,) = _HH.unpack_from(raw, 0)
    pos = 2
    values: list[bytes | None] = []
    for _ in range(count):
        (n,) = _I.unpack_from(raw, pos)
        pos += 4
        if n < 0:
            values.append(None)
        else:
            values.append(raw[pos : pos + n])
            pos += n
    return values


NULL_CELL = _I.pack(-1)
"""A NULL DataRow cell: its length word alone."""
cell_length = _I.pack
"""`cell_length(n)`: the length word of an n-byte DataRow cell."""


def encode_data_row(values: list[bytes | None]) -> bytes:
    parts = [_HH.pack(len(values))]
    for v in values:
        if v is None:
            parts.append(_I.pack(-1))
        else:
            parts.append(_I.pack(len(v)))
            parts.append(v)
    return message(b"D", b"".join(parts))


def decode_parameter_description(body: bytes | memoryview) -> list[int]:
    raw = bytes(body)
    (count,) = _HH.unpack_from(raw, 0)
    return list(struct.unpack_from(f"!{count}I", raw, 2))


def encode_parameter_description(oids: list[int]) -> bytes:
    return message(b"t", _HH.pack(len(oids)) + struct.pack(f"!{len(oids)}I", *oids))


@dataclass(slots=True)
class Bind:
    portal: bytes
    statement: bytes
    param_formats: list[int]
    params: list[bytes | None]
    result_formats: list[int]

    def param_format(self, i: int) -> int:
        if not self.param_formats:
            return 0
        if len(self.param_formats) == 1:
            return self.param_formats[0]
        return self.param_formats[i]

    def result_format(self, i: int) -> int:
        if not self.result_formats:
            return 0
        if len(self.result_formats) == 1:
            return self.result_formats[0]
        return self.result_formats[i] if i < len(self.result_formats) else 0


def decode_bind(body: bytes | memoryview) -> Bind:
    raw = bytes(body)
    try:
        end = raw.index(b"\0")
        portal = raw[:end]
        end2 = raw.index(b"\0", end + 1)
        stmt = raw[end + 1 : end2]
        pos = end2 + 1
        (nf,) = _HH.unpack_from(raw, pos)
        pos += 2
        pformats = list(struct.unpack_from(f"!{nf}h", raw, pos))
        pos += 2 * nf
        (np_,) = _HH.unpack_from(raw, pos)
        pos += 2
        params: list[bytes | None] = []
        for _ in range(np_):
            (n,) = _I.unpack_from(raw, pos)
            pos += 4
            if n < 0:
                params.append(None)
            else:
                if pos + n > len(raw):
                    raise ProtocolViolation("invalid Bind message: parameter overruns message")
                params.append(raw[pos : pos + n])
                pos += n
        (nr,) = _HH.unpack_from(raw, pos)
        pos += 2
        rformats = list(struct.unpack_from(f"!{nr}h", raw, pos))
    except (ValueError, struct.error) as exc:
        raise ProtocolViolation("invalid Bind message") from exc
    return Bind(portal, stmt, pformats, params, rformats)


def bind_head(msg: bytes) -> tuple[bytes, bytes, list[int]]:
    """(portal, statement name, result format codes) of a whole Bind message (type byte
    and length included), without copying it or building the parameter lists.

    For a statement with no protected parameter the tracker needs no more than this, on
    every execution. The message is validated exactly as `decode_bind` validates it (the
    same ProtocolViolation, with the same text, for the same malformed messages): every
    parameter's length word is still walked, only the values are not sliced out.
    """
    try:
        end = msg.index(b"\0", 5)
        end2 = msg.index(b"\0", end + 1)
        pos = end2 + 1
        (nf,) = _HH.unpack_from(msg, pos)
        # (the format codes themselves are not needed: a message too short for them
        # fails at the next read below, as `decode_bind` fails reading them)
        pos += 2 + 2 * nf
        (np_,) = _HH.unpack_from(msg, pos)
        pos += 2
        size = len(msg)
        unpack = _I.unpack_from
        for _ in range(np_):
            (n,) = unpack(msg, pos)
            pos += 4
            if n > 0:
                if pos + n > size:
                    raise ProtocolViolation("invalid Bind message: parameter overruns message")
                pos += n
        (nr,) = _HH.unpack_from(msg, pos)
        rformats = list(struct.unpack_from(f"!{nr}h", msg, pos + 2))
    except (ValueError, struct.error) as exc:
        raise ProtocolViolation("invalid Bind message") from exc
    return msg[5:end], msg[end + 1 : end2], rformats


def encode_bind(b: Bind) -> bytes:
    parts = [b.portal, b"\0", b.statement, b"\0"]
    parts.append(_HH.pack(len(b.param_formats)))
    parts.append(struct.pack(f"!{len(b.param_formats)}h", *b.param_formats))
    parts.append(_HH.pack(len(b.params)))
    for v in b.params:
        if v is None:
            parts.append(_I.pack(-1))
        else:
            parts.append(_I.pack(len(v)))
            parts.append(v)
    parts.append(_HH.pack(len(b.result_formats)))
    parts.append(struct.pack(f"!{len(b.result_formats)}h", *b.result_formats))
    return message(b"B", b"".join(parts))


def encode_parse(name: bytes, query: bytes, param_oids: list[int]) -> bytes:
    body = name + b"\0" + query + b"\0" + _HH.pack(len(param_oids))
    body += struct.pack(f"!{len(param_oids)}I", *param_oids)
    return message(b"P", body)


def decode_parse(body: bytes | memoryview) -> tuple[bytes, bytes, list[int]]:
    raw = bytes(body)
    try:
        end = raw.index(b"\0")
        end2 = raw.index(b"\0", end + 1)
        (n,) = _HH.unpack_from(raw, end2 + 1)
        oids = list(struct.unpack_from(f"!{n}I", raw, end2 + 3))
    except (ValueError, struct.error) as exc:
        raise ProtocolViolation("invalid Parse message") from exc
    return raw[:end], raw[end + 1 : end2], oids


def bytea_from_text(value: bytes) -> bytes:
    """Decode a bytea value in text format: hex (`\\x...`, the default) or escape format."""
    if value[:2] == b"\\x":
        return bytes.fromhex(value[2:].decode("ascii"))
    out = bytearray()
    i = 0
    n = len(value)
    while i < n:
        c = value[i]
        if c == 0x5C:  # backslash
            if i + 1 < n and value[i + 1] == 0x5C:
                out.append(0x5C)
                i += 2
                continue
            out.append(int(value[i + 1 : i + 4], 8))
            i += 4
            continue
        out.append(c)
        i += 1
    return bytes(out)


def bytea_to_text(value: bytes) -> bytes:
    return b"\\x" + value.hex().encode("ascii")
