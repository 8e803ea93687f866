"""Re-encrypting a column's stored values under its primary key (`strongroom keys rotate`).

This is step four of the rotation dance in `keys.keyring`:

    keys add  ->  reload every proxy  ->  keys promote  ->  reload every proxy
    ->  keys rotate --column ...  ->  keys retire <old id>  ->  reload

It runs online, against PostgreSQL directly: after the promote+reload every proxy
*writes* under the new primary and still *reads* the old key, so the application keeps
working while old values are rewritten here. Each batch is one transaction that locks its
rows (`SELECT ... FOR UPDATE`), so an application update racing with the rotation either
waits for the batch or is seen by it; a value is never overwritten with a stale one.

Idempotent and resumable: the envelope header names its version (byte 1) and key id
(bytes 3..6), so the candidate rows are selected in SQL with `substr(col, 1, 1) ||
substr(col, 3, 4) <> <bound version ‖ primary id>`; a rerun after an interruption simply
finds fewer of them, and a finished column finds none.

Database binding: rotation is also how envelopes written before it (version 1, which
open in any database) are upgraded. Every value rewritten here is a version 2 envelope
bound to the database the connection is to (`current_database()`, mapped by
`keys.database_binding.bind_as`), as the proxy's sessions there seal them; a column whose
values are all under the primary but some still unbound is rewritten too. Run it against
every database the proxy fronts, then set `keys.database_binding.require`.

Blind indexes: the index is an HMAC under the column's blind-index key, and nothing in
the stored index says which key made it. While a blind-index rotation is in progress
(more than one live blind-index key, i.e. the old one is promoted away but not retired)
or when asked (`reindex=True`), every row is decrypted and its index recomputed under the
primary; rows whose index already matches are not written, so this is idempotent too.
Retire the old blind-index key only after this has run, or lookups of old rows stop
matching.

Like the migrations, nothing here logs or prints a value or key bytes.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import asyncpg

from proxy.crypto.envelope import VERSION, DecryptError
from proxy.encryption import ColumnRuntime
from proxy.migrate import (
    BYTEA_OID,
    BarFactory,
    BatchHook,
    Interrupted,
    MigrationError,
    no_bar,
    qi,
    require_bound_here,
    table_info,
)


@dataclass(frozen=True, slots=True)
class RotationOutcome:
    """Counts for the CLI summary."""

    column: str
    primary_id: int
    examined: int
    rewritten: int
    batches: int
    remaining: int  # values still not under the primary after the run (0 when done)


def _id_bytes(key_id: int) -> bytes:
    """What a finished value's version byte and key id read as (see `_stale_sql`)."""
    return bytes((VERSION,)) + key_id.to_bytes(4, "big")


def _stale_sql(col: str) -> str:
    """True for an envelope not under the primary, or not bound to a database ($1)."""
    return f"substr({col}, 1, 1) || substr({col}, 3, 4) <> $1::bytea"


async def remaining_under_other_keys(
    conn: asyncpg.Connection, rt: ColumnRuntime, primary_id: int
) -> int:
    """Stored values whose envelope names another key than `primary_id`, or is of the
    version written before database binding."""
    spec = rt.spec
    table = f"{qi(spec.schema)}.{qi(spec.table)}"
    col = qi(spec.column)
    return int(await conn.fetchval(
        f"SELECT count(*) FROM {table} WHERE {col} IS NOT NULL "
        f"AND {_stale_sql(col)}", _id_bytes(primary_id),
    ))


