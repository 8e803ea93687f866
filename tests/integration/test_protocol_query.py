"""Simple and extended query protocol, pipelines, prepared statements, errors, notices.

Driver tests check that real clients work; the raw-socket tests replay one message
script against PostgreSQL directly and through the proxy and compare the replies
byte for byte (the differential habit from STYLE.md), which no driver would show.
"""

from __future__ import annotations

import os
import struct
import subprocess

import asyncpg
import psycopg
import pytest

from proxy import devcluster
from tests.conftest import (
    APP_DB,
    APP_PASSWORD,
    APP_USER,
    FLUSH,
    PW_PASSWORD,
    PW_USER,
    SYNC,
    ProxyProcess,
    RawPG,
    bind_msg,
    close_msg,
    describe_msg,
    error_fields,
    execute_msg,
    function_call_msg,
    parse_msg,
    query_msg,
)


def direct_conninfo(pg: devcluster.Cluster) -> str:
    return (f"host=127.0.0.1 port={pg.port} user={APP_USER} password={APP_PASSWORD} "
            f"dbname={APP_DB} sslmode=disable")


# ---------------------------------------------------------------------- simple query


def test_multi_statement_simple_query(proxy: ProxyProcess) -> None:
    """One Query with several statements: every result set arrives, in order."""
    with psycopg.connect(proxy.conninfo(), autocommit=True) as conn:
        cur = conn.cursor()
        cur.execute("select 1 as a; select 'x' as b, 2 as c; create temp table t(x int);"
                    " insert into t values (1),(2)")
        results = []
        while True:
            results.append((cur.statusmessage, cur.fetchall() if cur.description else None))
            if not cur.nextset():
                break
    assert results == [("SELECT 1", [(1,)]), ("SELECT 1", [("x", 2)]),
                       ("CREATE TABLE", None), ("INSERT 0 2", None)]


def test_psql_through_proxy(proxy: ProxyProcess) -> None:
    """psql (libpq, simple protocol, \\copy, variables) works end to end."""
    env = {**os.environ, "PGPASSWORD": APP_PASSWORD, "PGSSLMODE": "disable"}
    script = ("create temp table p(x int);\n\\copy p from stdin\n1\n2\n3\n\\.\n"
              "select sum(x) as s from p \\gset\n\\echo total=:s\n")
    res = subprocess.run(
        ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", str(proxy.port),
         "-U", APP_USER, "-d", APP_DB],
        input=script, capture_output=True, text=True, env=env, timeout=30,
    )
    assert res.returncode == 0, res.stderr
    assert "total=6" in res.stdout


