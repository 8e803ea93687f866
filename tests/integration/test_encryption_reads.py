"""Issue 4, points 3 and 4: decryption wherever a value comes back, and equality search.

Every read is compared with the plaintext the test wrote. Equality searches are checked
against the row sets plaintext equality gives (computed in Python from the same data).
"""

from __future__ import annotations

import asyncio
import io

import asyncpg
import psycopg
import pytest

from tests.integration.encryption_env import setup_sql, start_encrypted

PROTECT = {
    "public.r_cards.pan": {"type": "text", "mode": "randomized", "search": "blind_index"},
    "public.r_cards.expiry": {"type": "date"},
    "public.r_accounts.iban": {"type": "text", "mode": "deterministic", "join_group": "iban"},
    "public.r_transfers.iban": {"type": "text", "mode": "deterministic", "join_group": "iban"},
    "public.r_accounts.balance": {"type": "numeric"},
}

SCHEMA = """
CREATE TABLE r_cards (id int PRIMARY KEY, account_id int, holder text, pan bytea,
                      pan_bidx bytea, expiry bytea);
CREATE TABLE r_accounts (id int PRIMARY KEY, iban bytea, balance bytea);
CREATE TABLE r_transfers (id int PRIMARY KEY, iban bytea, amount int);
"""

CARDS = {i: (i % 3 + 1, f"holder{i}", f"4000{i:012d}" if i != 7 else None,
             f"2030-0{i % 9 + 1}-1{i % 9}") for i in range(1, 10)}
CARDS[5] = (2, "holder5", CARDS[2][2], None)  # a duplicate PAN: equality finds both
ACCOUNTS = {1: ("DE01", "10.50"), 2: ("DE02", "-3"), 3: ("DE03", None)}
TRANSFERS = {1: ("DE01", 5), 2: ("DE01", 6), 3: ("DE03", 7), 4: ("XX99", 8)}


@pytest.fixture(scope="module")
def rproxy(pg):
    setup_sql(pg, SCHEMA)
    p = start_encrypted(pg, PROTECT)
    with psycopg.connect(p.conninfo(), autocommit=True) as c:
        for i, (acc, holder, pan, exp) in CARDS.items():
            c.execute("INSERT INTO r_cards (id, account_id, holder, pan, expiry) "
                      "VALUES (%s, %s, %s, %s, %s)", (i, acc, holder, pan, exp))
        for i, (iban, bal) in ACCOUNTS.items():
            c.execute("INSERT INTO r_accounts (id, iban, balance) VALUES (%s, %s, %s)",
                      (i, iban, bal))
        for i, (iban, amount) in TRANSFERS.items():
            c.execute("INSERT INTO r_transfers (id, iban, amount) VALUES (%s, %s, %s)",
                      (i, iban, amount))
        # Views created through the proxy (the catalog reloads after DDL) ...
        c.execute("CREATE VIEW r_v AS SELECT id, pan AS card, holder FROM r_cards")
        c.execute("CREATE VIEW r_vv AS SELECT card, id FROM r_v WHERE id > 2")
    # ... and one the proxy cannot trace, made by a DBA directly.
    setup_sql(pg, "CREATE VIEW r_opaque AS SELECT id, substring(pan from 1 for 4) AS p4 "
                  "FROM r_cards")
    yield p
    p.stop()
    setup_sql(pg, "DROP TABLE r_cards, r_accounts, r_transfers CASCADE")


def pans(ids) -> list:
    return [CARDS[i][2] for i in ids]


READS = [
    ("SELECT pan FROM r_cards ORDER BY id", pans(range(1, 10))),
    ("SELECT c.pan AS p, c.holder FROM r_cards c WHERE c.id < 3 ORDER BY c.id",
     [(CARDS[1][2], "holder1"), (CARDS[2][2], "holder2")]),
    ("SELECT s.x FROM (SELECT pan AS x, id FROM r_cards) s ORDER BY s.id", pans(range(1, 10))),
    ("WITH w AS (SELECT id, pan FROM r_cards WHERE id <= 3) SELECT pan FROM w ORDER BY id",
     pans([1, 2, 3])),
    ("SELECT c.pan, a.iban, a.balance FROM r_cards c JOIN r_accounts a ON a.id = c.account_id "
     "WHERE c.id IN (1, 2, 3) ORDER BY c.id",
     [(CARDS[i][2], ACCOUNTS[CARDS[i][0]][0], ACCOUNTS[CARDS[i][0]][1]) for i in (1, 2, 3)]),
    ("SELECT (SELECT pan FROM r_cards WHERE id = 4)", [CARDS[4][2]]),
    ("SELECT card FROM r_v ORDER BY id", pans(range(1, 10))),
    ("SELECT * FROM r_vv ORDER BY id", [(CARDS[i][2], i) for i in range(3, 10)]),
    ("SELECT v.card, c.expiry FROM r_v v JOIN r_cards c USING (id) WHERE id = 1",
     [(CARDS[1][2], CARDS[1][3])]),
]


