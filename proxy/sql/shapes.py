"""Statement shapes: recognise "the same statement with other integers" without a parse.

`pgbench -M simple`, and apps that inline ids into SQL, send texts that differ only in
integer literals. The analysis cache's template level answers them after one pglast
`normalize` per text (4-6 us hot, about twice that under load), which in simple mode is
most of the proxy's own work per statement. A shape is built once, with pglast's scanner,
from a text the template level just analysed: the text cut at its integer constants.
A new text has that shape when it is the same bytes with other runs of ASCII digits in
the constants' places, and then it has the same template.

Why that holds: a shape is only built when each integer constant is preceded by a
character that cannot end a token a digit would extend (not a letter, digit, `_`, `$`
or `.`) and followed by one that cannot continue a number (whitespace, end of text, or
one of `();,[]=<>+-*/%^|:`). With the same bytes around it, any run of decimal digits in
that place scans as one integer constant (or, past int64, one numeric constant), and
normalisation replaces both with the same `$n`: same template, same analysis. Anything
else (a sign, a string, a float, a different keyword) does not match, and the text goes
the normal way.

A shape keeps the text around its holes, so it is only built for texts whose constants
are all integers: a string or numeric literal (a protected column's value) is never
kept in a shape (see proxy.sql.cache).
"""

from __future__ import annotations

from pglast import parser

_BEFORE_UNSAFE = frozenset("_$.")  # besides letters and digits
# Shapes pay off for short statements sent again and again; scanning a long text costs
# a token object per token on the event loop (a 2.7 MB IN list: most of a second).
MAX_SHAPE_TEXT = 8192
_AFTER_SAFE = frozenset(" \t\n\r\f\v();,[]=<>+-*/%^|:")
# Literals other than integer constants: a text with one gets no shape (it would be kept).
_OTHER_CONSTANTS = frozenset({"SCONST", "USCONST", "BCONST", "XCONST", "FCONST"})


class Shape:
    """A text with holes where its integer constants were; see the module docstring."""

    __slots__ = ("head", "middle", "tail")

    def __init__(self, pieces: list[str]) -> None:
        self.head = pieces[0]  # before the first constant
        self.middle = tuple(pieces[1:-1])  # between constants, each non-empty
        self.tail = pieces[-1]  # after the last constant (may be empty)

    def matches(self, text: str) -> bool:
        """Whether `text` is this shape's text with other digit runs in its holes."""
        head = self.head
        if not text.startswith(head):
            return False
        pos = len(head)
        find = text.find
        for fixed in self.middle:
            end = find(fixed, pos)  # fixed starts with a non-digit: the run ends there
            if end <= pos:
                return False
            run = text[pos:end]
            if not (run.isascii() and run.isdigit()):
                return False
            pos = end + len(fixed)
        tail = self.tail
        if tail:
            if not text.endswith(tail):
                return False
            end = len(text) - len(tail)
        else:
            end = len(text)
        if end <= pos:
            return False
        run = text[pos:end]
        return run.isascii() and run.isdigit()


def shape_of(text: str) -> Shape | None:
    """The shape of `text`, or None when it has no integer constant or one whose
    surroundings are not known to be safe (see the module docstring)."""
    if len(text) > MAX_SHAPE_TEXT:
        return None
    if not text.isascii():  # scanner offsets are bytes; ASCII keeps them str offsets
        return None
    try:
        tokens = parser.scan(text)
    except Exception:
        return None
    pieces: list[str] = []
    last = 0
    for token in tokens:
        if token.name != "ICONST":
            if token.name in _OTHER_CONSTANTS:
                return None
            continue
        start, stop = token.start, token.end + 1
        if not text[start:stop].isdigit():
            return None  # 0x1F, 1_000: a plain digit run would not be the same bytes
        before = text[start - 1] if start else " "
        if before.isalnum() or before in _BEFORE_UNSAFE:
            return None
        if stop < len(text) and text[stop] not in _AFTER_SAFE:
            return None
        pieces.append(text[last:start])
        last = stop
    if not pieces:
        return None
    pieces.append(text[last:])
    if not all(pieces[1:-1]):
        return None  # two constants with nothing between: never scanned so, but be sure
    return Shape(pieces)
