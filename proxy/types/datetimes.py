"""date and timestamptz.

Canonical forms are PostgreSQL's binary formats, which are unique per value:
- date: int32 big-endian days since 2000-01-01; INT32_MAX is `infinity`, INT32_MIN `-infinity`.
- timestamptz: int64 big-endian microseconds since 2000-01-01 00:00 UTC; INT64_MAX/MIN are
  ±infinity. An instant is the same however it was written (`+02` or `Z`), so equality
  keys are the canonical form.

Text input accepts what drivers send with DateStyle ISO: `YYYY-MM-DD`, an optional time
`[T ]HH:MM[:SS[.frac]]`, an optional offset (`Z`, `UTC`, `GMT`, `±HH`, `±HH:MM`,
`±HHMM`, `±HH:MM:SS`), an optional ` BC`/` AD`, and the words `infinity`, `-infinity`,
`epoch`. A timestamptz without an offset is local time in the session TimeZone `tz`
(ambiguous or skipped local times take the later instant, as PostgreSQL does). Anything
else, including `now`/`today` (which depend on the clock of whoever parses them) and
two-digit years, is refused with SQLSTATE 22007 rather than guessed.

Text output is what PostgreSQL prints with DateStyle ISO and the given TimeZone.
"""

from __future__ import annotations

import datetime
import re
import struct
from dataclasses import dataclass
from typing import ClassVar

from proxy.types.base import (
    DATETIME_FIELD_OVERFLOW,
    INVALID_BINARY_REPRESENTATION,
    INVALID_DATETIME_FORMAT,
    INVALID_TZ_DISPLACEMENT,
    UTC,
    CodecError,
    pg_strip,
)
from proxy.types.calendar import days_in_month, format_ymd, pg_civil, pg_days

INT32_MAX, INT32_MIN = 2**31 - 1, -(2**31)
INT64_MAX, INT64_MIN = 2**63 - 1, -(2**63)
DATE_NOEND, DATE_NOBEGIN = INT32_MAX, INT32_MIN
TS_NOEND, TS_NOBEGIN = INT64_MAX, INT64_MIN
MIN_DATE, END_DATE = -2451545, 2145031949  # 4714-11-24 BC .. 5874898-01-01 (exclusive)
MIN_TIMESTAMP, END_TIMESTAMP = -211813488000000000, 9223371331200000000  # .. 294277-01-01
USEC_PER_SEC = 1_000_000
USEC_PER_DAY = 86_400 * USEC_PER_SEC
UNIX_EPOCH_DAYS = -10957  # 'epoch' is 1970-01-01, in days since 2000-01-01
MAX_TZ_SECONDS = 15 * 3600 + 59 * 60 + 59

_I32 = struct.Struct("!i")
_I64 = struct.Struct("!q")

_DT_RE = re.compile(
    r"""(?P<y>\d{4,})-(?P<mo>\d{1,2})-(?P<d>\d{1,2})
        (?:(?:T|\s+)(?P<H>\d{1,2}):(?P<M>\d{2})(?::(?P<S>\d{2})(?:\.(?P<f>\d*))?)?)?
        \s*(?P<tz>Z|UTC|GMT|[+-]\d{1,2}(?::?\d{2}(?::?\d{2})?)?)?
        (?:\s+(?P<era>BC|AD))?""",
    re.ASCII | re.IGNORECASE | re.VERBOSE,
)
_TZ_RE = re.compile(r"([+-])(\d{1,2})(?::?(\d{2})(?::?(\d{2}))?)?", re.ASCII)
_EPOCH_2000 = datetime.datetime(2000, 1, 1)
_DT_MIN_US = (datetime.datetime(1, 1, 2) - _EPOCH_2000) // datetime.timedelta(microseconds=1)
_DT_MAX_US = (datetime.datetime(9999, 12, 30) - _EPOCH_2000) // datetime.timedelta(microseconds=1)


def _bad_format(what: str) -> CodecError:
    return CodecError(f"invalid input syntax for type {what}", INVALID_DATETIME_FORMAT)


def _overflow(what: str) -> CodecError:
    return CodecError(f"{what} out of range", DATETIME_FIELD_OVERFLOW)


@dataclass(frozen=True, slots=True)
class _Parsed:
    days: int  # since 2000-01-01
    usec: int  # since local midnight
    offset: int | None  # seconds east of UTC, None if not given


