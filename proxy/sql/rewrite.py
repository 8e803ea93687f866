"""Plan how to keep protected-column plaintext away from the server: pure, socket-free.

A protected column is ``bytea`` in PostgreSQL while the app believes it has a logical type.
For one SQL string this module decides, from the parse tree alone:

- which literals are aimed at protected columns (written to them or compared with them):
  they become :class:`Splice` s, replaced by ciphertext (``encrypt``) or by a blind index
  (``blind_index``) before the text is forwarded;
- which ``$n`` parameters are aimed at them (:attr:`RewritePlan.params`): the session
  seals those values in Bind;
- which column references must be renamed to their blind-index sibling, and which
  companion values must be added when a blind-indexed column is written;
- what must be refused because the server would compute on ciphertext (ranges, LIKE,
  ORDER BY, functions, expressions, set operations over protected output) or because a
  value would reach a protected column by a road the proxy cannot encrypt (expressions,
  procedural code, server-side COPY files).  Failing closed is the rule: when the tree
  does not prove a construct safe, it is refused with a message naming the column and
  what is possible instead, never quoting a value;
- which result columns are plain references to protected columns (fallback for the
  session, whose primary source is RowDescription's table OID / attnum), and COPY plans.

Offsets are **UTF-8 byte offsets** into ``sql.encode()``, end exclusive, as libpg_query
reports locations; :func:`apply_splices` does the replacement.

Parsing uses ``pglast.parser.parse_sql_json`` (a few µs) and walks plain dicts; tokens
(``pglast.parser.scan``) are only built when a splice needs an end offset.  A statement
whose text cannot name a protected table returns the shared :data:`NO_PROTECTED` after
a handful of substring checks, before parsing.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from itertools import pairwise
from typing import Any

from pglast.parser import ParseError, parse_sql_json, scan

from proxy.policy.pg_builtins import PG_CATALOG_FUNCTIONS
from proxy.sql.names import quote_ident
from proxy.sql.protected import (
    FunctionResult,
    ProtectedColumn,
    ProtectedSchema,
    TableExists,
    TableKey,
    normalize_type,
)
from proxy.sql.rewrite_plan import (
    ACTION_BLIND_INDEX,
    ACTION_ENCRYPT,
    ACTION_RENAME,
    NO_PROTECTED,
    CopyPlan,
    CopyStep,
    DerivedParam,
    OutputColumns,
    ParamAction,
    Recheck,
    RewritePlan,
    Splice,
)
from proxy.sql.rewrite_tokens import TokenError, Tokens

__all__ = [
    "NO_PROTECTED",
    "ColumnOrder",
    "CopyPlan",
    "DerivedParam",
    "ParamAction",
    "PreparedLookup",
    "Recheck",
    "RewritePlan",
    "Splice",
    "apply_splices",
    "plan_statement",
]

ColumnOrder = Callable[[str, str], "tuple[str, ...] | None"]
"""``column_order(schema, table)``: the table's columns in catalog order, or None."""

PreparedLookup = Callable[[str], "RewritePlan | None"]
"""``prepared(name)``: the plan of a prepared statement (SQL PREPARE or protocol Parse)."""

Node = dict[str, Any]

# Casts a literal or parameter aimed at a protected column may carry: the cast's type
# must read the value the way the column's logical type will (the session parses the
# literal text with the logical type's codec).  Type modifiers are refused elsewhere
# because they change the value (varchar(3) truncates, numeric(5,2) rounds).
_CAST_OK: dict[str, frozenset[str]] = {
    "text": frozenset({"text", "varchar"}),
    "varchar": frozenset({"text", "varchar"}),
    "numeric": frozenset({"numeric", "int2", "int4", "int8"}),
    "int4": frozenset({"int4", "int2"}),
    "int8": frozenset({"int8", "int4", "int2"}),
    "date": frozenset({"date"}),
    "timestamptz": frozenset({"timestamptz"}),
    "bool": frozenset({"bool"}),
    "uuid": frozenset({"uuid"}),
    "jsonb": frozenset({"jsonb"}),
}

SAFE_INDEX_LENGTH = 16
"""Blind indexes of at least this many bytes (128 bits) never collide in practice; a
shorter one is accepted only where the proxy can recheck its matches (:class:`Recheck`)."""

# PostgreSQL 15's built-in aggregate and window functions (pg_proc.prokind 'a' / 'w'):
# a select list calling one cannot take the hidden recheck column.
_AGGREGATES = frozenset({
    "array_agg", "avg", "bit_and", "bit_or", "bit_xor", "bool_and", "bool_or", "corr",
    "count", "covar_pop", "covar_samp", "cume_dist", "dense_rank", "every", "first_value",
    "json_agg", "json_object_agg", "jsonb_agg", "jsonb_object_agg", "lag", "last_value",
    "lead", "max", "min", "mode", "nth_value", "ntile", "percent_rank", "percentile_cont",
    "percentile_disc", "range_agg", "range_intersect_agg", "rank", "regr_avgx", "regr_avgy",
    "regr_count", "regr_intercept", "regr_r2", "regr_slope", "regr_sxx", "regr_sxy",
    "regr_syy", "row_number", "stddev", "stddev_pop", "stddev_samp", "string_agg", "sum",
    "var_pop", "var_samp", "variance", "xmlagg",
})

_RANGE_OPS = frozenset({"<", ">", "<=", ">="})
_PATTERN_OPS = frozenset({"~", "~*", "!~", "!~*", "~~", "~~*", "!~~", "!~~*"})
_EXPR_NODES = frozenset(
    {
        "ColumnRef",
        "A_Const",
        "ParamRef",
        "FuncCall",
        "A_Expr",
        "TypeCast",
        "SubLink",
        "SelectStmt",
        "CaseExpr",
        "BoolExpr",
        "NullTest",
        "CoalesceExpr",
        "RowExpr",
    }
)


class _Refuse(Exception):
    """Internal: stop planning, the statement is refused with this message."""

    sqlstate = "0A000"


class _StorageRefuse(_Refuse):
    """Internal: the statement names a storage column of the proxy (a permission matter:
    no role may read or write one, whatever its view of the protected column)."""

    sqlstate = "42501"


def _storage_msg(name: str, owner: ProtectedColumn, rel: str | None) -> str:
    """Why a blind-index sibling may not be named; never a value."""
    where = f" of {rel}" if rel else ""
    return (
        f"column {quote_ident(name)}{where} is a storage column of the proxy (the blind "
        f"index of {owner.qualified}) and may not be named in any clause; "
        f"use {quote_ident(owner.column)} itself"
    )


# --------------------------------------------------------------------------- messages


def _possible(pc: ProtectedColumn) -> str:
    """What a query may still do with ``pc``, for the "instead" half of a message."""
    parts = ["select it as a plain column", "IS [NOT] NULL", "count(col)"]
    if pc.mode == "deterministic":
        parts.insert(
            1,
            "= / <> / IN against literals or parameters, joins on equal "
            "deterministic columns, GROUP BY / DISTINCT",
        )
    elif pc.blind_index:
        parts.insert(1, "= / <> / IN against literals or parameters (via its blind index)")
    return "possible: " + ", ".join(parts)


def _msg(pc: ProtectedColumn, problem: str, advice: str = "") -> str:
    """A refusal: the column, the problem, what works instead; never a value."""
    tail = f"; {advice}" if advice else ""
    return f"column {pc.qualified} is encrypted: {problem}{tail} ({_possible(pc)})"


def _not_value(pc: ProtectedColumn, how: str) -> str:
    return _msg(
        pc,
        f"a value {how} it must be a literal or a parameter (optionally cast to its type "
        f"{pc.logical_type}); the proxy cannot encrypt the result of an expression, "
        "function call, subquery or other column",
        "compute the value in the application",
    )


# ------------------------------------------------------------------------- scopes


@dataclass(slots=True)
class _Rel:
    """One range-table entry as far as encryption cares.

    ``cols``: protected columns visible under this entry, by visible name (for derived
    tables: output columns that are plain references to protected columns).
    ``ordered``: every column name in order when known (lets ``*`` be expanded and tells
    an unprotected column apart from an outer reference); None when unknown.
    ``table``: the protected base table, None for derived tables and unprotected ones.
    ``storage``: the proxy's storage columns (blind-index siblings) under this entry, by
    visible name, with the protected column each serves; they are in ``ordered`` (a
    column alias list counts them) but never in a result and never nameable.
    """

    name: str | None
    schema: str | None
    cols: dict[str, ProtectedColumn]
    ordered: list[tuple[str, ProtectedColumn | None]] | None
    table: TableKey | None
    storage: dict[str, ProtectedColumn] = field(default_factory=dict)
    exact: bool = True  # ``ordered`` is the entry's real column list (not a merged join)

    def visible(self) -> list[tuple[str, ProtectedColumn | None]] | None:
        """``ordered`` without the storage columns: what ``*`` shows of this entry."""
        if self.ordered is None:
            return None
        return [(n, pc) for n, pc in self.ordered if n not in self.storage]


@dataclass(slots=True)
class _Out:
    """A query's result columns: names and protected sources (``known`` False if ``*``
    over a relation of unknown column order made positions unknowable)."""

    items: list[tuple[str, ProtectedColumn | None]] = field(default_factory=list)
    cols: dict[str, ProtectedColumn] = field(default_factory=dict)
    known: bool = True
    # Result columns that are storage columns, by name and by position (only ever set
    # when planning a view's definition: `storage_ok`; elsewhere naming one is refused).
    storage: dict[str, ProtectedColumn] = field(default_factory=dict)
    storage_at: dict[int, ProtectedColumn] = field(default_factory=dict)

    def add(self, name: str, pc: ProtectedColumn | None) -> None:
        self.items.append((name, pc))
        if pc is not None:
            self.cols.setdefault(name, pc)

    def protected(self) -> list[ProtectedColumn]:
        seen = [pc for _, pc in self.items if pc is not None]
        return seen + [pc for pc in self.cols.values() if pc not in seen]

    def columns(self) -> OutputColumns:
        return tuple(pc for _, pc in self.items) if self.known else None


class _Scope:
    """One query level: its FROM entries and CTEs; ``parent`` for correlated refs."""

    __slots__ = ("ctes", "merged", "parent", "rels")

    def __init__(self, parent: _Scope | None) -> None:
        self.parent = parent
        self.rels: list[_Rel] = []
        self.ctes: dict[str, _Out] = {}
        self.merged = False  # a JOIN ... USING / NATURAL here: `*` merges its columns

    def cte(self, name: str) -> _Out | None:
        s: _Scope | None = self
        while s is not None:
            if name in s.ctes:
                return s.ctes[name]
            s = s.parent
        return None


@dataclass(slots=True)
class _Star:
    rels: list[_Rel]


