"""Issue 13, "fix on the way": flow between the client and server legs, in both paths.

- Client->server backpressure: when the server stops reading (here it waits for a lock
  with a large pipelined batch behind the statement), the proxy stops reading the client,
  so its memory does not grow with the client's batch, and the client ends as it does
  direct (the error of row 1, then ReadyForQuery) once the lock goes.
- A notification sent just before its sender disconnects reaches a listener on the proxy
  as it does direct: the request of a vanished client is finished, not cancelled at once.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from tests.conftest import (
    SYNC,
    TERMINATE,
    ProxyProcess,
    RawPG,
    bind_msg,
    error_fields,
    execute_msg,
    parse_msg,
    query_msg,
)
from tests.integration.encryption_env import both_paths, direct, login_role_sql

ROLE, PASSWORD = "flow_user", "flow-user-pw"
SETUP = login_role_sql(ROLE, PASSWORD) + """
DROP TABLE IF EXISTS public.flow_rows, public.flow_cards;
CREATE TABLE public.flow_rows (v text CHECK (v NOT LIKE 'bad%'));
CREATE TABLE public.flow_cards (id int, pan bytea, pan_bidx bytea);
GRANT ALL ON public.flow_rows, public.flow_cards TO PUBLIC;
"""
POLICY: dict[str, Any] = {
    "roles": {ROLE: {"tables": {"public.flow_rows": ["select", "insert"],
                                "public.flow_cards": ["select", "insert"]},
                     "allow": ["listen", "notify"]}},
    "default": "deny",
}
PROTECT = {"public.flow_cards.pan": {"type": "text", "search": "blind_index"}}

ROW_BYTES = 70 * 1024
ROWS = 1500  # 105 MB pipelined behind a statement that waits for a lock
GROWTH_LIMIT_KB = 40 * 1024  # what the proxy may add while the client is stalled


@pytest.fixture(scope="module")
def proxies(pg: Any) -> Iterator[dict[str, ProxyProcess]]:
    pg.psql(SETUP, db="app")
    # Small statement caches: the distinct big statements must not be what grows.
    with both_paths(pg, PROTECT, POLICY,
                    extra=lambda: {"limits": {"statement_cache_bytes": 1 << 20}}) as started:
        yield started


@pytest.fixture(params=["relay", "tracking"])
def proxy_of(request: pytest.FixtureRequest, proxies: dict[str, ProxyProcess]) -> ProxyProcess:
    return proxies[request.param]


def _row(i: int, tag: str) -> str:
    """An INSERT over the proxy's offload size (analysed in its worker process while the
    client's later bytes wait: a pause and a resume of its reads), distinct so that no
    cache has it (`tag`: nor from the other variant's run); the first one fails the
    table's CHECK constraint."""
    value = ("bad" if i == 0 else "ok-") + f"{i:08d}{tag}" + "x" * ROW_BYTES
    return f"INSERT INTO public.flow_rows VALUES ('{value}')"


def _batch(extended: bool) -> bytes:
    """Extended: an executemany of literal statements in bytes (a Parse, Bind and Execute
    per row, one Sync); simple: a Query per row."""
    if extended:
        return b"".join(parse_msg(_row(i, "e")) + bind_msg() + execute_msg()
                        for i in range(ROWS)) + SYNC
    return b"".join(query_msg(_row(i, "s")) for i in range(ROWS))


def _push(port: int, batch: bytes, stalled: Any, readies: int,
          ) -> tuple[int, list[tuple[str, str]]]:
    """Log in as ROLE on `port`, push `batch` while the table is locked by a direct
    session, call `stalled()` once the client cannot push more, release the lock and
    finish (`readies` ReadyForQuery messages). Returns the bytes pushed before the
    release and the replies (type, SQLSTATE)."""
    with direct(pg_of[0]) as locker, RawPG(port) as raw:
        locker.execute("TRUNCATE public.flow_rows")
        locker.execute("BEGIN")
        locker.execute("LOCK TABLE public.flow_rows IN ACCESS EXCLUSIVE MODE")
        raw.login(ROLE, PASSWORD)
        raw.sock.setblocking(False)
        sent = idle = 0
        view = memoryview(batch)
        deadline = time.monotonic() + 20
        while sent < len(batch) and idle < 100 and time.monotonic() < deadline:
            try:
                n = raw.sock.send(view[sent : sent + (1 << 20)])
                sent += n
                idle = 0
            except BlockingIOError:
                idle += 1  # one second without progress: the client is stalled
                time.sleep(0.01)
        stalled()
        locker.execute("ROLLBACK")
        raw.sock.setblocking(True)
        raw.sock.settimeout(60)
        raw.sock.sendall(view[sent:])
        replies = [(k.decode(), error_fields(b).get("C", "") if k == b"E" else "")
                   for _ in range(readies) for k, b in raw.read_until(b"Z")]
        raw.send(TERMINATE)
        return sent, replies


pg_of: list[Any] = []


@pytest.fixture(autouse=True)
def _remember_pg(pg: Any) -> None:
    pg_of[:] = [pg]


@pytest.mark.parametrize("extended", [False, True], ids=["simple", "extended"])
def test_a_stalled_server_stalls_the_client(proxy_of: ProxyProcess, extended: bool) -> None:
    batch = _batch(extended)
    readies = 1 if extended else ROWS
    _, want = _push(pg_of[0].port, batch, lambda: None, readies)
    assert ("E", "23514") in want
    before = proxy_of.memory_kb()["VmRSS"]
    seen: dict[str, int] = {}
    sent, got = _push(proxy_of.port, batch,
                      lambda: seen.update(proxy_of.memory_kb()), readies)
    assert got == want, "the replies are the direct ones"
    assert sent < len(batch), "the proxy took the whole batch: no backpressure"
    assert seen["VmRSS"] - before < GROWTH_LIMIT_KB, (before, seen)
    with direct(pg_of[0]) as conn:
        assert conn.execute("SELECT count(*) FROM public.flow_rows").fetchone() == (
            0 if extended else ROWS - 1,)


# ---------------------------------------------------------------------- notifications


def _notify_and_vanish(port: int, channel: str, payload: str) -> None:
    """A sender that sends a NOTIFY (behind a statement that takes a moment, as real work
    before a NOTIFY does) and closes its socket at once, without waiting for the reply."""
    with RawPG(port) as raw:
        raw.login(ROLE, PASSWORD)
        raw.send(query_msg(f"SELECT pg_sleep(0.2); NOTIFY {channel}, '{payload}'"))
        raw.sock.shutdown(socket.SHUT_RDWR)


def _arrived(listener: psycopg.Connection, payload: str, within: float) -> bool:
    for n in listener.notifies(timeout=within, stop_after=1):
        return n.payload == payload
    return False


def test_a_notification_before_a_disconnect_arrives(proxy_of: ProxyProcess) -> None:
    """Direct, PostgreSQL finishes the request of a client that vanished, so its NOTIFY
    is delivered; the proxy used to cancel that request at once, and the notification
    was lost (or came late, with the next one)."""
    channel = "flow_vanish"
    with psycopg.connect(proxy_of.conninfo(user=ROLE, password=PASSWORD),
                         autocommit=True) as listener:
        listener.execute(f"LISTEN {channel}")
        for port in (pg_of[0].port, proxy_of.port):  # direct first: the reference
            late = []
            for i in range(20):
                _notify_and_vanish(port, channel, f"{port}-{i}")
                if not _arrived(listener, f"{port}-{i}", 2.0):
                    late.append(i)
            assert not late, f"late or lost (sender on port {port}): {late}"
