"""Proleptic Gregorian day arithmetic over any integer year (astronomical: 1 BC is year 0).

Python's `datetime` stops at years 1..9999; PostgreSQL dates run from 4714 BC to
5874897 AD, so date and timestamp codecs do their calendar math here. Algorithms from
Howard Hinnant, "chrono-Compatible Low-Level Date Algorithms".
"""

from __future__ import annotations

PG_EPOCH_DAYS = 10957  # 2000-01-01 in days since 1970-01-01


def is_leap(y: int) -> bool:
    return y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)


def days_in_month(y: int, m: int) -> int:
    if m == 2:
        return 29 if is_leap(y) else 28
    return 30 if m in (4, 6, 9, 11) else 31


def days_from_civil(y: int, m: int, d: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (astronomical year)."""
    y -= m <= 2
    era = y // 400
    yoe = y - era * 400
    doy = (153 * ((m + 9) % 12) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def civil_from_days(z: int) -> tuple[int, int, int]:
    """(year, month, day) of days since 1970-01-01 (astronomical year)."""
    z += 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + 3 if mp < 10 else mp - 9
    return yoe + era * 400 + (m <= 2), m, d


def pg_days(y: int, m: int, d: int) -> int:
    """Days since 2000-01-01, PostgreSQL's date representation."""
    return days_from_civil(y, m, d) - PG_EPOCH_DAYS


def pg_civil(days: int) -> tuple[int, int, int]:
    return civil_from_days(days + PG_EPOCH_DAYS)


def format_ymd(y: int, m: int, d: int) -> tuple[str, bool]:
    """ISO `YYYY-MM-DD` (years padded to 4 digits, more when needed) and whether BC."""
    if y <= 0:
        return f"{1 - y:04d}-{m:02d}-{d:02d}", True
    return f"{y:04d}-{m:02d}-{d:02d}", False
