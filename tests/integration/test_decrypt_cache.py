"""The decrypt cache (`keys.decrypt_cache_size`) against a real PostgreSQL.

Every read here happens more than once, so the second and later ones are answered from
the cache; each test then checks that what the cache may not do, it does not: a stored
value tampered with (or copied from another column) after it was cached fails with XX001,
masked and plaintext roles of one proxy keep apart, timestamptz text follows `SET
TimeZone` mid-session (also through a prepared statement), and after a key is retired and
the proxy reloaded, values under it still read (a retired key still decrypts) and new
writes go under the primary. The same reads run with the cache off, and must give the
same answers.
"""

from __future__ import annotations

import asyncio
import datetime
from typing import Any

import asyncpg
import psycopg
import pytest

from keys import cli_ops
from keys.providers.local import LocalKekProvider
from tests.integration.encryption_env import direct, setup_sql, start_encrypted

PROTECT = {
    "public.dc_cards.pan": {"type": "text", "mask": "last4"},
    "public.dc_cards.cvv": {"type": "text"},
    "public.dc_cards.bal": {"type": "numeric"},
    "public.dc_cards.at": {"type": "timestamptz"},
}
SCHEMA = "CREATE TABLE dc_cards (id int PRIMARY KEY, pan bytea, cvv bytea, bal bytea, at bytea);"
ROLES = {"dc_plain": "plaintext", "dc_masked": "masked"}
POLICY = {
    "roles": {
        "app": {"tables": {"public.*": ["select", "insert", "update", "delete"]},
                "allow": ["ddl", "set_role"]},
        **{r: {"tables": {"public.dc_cards": ["select"]},
               "columns": {"public.dc_cards.pan": view}} for r, view in ROLES.items()},
    },
    "default": "deny",
}
ROWS = [(i, f"41110000000022{i:02d}", f"{i:03d}", f"{i * 1000}.{i:02d}",
         f"2024-0{i}-1{i} 0{i}:34:56.78{i}+00") for i in range(1, 6)]
SELECT = "SELECT id, pan, cvv, bal, at FROM dc_cards ORDER BY id"


@pytest.fixture(scope="module", params=[None, 0], ids=["cache", "no-cache"])
def dproxy(request: Any, pg: Any) -> Any:
    setup_sql(pg, SCHEMA)
    for r in ROLES:
        pg.psql(f"DROP ROLE IF EXISTS {r}; CREATE ROLE {r} LOGIN PASSWORD '{r}-pw'")
    pg.psql("GRANT SELECT ON dc_cards TO " + ", ".join(ROLES), db="app")
    p = start_encrypted(pg, PROTECT, POLICY, start=False)
    if request.param is not None:
        p.config["keys"]["decrypt_cache_size"] = request.param
    p.start()
    try:
        with psycopg.connect(p.conninfo(), autocommit=True) as c:
            with c.cursor() as cur:
                cur.executemany("INSERT INTO dc_cards VALUES (%s, %s, %s, %s, %s)", ROWS)
        yield p
    finally:
        p.stop()
        setup_sql(pg, "DROP TABLE dc_cards")
        pg.psql("DROP ROLE " + ", ".join(ROLES))


def _expected(tz: datetime.tzinfo = datetime.UTC) -> list[tuple[Any, ...]]:
    from decimal import Decimal

    return [(i, pan, cvv, Decimal(bal), datetime.datetime.fromisoformat(at).astimezone(tz))
            for i, pan, cvv, bal, at in ROWS]


def _read_all_ways(p: Any, user: str = "app", password: str | None = None) -> None:
    kw = {"user": user, "password": password} if password else {}
    with psycopg.connect(p.conninfo(**kw), autocommit=True) as c:
        for _ in range(3):
            assert c.execute(SELECT).fetchall() == _expected()
            with c.cursor(binary=True) as cur:
                assert cur.execute(SELECT).fetchall() == _expected()

    async def via_asyncpg() -> None:
        conn = await asyncpg.connect(p.dsn(**kw))
        try:
            for _ in range(3):
                got = [tuple(r) for r in await conn.fetch(SELECT)]
                assert got == _expected()
        finally:
            await conn.close()

    asyncio.run(via_asyncpg())


def _xx001(c: psycopg.Connection, sql: str, binary: bool) -> None:
    with pytest.raises(psycopg.Error) as info, c.cursor(binary=binary) as cur:
        cur.execute(sql).fetchall()
    assert info.value.diag.sqlstate == "XX001", info.value


