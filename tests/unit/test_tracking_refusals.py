"""What the tracker answers where it cannot do what was asked: never an internal error,
never a hidden column."""

from __future__ import annotations

from proxy.protocol import messages as m
from proxy.tracking import REFUSAL_MARK, _error_without_hidden_formats, refusal_error


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


def test_a_refusals_error_loses_its_context_and_mark_only() -> None:
    msg = _error(b"SERROR", b"VERROR", b"C42501", b"Mpermission denied by strongroom",
                 b"WPL/pgSQL function inline_code_block line 1 at RAISE", b"s" + REFUSAL_MARK,
                 b"Fpl_exec.c", b"L3891", b"Rexec_stmt_raise")
    chunk = b"xx" + msg + b"yy"
    assert refusal_error(chunk, 2, 2 + len(msg)) == _error(
        b"SERROR", b"VERROR", b"C42501", b"Mpermission denied by strongroom",
        b"Fpl_exec.c", b"L3891", b"Rexec_stmt_raise")


def test_a_users_error_is_not_a_refusal() -> None:
    msg = _error(b"SERROR", b"C42501", b"Mpermission denied by strongroom",
                 b"WPL/pgSQL function inline_code_block line 1 at RAISE", b"sother")
    assert refusal_error(msg) is None
