"""What the tracker answers where it cannot do what was asked: never an internal error,
never a hidden column."""

from __future__ import annotations

import pytest

from proxy.protocol import messages as m
from proxy.tracking import ValueError_, _copy_in, _error_without_hidden_formats


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


def test_a_copy_in_that_cannot_be_made_fails_the_copy() -> None:
    """A COPY FROM transformer that cannot be built (at the server's CopyInResponse, or
    at the client's first row) fails that COPY with the reason; it is not an internal
    error that closes the session, and no row is forwarded as sent."""

    def factory() -> object:
        raise ValueError_("0A000", "cannot apply")

    copy = _copy_in(factory)
    for step in (lambda: copy.client_data(b"1\tsecret\n"), copy.client_done):
        with pytest.raises(ValueError_) as exc:
            step()
        assert exc.value.sqlstate == "0A000"
