"""Runs of DataRows revealed in one call (the session's tracking loop hands each run of a
read to `Tracker.reveal_rows`, which walks it in `RowRevealer.reveal`) against the
reference: the same stream handed to `Tracker.server` one message at a time, as the
session did before, with columns that have no `cell_revealer`, so that every row goes
`Tracker._reveal_row`. The client must get the same bytes, the server the same bytes
from the proxy, and the columns the same counters, however the stream is cut into reads
(rows split across reads, a run ending a read), with NULL and missing cells, short rows,
repeated cells (decrypt cache hits), and a cell that fails in the middle of a run (an
ErrorResponse in its place, the rest of the result dropped, and inside a transaction the
proxy's own abort)."""

from __future__ import annotations

import datetime
import os
import random
import struct
from typing import Any

import pytest

from proxy.crypto import ColumnCipher, ColumnKeys, Purpose
from proxy.encryption import ColumnRuntime, RoleColumn
from proxy.protocol import rows
from proxy.sql.protected import ProtectedColumn
from proxy.tracking import RowPlan, RowRevealer, StatementPlan, Tracker
from proxy.types import get_codec
from tests.unit.test_session_relay import cuts, msg, ready_session

TABLE = 16400
# id int4, pan text (protected), note text, balance numeric (protected), tail text
LAYOUT = [(b"id", 23, False), (b"pan", 17, True), (b"note", 25, False),
          (b"balance", 17, True), (b"tail", 25, False)]


def _runtime(name: str, logical: str) -> ColumnRuntime:
    codec = get_codec(logical)
    col = f"public.t.{name}"
    keys = ColumnKeys(col, Purpose.ENCRYPT, 1, {1: os.urandom(32)})
    cipher = ColumnCipher(col, codec.name, "randomized", keys, database="appdb")
    spec = ProtectedColumn("public", "t", name, logical, "randomized", False, None)
    return ColumnRuntime(spec, cipher, None, codec, codec.oid, -1)


class SlowOnly:
    """A column without `cell_revealer`: the tracker reveals its rows the reference way."""

    def __init__(self, column: RoleColumn) -> None:
        self.column = column

    def __getattr__(self, name: str) -> Any:
        if name == "cell_revealer":
            raise AttributeError(name)
        return getattr(self.column, name)


class Columns:
    """pan and balance as one role sees them (fresh counters), over shared keys."""

    def __init__(self, runtimes: dict[str, ColumnRuntime]) -> None:
        self.pan = RoleColumn(runtimes["pan"], "plaintext", None, tz=lambda: datetime.UTC)
        self.balance = RoleColumn(runtimes["balance"], "plaintext", None,
                                  tz=lambda: datetime.UTC)

    def counts(self) -> list[tuple[int, int]]:
        return [(c.n_decrypt, c.n_failed) for c in (self.pan, self.balance)]


class Protector:
    def __init__(self, cols: Columns, slow: bool = False) -> None:
        wrap: Any = SlowOnly if slow else (lambda c: c)
        self.attrs = {(TABLE, 2): wrap(cols.pan), (TABLE, 4): wrap(cols.balance)}

    def column_at(self, table_oid: int, attnum: int) -> Any:
        return self.attrs.get((table_oid, attnum))

    def plan_query(self, sql: str) -> StatementPlan:
        return StatementPlan(sql=sql.encode())

    def copy_plan(self, plan: Any) -> Any:
        return None


def _bytea(envelope: bytes, fmt: int) -> bytes:
    return envelope if fmt == 1 else b"\\x" + envelope.hex().encode()