@dataclass(slots=True)
class _WholeRow:
    rel: _Rel


@dataclass(slots=True)
class _StorageRef:
    """A reference to a storage column (only resolved as such in a view definition)."""

    name: str
    owner: ProtectedColumn


@dataclass(slots=True)
class _Val:
    """A literal (``lit``), NULL, or parameter with its byte extent (casts included)."""

    kind: str
    start: int
    end: int
    text: str | None = None
    param: int | None = None
    cast: bool = False


@dataclass(slots=True)
class _TopSelect:
    """Recheck state of a statement's own SELECT: the WHERE conjuncts (A_Expr bodies, by
    id) whose blind-index matches can be re-filtered, and the hidden columns so far."""

    statement: int
    conjuncts: frozenset[int]
    limited: bool
    slots: dict[int, tuple[ProtectedColumn, str, list[str], list[int]]] = field(
        default_factory=dict
    )


def _conjuncts(node: Node | None) -> Iterable[Node]:
    """The A_Expr bodies ANDed together at the top of a WHERE clause."""
    if not node:
        return
    k, b = _kind(node)
    if k == "BoolExpr" and b.get("boolop") == "AND_EXPR":
        for arg in b.get("args") or []:
            yield from _conjuncts(arg)
    elif k == "A_Expr":
        yield b


def _aggregates(obj: Any) -> bool:
    """Could this select-list / ORDER BY expression make the query an aggregate or
    window query?  Unknown (user) functions might be aggregates: yes.  Subqueries are
    their own query level: not looked into."""
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, dict):
            if "SubLink" in x:
                continue
            fc = x.get("FuncCall")
            if isinstance(fc, dict):
                name = (_names(fc.get("funcname")) or [""])[-1]
                if fc.get("over") or name in _AGGREGATES or name not in PG_CATALOG_FUNCTIONS:
                    return True
            stack.extend(v for v in x.values() if isinstance(v, dict | list))
        elif isinstance(x, list):
            stack.extend(v for v in x if isinstance(v, dict | list))
    return False


def _values_width(sel: Node) -> int | None:
    """How many columns an INSERT's VALUES rows or SELECT list give, when the tree says
    (None: a `*` or another shape it does not). Without a column list PostgreSQL fills
    the table's first columns and defaults the rest; a written-out list must be as
    short, or the server would refuse a valid statement."""
    _k, body = _kind(sel)
    while body.get("op", "SETOP_NONE") != "SETOP_NONE":  # UNION ...: its first arm
        body = body.get("larg") or {}
    values = body.get("valuesLists")
    if values:
        return len(_kind(values[0])[1].get("items") or [])
    targets = body.get("targetList")
    if not targets or "A_Star" in json.dumps(targets):
        return None
    return len(targets)


@dataclass(slots=True)
class _Fed:
    """A value written into a protected column; ``companion`` is how to derive the
    blind-index sibling's value: ("lit", text) | ("param", n) | ("sql", text).
    ``start``/``end``: the value's byte extent without redundant parentheses."""

    start: int
    end: int
    companion: tuple[str, Any] | None


# ----------------------------------------------------------------------- helpers


def _kind(node: Node) -> tuple[str, Node]:
    """(node type, body) of a wrapped node ``{"Type": {...}}``."""
    for k, v in node.items():
        return k, v
    return "", {}


def _sval(node: Node) -> str:
    return node.get("String", {}).get("sval", "")


def _names(items: Iterable[Node] | None) -> list[str]:
    return [_sval(x) for x in items or ()]


def _opname(body: Node) -> str:
    names = _names(body.get("name"))
    return names[-1] if names else ""


def _const_text(body: Node) -> str | None:
    """Decoded value of an A_Const as text, None for NULL and bit strings."""
    if "sval" in body:
        return str(body["sval"].get("sval", ""))
    if "ival" in body:
        return str(body["ival"].get("ival", 0))
    if "fval" in body:
        return str(body["fval"].get("fval", "0"))
    if "boolval" in body:
        return "true" if body["boolval"].get("boolval") else "false"
    return None


def _select_node(body: Node) -> Node:
    """Set-operation arms are unwrapped SelectStmt bodies; wrap them again."""
    return body if "SelectStmt" in body else {"SelectStmt": body}


def _table_form(b: Node) -> Node | None:
    """The relation of a ``TABLE t`` query (parsed as ``SELECT *`` whose ``*`` has no
    location: it is not in the text), else None."""
    targets = b.get("targetList") or []
    froms = b.get("fromClause") or []
    if len(targets) != 1 or len(froms) != 1 or "RangeVar" not in froms[0]:
        return None
    ref = (targets[0].get("ResTarget", {}).get("val") or {}).get("ColumnRef") or {}
    if ref.get("location", 0) != -1 or "A_Star" not in (ref.get("fields") or [{}])[-1]:
        return None
    return froms[0]["RangeVar"]


def _target_name(rt: Node) -> str:
    if rt.get("name"):
        return str(rt["name"])
    k, b = _kind(rt.get("val") or {})
    if k == "ColumnRef":
        fields = b.get("fields", [])
        if fields and "String" in fields[-1]:
            return _sval(fields[-1])
    if k == "FuncCall":
        return _names(b.get("funcname"))[-1]
    return "?column?"


def _relnames(obj: Any) -> Iterable[Node]:
    """Every RangeVar body in a JSON parse tree (dicts carrying ``relname``)."""
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, dict):
            if "relname" in x:
                yield x
            stack.extend(v for v in x.values() if isinstance(v, dict | list))
        elif isinstance(x, list):
            stack.extend(v for v in x if isinstance(v, dict | list))


# ------------------------------------------------------------------------- planner


