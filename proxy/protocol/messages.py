"""Encoders and decoders for the PostgreSQL v3 messages the proxy itself reads or writes.

Everything here is a pure function over bytes so that it can be tested without a socket.
The proxy forwards most messages untouched; it only decodes the few it must understand
(startup packets, authentication requests, errors it originates, statement text).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

PROTOCOL_3_0 = 196608  # 3 << 16
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102
MAX_STARTUP_PACKET = 10000  # the same bound PostgreSQL applies (MAX_STARTUP_PACKET_LENGTH)

# Authentication request codes carried in 'R' messages.
AUTH_OK = 0
AUTH_SASL = 10

_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_HEAD = struct.Struct("!cI")
_CANCEL = struct.Struct("!IIII")

FRONTEND_TYPES = frozenset(b"BCdcfDEHFPpQSX")

# What a session in READY does with each frontend message type: the one place that says
# it, so a type without a rule is refused (and the message-type table test fails).
CHECKED = "checked"  # decided by the gate before it goes up (statements, function calls)
HARMLESS = "harmless"  # forwarded: names only what a checked message created, or nothing
REFUSED = "refused"  # the session ends with 08P01, as PostgreSQL itself would end it

FRONTEND_RULES: dict[int, str] = {
    ord("Q"): CHECKED,  # Query: the statement text
    ord("P"): CHECKED,  # Parse: the statement text
    ord("B"): CHECKED,  # Bind: runs a statement again (role or search_path may differ)
    ord("F"): CHECKED,  # FunctionCall: the function, resolved by OID
    ord("D"): HARMLESS,  # Describe: of a checked statement or portal
    ord("E"): HARMLESS,  # Execute: of a portal a checked Bind made
    ord("C"): HARMLESS,  # Close
    ord("S"): HARMLESS,  # Sync
    ord("H"): HARMLESS,  # Flush
    ord("X"): HARMLESS,  # Terminate
    ord("d"): HARMLESS,  # CopyData: belongs to a checked COPY (sealed in tracking mode)
    ord("c"): HARMLESS,  # CopyDone
    ord("f"): HARMLESS,  # CopyFail
    ord("p"): REFUSED,  # PasswordMessage / SASL: only during authentication
}
"""Rules after authentication; a type not listed is REFUSED."""


def frontend_rule(kind: int) -> str:
    """The rule of a frontend message type byte once the session is READY."""
    return FRONTEND_RULES.get(kind, REFUSED)


class ProtocolViolation(Exception):
    """The peer sent something the protocol does not allow; the session answers 08P01."""


@dataclass(frozen=True, slots=True)
class StartupPacket:
    """A v3 StartupMessage, keeping parameter order and raw bytes so it can be re-sent as is."""

    version: int
    params: tuple[tuple[str, str], ...]

    def get(self, name: str, default: str | None = None) -> str | None:
        for key, value in self.params:
            if key == name:
                return value
        return default

    def replace(self, name: str, value: str) -> StartupPacket:
        params = tuple((k, value if k == name else v) for k, v in self.params)
        if all(k != name for k, _ in self.params):
            params += ((name, value),)
        return StartupPacket(self.version, params)


def message(kind: bytes, body: bytes = b"") -> bytes:
    """Frame a typed message: type byte, length counting itself, body."""
    return _HEAD.pack(kind, len(body) + 4) + body


def cstring(text: str) -> bytes:
    return text.encode() + b"\0"


def parse_startup(body: bytes) -> StartupPacket:
    """Decode a StartupMessage body (after the length word). Raises ProtocolViolation."""
    if len(body) < 4:
        raise ProtocolViolation("invalid startup packet layout")
    version = _U32.unpack_from(body)[0]
    parts = bytes(body[4:]).split(b"\0")
    # Layout: k1 \0 v1 \0 ... kn \0 vn \0 \0  -> split gives [..., '', ''].
    if len(parts) < 2 or parts[-1] != b"" or parts[-2] != b"" or len(parts) % 2 != 0:
        raise ProtocolViolation("invalid startup packet layout: expected terminator as last byte")
    items = parts[:-2]
    try:
        params = tuple(
            (items[i].decode(), items[i + 1].decode()) for i in range(0, len(items), 2)
        )
    except UnicodeDecodeError as exc:
        raise ProtocolViolation("invalid byte sequence in startup packet") from exc
    return StartupPacket(version, params)


def encode_startup(packet: StartupPacket) -> bytes:
    body = _U32.pack(packet.version)
    body += b"".join(cstring(k) + cstring(v) for k, v in packet.params) + b"\0"
    return _U32.pack(len(body) + 4) + body


def encode_ssl_request() -> bytes:
    return _U32.pack(8) + _U32.pack(SSL_REQUEST_CODE)


def encode_cancel(pid: int, secret: int) -> bytes:
    return _CANCEL.pack(16, CANCEL_REQUEST_CODE, pid, secret)


def decode_cancel(body: bytes) -> tuple[int, int]:
    """Body of a CancelRequest after the length word: code, pid, secret."""
    if len(body) != 12:
        raise ProtocolViolation("invalid cancel request length")
    _code, pid, secret = struct.unpack("!III", body)
    return pid, secret


def error_response(
    code: str,
    text: str,
    *,
    severity: str = "ERROR",
    detail: str | None = None,
    hint: str | None = None,
) -> bytes:
    """An ErrorResponse the proxy originates. Text must never carry protected values."""
    fields = [b"S" + cstring(severity), b"V" + cstring(severity), b"C" + cstring(code)]
    fields.append(b"M" + cstring(text))
    if detail:
        fields.append(b"D" + cstring(detail))
    if hint:
        fields.append(b"H" + cstring(hint))
    return message(b"E", b"".join(fields) + b"\0")


def fatal(code: str, text: str, **kw: str | None) -> bytes:
    return error_response(code, text, severity="FATAL", **kw)  # type: ignore[arg-type]


def ready_for_query(status: bytes = b"I") -> bytes:
    return message(b"Z", status)


def parse_fields(body: bytes | memoryview) -> dict[str, str]:
    """Decode ErrorResponse / NoticeResponse fields into {code letter: text}."""
    out: dict[str, str] = {}
    raw = bytes(body)
    pos = 0
    while pos < len(raw) and raw[pos] != 0:
        end = raw.index(b"\0", pos + 1)
        out[chr(raw[pos])] = raw[pos + 1 : end].decode(errors="replace")
        pos = end + 1
    return out


def auth_code(body: bytes | memoryview) -> int:
    return _I32.unpack_from(body)[0]


def sasl_mechanisms(body: bytes | memoryview) -> list[bytes]:
    raw = bytes(body[4:])
    return [m for m in raw.split(b"\0") if m]


def encode_sasl_mechanisms(mechanisms: list[bytes]) -> bytes:
    body = _I32.pack(AUTH_SASL) + b"".join(m + b"\0" for m in mechanisms) + b"\0"
    return message(b"R", body)


def query_text(body: bytes | memoryview) -> str:
    """Statement text of a Query message body (NUL-terminated)."""
    raw = bytes(body)
    end = raw.find(b"\0")
    if end < 0:
        raise ProtocolViolation("invalid string in message")
    return raw[:end].decode(errors="surrogateescape")


def parse_parse(body: bytes | memoryview) -> tuple[str, str]:
    """(statement name, query text) of a Parse message body."""
    raw = bytes(body)
    end1 = raw.find(b"\0")
    end2 = raw.find(b"\0", end1 + 1) if end1 >= 0 else -1
    if end1 < 0 or end2 < 0:
        raise ProtocolViolation("invalid string in message")
    return (
        raw[:end1].decode(errors="surrogateescape"),
        raw[end1 + 1 : end2].decode(errors="surrogateescape"),
    )


def parameter_status(body: bytes | memoryview) -> tuple[str, str]:
    raw = bytes(body)
    name, _, rest = raw.partition(b"\0")
    value, _, _ = rest.partition(b"\0")
    return name.decode(errors="replace"), value.decode(errors="replace")


def backend_key(body: bytes | memoryview) -> tuple[int, int]:
    pid, secret = struct.unpack_from("!II", body)
    return pid, secret


def execute_portal(body: bytes | memoryview) -> bytes:
    """The portal name of an Execute body (name, NUL, max rows)."""
    data = bytes(body)
    end = data.find(b"\0")
    if end < 0:
        raise ProtocolViolation("malformed Execute message")
    return data[:end]
