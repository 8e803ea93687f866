"""Issue 4, point 2: apps see the logical type, through every driver, in both formats.

The oracle is PostgreSQL itself: ``t_plain`` has the real types and the same rows as
``t_enc`` (all ``bytea``, every column protected). Each driver reads ``t_plain``
directly and ``t_enc`` through the proxy, with the same non-UTC TimeZone, and must get
identical values, types and result shapes. Rows are written through the proxy by each
driver in turn (text parameters, binary parameters, asyncpg codecs, SQLAlchemy).
"""

from __future__ import annotations

import asyncio
import datetime
import decimal
import os
import struct
import subprocess
from typing import Any

import asyncpg
import psycopg
import pytest
from psycopg.types.datetime import DateBinaryLoader, DateLoader

from tests.integration.encryption_env import direct, setup_sql, start_encrypted

COLS = ["c_text", "c_varchar", "c_numeric", "c_int4", "c_int8", "c_date", "c_ts", "c_bool",
        "c_uuid", "c_jsonb"]
TYPES = ["text", "varchar", "numeric", "int4", "int8", "date", "timestamptz", "bool", "uuid",
         "jsonb"]
PROTECT = {f"public.t_enc.{c}": {"type": t} for c, t in zip(COLS, TYPES, strict=True)}
PROTECT["public.t_enc.c_text"] = {"type": "text", "mode": "deterministic"}

TZ = "America/St_Johns"  # UTC-03:30 / -02:30: a non-integral, DST-observing offset

SCHEMA = f"""
CREATE TABLE t_plain (id int PRIMARY KEY, {", ".join(
    f"{c} {t}" for c, t in zip(COLS, TYPES, strict=True))});
CREATE TABLE t_enc (id int PRIMARY KEY, {", ".join(f"{c} bytea" for c in COLS)});
"""

# Text literals, one row each; the same strings go to t_plain (directly) and to t_enc.
ROWS: list[tuple[Any, ...]] = [
    (1, "", "ünïcødé ✓ 𝄞 \"quoted\" \\ back", "NaN", "-2147483648", "-9223372036854775808",
     "-infinity", "2024-02-29 13:45:12.123456+05:30", "true",
     "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", '{"a": [1, 2, {"b": null}], "c": "ü", "d": 1.50}'),
    (2, "plain text", "", "Infinity", "2147483647", "9223372036854775807", "infinity",
     "1999-12-31 23:59:59.999999-08", "false", "00000000-0000-0000-0000-000000000000",
     '[]'),
    (3, " lead and trail ", "tab\there", "-Infinity", "0", "0", "2000-02-29",
     "2024-07-01 00:00:00+00", "true", "ffffffff-ffff-ffff-ffff-ffffffffffff",
     '{"nested": {"deeper": {"deepest": [true, false, "x", 1e3]}}, "": ""}'),
    (4, "x" * 3000, "q", "123456789012345678901234567890.123456789012345678901234567890",
     "-1", "-1", "0002-03-04", "2038-01-19 03:14:07.5+00", "false",
     "12345678-1234-5678-1234-567812345678", '"just a string"'),
    (5, "0.10", "-0", "-0.000000000000000000001", "42", "4294967296", "1970-01-01",
     "1970-01-01 00:00:00+00", "true", "11111111-2222-3333-4444-555555555555", "null"),
    (6, None, None, None, None, None, None, None, None, None, None),
]
BASE_IDS = [r[0] for r in ROWS]
SQL_COLS = ", ".join(["id", *COLS])
PARAMS = ", ".join(["%s"] * (len(COLS) + 1))


class InfDateLoader(DateLoader):
    """psycopg cannot represent infinity dates by default; map them as its docs show."""

    def load(self, data: Any) -> datetime.date:
        if data == b"infinity":
            return datetime.date.max
        if data == b"-infinity":
            return datetime.date.min
        return super().load(data)


class InfDateBinaryLoader(DateBinaryLoader):
    def load(self, data: Any) -> datetime.date:
        v = struct.unpack("!i", data)[0]
        if v == 0x7FFFFFFF:
            return datetime.date.max
        if v == -0x80000000:
            return datetime.date.min
        return super().load(data)


def _conn(conninfo: str) -> psycopg.Connection:
    conn = psycopg.connect(conninfo, autocommit=True, options=f"-c TimeZone={TZ}")
    conn.adapters.register_loader("date", InfDateLoader)
    conn.adapters.register_loader("date", InfDateBinaryLoader)
    return conn


def _norm(v: Any) -> Any:
    """Values comparable with ==: NaN decimals compare unequal to themselves."""
    if isinstance(v, decimal.Decimal):
        return ("dec", str(v))
    if isinstance(v, list | tuple):
        return tuple(_norm(x) for x in v)
    return v


