"""Anchors of the audit chain outside the audit file: the database and Prometheus.

Why. The HMAC chain (proxy/audit.py) shows that no record was edited, inserted or removed
*between* two records, but whole records cut from the end leave a shorter, valid chain,
and the next start would simply continue from the cut. Whoever can edit the file cannot
necessarily write to the database or rewrite Prometheus' history, so the proxy publishes
the chain's head - (seq, MAC) of its newest record - to both:

* the database: one row per audit file in a small table (`audit.anchor.table`, default
  `strongroom_audit_anchor`, created if missing) written through `audit.anchor.dsn` by
  the proxy's own role, every `audit.anchor.interval` seconds (when the head moved) and
  at stop, after the `stop` record. Before a head is published the file is fsynced, so
  an anchored record is on disk: a host crash cannot leave a file behind its anchor,
  only an edit (or a lost disk) can. Writes run in a background task on the event loop
  (asyncpg) and never block client traffic; a failure is logged and counted
  (`strongroom_audit_anchor_publishes_total{result="error"}`), never fatal.
* Prometheus: `strongroom_audit_head_sequence{file}` is read from the log at every scrape;
  the sequence never goes back while the chain is intact (it continues across rotations
  and restarts), so a drop in its history is a cut (`AuditHeadWentBack` alert).

At start the proxy compares the head it found on disk (`AuditLog.resumed`) with the
anchored one. A file behind the anchor (records cut after the last anchor) or with a
different MAC at the anchored sequence (the chain was replaced) is logged as an error,
sets `strongroom_audit_anchor_mismatch{file} 1` (alert `AuditAnchorMismatch`), is written
into the chain as an `anchor_gap` record and counted in the row's `gaps` / `last_gap`.
The proxy then serves: refusing to start would not bring the cut records back, it would
hand whoever can edit the file a way to stop the service, and the gap stays provable in
three places (the chain itself, where `audit verify` reports it as incomplete; the row;
the metric history). `strongroom audit verify --anchor DSN` checks files against the row.

The row identifies its file by `log_id`: the absolute path of the (per-worker) audit file,
prefixed by `audit.anchor.instance` when set. Replicas on several hosts that share one
anchor table and the same audit path must each set their own `instance`: otherwise they
overwrite each other's row and every start reports a mismatch. The default is the path
alone, not the host name, because a container's host name changes at each restart: a
new row per restart would leave a cut before the restart undetected.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    import asyncpg

    from proxy.audit import AuditLog
    from proxy.metrics import Metrics
    from proxy.settings import Settings

log = logging.getLogger("strongroom.audit")

DEFAULT_TABLE = "strongroom_audit_anchor"
DEFAULT_INTERVAL = 10.0
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True, slots=True)
class AnchorConfig:
    dsn: str
    table: str = DEFAULT_TABLE
    interval: float = DEFAULT_INTERVAL
    timeout: float = 10.0
    instance: str | None = None


def anchor_config(settings: Settings) -> AnchorConfig | None:
    """`audit.anchor` of the configuration, or None when it is not configured."""
    audit = settings.raw.get("audit") or {}
    cfg = audit.get("anchor")
    if not cfg:
        return None
    return AnchorConfig(
        dsn=str(cfg["dsn"]), table=str(cfg.get("table", DEFAULT_TABLE)),
        interval=float(cfg.get("interval", DEFAULT_INTERVAL)),
        timeout=float(settings.upstream.connect_timeout),
        instance=str(cfg["instance"]) if cfg.get("instance") else None,
    )


def quoted_table(table: str) -> str:
    """`schema.table` or `table` as a quoted identifier; anything else is refused."""
    parts = table.split(".")
    if not 1 <= len(parts) <= 2 or not all(_IDENT.fullmatch(p) for p in parts):
        raise ValueError(f"audit.anchor.table {table!r} is not [schema.]name")
    return ".".join(f'"{p}"' for p in parts)


def log_id(path: str | os.PathLike[str], instance: str | None = None) -> str:
    """The row key of an audit file: its absolute path (per-worker files differ),
    as `INSTANCE:PATH` when `audit.anchor.instance` names this proxy."""
    where = str(Path(path).resolve())
    return f"{instance}:{where}" if instance else where


# --------------------------------------------------------------------------- SQL


async def ensure_table(conn: asyncpg.Connection, table: str) -> None:
    await conn.execute(
        f"CREATE TABLE IF NOT EXISTS {quoted_table(table)} ("
        " log_id text PRIMARY KEY, host text NOT NULL, pid integer NOT NULL,"
        " seq bigint NOT NULL, mac text NOT NULL, gaps integer NOT NULL DEFAULT 0,"
        " last_gap text, updated_at timestamptz NOT NULL DEFAULT now())"
    )


async def read_anchor(conn: asyncpg.Connection, table: str, ident: str,
                      ) -> tuple[int, str] | None:
    """(seq, mac) anchored for `ident`, or None (no row, or no table yet)."""
    import asyncpg

    try:
        row = await conn.fetchrow(
            f"SELECT seq, mac FROM {quoted_table(table)} WHERE log_id = $1", ident)
    except asyncpg.UndefinedTableError:
        return None
    return (int(row["seq"]), str(row["mac"])) if row is not None else None


async def write_anchor(conn: asyncpg.Connection, table: str, ident: str, seq: int,
                       mac: str) -> None:
    await conn.execute(
        f"INSERT INTO {quoted_table(table)} AS a (log_id, host, pid, seq, mac)"
        " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (log_id) DO UPDATE SET"
        " host = excluded.host, pid = excluded.pid, seq = excluded.seq, mac = excluded.mac,"
        " updated_at = now()",
        ident, socket.gethostname(), os.getpid(), seq, mac,
    )


async def note_gap(conn: asyncpg.Connection, table: str, ident: str, text: str) -> None:
    await conn.execute(
        f"UPDATE {quoted_table(table)} SET gaps = gaps + 1, last_gap = $2 WHERE log_id = $1",
        ident, text,
    )


async def connect(dsn: str, timeout: float) -> asyncpg.Connection:
    """A connection for the anchor (password from the DSN, $PGPASSWORD or ~/.pgpass)."""
    import asyncpg

    return await asyncpg.connect(dsn, timeout=timeout)


def fetch_anchor(dsn: str, table: str, ident: str, timeout: float = 10.0) -> tuple[int, str]:
    """The anchored (seq, mac) of `ident`, for `audit verify --anchor`; LookupError with
    the ids the table does hold when there is no row (a wrong file or a wrong table)."""

    async def run() -> tuple[tuple[int, str] | None, list[str]]:
        conn = await connect(dsn, timeout)
        try:
            found = await read_anchor(conn, table, ident)
            ids: list[str] = []
            if found is None:
                import asyncpg

                with contextlib.suppress(asyncpg.UndefinedTableError):
                    ids = [r["log_id"] for r in await conn.fetch(
                        f"SELECT log_id FROM {quoted_table(table)} ORDER BY 1 LIMIT 20")]
            return found, ids
        finally:
            await conn.close()

    found, ids = asyncio.run(run())
    if found is None:
        raise LookupError(f"no anchor row for {ident} in {table}"
                          + (f" (rows: {', '.join(ids)}; pass --anchor-id)" if ids else ""))
    return found


# --------------------------------------------------------------------------- files


def mac_at(path: Path, keep: int, seq: int) -> str | None:
    """The MAC of record `seq` in `path` or its rotations (newest first), or None."""
    for f in [path, *(path.with_name(f"{path.name}.{i}") for i in range(1, keep + 1))]:
        try:
            with open(f, "rb") as fh:
                first = True
                for raw in fh:
                    try:
                        rec = json.loads(raw)
                    except ValueError:
                        continue
                    if first and int(rec.get("seq", 0)) > seq:
                        break  # this file starts after `seq`: look in an older one
                    first = False
                    if rec.get("seq") == seq:
                        return str(rec.get("mac"))
        except OSError:
            continue
    return None


def gap_reason(resumed: tuple[int, str], anchored: tuple[int, str],
               mac_then: Callable[[int], str | None]) -> str | None:
    """Why the head found on disk contradicts the anchored head, or None.

    `mac_then(seq)` reads the MAC the file holds at an older sequence (None: not there
    any more, e.g. rotated away by retention - then nothing can be told)."""
    r_seq, r_mac = resumed
    a_seq, a_mac = anchored
    if r_seq < a_seq:
        return (f"audit file is behind its anchor: it ends at seq {r_seq}, the anchor "
                f"says {a_seq}: records {r_seq + 1}..{a_seq} were cut")
    held = r_mac if r_seq == a_seq else mac_then(a_seq)
    if held is not None and held != a_mac:
        return (f"audit file disagrees with its anchor at seq {a_seq} (different MAC): "
                "the chain was replaced or rewritten")
    return None


# --------------------------------------------------------------------------- runtime


class Anchor:
    """Publishes one audit log's head to the database; checks it once at start."""

    def __init__(self, audit: AuditLog, cfg: AnchorConfig) -> None:
        assert audit.path is not None
        self.audit = audit
        self.cfg = cfg
        self.ident = log_id(audit.path, cfg.instance)
        self.anchored: tuple[int, str] | None = None
        self.checked = False
        self.mismatch = 0
        self.published = {"ok": 0, "error": 0}
        self._conn: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Check and publish once before listening (bounded by the connect timeout, so a
        start that finds a cut file alerts before serving), then every interval."""
        await self.publish()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """After the `stop` record: publish the final head, close the connection."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.publish()
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._conn.close(), self.cfg.timeout)
            self._conn = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.interval)
            await self.publish()

    async def publish(self) -> bool:
        """Check (first time), fsync, write the head. False (logged, counted) on failure."""
        fd: int | None = None
        try:
            seq, mac, fd = self.audit.durable_head()
            conn = await self._connection()
            if not self.checked:
                await self._check(conn)
                seq, mac, fd2 = self.audit.durable_head()  # the gap record moved it
                _close(fd)
                fd = fd2
            if (seq, mac) == self.anchored:
                return True
            await asyncio.get_running_loop().run_in_executor(None, self._sync, fd)
            await asyncio.wait_for(write_anchor(conn, self.cfg.table, self.ident, seq, mac),
                                   self.cfg.timeout)
            self.anchored = (seq, mac)
            self.published["ok"] += 1
            return True
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # never fatal: the proxy serves on, the alert tells
            self.published["error"] += 1
            log.error("audit anchor: cannot publish the head of %s: %s", self.ident,
                      _describe(exc))
            await self._drop()
            return False
        finally:
            _close(fd)

    def _sync(self, fd: int | None) -> None:
        """fsync the records up to the head; after close() the path's inode is synced."""
        if fd is not None:
            os.fsync(fd)
            return
        if self.audit.path is not None:
            f = os.open(self.audit.path, os.O_RDONLY)
            try:
                os.fsync(f)
            finally:
                os.close(f)

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            conn = await connect(self.cfg.dsn, self.cfg.timeout)
            try:
                await asyncio.wait_for(ensure_table(conn, self.cfg.table), self.cfg.timeout)
            except BaseException:
                await conn.close()
                raise
            self._conn = conn
        return self._conn

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()

    async def _check(self, conn: asyncpg.Connection) -> None:
        """Compare the head found on disk at start with the anchored one (see module doc)."""
        anchored = await asyncio.wait_for(
            read_anchor(conn, self.cfg.table, self.ident), self.cfg.timeout)
        self.checked = True
        if anchored is None:
            return
        path, keep = self.audit.path, self.audit.keep
        assert path is not None
        reason = await asyncio.get_running_loop().run_in_executor(
            None, gap_reason, self.audit.resumed, anchored,
            lambda s: mac_at(path, keep, s))
        if reason is None:
            return
        self.mismatch = 1
        log.error("audit log %s: %s (anchor %s); recorded as an anchor_gap record, "
                  "alerting through strongroom_audit_anchor_mismatch", path, reason,
                  self.cfg.table)
        self.audit.anchor_gap(anchored[0], anchored[1], self.audit.resumed[0], reason)
        await asyncio.wait_for(note_gap(conn, self.cfg.table, self.ident,
                                        f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}"
                                        f" pid {os.getpid()}: {reason}"), self.cfg.timeout)


