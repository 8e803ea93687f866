"""Issue 4, point 4: blind-index lookups recheck the decrypted value, so a truncation
collision never returns a wrong row.

The column under test keeps a 4-byte blind index, and the test finds two values whose
indexes collide under the column's real key (a birthday search over the keyring, as the
proxy loads it). Both are stored; a lookup of either must return only its own row, with
the client-visible shape, row count and command tag of plaintext equality. Lookups the
proxy cannot recheck are refused for such a short index.
"""

from __future__ import annotations

import asyncio
import datetime
import struct
from decimal import Decimal

import asyncpg
import psycopg
import pytest

from proxy.encryption import Encryption
from proxy.protocol.rows import decode_data_row
from tests.conftest import (
    APP_DB,
    PW_PASSWORD,
    PW_USER,
    SYNC,
    RawPG,
    bind_msg,
    describe_msg,
    execute_msg,
    parse_msg,
    query_msg,
)
from tests.integration.encryption_env import KEYS, direct, setup_sql, start_encrypted

PROTECT = {
    "public.k_tokens.tok": {"type": "text", "mode": "randomized", "search": "blind_index",
                            "index_length": 4},
    "public.k_tokens.amount": {"type": "numeric", "mode": "randomized",
                               "search": "blind_index", "index_length": 4},
}
SCHEMA = """
CREATE TABLE k_tokens (id int PRIMARY KEY, note text, tok bytea, tok_bidx bytea,
                       amount bytea, amount_bidx bytea);
GRANT SELECT ON k_tokens TO PUBLIC;
"""
COLUMNS = ["id", "note", "tok", "amount"]  # `*` never shows the blind indexes


def _colliding(proxy) -> tuple[str, str]:
    """Two distinct values whose 4-byte blind indexes are equal under the column's key."""
    enc = Encryption(PROTECT, dict(KEYS), str(proxy.dir), gate=None)
    rt = enc.columns_for("any")[("public", "k_tokens", "tok")]  # (the index is unbound)
    assert rt.blind_index is not None and rt.blind_index.length == 4
    seen: dict[bytes, str] = {}
    for i in range(4_000_000):
        value = f"T-{i:07d}"
        idx = rt.blind_index.compute(rt.codec.from_text(value.encode(), datetime.UTC))
        if idx in seen:
            return seen[idx], value
        seen[idx] = value
    raise AssertionError("no collision found")  # (2^-5000-ish: never)


def _start(cluster):
    setup_sql(cluster, SCHEMA)
    p = start_encrypted(cluster, PROTECT)
    a, b = _colliding(p)
    rows = {1: (a, "1.50"), 2: (b, "2"), 3: ("other", "1.5"), 4: (None, None)}
    with psycopg.connect(p.conninfo(), autocommit=True) as c:
        for i, (tok, amount) in rows.items():
            c.execute("INSERT INTO k_tokens (id, note, tok, amount) VALUES (%s, %s, %s, %s)",
                      (i, f"n{i}", tok, amount))
    return p, a, b


@pytest.fixture(scope="module")
def kproxy(pg):
    p, a, b = _start(pg)
    yield p, a, b
    p.stop()
    setup_sql(pg, "DROP TABLE k_tokens")


def test_the_collision_is_real(kproxy, pg) -> None:
    with direct(pg) as c:
        idx = dict(c.execute("SELECT id, tok_bidx FROM k_tokens").fetchall())
    assert idx[1] == idx[2] and idx[1] != idx[3] and idx[4] is None
    assert len(idx[1]) == 4


def test_lookups_return_only_true_matches_psycopg(kproxy) -> None:
    p, a, b = kproxy
    with psycopg.connect(p.conninfo(), autocommit=True) as c:
        for binary in (False, True):
            cur = c.cursor(binary=binary)
            for value, want in ((a, [1]), (b, [2])):
                cur.execute("SELECT id FROM k_tokens WHERE tok = %s", (value,))
                assert [r[0] for r in cur.fetchall()] == want
                assert cur.rowcount == 1  # CommandComplete's count, corrected
            cur.execute("SELECT * FROM k_tokens WHERE tok = %s", (b,))
            assert [d.name for d in cur.description] == COLUMNS  # no hidden column
            (row,) = cur.fetchall()
            assert (row[0], row[1], row[2]) == (2, "n2", b)
            cur.execute("SELECT k.id FROM k_tokens k WHERE k.tok IN (%s, %s) AND k.id > 0 "
                        "ORDER BY k.id", (a, "other"))
            assert [r[0] for r in cur.fetchall()] == [1, 3]
            cur.execute("SELECT id, note IS DISTINCT FROM 'n1' AS changed FROM k_tokens "
                        "WHERE tok = %s", (a,))
            assert cur.fetchall() == [(1, False)]
            cur.execute("SELECT id, tok FROM k_tokens WHERE tok IS NOT DISTINCT FROM %s",
                        (None,))
            assert cur.fetchall() == [(4, None)]
            # numeric equality is value equality: 1.5 finds 1.50 (the recheck agrees)
            cur.execute("SELECT id FROM k_tokens WHERE amount = %s ORDER BY id",
                        (Decimal("1.5"),))
            assert [r[0] for r in cur.fetchall()] == [1, 3]
        # literals in the simple protocol: the tag's row count is corrected too
        res = c.pgconn.exec_(f"SELECT id, note FROM k_tokens WHERE tok = '{a}'; "
                             f"SELECT id FROM k_tokens WHERE amount = 1.5".encode())
        assert res.ntuples == 2 and res.nfields == 1  # (the last result of the string)
        res = c.pgconn.exec_(f"SELECT id, note FROM k_tokens WHERE tok = '{a}'".encode())
        assert (res.ntuples, res.nfields) == (1, 2)
        assert res.get_value(0, 0) == b"1" and res.command_tuples == 1
        assert res.command_status == b"SELECT 1"


