"""What the tracker answers where it cannot do what was asked: never an internal error,
never a hidden column."""

from __future__ import annotations

from proxy.protocol import messages as m
from proxy.tracking import _error_without_hidden_formats


def _error(*fields: bytes) -> bytes:
    return m.message(b"E", b"".join(f + b"\0" for f in fields) + b"\0")


def test_counts_lose_the_hidden_columns() -> None:
    msg = _error(b"SERROR", b"C08P01", b"Mbind message has 4 result formats but query has 3 "
                 b"columns", b"Fpquery.c", b"RPortalSetResultFormat")
    assert _error_without_hidden_formats(msg, 1) == _error(
        b"SERROR", b"C08P01", b"Mbind message has 3 result formats but query has 2 columns",
        b"Fpquery.c", b"RPortalSetResultFormat")


def test_a_translated_text_loses_its_counts() -> None:
    msg = _error(b"SERROR", b"C08P01", b"MBind-Nachricht hat 4 Ergebnisformate, Anfrage hat 3",
                 b"RPortalSetResultFormat")
    out = _error_without_hidden_formats(msg, 1)
    assert out is not None and b"3" not in out and b"4" not in out


def test_other_errors_are_kept() -> None:
    assert _error_without_hidden_formats(
        _error(b"SERROR", b"C08P01", b"Mbind message supplies 2 parameters, but prepared "
               b"statement requires 1", b"Rexec_bind_message"), 1) is None
    assert _error_without_hidden_formats(
        _error(b"SERROR", b"C22023", b"Munsupported format code: 2"), 1) is None