def _flat(rows):
    return [r[0] if len(r) == 1 else tuple(r) for r in rows]


def _text(v):
    return None if v is None else str(v)


@pytest.mark.parametrize(("sql", "want"), READS, ids=[r[0][:60] for r in READS])
def test_reads_decrypt_psycopg_text_and_binary(rproxy, sql, want) -> None:
    with psycopg.connect(rproxy.conninfo()) as c:
        for binary in (False, True):
            got = _flat(c.cursor(binary=binary).execute(sql).fetchall())
            norm = [tuple(_text(x) for x in g) if isinstance(g, tuple) else _text(g)
                    for g in got]
            assert norm == [tuple(_text(x) for x in w) if isinstance(w, tuple) else w
                            for w in want]


def test_reads_decrypt_asyncpg(rproxy) -> None:
    async def go() -> None:
        c = await asyncpg.connect(rproxy.dsn())
        try:
            for sql, want in READS:
                got = [r[0] if len(r) == 1 else tuple(r) for r in await c.fetch(sql)]
                norm = [tuple(_text(x) for x in g) if isinstance(g, tuple) else _text(g)
                        for g in got]
                assert norm == [tuple(_text(x) for x in w) if isinstance(w, tuple) else w
                                for w in want], sql
            # cursor with a small prefetch: portals executed with a row limit
            async with c.transaction():
                rows = [r["pan"] async for r in
                        c.cursor("SELECT pan FROM r_cards ORDER BY id", prefetch=2)]
            assert rows == pans(range(1, 10))
            cur_rows = []
            async with c.transaction():
                cur = await c.cursor("SELECT id, pan FROM r_cards ORDER BY id")
                cur_rows += await cur.fetch(4)
                cur_rows += await cur.fetch(10)
            assert [r["pan"] for r in cur_rows] == pans(range(1, 10))
        finally:
            await c.close()

    asyncio.run(go())


def test_returning_and_server_side_cursor(rproxy) -> None:
    with psycopg.connect(rproxy.conninfo()) as c:
        got = c.execute("INSERT INTO r_cards (id, pan, expiry) VALUES (100, %s, '2029-01-02') "
                        "RETURNING pan, expiry, id", ("4999000000000100",)).fetchone()
        assert (got[0], str(got[1]), got[2]) == ("4999000000000100", "2029-01-02", 100)
        got = c.execute("UPDATE r_cards SET pan = '4999000000000101' WHERE id = 100 "
                        "RETURNING pan").fetchone()
        assert got == ("4999000000000101",)
        got = c.execute("DELETE FROM r_cards WHERE id = 100 RETURNING pan, holder").fetchone()
        assert got == ("4999000000000101", None)
        c.commit()
        for binary in (False, True):
            with c.cursor(name=f"sc{binary}", binary=binary) as cur:
                cur.itersize = 2
                cur.execute("SELECT id, pan FROM r_cards ORDER BY id")
                assert [r[1] for r in cur] == pans(range(1, 10))
        c.commit()
        # SQL-level cursor: FETCH returns the DECLAREd query's columns.
        c.execute("DECLARE k CURSOR FOR SELECT pan FROM r_cards ORDER BY id")
        first = c.execute("FETCH 3 FROM k").fetchall()
        rest = c.execute("FETCH ALL FROM k").fetchall()
        assert [r[0] for r in first + rest] == pans(range(1, 10))
        c.rollback()


UNTRACEABLE = [
    "SELECT pan FROM r_cards UNION SELECT holder FROM r_cards",
    "SELECT pan FROM r_cards UNION ALL SELECT pan FROM r_cards",
    "SELECT coalesce(pan, 'none') FROM r_cards",
    "SELECT pan || '' FROM r_cards",
    "SELECT CASE WHEN id > 1 THEN pan END FROM r_cards",
    "SELECT upper(card) FROM r_v",
]


