"""Issue 12, "What each role sees": the blind-index sibling is the proxy's storage.

`pan_bidx` holds a truncated HMAC of `pan`: equal PANs have equal values, so a reader of
it can link rows (and tables) holding the same card even when `pan` itself is masked or
ciphertext. It must never appear in a result set, for any role and any column view:
`*`, `t.*`, `TABLE t`, subqueries, CTEs, joins, views, `RETURNING *`, cursors and
`COPY ... TO` without a column list all leave it out. Naming it anywhere is refused with
42501; the proxy's own rewrites (blind-index lookups, sibling writes) keep working.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from typing import Any

import asyncpg
import psycopg
import pytest

from tests.integration.encryption_env import direct, setup_sql, start_encrypted, stored_bytes

PROTECT = {
    "public.sc_cards.pan": {"type": "text", "mode": "randomized", "search": "blind_index",
                            "mask": "last4"},
    "public.sc_cards.expiry": {"type": "date"},
}
SCHEMA = """
CREATE TABLE sc_cards (id int PRIMARY KEY, account_id int, holder text, pan bytea,
                       pan_bidx bytea, expiry bytea);
CREATE TABLE sc_accounts (account_id int PRIMARY KEY, owner text);
"""
CARD_COLUMNS = ["id", "account_id", "holder", "pan", "expiry"]
ACCOUNT_COLUMNS = ["account_id", "owner"]
PANS = {1: "4000123412341234", 2: "4000999988887777", 3: "4000123412341234"}
VIEWS = {"sc_plain": "plaintext", "sc_masked": "masked", "sc_cipher": "ciphertext"}
GRANTS = ["select", "insert", "update", "delete", "copy_out"]
POLICY: dict[str, Any] = {
    "roles": {
        "app": {"tables": {"public.*": [*GRANTS, "copy_in"]}, "allow": ["ddl"]},
        **{role: {"tables": {"public.sc_cards": GRANTS, "public.sc_accounts": GRANTS,
                             "public.sc_view": ["select"]},
                  "functions": ["public.sc_setof", "public.sc_tab", "public.sc_late"],
                  "columns": {"public.sc_cards.pan": view}} for role, view in VIEWS.items()},
    },
    "default": "deny",
}


@pytest.fixture(scope="module")
def sproxy(pg: Any) -> Iterator[Any]:
    setup_sql(pg, SCHEMA)
    # A view made by a DBA straight on the server: PostgreSQL expands its `*` to every
    # column, the sibling included.
    setup_sql(pg, "CREATE VIEW sc_view AS SELECT * FROM sc_cards")
    # Table functions made by a DBA: PostgreSQL expands `*` over them to the row type's
    # every column (the sibling included), with no table in the RowDescription.
    setup_sql(pg, "CREATE FUNCTION sc_setof() RETURNS SETOF sc_cards LANGUAGE sql STABLE "
              "AS 'SELECT * FROM sc_cards'")
    setup_sql(pg, "CREATE FUNCTION sc_tab() RETURNS TABLE (id int, pan_bidx bytea) "
              "LANGUAGE sql STABLE AS 'SELECT id, pan_bidx FROM sc_cards'")
    for role in VIEWS:
        pg.psql(f"DROP ROLE IF EXISTS {role}; CREATE ROLE {role} LOGIN PASSWORD '{role}-pw'")
    pg.psql("GRANT ALL ON sc_cards, sc_accounts, sc_view TO " + ", ".join(VIEWS), db="app")
    pg.psql("GRANT EXECUTE ON FUNCTION sc_setof(), sc_tab() TO " + ", ".join(VIEWS), db="app")
    p = start_encrypted(pg, PROTECT, POLICY)
    try:
        with psycopg.connect(p.conninfo(), autocommit=True) as c:
            for i, pan in PANS.items():
                c.execute("INSERT INTO sc_cards (id, account_id, holder, pan, expiry) "
                          "VALUES (%s, %s, %s, %s, '2031-01-31')", (i, i, f"h{i}", pan))
            c.execute("INSERT INTO sc_accounts VALUES (1, 'o1'), (2, 'o2'), (3, 'o3')")
        yield p
    finally:
        p.stop()
        setup_sql(pg, "DROP FUNCTION sc_setof(), sc_tab(); DROP VIEW sc_view; "
                  "DROP TABLE sc_cards, sc_accounts")
        pg.psql("DROP ROLE " + ", ".join(VIEWS))


def _connect(p: Any, role: str) -> psycopg.Connection:
    return psycopg.connect(p.conninfo(user=role, password=f"{role}-pw"), autocommit=True)


# (statement, the result columns the client must see)
READS: list[tuple[str, list[str]]] = [
    ("SELECT * FROM sc_cards ORDER BY id", CARD_COLUMNS),
    ("SELECT c.* FROM sc_cards c ORDER BY c.id", CARD_COLUMNS),
    ("SELECT sc_cards.*, 1 AS one FROM sc_cards ORDER BY id", [*CARD_COLUMNS, "one"]),
    ("TABLE sc_cards", CARD_COLUMNS),
    ("SELECT * FROM (SELECT * FROM sc_cards) s", CARD_COLUMNS),
    ("WITH w AS (SELECT * FROM sc_cards) SELECT * FROM w", CARD_COLUMNS),
    ("SELECT * FROM sc_cards c JOIN sc_accounts a ON a.account_id = c.account_id "
     "ORDER BY c.id", CARD_COLUMNS + ACCOUNT_COLUMNS),
    ("SELECT c.*, a.* FROM sc_cards c JOIN sc_accounts a USING (account_id) ORDER BY c.id",
     CARD_COLUMNS + ACCOUNT_COLUMNS),
    ("SELECT * FROM sc_cards WHERE id = 1", CARD_COLUMNS),
    ("SELECT * FROM sc_view ORDER BY id", CARD_COLUMNS),
    ("SELECT v.* FROM sc_view v WHERE v.id = 2", CARD_COLUMNS),
]
LOOKUP = (f"SELECT * FROM sc_cards WHERE pan = '{PANS[1]}' ORDER BY id", CARD_COLUMNS)


def _no_sibling(names: list[str], want: list[str], sql: str) -> None:
    assert "pan_bidx" not in names, sql
    assert names == want, sql


@pytest.mark.parametrize("role", list(VIEWS))
def test_star_never_returns_the_sibling_psycopg(sproxy: Any, role: str) -> None:
    reads = READS + ([LOOKUP] if VIEWS[role] == "plaintext" else [])
    with _connect(sproxy, role) as c:
        for sql, want in reads:
            for binary in (False, True):
                for prepare in (False, True):
                    cur = c.cursor(binary=binary)
                    cur.execute(sql, prepare=prepare)
                    rows = cur.fetchall()
                    assert cur.description is not None
                    _no_sibling([d.name for d in cur.description], want, sql)
                    assert rows and all(len(r) == len(want) for r in rows), sql
                    if "pan" in want:
                        got = {r[want.index("id")]: r[want.index("pan")] for r in rows}
                        if VIEWS[role] == "plaintext":
                            assert all(got[i] == PANS[i] for i in got), sql
                        elif VIEWS[role] == "masked":
                            assert all(got[i] == "*" * 12 + PANS[i][-4:] for i in got), sql


@pytest.mark.parametrize("role", list(VIEWS))
def test_star_never_returns_the_sibling_asyncpg(sproxy: Any, role: str) -> None:
    reads = READS + ([LOOKUP] if VIEWS[role] == "plaintext" else [])

    async def go() -> None:
        c = await asyncpg.connect(sproxy.dsn(user=role, password=f"{role}-pw"))
        try:
            for sql, want in reads:
                stmt = await c.prepare(sql)
                _no_sibling([a.name for a in stmt.get_attributes()], want, sql)
                rows = await stmt.fetch()
                assert rows and all(list(r.keys()) == want for r in rows), sql
                # a portal read a few rows at a time (Execute with a row limit)
                async with c.transaction():
                    got = [r async for r in c.cursor(sql, prefetch=1)]
                assert [list(r.keys()) for r in got] == [want] * len(rows), sql
        finally:
            await c.close()

    asyncio.run(go())


@pytest.mark.parametrize("role", list(VIEWS))
def test_returning_star_and_cursors_leave_it_out(sproxy: Any, role: str) -> None:
    with _connect(sproxy, role) as c:
        cur = c.execute("UPDATE sc_cards SET holder = holder WHERE id = 2 RETURNING *")
        assert cur.description is not None
        _no_sibling([d.name for d in cur.description], CARD_COLUMNS, "RETURNING *")
        cur = c.execute("DELETE FROM sc_cards WHERE id = 99 RETURNING sc_cards.*")
        assert cur.description is not None
        _no_sibling([d.name for d in cur.description], CARD_COLUMNS, "RETURNING t.*")
        with c.transaction():
            c.execute("DECLARE sc_cur CURSOR FOR SELECT * FROM sc_cards ORDER BY id")
            cur = c.execute("FETCH 2 FROM sc_cur")
            assert cur.description is not None
            _no_sibling([d.name for d in cur.description], CARD_COLUMNS, "FETCH")
            assert len(cur.fetchall()) == 2


def test_insert_returning_star_as_writer(sproxy: Any) -> None:
    with _connect(sproxy, "sc_plain") as c, c.transaction():
        cur = c.execute("INSERT INTO sc_cards (id, pan) VALUES (50, %s) RETURNING *",
                        ("4000555566667777",))
        assert cur.description is not None
        _no_sibling([d.name for d in cur.description], CARD_COLUMNS, "INSERT RETURNING *")
        assert cur.fetchone() == (50, None, None, "4000555566667777", None)
        raise psycopg.Rollback


@pytest.mark.parametrize("role", list(VIEWS))
@pytest.mark.parametrize("sql", [
    "COPY sc_cards TO STDOUT",
    "COPY sc_cards TO STDOUT (FORMAT csv, HEADER)",
    "COPY (SELECT * FROM sc_cards ORDER BY id) TO STDOUT",
    "COPY (TABLE sc_cards) TO STDOUT (FORMAT csv)",
])
def test_copy_to_without_a_column_list_leaves_it_out(sproxy: Any, role: str, sql: str) -> None:
    with _connect(sproxy, role) as c:
        buf = io.BytesIO()
        with c.cursor().copy(sql) as cp:
            for chunk in cp:
                buf.write(bytes(chunk))
    lines = buf.getvalue().decode().splitlines()
    if "HEADER" in sql:
        assert lines[0].split(",") == CARD_COLUMNS
        lines = lines[1:]
    sep = "," if "csv" in sql else "\t"
    assert len(lines) == len(PANS)
    assert all(len(line.split(sep)) == len(CARD_COLUMNS) for line in lines), lines


REFUSED = [
    "SELECT pan_bidx FROM sc_cards",
    "SELECT id, sc_cards.pan_bidx FROM sc_cards",
    "SELECT c.pan_bidx AS x FROM sc_cards c",
    "SELECT id FROM sc_cards WHERE pan_bidx IS NULL",
    "SELECT id FROM sc_cards ORDER BY pan_bidx",
    "SELECT count(pan_bidx) FROM sc_cards",
    "SELECT id FROM sc_cards GROUP BY id, pan_bidx",
    "SELECT a.id FROM sc_cards a JOIN sc_cards b ON a.pan_bidx = b.pan_bidx",
    "SELECT x FROM (SELECT pan_bidx AS x FROM sc_cards) s",
    "SELECT id FROM sc_cards WHERE id IN (SELECT id FROM sc_cards WHERE pan_bidx IS NULL)",
    "WITH w AS (SELECT id, pan_bidx FROM sc_cards) SELECT id FROM w",
    "SELECT pan_bidx FROM sc_view",
    "SELECT id FROM sc_view WHERE pan_bidx IS NOT NULL",
    "UPDATE sc_cards SET holder = holder WHERE id = 1 RETURNING pan_bidx",
    "UPDATE sc_cards SET pan_bidx = NULL WHERE id = 1",
    "UPDATE sc_cards SET holder = 'x' WHERE pan_bidx IS NULL",
    "DELETE FROM sc_cards WHERE pan_bidx = '\\x00'::bytea",
    "INSERT INTO sc_cards (id, pan_bidx) VALUES (60, NULL)",
    "COPY sc_cards (id, pan_bidx) TO STDOUT",
    "COPY (SELECT pan_bidx FROM sc_cards) TO STDOUT",
]


@pytest.mark.parametrize("role", list(VIEWS))
@pytest.mark.parametrize("sql", REFUSED, ids=[s[:60] for s in REFUSED])
def test_naming_the_sibling_is_refused(sproxy: Any, role: str, sql: str) -> None:
    with _connect(sproxy, role) as c:
        for prepare in (False, True):
            with pytest.raises(psycopg.Error) as info:
                if sql.startswith("COPY"):
                    with c.cursor().copy(sql) as cp:
                        for _chunk in cp:
                            pass
                else:
                    c.execute(sql, prepare=prepare)
            err = info.value
            assert err.diag.sqlstate == "42501", (sql, err)
            message = err.diag.message_primary or ""
            assert f'role "{role}"' in message, message
            assert "pan_bidx" in message and "storage column" in message, message
            assert c.execute("SELECT 1").fetchone() == (1,)


def test_star_over_a_merging_join_is_refused_not_guessed(sproxy: Any) -> None:
    """`*` over JOIN ... USING merges the join columns; rather than imitate that, the
    proxy refuses (nothing sent) and says to name the columns (`c.*, a.*` works)."""
    with _connect(sproxy, "sc_plain") as c:
        with pytest.raises(psycopg.errors.FeatureNotSupported) as info:
            c.execute("SELECT * FROM sc_cards c JOIN sc_accounts a USING (account_id)")
        assert "name the columns" in (info.value.diag.message_primary or "")


def test_lookups_still_go_through_the_blind_index(sproxy: Any) -> None:
    """The proxy's own rewrite still searches the sibling: a row whose stored index was
    removed behind the proxy's back is no longer found by its PAN, while the others
    are (the duplicate PAN finds both of its rows)."""
    with _connect(sproxy, "sc_plain") as c:
        ids = [r[0] for r in c.execute("SELECT id FROM sc_cards WHERE pan = %s ORDER BY id",
                                       (PANS[1],))]
        assert ids == [1, 3]
        with direct(sproxy.cluster) as d:
            d.execute("UPDATE sc_cards SET pan_bidx = NULL WHERE id = 3")
        try:
            for prepare in (False, True):
                got = c.execute(f"SELECT * FROM sc_cards WHERE pan = '{PANS[1]}'",
                                prepare=prepare).fetchall()
                assert [r[0] for r in got] == [1]
                assert len(got[0]) == len(CARD_COLUMNS)  # and the index is not shown
                assert c.execute("SELECT id FROM sc_cards WHERE pan IN (%s, %s) ORDER BY id",
                                 (PANS[1], PANS[2]), prepare=prepare).fetchall() == [(1,), (2,)]
        finally:
            c.execute("UPDATE sc_cards SET pan = %s WHERE id = 3", (PANS[3],))
        assert [r[0] for r in c.execute("SELECT id FROM sc_cards WHERE pan = %s ORDER BY id",
                                        (PANS[1],))] == [1, 3]


def test_star_after_ddl_in_the_same_pipeline_lists_the_new_columns(sproxy: Any) -> None:
    """`*` is written out from the catalog: a statement pipelined right behind DDL that
    changed the table waits for the catalog reload the DDL triggers (observe, never
    simulate), so it gets the table's columns as they are now, still without the
    sibling."""
    from proxy.protocol.rows import decode_data_row
    from tests.conftest import (
        APP_PASSWORD,
        APP_USER,
        SYNC,
        RawPG,
        bind_msg,
        describe_msg,
        execute_msg,
        parse_msg,
        query_msg,
    )

    with RawPG(sproxy.port) as raw:
        raw.login(APP_USER, APP_PASSWORD)
        try:
            raw.send(query_msg("ALTER TABLE sc_cards ADD COLUMN added int")
                     + parse_msg("SELECT * FROM sc_cards WHERE id = $1")
                     + bind_msg((b"2",)) + describe_msg(b"P") + execute_msg() + SYNC)
            replies = raw.read_until(b"Z") + raw.read_until(b"Z")
            assert b"E" not in [k for k, _ in replies], replies
            desc = next(b for k, b in replies if k == b"T")
            (row,) = [decode_data_row(b) for k, b in replies if k == b"D"]
            assert b"pan_bidx" not in desc and b"added" in desc
            assert len(row) == len(CARD_COLUMNS) + 1 and row[-1] is None
        finally:
            raw.send(query_msg("ALTER TABLE sc_cards DROP COLUMN added"))
            raw.read_until(b"Z")


@pytest.mark.parametrize("sql", [
    f"EXPLAIN SELECT * FROM sc_cards WHERE pan = '{PANS[1]}'",
    f"EXPLAIN (VERBOSE) SELECT id FROM sc_cards WHERE pan = '{PANS[1]}'",
    f"EXPLAIN ANALYZE SELECT id FROM sc_cards WHERE pan IN ('{PANS[1]}', '{PANS[2]}')",
    f"EXPLAIN (VERBOSE) UPDATE sc_cards SET pan = '{PANS[2]}' WHERE id = 99",
    "EXPLAIN SELECT id FROM sc_cards WHERE pan = %s",
])
def test_explain_never_prints_a_sealed_value(sproxy: Any, sql: str) -> None:
    """The plan of a blind-index lookup prints its condition (`pan_bidx = '\\x...'`):
    the searched value's blind index, which links every row holding it. EXPLAIN of a
    statement the proxy seals a value into is refused (nothing sent), whatever the
    role's view; EXPLAIN of what the proxy does not seal still works."""
    with _connect(sproxy, "sc_plain") as c:
        for prepare in (False, True):
            args = (PANS[1],) if "%s" in sql else None
            with pytest.raises(psycopg.errors.FeatureNotSupported) as info:
                c.execute(sql, args, prepare=prepare)
            assert "EXPLAIN" in (info.value.diag.message_primary or "")
        plan = [r[0] for r in c.execute("EXPLAIN SELECT * FROM sc_cards WHERE id = 1")]
        assert plan and "pan_bidx" not in " ".join(plan)
        assert c.execute("EXPLAIN SELECT owner FROM sc_accounts").fetchall()


