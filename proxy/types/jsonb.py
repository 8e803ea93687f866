"""jsonb: canonical form is the text PostgreSQL's jsonb_out prints, in UTF-8.

jsonb does not keep the input text: object keys are de-duplicated (last wins) and sorted
(shorter first, then bytewise), whitespace is normalized to `{"a": 1, "b": [1, 2]}`, and
numbers are numerics (`1e2` prints `100`, `1.50` stays `1.50`). The canonical form does the
same, so what the application reads back is what PostgreSQL would have returned.

Binary format is a version byte (1) followed by the same text. `equality_key` additionally
drops trailing fractional zeros of numbers, because jsonb `=` compares numbers numerically.
Refused like PostgreSQL: invalid JSON, `NaN`/`Infinity`, `\\u0000`, lone surrogates.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from typing import Any, ClassVar

from proxy.types import numeric
from proxy.types.base import (
    INVALID_BINARY_REPRESENTATION,
    UNTRANSLATABLE_CHARACTER,
    UTC,
    CodecError,
    utf8,
)

JSONB_VERSION = 1


class _Num(str):
    """A JSON number kept as its canonical numeric text."""

    __slots__ = ()


def _bad() -> CodecError:
    return CodecError("invalid input syntax for type json")


def _reject_constant(name: str) -> Any:
    raise _bad()


def _number(text: str) -> _Num:
    return _Num(numeric.parse_text(text).decode("ascii"))


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    return dict(pairs)  # last duplicate wins, as in jsonb


def _check_string(s: str) -> bytes:
    if "\x00" in s:
        raise CodecError("unsupported Unicode escape sequence", UNTRANSLATABLE_CHARACTER)
    try:
        return s.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogate from a \\ud800 escape
        raise CodecError("invalid Unicode surrogate pair in json") from None


_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
}


def _escape(s: str) -> str:
    """escape_json(): the named escapes, other control characters as \\u00XX, rest verbatim."""
    out = []
    for ch in s:
        e = _ESCAPES.get(ch)
        if e is not None:
            out.append(e)
        elif ch < " ":
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _dump(value: Any, out: list[str], eq: bool) -> None:
    if isinstance(value, _Num):
        out.append(numeric.equality_key(value.encode()).decode() if eq else value)
    elif isinstance(value, str):
        _check_string(value)
        out.append(_escape(value))
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif value is None:
        out.append("null")
    elif isinstance(value, list):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(", ")
            _dump(item, out, eq)
        out.append("]")
    else:
        keys = sorted(value, key=lambda k: (len(_check_string(k)), _check_string(k)))
        out.append("{")
        for i, k in enumerate(keys):
            if i:
                out.append(", ")
            out.append(_escape(k))
            out.append(": ")
            _dump(value[k], out, eq)
        out.append("}")


def canonicalize(text: str, eq: bool = False) -> bytes:
    """Parse JSON text and print it as jsonb_out does (eq: normalize numbers too)."""
    try:
        value = json.loads(
            text,
            parse_int=_number,
            parse_float=_number,
            parse_constant=_reject_constant,
            object_pairs_hook=_pairs,
        )
    except (ValueError, RecursionError):
        raise _bad() from None
    out: list[str] = []
    try:
        _dump(value, out, eq)
    except RecursionError:
        raise _bad() from None
    return "".join(out).encode("utf-8")


@dataclass(frozen=True, slots=True)
class JsonbCodec:
    name: str = "jsonb"
    oid: int = 3802
    text_is_canonical: ClassVar[bool] = True

    def from_text(self, data: bytes, tz: datetime.tzinfo = UTC) -> bytes:
        return canonicalize(utf8(data, "json"))

    def from_binary(self, data: bytes) -> bytes:
        if not data or data[0] != JSONB_VERSION:
            raise CodecError("unsupported jsonb version number", INVALID_BINARY_REPRESENTATION)
        return canonicalize(utf8(data[1:], "json"))

    def to_text(self, canonical: bytes, tz: datetime.tzinfo = UTC) -> bytes:
        return canonical

    def to_binary(self, canonical: bytes) -> bytes:
        return bytes((JSONB_VERSION,)) + canonical

    def equality_key(self, canonical: bytes) -> bytes:
        return canonicalize(canonical.decode("utf-8"), eq=True)


JSONB = JsonbCodec()
