"""Converting live columns between plaintext and the encrypted layout (issue 4, point 6).

`strongroom encrypt-column public.cards.pan` turns a plaintext column into the layout the
proxy expects (a `bytea` envelope column, plus the blind-index sibling when configured);
`strongroom decrypt-column` turns it back. Both talk to PostgreSQL directly (asyncpg),
never through the proxy: the proxy would try to decrypt a column that is not encrypted yet.

The operator's flow: stop the application's direct writers; add the column to
`protect:` in the config file and run `strongroom keys init` (do *not* reload the proxies
yet: they would try to decrypt a column that is still plaintext); run encrypt-column;
reload every proxy (SIGHUP), which also refreshes their catalog snapshot (the swap
changes the column's attnum behind their back); restart writers. decrypt-column is the
mirror image: run it, then remove the column from `protect:` and reload.

Three phases, each safe to interrupt:

1. **prepare**: `ALTER TABLE ... ADD COLUMN <col>__sr_new` (bytea, or the logical type
   when decrypting), and `<col>_bidx` when the column has a blind index and it is missing.
   Adding a nullable column without default is metadata-only: the exclusive lock is
   held for milliseconds (bounded by `lock_timeout` so we never queue behind a long
   transaction and block the application behind us).
2. **backfill** in batches by primary key (keyset pagination, so each batch is an index
   range scan and the whole run is O(rows), not O(rows^2)). Each batch is its own
   transaction: `SELECT ... FOR UPDATE`, convert in Python, one `UPDATE ... FROM
   unnest(...)`. The state marker is the data itself: a row is still to do exactly when
   the old column IS NOT NULL and the new column IS NULL, so a rerun after a crash,
   Ctrl-C or `--max-batches` continues where the last committed batch ended. NULL stays
   NULL (and is never "to do").
3. **swap**, one transaction: lock the table (ACCESS EXCLUSIVE), verify that no row is
   left unconverted and that no converted row lost its source, carry `NOT NULL` over,
   drop the old column, rename the new one to the original name. Afterwards the
   existence of `<col>__sr_new` is gone too, so a rerun reports "already done".

Why a primary key is required: batches must be addressable and resumable without a
full scan per batch, and `ctid` is not stable across VACUUM FULL / concurrent updates
between runs. Tables without a primary key are refused with a message saying so.

Limitations ops must know (also in the README):

* **Concurrent writers.** Rows the application changes directly in PostgreSQL *after*
  they were converted are not noticed (the new column keeps the converted old value).
  Stop writers for the migration (readers are fine: the old column stays intact until
  the swap), then reload the proxies with the column in `protect:` right after the swap,
  so every later write goes through the proxy and lands in the new layout.
* **Column order.** The swapped-in column is the table's *last* column (PostgreSQL cannot
  reorder columns without a rewrite). `SELECT *` through the proxy returns it there.
* **Dependents.** Indexes and constraints on the old column are dropped with it (they hold
  plaintext, so they must go); views or foreign keys referencing it make the swap fail
  and roll back. A column `DEFAULT` is not carried over (the proxy cannot encrypt it).
* **Plaintext on disk.** Dropping a column does not rewrite the heap: the old values
  stay in the table's pages (dropped attribute, dead row versions) until `VACUUM FULL`
  (`--vacuum-full`, takes an ACCESS EXCLUSIVE lock for the rewrite) or pg_repack; WAL,
  replicas' history and backups keep them until they expire. The tests prove both halves.

Values are converted through their text representation: `col::text` with the session
pinned to `TimeZone=UTC` and `DateStyle=ISO`, parsed by the column's codec into the
canonical plaintext the proxy would produce, then sealed. Decryption goes the other way
(`codec.to_text` then `$n::text::<type>`). Plaintext exists only in local variables here;
nothing in this module logs, prints or puts a value into an exception message.
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import asyncpg

from proxy.encryption import ColumnRuntime, observed_database
from proxy.types import CodecError

NEW_SUFFIX = "__sr_new"
MAX_IDENT = 63  # NAMEDATALEN - 1: longer names would be silently truncated by PostgreSQL
SESSION_SETTINGS = {
    "TimeZone": "UTC",
    "DateStyle": "ISO, MDY",
    "IntervalStyle": "postgres",
    "extra_float_digits": "3",
    "application_name": "strongroom-migrate",
}
UTC = datetime.UTC


class MigrationError(Exception):
    """A migration cannot proceed. Messages name tables and columns, never values."""


class Interrupted(MigrationError):
    """Stopped on purpose after `max_batches` (tests, or ops doing it in slices)."""


class Bar(Protocol):
    """The part of a tqdm bar the migrations use."""

    def update(self, n: int = 1) -> Any: ...

    def close(self) -> None: ...


BarFactory = Callable[[int, int, str], Bar]
BatchHook = Callable[[int], Awaitable[None] | None]


class _NoBar:
    def update(self, n: int = 1) -> None:
        return None

    def close(self) -> None:
        return None


def no_bar(total: int, initial: int, desc: str) -> Bar:
    """Progress sink for library callers and tests that do not want output."""
    return _NoBar()


def tqdm_bar(total: int, initial: int, desc: str) -> Bar:
    """rows done / total on stderr; tqdm hides itself when stderr is not a terminal."""
    import sys

    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="rows", file=sys.stderr,
                dynamic_ncols=True, disable=None)


class LogBar:
    """Progress as log lines, for output that is not a terminal (a file, journald, a CI
    log), where a tqdm bar would be hidden or a mess of carriage returns: a line when
    the work starts, then at most one every `every` seconds, and one at the end, each
    with rows done / total, percent, rate and the estimated time left."""

    def __init__(self, total: int, initial: int, desc: str, every: float,
                 clock: Callable[[], float] | None = None) -> None:
        import logging
        import time

        self._log = logging.getLogger("strongroom.progress")
        self._clock = clock or time.monotonic
        self.total, self.done, self.desc, self.every = total, initial, desc, every
        self._initial = initial
        self._start = self._last = self._clock()
        self._emit("started")

    def _emit(self, what: str) -> None:
        elapsed = self._clock() - self._start
        rate = (self.done - self._initial) / elapsed if elapsed > 0 else 0.0
        pct = 100.0 * self.done / self.total if self.total else 100.0
        left = self.total - self.done
        eta = f", about {left / rate:.0f} s left" if rate > 0 and left > 0 else ""
        self._log.info("%s: %s %d/%d rows (%.1f%%), %.0f rows/s%s", self.desc, what,
                       self.done, self.total, pct, rate, eta)

    def update(self, n: int = 1) -> None:
        self.done += n
        now = self._clock()
        if now - self._last >= self.every:
            self._last = now
            self._emit("progress")

    def close(self) -> None:
        self._emit("finished")


def progress_bar(every: float = 5.0) -> BarFactory:
    """The CLI's progress: a tqdm bar on a terminal, else LogBar lines every `every`
    seconds on stderr (logging is set up here if the command has not done it)."""
    import logging
    import sys

    if sys.stderr.isatty():
        return tqdm_bar
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: "
                                               "%(message)s"))
        root.addHandler(handler)
    logging.getLogger("strongroom.progress").setLevel(logging.INFO)

    def factory(total: int, initial: int, desc: str) -> Bar:
        return LogBar(total, initial, desc, every)

    return factory


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a run did, for the CLI summary. Counts only, never values."""

    column: str
    converted: int  # rows written by this run
    batches: int
    swapped: bool
    already_done: bool = False


