"""numeric: canonical form is the ASCII text PostgreSQL's numeric_out prints.

numeric keeps its display scale (`1.50` stays `1.50`), so the canonical form does too and
a randomized column reads back exactly what was written. `equality_key` drops trailing
fractional zeros (`1.50` -> `1.5`), since `1.50 = 1.5` in PostgreSQL; deterministic columns
and blind indexes use it. Special values: `NaN`, `Infinity`, `-Infinity` (PG14+); NaN equals
NaN in PostgreSQL's numeric ordering, so it has one equality key.

All work is on digit strings, never Python ints or Decimals, so 131072-digit values cost
linear time and Python's int/str digit limit never applies.
"""

from __future__ import annotations

import datetime
import re
import struct
from dataclasses import dataclass
from typing import ClassVar

from proxy.types.base import (
    INVALID_BINARY_REPRESENTATION,
    NUMERIC_VALUE_OUT_OF_RANGE,
    UTC,
    CodecError,
    pg_strip,
)

NBASE = 10000
DEC_DIGITS = 4
NUMERIC_POS = 0x0000
NUMERIC_NEG = 0x4000
NUMERIC_NAN = 0xC000
NUMERIC_PINF = 0xD000
NUMERIC_NINF = 0xF000
DSCALE_MAX = 0x3FFF  # 16383 digits after the point
WEIGHT_MAX = 0x7FFF  # 131072 digits before the point
MAX_INT_DIGITS = (WEIGHT_MAX + 1) * DEC_DIGITS  # 131072

_NUM_RE = re.compile(r"([+-]?)(?:(\d+)(?:\.(\d*))?|\.(\d+))(?:[eE]([+-]?\d+))?", re.ASCII)
_HEAD = struct.Struct("!hhHH")
_SPECIAL_TEXT = {b"NaN": NUMERIC_NAN, b"Infinity": NUMERIC_PINF, b"-Infinity": NUMERIC_NINF}
_SPECIAL_SIGN = {v: k for k, v in _SPECIAL_TEXT.items()}


def _out_of_range() -> CodecError:
    return CodecError("value overflows numeric format", NUMERIC_VALUE_OUT_OF_RANGE)


def _format(neg: bool, int_digits: str, frac_digits: str) -> bytes:
    """numeric_out of a finite value: no leading zeros, '-0' printed as '0'."""
    int_digits = int_digits.lstrip("0") or "0"
    if len(int_digits) > MAX_INT_DIGITS or len(frac_digits) > DSCALE_MAX:
        raise _out_of_range()
    zero = int_digits == "0" and not frac_digits.strip("0")
    sign = "-" if neg and not zero else ""
    point = "." + frac_digits if frac_digits else ""
    return f"{sign}{int_digits}{point}".encode("ascii")


def parse_text(s: str) -> bytes:
    """numeric_in: canonical text of a text-format numeric."""
    t = pg_strip(s)
    low = t.lower()
    if low == "nan":
        return b"NaN"
    if low in ("infinity", "+infinity", "inf", "+inf"):
        return b"Infinity"
    if low in ("-infinity", "-inf"):
        return b"-Infinity"
    m = _NUM_RE.fullmatch(t)
    if m is None:
        raise CodecError("invalid input syntax for type numeric")
    sign, ipart, fpart, only_frac, exp = m.groups()
    if only_frac is not None:
        ipart, fpart = "", only_frac
    fpart = fpart or ""
    e = 0
    if exp is not None:
        if len(exp.lstrip("+-").lstrip("0")) > 9:
            raise _out_of_range()
        e = int(exp)
    digits = ipart + fpart
    dscale = max(0, len(fpart) - e)
    if dscale > DSCALE_MAX:
        raise _out_of_range()
    significant = digits.lstrip("0")
    if not significant:
        return _format(False, "0", "0" * dscale)
    # digits before the point once the exponent is applied, ignoring leading zeros
    if len(ipart) + e - (len(digits) - len(significant)) > MAX_INT_DIGITS:
        raise _out_of_range()
    point = len(ipart) + e  # digits before the decimal point after applying the exponent
    if point <= 0:
        int_digits, frac_digits = "", "0" * (-point) + digits
    elif point >= len(digits):
        int_digits, frac_digits = digits + "0" * (point - len(digits)), ""
    else:
        int_digits, frac_digits = digits[:point], digits[point:]
    frac_digits = frac_digits.ljust(dscale, "0")[:dscale]
    return _format(sign == "-", int_digits, frac_digits)


def _split(canonical: bytes) -> tuple[bool, str, str]:
    s = canonical.decode("ascii")
    neg = s.startswith("-")
    int_digits, _, frac_digits = s.lstrip("-").partition(".")
    return neg, int_digits, frac_digits


