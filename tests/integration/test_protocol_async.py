"""Out-of-band traffic: cancel, termination, LISTEN/NOTIFY, killed clients.

These all depend on the proxy passing the server's BackendKeyData through and routing
a CancelRequest (which arrives on a new connection) to the right upstream. Every
check is made on the server (pg_stat_activity), not only on what the driver reports.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
import time
import uuid

import asyncpg
import psycopg
import pytest

from proxy import devcluster
from tests.conftest import APP_PASSWORD, APP_USER, ProxyProcess, RawPG


def backend_state(pg: devcluster.Cluster, pid: int) -> str:
    """'' when the backend is gone, else its pg_stat_activity state."""
    return pg.psql(f"select state from pg_stat_activity where pid = {pid}").strip()


def wait_for_state(pg: devcluster.Cluster, pid: int, want: str, timeout: float = 5.0) -> float:
    """Poll until the backend is in `want` ('' = gone); return how long it took."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if backend_state(pg, pid) == want:
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"backend {pid} state {backend_state(pg, pid)!r}, wanted {want!r}")


def wait_active(pg: devcluster.Cluster, pid: int) -> None:
    wait_for_state(pg, pid, "active")


def _cancel_from_thread(pg: devcluster.Cluster, conn: psycopg.Connection, safe: bool) -> None:
    pid = conn.info.backend_pid

    def later() -> None:
        wait_active(pg, pid)
        if safe:
            conn.cancel_safe()
        else:
            conn.cancel()

    t = threading.Thread(target=later)
    t.start()
    start = time.monotonic()
    with pytest.raises(psycopg.errors.QueryCanceled) as info:
        conn.execute("select pg_sleep(30)")
    t.join()
    assert info.value.diag.sqlstate == "57014"
    assert time.monotonic() - start < 10
    assert conn.execute("select 1").fetchone() == (1,)
    assert backend_state(pg, pid) == "idle"


@pytest.mark.parametrize("safe", [False, True], ids=["cancel", "cancel_safe"])
def test_psycopg_cancel(pg: devcluster.Cluster, proxy: ProxyProcess, safe: bool) -> None:
    with psycopg.connect(proxy.conninfo(), autocommit=True) as conn:
        _cancel_from_thread(pg, conn, safe)


async def test_asyncpg_timeout_cancels_on_server(pg: devcluster.Cluster,
                                                 proxy: ProxyProcess) -> None:
    """asyncpg's timeout= sends a CancelRequest; the server really stops the query."""
    conn = await asyncpg.connect(proxy.dsn())
    try:
        pid = conn.get_server_pid()
        start = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            await conn.execute("select pg_sleep(30)", timeout=0.5)
        assert time.monotonic() - start < 5
        assert await conn.fetchval("select 42") == 42
        assert backend_state(pg, pid) == "idle"
    finally:
        await conn.close()


async def test_asyncpg_explicit_cancel(pg: devcluster.Cluster, proxy: ProxyProcess) -> None:
    conn = await asyncpg.connect(proxy.dsn())
    try:
        task = asyncio.ensure_future(conn.fetchval("select pg_sleep(30)"))
        await asyncio.to_thread(wait_active, pg, conn.get_server_pid())
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await conn.fetchval("select 1") == 1
    finally:
        await conn.close()


def test_cancel_with_wrong_secret_is_ignored(pg: devcluster.Cluster, proxy: ProxyProcess) -> None:
    """A CancelRequest with a key nobody owns is dropped (as PostgreSQL does): the
    statement runs to completion; the proxy answers nothing and closes."""
    with psycopg.connect(proxy.conninfo(), autocommit=True) as conn:
        pid = conn.info.backend_pid
        result: list[object] = []
        t = threading.Thread(target=lambda: result.append(
            conn.execute("select pg_sleep(1.0), 'done'").fetchone()))
        t.start()
        wait_active(pg, pid)
        with RawPG(proxy.port) as raw:
            raw.send((16).to_bytes(4, "big") + (80877102).to_bytes(4, "big")
                     + pid.to_bytes(4, "big") + (12345).to_bytes(4, "big"))
            assert raw.read_to_close(timeout=2) == []
        t.join()
        assert result == [("", "done")]


# ---------------------------------------------------------------------- termination


def test_pg_terminate_backend_psycopg(pg: devcluster.Cluster, proxy: ProxyProcess) -> None:
    """The client sees the server's own FATAL 57P01, not a proxy-made error."""
    conn = psycopg.connect(proxy.conninfo(), autocommit=True)
    pid = conn.info.backend_pid
    assert pg.psql(f"select pg_terminate_backend({pid})").strip() == "t"
    wait_for_state(pg, pid, "")
    with pytest.raises(psycopg.errors.AdminShutdown) as info:
        conn.execute("select 1")
    assert info.value.diag.sqlstate == "57P01"
    assert "terminating connection due to administrator command" in str(info.value)
    assert conn.closed
    with psycopg.connect(proxy.conninfo()) as again:
        assert again.execute("select 1").fetchone() == (1,)