class _Planner:
    """Plans one SQL string; state accumulates across its statements."""

    def __init__(
        self,
        sql: str,
        schema: ProtectedSchema,
        search_path: tuple[str, ...],
        table_exists: TableExists | None,
        column_order: ColumnOrder | None,
        prepared: PreparedLookup | None,
        storage_ok: bool = False,
    ) -> None:
        self.sql = sql
        # Planning a view's definition (encryption.analyse_views): a storage column in
        # its select list is traced as one (the view's own storage column), not refused.
        self.storage_ok = storage_ok
        self.schema = schema
        self.search_path = search_path
        self.table_exists = table_exists
        self.column_order = column_order
        self.prepared = prepared
        self._tok: Tokens | None = None
        self.splices: list[Splice] = []
        self.params: dict[int, ParamAction] = {}
        self.free_params: set[int] = set()
        self.derived: list[tuple[int, ProtectedColumn, int, str]] = []
        self.recheck: list[Recheck] = []
        self.statement = 0  # index of the top-level statement being planned
        self._top: _TopSelect | None = None
        self.join_pairs: list[tuple[ProtectedColumn, ProtectedColumn]] = []
        self.tables: set[TableKey] = set()
        # Every COPY to or from the client, in statement order (plan None: as is).
        self.copies: list[CopyStep] = []

    # -- tokens ----------------------------------------------------------------

    @property
    def tok(self) -> Tokens:
        if self._tok is None:
            self._tok = Tokens(self.sql)
        return self._tok

    def _splice(
        self,
        start: int,
        end: int,
        action: str,
        pc: ProtectedColumn,
        *,
        literal: str | None = None,
        replacement: str | None = None,
        prefix: str = "",
    ) -> None:
        self.splices.append(Splice(start, end, action, pc, literal, replacement, prefix))

    # -- relations -------------------------------------------------------------

    def _apply_alias_cols(self, rel: _Rel, colnames: list[str]) -> _Rel:
        """``AS x(a, b)`` renames columns by position: trace it or refuse."""
        if not colnames:
            return rel
        if rel.ordered is None:
            if rel.cols or rel.storage:
                pc = next(iter(rel.cols.values()))
                raise _Refuse(
                    _msg(
                        pc,
                        "a column alias list on a relation with encrypted "
                        "columns of unknown column order hides which "
                        "column is which",
                        "alias the columns in the select list instead",
                    )
                )
            return rel
        ordered = [
            (colnames[i] if i < len(colnames) else n, pc) for i, (n, pc) in enumerate(rel.ordered)
        ]
        cols = {n: pc for n, pc in ordered if pc is not None}
        storage = {
            new: rel.storage[old]
            for (old, _), (new, _) in zip(rel.ordered, ordered, strict=True)
            if old in rel.storage
        }
        return _Rel(rel.name, rel.schema, cols, ordered, rel.table, storage, rel.exact)

    def _range_var(self, rv: Node, scope: _Scope, *, ctes: bool = True) -> _Rel:
        schema = rv.get("schemaname")
        name = rv.get("relname", "")
        alias = rv.get("alias") or {}
        aname = alias.get("aliasname")
        colnames = _names(alias.get("colnames"))
        if schema is None and ctes:
            cte = scope.cte(name)
            if cte is not None:
                rel = _Rel(
                    aname or name,
                    None,
                    dict(cte.cols),
                    list(cte.items) if cte.known else None,
                    None,
                    dict(cte.storage),
                )
                return self._apply_alias_cols(rel, colnames)
        key = self.schema.lookup((schema, name), self.search_path, self.table_exists)
        if key is None:
            return _Rel(aname or name, None if aname else schema, {}, None, None)
        self.tables.add(key)
        cols = dict(self.schema[key])
        order = self.column_order(*key) if self.column_order else None
        ordered = [(c, cols.get(c)) for c in order] if order else None
        rel = _Rel(aname or name, None if aname else key[0], cols, ordered, key,
                   dict(self.schema.storage(key)))
        return self._apply_alias_cols(rel, colnames)

    def _storage_function(self, call: Node) -> tuple[TableKey, FunctionResult] | None:
        """The function a FuncCall names, when its result holds a storage column."""
        return self.schema.function_lookup(_names(call.get("funcname")), self.search_path)

    def _range_function(self, b: Node, scope: _Scope) -> _Rel:
        """A function in FROM. One whose result holds a storage column of the proxy (it
        returns a protected table's row type, or has an OUT / TABLE column named like a
        sibling) is a relation with those storage columns: ``*`` over it is written out
        without them, naming one is refused, as for the table. ``ROWS FROM`` and
        ``WITH ORDINALITY`` add their columns; an unknown order refuses ``*``."""
        alias = b.get("alias") or {}
        ordered: list[tuple[str, ProtectedColumn | None]] | None = []
        storage: dict[str, ProtectedColumn] = {}
        name: str | None = alias.get("aliasname")
        items = b.get("functions") or []
        for item in items:
            call, *rest = (item or {}).get("List", {}).get("items", [{}])
            fc = call.get("FuncCall") if isinstance(call, dict) else None
            hit = self._storage_function(fc) if fc is not None else None
            if fc is None or hit is None:
                self._free(item, scope, "a function in FROM")
                ordered = None
                continue
            self._free([fc.get("args"), fc.get("agg_filter"), fc.get("over"), rest], scope,
                       f"a call of {hit[0][1]}()")
            if name is None and len(items) == 1:
                name = hit[0][1]
            storage.update(hit[1].storage)
            cols = hit[1].columns
            if ordered is not None and cols is not None:
                ordered.extend((c, None) for c in cols)
            else:
                ordered = None
        if not storage:
            return _Rel(alias.get("aliasname"), None, {}, None, None)
        if ordered is not None and b.get("ordinality"):
            ordered.append(("ordinality", None))
        rel = _Rel(name, None, {}, ordered, None, storage)
        return self._apply_alias_cols(rel, _names(alias.get("colnames")))

    def _rel_from_out(self, out: _Out, alias: Node | None) -> _Rel:
        alias = alias or {}
        rel = _Rel(
            alias.get("aliasname"),
            None,
            dict(out.cols),
            list(out.items) if out.known else None,
            None,
            dict(out.storage),
        )
        return self._apply_alias_cols(rel, _names(alias.get("colnames")))

    def _find_rel(self, qual: list[str], scope: _Scope) -> _Rel | None:
        s: _Scope | None = scope
        while s is not None:
            for rel in s.rels:
                if rel.name == qual[-1] and (len(qual) == 1 or rel.schema == qual[-2]):
                    return rel
            s = s.parent
        return None

    def _storage(self, name: str, rel: _Rel, shown: bool) -> _StorageRef:
        """A storage column named: refused (42501), except as a plain result column of a
        view's definition being traced (``shown``), where it becomes the view's own."""
        owner = rel.storage[name]
        if self.storage_ok and shown:
            return _StorageRef(name, owner)
        raise _StorageRefuse(_storage_msg(name, owner, rel.name))

    def _resolve(
        self, ref: Node, scope: _Scope, *, shown: bool = False
    ) -> tuple[ProtectedColumn | _Star | _WholeRow | _StorageRef | None, _Rel | None]:
        """What a ColumnRef denotes, resolved the way PostgreSQL does, failing closed:
        an unqualified name not provably an unprotected column of the current level
        is looked up in outer levels (a correlated reference). A storage column of any
        relation in scope is refused (``_storage``)."""
        fields = ref.get("fields", [])
        if fields and "A_Star" in fields[-1]:
            if len(fields) == 1:
                return _Star(list(scope.rels)), None
            rel = self._find_rel(_names(fields[:-1]), scope)
            return _Star([rel] if rel else []), rel
        names = _names(fields)
        if len(names) == 1:
            col = names[0]
            s: _Scope | None = scope
            while s is not None:
                known_plain = False
                for rel in s.rels:
                    if col in rel.storage:
                        return self._storage(col, rel, shown), rel
                for rel in s.rels:
                    if col in rel.cols:
                        return rel.cols[col], rel
                    if rel.ordered is not None and any(n == col for n, _ in rel.ordered):
                        known_plain = True
                if known_plain:
                    return None, None
                for rel in s.rels:
                    if rel.name == col and (rel.cols or rel.storage):
                        return _WholeRow(rel), rel
                s = s.parent
            return None, None
        rel = self._find_rel(names[:-1], scope)
        if rel is None:
            return None, None
        if names[-1] in rel.storage:
            return self._storage(names[-1], rel, shown), rel
        return rel.cols.get(names[-1]), rel

    def _pref(self, node: Node | None, scope: _Scope) -> ProtectedColumn | None:
        """The protected column when ``node`` is a plain reference to one, else None."""
        if not node or "ColumnRef" not in node:
            return None
        r, _ = self._resolve(node["ColumnRef"], scope)
        if isinstance(r, _WholeRow):
            raise _Refuse(self._whole_row_msg(r.rel))
        return r if isinstance(r, ProtectedColumn) else None

    @staticmethod
    def _whole_row_msg(rel: _Rel) -> str:
        if not rel.cols:  # a function's result holding a storage column (and no other)
            name, owner = next(iter(rel.storage.items()))
            return _msg(owner, f"a whole-row reference to {rel.name} contains its blind "
                        f"index {name}, a storage column of the proxy",
                        "name the columns instead")
        pc = next(iter(rel.cols.values()))
        return _msg(
            pc,
            f"a whole-row reference to {rel.name} contains it as ciphertext, "
            "which cannot be decrypted inside a row value",
            "name the columns instead",
        )

    # -- values ----------------------------------------------------------------

    def _check_cast(self, tn: Node, pc: ProtectedColumn) -> None:
        names = _names(tn.get("names"))
        bad = (
            tn.get("typmods")
            or tn.get("arrayBounds")
            or tn.get("pct_type")
            or tn.get("setof")
            or not names
            or (len(names) > 1 and names[0] != "pg_catalog")
        )
        tname = normalize_type(names[-1]) if names else "?"
        if bad or tname not in _CAST_OK[pc.logical_type]:
            raise _Refuse(
                _msg(
                    pc,
                    f"a cast to {quote_ident(tname)} (or with type modifiers) "
                    "of a value for it cannot be applied by the proxy",
                    f"write a plain literal or parameter, or cast it to {pc.logical_type}",
                )
            )

    def _value(self, node: Node | None, pc: ProtectedColumn) -> _Val | None:
        """``node`` as a literal / NULL / parameter (with extent), or None if it is not."""
        if not node:
            return None
        k, b = _kind(node)
        tok = self.tok
        if k == "A_Const":
            i = tok.at(b.get("location", 0))
            last = tok.const_last(i)
            if b.get("isnull"):
                return _Val("null", tok.starts[i], tok.ends[last])
            text = _const_text(b)
            if text is None:
                return None
            return _Val("lit", tok.starts[i], tok.ends[last], text)
        if k == "ParamRef":
            i = tok.at(b.get("location", 0))
            return _Val("param", tok.starts[i], tok.ends[i], param=int(b.get("number", 0)))
        if k == "TypeCast":
            inner = self._value(b.get("arg"), pc)
            if inner is None:
                return None
            tn = b.get("typeName", {})
            self._check_cast(tn, pc)
            tloc = tn.get("location", -1)
            cloc = b.get("location", -1)
            if 0 <= tloc < inner.start:  # DATE '2024-01-01'
                start, end = tloc, inner.end
            elif cloc >= 0 and tok.name(tok.at(cloc)) == "CAST":
                ci = tok.at(cloc)
                start, end = tok.starts[ci], tok.ends[tok.close(ci + 1)]
            else:  # '...'::type, ('...')::type: the cast covers the parentheses too
                first, last = tok.at(inner.start), tok.ending(inner.end)
                n = tok.parens_between(last, tok.at(cloc), "ASCII_41")
                first, _ = tok.wrap(first, last, n)
                start, end = tok.starts[first], tok.ends[tok.type_last(tok.at(tloc))]
            return _Val(inner.kind, start, end, inner.text, inner.param, cast=True)
        if k == "A_Expr" and not b.get("lexpr") and _opname(b) == "+":
            rk, rb = _kind(b.get("rexpr") or {})
            if rk == "A_Const" and ("ival" in rb or "fval" in rb):
                inner = self._value(b["rexpr"], pc)
                if inner is not None:
                    op = tok.at(b.get("location", 0))
                    first, last = tok.at(inner.start), tok.ending(inner.end)
                    n = tok.parens_between(op, first, "ASCII_40")
                    _, last = tok.wrap(first, last, n)  # +(5)
                    return _Val("lit", tok.starts[op], tok.ends[last], inner.text)
        return None

    def _param(self, n: int, action: str, pc: ProtectedColumn) -> None:
        want = ParamAction(action, pc)
        have = self.params.get(n)
        if have is not None and have != want:
            raise _Refuse(
                _msg(
                    pc,
                    f"parameter ${n} is also used for another encrypted "
                    "column or another kind of use",
                    "use a separate parameter for each use",
                )
            )
        self.params[n] = want

    def _apply(self, v: _Val, action: str, pc: ProtectedColumn) -> None:
        """Record what happens to a literal/parameter aimed at ``pc``."""
        if v.kind == "lit":
            self._splice(v.start, v.end, action, pc, literal=v.text)
        elif v.kind == "param":
            assert v.param is not None
            self._param(v.param, action, pc)
            if v.cast:  # `$1::text` would make the server compare bytea with text
                self._splice(v.start, v.end, ACTION_RENAME, pc, replacement=f"${v.param}")

    def _rename_ref(self, ref: Node, pc: ProtectedColumn, rel: _Rel | None) -> tuple[int, int]:
        """Rename the last field of a column reference to the blind-index column;
        returns the reference's original byte extent."""
        if rel is None or rel.table is None:
            raise _Refuse(
                _msg(
                    pc,
                    "a blind-index search must name the table's column "
                    "directly, not through a subquery, CTE or view",
                    "move the condition into the query that reads the table",
                )
            )
        body = ref["ColumnRef"]
        tok = self.tok
        i = tok.at(body.get("location", 0))
        last = tok.ident_path_last(i, len(body.get("fields", [])))
        assert pc.bidx_column is not None
        self._splice(
            tok.starts[last],
            tok.ends[last],
            ACTION_RENAME,
            pc,
            replacement=quote_ident(pc.bidx_column),
        )
        return tok.starts[i], tok.ends[last]

    def _compare(
        self, pc: ProtectedColumn, ref: Node, other: Node | None, scope: _Scope, negated: bool,
        conj: Node | None = None,
    ) -> None:
        """``col = value`` / ``<>`` / IN item: encrypt, blind-index, or refuse."""
        v = self._value(other, pc)
        if v is None:
            raise _Refuse(_not_value(pc, "compared with"))
        if v.kind == "null":
            return
        if pc.mode == "deterministic":
            self._apply(v, ACTION_ENCRYPT, pc)
            return
        if not pc.blind_index:
            raise _Refuse(
                _msg(
                    pc,
                    "it uses randomized encryption without a blind index, "
                    "so the server cannot test equality",
                    "configure search: blind_index or mode: deterministic, "
                    "or filter in the application",
                )
            )
        _, rel = self._resolve(ref["ColumnRef"], scope)
        start, end = self._rename_ref(ref, pc, rel)
        self._apply(v, ACTION_BLIND_INDEX, pc)
        self._recheck(pc, self.tok.raw[start:end].decode(), v, negated, conj)

    def _recheck(self, pc: ProtectedColumn, ref_text: str, v: _Val, negated: bool,
                 conj: Node | None) -> None:
        """Arrange for a blind-index match to be re-filtered on the decrypted value, or,
        for a short index where that is impossible, refuse (a wrong row must never come
        back; with >= 16 bytes a collision is out of reach and no recheck is needed)."""
        top = self._top
        short = pc.index_length < SAFE_INDEX_LENGTH
        if (top is not None and conj is not None and not negated
                and id(conj) in top.conjuncts and not (short and top.limited)):
            slot = top.slots.setdefault(id(conj), (pc, ref_text, [], []))
            if v.kind == "lit" and v.text is not None:
                slot[2].append(v.text)
            elif v.param is not None:
                slot[3].append(v.param)
            return
        if short:
            raise _Refuse(
                _msg(
                    pc,
                    f"its blind index keeps {pc.index_length} bytes, so different values "
                    "can share an index, and the proxy can recheck matches only for = or "
                    "IN conditions ANDed into the WHERE of a plain SELECT (no GROUP BY, "
                    "DISTINCT, aggregates, window functions or LIMIT)",
                    "write the lookup that way, or configure index_length: 16 or more",
                )
            )

    def _hidden_columns(self, b: Node, top: _TopSelect) -> None:
        """Append the rechecked columns to the select list (``, ref AS strongroom_recheck_n``
        before FROM), in slot order; the session strips them again."""
        tok = self.tok
        last = b["targetList"][-1].get("ResTarget", {}).get("location", -1)
        first_from = b["fromClause"][0]
        from_at = next(iter(first_from.values()), {}).get("location", -1)
        depth, at = 0, -1
        for j in range(len(tok.names)):
            if tok.starts[j] < last:
                continue
            if from_at >= 0 and tok.starts[j] > from_at:
                break
            name = tok.names[j]
            if name in ("ASCII_40", "ASCII_91"):
                depth += 1
            elif name in ("ASCII_41", "ASCII_93"):
                depth -= 1
            elif name == "FROM" and depth == 0 and tok.name(j - 1) != "DISTINCT":
                # (`x IS [NOT] DISTINCT FROM y` in the last item is not the clause)
                at = tok.starts[j]
                break
        if at < 0:
            raise TokenError("FROM of the SELECT not found")
        items = []
        for n, (pc, ref_text, literals, params) in enumerate(top.slots.values(), 1):
            items.append(f", {ref_text} AS strongroom_recheck_{n}")
            self.recheck.append(Recheck(pc, top.statement, tuple(literals), tuple(params)))
        first = next(iter(top.slots.values()))[0]
        self._splice(at, at, ACTION_RENAME, first, replacement="".join(items) + " ")

    def _join(self, a: ProtectedColumn, b: ProtectedColumn) -> None:
        if a.mode == b.mode == "deterministic" and a.logical_type == b.logical_type:
            self.join_pairs.append((a, b))
            return
        raise _Refuse(
            _msg(
                a,
                f"it is compared with encrypted column {b.qualified}; only two "
                "deterministic columns of the same type can be compared",
                "compare each with a literal or parameter instead",
            )
        )

    def _feed(self, node: Node | None, pc: ProtectedColumn, scope: _Scope) -> _Fed:
        """A value written into ``pc`` (VALUES item, SELECT item, SET value)."""
        if not node:
            raise _Refuse(_not_value(pc, "written to"))
        k, b = _kind(node)
        tok = self.tok
        if k == "SetToDefault":
            i = tok.at(b.get("location", 0))
            return _Fed(tok.starts[i], tok.ends[i], ("sql", "DEFAULT"))
        v = self._value(node, pc)
        if v is not None:
            if v.kind == "null":
                return _Fed(v.start, v.end, ("sql", "NULL"))
            self._apply(v, ACTION_ENCRYPT, pc)
            companion = ("lit", v.text) if v.kind == "lit" else ("param", v.param)
            return _Fed(v.start, v.end, companion)
        if k == "ColumnRef":
            r, rel = self._resolve(b, scope)
            if isinstance(r, _WholeRow):
                raise _Refuse(self._whole_row_msg(r.rel))
            if r == pc:  # same column: ciphertext stays bound to its column
                if not pc.blind_index:
                    return _Fed(0, 0, None)
                assert pc.bidx_column is not None
                i = tok.at(b.get("location", 0))
                last = tok.ident_path_last(i, len(b.get("fields", [])))
                if rel is None or rel.table is None:
                    raise _Refuse(_not_value(pc, "written to"))
                qual = tok.raw[tok.starts[i] : tok.starts[last]].decode()
                companion = ("sql", qual + quote_ident(pc.bidx_column))
                return _Fed(tok.starts[i], tok.ends[last], companion)
            raise _Refuse(
                _msg(
                    pc,
                    "a value copied from another column cannot be written "
                    "to it (its ciphertext is bound to its own column)",
                    "write a literal or parameter, or copy within the same "
                    "column (SET col = col, EXCLUDED.col)",
                )
            )
        if k == "SubLink" and b.get("subLinkType") == "EXPR_SUBLINK" and not pc.blind_index:
            out = self._select(b["subselect"], scope)
            if out.known and len(out.items) == 1 and out.items[0][1] == pc:
                return _Fed(0, 0, None)
        raise _Refuse(_not_value(pc, "written to"))

    def _companion(
        self, fed: _Fed, pc: ProtectedColumn, prefix: str, *, sole_row_item: bool = False
    ) -> None:
        """Add the blind-index sibling's value right after a value written to ``pc``.

        "Right after" is past the parentheses that enclose the value (``VALUES (1,
        ('x'))``, ``SET pan = (('x'))``): pglast drops them from the tree, but inside
        them the companion would turn the value into a row.  The parentheses of a
        one-item VALUES row (``VALUES (('x'))``) are syntax, not the value's."""
        if not pc.blind_index:
            return
        if fed.companion is None:
            raise _Refuse(_not_value(pc, "written to"))
        tok = self.tok
        first, last = tok.at(fed.start), tok.ending(fed.end)
        n = tok.redundant_parens(first, last) - (1 if sole_row_item else 0)
        end = tok.ends[last + max(n, 0)]
        kind, val = fed.companion
        if kind == "lit":
            self._splice(end, end, ACTION_BLIND_INDEX, pc, literal=val, prefix=prefix)
        elif kind == "param":
            self.derived.append((val, pc, end, prefix))
        else:
            self._splice(end, end, ACTION_RENAME, pc, replacement=val, prefix=prefix)

    # -- expressions -----------------------------------------------------------

    def _free(self, node: Any, scope: _Scope, what: str) -> None:
        """Walk an expression whose value is computed by the server: a protected column
        may appear only in the sanctioned shapes (comparison with a literal/parameter,
        IS NULL, count(col)); anywhere else the server would compute on ciphertext."""
        if isinstance(node, list):
            for x in node:
                self._free(x, scope, what)
            return
        if not isinstance(node, dict) or not node:
            return
        k, b = _kind(node)
        if len(node) != 1 or not k[:1].isupper():
            for v in node.values():
                if isinstance(v, dict | list):
                    self._free(v, scope, what)
            return
        if k == "ColumnRef":
            r, _ = self._resolve(b, scope)
            if isinstance(r, ProtectedColumn):
                raise _Refuse(
                    _msg(
                        r,
                        f"it is used in {what}, which the server would evaluate on ciphertext",
                        "do this in the application after reading the column",
                    )
                )
            if isinstance(r, _WholeRow):
                raise _Refuse(self._whole_row_msg(r.rel))
            if isinstance(r, _Star):
                for rel in r.rels:
                    if rel.cols or rel.storage:
                        raise _Refuse(self._whole_row_msg(rel))
        elif k == "A_Expr":
            self._aexpr(b, scope, what)
        elif k == "NullTest":
            if self._pref(b.get("arg"), scope) is None:
                self._free(b.get("arg"), scope, what)
        elif k == "FuncCall":
            self._func(b, scope)
        elif k == "SubLink":
            self._sublink(b, scope, what)
        elif k == "ParamRef":
            self.free_params.add(int(b.get("number", 0)))
        elif k in ("SelectStmt", "InsertStmt", "UpdateStmt", "DeleteStmt"):
            self._select(node, scope)
        elif k == "TypeCast":
            self._free(b.get("arg"), scope, "a cast")
        elif k == "A_Const":
            return
        else:
            for v in b.values():
                if isinstance(v, dict | list):
                    self._free(v, scope, what)

    def _aexpr(self, b: Node, scope: _Scope, what: str) -> None:
        kind = b.get("kind", "AEXPR_OP")
        op = _opname(b)
        lexpr, rexpr = b.get("lexpr"), b.get("rexpr")
        lp = self._pref(lexpr, scope)
        rp = None if kind == "AEXPR_IN" else self._pref(rexpr, scope)
        if lp is None and rp is None:
            self._free(lexpr, scope, what)
            self._free(rexpr, scope, what)
            return
        pc = lp or rp
        assert pc is not None
        if kind in ("AEXPR_OP", "AEXPR_DISTINCT", "AEXPR_NOT_DISTINCT") and op in ("=", "<>"):
            if lexpr is None:
                raise _Refuse(_msg(pc, f"operator {op} applied to it cannot be evaluated"))
            negated = op == "<>" or kind == "AEXPR_DISTINCT"
            if lp is not None and rp is not None:
                self._join(lp, rp)
            elif lp is not None:
                self._compare(lp, lexpr, rexpr, scope, negated, b)
            else:
                assert rexpr is not None
                self._compare(pc, rexpr, lexpr, scope, negated, b)
        elif kind == "AEXPR_IN":
            assert lexpr is not None
            items = (rexpr or {}).get("List", {}).get("items", [])
            for item in items:
                self._compare(pc, lexpr, item, scope, op == "<>", b)
        elif kind in ("AEXPR_OP_ANY", "AEXPR_OP_ALL"):
            raise _Refuse(
                _msg(
                    pc,
                    f"{op} ANY/ALL (array) is not supported on it",
                    "use IN ($1, $2, ...) with one literal or parameter per value",
                )
            )
        elif "BETWEEN" in kind or op in _RANGE_OPS:
            raise _Refuse(
                _msg(
                    pc,
                    f"range comparisons ({op or 'BETWEEN'}) cannot be evaluated on ciphertext",
                    "filter ranges in the application",
                )
            )
        elif kind in ("AEXPR_LIKE", "AEXPR_ILIKE", "AEXPR_SIMILAR") or op in _PATTERN_OPS:
            raise _Refuse(
                _msg(
                    pc,
                    "pattern matching (LIKE / ILIKE / SIMILAR TO / regular "
                    "expressions) cannot be evaluated on ciphertext",
                    "match patterns in the application",
                )
            )
        else:
            raise _Refuse(
                _msg(
                    pc,
                    f"operator {op or kind} applied to it would be evaluated on ciphertext",
                    "compute this in the application",
                )
            )

    def _func(self, b: Node, scope: _Scope) -> None:
        fname = (_names(b.get("funcname")) or ["?"])[-1]
        hit = self._storage_function(b)
        if hit is not None:  # its value (a row, a record) would carry the blind index
            col, owner = next(iter(hit[1].storage.items()))
            raise _Refuse(_msg(owner, f"the result of {hit[0][0]}.{hit[0][1]}() holds "
                               f"{col}, a storage column of the proxy (its blind index)",
                               f"select the columns from {hit[0][1]}() in FROM"))
        args = b.get("args") or []
        if fname == "count" and len(args) == 1 and not b.get("agg_order"):
            pc = self._pref(args[0], scope)
            if pc is not None:
                if b.get("agg_distinct") and pc.mode != "deterministic":
                    raise _Refuse(
                        _msg(
                            pc,
                            "count(DISTINCT ...) over randomized ciphertext counts every row",
                            "use count(col)",
                        )
                    )
                self._free(b.get("agg_filter"), scope, "an aggregate FILTER")
                self._free(b.get("over"), scope, "a window definition")
                return
        self._free(args, scope, f"a call of {fname}()")
        self._free(b.get("agg_order"), scope, "an aggregate ORDER BY")
        self._free(b.get("agg_filter"), scope, "an aggregate FILTER")
        self._free(b.get("over"), scope, "a window definition")

    def _sublink(self, b: Node, scope: _Scope, what: str) -> None:
        kind = b.get("subLinkType", "EXISTS_SUBLINK")
        out = self._select(b["subselect"], scope)
        if kind == "EXISTS_SUBLINK":
            return
        prot = out.protected()
        if kind in ("ANY_SUBLINK", "ALL_SUBLINK"):
            test = b.get("testexpr")
            tp = self._pref(test, scope)
            if tp is not None or prot:
                op = (_names(b.get("operName")) or ["="])[-1]
                single = out.items[0][1] if out.known and len(out.items) == 1 else None
                if tp is not None and single is not None and op == "=" and kind == "ANY_SUBLINK":
                    self._join(tp, single)
                    return
                pc = tp or prot[0]
                raise _Refuse(
                    _msg(
                        pc,
                        "IN / ANY / ALL with a subquery compares it with "
                        "values the proxy cannot encrypt",
                        "use IN with literals or parameters, or a join between "
                        "deterministic columns",
                    )
                )
            self._free(test, scope, what)
            return
        if prot:
            raise _Refuse(
                _msg(
                    prot[0],
                    f"a subquery returning it is used in {what}, which "
                    "the server would evaluate on ciphertext",
                    "select the column itself",
                )
            )

    # -- queries ---------------------------------------------------------------

    def _with(self, wc: Node, scope: _Scope) -> None:
        for c in wc.get("ctes", []):
            cte = c.get("CommonTableExpr", {})
            name = cte.get("ctename", "")
            if wc.get("recursive"):
                scope.ctes[name] = _Out(known=False)
            out = self._select(cte["ctequery"], scope)
            colnames = _names(cte.get("aliascolnames"))
            if colnames:
                rel = self._apply_alias_cols(
                    _Rel(name, None, dict(out.cols), list(out.items) if out.known else None, None,
                         dict(out.storage)),
                    colnames,
                )
                out = _Out(list(rel.ordered or []), dict(rel.cols), rel.ordered is not None,
                           dict(rel.storage),
                           {i: rel.storage[n] for i, (n, _) in enumerate(rel.ordered or [])
                            if n in rel.storage})
            scope.ctes[name] = out

    def _select(
        self, node: Node, parent: _Scope, feeds: list[ProtectedColumn | None] | None = None,
        *, top: bool = False,
    ) -> _Out:
        """Plan a query; with ``feeds`` its output columns are written into those
        (protected) columns of an INSERT target, position by position.  ``top``: the
        statement itself (not a subquery), whose blind-index matches can be rechecked."""
        k, b = _kind(node)
        if k != "SelectStmt":
            return self._statement(node, parent) or _Out()
        if not top:
            return self._select_body(b, parent, feeds)
        outer, self._top = self._top, self._top_select(b)
        try:
            out = self._select_body(b, parent, feeds)
            if self._top is not None and self._top.slots:
                self._hidden_columns(b, self._top)
            return out
        finally:
            self._top = outer

    def _top_select(self, b: Node) -> _TopSelect | None:
        """A plain SELECT whose result rows map one to one onto the rows its WHERE keeps
        can take hidden recheck columns; None for anything else."""
        if (
            b.get("op", "SETOP_NONE") != "SETOP_NONE"
            or b.get("valuesLists")
            or b.get("intoClause")
            or b.get("distinctClause")
            or b.get("groupClause")
            or b.get("havingClause")
            or b.get("windowClause")
            or not b.get("fromClause")
            or not b.get("targetList")
            or _aggregates(b.get("targetList"))
            or _aggregates(b.get("sortClause"))
        ):
            return None
        conj = frozenset(id(x) for x in _conjuncts(b.get("whereClause")))
        limited = bool(b.get("limitCount") or b.get("limitOffset"))
        return _TopSelect(self.statement, conj, limited)

    def _select_body(
        self, b: Node, parent: _Scope, feeds: list[ProtectedColumn | None] | None
    ) -> _Out:
        scope = _Scope(parent)
        if b.get("withClause"):
            self._with(b["withClause"], scope)
        feeding = [pc for pc in feeds or () if pc is not None]
        if b.get("op", "SETOP_NONE") != "SETOP_NONE":
            if feeding:
                raise _Refuse(_not_value(feeding[0], "written to"))
            lo = self._select(_select_node(b["larg"]), scope)
            ro = self._select(_select_node(b["rarg"]), scope)
            prot = lo.protected() + ro.protected()
            if prot:
                raise _Refuse(
                    _msg(
                        prot[0],
                        "a set operation (UNION / INTERSECT / EXCEPT) "
                        "returns it, and such a result column cannot "
                        "be traced back for decryption",
                        "run the parts as separate queries",
                    )
                )
            out = _Out([(n, None) for n, _ in lo.items], {}, lo.known)
            scope.rels = [_Rel(None, None, {}, out.items, None)]
            self._sort(b.get("sortClause"), scope, out)
            self._free([b.get("limitCount"), b.get("limitOffset")], scope, "LIMIT")
            return out
        if b.get("valuesLists"):
            width = 0
            for row in b["valuesLists"]:
                items = row.get("List", {}).get("items", [])
                width = max(width, len(items))
                for i, item in enumerate(items):
                    pc = feeds[i] if feeds and i < len(feeds) else None
                    if pc is None:
                        self._free(item, scope, "a VALUES list")
                    else:
                        self._companion(self._feed(item, pc, scope), pc, ", ",
                                        sole_row_item=len(items) == 1)
            return _Out([(f"column{i + 1}", None) for i in range(width)])
        for item in b.get("fromClause") or []:
            self._from_item(item, scope)
        self._free(b.get("whereClause"), scope, "a WHERE condition")
        out = _Out()
        table_rv = _table_form(b)
        for i, t in enumerate(b.get("targetList") or []):
            rt = t.get("ResTarget", {})
            pc = feeds[i] if feeds and i < len(feeds) else None
            if feeding:
                val = rt.get("val") or {}
                if "ColumnRef" in val and "A_Star" in val["ColumnRef"]["fields"][-1]:
                    raise _Refuse(
                        _msg(
                            feeding[0],
                            "INSERT ... SELECT * into a table with "
                            "encrypted columns cannot be mapped",
                            "list the values",
                        )
                    )
            if pc is not None:
                self._companion(self._feed(rt.get("val"), pc, scope), pc, ", ")
                out.add(_target_name(rt), pc)
            elif feeds is not None:
                self._free(rt.get("val"), scope, "a value written to an unencrypted column")
                out.add(_target_name(rt), None)
            else:
                self._target(rt, scope, out, table_rv)
        self._group(b.get("groupClause"), scope, out)
        self._free(b.get("havingClause"), scope, "HAVING")
        self._distinct(b.get("distinctClause"), scope, out)
        self._sort(b.get("sortClause"), scope, out)
        self._free(b.get("windowClause"), scope, "a window definition")
        self._free([b.get("limitCount"), b.get("limitOffset")], scope, "LIMIT")
        return out

    def _target(self, rt: Node, scope: _Scope, out: _Out,
                table_rv: Node | None = None) -> None:
        """One select-list / RETURNING item: plain protected references are fine.
        ``table_rv``: the relation of a ``TABLE t`` query, whose ``*`` has no token."""
        val = rt.get("val") or {}
        k, b = _kind(val)
        name = _target_name(rt)
        if k == "ColumnRef" and not rt.get("indirection"):
            r, _ = self._resolve(b, scope, shown=True)
            if isinstance(r, _Star):
                self._expand_star(b, r.rels, scope, table_rv)
                for rel in r.rels:
                    visible = rel.visible()
                    if visible is None:
                        out.known = False
                        out.cols.update(rel.cols)
                    else:
                        for n, pc in visible:
                            out.add(n, pc)
                return
            if isinstance(r, _WholeRow):
                raise _Refuse(self._whole_row_msg(r.rel))
            if isinstance(r, _StorageRef):
                out.storage_at[len(out.items)] = r.owner
                out.storage[name] = r.owner
                out.add(name, None)
                return
            out.add(name, r)
            return
        if k == "SubLink" and b.get("subLinkType") == "EXPR_SUBLINK":
            sub = self._select(b["subselect"], scope)
            if sub.known and len(sub.items) == 1 and sub.items[0][1] is not None:
                out.add(name, sub.items[0][1])
                return
            if sub.protected():
                raise _Refuse(
                    _msg(
                        sub.protected()[0],
                        "a scalar subquery with it in an expression cannot be traced",
                    )
                )
            out.add(name, None)
            return
        self._free(val, scope, "an expression in the select list")
        out.add(name, None)

    def _expand_star(self, ref: Node, rels: list[_Rel], scope: _Scope,
                     table_rv: Node | None) -> None:
        """Write a ``*`` / ``t.*`` over a relation with storage columns out as the
        relation's visible columns, qualified, in PostgreSQL's order (each relation's
        columns in turn). Then the server never returns a storage column, in any format,
        portal, cursor or COPY of the query: the shape is forced, not filtered per row.
        Where the exact expansion is not known (column order unknown, a JOIN ... USING
        or NATURAL merging columns, duplicate names under a join alias), refused."""
        if not any(rel.storage for rel in rels):
            return
        owner = next(iter(next(rel for rel in rels if rel.storage).storage.values()))
        fields = ref.get("fields", [])

        def refuse(why: str) -> _Refuse:
            return _Refuse(_msg(owner, f"{why}, so the proxy cannot leave its storage "
                                "column out of `*`", "name the columns"))

        if len(fields) == 1 and scope.merged:
            raise refuse("`*` over a JOIN ... USING / NATURAL merges columns")
        counts: dict[str | None, int] = {}
        for rel in scope.rels:
            counts[rel.name] = counts.get(rel.name, 0) + 1
        parts: list[str] = []
        for rel in rels:
            if rel.name is None:
                raise refuse("a relation without a name is in `*`")
            qual = quote_ident(rel.name)
            if counts.get(rel.name, 0) > 1 and rel.schema is not None:
                qual = f"{quote_ident(rel.schema)}.{qual}"
            if not rel.storage:
                parts.append(f"{qual}.*")
                continue
            visible = rel.visible()
            if visible is None or not rel.exact:
                raise refuse(f"the columns of {rel.name} are not known in order")
            names = [n for n, _ in visible]
            if len(set(names)) != len(names):
                raise refuse(f"{rel.name} has duplicate column names")
            parts.extend(f"{qual}.{quote_ident(n)}" for n in names)
        tok = self.tok
        if table_rv is not None:  # TABLE t (TABLE ONLY t): the keyword becomes SELECT
            i = self._relation_first_token(table_rv) - 1
            while tok.name(i) == "ONLY":
                i -= 1
            if tok.name(i) != "TABLE":
                raise TokenError("expected TABLE before the relation")
            self._splice(tok.starts[i], tok.ends[i], ACTION_RENAME, owner,
                         replacement=f"SELECT {', '.join(parts)} FROM")
            return
        first = tok.at(ref.get("location", -1))
        last = tok.ident_path_last(first, len(fields))
        if tok.name(last) != "ASCII_42":
            raise TokenError("expected * at the end of the column reference")
        self._splice(tok.starts[first], tok.ends[last], ACTION_RENAME, owner,
                     replacement=", ".join(parts))

    def _output_ref(self, node: Node | None, out: _Out) -> tuple[bool, ProtectedColumn | None]:
        """Does an ORDER BY / GROUP BY item name an output column (by position or name)?"""
        k, b = _kind(node or {})
        if k == "A_Const" and "ival" in b:
            pos = int(b["ival"].get("ival", 0))
            if out.known and 1 <= pos <= len(out.items):
                return True, out.items[pos - 1][1]
            if not out.known and out.protected():
                return True, out.protected()[0]
        if k == "ColumnRef" and len(b.get("fields", [])) == 1 and "String" in b["fields"][0]:
            name = _sval(b["fields"][0])
            for n, pc in out.items:
                if n == name:
                    return True, pc
        return False, None

    def _sort(self, items: list[Node] | None, scope: _Scope, out: _Out) -> None:
        for sb in items or []:
            node = sb.get("SortBy", {}).get("node")
            hit, pc = self._output_ref(node, out)
            if pc is not None:
                raise _Refuse(
                    _msg(pc, "ORDER BY on it would sort ciphertext", "sort in the application")
                )
            if not hit:
                self._free(node, scope, "ORDER BY")

    def _grouping_ok(self, pc: ProtectedColumn, what: str) -> None:
        if pc.mode != "deterministic":
            raise _Refuse(
                _msg(
                    pc,
                    f"{what} on randomized ciphertext puts every row in its own group",
                    "group in the application",
                )
            )

    def _group(self, items: list[Node] | None, scope: _Scope, out: _Out) -> None:
        for node in items or []:
            pc = self._pref(node, scope)
            if pc is None:
                hit, pc = self._output_ref(node, out)
                if not hit:
                    self._free(node, scope, "GROUP BY")
                    continue
            if pc is not None:
                self._grouping_ok(pc, "GROUP BY")

    def _distinct(self, items: list[Node] | None, scope: _Scope, out: _Out) -> None:
        if not items:
            return
        if any(not x for x in items):  # plain DISTINCT: over every output column
            for pc in out.protected():
                self._grouping_ok(pc, "DISTINCT")
            return
        for node in items:
            pc = self._pref(node, scope)
            if pc is None:
                hit, pc = self._output_ref(node, out)
                if not hit:
                    self._free(node, scope, "DISTINCT ON")
                    continue
            if pc is not None:
                self._grouping_ok(pc, "DISTINCT ON")

    def _from_item(self, node: Node, scope: _Scope) -> None:
        k, b = _kind(node)
        if k == "RangeVar":
            scope.rels.append(self._range_var(b, scope))
        elif k == "RangeSubselect":
            out = self._select(b["subquery"], scope)
            scope.rels.append(self._rel_from_out(out, b.get("alias")))
        elif k == "JoinExpr":
            before = len(scope.rels)
            self._from_item(b["larg"], scope)
            mid = len(scope.rels)
            self._from_item(b["rarg"], scope)
            left, right = scope.rels[before:mid], scope.rels[mid:]
            merging = bool(b.get("isNatural") or b.get("usingClause"))
            scope.merged = scope.merged or merging
            if b.get("isNatural"):
                for rel in left + right:
                    if rel.cols:
                        pc = next(iter(rel.cols.values()))
                        raise _Refuse(
                            _msg(
                                pc,
                                "a NATURAL join may compare it with another column",
                                "name the join columns with ON or USING",
                            )
                        )
            for name in _names(b.get("usingClause")):
                lp = next((r.cols[name] for r in left if name in r.cols), None)
                rp = next((r.cols[name] for r in right if name in r.cols), None)
                if lp is not None and rp is not None:
                    self._join(lp, rp)
                elif lp is not None or rp is not None:
                    pc = lp or rp
                    assert pc is not None
                    raise _Refuse(
                        _msg(
                            pc,
                            "JOIN USING compares it with an unencrypted column",
                            "join on another column",
                        )
                    )
            self._free(b.get("quals"), scope, "a JOIN condition")
            alias = b.get("alias")
            if alias:
                rels = scope.rels[before:]
                ordered: list[tuple[str, ProtectedColumn | None]] | None = []
                cols: dict[str, ProtectedColumn] = {}
                storage: dict[str, ProtectedColumn] = {}
                for rel in rels:
                    cols.update(rel.cols)
                    storage.update(rel.storage)
                    if ordered is not None and rel.ordered is not None:
                        ordered.extend(rel.ordered)
                    else:
                        ordered = None
                merged = _Rel(alias.get("aliasname"), None, cols, ordered, None, storage,
                              not merging and all(rel.exact for rel in rels))
                del scope.rels[before:]
                scope.rels.append(self._apply_alias_cols(merged, _names(alias.get("colnames"))))
        elif k == "RangeFunction":
            scope.rels.append(self._range_function(b, scope))
        elif k == "RangeTableSample":
            self._from_item(b["relation"], scope)
            self._free([b.get("args"), b.get("repeatable")], scope, "TABLESAMPLE")
        else:
            self._free(node, scope, "a FROM item")
            scope.rels.append(_Rel(None, None, {}, None, None))

    # -- statements ------------------------------------------------------------

    def _returning(self, b: Node, scope: _Scope, target: _Rel) -> _Out | None:
        rc = b.get("returningClause")
        if not rc:
            return None
        # `old` / `new` (PostgreSQL 18) name the target's row versions; they are not in
        # RETURNING's `*`, so they sit in a level of their own, searched after the target.
        pseudo = _Scope(scope.parent)
        pseudo.ctes = scope.ctes
        pseudo.rels = [_Rel(n, None, target.cols, target.ordered, target.table,
                            dict(target.storage)) for n in ("old", "new")]
        rscope = _Scope(pseudo)
        rscope.rels = [*scope.rels]
        rscope.merged = scope.merged
        out = _Out()
        for t in rc.get("exprs", []):
            self._target(t.get("ResTarget", {}), rscope, out)
        return out

    def _set_list(self, targets: list[Node], target: _Rel, scope: _Scope) -> None:
        """UPDATE SET / ON CONFLICT DO UPDATE SET items."""
        for t in targets:
            rt = t.get("ResTarget", {})
            name = rt.get("name", "")
            pc = target.cols.get(name)
            val = rt.get("val") or {}
            if name in target.storage:
                raise _StorageRefuse(_storage_msg(name, target.storage[name], target.name))
            if pc is not None and rt.get("indirection"):
                raise _Refuse(_not_value(pc, "written to part of"))
            if "MultiAssignRef" in val:
                m = val["MultiAssignRef"]
                src = m.get("source", {})
                args = src.get("RowExpr", {}).get("args") if "RowExpr" in src else None
                colno = int(m.get("colno", 1))
                if pc is not None:
                    if pc.blind_index or args is None:
                        raise _Refuse(_not_value(pc, "written (in a multi-column SET) to"))
                    self._feed(args[colno - 1], pc, scope)
                elif args is not None:
                    self._free(args[colno - 1], scope, "a SET value")
                elif colno == 1:
                    self._free(src, scope, "a SET value")
            elif pc is not None:
                fed = self._feed(val, pc, scope)
                assert pc.bidx_column is not None or not pc.blind_index
                self._companion(fed, pc, f", {quote_ident(pc.bidx_column or '')} = ")
            else:
                self._free(val, scope, f"the value of column {quote_ident(name)}")

    def _insert(self, b: Node, parent: _Scope) -> _Out | None:
        scope = _Scope(parent)
        if b.get("withClause"):
            self._with(b["withClause"], scope)
        target = self._range_var(b["relation"], scope, ctes=False)
        tcols = target.cols
        cols = b.get("cols") or []
        sel = b.get("selectStmt")
        feeds: list[ProtectedColumn | None] = []
        if cols:
            tok = self.tok if any(pc.blind_index for pc in tcols.values()) else None
            for c in cols:
                rt = c.get("ResTarget", {})
                name = rt.get("name", "")
                pc = tcols.get(name)
                if name in target.storage:
                    raise _StorageRefuse(_storage_msg(name, target.storage[name], target.name))
                if pc is not None and rt.get("indirection"):
                    raise _Refuse(_not_value(pc, "written to part of"))
                feeds.append(pc)
                if pc is not None and pc.blind_index and tok is not None:
                    e = tok.ends[tok.at(rt.get("location", 0))]
                    self._splice(
                        e,
                        e,
                        ACTION_RENAME,
                        pc,
                        replacement=quote_ident(pc.bidx_column or ""),
                        prefix=", ",
                    )
        elif sel and tcols:
            pc0 = next(iter(tcols.values()))
            order = self.column_order(*target.table) if self.column_order and target.table else None
            if order is None or any(pc.blind_index for pc in tcols.values()):
                raise _Refuse(
                    _msg(
                        pc0,
                        f"INSERT into {quote_ident(pc0.table)} without a "
                        "column list cannot be mapped to its encrypted "
                        "columns",
                        "name the columns",
                    )
                )
            feeds = [tcols.get(n) for n in order]
            width = _values_width(sel)  # fewer values than columns: the rest default
            self._name_columns(b["relation"],
                               order[:width] if width is not None else order, pc0)
        if sel:
            self._select(sel, scope, feeds)
        oc = b.get("onConflictClause")
        if oc:
            cscope = _Scope(scope)
            cscope.rels = [target, _Rel("excluded", None, tcols, target.ordered, target.table)]
            infer = oc.get("infer") or {}
            for ie in infer.get("indexElems", []):
                self._free(ie.get("IndexElem", {}).get("expr"), cscope, "ON CONFLICT")
            self._free(infer.get("whereClause"), cscope, "ON CONFLICT ... WHERE")
            if oc.get("action") == "ONCONFLICT_UPDATE":
                self._set_list(oc.get("targetList", []), target, cscope)
                self._free(oc.get("whereClause"), cscope, "ON CONFLICT ... WHERE")
        scope.rels = [target]
        return self._returning(b, scope, target)

    def _relation_first_token(self, rv: Node) -> int:
        """Index of the first token of a RangeVar's name."""
        return self.tok.at(rv.get("location", -1))

    def _relation_last_token(self, rv: Node) -> int:
        """Index of the last token of a RangeVar's (possibly qualified) name."""
        nparts = 1 + (rv.get("schemaname") is not None) + (rv.get("catalogname") is not None)
        return self.tok.ident_path_last(self.tok.at(rv.get("location", 0)), nparts)

    def _name_columns(self, rv: Node, order: tuple[str, ...] | list[str],
                      pc: ProtectedColumn) -> None:
        """Write out the column list the proxy assumed (`INSERT INTO t (a, b, c) ...`,
        `COPY t (a, b, c) ...`), right after the table name (and INSERT's alias).

        Without it the server would map values by *its* column order, and the proxy
        encrypted them by the order of its catalog snapshot. The two differ when the table
        was changed by another process (a DBA, another worker or proxy) since the
        snapshot: then a value meant for a protected column could be stored as sent. With
        the list, a protected column only ever gets what the proxy sealed for it, and a
        column dropped or renamed meanwhile makes the server refuse the statement."""
        tok = self.tok
        last = self._relation_last_token(rv)
        if rv.get("alias"):  # INSERT INTO t AS x: the grammar requires the AS
            if tok.name(last + 1) != "AS":
                raise TokenError("expected AS before the INSERT alias")
            last += 2
        at = tok.ends[last]
        self._splice(at, at, ACTION_RENAME, pc,
                     replacement="(" + ", ".join(quote_ident(c) for c in order) + ")",
                     prefix=" ")

    def _update(self, b: Node, parent: _Scope) -> _Out | None:
        scope = _Scope(parent)
        if b.get("withClause"):
            self._with(b["withClause"], scope)
        target = self._range_var(b["relation"], scope, ctes=False)
        scope.rels.append(target)
        for item in b.get("fromClause") or []:
            self._from_item(item, scope)
        self._set_list(b.get("targetList", []), target, scope)
        self._free(b.get("whereClause"), scope, "a WHERE condition")
        return self._returning(b, scope, target)

    def _delete(self, b: Node, parent: _Scope) -> _Out | None:
        scope = _Scope(parent)
        if b.get("withClause"):
            self._with(b["withClause"], scope)
        target = self._range_var(b["relation"], scope, ctes=False)
        scope.rels.append(target)
        for item in b.get("usingClause") or []:
            self._from_item(item, scope)
        self._free(b.get("whereClause"), scope, "a WHERE condition")
        return self._returning(b, scope, target)

    def _copy(self, b: Node, root: _Scope) -> _Out | None:
        opts: dict[str, str] = {}
        for o in b.get("options") or []:
            d = o.get("DefElem", {})
            arg = d.get("arg")
            if arg is None:
                val = "true"
            else:
                ak, ab = _kind(arg)
                if ak == "String":
                    val = ab.get("sval", "")
                elif ak == "Integer":
                    val = str(ab.get("ival", 0))
                elif ak == "List":
                    val = ",".join(_names(ab.get("items")))
                elif ak == "A_Star":
                    val = "*"
                else:
                    val = json.dumps(ab)
            opts[d.get("defname", "")] = val
        fmt = opts.get("format", "text")
        direction = "in" if b.get("is_from") else "out"
        to_client = not b.get("filename") and not b.get("is_program")
        order_at = len(self.copies)  # this COPY's place in the order, whatever it moves
        if to_client:  # (its plan is set below when it moves protected data)
            self.copies.append((direction, None))
        if b.get("query"):
            out = self._select(b["query"], root)
            if to_client and (out.protected() or not out.known):
                self.copies[order_at] = (direction, CopyPlan(None, None, direction, fmt, opts,
                                                       query_columns=out.columns()))
            return None
        rv = b["relation"]
        target = self._range_var(rv, root, ctes=False)
        if target.table is None:
            return None
        pc0 = next(iter(target.cols.values()))
        if not to_client:
            if direction == "in":
                raise _Refuse(
                    _msg(
                        pc0,
                        "COPY FROM a server file or PROGRAM would store data the proxy never sees",
                        "use COPY ... FROM STDIN",
                    )
                )
            return None
        wscope = _Scope(root)
        wscope.rels = [target]
        self._free(b.get("whereClause"), wscope, "COPY ... WHERE")
        attlist = _names(b.get("attlist")) or None
        for name in attlist or []:
            if name in target.storage:
                raise _StorageRefuse(_storage_msg(name, target.storage[name], target.name))
        index_cols: list[tuple[str, ProtectedColumn]] = []
        if direction == "in":
            bidx = [pc for pc in target.cols.values() if pc.blind_index]
            if attlist is None and bidx:
                raise _Refuse(
                    _msg(
                        bidx[0],
                        "COPY FROM into a table with blind-indexed "
                        "columns needs the index values added",
                        "name the columns",
                    )
                )
            for name in attlist or []:
                pc = target.cols.get(name)
                if pc is not None and pc.blind_index:
                    index_cols.append((pc.bidx_column or "", pc))
            if index_cols:
                tok = self.tok
                close = tok.close(self._relation_last_token(rv) + 1)
                at = tok.starts[close]
                self._splice(
                    at,
                    at,
                    ACTION_RENAME,
                    index_cols[0][1],
                    replacement=", ".join(quote_ident(n) for n, _ in index_cols),
                    prefix=", ",
                )
        assert target.table is not None
        if attlist is None and target.cols:
            # (the blind-index case was refused above: its index values are not in the data)
            order = self.column_order(*target.table) if self.column_order else None
            if order is None:
                raise _Refuse(_msg(pc0, f"COPY of {quote_ident(pc0.table)}: its columns are "
                                   "not known yet", "name the columns"))
            # (without the storage columns: a COPY TO lists what `*` shows)
            order = tuple(n for n in order if n not in target.storage)
            self._name_columns(rv, order, pc0)
            attlist = list(order)
        self.copies[order_at] = (direction, CopyPlan(
            target.table,
            tuple(attlist) if attlist else None,
            direction,
            fmt,
            opts,
            tuple(index_cols),
        ))
        return None

    def _mentions(self, body: str) -> str | None:
        """A protected table name used in procedural code, by tokens (identifiers exact,
        string constants by substring, for dynamic SQL); whole text if it won't lex."""
        names = self.schema.table_names
        try:
            toks = scan(body)
        except ParseError:
            low = body.lower()
            return next((n for n in self.schema.lower_names if n in low), None)
        for t in toks:
            text = body[t.start : t.end + 1]
            if t.name in ("SCONST", "USCONST"):
                low = text.lower()
                hit = next((n for n in self.schema.lower_names if n in low), None)
                if hit:
                    return hit
                continue
            ident = text[1:-1].replace('""', '"') if text.startswith('"') else text.lower()
            if ident in names:
                return ident
        return None

    def _procedural(self, k: str, b: Node) -> None:
        bodies: list[str] = []
        if k == "DoStmt":
            for a in b.get("args", []):
                d = a.get("DefElem", {})
                if d.get("defname") == "as":
                    bodies.append(_sval(d.get("arg", {})))
        else:
            for o in b.get("options", []):
                d = o.get("DefElem", {})
                if d.get("defname") == "as":
                    arg = d.get("arg", {})
                    bodies.extend(
                        _names(arg.get("List", {}).get("items")) if "List" in arg else [_sval(arg)]
                    )
            if b.get("sql_body"):
                for rv in _relnames(b["sql_body"]):
                    key = self.schema.lookup(
                        (rv.get("schemaname"), rv.get("relname", "")),
                        self.search_path,
                        self.table_exists,
                    )
                    if key is not None:
                        bodies.append(key[1])
        for body in bodies:
            hit = self._mentions(body)
            if hit:
                raise _Refuse(
                    f"procedural code (DO block or function body) mentions "
                    f"protected table {quote_ident(hit)}: the proxy cannot encrypt "
                    "values inside it; use plain SQL statements for encrypted "
                    "columns"
                )

    def _execute(self, b: Node) -> None:
        args = b.get("params") or []
        if not args:
            return
        plan = self.prepared(b.get("name", "")) if self.prepared else None
        if plan is None and self.prepared is not None:
            for a in args:
                self._free(a, _Scope(None), "EXECUTE")
            return
        if plan is None:
            first = next(iter(next(iter(self.schema.values())).values()))
            raise _Refuse(
                _msg(
                    first,
                    "EXECUTE with arguments cannot be checked for values "
                    "aimed at encrypted columns",
                    "use the extended protocol (Parse/Bind) instead",
                )
            )
        if plan.refusal:
            raise _Refuse(plan.refusal)
        for i, a in enumerate(args, start=1):
            pa = plan.params.get(i)
            if pa is None:
                self._free(a, _Scope(None), "EXECUTE")
                continue
            v = self._value(a, pa.column)
            if v is None:
                raise _Refuse(_not_value(pa.column, "passed to EXECUTE for"))
            if v.kind != "null":
                self._apply(v, pa.action, pa.column)
        if plan.derived_params:
            raise _Refuse(
                _msg(
                    plan.derived_params[0].column,
                    "EXECUTE of a statement writing a blind-indexed column is not supported",
                    "use the extended protocol (Parse/Bind)",
                )
            )

    def _ddl(self, node: Node) -> None:
        """Other statements: count protected tables; refuse expressions near them."""
        keys = []
        for rv in _relnames(node):
            key = self.schema.lookup(
                (rv.get("schemaname"), rv.get("relname", "")), self.search_path, self.table_exists
            )
            if key is not None:
                keys.append(key)
                self.tables.add(key)
        if not keys:
            return
        stack: list[Any] = [node]
        while stack:
            x = stack.pop()
            if isinstance(x, dict):
                for kk, v in x.items():
                    if kk in _EXPR_NODES and not (kk == "A_Const" and v.get("isnull")):
                        pc = next(iter(self.schema[keys[0]].values()))
                        raise _Refuse(
                            _msg(
                                pc,
                                "a DDL or utility statement with expressions on "
                                "a table with encrypted columns is not "
                                "analysed",
                                "run it as an administrator directly against the server",
                            )
                        )
                    if kk != "typeName" and isinstance(v, dict | list):
                        stack.append(v)
            elif isinstance(x, list):
                stack.extend(x)

    def _explain(self, b: Node, root: _Scope) -> None:
        """EXPLAIN of a statement the proxy seals values into is refused: the plan text
        (``Index Cond``, ``Filter``, ``Output``, VERBOSE or not) prints the sealed literal
        or the searched blind index (``pan_bidx = '\\x...'``), and the blind index links
        every row holding that value, whatever the role's view of the column. EXPLAIN of
        a statement with nothing sealed (or only ``*`` written out) is passed on."""
        splices, derived, params = len(self.splices), len(self.derived), set(self.params)
        self._statement(b["query"], root)
        sealed = [s.column for s in self.splices[splices:] if s.action != ACTION_RENAME]
        sealed += [pc for _, pc, _, _ in self.derived[derived:]]
        sealed += [self.params[n].column for n in sorted(set(self.params) - params)]
        if sealed:
            raise _Refuse(_msg(sealed[0], "EXPLAIN would print the value the proxy sealed "
                               "for it (its ciphertext or blind index) in the plan",
                               "EXPLAIN the statement with the value left out, or as an "
                               "administrator directly against the server"))

    def _statement(self, node: Node, root: _Scope, *, top: bool = False) -> _Out | None:
        """Plan one statement; returns its result columns when it returns rows."""
        k, b = _kind(node)
        if k == "SelectStmt":
            return self._select(node, root, top=top)
        if k == "InsertStmt":
            return self._insert(b, root)
        if k == "UpdateStmt":
            return self._update(b, root)
        if k == "DeleteStmt":
            return self._delete(b, root)
        if k == "CopyStmt":
            return self._copy(b, root)
        if k == "ExplainStmt":
            self._explain(b, root)
            return None
        if k == "CreateTableAsStmt":
            self._statement(b["query"], root)
            return None
        if k == "ViewStmt":
            self._statement(b["query"], root)
            return None
        if k == "DeclareCursorStmt":
            return self._statement(b["query"], root)
        if k == "PrepareStmt":
            before = set(self.params)
            self._statement(b["query"], root)
            new = set(self.params) - before
            if new or self.derived:
                pc = self.params[min(new)].column if new else self.derived[0][1]
                raise _Refuse(
                    _msg(
                        pc,
                        "SQL PREPARE with parameters aimed at it cannot be "
                        "encrypted at EXECUTE time",
                        "use the extended protocol (Parse/Bind) instead",
                    )
                )
            return None
        if k in ("DoStmt", "CreateFunctionStmt"):
            self._procedural(k, b)
            return None
        if k == "ExecuteStmt":
            self._execute(b)
            return None
        if k in ("MergeStmt", "RuleStmt"):
            for rv in _relnames(node):
                key = self.schema.lookup(
                    (rv.get("schemaname"), rv.get("relname", "")),
                    self.search_path,
                    self.table_exists,
                )
                if key is not None:
                    pc = next(iter(self.schema[key].values()))
                    raise _Refuse(
                        _msg(
                            pc,
                            f"{'MERGE' if k == 'MergeStmt' else 'CREATE RULE'}"
                            " on a table with encrypted columns is not "
                            "supported",
                            "use INSERT / UPDATE / DELETE",
                        )
                    )
            return None
        self._ddl(node)
        return None

    # -- result ----------------------------------------------------------------

    def finish(self, columns: list[OutputColumns]) -> RewritePlan:
        """Check cross-statement rules and freeze the plan."""
        both = set(self.params) & self.free_params
        if both:
            n = min(both)
            raise _Refuse(
                _msg(
                    self.params[n].column,
                    f"parameter ${n} is also used elsewhere in the statement",
                    "use a separate parameter for each use",
                )
            )
        splices = list(self.splices)
        derived: list[DerivedParam] = []
        if self.derived:
            tok = self.tok
            top = max(
                (int(tok.text(i)[1:]) for i, n in enumerate(tok.names) if n == "PARAM"), default=0
            )
            numbers: dict[tuple[int, ProtectedColumn], int] = {}
            for source, pc, at, prefix in self.derived:
                key = (source, pc)
                if key not in numbers:
                    numbers[key] = top + len(numbers) + 1
                    derived.append(DerivedParam(numbers[key], source, ACTION_BLIND_INDEX, pc))
                splices.append(Splice(at, at, ACTION_RENAME, pc, None, f"${numbers[key]}", prefix))
        uniq = sorted(set(splices), key=lambda s: (s.start, s.end != s.start, s.end))
        for a, b in pairwise(uniq):
            if b.start < a.end:
                raise _Refuse(
                    _msg(
                        a.column,
                        "the statement uses one value in two incompatible ways",
                        "simplify the statement",
                    )
                )
        copies = tuple(self.copies)
        touches = bool(self.tables or uniq or self.params
                       or any(cp is not None for _d, cp in copies))
        if not touches:
            return RewritePlan(touches_protected=False, copies=copies) if copies else NO_PROTECTED
        return RewritePlan(
            touches_protected=True,
            splices=tuple(uniq),
            params=dict(self.params),
            derived_params=tuple(derived),
            recheck=tuple(self.recheck),
            join_pairs=tuple(dict.fromkeys(self.join_pairs)),
            copies=copies,
            tables_referenced=frozenset(self.tables),
            columns_selected=tuple(columns),
        )