def _never_sibling_bytes(p: Any, c: psycopg.Connection, sql: str) -> None:
    """``sql`` is refused, or its result has no column holding a blind index."""
    indexes = set(stored_bytes(p.cluster, "sc_cards", ["pan_bidx"]))
    assert indexes
    try:
        cur = c.execute(sql)
    except psycopg.Error as exc:
        assert exc.diag.sqlstate in ("42501", "0A000"), (sql, exc)
        assert c.execute("SELECT 1").fetchone() == (1,)
        return
    assert cur.description is not None
    assert "pan_bidx" not in [d.name for d in cur.description], sql
    for row in cur.fetchall():
        for value in row:
            assert not (isinstance(value, bytes | memoryview) and bytes(value) in indexes), sql
            assert not any(i.hex() in str(value) for i in indexes), sql


@pytest.mark.parametrize("role", list(VIEWS))
@pytest.mark.parametrize("sql", [
    "SELECT * FROM sc_setof() ORDER BY id",
    "SELECT f.* FROM sc_setof() f ORDER BY id",
    "SELECT * FROM public.sc_setof() WITH ORDINALITY",
    "SELECT * FROM sc_setof() AS f(a, b, c, d, e, f)",
    "SELECT * FROM sc_tab()",
    "SELECT * FROM ROWS FROM (sc_tab(), sc_setof())",
    "SELECT pan_bidx FROM sc_tab()",
    "SELECT t.pan_bidx FROM sc_setof() t",
    "SELECT f FROM sc_setof() f",
    "SELECT row_to_json(f.*) FROM sc_setof() f",
    "SELECT sc_setof()",
    "SELECT (sc_setof()).*",
    "SELECT (sc_tab()).pan_bidx",
    "SELECT * FROM sc_cards c, LATERAL sc_tab() t WHERE t.id = c.id",
])
def test_table_functions_never_return_the_sibling(sproxy: Any, role: str, sql: str) -> None:
    with _connect(sproxy, role) as c:
        _never_sibling_bytes(sproxy, c, sql)