async def test_pg_terminate_backend_asyncpg(pg: devcluster.Cluster, proxy: ProxyProcess) -> None:
    conn = await asyncpg.connect(proxy.dsn())
    pid = conn.get_server_pid()
    victim_done = asyncio.ensure_future(conn.fetchval("select pg_sleep(30)"))
    await asyncio.to_thread(wait_active, pg, pid)
    other = await asyncpg.connect(proxy.dsn())
    try:
        # Non-superuser, same role: allowed by PostgreSQL, and it works through the proxy
        # only because the pid the client sees is the real one.
        assert await other.fetchval("select pg_terminate_backend($1)", pid) is True
        # What asyncpg raises here directly against PostgreSQL too (checked by hand).
        with pytest.raises(asyncpg.exceptions.ConnectionDoesNotExistError,
                           match="terminating connection due to administrator command"):
            await victim_done
    finally:
        await other.close()
        conn.terminate()


# ---------------------------------------------------------------------- LISTEN / NOTIFY


def test_listen_notify_psycopg(proxy: ProxyProcess) -> None:
    channel = "ch_" + uuid.uuid4().hex[:8]
    with psycopg.connect(proxy.conninfo(), autocommit=True) as listener, \
            psycopg.connect(proxy.conninfo(), autocommit=True) as sender:
        listener.execute(f"listen {channel}")
        sender.execute("select pg_notify(%s, %s)", (channel, "payload-1"))
        sender.execute(f"notify {channel}, 'payload-2'")
        got = []
        for n in listener.notifies(timeout=5, stop_after=2):
            got.append((n.channel, n.payload, n.pid))
        spid = sender.info.backend_pid
    assert got == [(channel, "payload-1", spid), (channel, "payload-2", spid)]


async def test_listen_notify_asyncpg(proxy: ProxyProcess) -> None:
    listener = await asyncpg.connect(proxy.dsn())
    sender = await asyncpg.connect(proxy.dsn())
    got: asyncio.Queue[tuple[int, str, str]] = asyncio.Queue()
    try:
        await listener.add_listener("apg_ch", lambda _c, pid, ch, payload: got.put_nowait(
            (pid, ch, payload)))
        await sender.execute("notify apg_ch, 'hello'")
        assert await asyncio.wait_for(got.get(), 5) == (sender.get_server_pid(), "apg_ch",
                                                        "hello")
    finally:
        await listener.close()
        await sender.close()


def test_notify_arrives_while_idle_in_psycopg_and_asyncpg_mix(proxy: ProxyProcess) -> None:
    """A notification sent while the listener is idle reaches it without any query
    (the proxy must forward server-initiated messages, not wait for a request)."""
    with psycopg.connect(proxy.conninfo(), autocommit=True) as listener:
        listener.execute("listen idle_ch")

        async def send() -> int:
            c = await asyncpg.connect(proxy.dsn())
            try:
                await c.execute("notify idle_ch, 'x'")
                return c.get_server_pid()
            finally:
                await c.close()

        spid = asyncio.run(send())
        gen = listener.notifies(timeout=5, stop_after=1)
        got = [(n.pid, n.payload) for n in gen]
    assert got == [(spid, "x")]


# ---------------------------------------------------------------------- killed clients


def _psql_proc(proxy: ProxyProcess, sql: str, app: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PGPASSWORD": APP_PASSWORD, "PGSSLMODE": "disable",
           "PGAPPNAME": app}
    return subprocess.Popen(
        ["psql", "-X", "-h", "127.0.0.1", "-p", str(proxy.port), "-U", APP_USER, "-d", "app",
         "-c", sql],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def _pid_for_app(pg: devcluster.Cluster, app: str, timeout: float = 10) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = pg.psql(f"select pid from pg_stat_activity where application_name = '{app}'"
                      " and state = 'active'").strip()
        if out:
            return int(out)
        time.sleep(0.05)
    raise AssertionError(f"no active backend for {app}")


def test_killed_client_leaves_no_backend(pg: devcluster.Cluster, proxy: ProxyProcess) -> None:
    """psql running pg_sleep(60) is SIGKILLed: its backend must be gone within ~1 s (the
    running query is cancelled first, then the upstream connection closed)."""
    app = "victim-" + uuid.uuid4().hex[:6]
    proc = _psql_proc(proxy, "select pg_sleep(60)", app)
    try:
        pid = _pid_for_app(pg, app)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        took = wait_for_state(pg, pid, "", timeout=3.0)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert took < 1.5, f"backend lingered {took:.2f}s"


def test_client_gone_idle_in_transaction_rolls_back(pg: devcluster.Cluster,
                                                    proxy: ProxyProcess) -> None:
    """A client vanishing mid-transaction: backend gone, its uncommitted work rolled back."""
    with psycopg.connect(proxy.conninfo(), autocommit=True) as setup:
        setup.execute("create table if not exists gone_tx(x int)")
        setup.execute("truncate gone_tx")
    raw_conn = psycopg.connect(proxy.conninfo())
    raw_conn.execute("insert into gone_tx values (1)")
    pid = raw_conn.info.backend_pid
    assert backend_state(pg, pid) == "idle in transaction"
    # Drop the TCP connection without a Terminate message, as a crashed client would.
    os.close(raw_conn.pgconn.socket)
    wait_for_state(pg, pid, "", timeout=3.0)
    with psycopg.connect(proxy.conninfo()) as check:
        assert check.execute("select count(*) from gone_tx").fetchone() == (0,)
