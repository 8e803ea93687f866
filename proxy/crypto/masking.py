"""Masks for columns a role may see only partly (policy view `masked`).

Pure functions over `str`. They work on user-perceived characters (an approximation of
Unicode grapheme clusters: a base character with its combining marks, variation selectors,
emoji modifiers, ZWJ sequences and regional-indicator pairs), so a mask never splits an
accented letter or an emoji and never produces invalid text.

Masks that keep characters only apply to text types; for any other logical type the only
masks are `null` (the default) and `fixed` (a constant literal), because `****` is not a
number or a date.

A mask never reveals more than half of a value: at most floor(n / 2) of its n characters
appear in the output (see `revealed_limit`). Each mask therefore has a minimum length
below which it shows less (the same list is in the README):

- `last4`: the last 4 characters, length kept, from 8 characters; shorter: all `*`.
- `first6last4`: first 6 and last 4, length kept, from 20 characters; shorter: `last4`
  (so a 16-digit PAN shows its last 4 only).
- `{keep_prefix: p, keep_suffix: s}`: from 2 * (p + s) characters; shorter: all masked.
- `email`: `***@` + the domain of an address `x@y.z` when `@` + domain is at most half;
  else `***@***` + the longest run of trailing labels that fits (`***@***.com`); else,
  and for anything that is not `x@y.z`, `****`. The local part is never shown.
- `redact`: `****` (not even the length); `null`, `{fixed: ...}`: nothing of the value.

NULL stays NULL for every mask. An empty value stays empty for the length-keeping masks
(their output has the value's length anyway, so emptiness is already shown) and becomes
`****` for `redact` and `email`, which hide the length.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Mapping
from functools import wraps
from typing import Any

Masker = Callable[[str | None], str | None]

TEXT_TYPES = frozenset({"text", "varchar"})
MASK_CHAR = "*"
_ZWJ = "\u200d"


class MaskConfigError(ValueError):
    """A mask specification is invalid for the column it is attached to."""


def _extends(ch: str) -> bool:
    """True if `ch` belongs to the cluster of the character before it."""
    o = ord(ch)
    return (
        unicodedata.category(ch) in ("Mn", "Me", "Mc")
        or 0xFE00 <= o <= 0xFE0F  # variation selectors
        or 0xE0100 <= o <= 0xE01EF
        or 0x1F3FB <= o <= 0x1F3FF  # emoji skin-tone modifiers
        or 0xE0020 <= o <= 0xE007F  # tag characters (flag sequences)
        or ch == _ZWJ
    )


def _is_regional(ch: str) -> bool:
    return 0x1F1E6 <= ord(ch) <= 0x1F1FF


def graphemes(s: str) -> list[str]:
    """Split into approximate grapheme clusters (see module docstring)."""
    out: list[str] = []
    for ch in s:
        if out and (_extends(ch) or out[-1].endswith(_ZWJ)):
            out[-1] += ch
        elif (
            out and _is_regional(ch) and len(out[-1]) == 1 and _is_regional(out[-1])
        ):  # second half of a flag
            out[-1] += ch
        else:
            out.append(ch)
    return out


def revealed_limit(n: int) -> int:
    """How many of a value's `n` characters a mask may show: half, rounded down. More
    than half turns a "partial" view into most of the value (`*2345` of `12345`), and a
    short value is exactly where a fixed number of kept characters is most of it."""
    return n // 2


def _keeps_null(fn: Callable[[str], str | None]) -> Masker:
    """NULL is shown as NULL by every mask: it says nothing the column's NULL-ness
    does not already say, and `****` for a NULL would invent a value."""

    @wraps(fn)
    def masker(value: str | None) -> str | None:
        return None if value is None else fn(value)

    return masker


def keep(value: str, prefix: int, suffix: int, char: str = MASK_CHAR) -> str:
    """Replace each character by `char` except the first `prefix` and last `suffix`.

    Length (in characters) is kept. The kept characters are shown only when they are at
    most half of the value (n >= 2 * (prefix + suffix)); below that every character is
    masked.
    """
    if prefix < 0 or suffix < 0:
        raise ValueError("prefix and suffix must be >= 0")
    g = graphemes(value)
    n = len(g)
    if prefix + suffix > revealed_limit(n) or prefix + suffix >= n:
        return char * n
    return "".join(g[:prefix]) + char * (n - prefix - suffix) + "".join(g[n - suffix :])


@_keeps_null
def last4(value: str) -> str:
    """`************1234`: everything but the last 4 characters masked, length kept.
    Values under 8 characters are fully masked (4 would be more than half)."""
    return keep(value, 0, 4)


@_keeps_null
def first6last4(value: str) -> str:
    """`411111**********1111`: first 6 and last 4 kept, length kept, for values of 20
    characters or more. Shorter values (a 16-digit PAN included) get `last4`: 10 of 16
    would be more than half of the value."""
    if len(graphemes(value)) >= 20:
        return keep(value, 6, 4)
    return keep(value, 0, 4)


def _is_address(local: str, domain: str) -> bool:
    """`x@y.z`: a non-empty local part and a domain of at least two non-empty labels."""
    labels = domain.split(".")
    return bool(local) and len(labels) >= 2 and all(labels)


@_keeps_null
def email(value: str) -> str:
    """`***@example.com`: the local part always masked, the domain of a real address
    (`x@y.z`) shown when `@` + domain is at most half of the value; else `***@***.` and
    the longest run of trailing labels that fits (`***@***.com`); else, and for anything
    that is not an address, `****`. The output never shows the local part's length."""
    local, at, domain = value.rpartition("@")
    if not at or not _is_address(local, domain):
        return redact(value)
    budget = revealed_limit(len(graphemes(value)))
    if 1 + len(graphemes(domain)) <= budget:
        return f"***@{domain}"
    labels = domain.split(".")
    for i in range(1, len(labels)):
        tail = "." + ".".join(labels[i:])
        if 1 + len(graphemes(tail)) <= budget:
            return f"***@***{tail}"
    return redact(value)


