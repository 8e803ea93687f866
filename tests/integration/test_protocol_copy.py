"""COPY in both directions through the proxy, a million rows, with bounded proxy memory.

The proxy must stream: a COPY of N rows may not cost memory proportional to N, in
either direction and even when the reader is slower than the writer (backpressure).
Memory is the proxy process's own VmHWM/VmRSS from /proc, measured on a dedicated
proxy so no other test's peak is counted.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psycopg
import pytest

from proxy import devcluster
from tests.conftest import (
    APP_DB,
    APP_PASSWORD,
    APP_USER,
    PW_PASSWORD,
    PW_USER,
    ProxyProcess,
    RawPG,
    cstr,
    error_fields,
    msg,
    query_msg,
)

ROWS = 1_000_000
MEMORY_LIMIT_KB = 150 * 1024


@pytest.fixture(scope="module")
def copy_proxy(pg: devcluster.Cluster) -> Iterator[ProxyProcess]:
    p = ProxyProcess(pg).start()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def copy_table(copy_proxy: ProxyProcess) -> Iterator[str]:
    with psycopg.connect(copy_proxy.conninfo(), autocommit=True) as conn:
        conn.execute("drop table if exists copy_src, copy_dst")
        conn.execute("create table copy_src(id int8, name text, amount numeric, ok bool)")
        conn.execute("create table copy_dst(id int8, name text, amount numeric, ok bool)")
    yield "copy_src"
    with psycopg.connect(copy_proxy.conninfo(), autocommit=True) as conn:
        conn.execute("drop table if exists copy_src, copy_dst")


def _text_chunks(rows: int, sep: str = "\t", batch: int = 20_000) -> Iterator[bytes]:
    for start in range(0, rows, batch):
        yield "".join(
            f"{i}{sep}name-{i}{sep}{i}.{i % 100:02d}{sep}{'t' if i % 2 else 'f'}\n"
            for i in range(start, min(rows, start + batch))
        ).encode()


def _assert_memory(p: ProxyProcess) -> None:
    mem = p.memory_kb()
    assert mem["VmHWM"] < MEMORY_LIMIT_KB, f"proxy peak RSS {mem['VmHWM']} kB"


EXPECTED_SUM = ROWS * (ROWS - 1) // 2
GEN = (f"select g::int8 as id, 'name-' || g as name, g / 100.0 as amount, g % 2 = 1 as ok"
       f" from generate_series(0, {ROWS - 1}) g")


def _psql(p: ProxyProcess | devcluster.Cluster, command: str, out: Path | None = None) -> str:
    """psql (C, fast) as the bulk client, so a million rows cost seconds, not minutes."""
    port = p.port
    env = {**os.environ, "PGPASSWORD": APP_PASSWORD, "PGSSLMODE": "disable"}
    cmd = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", str(port),
           "-U", APP_USER, "-d", APP_DB, "-At", "-c", command]
    if out is not None:
        with open(out, "wb") as fh:
            res = subprocess.run(cmd, stdout=fh, stderr=subprocess.PIPE, env=env, timeout=120)
        assert res.returncode == 0, res.stderr
        return ""
    res2 = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert res2.returncode == 0, res2.stderr
    return res2.stdout


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_copy_in_1m_rows_text_psycopg(copy_proxy: ProxyProcess, copy_table: str) -> None:
    """psycopg pushes 1M rows as fast as it can; all arrive, memory stays bounded."""
    with psycopg.connect(copy_proxy.conninfo(), autocommit=True) as conn:
        conn.execute("truncate copy_src")
        with conn.cursor().copy("copy copy_src from stdin") as copy:
            for chunk in _text_chunks(ROWS):
                copy.write(chunk)
        n, s, t = conn.execute(
            "select count(*), sum(id), count(*) filter (where ok) from copy_src").fetchone()
    assert (n, s, t) == (ROWS, EXPECTED_SUM, ROWS // 2)
    _assert_memory(copy_proxy)


@pytest.mark.parametrize("fmt", ["text", "csv", "binary"])
def test_copy_out_and_in_1m_rows(pg: devcluster.Cluster, copy_proxy: ProxyProcess,
                                 copy_table: str, tmp_path: Path, fmt: str) -> None:
    """COPY TO STDOUT through the proxy is byte-identical to direct; the same file goes
    back in with COPY FROM STDIN through the proxy and yields the same rows."""
    via_proxy, direct = tmp_path / "proxy.out", tmp_path / "direct.out"
    _psql(copy_proxy, f"copy ({GEN}) to stdout (format {fmt})", via_proxy)
    _psql(pg, f"copy ({GEN}) to stdout (format {fmt})", direct)
    assert via_proxy.stat().st_size > ROWS * 20
    assert _sha(via_proxy) == _sha(direct)
    if fmt != "binary":
        with open(via_proxy, "rb") as fh:
            assert sum(1 for _ in fh) == ROWS
    _psql(copy_proxy, "truncate copy_dst")
    _psql(copy_proxy, f"\\copy copy_dst from '{via_proxy}' (format {fmt})")
    got = _psql(copy_proxy, "select count(*), sum(id), sum(amount)::numeric(20, 2),"
                            " count(*) filter (where ok)"
                            " from copy_dst")
    assert got.strip() == f"{ROWS}|{EXPECTED_SUM}|{sum(range(ROWS)) / 100:.2f}|{ROWS // 2}"
    _assert_memory(copy_proxy)


def test_copy_out_psycopg(copy_proxy: ProxyProcess) -> None:
    """A driver reading COPY OUT row by row (psycopg) sees every row, in order."""
    n = 200_000
    with psycopg.connect(copy_proxy.conninfo()) as conn:
        lines = 0
        with conn.cursor().copy(f"copy (select g from generate_series(1, {n}) g)"
                                " to stdout") as copy:
            for row in copy.rows():
                lines += 1
                assert int(row[0]) == lines
    assert lines == n


def test_copy_fail_aborts(copy_proxy: ProxyProcess, copy_table: str) -> None:
    """psycopg sends CopyFail when the block raises: the server aborts the COPY (the
    transaction is left in error), nothing is stored, and the session keeps working."""

    class Boom(Exception):
        pass

    with psycopg.connect(copy_proxy.conninfo()) as conn:
        conn.execute("truncate copy_dst")
        conn.commit()
        with pytest.raises(Boom):
            with conn.cursor().copy("copy copy_dst from stdin") as copy:
                for i, chunk in enumerate(_text_chunks(50_000)):
                    copy.write(chunk)
                    if i == 1:
                        raise Boom("client gave up")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        conn.rollback()
        assert conn.execute("select count(*) from copy_dst").fetchone()[0] == 0


def test_copy_fail_message_raw(proxy_aux: ProxyProcess) -> None:
    """The CopyFail message itself: the server answers 57014 quoting the client's text."""
    with RawPG(proxy_aux.port) as raw:
        raw.login(PW_USER, PW_PASSWORD)
        raw.send(query_msg("create temp table cf(x int)"))
        raw.read_until(b"Z")
        raw.send(query_msg("copy cf from stdin"))
        assert [k for k, _ in raw.read_until(b"G")] == [b"G"]
        raw.send(msg(b"d", b"1\n2\n") + msg(b"f", cstr("client says no")))
        replies = raw.read_until(b"Z")
        assert [k for k, _ in replies] == [b"E", b"Z"]
        fields = error_fields(replies[0][1])
        assert fields["C"] == "57014"
        assert fields["M"] == "COPY from stdin failed: client says no"
        raw.send(query_msg("select count(*) from cf"))
        assert raw.read_until(b"Z")[1] == (b"D", b"\x00\x01\x00\x00\x00\x010")


