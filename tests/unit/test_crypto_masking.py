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
        (m.last4, "12345678", "****5678"),  # 4 of 8: exactly half
        (m.last4, "12345", "*****"),  # issue 17: `*2345` showed 4 of 5
        (m.last4, "1234567", "*******"),
        (m.last4, "1234", "****"),  # never reveal the whole value
        (m.last4, "", ""),
        (m.last4, None, None),
        (m.first6last4, "41111122223333441234", "411111**********1234"),  # 10 of 20
        (m.first6last4, "41111111111", "*******1111"),  # issue 17: showed 10 of 11
        (m.first6last4, "4111111111111234", "************1234"),  # 16-digit PAN: last4
        (m.first6last4, "4111111", "*******"),
        (m.first6last4, "4111111234", "******1234"),
        (m.first6last4, "", ""),
        (m.first6last4, None, None),
        (m.email, "jonathan.smith@example.com", "***@example.com"),
        (m.email, "john.doe@example.com", "***@***.com"),  # @example.com: 12 of 20
        (m.email, "j@example.com", "***@***.com"),
        (m.email, "a@b.c", "****"),  # even `@.c` would be 3 of 5
        (m.email, "someone@mail.example.co.uk", "***@***.co.uk"),  # 15 of 26 with example
        (m.email, '"a@b"@example.com', "***@***.com"),
        (m.email, "not-an-address", "****"),
        (m.email, "trailing@", "****"),
        (m.email, "x@localhost", "****"),  # not x@y.z
        (m.email, "secretsecret@.com", "****"),
        (m.email, "@example.com", "****"),
        (m.email, "x@@secret-tail", "****"),  # issue 17: showed what follows the @
        (m.email, "", "****"),
        (m.email, None, None),
        (m.redact, "anything at all", "****"),
        (m.redact, "", "****"),
        (m.redact, None, None),
        (m.null, "x", None),
        (m.null, None, None),
        # Unicode: whole characters, combining marks and emoji sequences stay intact
        (m.last4, "ñandú🇪🇸e\u0301x", "****ú🇪🇸e\u0301x"),
        (m.last4, "👍🏽👍🏽👍🏽👍🏽👍🏽", "*****"),
        (m.last4, "👍🏽👍🏽👍🏽👍🏽👍🏽👍🏽👍🏽👍🏽", "****👍🏽👍🏽👍🏽👍🏽"),
        (m.last4, "👨\u200d👩\u200d👧abcdefg", "****defg"),
        (m.email, "élodie.durand@exämple.fr", "***@exämple.fr"),
    ],
)
def test_masks(fn, value: str, expected: str | None) -> None:  # type: ignore[no-untyped-def]
    assert fn(value) == expected


def test_custom_and_config() -> None:
    f = m.make_masker({"keep_prefix": 2, "keep_suffix": 1, "char": "#"}, "text")
    assert f("abcdef") == "ab###f"
    assert m.make_masker("last4", "varchar")("12345678") == "****5678"
    assert m.make_masker("last4", "varchar")("123456") == "******"
    assert m.make_masker({"keep_prefix": 2, "keep_suffix": 1}, "text")("abcde") == "*****"
    assert m.make_masker({"fixed": "x"}, "text")(None) is None
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


# Every mask that keeps characters of the value, custom ones included. `fixed` shows a
# configured literal, nothing of the value, and is checked on its own below.
_MASKS: list[tuple[str, m.Masker]] = [
    (name, m.make_masker(name, "text")) for name in ("last4", "first6last4", "email",
                                                    "redact", "null")
] + [
    (f"keep {p},{q}", m.make_masker({"keep_prefix": p, "keep_suffix": q, "char": c}, "text"))
    for p, q, c in ((0, 1, "*"), (1, 0, "*"), (2, 3, "#"), (0, 10, "*"), (7, 7, "#"))
]
_MASK_CHARS = "*#"
# Values without the mask characters, so that every character of the output that is not
# a mask character is one the value revealed; short values and addresses are favoured.
_TEXT = st.characters(blacklist_characters=_MASK_CHARS, blacklist_categories=("Cs",))
_VALUES = st.one_of(
    st.text(_TEXT, max_size=3),
    st.text(_TEXT, max_size=30),
    st.text(st.sampled_from("ab.@1"), max_size=25),
    st.builds(lambda a, b, c: f"{a}@{b}.{c}", st.text(_TEXT, max_size=12),
              st.text(_TEXT, max_size=12), st.text(_TEXT, max_size=6)),
)


def _revealed(out: str) -> int:
    return sum(1 for g in m.graphemes(out) if g not in _MASK_CHARS)


@pytest.mark.parametrize(("name", "fn"), _MASKS, ids=[n for n, _ in _MASKS])
@given(value=_VALUES)
def test_never_more_than_half_revealed(name: str, fn: m.Masker, value: str) -> None:
    """Issue 17: whatever the value, a mask shows at most half of its characters
    (rounded down); NULL stays NULL."""
    out = fn(value)
    n = len(m.graphemes(value))
    if out is not None:
        assert _revealed(out) <= n // 2, (name, value, out)
        assert _revealed(out) <= m.revealed_limit(n)
    assert fn(None) is None


@pytest.mark.parametrize(("name", "fn"), _MASKS, ids=[n for n, _ in _MASKS])
@pytest.mark.parametrize("value", ["", "a", "ab", "abc", "abcd", "abcde", "a@b", "a@b.c",
                                   "@", "@@", "\u00e9", "👍🏽👍🏽"])
def test_short_and_empty_values(name: str, fn: m.Masker, value: str) -> None:
    """Short values: at most half shown; an empty value stays empty (length-keeping
    masks) or becomes `****` (masks that hide the length), never NULL."""
    out = fn(value)
    if name == "null":
        assert out is None
        return
    assert out is not None
    assert _revealed(out) <= len(m.graphemes(value)) // 2
    if value == "":
        assert out in ("", "****")


def test_fixed_shows_nothing_of_the_value() -> None:
    f = m.make_masker({"fixed": "n/a"}, "text")
    assert f("secret") == f("") == "n/a"
    assert f(None) is None
