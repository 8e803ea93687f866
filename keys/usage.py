"""Which stored data still uses a key: what `strongroom keys retire` checks first.

Retiring a key that values still use is how an operator loses data, so the retire is
refused while the database says the key is in use, observed, not assumed:

* encrypt keys: every envelope names its key in the header (bytes 3..6, see
  proxy.crypto.envelope), so the count is one `substr(col, 3, 4) = <id>` per protected
  column that uses the key (a join group's key is shared by several columns);
* blind-index keys: a blind index is a bare truncated HMAC and names no key. Which key
  made it is still observable: decrypt the row's value, compute its index under the key
  to be retired, compare with what is stored. That is a scan of the table in one
  read-only snapshot, done here with the keys loaded from the configuration; a row
  whose value does not decrypt cannot be checked and counts as a use (fail closed).

A column that does not exist in the database, or is not bytea there (not encrypted yet,
or decrypted again), holds no envelope. Nothing here reads out or prints a value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg

from keys import keyring as kr
from proxy.crypto.blind_index import BlindIndex
from proxy.crypto.envelope import DecryptError
from proxy.crypto.keyview import ColumnKeys, Purpose
from proxy.migrate import BYTEA_OID, BarFactory, no_bar, qi, qualified

VALUES = "value"
INDEXES = "blind index"
UNCHECKABLE = "row whose value does not decrypt (its blind index cannot be checked)"


@dataclass(frozen=True, slots=True)
class Use:
    """How many stored items of one column (in one database) name or match a key."""

    database: str
    column: str  # schema.table.column of the protected column
    what: str  # VALUES, INDEXES or UNCHECKABLE
    count: int

    def describe(self) -> str:
        plural = {VALUES: "values", INDEXES: "blind indexes",
                  UNCHECKABLE: "rows whose value does not decrypt (blind index uncheckable)"}
        what = self.what if self.count == 1 else plural[self.what]
        return f"{self.column}: {self.count} {what}"


class UsageUnknown(Exception):
    """The database cannot tell whether a key is used (its columns are not configured)."""


async def _column_types(conn: asyncpg.Connection, schema: str, table: str,
                        ) -> dict[str, int]:
    """name -> type oid of a table's columns; empty when the table does not exist."""
    rows = await conn.fetch(
        "SELECT a.attname, a.atttypid FROM pg_attribute a JOIN pg_class c ON c.oid = "
        "a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 "
        "AND c.relname = $2 AND c.relkind IN ('r', 'p') AND a.attnum > 0 "
        "AND NOT a.attisdropped", schema, table)
    return {r["attname"]: r["atttypid"] for r in rows}


async def count_envelopes(conn: asyncpg.Connection, schema: str, table: str, column: str,
                          key_id: int) -> int:
    """Stored envelopes of one column whose header names `key_id`."""
    if (await _column_types(conn, schema, table)).get(column) != BYTEA_OID:
        return 0
    col = qi(column)
    return int(await conn.fetchval(
        f"SELECT count(*) FROM {qualified(schema, table)} WHERE {col} IS NOT NULL "
        f"AND substr({col}, 3, 4) = $1::bytea", key_id.to_bytes(4, "big")))


async def count_indexes(conn: asyncpg.Connection, rt: Any, index: BlindIndex,
                        bar: BarFactory = no_bar) -> tuple[int, int]:
    """(blind indexes equal to `index`'s recomputation, rows that could not be checked)
    of one protected column `rt` (a ColumnRuntime), in one read-only snapshot."""
    spec = rt.spec
    types = await _column_types(conn, spec.schema, spec.table)
    bidx_col = spec.bidx_column
    if bidx_col not in types:
        return 0, 0
    table = qualified(spec.schema, spec.table)
    if types.get(spec.column) != BYTEA_OID:
        # `encrypt-column` has not finished: its backfill writes indexes beside values
        # still in plaintext, under the key of that moment. Which key cannot be told
        # from here cheaply, so every such index counts as a use (never a false "free").
        count = await conn.fetchval(f"SELECT count(*) FROM {table} WHERE {qi(bidx_col)} "
                                    "IS NOT NULL")
        return 0, int(count)
    where = f"{qi(bidx_col)} IS NOT NULL AND {qi(spec.column)} IS NOT NULL"
    matched = unchecked = 0
    opener, compute = rt.cipher.decrypt, index.compute
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        total = int(await conn.fetchval(f"SELECT count(*) FROM {table} WHERE {where}"))
        progress = bar(total, 0, f"check {spec.schema}.{spec.table}.{bidx_col}")
        try:
            n = 0
            query = f"SELECT {qi(spec.column)}, {qi(bidx_col)} FROM {table} WHERE {where}"
            async for r in conn.cursor(query, prefetch=1000):
                try:
                    plain = opener(bytes(r[0]))
                except DecryptError:
                    unchecked += 1
                else:
                    matched += compute(plain) == bytes(r[1])
                n += 1
                if n == 1000:
                    progress.update(n)
                    n = 0
            progress.update(n)
        finally:
            progress.close()
    return matched, unchecked


def _single_key_index(ring: kr.Keyring, enc: Any, rt: Any, entry: kr.KeyEntry) -> BlindIndex:
    """A BlindIndex whose primary is the key `entry`: it computes indexes under it."""
    keys = ring.column_keys(entry.column, Purpose.BLIND_INDEX, enc.provider)
    only = ColumnKeys(entry.column, Purpose.BLIND_INDEX, entry.id,
                      {entry.id: keys.material(entry.id)})
    return BlindIndex(entry.column, rt.codec.name, only, rt.spec.index_length)


async def key_usage(conn: asyncpg.Connection, enc: Any, ring: kr.Keyring, key_id: int,
                    bar: BarFactory = no_bar) -> list[Use]:
    """Every use of `key_id` in the database `conn` is connected to, per protected column
    (zero counts included, so the operator sees what was checked).

    `enc` is the configuration's Encryption (protected columns, their keys). Raises
    UsageUnknown when no configured column uses the key and the database cannot be
    asked by other means (a join group's or a blind-index key of a removed column)."""
    from proxy.encryption import key_name, observed_database

    entry = ring.get(key_id)
    database = await observed_database(conn)
    # Bound to the database connected to, as the proxy's sessions there are: a value
    # that opens here is one the proxy would open here.
    columns = enc.columns_for(database)
    users = [k for k in columns if key_name(k, enc.options[k]) == entry.column]
    if entry.purpose is Purpose.BLIND_INDEX:
        users = [k for k in users if columns[k].blind_index is not None]
    out: list[Use] = []
    if not users:
        parts = entry.column.split(".")
        if entry.purpose is Purpose.ENCRYPT and parts[0] != "joingroup":
            schema, table, column = parts
            n = await count_envelopes(conn, schema, table, column, key_id)
            return [Use(database, entry.column, VALUES, n)]
        raise UsageUnknown(
            f"no column of protect: uses {entry.column} ({entry.purpose.value}), so its "
            "data cannot be found; put the column back into protect: to check it")
    for key in sorted(users):
        rt = columns[key]
        name = ".".join(key)
        if entry.purpose is Purpose.ENCRYPT:
            n = await count_envelopes(conn, *key, key_id)
            out.append(Use(database, name, VALUES, n))
            continue
        matched, unchecked = await count_indexes(
            conn, rt, _single_key_index(ring, enc, rt, entry), bar)
        out.append(Use(database, name, INDEXES, matched))
        if unchecked:
            out.append(Use(database, name, UNCHECKABLE, unchecked))
    return out
