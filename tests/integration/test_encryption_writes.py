"""Issue 4, point 1: nothing protected reaches the server in plaintext.

Every write path (simple and extended protocol, psycopg text and binary, asyncpg) puts
a distinct, recognisable plaintext into protected columns; the tables are then read
directly (superuser, no proxy) and no plaintext byte sequence may appear in any protected
column or blind index, nor in pg_stat_statements. Statements the proxy cannot encrypt
must be refused with a clear ErrorResponse and write nothing.
"""

from __future__ import annotations

import asyncio
import datetime
import decimal
import io
import time

import asyncpg
import psycopg
import pytest

from tests.integration.encryption_env import direct, leaks, setup_sql, start_encrypted, stored_bytes

PROTECT = {
    "public.w_cards.pan": {"type": "text", "mode": "randomized", "search": "blind_index",
                           "mask": "last4"},
    "public.w_cards.expiry": {"type": "date"},
    "public.w_accounts.iban": {"type": "text", "mode": "deterministic"},
    "public.w_accounts.balance": {"type": "numeric"},
}

SCHEMA = """
CREATE TABLE w_cards (id int PRIMARY KEY, holder text, pan bytea, pan_bidx bytea,
                      expiry bytea);
CREATE TABLE w_accounts (id int PRIMARY KEY, iban bytea UNIQUE, balance bytea);
CREATE TABLE w_plain (id int, note text);
"""

# Distinct plaintexts per write path, so a leak names its road.
PANS = {
    1: "4111000000000001", 2: "4111000000000002", 3: "4111000000000003",
    4: "4111000000000004", 5: "4111000000000005", 6: "4111000000000006",
    7: "4111000000000007", 8: "4111000000000008", 9: "4111000000000009",
    10: "4111000000000010", 11: "4111000000000011", 12: "4111000000000012",
}
IBANS = {i: f"DE89370400440532{i:06d}" for i in range(1, 13)}
BALANCES = {i: f"98765.{i:04d}1" for i in range(1, 13)}
EXPIRY = "2031-07-15"


@pytest.fixture(scope="module")
def wproxy(pg):
    setup_sql(pg, SCHEMA)
    p = start_encrypted(pg, PROTECT)
    yield p
    p.stop()
    setup_sql(pg, "DROP TABLE w_cards, w_accounts, w_plain")


def _secrets() -> list[str]:
    return [*PANS.values(), *IBANS.values(), *BALANCES.values(), EXPIRY]


