"""Masks: shapes, Unicode safety, and refusal of text masks on non-text types."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.crypto import masking as m


@pytest.mark.parametrize(
    ("fn", "value", "expected"),
    [
        (m.last4, "4111111111111234", "************1234"),
        (m.last4, "12345", "*2345"),
        (m.last4, "1234", "****"),  # never reveal the whole value
        (m.last4, "", ""),
        (m.first6last4, "4111111111111234", "411111******1234"),
        (m.first6last4, "4111111234", "**********"),
        (m.email, "john.doe@example.com", "j***@example.com"),
        (m.email, "j@example.com", "***@example.com"),
        (m.email, '"a@b"@example.com', '"***@example.com'),
        (m.email, "not-an-address", "****"),
        (m.email, "trailing@", "****"),
        (m.redact, "anything at all", "****"),
        (m.redact, "", "****"),
        (m.null, "x", None),
        # Unicode: whole characters, combining marks and emoji sequences stay intact
        (m.last4, "ñandú🇪🇸e\u0301x", "****ú🇪🇸e\u0301x"),
        (m.last4, "👍🏽👍🏽👍🏽👍🏽👍🏽", "*👍🏽👍🏽👍🏽👍🏽"),
        (m.last4, "👨\u200d👩\u200d👧abcd", "*abcd"),
        (m.email, "élodie@exämple.fr", "é***@exämple.fr"),
    ],
)
def test_masks(fn, value: str, expected: str | None) -> None:  # type: ignore[no-untyped-def]
    assert fn(value) == expected


def test_custom_and_config() -> None:
    f = m.make_masker({"keep_prefix": 2, "keep_suffix": 1, "char": "#"}, "text")
    assert f("abcdef") == "ab###f"
    assert m.make_masker("last4", "varchar")("123456") == "**3456"
    assert m.make_masker(None, "text")("x") == "****"
    assert m.make_masker(None, "numeric")("12.5") is None
    assert m.make_masker("null", "date")("2024-01-01") is None
    assert m.make_masker({"fixed": "0"}, "numeric")("12.5") == "0"


@pytest.mark.parametrize(
    ("spec", "typ"),
    [
        ("last4", "numeric"),
        ("email", "date"),
        ({"keep_prefix": 1}, "int4"),
        ("nope", "text"),
        ({"keep_prefix": -1}, "text"),
        ({"char": "ab"}, "text"),
        ({"bogus": 1}, "text"),
        ({"fixed": "not a date"}, "date"),
        (3, "text"),
    ],
)
def test_bad_config(spec, typ: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(m.MaskConfigError):
        m.make_masker(spec, typ)


@given(st.text(), st.integers(0, 8), st.integers(0, 8))
def test_keep_properties(s: str, prefix: int, suffix: int) -> None:
    out = m.keep(s, prefix, suffix)
    g, go = m.graphemes(s), m.graphemes(out)
    assert len(go) == len(g)  # length in characters is kept
    assert "".join(g) == s  # clustering loses nothing
    out.encode("utf-8", "surrogatepass")
    if len(g) and prefix + suffix >= len(g):
        assert set(out) == {"*"}
    if s and len(g) <= 4:
        assert m.last4(s) == "*" * len(g)