@_keeps_null
def redact(value: str) -> str:
    """`****` whatever the input, so not even the length leaks."""
    return "****"


def null(value: str | None) -> None:
    """Show NULL."""
    return None


_NAMED: dict[str, Masker] = {
    "last4": last4,
    "first6last4": first6last4,
    "email": email,
    "redact": redact,
    "null": null,
}


def make_masker(spec: str | Mapping[str, Any] | None, logical_type: str) -> Masker:
    """Masker for a column from its configuration.

    `spec` is a mask name (`last4`, `first6last4`, `email`, `redact`, `null`), a custom
    `{keep_prefix: int, keep_suffix: int, char: str}`, `{fixed: "literal"}`, or None
    (the default for the type: `redact` for text, `null` otherwise). Text-keeping masks on
    non-text types are refused.
    """
    is_text = logical_type in TEXT_TYPES
    if spec is None:
        return redact if is_text else null
    if isinstance(spec, str):
        fn = _NAMED.get(spec)
        if fn is None:
            raise MaskConfigError(f"unknown mask {spec!r}; known: {sorted(_NAMED)}")
        if not is_text and fn is not null:
            raise MaskConfigError(
                f"mask {spec!r} only applies to text columns; use 'null' or {{fixed: ...}}"
                f" for {logical_type}"
            )
        return fn
    if not isinstance(spec, Mapping):
        raise MaskConfigError("a mask is a name or a mapping")
    if set(spec) == {"fixed"}:
        fixed = spec["fixed"]
        if not isinstance(fixed, str):
            raise MaskConfigError("fixed mask value must be a string literal")
        if not is_text:
            from proxy.types import CodecError, get_codec

            try:
                get_codec(logical_type).from_text(fixed.encode())
            except CodecError:
                raise MaskConfigError(f"fixed mask is not a valid {logical_type}") from None
        return _keeps_null(lambda value: fixed)
    allowed = {"keep_prefix", "keep_suffix", "char"}
    if not set(spec) <= allowed:
        raise MaskConfigError(f"custom mask keys are {sorted(allowed)}")
    if not is_text:
        raise MaskConfigError(f"custom masks only apply to text columns, not {logical_type}")
    prefix = spec.get("keep_prefix", 0)
    suffix = spec.get("keep_suffix", 0)
    char = spec.get("char", MASK_CHAR)
    if not (isinstance(prefix, int) and isinstance(suffix, int)) or prefix < 0 or suffix < 0:
        raise MaskConfigError("keep_prefix and keep_suffix must be integers >= 0")
    if not isinstance(char, str) or len(graphemes(char)) != 1:
        raise MaskConfigError("char must be exactly one character")
    return _keeps_null(lambda value: keep(value, prefix, suffix, char))