# ------------------------------------------------------------------------------ SQL bits


def qi(name: str) -> str:
    """Always-quoted identifier: column names like `user` or `Order` must survive."""
    return '"' + name.replace('"', '""') + '"'


def qualified(schema: str, table: str) -> str:
    return f"{qi(schema)}.{qi(table)}"


async def connect(dsn: str | None = None, **kwargs: Any) -> asyncpg.Connection:
    """A direct connection with the session pinned so `::text` output is canonical-parsable
    and independent of the role's or database's defaults."""
    settings = dict(SESSION_SETTINGS) | kwargs.pop("server_settings", {})
    return await asyncpg.connect(dsn, server_settings=settings, **kwargs)


@dataclass(frozen=True, slots=True)
class ColumnInfo:
    name: str
    type_name: str  # format_type without typmod, usable as `<type>[]`
    typid: int
    not_null: bool


@dataclass(frozen=True, slots=True)
class TableInfo:
    """What the migration needs to know about the live table."""

    schema: str
    table: str
    oid: int
    columns: dict[str, ColumnInfo]
    pk: tuple[ColumnInfo, ...]

    @property
    def sql(self) -> str:
        return qualified(self.schema, self.table)


BYTEA_OID = 17


async def table_info(conn: asyncpg.Connection, schema: str, table: str) -> TableInfo:
    """Columns and primary key from the catalog; MigrationError when the table is absent."""
    oid = await conn.fetchval(
        "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
        schema, table,
    )
    if oid is None:
        raise MigrationError(f"table {schema}.{table} does not exist")
    rows = await conn.fetch(
        "SELECT attname, format_type(atttypid, NULL) AS t, atttypid, attnotnull "
        "FROM pg_attribute WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped "
        "ORDER BY attnum", oid,
    )
    cols = {r["attname"]: ColumnInfo(r["attname"], r["t"], r["atttypid"], r["attnotnull"])
            for r in rows}
    pk_names = await conn.fetch(
        "SELECT a.attname FROM pg_index i "
        "CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) "
        "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum "
        "WHERE i.indrelid = $1 AND i.indisprimary ORDER BY k.ord", oid,
    )
    pk = tuple(cols[r["attname"]] for r in pk_names)
    return TableInfo(schema, table, oid, cols, pk)