def test_copy_data_error_mid_stream(copy_proxy: ProxyProcess, copy_table: str) -> None:
    """A bad row in the middle: the server's error (with its CONTEXT line) reaches the client."""
    with psycopg.connect(copy_proxy.conninfo(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InvalidTextRepresentation) as info:
            with conn.cursor().copy("copy copy_dst from stdin") as copy:
                copy.write(b"1\ta\t1\tt\n2\tb\tnot-a-number\tt\n")
        assert "line 2" in (info.value.diag.context or "")
        assert conn.execute("select 1").fetchone() == (1,)


async def test_copy_asyncpg(copy_proxy: ProxyProcess, copy_table: str) -> None:
    """asyncpg's binary COPY paths (copy_records_to_table, copy_from_query)."""
    conn = await asyncpg.connect(copy_proxy.dsn())
    try:
        await conn.execute("truncate copy_dst")
        from decimal import Decimal
        records = [(i, f"n{i}", Decimal(i) / 4, i % 3 == 0) for i in range(100_000)]
        await conn.copy_records_to_table("copy_dst", records=records)
        assert await conn.fetchval("select sum(id) from copy_dst") == sum(range(100_000))
        chunks: list[bytes] = []

        async def sink(data: bytes) -> None:
            chunks.append(data)

        await conn.copy_from_query("select * from copy_dst order by id", output=sink,
                                   format="csv")
        text = b"".join(chunks)
        assert text.count(b"\n") == 100_000
        assert text.startswith(b"0,n0,0,t\n")
    finally:
        await conn.close()


def test_copy_out_slow_reader_backpressure(pg_aux: devcluster.Cluster, make_proxy) -> None:
    """A client that stops reading a large COPY OUT must not make the proxy buffer it:
    the proxy stops reading from the server instead (RSS stays flat while stalled)."""
    p = make_proxy(cluster=pg_aux)
    with RawPG(p.port) as raw:
        raw.login(PW_USER, PW_PASSWORD)
        # 200 MB of output if it were all buffered (big rows: the test is about bytes).
        raw.send(query_msg("copy (select repeat('x', 19999) from generate_series(1, 10000))"
                           " to stdout"))
        time.sleep(2)  # we read nothing; the server keeps producing
        stalled = p.memory_kb()
        received = 0
        raw.sock.settimeout(30)
        while True:
            kind, body = raw.read_msg()
            if kind == b"d":
                received += len(body)
            elif kind == b"Z":
                break
    assert received == 20_000 * 10_000
    assert stalled["VmRSS"] < MEMORY_LIMIT_KB, stalled
    assert p.memory_kb()["VmHWM"] < MEMORY_LIMIT_KB


def test_copy_in_fast_writer_backpressure(pg_aux: devcluster.Cluster, make_proxy) -> None:
    """The other direction: a client pushing COPY data faster than the server takes it
    (the server is blocked on a lock) must be paused, not buffered."""
    p = make_proxy(cluster=pg_aux)
    pg_aux.psql("create table if not exists bp(x text); grant all on bp to public", db="app")
    with RawPG(p.port) as raw, RawPG(p.port) as locker:
        locker.login(PW_USER, PW_PASSWORD)
        locker.send(query_msg("begin; lock table bp in access exclusive mode"))
        locker.read_until(b"Z")
        raw.login(PW_USER, PW_PASSWORD)
        # The server waits for the lock before it reads anything: whatever we push now
        # piles up in front of it, unless the proxy stops reading from us.
        raw.send(query_msg("copy bp from stdin"))
        row = b"d" + (404).to_bytes(4, "big") + b"y" * 399 + b"\n"
        chunk = row * 2000
        raw.sock.setblocking(False)
        sent = 0
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and sent < 400_000_000:
            try:
                # Keep messages whole across partial sends.
                sent += raw.sock.send(chunk[sent % len(chunk) :])
            except BlockingIOError:
                time.sleep(0.01)
        stalled = p.memory_kb()
        raw.sock.setblocking(True)
        locker.send(query_msg("rollback"))
        locker.read_until(b"Z")
    assert sent < 400_000_000, "the proxy accepted everything: no backpressure"
    assert stalled["VmRSS"] < MEMORY_LIMIT_KB, stalled