_FAST_DIGITS = 64  # up to this many digits, one int(); longer: digit strings
# numeric_send of n base-10000 digits: header + digits, one Struct per n
_SEND = [struct.Struct(f"!hhHH{n}H").pack for n in range(_FAST_DIGITS // DEC_DIGITS + 2)]
_FILL = (b"", b"000", b"00", b"0")  # zeros completing the last group after the point


def to_binary(canonical: bytes) -> bytes:
    """numeric_send of a canonical value: base-10000 digits, stripped of zero groups.

    The common case (plain digits, at most `_FAST_DIGITS` of them) reads the digits as
    one Python int and splits it with `%` and `//` (operators, not calls: this runs for
    every numeric cell a binary-format result reveals); anything else (specials, long or
    malformed values) takes the digit-string path, which gives the same bytes for the
    common case."""
    int_digits, _, frac_digits = canonical.partition(b".")
    neg = int_digits[:1] == b"-"
    if neg:
        int_digits = int_digits[1:]
    dscale = len(frac_digits)
    digits = int_digits.lstrip(b"0") + frac_digits + _FILL[dscale & 3]
    # (no digits left: int_digits was all zeros, or empty, which the slow path handles)
    if len(digits) > _FAST_DIGITS or not (digits.isdigit() or
                                          (not digits and int_digits.isdigit())):
        return _to_binary_digits(canonical)
    n = int(digits) if digits else 0
    if not n:
        return _SEND[0](0, 0, NUMERIC_POS, dscale)
    low = 0  # zero groups at the end of the number are not sent
    while not n % NBASE:
        n //= NBASE
        low += 1
    groups: list[int] = []
    while n:
        groups.append(n % NBASE)
        n //= NBASE
    groups.reverse()
    ndigits = len(groups)
    return _SEND[ndigits](ndigits, ndigits + low - ((dscale + 3) >> 2) - 1,
                          NUMERIC_NEG if neg else NUMERIC_POS, dscale, *groups)


def _to_binary_digits(canonical: bytes) -> bytes:
    special = _SPECIAL_TEXT.get(canonical)
    if special is not None:
        # numeric_send reads the dscale bits of a special value's header: 32 for ±Infinity
        return _HEAD.pack(0, 0, special, 0 if special == NUMERIC_NAN else 0x20)
    try:
        neg, int_digits, frac_digits = _split(canonical)
    except UnicodeDecodeError:
        raise CodecError("invalid numeric canonical form") from None
    dscale = len(frac_digits)
    int_digits = int_digits.lstrip("0")
    ipad = int_digits.rjust(-(-len(int_digits) // DEC_DIGITS) * DEC_DIGITS, "0")
    fpad = frac_digits.ljust(-(-len(frac_digits) // DEC_DIGITS) * DEC_DIGITS, "0")
    groups = [int(ipad[i : i + 4]) for i in range(0, len(ipad), 4)]
    weight = len(groups) - 1
    groups += [int(fpad[i : i + 4]) for i in range(0, len(fpad), 4)]
    start = 0
    while start < len(groups) and groups[start] == 0:
        start += 1
        weight -= 1
    end = len(groups)
    while end > start and groups[end - 1] == 0:
        end -= 1
    groups = groups[start:end]
    if not groups:
        return _HEAD.pack(0, 0, NUMERIC_POS, dscale)
    head = _HEAD.pack(len(groups), weight, NUMERIC_NEG if neg else NUMERIC_POS, dscale)
    return head + struct.pack(f"!{len(groups)}H", *groups)


def from_binary(data: bytes) -> bytes:
    """numeric_recv: digits beyond dscale are truncated away, as PostgreSQL does."""
    data = bytes(data)
    try:
        ndigits, weight, sign, dscale = _HEAD.unpack_from(data)
    except struct.error:
        raise CodecError("insufficient data for numeric", INVALID_BINARY_REPRESENTATION) from None
    if ndigits < 0 or len(data) != _HEAD.size + 2 * ndigits:
        raise CodecError("incorrect binary data format for numeric", INVALID_BINARY_REPRESENTATION)
    if sign in _SPECIAL_SIGN:
        return _SPECIAL_SIGN[sign]
    if sign not in (NUMERIC_POS, NUMERIC_NEG):
        raise CodecError('invalid sign in external "numeric" value', INVALID_BINARY_REPRESENTATION)
    if dscale > DSCALE_MAX:
        raise CodecError('invalid scale in external "numeric" value', INVALID_BINARY_REPRESENTATION)
    groups = struct.unpack_from(f"!{ndigits}H", data, _HEAD.size)
    if any(g >= NBASE for g in groups):
        raise CodecError('invalid digit in external "numeric" value', INVALID_BINARY_REPRESENTATION)
    # group i has value groups[i] * NBASE ** (weight - i)
    n_int = max(0, weight + 1)
    int_groups = list(groups[:n_int]) + [0] * max(0, n_int - ndigits)
    if weight >= -1:
        frac_groups = list(groups[n_int:])
    else:
        frac_groups = [0] * (-weight - 1) + list(groups)
    int_digits = "".join(f"{g:04d}" for g in int_groups)
    frac_digits = "".join(f"{g:04d}" for g in frac_groups)
    frac_digits = frac_digits.ljust(dscale, "0")[:dscale]
    return _format(sign == NUMERIC_NEG, int_digits, frac_digits)


def equality_key(canonical: bytes) -> bytes:
    """Same value, no trailing fractional zeros: equal for values `=` calls equal."""
    if b"." not in canonical:
        return canonical
    return canonical.rstrip(b"0").rstrip(b".")


@dataclass(frozen=True, slots=True)
class NumericCodec:
    name: str = "numeric"
    oid: int = 1700
    text_is_canonical: ClassVar[bool] = True

    def from_text(self, data: bytes, tz: datetime.tzinfo = UTC) -> bytes:
        try:
            s = bytes(data).decode("ascii")
        except UnicodeDecodeError:
            raise CodecError("invalid input syntax for type numeric") from None
        return parse_text(s)

    def from_binary(self, data: bytes) -> bytes:
        return from_binary(data)

    def to_text(self, canonical: bytes, tz: datetime.tzinfo = UTC) -> bytes:
        return canonical

    # the module function itself: one call less per cell on the read path
    to_binary = staticmethod(to_binary)

    def equality_key(self, canonical: bytes) -> bytes:
        return equality_key(canonical)


NUMERIC = NumericCodec()
