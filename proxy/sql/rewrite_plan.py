"""What the rewriter decides about one SQL string: immutable values, no logic.

Kept apart from the planner so the session, the plan cache and the tests can import the
shapes without pulling in pglast.  **All offsets are byte offsets into the UTF-8 encoding
of the SQL string** (that is what libpg_query reports); slice ``sql.encode()``, not ``sql``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from proxy.sql.protected import ProtectedColumn, TableKey

ACTION_ENCRYPT = "encrypt"
ACTION_BLIND_INDEX = "blind_index"
ACTION_RENAME = "rename"


@dataclass(frozen=True, slots=True)
class Splice:
    """Replace bytes ``[start, end)`` of the SQL with ``prefix`` + new text.

    - ``encrypt``: new text is the ciphertext of ``literal`` (parsed with the column's
      logical-type text codec, sealed with the column's mode) as ``'\\x<hex>'::bytea``.
    - ``blind_index``: new text is the blind index of ``literal`` as ``'\\x<hex>'::bytea``.
    - ``rename``: new text is ``replacement`` verbatim (an identifier, ``$n``, ``, col``).

    ``start == end`` is an insertion (used to add a blind-index sibling column and its
    value to INSERT/UPDATE/COPY); insertions sort after a splice ending at the same byte.
    """

    start: int
    end: int
    action: str
    column: ProtectedColumn
    literal: str | None = None
    replacement: str | None = None
    prefix: str = ""


@dataclass(frozen=True, slots=True)
class ParamAction:
    """Bind parameter ``$n`` must be sealed (``encrypt``) or hashed (``blind_index``)."""

    action: str
    column: ProtectedColumn


@dataclass(frozen=True, slots=True)
class DerivedParam:
    """A parameter the session appends to Bind: ``action`` applied to ``$source``'s value.

    Needed when the app writes ``$1`` into a blind-indexed column: the sibling index column
    must be written too, from the same plaintext, and the app did not send it.
    """

    number: int
    source: int
    action: str
    column: ProtectedColumn


@dataclass(frozen=True, slots=True)
class Recheck:
    """A blind-index lookup whose matches the session re-filters on the decrypted value.

    Blind indexes are truncated HMACs, so distinct plaintexts can share one.  For an
    ``=`` / ``IN`` condition ANDed into the WHERE of a plain top-level SELECT, the
    rewriter appends the searched column to the select list as a hidden column (after
    the client's columns, in ``recheck`` order, per statement); the session decrypts
    it, drops each row whose value is none of ``literals`` / ``params`` (``$n``), and
    strips the hidden columns from RowDescription and DataRow, so the client sees
    exactly the rows plaintext equality returns, in the shape it asked for.
    """

    column: ProtectedColumn
    statement: int  # index of the statement in the SQL string
    literals: tuple[str, ...] = ()
    params: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class CopyPlan:
    """A ``COPY`` whose data stream the session must encrypt (in) or decrypt (out).

    ``columns`` None means every column in table order (the session knows the order from
    the catalog).  ``index_columns`` are blind-index siblings the rewriter appended to the
    column list: the session appends their values, computed from ``source``, to each row.
    For ``COPY (query) TO STDOUT`` ``table`` is None and ``query_columns`` maps the output
    fields (None when the parse tree cannot tell; then RowDescription-less COPY must fail).
    """

    table: TableKey | None
    columns: tuple[str, ...] | None
    direction: str
    format: str
    options: Mapping[str, str]
    index_columns: tuple[tuple[str, ProtectedColumn], ...] = ()
    query_columns: tuple[ProtectedColumn | None, ...] | None = None


CopyStep = tuple[str, CopyPlan | None]
"""One COPY to or from the client in a SQL string: its direction ("in": FROM STDIN,
"out": TO STDOUT) and its plan, None when nothing it moves is protected (its data passes
as is). Every such COPY has one, in statement order, so that the session can tell which
COPY a data stream belongs to (a second COPY in one Query, a re-executed statement)."""

OutputColumns = tuple[ProtectedColumn | None, ...] | None
"""Per result column: the protected column it is a plain reference to, else None.
The whole value is None when the parse tree cannot tell (``*`` over a table whose column
order is unknown); the session then relies on RowDescription's table OID / attnum."""


@dataclass(frozen=True, slots=True)
class RewritePlan:
    """Everything the session needs to forward one SQL string safely.

    ``refusal`` set: the statement must not be forwarded; the message names the column
    (``schema.table.column``), says what is possible instead and never quotes a value.
    ``columns_selected`` has one entry per statement in the string, in order.
    """

    touches_protected: bool
    splices: tuple[Splice, ...] = ()
    params: Mapping[int, ParamAction] = field(default_factory=dict)
    derived_params: tuple[DerivedParam, ...] = ()
    refusal: str | None = None
    recheck: tuple[Recheck, ...] = ()
    join_pairs: tuple[tuple[ProtectedColumn, ProtectedColumn], ...] = ()
    copies: tuple[CopyStep, ...] = ()
    tables_referenced: frozenset[TableKey] = frozenset()
    columns_selected: tuple[OutputColumns, ...] = ()
    # SQLSTATE of ``refusal``: 0A000 (encryption cannot do it), 42501 (a storage column
    # of the proxy named: no role may, so it is a permission matter).
    refusal_sqlstate: str = "0A000"
    # Per statement: result positions that are storage columns, with the protected column
    # each serves (only when planning a view's definition, `storage_ok`).
    storage_selected: tuple[Mapping[int, ProtectedColumn], ...] = ()

    @property
    def copy(self) -> CopyPlan | None:
        """The first COPY whose data the session transforms (None: no such COPY)."""
        return next((cp for _d, cp in self.copies if cp is not None), None)


NO_PROTECTED = RewritePlan(touches_protected=False)
"""Shared plan for statements that touch no protected table: forward unchanged."""
