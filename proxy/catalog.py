"""Where the protected columns live in one database: (table oid, attnum) <-> names.

RowDescription carries (table oid, attnum) for every plain column reference, through
aliases, subqueries and CTEs, so this map is the cheap and exact way to know which result
columns to decrypt. It is loaded with a query the session injects on its own upstream
connection (no extra credentials), shared by all sessions of the database in this
process, and reloaded when a statement names a protected table it does not know yet or
after DDL. Nothing here assumes this process is the only proxy.
"""

from __future__ import annotations

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


@dataclass(frozen=True, slots=True)
class Snapshot:
    tables: dict[tuple[str, str], TableInfo] = field(default_factory=dict)
    by_oid: dict[int, TableInfo] = field(default_factory=dict)

    def table(self, schema: str, name: str) -> TableInfo | None:
        return self.tables.get((schema, name))


def catalog_query(tables: list[tuple[str, str]]) -> str:
    """SQL listing the given relations' columns. Names are passed as escaped literals;
    they come from the operator's config, never from a client."""
    if not tables:
        tables = [("pg_catalog", "pg_class")]
    values = ", ".join(f"({_lit(s)}, {_lit(t)})" for s, t in sorted(set(tables)))
    return (
        "SELECT c.oid, n.nspname, c.relname, c.relkind, a.attnum, a.attname, "
        "pg_catalog.format_type(a.atttypid, a.atttypmod) "
        "FROM pg_catalog.pg_class c "
        "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
        "JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid "
        "AND a.attnum > 0 AND NOT a.attisdropped "
        f"WHERE (n.nspname, c.relname) IN (VALUES {values}) "
        "ORDER BY c.oid, a.attnum"
    )


def _lit(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def build_snapshot(rows: list[list[bytes | None]]) -> Snapshot:
    """Turn the catalog query's text rows into a Snapshot."""
    grouped: dict[int, list[list[str]]] = {}
    for row in rows:
        vals = [(v or b"").decode() for v in row]
        grouped.setdefault(int(vals[0]), []).append(vals)
    tables: dict[tuple[str, str], TableInfo] = {}
    by_oid: dict[int, TableInfo] = {}
    for oid, cols in grouped.items():
        schema, name, kind = cols[0][1], cols[0][2], cols[0][3]
        info = TableInfo(
            oid=oid,
            schema=schema,
            name=name,
            kind=kind,
            columns=tuple(c[5] for c in cols),
            attnums={c[5]: int(c[4]) for c in cols},
            types={c[5]: c[6] for c in cols},
        )
        tables[(schema, name)] = info
        by_oid[oid] = info
    return Snapshot(tables, by_oid)


class DatabaseCatalog:
    """The current Snapshot for one database, and whether it must be reloaded."""

    __slots__ = ("loading", "snapshot", "stale")

    def __init__(self) -> None:
        self.snapshot: Snapshot | None = None
        self.stale = True
        self.loading = False

    def update(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.stale = False
        self.loading = False