@pytest.mark.parametrize("sql", UNTRACEABLE)
def test_untraceable_result_is_an_error(rproxy, sql) -> None:
    with psycopg.connect(rproxy.conninfo(), autocommit=True) as c:
        with pytest.raises(psycopg.Error) as info:
            c.execute(sql).fetchall()
        assert info.value.diag.sqlstate == "0A000"
        assert "encrypted" in info.value.diag.message_primary
        assert c.execute("SELECT 1").fetchone() == (1,)


def test_opaque_view_is_refused_not_ciphertext(rproxy) -> None:
    with psycopg.connect(rproxy.conninfo(), autocommit=True) as c:
        with pytest.raises(psycopg.Error) as info:
            c.execute("SELECT p4 FROM r_opaque").fetchall()
        assert info.value.diag.sqlstate == "0A000"
        assert "r_opaque" in info.value.diag.message_primary
        assert c.execute("SELECT 1").fetchone() == (1,)


def test_copy_to_stdout_decrypts(rproxy) -> None:
    with psycopg.connect(rproxy.conninfo()) as c:
        for sql in ("COPY r_cards (id, pan, expiry) TO STDOUT",
                    "COPY (SELECT id, pan, expiry FROM r_cards) TO STDOUT WITH (FORMAT csv)"):
            buf = io.BytesIO()
            with c.cursor().copy(sql) as cp:
                for chunk in cp:
                    buf.write(chunk)
            lines = buf.getvalue().decode().splitlines()
            sep = "," if "csv" in sql else "\t"
            got = {int(line.split(sep)[0]): line.split(sep)[1] for line in lines}
            null = "" if "csv" in sql else "\\N"
            assert got == {i: CARDS[i][2] or null for i in CARDS}, sql


# ---------------------------------------------------------------------- point 4: equality

def _ids(c, sql, params=None) -> set[int]:
    return {r[0] for r in c.execute(sql, params).fetchall()}


def test_equality_returns_exactly_plaintext_matches(rproxy) -> None:
    dup = CARDS[2][2]
    want_eq = {i for i, v in CARDS.items() if v[2] == dup}
    assert len(want_eq) == 2
    want_in = {i for i, v in CARDS.items() if v[2] in (dup, CARDS[8][2])}
    want_ne = {i for i, v in CARDS.items() if v[2] is not None and v[2] != dup}
    with psycopg.connect(rproxy.conninfo(), autocommit=True) as c:
        for binary in (False, True):
            cur = c.cursor(binary=binary)
            assert {r[0] for r in cur.execute(
                "SELECT id FROM r_cards WHERE pan = %s", (dup,))} == want_eq
        assert _ids(c, f"SELECT id FROM r_cards WHERE pan = '{dup}'") == want_eq
        c.pgconn.exec_(b"SELECT 1")  # and through the simple protocol:
        res = c.pgconn.exec_(f"SELECT id FROM r_cards WHERE pan = '{dup}'".encode())
        assert {int(res.get_value(i, 0)) for i in range(res.ntuples)} == want_eq
        assert _ids(c, "SELECT id FROM r_cards WHERE pan IN (%s, %s)",
                    (dup, CARDS[8][2])) == want_in
        assert _ids(c, "SELECT id FROM r_cards WHERE pan <> %s", (dup,)) == want_ne
        assert _ids(c, "SELECT id FROM r_cards WHERE pan IS NULL") == {7}
        assert _ids(c, "SELECT id FROM r_cards WHERE pan IS NOT NULL") == set(CARDS) - {7}
        assert _ids(c, "SELECT id FROM r_cards WHERE pan = %s", ("4000999999999999",)) == set()
        # deterministic: literal, parameter, IN, join on the same join_group
        assert _ids(c, "SELECT id FROM r_accounts WHERE iban = 'DE02'") == {2}
        assert _ids(c, "SELECT id FROM r_accounts WHERE iban IN (%s, %s)",
                    ("DE01", "DE03")) == {1, 3}
        assert _ids(c, "SELECT id FROM r_accounts WHERE iban <> %s", ("DE01",)) == {2, 3}
        want_join = {(t, a) for t, (ti, _) in TRANSFERS.items()
                     for a, (ai, _) in ACCOUNTS.items() if ti == ai}
        got = {tuple(r) for r in c.execute(
            "SELECT t.id, a.id FROM r_transfers t JOIN r_accounts a ON a.iban = t.iban")}
        assert got == want_join
        got = c.execute("SELECT t.iban, a.iban FROM r_transfers t JOIN r_accounts a "
                        "ON a.iban = t.iban WHERE t.id = 3").fetchall()
        assert got == [("DE03", "DE03")]

    async def via_asyncpg() -> None:
        conn = await asyncpg.connect(rproxy.dsn())
        try:
            rows = await conn.fetch("SELECT id FROM r_cards WHERE pan = $1", dup)
            assert {r[0] for r in rows} == want_eq
            rows = await conn.fetch("SELECT id FROM r_accounts WHERE iban = $1", "DE01")
            assert {r[0] for r in rows} == {1}
        finally:
            await conn.close()

    asyncio.run(via_asyncpg())