def _write_everything(p) -> None:
    with psycopg.connect(p.conninfo(), autocommit=True) as conn:
        # simple protocol, single row
        conn.execute(
            f"INSERT INTO w_cards (id, holder, pan, expiry) VALUES (1, 'a', '{PANS[1]}', "
            f"'{EXPIRY}')", prepare=False)
        conn.pgconn.exec_(  # genuinely simple protocol: PQexec
            f"INSERT INTO w_cards (id, holder, pan) VALUES (2, 'b', '{PANS[2]}'), "
            f"(3, 'c', '{PANS[3]}')".encode())
        # UPDATE of a literal
        conn.pgconn.exec_(f"UPDATE w_cards SET pan = '{PANS[4]}' WHERE id = 3".encode())
        # INSERT ... SELECT of literals
        conn.pgconn.exec_(
            f"INSERT INTO w_accounts (id, iban, balance) SELECT 1, '{IBANS[1]}', "
            f"'{BALANCES[1]}'".encode())
        # UPSERT: ON CONFLICT DO UPDATE SET col = EXCLUDED.col
        conn.pgconn.exec_(
            f"INSERT INTO w_accounts (id, iban, balance) VALUES (1, '{IBANS[2]}', "
            f"'{BALANCES[2]}') ON CONFLICT (id) DO UPDATE SET iban = EXCLUDED.iban, "
            "balance = EXCLUDED.balance".encode())
        # extended protocol, text parameters
        conn.execute("INSERT INTO w_cards (id, holder, pan, expiry) VALUES (%s, %s, %s, %s)",
                     (5, "e", PANS[5], datetime.date(2031, 7, 15)))
        conn.execute("INSERT INTO w_accounts (id, iban, balance) VALUES (%s, %s, %s) "
                     "ON CONFLICT (id) DO UPDATE SET iban = EXCLUDED.iban",
                     (3, IBANS[3], decimal.Decimal(BALANCES[3])))
        conn.execute("UPDATE w_accounts SET balance = %s WHERE id = %s",
                     (decimal.Decimal(BALANCES[4]), 3))
        # extended protocol, binary parameters (and binary results)
        with conn.cursor(binary=True) as cur:
            cur.execute("INSERT INTO w_cards (id, holder, pan, expiry) VALUES (%b, %b, %b, %b)",
                        (6, "f", PANS[6], datetime.date(2031, 7, 15)))
            cur.execute("INSERT INTO w_accounts (id, iban, balance) VALUES (%b, %b, %b)",
                        (4, IBANS[4], decimal.Decimal(BALANCES[5])))
            cur.executemany("INSERT INTO w_cards (id, holder, pan) VALUES (%b, %b, %b)",
                            [(7, "g", PANS[7]), (8, "h", PANS[8])])

    async def via_asyncpg() -> None:
        conn = await asyncpg.connect(p.dsn())
        try:
            await conn.execute("INSERT INTO w_cards (id, holder, pan, expiry) "
                               "VALUES ($1, $2, $3, $4)", 9, "i", PANS[9],
                               datetime.date(2031, 7, 15))
            stmt = await conn.prepare("INSERT INTO w_accounts (id, iban, balance) "
                                      "VALUES ($1, $2, $3)")
            await stmt.fetch(5, IBANS[5], decimal.Decimal(BALANCES[6]))
            await conn.executemany("INSERT INTO w_accounts (id, iban, balance) "
                                   "VALUES ($1, $2, $3)",
                                   [(6, IBANS[6], decimal.Decimal(BALANCES[7])),
                                    (7, IBANS[7], decimal.Decimal(BALANCES[8]))])
            await conn.execute("UPDATE w_cards SET pan = $1 WHERE id = $2", PANS[10], 9)
        finally:
            await conn.close()

    asyncio.run(via_asyncpg())


def test_no_plaintext_stored_or_in_stat_statements(pg, wproxy) -> None:
    _write_everything(wproxy)
    stored = stored_bytes(pg, "w_cards", ["pan", "pan_bidx", "expiry"])
    stored += stored_bytes(pg, "w_accounts", ["iban", "balance"])
    assert len(stored) >= 20
    assert leaks(stored, _secrets()) == []
    # Every row written through the proxy has its blind index maintained.
    with direct(pg) as conn:
        rows = conn.execute("SELECT id, pan IS NOT NULL, pan_bidx IS NOT NULL FROM w_cards "
                            "ORDER BY id").fetchall()
        assert rows and all(r[1] and r[2] for r in rows), rows
        queries = [r[0] for r in conn.execute("SELECT query FROM pg_stat_statements")]
        assert any("w_cards" in q for q in queries)
    assert leaks([q.encode() for q in queries], _secrets()) == []

    # And the app reads back exactly what it wrote.
    with psycopg.connect(wproxy.conninfo(), autocommit=True) as conn:
        got = dict(conn.execute("SELECT id, pan FROM w_cards").fetchall())
        assert got == {1: PANS[1], 2: PANS[2], 3: PANS[4], 5: PANS[5], 6: PANS[6],
                       7: PANS[7], 8: PANS[8], 9: PANS[10]}
        accts = {r[0]: (r[1], r[2]) for r in
                 conn.execute("SELECT id, iban, balance FROM w_accounts")}
        assert accts[1] == (IBANS[2], decimal.Decimal(BALANCES[2]))
        assert accts[3] == (IBANS[3], decimal.Decimal(BALANCES[4]))
        assert accts[4] == (IBANS[4], decimal.Decimal(BALANCES[5]))
        assert accts[7] == (IBANS[7], decimal.Decimal(BALANCES[8]))
        assert conn.execute("SELECT expiry FROM w_cards WHERE id = 6").fetchone()[0] == \
            datetime.date(2031, 7, 15)