def _require_pk(info: TableInfo, column: str) -> None:
    if not info.pk:
        raise MigrationError(
            f"table {info.schema}.{info.table} has no primary key; the migration needs one "
            "to batch and resume (add one, e.g. a bigint identity column, then rerun)"
        )
    if any(c.name == column for c in info.pk):
        raise MigrationError(
            f"{info.schema}.{info.table}.{column} is part of the primary key; "
            "primary key columns cannot be migrated in place"
        )


def new_column_name(column: str) -> str:
    name = column + NEW_SUFFIX
    if len(name.encode()) > MAX_IDENT:
        raise MigrationError(f"column name {column!r} is too long for the temporary "
                             f"column {name!r} (PostgreSQL allows {MAX_IDENT} bytes)")
    return name


async def _ddl(conn: asyncpg.Connection, sql: str, lock_timeout: float) -> None:
    """DDL under a lock_timeout: better to fail and let ops retry than to queue an
    ACCESS EXCLUSIVE request behind a long transaction and stall every query after it."""
    async with conn.transaction():
        await conn.execute(f"SET LOCAL lock_timeout = '{int(lock_timeout * 1000)}ms'")
        await conn.execute(sql)


# ------------------------------------------------------------------------- the migrator


@dataclass
class _Plan:
    """One direction of one column: how to read, convert and write a batch."""

    rt: ColumnRuntime
    info: TableInfo
    old: str
    new: str
    bidx: str | None  # sibling to fill (encrypt) or to drop (decrypt)
    encrypt: bool

    @property
    def name(self) -> str:
        return f"{self.info.schema}.{self.info.table}.{self.old}"

    def pk_list(self, prefix: str = "") -> str:
        return ", ".join(prefix + qi(c.name) for c in self.info.pk)

    def select_sql(self, first: bool, limit: int) -> str:
        n = len(self.info.pk)
        keyset = "" if first else (
            f"({self.pk_list()}) > ({', '.join(f'${i + 1}' for i in range(n))}) AND "
        )
        value = f"{qi(self.old)}::text" if self.encrypt else qi(self.old)
        return (
            f"SELECT {self.pk_list()}, {value} FROM {self.info.sql} "
            f"WHERE {keyset}{qi(self.old)} IS NOT NULL AND {qi(self.new)} IS NULL "
            f"ORDER BY {self.pk_list()} LIMIT {int(limit)} FOR UPDATE"
        )

    def update_sql(self) -> str:
        pk = self.info.pk
        n = len(pk)
        arrays = [f"${i + 1}::{c.type_name}[]" for i, c in enumerate(pk)]
        names = [f"k{i}" for i in range(n)]
        sets = []
        if self.encrypt:
            arrays.append(f"${n + 1}::bytea[]")
            sets.append(f"{qi(self.new)} = u.v")
            if self.bidx is not None:
                arrays.append(f"${n + 2}::bytea[]")
                sets.append(f"{qi(self.bidx)} = u.b")
        else:
            arrays.append(f"${n + 1}::text[]")
            sets.append(f"{qi(self.new)} = u.v::{self.rt.codec.name}")
        cols = [*names, "v"] + (["b"] if len(arrays) > n + 1 else [])
        match = " AND ".join(f"t.{qi(c.name)} = u.{names[i]}" for i, c in enumerate(pk))
        return (
            f"UPDATE {self.info.sql} AS t SET {', '.join(sets)} "
            f"FROM unnest({', '.join(arrays)}) AS u({', '.join(cols)}) "
            f"WHERE {match} AND t.{qi(self.new)} IS NULL"
        )

    def convert(self, raw: Any) -> tuple[Any, bytes | None]:
        """One value: (new column value, blind index or None). Raises MigrationError
        without the value when it is not valid for the configured logical type."""
        codec = self.rt.codec
        if self.encrypt:
            text = raw.encode() if isinstance(raw, str) else bytes(raw)
            try:
                canonical = codec.from_text(text, UTC)
            except CodecError as exc:
                raise MigrationError(
                    f"{self.name}: a stored value is not a valid {codec.name} ({exc}); "
                    "fix the configured type or the data"
                ) from None
            bidx = self.rt.blind_index
            return self.rt.cipher.encrypt(canonical), (
                bidx.compute(canonical) if bidx is not None and self.bidx else None
            )
        from proxy.crypto.envelope import DecryptError

        try:
            canonical = self.rt.cipher.decrypt(bytes(raw))
        except DecryptError:
            raise MigrationError(
                f"{self.name}: a stored value does not decrypt with the live keys "
                "(retired key, tampered, or not ciphertext of this column)"
            ) from None
        return codec.to_text(canonical, UTC).decode(), None