def test_star_over_a_row_type_function_is_written_out(sproxy: Any) -> None:
    """A function returning the protected table's row type has its `*` written out like
    the table's, so the client gets every other column, decrypted per its view."""
    with _connect(sproxy, "sc_plain") as c:
        cur = c.execute("SELECT * FROM sc_setof() ORDER BY id")
        assert cur.description is not None
        assert [d.name for d in cur.description] == CARD_COLUMNS
        assert [r[0] for r in cur.fetchall()] == sorted(PANS)
        cur = c.execute("SELECT * FROM sc_tab() t(n) ORDER BY 1")
        assert cur.description is not None
        assert [d.name for d in cur.description] == ["n"]
        assert [r[0] for r in cur.fetchall()] == sorted(PANS)


def test_a_function_the_snapshot_does_not_know_yet_is_refused_per_value(sproxy: Any) -> None:
    """A table function made by another process after the catalog snapshot is unknown
    to the rewriter until the next reload; a bytea result column of it named like a
    sibling (no table in its RowDescription) has its values refused, never passed on."""
    with _connect(sproxy, "sc_plain") as c:
        assert c.execute("SELECT count(*) FROM sc_cards").fetchone() == (len(PANS),)
        setup_sql(sproxy.cluster, "CREATE FUNCTION sc_late() RETURNS TABLE "
                  "(id int, pan_bidx bytea) LANGUAGE sql STABLE "
                  "AS 'SELECT id, pan_bidx FROM sc_cards'; "
                  "GRANT EXECUTE ON FUNCTION sc_late() TO sc_plain")
        try:
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
                c.execute("SELECT * FROM public.sc_late()").fetchall()
            assert "storage column" in (info.value.diag.message_primary or "")
            assert c.execute("SELECT 1").fetchone() == (1,)
        finally:
            setup_sql(sproxy.cluster, "DROP FUNCTION sc_late()")
