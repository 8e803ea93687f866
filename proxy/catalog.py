"""Where the protected columns live in one database: (table oid, attnum) <-> names.

RowDescription carries (table oid, attnum) for every plain column reference, through
aliases, subqueries and CTEs, so this map is the cheap and exact way to know which result
columns to decrypt. It is loaded with a query the session injects on its own upstream
connection (no extra credentials), shared by all sessions of the database in this
process, and reloaded when a statement names a protected table it does not know yet or
after DDL. Nothing here assumes this process is the only proxy.

Views (and materialized views) over protected tables are loaded too, with their
definition (`pg_get_viewdef`) and the relations they depend on (`pg_depend` of their
rewrite rule): RowDescription names the *view's* oid/attnum for a view column, so the
proxy must know which base column each view column is. `proxy.encryption` plans each
definition with the SQL rewriter to map view columns to protected base columns, and
treats a view it cannot map as untraceable (its protected output is refused).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class TableInfo:
    oid: int
    schema: str
    name: str
    kind: str  # pg_class.relkind: r, p, v, m, f
    columns: tuple[str, ...]  # in attnum order, dropped columns excluded
    attnums: dict[str, int]
    types: dict[str, str]  # column -> format_type()
    definition: str | None = None  # views: pg_get_viewdef()
    depends: frozenset[int] = frozenset()  # views: oids of the relations it reads


@dataclass(frozen=True, slots=True)
class FunctionInfo:
    """A user function whose result may hold a storage column of the proxy: it returns
    the row type of a protected relation (``rowtype``: that relation's oid) or has
    OUT / TABLE columns of type bytea (``outputs``: their names in order)."""

    oid: int
    schema: str
    name: str
    rowtype: int  # pg_type.typrelid of the result type; 0 when not a relation's row type
    outputs: tuple[str, ...] = ()


_SERIALS = itertools.count(1)


@dataclass(frozen=True, slots=True)
class Snapshot:
    tables: dict[tuple[str, str], TableInfo] = field(default_factory=dict)
    by_oid: dict[int, TableInfo] = field(default_factory=dict)
    search_path: tuple[str, ...] = ("public",)  # the path view definitions were printed in
    # Unique for the life of the process: what plan caches key a snapshot by. Never
    # id(snapshot): a freed snapshot's address is reused by the next one, which would be
    # served the plans made for another catalog (a view it did not know of: unsealed).
    serial: int = field(default_factory=lambda: next(_SERIALS), compare=False)
    # (schema, name) -> every such function of that name (overloads included)
    functions: dict[tuple[str, str], tuple[FunctionInfo, ...]] = field(default_factory=dict)

    def table(self, schema: str, name: str) -> TableInfo | None:
        return self.tables.get((schema, name))

    def views(self) -> list[TableInfo]:
        """Views over protected tables, in dependency order (a view before views on it)."""
        out = [t for t in self.by_oid.values() if t.definition is not None]
        done: set[int] = set()
        ordered: list[TableInfo] = []
        while out:
            ready = [v for v in out if not (v.depends & {w.oid for w in out} - done - {v.oid})]
            if not ready:  # a cycle cannot happen in PostgreSQL; keep going anyway
                ready = out[:1]
            for v in ready:
                ordered.append(v)
                done.add(v.oid)
            out = [v for v in out if v.oid not in done]
        return ordered


def catalog_query(tables: list[tuple[str, str]]) -> str:
    """SQL listing the given relations' columns. Names are passed as escaped literals;
    they come from the operator's config, never from a client."""
    if not tables:
        tables = [("pg_catalog", "pg_class")]
    values = ", ".join(f"({_lit(s)}, {_lit(t)})" for s, t in sorted(set(tables)))
    # rels: the protected tables, then (recursively) every view reading one of them.
    return (
        "WITH RECURSIVE rels(oid) AS ("
        "SELECT c.oid FROM pg_catalog.pg_class c "
        "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
        f"WHERE (n.nspname, c.relname) IN (VALUES {values}) "
        "UNION SELECT r.ev_class FROM rels "
        "JOIN pg_catalog.pg_depend d ON d.refobjid = rels.oid "
        "AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass "
        "AND d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass "
        "JOIN pg_catalog.pg_rewrite r ON r.oid = d.objid AND r.ev_class <> rels.oid) "
        "SELECT c.oid, n.nspname, c.relname, c.relkind, a.attnum, a.attname, "
        "pg_catalog.format_type(a.atttypid, a.atttypmod), "
        "CASE WHEN c.relkind IN ('v', 'm') AND a.attnum = 1 THEN "
        "pg_catalog.pg_get_viewdef(c.oid) END, "
        "CASE WHEN c.relkind IN ('v', 'm') AND a.attnum = 1 THEN "
        "(SELECT pg_catalog.string_agg(DISTINCT d.refobjid::text, ',') "
        "FROM pg_catalog.pg_rewrite r JOIN pg_catalog.pg_depend d ON d.objid = r.oid "
        "AND d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass "
        "AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass "
        "WHERE r.ev_class = c.oid AND d.refobjid <> c.oid) END "
        "FROM (SELECT DISTINCT oid FROM rels) rels "
        "JOIN pg_catalog.pg_class c ON c.oid = rels.oid "
        "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
        "JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid "
        "AND a.attnum > 0 AND NOT a.attisdropped "
        # Then user functions whose result may hold a storage column (kind 'F'): those
        # returning the row type of a relation above, and those with an OUT / TABLE
        # column of type bytea: a row 0 (the row type's relation oid in column 8), then
        # one row per output column.
        "UNION ALL SELECT p.oid, n.nspname, p.proname, 'F', o.i, o.name, "
        "pg_catalog.format_type(o.t, NULL), t.typrelid::text, NULL "
        "FROM pg_catalog.pg_proc p "
        "JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace "
        "JOIN pg_catalog.pg_type t ON t.oid = p.prorettype "
        "CROSS JOIN LATERAL (SELECT 0::bigint, NULL::text, NULL::oid UNION ALL "
        "SELECT a.i, p.proargnames[a.i], a.t "
        "FROM pg_catalog.unnest(p.proallargtypes) WITH ORDINALITY a(t, i) "
        "WHERE p.proargmodes[a.i] IN ('o', 'b', 't')) o(i, name, t) "
        "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') "
        "AND (t.typrelid IN (SELECT oid FROM rels) OR EXISTS ("
        "SELECT 1 FROM pg_catalog.unnest(p.proallargtypes) WITH ORDINALITY a(t, i) "
        "WHERE p.proargmodes[a.i] IN ('o', 'b', 't') "
        "AND a.t = 'pg_catalog.bytea'::pg_catalog.regtype)) "
        "ORDER BY 1, 5"
    )


def _lit(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def build_snapshot(rows: list[list[bytes | None]],
                   search_path: tuple[str, ...] = ("public",)) -> Snapshot:
    """Turn the catalog query's text rows into a Snapshot."""
    grouped: dict[int, list[list[str | None]]] = {}
    funcs: dict[int, list[list[str | None]]] = {}
    for row in rows:
        vals = [None if v is None else v.decode() for v in row]
        into = funcs if len(vals) > 3 and vals[3] == "F" else grouped
        into.setdefault(int(vals[0] or 0), []).append(vals)
    functions: dict[tuple[str, str], tuple[FunctionInfo, ...]] = {}
    for oid, outs in funcs.items():
        fn = FunctionInfo(oid, str(outs[0][1]), str(outs[0][2]), int(outs[0][7] or 0),
                          tuple(str(o[5] or "") for o in outs if int(o[4] or 0) > 0))
        key = (fn.schema, fn.name)
        functions[key] = (*functions.get(key, ()), fn)
    tables: dict[tuple[str, str], TableInfo] = {}
    by_oid: dict[int, TableInfo] = {}
    for oid, cols in grouped.items():
        schema, name, kind = str(cols[0][1]), str(cols[0][2]), str(cols[0][3])
        first = cols[0]
        definition = first[7] if len(first) > 7 else None
        depends = first[8] if len(first) > 8 else None
        info = TableInfo(
            oid=oid,
            schema=schema,
            name=name,
            kind=kind,
            columns=tuple(str(c[5]) for c in cols),
            attnums={str(c[5]): int(c[4] or 0) for c in cols},
            types={str(c[5]): str(c[6]) for c in cols},
            definition=definition if kind in ("v", "m") else None,
            depends=frozenset(int(x) for x in (depends or "").split(",") if x),
        )
        tables[(schema, name)] = info
        by_oid[oid] = info
    return Snapshot(tables, by_oid, search_path, functions=functions)


MAX_AGE = 30.0
"""Seconds after which a statement on a protected table asks for a reload. DDL sent
through this process reloads at once; DDL done elsewhere (directly, another worker or
proxy) is seen by the next reload, so this bounds how long it can go unseen."""


class DatabaseCatalog:
    """The current Snapshot for one database, and when it was loaded or last asked for."""

    __slots__ = ("asked_at", "loaded_at", "snapshot")

    def __init__(self) -> None:
        self.snapshot: Snapshot | None = None
        self.loaded_at = self.asked_at = 0.0

    def update(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.loaded_at = time.monotonic()

    def due(self, max_age: float = MAX_AGE) -> bool:
        """Whether the snapshot is old enough to reload. True once per `max_age`, not
        for every session at once: the first one asks, the others use the answer (if
        that session goes away unanswered, another asks after `max_age`)."""
        now = time.monotonic()
        if now - self.loaded_at < max_age or now - self.asked_at < max_age:
            return False
        self.asked_at = now
        return True