def _data_rows(runtimes: dict[str, ColumnRuntime], n: int, fmt: int, rng: random.Random,
               bad_at: int | None) -> list[bytes]:
    pan, bal = runtimes["pan"], runtimes["balance"]
    foreign = _runtime("pan", "text").cipher.encrypt(b"4111")  # another key: fails
    hot = [pan.cipher.encrypt(b"4%015d" % i) for i in range(5)]  # cache hits
    out = []
    for i in range(n):
        pan_cell: bytes | None = (rng.choice(hot) if rng.random() < 0.4
                                  else pan.cipher.encrypt(b"4%015d" % rng.randrange(10**9)))
        bal_cell: bytes | None = bal.cipher.encrypt(b"%d.%02d" % (rng.randrange(10**6), i % 100))
        if rng.random() < 0.15:
            pan_cell = None
        if rng.random() < 0.15:
            bal_cell = None
        if i == bad_at:
            bal_cell = foreign
        plain = [struct.pack("!i", i) if fmt else str(i).encode(),
                 None if rng.random() < 0.1 else b"note %d" % i,
                 b"t" * rng.randrange(3)]
        cells = [plain[0], pan_cell and _bytea(pan_cell, fmt), plain[1],
                 bal_cell and _bytea(bal_cell, fmt), plain[2]]
        if rng.random() < 0.03:
            cells = cells[: rng.randrange(len(cells))]  # a short row (never from PG)
        out.append(rows.encode_data_row(cells))
    return out