def _close(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


def _describe(exc: BaseException) -> str:
    """An error for the log without a DSN (it may hold a password): type and SQLSTATE."""
    code = getattr(exc, "sqlstate", None)
    return f"{type(exc).__name__}{f' ({code})' if code else ''}"


# --------------------------------------------------------------------------- metrics


class AuditCollector(Collector):
    """`strongroom_audit_*` series, read at scrape time (no cost per record)."""

    def __init__(self, audit: AuditLog, anchor: Anchor | None) -> None:
        self.audit = audit
        self.anchor = anchor
        self.file = audit.path.name if audit.path is not None else "stdout"

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        head = GaugeMetricFamily(
            "strongroom_audit_head_sequence",
            "Sequence number of the newest audit record of this file's chain; it never "
            "goes back while the chain is intact (a drop is a cut).", labels=["file"])
        head.add_metric([self.file], float(self.audit.seq))
        yield head
        if self.anchor is None:
            return
        anchored = GaugeMetricFamily(
            "strongroom_audit_anchored_sequence",
            "Sequence number last published to the database anchor.", labels=["file"])
        anchored.add_metric([self.file], float((self.anchor.anchored or (0, ""))[0]))
        yield anchored
        mismatch = GaugeMetricFamily(
            "strongroom_audit_anchor_mismatch",
            "1 when this start found the audit file behind (or disagreeing with) its "
            "database anchor: records were cut or the chain replaced.", labels=["file"])
        mismatch.add_metric([self.file], float(self.anchor.mismatch))
        yield mismatch
        pub = CounterMetricFamily(
            "strongroom_audit_anchor_publishes",
            "Attempts to publish the audit head to the database anchor, by result.",
            labels=["result"])
        for result, n in sorted(self.anchor.published.items()):
            pub.add_metric([result], float(n))
        yield pub

    def describe(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        return iter(())


def build(settings: Settings, audit: AuditLog | None, metrics: Metrics) -> Anchor | None:
    """The anchor of this process's audit log (None without `audit.anchor` or a file),
    and its metrics (the head sequence whenever there is an audit log)."""
    if audit is None:
        return None
    cfg = anchor_config(settings)
    anchor = None
    if cfg is not None:
        if audit.path is None:
            log.warning("audit.anchor needs audit.path (a file): not anchored")
        else:
            anchor = Anchor(audit, cfg)
    metrics.registry.register(AuditCollector(audit, anchor))
    return anchor