async def _counts(conn: asyncpg.Connection, plan: _Plan) -> tuple[int, int, int]:
    """(rows in table, rows still to do, converted rows whose source is now NULL)."""
    row = await conn.fetchrow(
        f"SELECT count(*) AS total, "
        f"count(*) FILTER (WHERE {qi(plan.old)} IS NOT NULL AND {qi(plan.new)} IS NULL) "
        f"AS todo, "
        f"count(*) FILTER (WHERE {qi(plan.old)} IS NULL AND {qi(plan.new)} IS NOT NULL) "
        f"AS orphan FROM {plan.info.sql}"
    )
    assert row is not None
    return row["total"], row["todo"], row["orphan"]


async def _backfill(
    conn: asyncpg.Connection, plan: _Plan, batch: int, max_batches: int | None,
    bar: BarFactory, hook: BatchHook | None,
) -> tuple[int, int]:
    """Convert every to-do row, one transaction per batch. Returns (rows, batches)."""
    total, todo, _ = await _counts(conn, plan)
    progress = bar(total, total - todo, f"{'encrypt' if plan.encrypt else 'decrypt'} "
                   f"{plan.name}")
    select_first = plan.select_sql(True, batch)
    select_next = plan.select_sql(False, batch)
    update = plan.update_sql()
    npk = len(plan.info.pk)
    last: Sequence[Any] | None = None
    done = batches = 0
    try:
        while True:
            if max_batches is not None and batches >= max_batches:
                raise Interrupted(f"{plan.name}: stopped after {batches} batches as asked; "
                                  "rerun to continue")
            async with conn.transaction():
                rows = await (conn.fetch(select_first) if last is None
                              else conn.fetch(select_next, *last))
                if not rows:
                    break
                keys: list[list[Any]] = [[] for _ in range(npk)]
                values: list[Any] = []
                indexes: list[bytes | None] = []
                for r in rows:
                    for i in range(npk):
                        keys[i].append(r[i])
                    value, bidx = plan.convert(r[npk])
                    values.append(value)
                    indexes.append(bidx)
                args: list[Any] = [*keys, values]
                if plan.encrypt and plan.bidx is not None:
                    args.append(indexes)
                status = await conn.execute(update, *args)
                if hook is not None:
                    res = hook(batches + 1)
                    if asyncio.iscoroutine(res):
                        await res
                written = int(status.split()[-1])
            last = tuple(rows[-1][i] for i in range(npk))
            done += written
            batches += 1
            progress.update(written)
    finally:
        progress.close()
    return done, batches


async def _swap(conn: asyncpg.Connection, plan: _Plan, lock_timeout: float) -> None:
    """Verify and swap atomically: either the table has the new layout under the original
    name, or nothing changed."""
    info = plan.info
    async with conn.transaction():
        await conn.execute(f"SET LOCAL lock_timeout = '{int(lock_timeout * 1000)}ms'")
        await conn.execute(f"LOCK TABLE {info.sql} IN ACCESS EXCLUSIVE MODE")
        _, todo, orphan = await _counts(conn, plan)
        if todo:
            raise MigrationError(
                f"{plan.name}: {todo} rows were written or changed after the backfill "
                "(are writers still running?); rerun to convert them, then it will swap"
            )
        if orphan:
            raise MigrationError(
                f"{plan.name}: {orphan} converted rows had their original value set to "
                "NULL by a writer during the migration; stop writers, then clear "
                f"{plan.new} for those rows or rerun decrypt/encrypt accordingly"
            )
        current = await table_info(conn, info.schema, info.table)
        if current.columns[plan.old].not_null:
            await conn.execute(f"ALTER TABLE {info.sql} ALTER COLUMN {qi(plan.new)} SET NOT NULL")
        await conn.execute(f"ALTER TABLE {info.sql} DROP COLUMN {qi(plan.old)}")
        if not plan.encrypt and plan.bidx is not None and plan.bidx in current.columns:
            # A blind index is meaningless without ciphertext and still links equal values.
            await conn.execute(f"ALTER TABLE {info.sql} DROP COLUMN {qi(plan.bidx)}")
        await conn.execute(
            f"ALTER TABLE {info.sql} RENAME COLUMN {qi(plan.new)} TO {qi(plan.old)}"
        )