async def rotate_column(
    conn: asyncpg.Connection, rt: ColumnRuntime, primary_id: int, *, batch: int = 1000,
    reindex: bool = False, max_batches: int | None = None, bar: BarFactory = no_bar,
    hook: BatchHook | None = None,
) -> RotationOutcome:
    """Rewrite every value of the column not under `primary_id` (and, with `reindex`,
    every stale blind index). `rt` must be built from the keyring in which `primary_id`
    is active, which is checked on the first rewritten value."""
    if batch < 1:
        raise MigrationError("batch size must be at least 1")
    await require_bound_here(conn, rt)
    spec = rt.spec
    name = f"{spec.schema}.{spec.table}.{spec.column}"
    info = await table_info(conn, spec.schema, spec.table)
    col_info = info.columns.get(spec.column)
    if col_info is None:
        raise MigrationError(f"column {name} does not exist")
    if col_info.typid != BYTEA_OID:
        raise MigrationError(f"column {name} is not bytea: encrypt it first (encrypt-column)")
    if not info.pk:
        raise MigrationError(f"table {spec.schema}.{spec.table} has no primary key; "
                             "rotation batches by primary key")
    bidx_col = spec.bidx_column if spec.blind_index and rt.blind_index is not None else None
    if bidx_col is not None and bidx_col not in info.columns:
        raise MigrationError(f"blind index column {bidx_col} of {name} does not exist")
    reindex = reindex and bidx_col is not None

    npk = len(info.pk)
    pk_list = ", ".join(qi(c.name) for c in info.pk)
    col = qi(spec.column)
    # $1 is always the primary's id bytes, so the first and the later batches share it.
    # (with reindex every row is a candidate; `$1 IS NOT NULL` keeps $1 typed and used)
    key_filter = (" AND $1::bytea IS NOT NULL" if reindex
                  else f" AND {_stale_sql(col)}")
    extra = f", {qi(bidx_col)}" if reindex and bidx_col else ""
    base = f"FROM {info.sql} WHERE {col} IS NOT NULL{key_filter}"
    keyset = f"({pk_list}) > ({', '.join(f'${i + 2}' for i in range(npk))}) AND "
    order = f"ORDER BY {pk_list} LIMIT {batch} FOR UPDATE"
    select_first = f"SELECT {pk_list}, {col}{extra} {base} {order}"
    select_next = (f"SELECT {pk_list}, {col}{extra} FROM {info.sql} WHERE {keyset}"
                   f"{col} IS NOT NULL{key_filter} {order}")
    arrays = [f"${i + 1}::{c.type_name}[]" for i, c in enumerate(info.pk)]
    names = [f"k{i}" for i in range(npk)]
    arrays.append(f"${npk + 1}::bytea[]")
    sets = [f"{col} = u.v"]
    if bidx_col is not None:
        arrays.append(f"${npk + 2}::bytea[]")
        sets.append(f"{qi(bidx_col)} = u.b")
    match = " AND ".join(f"t.{qi(c.name)} = u.{names[i]}" for i, c in enumerate(info.pk))
    update = (f"UPDATE {info.sql} AS t SET {', '.join(sets)} FROM unnest({', '.join(arrays)}) "
              f"AS u({', '.join([*names, 'v'] + (['b'] if bidx_col else []))}) WHERE {match}")

    header_id = _id_bytes(primary_id)
    total = int(await conn.fetchval(f"SELECT count(*) {base}", header_id))
    progress = bar(total, 0, f"rotate {name}")
    last: tuple[Any, ...] | None = None
    examined = rewritten = batches = 0
    checked_primary = False
    cipher, bidx = rt.cipher, rt.blind_index
    try:
        while True:
            if max_batches is not None and batches >= max_batches:
                raise Interrupted(f"{name}: stopped after {batches} batches as asked; "
                                  "rerun to continue")
            async with conn.transaction():
                rows = await (conn.fetch(select_first, header_id) if last is None
                              else conn.fetch(select_next, header_id, *last))
                if not rows:
                    break
                keys: list[list[Any]] = [[] for _ in range(npk)]
                values: list[bytes] = []
                indexes: list[bytes | None] = []
                for r in rows:
                    blob = bytes(r[npk])
                    try:
                        stale = (cipher.key_id_of(blob) != primary_id
                                 or not cipher.is_bound(blob))
                        plain = cipher.decrypt(blob) if (stale or reindex) else b""
                    except DecryptError:
                        raise MigrationError(
                            f"{name}: a stored value does not decrypt with the live keys "
                            "(retired too early, tampered, or not of this column)"
                        ) from None
                    new_index = None
                    if bidx_col is not None and bidx is not None and (stale or reindex):
                        new_index = bidx.compute(plain)
                    if not stale and (not reindex or new_index == r[npk + 1]):
                        continue
                    new_blob = cipher.encrypt(plain) if stale else blob
                    if stale and not checked_primary:
                        if cipher.key_id_of(new_blob) != primary_id:
                            raise MigrationError(
                                f"{name}: the loaded keyring's primary is not key "
                                f"{primary_id}; reload the keyring and rerun")
                        checked_primary = True
                    for i in range(npk):
                        keys[i].append(r[i])
                    values.append(new_blob)
                    indexes.append(new_index)
                if values:
                    args: list[Any] = [*keys, values]
                    if bidx_col is not None:
                        args.append(indexes)
                    status = await conn.execute(update, *args)
                    rewritten += int(status.split()[-1])
                if hook is not None:
                    res = hook(batches + 1)
                    if asyncio.iscoroutine(res):
                        await res
            last = tuple(rows[-1][i] for i in range(npk))
            examined += len(rows)
            batches += 1
            progress.update(len(rows))
    finally:
        progress.close()
    remaining = await remaining_under_other_keys(conn, rt, primary_id)
    return RotationOutcome(name, primary_id, examined, rewritten, batches, remaining)