REFUSED = [
    ("SELECT id FROM r_cards WHERE pan < '5'", "r_cards.pan", "range"),
    ("SELECT id FROM r_cards WHERE pan > %s", "r_cards.pan", "range"),
    ("SELECT id FROM r_accounts WHERE balance BETWEEN 1 AND 5", "r_accounts.balance", "range"),
    ("SELECT id FROM r_cards WHERE pan LIKE '4000%%'", "r_cards.pan", "pattern"),
    ("SELECT id FROM r_cards ORDER BY pan", "r_cards.pan", "ORDER BY"),
    ("SELECT pan FROM r_cards ORDER BY 1", "r_cards.pan", "ORDER BY"),
    ("SELECT id FROM r_accounts WHERE iban >= 'DE'", "r_accounts.iban", "range"),
    ("SELECT id FROM r_cards WHERE expiry = '2030-01-01'", "r_cards.expiry", "blind_index"),
]


@pytest.mark.parametrize(("sql", "column", "words"), REFUSED)
def test_unsupported_comparisons_name_the_column(rproxy, sql, column, words) -> None:
    with psycopg.connect(rproxy.conninfo(), autocommit=True) as c:
        with pytest.raises(psycopg.Error) as info:
            c.execute(sql, ("5",) if "%s" in sql else None)
        msg = info.value.diag.message_primary or ""
        assert info.value.diag.sqlstate == "0A000"
        assert column in msg and words in msg and "possible:" in msg, msg
        assert c.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.parametrize("sql", [
    "SELECT id FROM r_cards WHERE pan = '4000000000000002' AND nonexist = 1",  # simple
    "SELECT id, holder FROM r_cards WHERE pan = %s AND nonexist = 1",  # Parse, recheck col
    "INSERT INTO r_cards (id, pan) VALUES (99, '4000000000000099') RETURNING nonexist",
])
def test_error_positions_point_into_the_clients_text(rproxy, sql) -> None:
    """The server saw the rewritten text (ciphertext literals, blind-index and recheck
    columns); the position it reports is mapped back, so psql's caret marks the client's
    own token, as PostgreSQL itself would."""
    params = ("4000000000000002",) if "%s" in sql else None
    with psycopg.connect(rproxy.conninfo(), autocommit=True) as c:
        with pytest.raises(psycopg.errors.UndefinedColumn) as info:
            c.execute(sql, params)
    sent = sql.replace("%s", "$1")  # what psycopg sends for a bound parameter
    assert info.value.diag.statement_position == str(sent.index("nonexist") + 1)


def test_server_fatal_reaches_the_client_once_in_tracking_mode(pg_aux) -> None:
    """With `protect:` the proxy follows every reply (tracking mode); a FATAL from the
    server (here pg_terminate_backend) must reach the client as PostgreSQL sent it, and
    alone: no proxy-made FATAL after it, as in plain relay mode."""
    from tests.conftest import APP_DB, PW_PASSWORD, PW_USER, RawPG, query_msg

    setup_sql(pg_aux, "CREATE TABLE f_cards (id int, pan bytea); GRANT ALL ON f_cards TO PUBLIC")
    p = start_encrypted(pg_aux, {"public.f_cards.pan": {"type": "text"}})
    try:
        with RawPG(p.port) as raw:
            raw.login(PW_USER, PW_PASSWORD, database=APP_DB)
            raw.send(query_msg("SELECT pg_backend_pid()"))
            pid = int(next(b for k, b in raw.read_until(b"Z") if k == b"D")[6:])
            assert pg_aux.psql(f"SELECT pg_terminate_backend({pid})").strip() == "t"
            errors = [b for k, b in raw.read_to_close() if k == b"E"]
        assert len(errors) == 1, errors
        assert b"SFATAL\0" in errors[0] and b"C57P01\0" in errors[0]
    finally:
        p.stop()
        setup_sql(pg_aux, "DROP TABLE f_cards")