async def require_bound_here(conn: asyncpg.Connection, rt: ColumnRuntime) -> None:
    """Refuse a column runtime made for another database than the one `conn` is on:
    what it writes would be bound there and fail to open here (see
    `proxy.encryption.DatabaseBinding`)."""
    here = await observed_database(conn)
    if rt.database != here:
        raise MigrationError(
            f"the column keys were bound for database {rt.database!r}, but the connection "
            f"is to {here!r}; build them with Encryption.columns_for({here!r})")


async def _migrate(
    conn: asyncpg.Connection, rt: ColumnRuntime, *, encrypt: bool, batch: int,
    max_batches: int | None, bar: BarFactory, hook: BatchHook | None, lock_timeout: float,
    vacuum_full: bool,
) -> Outcome:
    if batch < 1:
        raise MigrationError("batch size must be at least 1")
    await require_bound_here(conn, rt)
    spec = rt.spec
    info = await table_info(conn, spec.schema, spec.table)
    column = spec.column
    name = f"{spec.schema}.{spec.table}.{column}"
    if column not in info.columns:
        raise MigrationError(f"column {name} does not exist")
    _require_pk(info, column)
    new = new_column_name(column)
    current = info.columns[column]
    is_bytea = current.typid == BYTEA_OID
    bidx = spec.bidx_column if spec.blind_index else None
    if new not in info.columns:
        if is_bytea == encrypt:
            return Outcome(name, 0, 0, swapped=False, already_done=True)
        new_type = "bytea" if encrypt else rt.codec.name
        await _ddl(conn, f"ALTER TABLE {info.sql} ADD COLUMN {qi(new)} {new_type}",
                   lock_timeout)
    elif (info.columns[new].typid == BYTEA_OID) != encrypt:
        raise MigrationError(
            f"{name}: a {new} column of the other direction exists (an interrupted "
            f"{'encrypt' if not encrypt else 'decrypt'}-column); finish that first"
        )
    if encrypt and bidx is not None and bidx not in info.columns:
        await _ddl(conn, f"ALTER TABLE {info.sql} ADD COLUMN {qi(bidx)} bytea", lock_timeout)
    info = await table_info(conn, spec.schema, spec.table)
    plan = _Plan(rt, info, column, new, bidx, encrypt)
    converted, batches = await _backfill(conn, plan, batch, max_batches, bar, hook)
    await _swap(conn, plan, lock_timeout)
    if vacuum_full:
        await conn.execute(f"VACUUM FULL {info.sql}")
    return Outcome(name, converted, batches, swapped=True)


async def encrypt_column(
    conn: asyncpg.Connection, rt: ColumnRuntime, *, batch: int = 1000,
    max_batches: int | None = None, bar: BarFactory = no_bar, hook: BatchHook | None = None,
    lock_timeout: float = 10.0, vacuum_full: bool = False,
) -> Outcome:
    """Plaintext column -> envelope column (+ blind index). Resumable; see module doc.

    `hook(n)` runs inside batch n's transaction after its UPDATE: tests raise from it to
    simulate a crash mid-batch and check that the batch rolls back as a whole.
    """
    return await _migrate(conn, rt, encrypt=True, batch=batch, max_batches=max_batches,
                          bar=bar, hook=hook, lock_timeout=lock_timeout,
                          vacuum_full=vacuum_full)


async def decrypt_column(
    conn: asyncpg.Connection, rt: ColumnRuntime, *, batch: int = 1000,
    max_batches: int | None = None, bar: BarFactory = no_bar, hook: BatchHook | None = None,
    lock_timeout: float = 10.0, vacuum_full: bool = False,
) -> Outcome:
    """Envelope column -> column of the configured logical type; drops the blind index
    sibling in the swap. Resumable; see module doc."""
    return await _migrate(conn, rt, encrypt=False, batch=batch, max_batches=max_batches,
                          bar=bar, hook=hook, lock_timeout=lock_timeout,
                          vacuum_full=vacuum_full)