# ------------------------------------------------------------------------ public API


def _could_touch(sql: str, schema: ProtectedSchema) -> bool:
    """Cheap prefilter on the text: could it name a protected table (or hide one behind
    a ``U&"..."`` identifier, or run a prepared statement)?  False is a proof."""
    low = sql.lower()
    return "u&" in low or "execute" in low or any(n in low for n in schema.lower_names)


def _json_mentions(text: str, schema: ProtectedSchema) -> bool:
    """Second cheap check on the JSON tree text: a protected relname or opaque code."""
    if "DoStmt" in text or "CreateFunctionStmt" in text or "ExecuteStmt" in text:
        return True
    return any(needle in text for needle in schema.relname_needles)


def _copies_only(sql: str, text: str | None = None) -> RewritePlan:
    """The plan of a string that touches nothing protected: NO_PROTECTED, or, when it
    holds COPY statements to or from the client, their directions in order (their data
    passes as is, but the session must know which stream belongs to which COPY).
    ``text``: the string's JSON parse tree, when already made."""
    if "copy" not in sql.lower():
        return NO_PROTECTED  # (a proof: the keyword cannot hide from a lower-case match)
    if text is None:
        try:
            text = parse_sql_json(sql)
        except ParseError:
            return NO_PROTECTED  # the server will not parse it either (or fails closed)
    if "CopyStmt" not in text:
        return NO_PROTECTED
    copies: list[CopyStep] = []
    for stmt in json.loads(text).get("stmts", []):
        k, b = _kind(stmt.get("stmt", {}))
        if k == "CopyStmt" and not b.get("filename") and not b.get("is_program"):
            copies.append(("in" if b.get("is_from") else "out", None))
    return RewritePlan(touches_protected=False, copies=tuple(copies)) if copies else NO_PROTECTED