REFUSED = [
    # an expression over a protected value
    ("INSERT INTO w_cards (id, pan) VALUES (100, upper(%s))", ("4111999900000100",), "pan"),
    ("INSERT INTO w_cards (id, pan) VALUES (101, upper('4111999900000101'))", None, "pan"),
    ("INSERT INTO w_cards (id, pan) VALUES (102, '4111999900' || '000102')", None, "pan"),
    ("UPDATE w_accounts SET balance = balance + 1 WHERE id = 1", None, "balance"),
    ("INSERT INTO w_accounts (id, iban) VALUES (103, md5('DE8937040044000103'))", None, "iban"),
    ("INSERT INTO w_accounts (id, iban) SELECT 104, note FROM w_plain", None, "iban"),
    # procedural code naming a protected table
    ("DO $$BEGIN INSERT INTO w_cards (id, pan) VALUES (105, '4111999900000105'); END$$",
     None, "w_cards"),
    ("DO $$BEGIN EXECUTE 'INSERT INTO w_cards (id, pan) VALUES (106, ''4111999900000106'')';"
     " END$$", None, "w_cards"),
]


@pytest.mark.parametrize(("sql", "params", "names"), REFUSED)
def test_refused_statements_write_nothing(pg, wproxy, sql, params, names) -> None:
    with direct(pg) as d:
        before = d.execute("SELECT count(*) FROM w_cards").fetchone()[0], \
            d.execute("SELECT count(*), string_agg(encode(balance, 'hex'), ',' ORDER BY id) "
                      "FROM w_accounts").fetchone()
    with psycopg.connect(wproxy.conninfo(), autocommit=True) as conn:
        with pytest.raises(psycopg.Error) as info:
            conn.execute(sql, params)
        diag = info.value.diag
        assert diag.sqlstate in ("0A000", "42501"), (diag.sqlstate, diag.message_primary)
        if names:
            assert names in (diag.message_primary or "")
        for secret in ("4111999900", "DE8937040044000103"):
            assert secret not in (diag.message_primary or "")
        # The session is still usable.
        assert conn.execute("SELECT 1").fetchone() == (1,)
    with direct(pg) as d:
        after = d.execute("SELECT count(*) FROM w_cards").fetchone()[0], \
            d.execute("SELECT count(*), string_agg(encode(balance, 'hex'), ',' ORDER BY id) "
                      "FROM w_accounts").fetchone()
        assert after == before
        queries = [r[0] for r in d.execute("SELECT query FROM pg_stat_statements")]
    server_log = pg.logfile.read_bytes()
    assert leaks([server_log, *(q.encode() for q in queries)],
                 ["4111999900000100", "4111999900000101", "4111999900000105",
                  "4111999900000106"]) == []


