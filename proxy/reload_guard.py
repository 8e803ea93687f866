"""A reload must not strand stored envelopes (issue 17, section 1).

Dropping a column from `protect:` (or changing its `type` or `join_group`, which the
envelopes' associated data and key name depend on) while the column still holds
envelopes would make the proxy pass the raw envelopes to clients and store the next
INSERT's plaintext bytes in the `bytea` column. Taking protection off is `strongroom
decrypt-column`'s job; a reload that would do it is refused while the database holds
values there.

Whether it does is observed, not assumed: one query per column on a direct connection
(asyncpg, as `keys retire` counts key usage in keys/usage.py) to the upstream
host/port with the credentials of the proxy's environment ($PGUSER, $PGPASSWORD or
~/.pgpass), in `upstream.database` when it pins every session there, else in every
database of the server that accepts connections (a client picks its database, and one
this process has not served yet may hold envelopes). When the question cannot be asked
or answered in one of them, the reload is refused (fail closed).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

_BINDING = ("type", "join_group")  # what an envelope's associated data and key depend on


def dropped_protection(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(column, what changed) for each `protect:` entry of `old` whose envelopes `new`
    could no longer open: removed, or its type or join group changed."""
    out: list[tuple[str, str]] = []
    for name, spec in (old or {}).items():
        now = (new or {}).get(name)
        if now is None:
            out.append((name, "removed from protect:"))
            continue
        for key in _BINDING:
            was, is_ = (spec or {}).get(key), (now or {}).get(key)
            if key == "type":
                was, is_ = was or "text", is_ or "text"
            if was != is_:
                out.append((name, f"its {key} changed: {was} -> {is_}"))
    return out


async def holds_values(conn: Any, schema: str, table: str, column: str) -> bool:
    """Whether the column is bytea in this database and has a non-NULL value (an
    envelope). A column that does not exist, or is not bytea (decrypt-column ran), holds
    none."""
    from keys.usage import _column_types
    from proxy.migrate import BYTEA_OID, qi, qualified

    if (await _column_types(conn, schema, table)).get(column) != BYTEA_OID:
        return False
    return bool(await conn.fetchval(
        f"SELECT EXISTS (SELECT 1 FROM {qualified(schema, table)} "
        f"WHERE {qi(column)} IS NOT NULL)"))


UNFILTERED = {"row_security": "off"}
"""Row-level security that hides rows from the checking role must not read as "no
envelope": with it off, PostgreSQL raises an error instead of filtering (as for
pg_dump), and the reload is refused."""

DATABASES_SQL = ("SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate "
                 "ORDER BY datname")


async def columns_with_values(settings: Any, databases: Iterable[str],
                              columns: Iterable[str]) -> list[tuple[str, str]]:
    """(database, column) for each of `columns` that holds values in one of
    `databases` and, when `upstream.database` does not pin every session to one
    database, in every database of the server a client could connect to: a client
    picks its database then, and one this process has not served yet may hold the
    envelopes. Raises whatever a connection or query raises (a database that cannot be
    asked is not taken to hold none)."""
    from proxy.migrate import connect

    up = settings.upstream
    found: list[tuple[str, str]] = []
    todo = sorted(set(databases))
    seen: set[str] = set()
    listed = bool(up.database)  # pinned: the sessions' database is the only one
    while todo:
        database = todo.pop(0)
        if database in seen:
            continue
        seen.add(database)
        conn = await connect(host=up.host, port=up.port, database=database,
                             ssl=settings.upstream_ssl_context() or False,
                             timeout=up.connect_timeout, server_settings=UNFILTERED)
        try:
            if not listed:
                listed = True
                todo += [r["datname"] for r in await conn.fetch(DATABASES_SQL)]
            for name in columns:
                if await holds_values(conn, *name.split(".")):
                    found.append((database, name))
        finally:
            await conn.close()
    return sorted(found)


def refusal(found: list[tuple[str, str]], dropped: list[tuple[str, str]]) -> str:
    """The log line of a refused reload: which columns, and what to do instead."""
    how = dict(dropped)
    parts = [f"{name} ({how[name]}) still holds encrypted values in database {db}"
             for db, name in found]
    names = ", ".join(sorted({name for _db, name in found}))
    return ("; ".join(parts) + ". Removing protection is `strongroom decrypt-column`'s "
            "job: run `strongroom decrypt-column -c CONFIG SCHEMA.TABLE.COLUMN` for "
            f"{names} with the running configuration, then reload without the entry")