def _parse(text: bytes, what: str) -> _Parsed | int:
    """Parse ISO date[/time][/offset]; returns a sentinel int (±1 infinity, 0 epoch) or fields."""
    try:
        s = pg_strip(bytes(text).decode("ascii")).lower()
    except UnicodeDecodeError:
        raise _bad_format(what) from None
    if s in ("infinity", "+infinity"):
        return 1
    if s == "-infinity":
        return -1
    if s == "epoch":
        return 0
    m = _DT_RE.fullmatch(s)
    if m is None:
        raise _bad_format(what)
    y, mo, d = int(m["y"]), int(m["mo"]), int(m["d"])
    if len(m["y"]) > 9:
        raise _overflow(what)
    if m["era"] == "bc":
        if y == 0:
            raise _overflow(f"date/time field value for {what}")
        y = 1 - y
    elif y == 0:
        raise _overflow(f"date/time field value for {what}")
    if not 1 <= mo <= 12 or not 1 <= d <= days_in_month(y, mo):
        raise _overflow(f"date/time field value for {what}")
    usec = 0
    if m["H"] is not None:
        hh, mm, ss = int(m["H"]), int(m["M"]), int(m["S"] or 0)
        frac = m["f"] or ""
        # round half to even at the microsecond, like rint() in PostgreSQL
        micro = int((frac + "000000")[:6])
        rest = frac[6:]
        if rest and (rest[0] > "5" or (rest[0] == "5" and (rest[1:].strip("0") or micro % 2))):
            micro += 1
        if mm > 59 or ss > 60 or hh > 24 or (hh == 24 and (mm or ss or micro)):
            raise _overflow(f"date/time field value for {what}")
        usec = ((hh * 60 + mm) * 60 + ss) * USEC_PER_SEC + micro
    offset = None
    if m["tz"] is not None:
        tzs = m["tz"]
        if tzs in ("z", "utc", "gmt"):
            offset = 0
        else:
            tm = _TZ_RE.fullmatch(tzs)
            assert tm is not None
            sign, th, tmin, tsec = tm.groups()
            th, tmin, tsec = int(th), int(tmin or 0), int(tsec or 0)
            offset = th * 3600 + tmin * 60 + tsec
            if tmin > 59 or tsec > 59 or offset > MAX_TZ_SECONDS:
                raise CodecError("time zone displacement out of range", INVALID_TZ_DISPLACEMENT)
            if sign == "-":
                offset = -offset
    return _Parsed(pg_days(y, mo, d), usec, offset)


def _clamp_dt(us: int) -> datetime.datetime:
    us = min(max(us, _DT_MIN_US), _DT_MAX_US)
    return _EPOCH_2000 + datetime.timedelta(microseconds=us)


def _seconds(delta: datetime.timedelta | None) -> int:
    if delta is None:
        raise ValueError("tzinfo without a UTC offset")
    return delta // datetime.timedelta(seconds=1)


def utc_offset_at(tz: datetime.tzinfo, utc_us: int) -> int:
    """Seconds east of UTC that `tz` observes at an instant (µs since 2000 UTC).

    Outside datetime's years 1..9999 the offset of the nearest representable instant is
    used (the zone's LMT before, its final rule after), as PostgreSQL extends its tzdata.
    """
    if isinstance(tz, datetime.timezone):
        return _seconds(tz.utcoffset(None))
    utc = _clamp_dt(utc_us).replace(tzinfo=tz)
    return _seconds(tz.fromutc(utc).utcoffset())


def local_offset(tz: datetime.tzinfo, local_us: int) -> int:
    """Offset for a local wall time; ambiguous or skipped times take the later instant."""
    if isinstance(tz, datetime.timezone):
        return _seconds(tz.utcoffset(None))
    naive = _clamp_dt(local_us)
    off0 = _seconds(naive.replace(tzinfo=tz, fold=0).utcoffset())
    off1 = _seconds(naive.replace(tzinfo=tz, fold=1).utcoffset())
    return min(off0, off1)