@pytest.fixture(scope="module")
def tproxy(pg):
    setup_sql(pg, SCHEMA)
    p = start_encrypted(pg, PROTECT)
    with direct(pg) as d:
        d.cursor().executemany(f"INSERT INTO t_plain ({SQL_COLS}) VALUES ({PARAMS})", ROWS)
    with _conn(p.conninfo()) as c:  # text-format parameters (strings)
        c.cursor().executemany(f"INSERT INTO t_enc ({SQL_COLS}) VALUES ({PARAMS})", ROWS)
    yield p
    p.stop()
    setup_sql(pg, "DROP TABLE t_plain, t_enc")


def _read_psycopg(conninfo: str, table: str, binary: bool) -> tuple[list, list]:
    with _conn(conninfo) as c, c.cursor(binary=binary) as cur:
        cur.execute(f"SELECT {SQL_COLS} FROM {table} ORDER BY id")
        rows = cur.fetchall()
        shape = [(d.name, d.type_code) for d in cur.description]
    return [_norm(r) for r in rows], shape


def test_psycopg_text_and_binary_round_trip(pg, tproxy) -> None:
    # Binary-format writes: the values psycopg loads from t_plain, written as %b.
    with _conn(pg.dsn(db="app") + "?sslmode=disable") as d:
        src = d.cursor(binary=True).execute(
            f"SELECT {SQL_COLS} FROM t_plain WHERE id < 10 ORDER BY id").fetchall()
    # date.max/min stand for ±infinity on read; write those rows' dates as text. The
    # same Python values go to t_plain directly: the oracle sees what psycopg sent.
    for target in (pg.dsn(db="app") + "?sslmode=disable", tproxy.conninfo()):
        table = "t_enc" if target == tproxy.conninfo() else "t_plain"
        with _conn(target) as c, c.cursor(binary=True) as cur:
            for row in src:
                row = list(row)
                row[0] += 10
                row[10] = psycopg.types.json.Jsonb(row[10]) if row[10] is not None else None
                if row[6] in (datetime.date.max, datetime.date.min):
                    row[6] = None
                cur.execute(f"INSERT INTO {table} ({SQL_COLS}) VALUES "
                            f"({', '.join(['%b'] * len(row))})", row)
            cur.execute(f"UPDATE {table} SET c_date = %s WHERE id = 11", ("-infinity",))
            cur.execute(f"UPDATE {table} SET c_date = %t WHERE id = 12", ("infinity",))
    for binary in (False, True):
        want, want_shape = _read_psycopg(pg.dsn(db="app") + "?sslmode=disable", "t_plain",
                                         binary)
        got, got_shape = _read_psycopg(tproxy.conninfo(), "t_enc", binary)
        assert got_shape == want_shape
        assert len(got) == len(want) >= 12
        for g, w in zip(got, want, strict=True):
            assert g == w