def test_lookups_return_only_true_matches_asyncpg(kproxy) -> None:
    p, a, b = kproxy

    async def run() -> None:
        conn = await asyncpg.connect(p.dsn())
        try:
            rows = await conn.fetch("SELECT id, tok FROM k_tokens WHERE tok = $1", a)
            assert [tuple(r) for r in rows] == [(1, a)]
            rows = await conn.fetch("SELECT * FROM k_tokens WHERE tok = $1", b)
            assert [list(r.keys()) for r in rows] == [COLUMNS]
            assert [r["id"] for r in rows] == [2]
            # a portal read one row per Execute: the colliding row is dropped inside a
            # batch (PortalSuspended with no row), and the cursor goes on
            for value, want in ((a, [1]), (b, [2])):
                async with conn.transaction():
                    got = [r["id"] async for r in conn.cursor(
                        "SELECT id FROM k_tokens WHERE tok = $1", value, prefetch=1)]
                assert got == want
        finally:
            await conn.close()

    asyncio.run(run())


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE k_tokens SET note = 'x' WHERE tok = %s",
        "DELETE FROM k_tokens WHERE tok = %s",
        "SELECT id FROM k_tokens WHERE tok = %s LIMIT 1",
        "SELECT count(*) FROM k_tokens WHERE tok = %s",
        "SELECT id FROM k_tokens WHERE tok <> %s",
        "SELECT id FROM k_tokens WHERE tok = %s OR id = 3",
    ],
)
def test_lookups_that_cannot_be_rechecked_are_refused(kproxy, sql) -> None:
    p, a, _ = kproxy
    with psycopg.connect(p.conninfo(), autocommit=True) as c:
        with pytest.raises(psycopg.errors.FeatureNotSupported) as info:
            c.execute(sql, (a,))
        text = str(info.value)
        assert "public.k_tokens.tok" in text and "index_length: 16" in text
        assert a not in text
        assert c.execute("SELECT note FROM k_tokens WHERE id = 1").fetchone() == ("n1",)


def test_per_column_result_formats_cover_the_hidden_column(pg_aux) -> None:
    """A Bind with one format code per result column gets one more per hidden column."""
    p, a, _ = _start(pg_aux)
    try:
        with RawPG(p.port) as raw:
            raw.login(PW_USER, PW_PASSWORD, database=APP_DB)
            raw.send(parse_msg("SELECT id, note FROM k_tokens WHERE tok = $1", oids=(25,))
                     + bind_msg((a.encode(),), result_formats=(1, 0))
                     + describe_msg(b"P") + execute_msg() + SYNC)
            replies = raw.read_until(b"Z")
        kinds = [k for k, _ in replies]
        assert kinds == [b"1", b"2", b"T", b"D", b"C", b"Z"], replies
        fields = replies[2][1]
        assert struct.unpack("!h", fields[:2])[0] == 2
        data = replies[3][1]
        assert data == struct.pack("!hii", 2, 4, 1) + struct.pack("!i", 2) + b"n1"
        assert replies[4][1] == b"SELECT 1\0"
    finally:
        p.stop()
        setup_sql(pg_aux, "DROP TABLE k_tokens")



def _bind_error(port: int, sql: str, param: bytes, formats: tuple[int, ...]) -> bytes:
    """The ErrorResponse message text of a Parse/Bind/Execute with ``formats`` (raw
    messages); then the session is checked usable."""
    with RawPG(port) as raw:
        raw.login(PW_USER, PW_PASSWORD, database=APP_DB)
        raw.send(parse_msg(sql, oids=(25,)) + bind_msg((param,), result_formats=formats)
                 + describe_msg(b"P") + execute_msg() + SYNC)
        replies = raw.read_until(b"Z")
        assert [k for k, _ in replies] == [b"1", b"E", b"Z"], replies
        fields = dict((f[:1], f[1:]) for f in replies[1][1].split(b"\0") if f)
        raw.send(query_msg("SELECT 1"))
        assert [k for k, _ in raw.read_until(b"Z")] == [b"T", b"D", b"C", b"Z"]
    assert fields[b"C"] == b"08P01"
    return fields[b"M"]