def _format_offset(seconds: int) -> str:
    sign = "-" if seconds < 0 else "+"
    h, rem = divmod(abs(seconds), 3600)
    mi, se = divmod(rem, 60)
    if se:
        return f"{sign}{h:02d}:{mi:02d}:{se:02d}"
    if mi:
        return f"{sign}{h:02d}:{mi:02d}"
    return f"{sign}{h:02d}"


@dataclass(frozen=True, slots=True)
class DateCodec:
    name: str = "date"
    oid: int = 1082
    binary_is_canonical: ClassVar[bool] = True

    def from_text(self, data: bytes, tz: datetime.tzinfo = UTC) -> bytes:
        p = _parse(data, "date")
        if isinstance(p, int):
            days = {1: DATE_NOEND, -1: DATE_NOBEGIN, 0: UNIX_EPOCH_DAYS}[p]
        else:
            days = p.days
            if not MIN_DATE <= days < END_DATE:
                raise _overflow("date")
        return _I32.pack(days)

    def from_binary(self, data: bytes) -> bytes:
        try:
            (days,) = _I32.unpack(data)
        except struct.error:
            raise CodecError(
                "incorrect binary data format for date", INVALID_BINARY_REPRESENTATION
            ) from None
        if days not in (DATE_NOEND, DATE_NOBEGIN) and not MIN_DATE <= days < END_DATE:
            raise _overflow("date")
        return bytes(data)

    def to_text(self, canonical: bytes, tz: datetime.tzinfo = UTC) -> bytes:
        (days,) = _I32.unpack(canonical)
        if days == DATE_NOEND:
            return b"infinity"
        if days == DATE_NOBEGIN:
            return b"-infinity"
        text, bc = format_ymd(*pg_civil(days))
        return (text + " BC" if bc else text).encode()

    def to_binary(self, canonical: bytes) -> bytes:
        return canonical

    def equality_key(self, canonical: bytes) -> bytes:
        return canonical


@dataclass(frozen=True, slots=True)
class TimestamptzCodec:
    name: str = "timestamptz"
    oid: int = 1184
    binary_is_canonical: ClassVar[bool] = True
    tz_dependent: ClassVar[bool] = True  # to_text prints the instant in the session TimeZone

    def from_text(self, data: bytes, tz: datetime.tzinfo = UTC) -> bytes:
        p = _parse(data, "timestamp with time zone")
        if isinstance(p, int):
            return _I64.pack({1: TS_NOEND, -1: TS_NOBEGIN, 0: UNIX_EPOCH_DAYS * USEC_PER_DAY}[p])
        local_us = p.days * USEC_PER_DAY + p.usec
        offset = p.offset if p.offset is not None else local_offset(tz, local_us)
        us = local_us - offset * USEC_PER_SEC
        if not MIN_TIMESTAMP <= us < END_TIMESTAMP:
            raise _overflow("timestamp")
        return _I64.pack(us)

    def from_binary(self, data: bytes) -> bytes:
        try:
            (us,) = _I64.unpack(data)
        except struct.error:
            raise CodecError(
                "incorrect binary data format for timestamptz", INVALID_BINARY_REPRESENTATION
            ) from None
        if us not in (TS_NOEND, TS_NOBEGIN) and not MIN_TIMESTAMP <= us < END_TIMESTAMP:
            raise _overflow("timestamp")
        return bytes(data)

    def to_text(self, canonical: bytes, tz: datetime.tzinfo = UTC) -> bytes:
        (us,) = _I64.unpack(canonical)
        if us == TS_NOEND:
            return b"infinity"
        if us == TS_NOBEGIN:
            return b"-infinity"
        offset = utc_offset_at(tz, us)
        local = us + offset * USEC_PER_SEC
        days, tod = divmod(local, USEC_PER_DAY)
        date, bc = format_ymd(*pg_civil(days))
        secs, micro = divmod(tod, USEC_PER_SEC)
        mi, se = divmod(secs, 60)
        hh, mi = divmod(mi, 60)
        frac = f".{micro:06d}".rstrip("0") if micro else ""
        text = f"{date} {hh:02d}:{mi:02d}:{se:02d}{frac}{_format_offset(offset)}"
        return (text + " BC" if bc else text).encode()

    def to_binary(self, canonical: bytes) -> bytes:
        return canonical

    def equality_key(self, canonical: bytes) -> bytes:
        return canonical


DATE = DateCodec()
TIMESTAMPTZ = TimestamptzCodec()