def test_psql_text_output_is_identical(pg, tproxy) -> None:
    env = {**os.environ, "PGTZ": TZ, "PGPASSWORD": "app-secret", "PGSSLMODE": "disable"}
    psql = str(pg.bindir / "psql")

    def run(port: int, table: str) -> str:
        res = subprocess.run(
            [psql, "-XAt", "-h", "127.0.0.1", "-p", str(port), "-U", "app", "-d", "app",
             "-c", f"SELECT {SQL_COLS} FROM {table} WHERE id < 10 ORDER BY id"],
            env=env, capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, res.stderr
        return res.stdout

    want = run(pg.port, "t_plain")
    got = run(tproxy.port, "t_enc")
    assert got == want
    assert "ünïcødé ✓ 𝄞" in got and "-infinity" in got and "NaN" in got


def test_asyncpg_binary_codecs_and_parameter_types(pg, tproxy) -> None:
    async def go() -> None:
        settings = {"TimeZone": TZ}
        d = await asyncpg.connect(pg.dsn(db="app"), ssl=False, server_settings=settings)
        c = await asyncpg.connect(tproxy.dsn(), server_settings=settings)
        try:
            ins = await c.prepare(f"INSERT INTO t_enc ({SQL_COLS}) VALUES "
                                  f"({', '.join(f'${i}' for i in range(1, len(COLS) + 2))})")
            assert [t.name for t in ins.get_parameters()] == ["int4", *TYPES]
            src = await d.fetch(f"SELECT {SQL_COLS} FROM t_plain WHERE id < 10 ORDER BY id")
            for r in src:
                await ins.fetch(r[0] + 20, *list(r)[1:])
            await d.execute(f"INSERT INTO t_plain ({SQL_COLS}) SELECT id + 20, "
                            f"{', '.join(COLS)} FROM t_plain WHERE id < 10")
            sel = await c.prepare(f"SELECT {SQL_COLS} FROM t_enc ORDER BY id")
            dsel = await d.prepare(f"SELECT {SQL_COLS} FROM t_plain ORDER BY id")
            assert [(a.name, a.type.name) for a in sel.get_attributes()] == \
                [(a.name, a.type.name) for a in dsel.get_attributes()]
            got = [_norm(tuple(r)) for r in await sel.fetch()]
            want = [_norm(tuple(r)) for r in await dsel.fetch()]
            assert len(got) == len(want) >= 18
            for g, w in zip(got, want, strict=True):
                assert g == w
            # A parameter compared with a deterministic column reports its logical type.
            eq = await c.prepare("SELECT id FROM t_enc WHERE c_text = $1 ORDER BY id")
            assert [t.name for t in eq.get_parameters()] == ["text"]
            assert [r[0] for r in await eq.fetch("plain text")] == [2, 12, 22]
        finally:
            await c.close()
            await d.close()

    asyncio.run(go())


def test_result_shapes_unchanged(pg, tproxy) -> None:
    sql = "SELECT c_int4, id, c_text AS renamed, c_jsonb, c_text FROM t_enc WHERE id = 1"
    with direct(pg) as d:
        d_cur = d.execute(sql)
        want = [d.name for d in d_cur.description]
        plain = d.execute(sql.replace("t_enc", "t_plain"))
        want_types = [d.type_code for d in plain.description]
    with psycopg.connect(tproxy.conninfo()) as c:
        cur = c.execute(sql)
        assert [d.name for d in cur.description] == want
        assert [d.type_code for d in cur.description] == want_types
        assert len(cur.fetchone()) == 5


def test_sqlalchemy_psycopg_and_asyncpg(pg, tproxy) -> None:
    import sqlalchemy as sa
    from sqlalchemy.dialects import postgresql as pgt
    from sqlalchemy.ext.asyncio import create_async_engine

    md = sa.MetaData()
    types = [sa.Text, sa.String, sa.Numeric, sa.Integer, sa.BigInteger, sa.Date,
             sa.DateTime(timezone=True), sa.Boolean, sa.Uuid, pgt.JSONB]

    def table(name: str) -> sa.Table:
        return sa.Table(name, md, sa.Column("id", sa.Integer, primary_key=True),
                        *(sa.Column(c, t) for c, t in zip(COLS, types, strict=True)))

    enc, plain = table("t_enc"), table("t_plain")
    args = {"options": f"-c TimeZone={TZ}"}
    p_eng = sa.create_engine(tproxy.dsn().replace("postgresql://", "postgresql+psycopg://"),
                             connect_args=args)
    d_eng = sa.create_engine(
        (pg.dsn(db="app") + "?sslmode=disable").replace("postgresql://", "postgresql+psycopg://"),
        connect_args=args)
    try:
        with d_eng.begin() as d:
            # psycopg (without the test's loader) cannot read infinity dates: skip them.
            src = d.execute(sa.select(plain).where(plain.c.id < 10)
                            .where(sa.or_(plain.c.c_date.is_(None),
                                          sa.func.isfinite(plain.c.c_date)))).mappings().all()
        with p_eng.begin() as c:
            c.execute(sa.insert(enc), [{**r, "id": r["id"] + 30} for r in src])
        with d_eng.begin() as d:
            d.execute(sa.insert(plain), [{**r, "id": r["id"] + 30} for r in src])
        with d_eng.connect() as d, p_eng.connect() as c:
            want = [_norm(tuple(r)) for r in d.execute(
                sa.select(plain).where(plain.c.id > 30).order_by(plain.c.id))]
            got = [_norm(tuple(r)) for r in c.execute(
                sa.select(enc).where(enc.c.id > 30).order_by(enc.c.id))]
            assert got == want and len(got) >= 4
    finally:
        p_eng.dispose()
        d_eng.dispose()

    async def via_asyncpg() -> None:
        settings = {"server_settings": {"TimeZone": TZ}}
        ae = create_async_engine(tproxy.dsn().replace("postgresql://", "postgresql+asyncpg://")
                                 .replace("?sslmode=disable", "?ssl=disable"),
                                 connect_args=settings)
        ad = create_async_engine((pg.dsn(db="app") + "?ssl=disable")
                                 .replace("postgresql://", "postgresql+asyncpg://"),
                                 connect_args=settings)
        try:
            async with ae.begin() as c:
                await c.execute(sa.insert(enc), [{**r, "id": r["id"] + 40} for r in src])
                got = [_norm(tuple(r)) for r in await c.execute(
                    sa.select(enc).where(enc.c.id > 40).order_by(enc.c.id))]
            async with ad.begin() as d:
                await d.execute(sa.insert(plain), [{**r, "id": r["id"] + 40} for r in src])
                want = [_norm(tuple(r)) for r in await d.execute(
                    sa.select(plain).where(plain.c.id > 40).order_by(plain.c.id))]
            assert got == want and len(got) >= 4
        finally:
            await ae.dispose()
            await ad.dispose()

    asyncio.run(via_asyncpg())