def test_result_format_count_is_checked_against_the_visible_columns(pg_aux) -> None:
    """Issue 11: the proxy adds a format code per hidden recheck column; a Bind with more
    codes than the client's columns must get PostgreSQL's own error (pquery.c) for the
    columns the client sees, not one that counts (and so reveals) the hidden column."""
    p, a, _ = _start(pg_aux)
    try:
        for formats in [(1, 0, 1), (0, 0, 0, 0), (1, 1, 1, 1, 1)]:
            got = _bind_error(p.port, "SELECT id, note FROM k_tokens WHERE tok = $1",
                              a.encode(), formats)
            assert got == (f"bind message has {len(formats)} result formats "
                           "but query has 2 columns").encode()
    finally:
        p.stop()
        setup_sql(pg_aux, "DROP TABLE k_tokens")


def _rows(raw: RawPG, sql: str, *params: bytes) -> list[list[bytes | None]]:
    """Parse/Bind/Execute/Sync with no Describe, as drivers that cache result shapes
    do: the proxy gets no RowDescription for these rows and must know them itself."""
    raw.send(parse_msg(sql) + bind_msg(params) + execute_msg() + SYNC)
    out = []
    for kind, body in raw.read_until(b"Z"):
        assert kind != b"E", body
        if kind == b"D":
            out.append(decode_data_row(body))
    return out


def test_reparsed_statement_follows_ddl(pg_aux) -> None:
    """A driver re-sending the same unnamed Parse reuses the result columns the proxy
    learnt, until DDL changes the catalog: then they are learnt again (here the table is
    replaced by one with other column positions; stale attnums would pass ciphertext)."""
    p, a, _ = _start(pg_aux)
    pg_aux.psql(f"GRANT CREATE ON SCHEMA public TO {PW_USER}; "
                f"ALTER TABLE k_tokens OWNER TO {PW_USER}", db=APP_DB)
    sql = "SELECT * FROM k_tokens WHERE id = $1"
    try:
        with RawPG(p.port) as raw:
            raw.login(PW_USER, PW_PASSWORD, database=APP_DB)
            for _ in range(3):
                (row,) = _rows(raw, sql, b"1")
                assert row == [b"1", b"n1", a.encode(), b"1.50"]
            raw.send(query_msg(
                "ALTER TABLE k_tokens RENAME TO k_tokens_old; CREATE TABLE k_tokens "
                "(note text, amount bytea, amount_bidx bytea, tok_bidx bytea, tok bytea, "
                "id int PRIMARY KEY); INSERT INTO k_tokens (id, note, tok) "
                "VALUES (1, 'new', 'replaced')"))
            assert b"E" not in [k for k, _ in raw.read_until(b"Z")]
            for _ in range(2):
                (row,) = _rows(raw, sql, b"1")
                assert row == [b"new", None, b"replaced", b"1"]
    finally:
        p.stop()
        pg_aux.psql("DROP TABLE IF EXISTS k_tokens, k_tokens_old; "
                    f"REVOKE CREATE ON SCHEMA public FROM {PW_USER}", db=APP_DB)


def test_sqlalchemy_lookups_are_rechecked(kproxy) -> None:
    """ORM-style lookups (SQLAlchemy Core over psycopg and asyncpg, which cast the bound
    value, `$1::VARCHAR`) return only true matches; `.limit(1)` on the short index is
    refused, as documented."""
    import sqlalchemy as sa
    from sqlalchemy.ext.asyncio import create_async_engine

    p, a, b = kproxy
    t = sa.Table("k_tokens", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                 sa.Column("note", sa.Text), sa.Column("tok", sa.String),
                 sa.Column("amount", sa.Numeric))
    eng = sa.create_engine(p.dsn().replace("postgresql://", "postgresql+psycopg://"))
    try:
        with eng.connect() as c:
            for value, want in ((a, 1), (b, 2)):
                assert c.execute(sa.select(t.c.id).where(t.c.tok == value)).scalar_one() == want
            rows = c.execute(sa.select(t).where(t.c.tok.in_([a, "other"])).order_by(t.c.id))
            assert [(r.id, r.tok) for r in rows] == [(1, a), (3, "other")]
            with pytest.raises(sa.exc.NotSupportedError, match="index_length: 16"):
                c.execute(sa.select(t.c.id).where(t.c.tok == a).limit(1))
    finally:
        eng.dispose()

    async def via_asyncpg() -> None:
        ae = create_async_engine(p.dsn().replace("postgresql://", "postgresql+asyncpg://")
                                 .replace("?sslmode=disable", "?ssl=disable"))
        try:
            async with ae.connect() as c:
                for value, want in ((a, 1), (b, 2)):
                    res = await c.execute(sa.select(t.c.id, t.c.note).where(t.c.tok == value))
                    assert [tuple(r) for r in res] == [(want, f"n{want}")]
        finally:
            await ae.dispose()

    asyncio.run(via_asyncpg())