@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_pgbench_through_proxy(pg: devcluster.Cluster, proxy: ProxyProcess, mode: str) -> None:
    """pgbench's three query modes run clean through the proxy (no failed transactions)."""
    env = {**os.environ, "PGPASSWORD": APP_PASSWORD, "PGSSLMODE": "disable"}
    common = ["-h", "127.0.0.1", "-p", str(proxy.port), "-U", APP_USER, APP_DB]
    if mode == "simple":
        init = subprocess.run(["pgbench", "-i", "-q", "-s", "1", *common], capture_output=True,
                              text=True, env=env, timeout=120)
        assert init.returncode == 0, init.stderr
    res = subprocess.run(["pgbench", "-S", "-M", mode, "-c", "4", "-j", "2", "-t", "300",
                          *common], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "number of transactions actually processed: 1200/1200" in res.stdout
    assert "number of failed transactions: 0" in res.stdout


# ---------------------------------------------------------------------- extended query


def test_prepared_statement_reused_1000_times_psycopg(proxy: ProxyProcess) -> None:
    """prepare=True: one server-side statement, 1000 Bind/Execute, all answers right."""
    with psycopg.connect(proxy.conninfo()) as conn:
        total = 0
        for i in range(1000):
            total += conn.execute("select %s::int * 2", (i,), prepare=True).fetchone()[0]
        assert total == 2 * sum(range(1000))
        n = conn.execute(
            "select count(*) from pg_prepared_statements where statement like 'select $1::int%'"
        ).fetchone()[0]
        assert n == 1


async def test_prepared_statement_reused_1000_times_asyncpg(proxy: ProxyProcess) -> None:
    conn = await asyncpg.connect(proxy.dsn())
    try:
        stmt = await conn.prepare("select $1::int8 + 1, $2::text")
        for i in range(1000):
            row = await stmt.fetchrow(i, f"v{i}")
            assert tuple(row) == (i + 1, f"v{i}")
        assert await conn.fetchval("select count(*) from pg_prepared_statements") >= 1
    finally:
        await conn.close()


def test_binary_and_text_formats(proxy: ProxyProcess) -> None:
    """Binary-format results and parameters pass unchanged (psycopg binary cursor)."""
    with psycopg.connect(proxy.conninfo()) as conn:
        sql = ("select %b::int8, %b::numeric, %b::text, %b::bytea, %b::timestamptz,"
               " %b::int4[]")
        import datetime
        from decimal import Decimal
        ts = datetime.datetime(2024, 2, 29, 12, 0, tzinfo=datetime.UTC)
        args = (2**62, Decimal("1234.5678"), "héllo", b"\x00\xff", ts, [1, None, 3])
        binrow = conn.cursor(binary=True).execute(sql, args).fetchone()
        textrow = conn.cursor(binary=False).execute(sql.replace("%b", "%t"), args).fetchone()
        assert binrow == textrow == args


def test_pipeline_with_error_in_the_middle(pg: devcluster.Cluster, proxy: ProxyProcess) -> None:
    """Many statements before one Sync; the failing one aborts the rest up to the Sync,
    the same way as direct, and the session is usable afterwards."""

    def run(conninfo: str) -> list[object]:
        out: list[object] = []
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute("create temp table pl(i int primary key)")
            with conn.pipeline() as p:
                curs = []
                for i in range(50):
                    curs.append(conn.execute("insert into pl values (%s) returning i", (i,)))
                p.sync()
                try:
                    with conn.transaction():
                        for i in range(50, 60):
                            curs.append(conn.execute("insert into pl values (%s)", (i,)))
                        curs.append(conn.execute("insert into pl values (%s)", (3,)))  # dup
                        for i in range(60, 70):
                            curs.append(conn.execute("insert into pl values (%s)", (i,)))
                except psycopg.errors.UniqueViolation as exc:
                    out.append(("unique", exc.diag.constraint_name))
            for c in curs[:50]:
                out.append(c.fetchone())
            with conn.pipeline():
                for i in range(70, 80):
                    conn.execute("insert into pl values (%s)", (i,))
            out.append(conn.execute("select count(*), sum(i) from pl").fetchone())
        return out

    assert run(proxy.conninfo()) == run(direct_conninfo(pg))
    assert run(proxy.conninfo())[-1] == (60, sum(range(50)) + sum(range(70, 80)))


async def test_asyncpg_cursor_prefetch_row_limited_execute(proxy: ProxyProcess) -> None:
    """asyncpg cursors use Execute with a row limit (PortalSuspended) in a transaction."""
    conn = await asyncpg.connect(proxy.dsn())
    try:
        async with conn.transaction():
            got = [r[0] async for r in conn.cursor("select generate_series(1, 1000)",
                                                   prefetch=7)]
            assert got == list(range(1, 1001))
            cur = await conn.cursor("select generate_series(1, 100)")
            assert [r[0] for r in await cur.fetch(5)] == [1, 2, 3, 4, 5]
            await cur.forward(10)
            assert (await cur.fetchrow())[0] == 16
    finally:
        await conn.close()


def test_psycopg_server_side_cursor(proxy: ProxyProcess) -> None:
    with psycopg.connect(proxy.conninfo()) as conn:
        with conn.cursor(name="big") as cur:
            cur.itersize = 33
            cur.execute("select generate_series(1, 1000)")
            assert sum(r[0] for r in cur) == sum(range(1, 1001))


def _script_replies(port: int, script: list[bytes]) -> list[tuple[bytes, bytes]]:
    """Log in with a cleartext password, send the script, collect replies up to the last Z."""
    with RawPG(port) as raw:
        raw.login(PW_USER, PW_PASSWORD)
        raw.send(b"".join(script))
        n_sync = sum(1 for s in script if s[:1] in (b"S", b"Q", b"F"))
        out: list[tuple[bytes, bytes]] = []
        for _ in range(n_sync):
            out += raw.read_until(b"Z")
        return out


EXTENDED_SCRIPT = [
    query_msg("select 1 as a; set application_name = 'x'; select 'two' as b"),
    # Not a temp table: its OID (in RowDescription) would differ between sessions.
    parse_msg("select i, t from (select g as i, 'r' || g as t from generate_series(1, 20) g) s"
              " where i > $1 order by i", "s1", (23,)),
    describe_msg(b"S", "s1"),
    FLUSH,  # replies up to here must arrive before the Sync
    bind_msg((b"5",), "p1", "s1"),
    execute_msg("p1", 4),  # row-limited: 4 rows then PortalSuspended
    execute_msg("p1", 4),
    describe_msg(b"P", "p1"),
    bind_msg((b"\x00\x00\x00\x11",), "", "s1", (1, 0), (1,)),  # binary param and column
    execute_msg("", 0),
    close_msg(b"P", "p1"),
    close_msg(b"S", "s1"),
    SYNC,
    parse_msg("select 1/0"),
    bind_msg(),
    execute_msg(),
    parse_msg("select 'skipped until sync'"),
    SYNC,
    parse_msg("select $1::text || 'x'", ""),
    bind_msg((None,)),
    execute_msg(),
    SYNC,
]


def test_extended_protocol_byte_identical(pg_aux: devcluster.Cluster,
                                          proxy_aux: ProxyProcess) -> None:
    """Named/unnamed statements and portals, row limits, Describe, Close, Flush, an
    error before Sync: the reply stream through the proxy equals the direct one."""
    direct = _script_replies(pg_aux.port, EXTENDED_SCRIPT)
    proxied = _script_replies(proxy_aux.port, EXTENDED_SCRIPT)
    assert proxied == direct
    kinds = b"".join(k for k, _ in proxied)
    assert kinds.count(b"s") == 2  # two PortalSuspended
    assert b"E" in kinds


def test_flush_delivers_before_sync(proxy_aux: ProxyProcess) -> None:
    """Flush alone (no Sync) must get Parse/Describe replies through: drivers rely on it."""
    with RawPG(proxy_aux.port) as raw:
        raw.login(PW_USER, PW_PASSWORD)
        raw.send(parse_msg("select $1::int", "f1") + describe_msg(b"S", "f1") + FLUSH)
        raw.sock.settimeout(3)
        assert [raw.read_msg()[0] for _ in range(3)] == [b"1", b"t", b"T"]
        raw.send(SYNC)
        assert raw.read_msg()[0] == b"Z"


def test_function_call_message(pg_aux: devcluster.Cluster, proxy_aux: ProxyProcess) -> None:
    """The legacy FunctionCall message (libpq's PQfn, used by lo_* client functions)."""

    def call(port: int) -> list[tuple[bytes, bytes]]:
        with RawPG(port) as raw:
            raw.login(PW_USER, PW_PASSWORD)
            raw.send(query_msg("select 'int4pl'::regproc::oid"))
            oid = int(raw.read_until(b"Z")[1][1][6:])
            raw.send(function_call_msg(oid, (b"2", b"40")))
            return raw.read_until(b"Z")

    proxied = call(proxy_aux.port)
    assert proxied == call(pg_aux.port)
    assert proxied[0] == (b"V", struct.pack("!i", 2) + b"42")


def test_large_objects_psycopg(proxy: ProxyProcess) -> None:
    """Large objects through the server-side lo_* functions, written and read in chunks."""
    blob = os.urandom(300_000)
    with psycopg.connect(proxy.conninfo()) as conn:
        oid = conn.execute("select lo_create(0)").fetchone()[0]
        fd = conn.execute("select lo_open(%s, 131072|262144)", (oid,)).fetchone()[0]
        for i in range(0, len(blob), 65536):
            conn.execute("select lowrite(%s, %s)", (fd, blob[i : i + 65536]))
        conn.execute("select lo_lseek(%s, 0, 0)", (fd,))
        back = b"".join(conn.execute("select loread(%s, 100000)", (fd,)).fetchone()[0]
                        for _ in range(3))
        conn.execute("select lo_close(%s)", (fd,))
        conn.commit()
        assert back == blob
        assert conn.execute("select lo_get(%s)", (oid,)).fetchone()[0] == blob
        conn.execute("select lo_unlink(%s)", (oid,))
        conn.commit()


async def test_large_objects_asyncpg(proxy: ProxyProcess) -> None:
    blob = os.urandom(100_000)
    conn = await asyncpg.connect(proxy.dsn())
    try:
        oid = await conn.fetchval("select lo_from_bytea(0, $1)", blob)
        await conn.execute("select lo_put($1, 10, $2)", oid, b"XYZ")
        back = await conn.fetchval("select lo_get($1)", oid)
        assert back == blob[:10] + b"XYZ" + blob[13:]
        await conn.execute("select lo_unlink($1)", oid)
    finally:
        await conn.close()


# ---------------------------------------------------------------------- errors and notices

ERROR_CASES = [
    "select * from nonexistent_table_x",  # position
    "select foo(1)",  # hint
    "do $$begin raise exception using message = 'm', detail = 'd', hint = 'h',"
    " errcode = '22012', schema = 's', table = 't', column = 'c', constraint = 'k',"
    " datatype = 'dt'; end$$",
    "select 1 +",  # syntax error position
]


@pytest.mark.parametrize("sql", ERROR_CASES)
def test_error_fields_identical(pg: devcluster.Cluster, proxy: ProxyProcess, sql: str) -> None:
    """All diagnostic fields match a direct session (position, detail, hint, context…)."""
    fields = ("sqlstate", "severity", "severity_nonlocalized", "message_primary",
              "message_detail", "message_hint", "statement_position", "internal_position",
              "internal_query", "context", "schema_name", "table_name", "column_name",
              "datatype_name", "constraint_name", "source_function")
    seen = []
    for info in (direct_conninfo(pg), proxy.conninfo()):
        with psycopg.connect(info) as conn:
            with pytest.raises(psycopg.Error) as exc:
                conn.execute(sql)
            d = exc.value.diag
            seen.append({f: getattr(d, f) for f in fields})
    assert seen[0] == seen[1]
    assert seen[1]["sqlstate"] is not None


def test_unique_violation_detail(pg: devcluster.Cluster, proxy: ProxyProcess) -> None:
    seen = []
    for info in (direct_conninfo(pg), proxy.conninfo()):
        with psycopg.connect(info) as conn:
            conn.execute("create temp table u(i int primary key)")
            conn.execute("insert into u values (1)")
            with pytest.raises(psycopg.errors.UniqueViolation) as exc:
                conn.execute("insert into u values (1)")
            seen.append((exc.value.diag.message_detail, exc.value.diag.constraint_name))
    assert seen[0] == seen[1] == ("Key (i)=(1) already exists.", "u_pkey")


def test_error_and_notice_bytes_identical(pg_aux: devcluster.Cluster,
                                          proxy_aux: ProxyProcess) -> None:
    """ErrorResponse / NoticeResponse bytes, not just parsed fields, equal direct."""
    script = [query_msg("do $$begin raise notice 'n1' using detail = 'nd', hint = 'nh';"
                        " raise warning 'w1'; end$$"),
              query_msg("select 1/0")]
    direct = _script_replies(pg_aux.port, script)
    proxied = _script_replies(proxy_aux.port, script)
    assert proxied == direct
    kinds = [k for k, _ in proxied]
    assert kinds.count(b"N") == 2 and kinds.count(b"E") == 1
    assert error_fields(proxied[-2][1])["C"] == "22012"


def test_notices_pass_psycopg(proxy: ProxyProcess) -> None:
    notices: list[tuple[str, str, str | None]] = []
    with psycopg.connect(proxy.conninfo()) as conn:
        conn.add_notice_handler(
            lambda d: notices.append((d.severity_nonlocalized, d.message_primary, d.message_hint))
        )
        conn.execute("do $$begin raise notice 'hello %', 42 using hint = 'hi';"
                     " raise warning 'careful'; end$$")
    assert notices == [("NOTICE", "hello 42", "hi"), ("WARNING", "careful", None)]


async def test_notices_pass_asyncpg(proxy: ProxyProcess) -> None:
    conn = await asyncpg.connect(proxy.dsn())
    got: list[str] = []
    try:
        conn.add_log_listener(lambda _c, msg: got.append(msg.message))
        await conn.execute("do $$begin raise notice 'one'; raise notice 'two'; end$$")
        await conn.fetchval("select 1")  # log callbacks run from the loop
        assert got == ["one", "two"]
    finally:
        await conn.close()