def test_tampered_and_moved_values_fail_after_being_cached(pg: Any, dproxy: Any) -> None:
    _read_all_ways(dproxy)  # every value read (and cached) in text and binary
    with direct(pg) as d:
        saved = d.execute("SELECT id, pan, cvv FROM dc_cards ORDER BY id").fetchall()
        try:
            d.execute("UPDATE dc_cards SET pan = set_byte(pan, 30, get_byte(pan, 30) # 1) "
                      "WHERE id = 1")
            d.execute("UPDATE dc_cards SET cvv = (SELECT pan FROM dc_cards WHERE id = 2) "
                      "WHERE id = 3")  # a cached pan, now in the cvv column
            d.execute("UPDATE dc_cards SET pan = (SELECT cvv FROM dc_cards WHERE id = 4) "
                      "WHERE id = 4")  # a cached cvv, now in the pan column
            with psycopg.connect(dproxy.conninfo(), autocommit=True) as c:
                for binary in (False, True):
                    _xx001(c, "SELECT pan FROM dc_cards WHERE id = 1", binary)
                    _xx001(c, "SELECT cvv FROM dc_cards WHERE id = 3", binary)
                    _xx001(c, "SELECT pan FROM dc_cards WHERE id = 4", binary)
                    _xx001(c, SELECT, binary)
                    assert c.execute("SELECT pan, cvv FROM dc_cards WHERE id = 2"
                                     ).fetchone() == (ROWS[1][1], ROWS[1][2])
        finally:
            with d.cursor() as cur:
                cur.executemany("UPDATE dc_cards SET pan = %s, cvv = %s WHERE id = %s",
                                [(pan, cvv, i) for i, pan, cvv in saved])
    _read_all_ways(dproxy)


def test_masked_and_plaintext_roles_keep_apart(dproxy: Any) -> None:
    want = {"dc_plain": [r[1] for r in ROWS], "dc_masked": ["*" * 12 + r[1][-4:] for r in ROWS]}
    conns = {r: psycopg.connect(dproxy.conninfo(user=r, password=f"{r}-pw"), autocommit=True)
             for r in ROLES}
    try:
        for order in (("dc_plain", "dc_masked"), ("dc_masked", "dc_plain")) * 2:
            for r in order:
                for binary in (False, True):
                    with conns[r].cursor(binary=binary) as cur:
                        got = [v for (v,) in cur.execute(
                            "SELECT pan FROM dc_cards ORDER BY id").fetchall()]
                    assert got == want[r], (r, binary)
    finally:
        for c in conns.values():
            c.close()


def test_timestamptz_text_follows_set_timezone(pg: Any, dproxy: Any) -> None:
    """Text output is PostgreSQL's own for the session TimeZone at the time of the read,
    however often the same values were read before in another zone; also through one
    prepared statement, whose result plan (and revealer) outlives the SET."""
    zones = ["UTC", "Asia/Kolkata", "America/St_Johns", "UTC", "Asia/Kolkata"]
    sql = b"SELECT id, at FROM dc_cards WHERE id > $1 ORDER BY id"
    with direct(pg) as d, psycopg.connect(dproxy.conninfo(), autocommit=True) as c:
        d.execute("CREATE TEMP TABLE ts_ref (id int, at timestamptz)")
        with d.cursor() as cur:
            cur.executemany("INSERT INTO ts_ref VALUES (%s, %s)", [(r[0], r[4]) for r in ROWS])
        c.pgconn.prepare(b"ts", sql)
        for zone in zones:
            d.execute(f"SET TimeZone = '{zone}'")
            want = [(i, v.encode()) for i, v in
                    d.execute("SELECT id, at::text FROM ts_ref ORDER BY id").fetchall()]
            c.execute(f"SET TimeZone = '{zone}'")
            # the text cells as sent, not as psycopg parses them
            for res in (c.pgconn.exec_(sql.replace(b"$1", b"0")),
                        c.pgconn.exec_prepared(b"ts", [b"0"]),
                        c.pgconn.exec_prepared(b"ts", [b"0"])):
                got = [(int(res.get_value(i, 0)), res.get_value(i, 1))
                       for i in range(res.ntuples)]
                assert got == want, zone


def test_retired_key_still_answers_after_reload(pg: Any, dproxy: Any) -> None:
    """Rotation: values cached under a key that is then retired (and the proxy reloaded)
    still read in new sessions, and so do values re-sealed under the new key."""
    _read_all_ways(dproxy)
    ring, kek = dproxy.dir / "keyring.json", dproxy.dir / "dev.kek"
    old = next(k["id"] for k in cli_ops.show(ring)
               if k["column"] == "public.dc_cards.cvv" and k["purpose"] == "encrypt")
    new = cli_ops.add(ring, LocalKekProvider(kek), "public.dc_cards.cvv")
    cli_ops.promote(ring, new, LocalKekProvider(kek))
    dproxy.reload()
    with psycopg.connect(dproxy.conninfo(), autocommit=True) as c:
        assert c.execute(SELECT).fetchall() == _expected()  # old key still decrypt-only
        c.execute("UPDATE dc_cards SET cvv = %s WHERE id = 5", (ROWS[4][2],))  # new key
    cli_ops.retire(ring, old, LocalKekProvider(kek))
    dproxy.reload()
    try:
        with psycopg.connect(dproxy.conninfo(), autocommit=True) as c:
            for binary in (False, True):
                with c.cursor(binary=binary) as cur:
                    assert cur.execute("SELECT cvv FROM dc_cards WHERE id = 1"
                                       ).fetchone() == (ROWS[0][2],)
                with c.cursor(binary=binary) as cur:
                    assert cur.execute("SELECT cvv, pan FROM dc_cards WHERE id = 5"
                                       ).fetchone() == (ROWS[4][2], ROWS[4][1])
    finally:
        # the module's rows back under the live key, for the tests that follow
        with psycopg.connect(dproxy.conninfo(), autocommit=True) as c, c.cursor() as cur:
            cur.executemany("UPDATE dc_cards SET cvv = %s WHERE id = %s",
                            [(r[2], r[0]) for r in ROWS])
    _read_all_ways(dproxy)