def _exchange(data: list[bytes], fmt: int, txn: bytes) -> tuple[bytes, bytes]:
    """(client bytes, server bytes) of one SELECT returning `data`."""
    body = struct.pack("!h", len(LAYOUT))
    for attnum, (name, typ, protected) in enumerate(LAYOUT, 1):
        body += name + b"\0" + struct.pack("!IhIhih", TABLE if protected else 0, attnum, typ,
                                           -1 if typ == 17 else 4, -1, fmt)
    described = msg(b"T", body)
    notice = msg(b"N", b"SNOTICE\0VNOTICE\0C00000\0Mhalfway\0\0")  # forwarded as is
    data = [*data[: len(data) // 2], notice, *data[len(data) // 2 :]]
    done = [msg(b"C", b"SELECT %d\0" % (len(data) - 1)), msg(b"Z", txn)]
    sql = b"SELECT id, pan, note, balance, tail FROM t"
    if fmt == 0:
        return msg(b"Q", sql + b"\0"), b"".join([described, *data, *done])
    client = (msg(b"P", b"\0" + sql + b"\0\0\0") + msg(b"B", b"\0\0\0\0\0\0\0\1\0\1")
              + msg(b"D", b"P\0") + msg(b"E", b"\0\0\0\0\0") + msg(b"S", b""))
    return client, b"".join([msg(b"1", b""), msg(b"2", b""), described, *data, *done])


def _reference(cols: Columns, client: bytes, server: bytes) -> tuple[bytes, bytes]:
    """What the client and the server get, message by message through `Tracker.server`
    (the session's loop before runs), every row the reference way."""
    tracker = Tracker(Protector(cols, slow=True))
    to_server = b""
    pos = 0
    while pos < len(client):
        stop = pos + 1 + int.from_bytes(client[pos + 1 : pos + 5], "big")
        replaced = tracker.client(client[pos], client[pos:stop])
        to_server += client[pos:stop] if replaced is None else replaced
        pos = stop
    to_client = b""
    pos = 0
    while pos < len(server):
        stop = pos + 1 + int.from_bytes(server[pos + 1 : pos + 5], "big")
        replaced = tracker.server(server[pos], server[pos:stop])
        to_client += server[pos:stop] if replaced is None else replaced
        pos = stop
    return to_client, to_server + tracker.to_server


@pytest.mark.parametrize("fmt", [0, 1])
@pytest.mark.parametrize("bad_at,txn", [(None, b"I"), (37, b"I"), (61, b"T"), (0, b"T")])
def test_runs_match_the_row_by_row_reference(fmt: int, bad_at: int | None,
                                             txn: bytes) -> None:
    rng = random.Random(f"{fmt}{bad_at}{txn!r}")
    runtimes = {"pan": _runtime("pan", "text"), "balance": _runtime("balance", "numeric")}
    client, server = _exchange(_data_rows(runtimes, 90, fmt, rng, bad_at), fmt, txn)
    ref_cols = Columns(runtimes)
    want_client, want_server = _reference(ref_cols, client, server)
    if bad_at is not None:
        assert b"XX001" in want_client  # the failure is in there, mid-result
    for reads in cuts(server, rng, 25):
        cols = Columns(runtimes)
        s, to_client, to_server = ready_session()
        s.tracker = Tracker(Protector(cols))
        s.data_received(client)
        for chunk in reads:
            s.server_data(chunk)
        assert to_client.data == want_client
        assert to_server.data == want_server
        assert s.tracker.consume_to_ready is False
        assert cols.counts() == ref_cols.counts()
        assert s.outstanding == (1 if txn == b"T" and bad_at is not None else 0)
        assert s._sframer.pending == 0


def test_a_failing_row_ends_the_run_before_it() -> None:
    """`reveal` stops at the row it cannot do: what it wrote and counted is exactly the
    rows before it (the tracker then does that row the reference way)."""
    runtimes = {"pan": _runtime("pan", "text"), "balance": _runtime("balance", "numeric")}
    cols = Columns(runtimes)
    plan = RowPlan([(1, cols.pan, 1), (3, cols.balance, 1)])
    rev = RowRevealer(plan)
    env = runtimes["pan"].cipher.encrypt(b"4111111111111111")
    bal = runtimes["balance"].cipher.encrypt(b"1.50")
    good = rows.encode_data_row([b"1", env, None, bal, b"x"])
    null = rows.encode_data_row([b"2", None, b"n", bal])
    bad = rows.encode_data_row([b"3", env, b"n", bal[:-1]])
    sent = get_codec("numeric").to_binary(b"1.50")
    want = (rows.encode_data_row([b"1", b"4111111111111111", None, sent, b"x"])
            + rows.encode_data_row([b"2", None, b"n", sent]))
    buf = good + null + bad + good
    out = bytearray(b"before")
    assert rev.reveal(buf, 0, len(buf), out) == len(good + null)
    assert out == b"before" + want
    assert rev.rows == 2 and rev.nulls == [1, 0]
    # and a row cut off by the end of what was read: not started either
    out = bytearray()
    assert rev.reveal(buf, len(good), len(buf) - 1, out) == len(good + null)
    assert rev.rows == 3 and rev.nulls == [2, 0]
    rev.flush()
    assert cols.counts() == [(1, 0), (3, 0)]


def test_a_run_stops_at_another_message_type() -> None:
    runtimes = {"pan": _runtime("pan", "text"), "balance": _runtime("balance", "numeric")}
    cols = Columns(runtimes)
    rev = RowRevealer(RowPlan([(1, cols.pan, 1)]))
    env = runtimes["pan"].cipher.encrypt(b"secret")
    row = rows.encode_data_row([b"1", env])
    done = msg(b"C", b"SELECT 2\0")
    buf = row + row + done + row
    out = bytearray()
    assert rev.reveal(buf, 0, len(buf), out) == 2 * len(row)
    assert out == 2 * rows.encode_data_row([b"1", b"secret"])
    out.clear()
    assert rev.reveal(buf, 2 * len(row), len(buf), out) == 2 * len(row)  # not a DataRow
    assert out == b""


def test_every_row_postgresql_sends_stays_on_the_fast_path() -> None:
    """NULL, empty and last cells, protected or not: `reveal` takes the whole run (the
    reference path is only for what PostgreSQL never sends, or a failing cell)."""
    rng = random.Random(5)
    runtimes = {"pan": _runtime("pan", "text"), "balance": _runtime("balance", "numeric")}
    cols = Columns(runtimes)
    for where in ([0], [4], [1, 3], [0, 1], [3, 4], [0, 2, 4]):
        plan = RowPlan([(i, cols.pan, 1) for i in where])
        rev = RowRevealer(plan)
        buf = want = b""
        for _ in range(200):
            values = [None if rng.random() < 0.3 else b"v" * rng.randrange(3)
                      for _ in range(5)]
            cells = [runtimes["pan"].cipher.encrypt(v) if i in where and v is not None else v
                     for i, v in enumerate(values)]
            buf += rows.encode_data_row(cells)
            want += rows.encode_data_row(values)
        out = bytearray()
        assert rev.reveal(buf, 0, len(buf), out) == len(buf), where
        assert out == want