def plan_statement(
    sql: str,
    schema: ProtectedSchema,
    search_path: tuple[str, ...],
    *,
    table_exists: TableExists | None = None,
    column_order: ColumnOrder | None = None,
    prepared: PreparedLookup | None = None,
    storage_ok: bool = False,
) -> RewritePlan:
    """Plan the rewriting of one SQL string (one or more statements).

    ``search_path`` is the session's effective path with ``$user`` already expanded.
    ``table_exists(schema, name)`` lets an unprotected table earlier in the path shadow
    a protected one; ``column_order(schema, table)`` maps INSERT without a column list and
    expands ``*``; ``prepared(name)`` gives the plan of a prepared statement so
    ``EXECUTE name(args)`` can be encrypted (without it, EXECUTE with arguments is refused
    when any column is protected). ``storage_ok``: the string is a view's definition,
    whose plain result columns may be storage columns (reported in ``storage_selected``).
    Returns :data:`NO_PROTECTED` when nothing protected is
    involved.  Splice offsets are UTF-8 byte offsets.
    """
    if not len(schema) or not _could_touch(sql, schema):
        return _copies_only(sql)
    try:
        text = parse_sql_json(sql)
    except ParseError:
        return RewritePlan(
            touches_protected=True,
            refusal="the statement could not be parsed and may involve protected tables; "
            "refused (nothing was sent to the server)",
        )
    if not _json_mentions(text, schema):
        return _copies_only(sql, text)
    planner = _Planner(sql, schema, search_path, table_exists, column_order, prepared,
                       storage_ok)
    columns: list[OutputColumns] = []
    storage: list[dict[int, ProtectedColumn]] = []
    try:
        for n, stmt in enumerate(json.loads(text).get("stmts", [])):
            planner.statement = n
            out = planner._statement(stmt.get("stmt", {}), _Scope(None), top=True)
            columns.append(out.columns() if out is not None else ())
            storage.append(dict(out.storage_at) if out is not None else {})
        plan = planner.finish(columns)
        if any(storage) and plan.touches_protected:
            plan = replace(plan, storage_selected=tuple(storage))
        return plan
    except _Refuse as exc:
        return RewritePlan(
            touches_protected=True, refusal=str(exc), tables_referenced=frozenset(planner.tables),
            refusal_sqlstate=exc.sqlstate,
        )
    except TokenError:
        return RewritePlan(
            touches_protected=True,
            refusal="the statement's literals could not be located exactly; "
            "refused rather than risk sending plaintext",
            tables_referenced=frozenset(planner.tables),
        )


def apply_splices(sql: str, splices: Iterable[Splice], render: Callable[[Splice], str]) -> str:
    """Apply a plan's splices; ``render`` gives the new text of encrypt/blind_index ones
    (``'\\x<hex>'::bytea``).  Works on UTF-8 bytes, as the offsets are byte offsets."""
    raw = sql.encode()
    parts: list[bytes] = []
    pos = 0
    for s in sorted(splices, key=lambda s: (s.start, s.end != s.start, s.end)):
        parts.append(raw[pos : s.start])
        text = s.replacement if s.action == ACTION_RENAME else render(s)
        parts.append((s.prefix + (text or "")).encode())
        pos = max(pos, s.end)
    parts.append(raw[pos:])
    return b"".join(parts).decode()
