"""Token extents for the rewriter: where a literal, cast or column name ends.

libpg_query gives each parse node only a *start* location (a byte offset).  To replace a
literal we also need its end, including the syntax that belongs to it (``'x'::date``,
``CAST('x' AS date)``, ``DATE 'x'``, ``-5``, ``U&'..' UESCAPE '!'``).  The lexer knows
token boundaries, so we take them from ``pglast.parser.scan`` instead of guessing with
regular expressions.  ``scan`` reports *character* indexes (pglast converts them); this
module converts back to UTF-8 byte offsets, the unit the parse tree and plans use.
"""

from __future__ import annotations

from itertools import accumulate

from pglast.parser import scan

_OPEN = {"ASCII_40": "ASCII_41", "ASCII_91": "ASCII_93"}  # ( ) and [ ]
_DOT = "ASCII_46"
_COMMENTS = frozenset({"C_COMMENT", "SQL_COMMENT"})
_SIGNS = frozenset({"ASCII_45", "ASCII_43"})  # - +
_INTERVAL_FIELDS = frozenset({"YEAR_P", "MONTH_P", "DAY_P", "HOUR_P", "MINUTE_P", "SECOND_P", "TO"})


class TokenError(Exception):
    """The token stream does not look like the parse tree said; refuse (fail closed)."""


class Tokens:
    """Tokens of one SQL string with byte offsets; ``end`` is exclusive."""

    __slots__ = ("by_end", "by_start", "ends", "names", "raw", "starts")

    def __init__(self, sql: str) -> None:
        # Comments are not tokens to the grammar: `( 'x' /* c */ )` is a parenthesised
        # value, `'x' -- c\n ::text` a cast. Kept, they would hide adjacency.
        toks = [t for t in scan(sql) if t.name not in _COMMENTS]
        self.raw = sql.encode()
        if sql.isascii():
            self.starts = [t.start for t in toks]
            self.ends = [t.end + 1 for t in toks]
        else:
            # byte offset of each character index (and of the end)
            offs = [0, *accumulate(len(c.encode()) for c in sql)]
            self.starts = [offs[t.start] for t in toks]
            self.ends = [offs[t.end + 1] for t in toks]
        self.names = [t.name for t in toks]
        self.by_start = {s: i for i, s in enumerate(self.starts)}
        self.by_end = {e: i for i, e in enumerate(self.ends)}

    def at(self, location: int) -> int:
        """Index of the token starting at byte ``location``."""
        try:
            return self.by_start[location]
        except KeyError:
            raise TokenError(f"no token at byte {location}") from None

    def ending(self, end: int) -> int:
        """Index of the token ending at byte ``end`` (exclusive)."""
        try:
            return self.by_end[end]
        except KeyError:
            raise TokenError(f"no token ends at byte {end}") from None

    def parens_between(self, lo: int, hi: int, name: str) -> int:
        """How many tokens strictly between ``lo`` and ``hi`` there are, all of which must
        be ``name`` (``ASCII_40`` / ``ASCII_41``): the redundant parentheses that pglast
        drops from the tree, e.g. between ``::`` and the value it casts."""
        gap = range(lo + 1, hi)
        if any(self.names[j] != name for j in gap):
            raise TokenError("expected only parentheses between a value and its operator")
        return len(gap)

    def wrap(self, first: int, last: int, n: int) -> tuple[int, int]:
        """Widen the extent ``first..last`` by ``n`` enclosing pairs of parentheses,
        checking that they are there."""
        if first - n < 0 or any(
            self.name(first - k) != "ASCII_40" or self.name(last + k) != "ASCII_41"
            for k in range(1, n + 1)
        ):
            raise TokenError("expected parentheses around a value")
        return first - n, last + n

    def redundant_parens(self, first: int, last: int) -> int:
        """How many pairs of parentheses enclose exactly ``first..last`` (a balanced
        expression): ``((x))`` has 2.  The caller decides whether the outermost pair is
        syntax of the enclosing construct (a one-item VALUES row)."""
        n = 0
        while self.name(first - n - 1) == "ASCII_40" and self.name(last + n + 1) == "ASCII_41":
            n += 1
        return n

    def name(self, i: int) -> str:
        """Token name (``SCONST``, ``IDENT``, ``ASCII_44``...), '' past the end."""
        return self.names[i] if 0 <= i < len(self.names) else ""

    def text(self, i: int) -> str:
        """Source text of token ``i``."""
        return self.raw[self.starts[i] : self.ends[i]].decode()

    def const_last(self, i: int) -> int:
        """Last token of the constant starting at token ``i`` (sign, UESCAPE included)."""
        if self.names[i] in _SIGNS:
            i += 1
            if self.name(i) == "ASCII_40":  # -(5), -(-5): the parser folds the sign in
                n = 0
                while self.name(i + n) == "ASCII_40":
                    n += 1
                return self.wrap(i + n, self.const_last(i + n), n)[1]
        if self.name(i) == "USCONST" and self.name(i + 1) == "UESCAPE":
            i += 2
        if self.name(i) not in {
            "SCONST",
            "USCONST",
            "ICONST",
            "FCONST",
            "BCONST",
            "XCONST",
            "TRUE_P",
            "FALSE_P",
            "NULL_P",
            "PARAM",
        }:
            raise TokenError(f"token {self.name(i)} is not a constant")
        return i

    def close(self, i: int) -> int:
        """Index of the bracket closing the one at token ``i``."""
        want = _OPEN.get(self.names[i])
        if want is None:
            raise TokenError("expected an opening bracket")
        opener, depth = self.names[i], 0
        for j in range(i, len(self.names)):
            n = self.names[j]
            if n == opener:
                depth += 1
            elif n == want:
                depth -= 1
                if depth == 0:
                    return j
        raise TokenError("unbalanced brackets")

    def type_last(self, i: int) -> int:
        """Last token of a type name starting at token ``i``.

        Follows the grammar's multi-word type names (``timestamp with time zone``,
        ``double precision``, ``character varying``, ``national char``, interval fields),
        qualified names, modifiers and array bounds; stops before anything else (an alias,
        an operator, a keyword of the enclosing statement).
        """
        first, j = self.names[i], i
        while True:
            nxt = self.name(j + 1)
            if nxt == _DOT:
                j += 2
            elif nxt in ("VARYING", "PRECISION"):
                j += 1
            elif (
                nxt in ("WITH", "WITH_LA", "WITHOUT")
                and first in ("TIMESTAMP", "TIME")
                and self.name(j + 2) == "TIME"
                and self.name(j + 3) == "ZONE"
            ):
                j += 3
            elif first == "NATIONAL" and j == i and nxt in ("CHARACTER", "CHAR_P", "VARCHAR"):
                j += 1
            elif first == "INTERVAL" and nxt in _INTERVAL_FIELDS:
                j += 1
            elif nxt in _OPEN:
                j = self.close(j + 1)
            elif nxt == "ARRAY":
                j += 1
            else:
                return j

    def ident_path_last(self, i: int, nfields: int) -> int:
        """Last token of a dotted name of ``nfields`` parts starting at token ``i``."""
        for _ in range(nfields - 1):
            if self.name(i + 1) == "UESCAPE":
                i += 2
            if self.name(i + 1) != _DOT:
                raise TokenError("expected '.' in a qualified name")
            i += 2
        return i
