"""`strongroom check-config --live`: the `protect:` section against the live database.

A config can be valid YAML with the right keys and still not match the database: a
column misspelt, a table not yet migrated (`encrypt-column` not run, so the column is
still `text`), a blind-index sibling missing. The proxy would then refuse statements or
fail at run time; ops should learn it before the rollout, with the config line to fix.

`column_problems` is pure (catalog rows in, messages out) so it is tested without a
server; `fetch_columns` is the one catalog query.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

COLUMNS_SQL = """
SELECT n.nspname, c.relname, a.attname, format_type(a.atttypid, NULL)
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_catalog.pg_attribute a
       ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
WHERE c.relkind IN ('r', 'p') AND (n.nspname, c.relname) IN (
    SELECT split_part(t, '.', 1), split_part(t, '.', 2) FROM unnest($1::text[]) AS t)
"""

Catalog = dict[tuple[str, str], dict[str, str]]  # (schema, table) -> column -> type name


def build_catalog(rows: Iterable[tuple[str, str, str | None, str | None]]) -> Catalog:
    out: Catalog = {}
    for schema, table, column, type_name in rows:
        cols = out.setdefault((schema, table), {})
        if column is not None:
            cols[column] = type_name or "?"
    return out


def column_problems(protect: Mapping[str, Mapping[str, Any]], catalog: Catalog,
                    database: str) -> list[tuple[str, str]]:
    """(protect entry, message) for every protected column that the live database does
    not hold as the proxy needs it: the table and column exist, the column is `bytea`,
    and so is the blind-index sibling when `search: blind_index`."""
    problems: list[tuple[str, str]] = []
    for name, spec in protect.items():
        schema, table, column = name.split(".")
        cols = catalog.get((schema, table))
        if cols is None:
            problems.append((name, f"table {schema}.{table} does not exist in database "
                                   f"{database}"))
            continue
        wanted = [(column, "the column")]
        if spec.get("search") == "blind_index":
            wanted.append((spec.get("bidx_column") or f"{column}_bidx", "its blind-index column"))
        for col, what in wanted:
            type_name = cols.get(col)
            if type_name is None:
                problems.append((name, f"{what} {schema}.{table}.{col} does not exist in "
                                       f"database {database}"))
            elif type_name != "bytea":
                hint = (" (convert it with `strongroom encrypt-column " + name + "`)"
                        if col == column else "")
                problems.append((name, f"{what} {schema}.{table}.{col} is {type_name}, not "
                                       f"bytea{hint}"))
    return problems


async def fetch_columns(conn: Any, protect: Mapping[str, Any]) -> Catalog:
    """The live columns of every protected table (asyncpg connection)."""
    tables = sorted({".".join(name.split(".")[:2]) for name in protect})
    rows = await conn.fetch(COLUMNS_SQL, tables)
    return build_catalog(tuple(r) for r in rows)