def test_bad_input_is_a_server_error_without_the_value(pg, wproxy) -> None:
    with psycopg.connect(wproxy.conninfo(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InvalidDatetimeFormat) as info:
            conn.execute("INSERT INTO w_cards (id, expiry) VALUES (200, 'NOTADATE-SECRET77')")
        assert "NOTADATE" not in str(info.value)
        with pytest.raises(psycopg.errors.InvalidTextRepresentation):
            conn.execute("INSERT INTO w_accounts (id, balance) VALUES (%s, %s)",
                         (201, "NOTANUMBER-SECRET78"))
        assert conn.execute("SELECT count(*) FROM w_cards WHERE id = 200").fetchone() == (0,)
    with direct(pg) as d:
        queries = [r[0] for r in d.execute("SELECT query FROM pg_stat_statements")]
    haystacks = [pg.logfile.read_bytes(), *(q.encode() for q in queries)]
    assert leaks(haystacks, ["NOTADATE-SECRET77", "NOTANUMBER-SECRET78"]) == []


def test_copy_from_stdin_is_encrypted(pg, wproxy) -> None:
    secrets = {300: "4111000000000300", 301: "4111000000000301", 302: "4111000000000302"}
    with psycopg.connect(wproxy.conninfo(), autocommit=True) as conn:
        cur = conn.cursor()
        with cur.copy("COPY w_cards (id, holder, pan, expiry) FROM STDIN") as cp:
            cp.write(f"300\tx\t{secrets[300]}\t2031-07-15\n".encode())
        with cur.copy("COPY w_cards (id, pan, holder) FROM STDIN WITH (FORMAT csv)") as cp:
            cp.write(f'301,"{secrets[301]}",y\n'.encode())
        with cur.copy("COPY w_cards (id, pan, expiry) FROM STDIN WITH (FORMAT binary)") as cp:
            cp.set_types(["int4", "text", "date"])
            cp.write_row((302, secrets[302], datetime.date(2031, 7, 15)))
        got = dict(conn.execute("SELECT id, pan FROM w_cards WHERE id >= 300").fetchall())
        assert got == secrets
        assert _ids_by_pan(conn, secrets[301]) == {301}
        # A COPY the proxy cannot map (no column list, blind-indexed table) is refused.
        with pytest.raises(psycopg.Error) as info:
            with cur.copy("COPY w_cards FROM STDIN") as cp:
                cp.write(b"303\tz\t4111000000000303\t\\N\t\\N\n")
        assert info.value.diag.sqlstate == "0A000"
    stored = stored_bytes(pg, "w_cards", ["pan", "pan_bidx", "expiry"])
    assert leaks(stored, [*secrets.values(), "4111000000000303", EXPIRY]) == []


def test_copy_header_match_into_a_blind_indexed_table(pg, wproxy) -> None:
    """Issue 11: HEADER MATCH checks the header against the column list, which the proxy
    widens by the blind-index column; it was an internal error that closed the session.
    The proxy appends the index column's name to the header as it appends its values."""
    secrets = {310: "4111000000000310", 311: "4111000000000311", 312: "4111000000000312"}
    with psycopg.connect(wproxy.conninfo(), autocommit=True) as conn:
        cur = conn.cursor()
        with cur.copy("COPY w_cards (id, pan, holder) FROM STDIN "
                      "WITH (FORMAT csv, HEADER match)") as cp:
            cp.write(f'id,pan,holder\n310,"{secrets[310]}",y\n311,{secrets[311]},z\n'.encode())
        with cur.copy("COPY w_cards (pan, id) FROM STDIN WITH (HEADER match)") as cp:
            cp.write(f"pan\tid\n{secrets[312]}\t312\n".encode())
        # A header that does not match is the server's error or PostgreSQL's own count
        # check, the session stays usable, and nothing is stored.
        for header in ("id,card,holder", "id,pan"):
            with pytest.raises(psycopg.Error) as info:
                with cur.copy("COPY w_cards (id, pan, holder) FROM STDIN "
                              "WITH (FORMAT csv, HEADER match)") as cp:
                    cp.write(f"{header}\n313,4111000000000313,w\n".encode())
            assert info.value.diag.sqlstate in ("22P04", "57014"), info.value.diag.sqlstate
            assert "pan_bidx" not in str(info.value) and "expected 4" not in str(info.value)
            assert "4111000000000313" not in str(info.value)
        assert conn.execute("SELECT 1").fetchone() == (1,)
        for i, pan in secrets.items():
            assert _ids_by_pan(conn, pan) == {i}
    with direct(pg) as d:
        rows = d.execute("SELECT pan, pan_bidx FROM w_cards WHERE id BETWEEN 310 AND 313"
                         ).fetchall()
    assert len(rows) == 3 and all(b is not None for _, b in rows)
    assert leaks([bytes(v) for r in rows for v in r], [*secrets.values()]) == []


def _ids_by_pan(conn, pan: str) -> set[int]:
    return {r[0] for r in conn.execute("SELECT id FROM w_cards WHERE pan = %s", (pan,))}


def test_parenthesised_values_are_sealed_and_indexed(pg, wproxy) -> None:
    """Issue 11: pglast drops redundant parentheses from the tree, but the rewriter splices
    text; a value in parentheses must be sealed, and its blind index set, like a bare one."""
    pans = {i: f"41110000000004{i - 400:02d}" for i in range(400, 407)}
    with psycopg.connect(wproxy.conninfo(), autocommit=True) as conn:
        exec_ = conn.pgconn.exec_  # simple protocol, the text as written
        for sql in (
            f"INSERT INTO w_cards (id, pan) VALUES (400, ('{pans[400]}'))",
            f"INSERT INTO w_cards (pan, id) VALUES ((('{pans[401]}')), 401)",
            f"INSERT INTO w_cards (id, pan) VALUES (402, ('{pans[402]}')::text)",
            "INSERT INTO w_cards (id, pan) VALUES (403, 'placeholder')",
            f"UPDATE w_cards SET pan = ('{pans[403]}') WHERE id = 403",
            f"INSERT INTO w_cards (id, pan) VALUES (404, 'x') ON CONFLICT (id) DO NOTHING;"
            f"UPDATE w_cards SET pan = (('{pans[404]}')::text) WHERE id = 404",
        ):
            res = exec_(sql.encode())
            assert res.status == psycopg.pq.ExecStatus.COMMAND_OK, res.error_message
        conn.execute("INSERT INTO w_cards (id, pan) VALUES (%s, (%s))", (405, pans[405]))
        conn.execute("INSERT INTO w_cards (id, pan) VALUES (406, 'y')")
        conn.execute("UPDATE w_cards SET pan = ((%s)) WHERE id = 406", (pans[406],))
        for i, pan in pans.items():  # the blind index finds each row by its value
            assert _ids_by_pan(conn, pan) == {i}
    with direct(pg) as d:
        rows = d.execute("SELECT pan, pan_bidx FROM w_cards WHERE id BETWEEN 400 AND 406"
                         ).fetchall()
    assert len(rows) == len(pans)
    assert all(bytes(p).startswith(b"\x02") and len(bytes(p)) > 28 and b is not None
               for p, b in rows)
    assert leaks([bytes(v) for r in rows for v in r], list(pans.values())) == []


STALE_PROTECT = {"public.s_cards.pan": {"type": "text", "mode": "randomized"}}


def test_writes_follow_the_proxys_column_order_after_outside_ddl(pg_aux) -> None:
    """A table changed by someone else (a DBA, another worker) after the proxy read the
    catalog: an INSERT or COPY without a column list is sent with the column list the
    proxy encrypted by, so the protected column never gets a value as sent. A column
    dropped meanwhile makes the server refuse the write instead of shifting values."""
    setup_sql(pg_aux, "CREATE TABLE s_cards (id int, name text, pan bytea, extra text); "
                      "GRANT ALL ON s_cards TO PUBLIC")
    p = start_encrypted(pg_aux, STALE_PROTECT)
    secrets = ["4111000000003333", "4111000000004444", "4111000000005555",
               "4111000000006666"]
    try:
        with psycopg.connect(p.conninfo(), autocommit=True) as c:
            c.execute("INSERT INTO s_cards VALUES (1, 'ann', '4111000000001111', 'x')")
            # fewer values than columns, as PostgreSQL allows: the rest take defaults
            c.execute("INSERT INTO s_cards VALUES (2, 'amy', '4111000000002222')")
            assert c.execute("SELECT pan, extra FROM s_cards WHERE id = 2").fetchall() == [
                ("4111000000002222", None)]
            with direct(pg_aux) as d:  # recreated outside the proxy, other column order
                d.execute("ALTER TABLE s_cards RENAME TO s_old; "
                          "CREATE TABLE s_cards (id int, pan bytea, name text, extra text); "
                          "GRANT ALL ON s_cards TO PUBLIC; "
                          "INSERT INTO s_cards SELECT id, pan, name, extra FROM s_old")
                d.commit()
            # written for the new order: without the list, the server would put the
            # literal it was sent as is into pan (the proxy sealed 'bob' instead)
            c.execute(f"INSERT INTO s_cards VALUES (3, '{secrets[0]}', 'bob', 'y')")
            with c.cursor().copy("COPY s_cards FROM STDIN") as cp:
                cp.write_row((4, "carl", secrets[1], "z"))
            with direct(pg_aux) as d:  # then a column before pan dropped, outside again
                d.execute("ALTER TABLE s_cards DROP COLUMN name")
                d.commit()
            with pytest.raises(psycopg.errors.UndefinedColumn):
                c.execute("INSERT INTO s_cards VALUES (5, %s, 'w')", (secrets[2],))
            with pytest.raises(psycopg.errors.UndefinedColumn), \
                    c.cursor().copy("COPY s_cards FROM STDIN") as cp:
                cp.write_row((6, secrets[3], "v"))
        with direct(pg_aux) as d:
            stored = d.execute("SELECT id, pan FROM s_cards ORDER BY id").fetchall()
        # Only what the proxy sealed is in pan: every stored pan is an envelope.
        assert [i for i, _ in stored] == [1, 2, 3, 4]
        assert all(bytes(v).startswith(b"\x02") and len(bytes(v)) > 28 for _, v in stored)
        assert leaks([bytes(v) for _, v in stored], secrets) == []
        with psycopg.connect(p.conninfo(), autocommit=True) as c:  # a new session reloads
            c.execute("INSERT INTO s_cards VALUES (7, %s, 'u')", (secrets[2],))
            assert c.execute("SELECT pan FROM s_cards WHERE id IN (1, 7) ORDER BY id"
                             ).fetchall() == [("4111000000001111",), (secrets[2],)]
    finally:
        p.stop()
        setup_sql(pg_aux, "DROP TABLE IF EXISTS s_cards, s_old")


def test_outside_ddl_is_seen_within_catalog_max_age(pg_aux) -> None:
    """A long-lived session picks up a table recreated outside the proxy (columns in
    another order) within `catalog_max_age`: `SELECT *` decrypts again and an INSERT in
    the new order seals the right value."""
    setup_sql(pg_aux, "CREATE TABLE s_cards (id int, name text, pan bytea, extra text); "
                      "GRANT ALL ON s_cards TO PUBLIC")
    p = start_encrypted(pg_aux, STALE_PROTECT, {"catalog_max_age": 0.5})
    try:
        with psycopg.connect(p.conninfo(), autocommit=True) as c:
            c.execute("INSERT INTO s_cards VALUES (1, 'ann', '4111000000001111', 'x')")
            with direct(pg_aux) as d:
                d.execute("ALTER TABLE s_cards RENAME TO s_old; "
                          "CREATE TABLE s_cards (id int, pan bytea, name text, extra text); "
                          "GRANT ALL ON s_cards TO PUBLIC; "
                          "INSERT INTO s_cards SELECT id, pan, name, extra FROM s_old")
                d.commit()
            deadline = time.monotonic() + 10
            while True:  # until the reload: wrong columns decrypted (XX001) or ciphertext
                try:
                    rows = c.execute("SELECT * FROM s_cards").fetchall()
                except psycopg.errors.DataCorrupted as exc:
                    rows = [exc.sqlstate]
                if rows == [(1, "4111000000001111", "ann", "x")]:
                    break
                assert time.monotonic() < deadline, rows
                time.sleep(0.2)
            c.execute("INSERT INTO s_cards VALUES (2, '4111000000002222', 'bob', 'y')")
            assert c.execute("SELECT pan, name FROM s_cards WHERE id = 2").fetchall() == [
                ("4111000000002222", "bob")]
        with direct(pg_aux) as d:
            (name,) = d.execute("SELECT name FROM s_cards WHERE id = 2").fetchone()
        assert name == "bob"
    finally:
        p.stop()
        setup_sql(pg_aux, "DROP TABLE IF EXISTS s_cards, s_old")


def test_asyncpg_copy_records_is_sealed_before_the_servers_reply(pg_aux) -> None:
    """asyncpg's copy_records_to_table sends its binary rows right behind the COPY
    statement, before PostgreSQL's CopyInResponse arrives. The rows must be sealed all
    the same (without a blind index they were stored as sent), and read back."""
    setup_sql(pg_aux, "CREATE TABLE a_cards (id int, pan bytea, balance bytea); "
                      "CREATE TABLE a_indexed (id int, pan bytea, pan_bidx bytea); "
                      "GRANT ALL ON a_cards, a_indexed TO PUBLIC")
    p = start_encrypted(pg_aux, {
        "public.a_cards.pan": {"type": "text"},
        "public.a_cards.balance": {"type": "numeric"},
        "public.a_indexed.pan": {"type": "text", "search": "blind_index"},
    })
    pans = ["4111000000007001", "4111000000007002", "4111000000007003"]

    async def copy_and_read() -> tuple[list, list, list]:
        c = await asyncpg.connect(p.dsn())
        try:
            await c.copy_records_to_table(
                "a_cards", columns=["id", "pan", "balance"],
                records=[(1, pans[0], decimal.Decimal("70.01")), (2, None, None)])
            await c.copy_records_to_table(
                "a_indexed", columns=["id", "pan"], records=[(1, pans[1]), (2, pans[2])])
            return (await c.fetch("SELECT id, pan, balance FROM a_cards ORDER BY id"),
                    await c.fetch("SELECT id FROM a_indexed WHERE pan = $1", pans[2]),
                    await c.fetch("SELECT pan FROM a_indexed ORDER BY id"))
        finally:
            await c.close()

    try:
        cards, found, indexed = asyncio.run(copy_and_read())
        assert [tuple(r) for r in cards] == [(1, pans[0], decimal.Decimal("70.01")),
                                            (2, None, None)]
        assert [r["id"] for r in found] == [2]
        assert [r["pan"] for r in indexed] == pans[1:]
        with direct(pg_aux) as d:
            cells = [bytes(v) for row in d.execute(
                "SELECT pan, balance FROM a_cards UNION ALL SELECT pan, pan_bidx "
                "FROM a_indexed").fetchall() for v in row if v is not None]
        assert len(cells) == 2 + 4 and leaks(cells, [*pans, "70.01"]) == []
    finally:
        p.stop()
        setup_sql(pg_aux, "DROP TABLE a_cards, a_indexed")


def test_pipelined_writes_asyncpg_copy_text_and_psycopg_pipeline(pg_aux) -> None:
    """Other clients that do not wait: asyncpg's copy_to_table (csv and text, sent right
    behind the COPY) and psycopg's pipeline mode (many Parse/Bind/Execute before one
    Sync, in autocommit and in a transaction). Everything is sealed and reads back."""
    setup_sql(pg_aux, "CREATE TABLE z_cards (id int, pan bytea, pan_bidx bytea, bal bytea); "
                      "GRANT ALL ON z_cards TO PUBLIC")
    p = start_encrypted(pg_aux, {"public.z_cards.pan": {"type": "text", "search": "blind_index"},
                                 "public.z_cards.bal": {"type": "numeric"}})
    pans = {i: f"41110000000091{i:02d}" for i in range(1, 9)}

    async def copy() -> list:
        c = await asyncpg.connect(p.dsn())
        try:
            await c.copy_to_table("z_cards", columns=["id", "pan", "bal"], format="csv",
                                  source=io.BytesIO(f"1,{pans[1]},1.5\n2,{pans[2]},\n".encode()))
            await c.copy_to_table("z_cards", columns=["id", "pan", "bal"],
                                  source=io.BytesIO(f"3\t{pans[3]}\t2.5\n".encode()))
            return await c.fetch("SELECT id, pan, bal FROM z_cards ORDER BY id")
        finally:
            await c.close()

    try:
        assert [tuple(r) for r in asyncio.run(copy())] == [
            (1, pans[1], decimal.Decimal("1.5")), (2, pans[2], None),
            (3, pans[3], decimal.Decimal("2.5"))]
        with psycopg.connect(p.conninfo(), autocommit=True) as c:
            with c.pipeline():
                c.execute("INSERT INTO z_cards (id, pan, bal) VALUES (%s, %s, %s)",
                          (4, pans[4], decimal.Decimal("4")))
                c.execute("INSERT INTO z_cards (id, pan, bal) VALUES (%s, %s, %s)",
                          (5, pans[5], None))
                cur = c.execute("SELECT id, pan, bal FROM z_cards WHERE pan = %s", (pans[4],))
            assert cur.fetchall() == [(4, pans[4], decimal.Decimal("4"))]
            with c.transaction(), c.pipeline():
                for i in range(6, 9):
                    c.execute("INSERT INTO z_cards (id, pan) VALUES (%s, %s)", (i, pans[i]))
            assert c.execute("SELECT count(*) FROM z_cards WHERE pan IN (%s, %s)",
                             (pans[6], pans[8])).fetchone() == (2,)
        with direct(pg_aux) as d:
            cells = [bytes(v) for row in d.execute(
                "SELECT pan, pan_bidx, bal FROM z_cards").fetchall() for v in row if v is not None]
        assert len(cells) == 8 * 2 + 3 and leaks(cells, [*pans.values(), "1.5", "2.5"]) == []
    finally:
        p.stop()
        setup_sql(pg_aux, "DROP TABLE z_cards")


def test_sqlalchemy_orm_bulk_insert(pg_aux) -> None:
    """SQLAlchemy 2.0 ORM `add_all` + commit. Its default "insertmanyvalues" form feeds
    the row values through `SELECT p0::VARCHAR FROM (VALUES ($1, ...)) AS imp_sen(...)`,
    which the proxy cannot map to the protected column: refused, nothing stored (fail
    closed; README, Limitations). With `use_insertmanyvalues=False` (one INSERT per row)
    both the psycopg and the asyncpg dialects insert and look up through the proxy."""
    import sqlalchemy as sa
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
    from sqlalchemy.orm import DeclarativeBase, Session

    class Base(DeclarativeBase):
        pass

    class Card(Base):  # (no Mapped[] annotations: this module has lazy annotations)
        __tablename__ = "o_cards"
        id = sa.Column(sa.Integer, primary_key=True)
        pan = sa.Column(sa.String)

    setup_sql(pg_aux, "CREATE TABLE o_cards (id serial PRIMARY KEY, pan bytea, pan_bidx bytea); "
                      "GRANT ALL ON o_cards TO PUBLIC; "
                      "GRANT ALL ON SEQUENCE o_cards_id_seq TO PUBLIC")
    p = start_encrypted(pg_aux, {"public.o_cards.pan": {"type": "text", "search": "blind_index"}})
    url = p.dsn().replace("postgresql://", "postgresql+psycopg://")
    try:
        eng = sa.create_engine(url)
        with Session(eng) as s, pytest.raises(sa.exc.NotSupportedError, match=r"o_cards\.pan"):
            s.add_all([Card(pan="4111000000008001"), Card(pan="4111000000008002")])
            s.commit()
        eng.dispose()
        eng = sa.create_engine(url, use_insertmanyvalues=False)
        with Session(eng) as s:
            s.add_all([Card(pan="4111000000008011"), Card(pan="4111000000008012")])
            s.commit()
            found = s.scalars(sa.select(Card).where(Card.pan == "4111000000008012")).all()
            assert [c.pan for c in found] == ["4111000000008012"]
        eng.dispose()

        async def with_asyncpg() -> list[str | None]:
            aeng = create_async_engine(url.replace("+psycopg", "+asyncpg")
                                       .replace("?sslmode=disable", ""),
                                       use_insertmanyvalues=False)
            try:
                async with AsyncSession(aeng) as s:
                    s.add_all([Card(pan="4111000000008021"), Card(pan="4111000000008022")])
                    await s.commit()
                    rows = await s.scalars(sa.select(Card).order_by(Card.id))
                    return [c.pan for c in rows]
            finally:
                await aeng.dispose()

        assert asyncio.run(with_asyncpg()) == ["4111000000008011", "4111000000008012",
                                               "4111000000008021", "4111000000008022"]
        with direct(pg_aux) as d:
            cells = [bytes(v) for row in d.execute("SELECT pan, pan_bidx FROM o_cards")
                     for v in row]
        assert len(cells) == 8 and leaks(cells, ["4111000000008001", "4111000000008012",
                                                  "4111000000008022"]) == []
    finally:
        p.stop()
        setup_sql(pg_aux, "DROP TABLE o_cards")
