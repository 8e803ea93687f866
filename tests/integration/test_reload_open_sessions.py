"""Issue 17, section 1: a reload reaches sessions that are already open.

Pooled connections live for days, so a revocation that only new sessions see is no
revocation. Here a long-lived psycopg session and an asyncpg pool are opened before a
SIGHUP reload and used after it, through the real proxy process:

* a column view changed from plaintext to masked applies to the same statement text, a
  new text, and a statement prepared before the reload;
* a table right removed applies (42501 for text; the prepared statement is refused too);
* a key promoted, rotated to and the old one retired (`strongroom keys` + SIGHUP): an
  open session's next INSERT seals under the new primary, never under the retired key,
  exactly as a new session's does.

And (section 1, last point) a reload that would drop the protection of a column that
still holds envelopes is refused: the running configuration stays in force.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import asyncpg
import psycopg
import pytest

from keys import cli_ops
from proxy.devcluster import free_port
from tests.conftest import (
    APP_DB,
    APP_PASSWORD,
    APP_USER,
    SYNC,
    ProxyProcess,
    RawPG,
    bind_msg,
    describe_msg,
    error_fields,
    execute_msg,
    parse_msg,
    query_msg,
)
from tests.integration.encryption_env import direct, keys_cli, setup_sql, start_encrypted
from tests.integration.observability_env import scrape

PAN = "public.rl_cards.pan"
PROTECT = {PAN: {"type": "text", "mask": "last4"}}
RIGHTS = ["select", "insert", "update", "delete"]
PANS = {1: "4111111111111111", 2: "5500000000000004"}
MASKED = {1: "************1111", 2: "************0004"}


def _policy(view: str = "plaintext", notes: bool = True) -> dict[str, Any]:
    tables = {"public.rl_cards": RIGHTS}
    if notes:
        tables["public.rl_notes"] = RIGHTS
    return {"roles": {APP_USER: {"tables": tables, "columns": {PAN: view}}},
            "default": "deny"}


def _start(pg: Any, tracking: bool = True, protect: dict[str, Any] = PROTECT,
           extra: dict[str, Any] | None = None) -> ProxyProcess:
    """The tables, and a proxy: tracking (`protect:` and the policy) or the plain relay
    (the policy only), with two cards inserted through the tracking one."""
    setup_sql(pg, "DROP TABLE IF EXISTS rl_cards, rl_notes; "
                  "CREATE TABLE rl_cards (id int PRIMARY KEY, pan bytea); "
                  "CREATE TABLE rl_notes (id int PRIMARY KEY, body text); "
                  "INSERT INTO rl_notes VALUES (1, 'n1')")
    if not tracking:
        return ProxyProcess(pg, _policy()).start()
    p = start_encrypted(pg, protect, {**_policy(), **(extra or {})})
    with psycopg.connect(p.conninfo(), autocommit=True) as c:
        for i, pan in PANS.items():
            c.execute("INSERT INTO rl_cards (id, pan) VALUES (%s, %s)", (i, pan))
    return p


@pytest.fixture
def rl(pg: Any) -> Iterator[ProxyProcess]:
    p = _start(pg)
    try:
        yield p
    finally:
        p.stop()
        setup_sql(pg, "DROP TABLE IF EXISTS rl_cards, rl_notes")


@pytest.fixture(params=["tracking", "relay"])
def any_path(pg: Any, request: Any) -> Iterator[ProxyProcess]:
    p = _start(pg, request.param == "tracking")
    try:
        yield p
    finally:
        p.stop()
        setup_sql(pg, "DROP TABLE IF EXISTS rl_cards, rl_notes")


def _reload(p: ProxyProcess, config: dict[str, Any] | None = None,
            expect: str = "configuration reloaded") -> None:
    if config is not None:
        p.config = {**p.config, **config}
        p.write_config()
    p.reload(expect)


def _pans(conn: psycopg.Connection, sql: str = "SELECT id, pan FROM rl_cards ORDER BY id",
          **kw: Any) -> dict[int, str]:
    return dict(conn.execute(sql, **kw).fetchall())


async def _pool(p: ProxyProcess) -> asyncpg.Pool:
    return await asyncpg.create_pool(p.dsn(), min_size=2, max_size=2)


async def _pool_pans(pool: asyncpg.Pool, sql: str) -> list[dict[int, str]]:
    """One read per pooled connection (both opened before the reload)."""
    out = []
    async with pool.acquire() as a, pool.acquire() as b:
        for conn in (a, b):
            out.append({r[0]: r[1] for r in await conn.fetch(sql)})
    return out


def test_a_view_change_reaches_open_sessions(rl: ProxyProcess) -> None:
    async def run() -> None:
        pool = await _pool(rl)
        try:
            stmt_sql = "SELECT id, pan FROM rl_cards ORDER BY id"
            assert await _pool_pans(pool, stmt_sql) == [PANS, PANS]  # prepared (cached)
            with psycopg.connect(rl.conninfo(), autocommit=True) as c:
                assert _pans(c) == PANS
                assert _pans(c, prepare=True) == PANS  # a server-side prepared statement
                _reload(rl, _policy("masked"))
                assert _pans(c) == MASKED  # the same text
                assert _pans(c, "SELECT pan, id FROM rl_cards WHERE id > 0 ORDER BY id"
                             ) != PANS
                assert _pans(c, "SELECT id, pan FROM rl_cards WHERE id > 0 ORDER BY id"
                             ) == MASKED  # a new text
                assert _pans(c, prepare=True) == MASKED  # prepared before the reload
            assert await _pool_pans(pool, stmt_sql) == [MASKED, MASKED]
            assert await _pool_pans(pool, stmt_sql + " NULLS LAST") == [MASKED, MASKED]
            with psycopg.connect(rl.conninfo(), autocommit=True) as c:  # a new session
                assert _pans(c) == MASKED
        finally:
            await pool.close()

    asyncio.run(run())


def test_a_table_right_removed_reaches_open_sessions(any_path: ProxyProcess) -> None:
    rl = any_path

    async def run() -> None:
        pool = await _pool(rl)
        try:
            sql = "SELECT id, body FROM rl_notes ORDER BY id"
            async with pool.acquire() as a, pool.acquire() as b:
                for conn in (a, b):
                    assert [tuple(r) for r in await conn.fetch(sql)] == [(1, "n1")]
            with psycopg.connect(rl.conninfo(), autocommit=True) as c:
                assert c.execute(sql).fetchall() == [(1, "n1")]
                assert c.execute(sql, prepare=True).fetchall() == [(1, "n1")]
                _reload(rl, _policy(notes=False))
                with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
                    c.execute("SELECT body FROM rl_notes")  # a new text
                assert "strongroom" in str(info.value)
                # The same text: psycopg runs the statement it prepared before the reload
                # (the relay refuses its Bind with 26000, naming the denial).
                for prepare in (None, True):
                    with pytest.raises(psycopg.Error) as info:
                        c.execute(sql, prepare=prepare)
                    assert "permission denied by strongroom" in str(info.value)
                    assert info.value.sqlstate in ("42501", "26000")
                assert c.execute("SELECT count(*) FROM rl_cards").fetchone() == (
                    len(PANS) if "protect" in rl.config else 0,)  # what the role keeps
            async with pool.acquire() as a, pool.acquire() as b:
                for conn in (a, b):  # their statement cache holds `sql` prepared
                    with pytest.raises(asyncpg.PostgresError) as ainfo:
                        await conn.fetch(sql)
                    assert "strongroom" in str(ainfo.value)
                    with pytest.raises(asyncpg.InsufficientPrivilegeError):
                        await conn.fetch("SELECT body FROM rl_notes WHERE id = 1")
        finally:
            await pool.close()

    asyncio.run(run())


def test_a_portal_bound_before_a_reload_and_not_run_yet_is_refused(rl: ProxyProcess) -> None:
    """A portal bound before the reload whose first Execute comes after it (the only
    message of the session since) is a statement that has not started: it must not
    reveal under the replaced view. It is refused (34000, bind it again); a portal that
    already returned rows finishes as it began; a new Bind reveals under the new view."""
    raw = RawPG(rl.port)
    raw.login(APP_USER, APP_PASSWORD, database=APP_DB)
    sql = "SELECT id, pan FROM rl_cards ORDER BY id"

    def run(data: bytes) -> list[tuple[bytes, bytes]]:
        raw.send(data)
        return raw.read_until(b"Z")

    run(query_msg("BEGIN"))
    run(parse_msg(sql, "s") + bind_msg(stmt="s", portal="idle") + describe_msg(b"P", "idle")
        + bind_msg(stmt="s", portal="begun") + describe_msg(b"P", "begun")
        + execute_msg("begun", max_rows=1) + SYNC)
    _reload(rl, _policy("masked"))
    replies = run(execute_msg("idle") + SYNC)
    assert not any(v.encode() in body for _k, body in replies for v in PANS.values())
    errors = [error_fields(body) for kind, body in replies if kind == b"E"]
    assert errors and errors[0]["C"] == "34000" and "reloaded" in errors[0]["M"], replies
    run(query_msg("ROLLBACK"))
    run(query_msg("BEGIN"))
    run(bind_msg(stmt="s", portal="begun") + execute_msg("begun", max_rows=1) + SYNC)
    _reload(rl, _policy("plaintext"))
    replies = run(execute_msg("begun") + SYNC)  # begun before: finishes as it began
    assert [k for k, _ in replies] == [b"D", b"C", b"Z"], replies
    replies = run(bind_msg(stmt="s") + execute_msg() + SYNC)  # a new Bind: the new view
    assert next(b for k, b in replies if k == b"D").endswith(PANS[1].encode()), replies
    raw.close()


def test_a_portal_bound_before_a_right_was_removed_does_not_run(
        any_path: ProxyProcess) -> None:
    """Both paths: a portal bound (in an open transaction) before the reload that removes
    the right to its table, executed after it, is refused (it returned the rows before);
    portals bound since the reload run, and after the transaction the session is as
    any other."""
    raw = RawPG(any_path.port)
    raw.login(APP_USER, APP_PASSWORD, database=APP_DB)

    def run(data: bytes) -> list[tuple[bytes, bytes]]:
        raw.send(data)
        return raw.read_until(b"Z")

    run(query_msg("BEGIN"))
    run(parse_msg("SELECT id, body FROM rl_notes", "notes") + bind_msg(stmt="notes",
        portal="old") + parse_msg("SELECT count(*) FROM rl_cards", "count") + SYNC)
    _reload(any_path, _policy(notes=False))
    replies = run(execute_msg("old") + SYNC)
    assert not any(b"n1" in body for kind, body in replies if kind == b"D"), replies
    errors = [error_fields(body) for kind, body in replies if kind == b"E"]
    assert errors and errors[0]["C"] == "34000" and "reloaded" in errors[0]["M"], replies
    run(query_msg("ROLLBACK"))
    run(query_msg("BEGIN"))
    replies = run(bind_msg(stmt="count", portal="new") + execute_msg("new") + SYNC)
    assert [k for k, _ in replies] == [b"2", b"D", b"C", b"Z"], replies
    run(query_msg("COMMIT"))
    replies = run(bind_msg(stmt="count") + execute_msg() + SYNC)
    assert [k for k, _ in replies] == [b"2", b"D", b"C", b"Z"], replies
    raw.close()


def _keys(p: ProxyProcess, state: str) -> int:
    return next(k["id"] for k in cli_ops.show(p.dir / "keyring.json")
                if k["column"] == PAN and k["purpose"] == "encrypt" and k["state"] == state)


def _key_of(pg: Any, row: int) -> int:
    with direct(pg) as d:
        (value,) = d.execute("SELECT pan FROM rl_cards WHERE id = %s", (row,)).fetchone()
    return int.from_bytes(bytes(value)[2:6], "big")


def test_a_key_retired_reaches_open_sessions(rl: ProxyProcess, pg: Any) -> None:
    dsn = ["--dsn", rl.cluster.dsn(APP_USER, APP_PASSWORD, APP_DB)]

    async def run() -> None:
        pool = await _pool(rl)
        try:
            insert = "INSERT INTO rl_cards (id, pan) VALUES ($1, $2)"
            async with pool.acquire() as a, pool.acquire() as b:
                for conn in (a, b):  # prepared under the first key
                    await conn.execute(insert, 90, "4000000000000002")
                    await conn.execute("DELETE FROM rl_cards WHERE id = 90")
            with psycopg.connect(rl.conninfo(), autocommit=True) as c:
                c.execute("INSERT INTO rl_cards (id, pan) VALUES (%s, %s)", (91, PANS[1]),
                          prepare=True)
                old = _keys(rl, "active")
                assert keys_cli(rl, "add", "--column", PAN).returncode == 0
                new = _keys(rl, "decrypt_only")
                _reload(rl)
                assert keys_cli(rl, "promote", str(new)).returncode == 0
                _reload(rl)
                res = keys_cli(rl, "rotate", "--column", PAN, *dsn)
                assert res.returncode == 0, res.stderr
                res = keys_cli(rl, "retire", str(old), *dsn)
                assert res.returncode == 0, res.stderr
                _reload(rl)
                # The open session writes under the primary, not the retired key, for a
                # new text and for one prepared before the reloads.
                c.execute("INSERT INTO rl_cards (id, pan) VALUES (%s, %s)", (3, PANS[1]))
                c.execute("INSERT INTO rl_cards (id, pan) VALUES (%s, %s)", (92, PANS[2]),
                          prepare=True)
                assert _key_of(pg, 3) == new and _key_of(pg, 92) == new
                assert _pans(c)[3] == PANS[1]
            async with pool.acquire() as a, pool.acquire() as b:
                for i, conn in ((4, a), (5, b)):
                    await conn.execute(insert, i, PANS[2])
                    assert _key_of(pg, i) == new
        finally:
            await pool.close()

    asyncio.run(run())


# ------------------------------------------------------------------ dropping protection


EMPTY = "public.rl_empty.secret"


@pytest.fixture(params=[APP_PASSWORD])
def guarded(pg: Any, monkeypatch: pytest.MonkeyPatch, request: Any) -> Iterator[ProxyProcess]:
    """`rl` with the credentials the proxy checks stored values with in its environment
    (as `keys retire` and `decrypt-column` take them; the password is the fixture's
    parameter), metrics, and a second protected table that stays empty."""
    monkeypatch.setenv("PGUSER", APP_USER)
    monkeypatch.setenv("PGPASSWORD", request.param)
    setup_sql(pg, "DROP TABLE IF EXISTS rl_empty; "
                  "CREATE TABLE rl_empty (id int PRIMARY KEY, secret bytea)")
    p = _start(pg, protect={**PROTECT, EMPTY: {"type": "text"}},
               extra={"metrics": {"host": "127.0.0.1", "port": free_port()}})
    try:
        yield p
    finally:
        p.stop()
        setup_sql(pg, "DROP TABLE IF EXISTS rl_cards, rl_notes, rl_empty")


def _stored(pg: Any, row: int) -> bytes:
    with direct(pg) as d:
        (value,) = d.execute("SELECT pan FROM rl_cards WHERE id = %s", (row,)).fetchone()
    return bytes(value)


def _failed_reloads(p: ProxyProcess) -> float:
    line = next(x for x in scrape(p).splitlines()
                if x.startswith('strongroom_config_reloads_total{result="failed"}'))
    return float(line.split()[-1])


def test_a_reload_dropping_protection_of_stored_values_is_refused(
        guarded: ProxyProcess, pg: Any) -> None:
    p = guarded
    protect = dict(p.config["protect"])
    with psycopg.connect(p.conninfo(), autocommit=True) as c:
        assert _pans(c) == PANS
        for n, change in enumerate((
                {k: v for k, v in protect.items() if k != PAN},  # the entry removed
                {**protect, PAN: {"type": "date"}})):  # its type changed: AD differs
            _reload(p, {"protect": change}, expect="reload rejected")
            log = p.log()
            assert "strongroom decrypt-column" in log and f"{PAN} (" in log
            assert _failed_reloads(p) == n + 1
            assert _pans(c) == PANS  # the open session still decrypts
            with psycopg.connect(p.conninfo(), autocommit=True) as fresh:  # a new one too
                assert _pans(fresh) == PANS
            c.execute("INSERT INTO rl_cards (id, pan) VALUES (%s, %s)", (7, PANS[1]))
            assert PANS[1].encode() not in _stored(pg, 7)  # the next INSERT still seals
            assert _pans(c)[7] == PANS[1]
            c.execute("DELETE FROM rl_cards WHERE id = 7")
        assert "configuration reloaded" not in p.log()
        # The empty table's protection may go: nothing is stranded.
        _reload(p, {"protect": {PAN: protect[PAN]}})
        assert _failed_reloads(p) == 2
        assert _pans(c) == PANS


@pytest.mark.parametrize("guarded", ["not-the-password"], indirect=True)
def test_a_reload_that_cannot_check_stored_values_is_refused(
        guarded: ProxyProcess, pg: Any) -> None:
    """Fail closed: the database cannot be asked (the proxy's credentials for the check
    are refused), so even dropping the empty table's protection is refused."""
    p = guarded
    with psycopg.connect(p.conninfo(), autocommit=True) as c:
        assert _pans(c) == PANS
        _reload(p, {"protect": {PAN: p.config["protect"][PAN]}}, expect="reload rejected")
        assert "could not be asked" in p.log() and "not-the-password" not in p.log()
        assert _failed_reloads(p) == 1
        assert _pans(c) == PANS
        assert "configuration reloaded" not in p.log()


OTHER_DB = "rl_other"


def test_a_reload_checks_databases_this_process_has_not_served(
        guarded: ProxyProcess, pg: Any) -> None:
    """Without `upstream.database` a client picks its database: a protected column may
    hold envelopes in a database no session of this process has opened yet. Dropping its
    protection is refused all the same (before, only the served databases were asked,
    the reload was applied, and the next INSERT there stored plaintext in the bytea
    column next to the stranded envelopes)."""
    p = guarded
    with direct(pg, db="postgres") as d:
        d.execute(f"DROP DATABASE IF EXISTS {OTHER_DB}")
        d.execute(f"CREATE DATABASE {OTHER_DB}")
    try:
        with direct(pg, db=OTHER_DB) as d:
            d.execute("CREATE TABLE rl_cards (id int PRIMARY KEY, pan bytea); "
                      f"GRANT ALL ON rl_cards TO {APP_USER}")
        with psycopg.connect(p.conninfo(db=OTHER_DB), autocommit=True) as c:
            c.execute("INSERT INTO rl_cards (id, pan) VALUES (%s, %s)", (1, PANS[1]))
        p.stop()  # a restart: from now on this process serves the default database only
        p.start()
        with psycopg.connect(p.conninfo(), autocommit=True) as c:
            c.execute("DELETE FROM rl_cards")  # no envelope left where it is serving
            _reload(p, {"protect": {EMPTY: p.config["protect"][EMPTY]}},
                    expect="reload rejected")
        assert (f"{PAN} (removed from protect:) still holds encrypted values in database "
                f"{OTHER_DB}") in p.log(), p.log()[-2000:]
        assert "configuration reloaded" not in p.log()
        with psycopg.connect(p.conninfo(db=OTHER_DB), autocommit=True) as c:
            c.execute("INSERT INTO rl_cards (id, pan) VALUES (%s, %s)", (2, PANS[2]))
            assert _pans(c) == PANS
        with direct(pg, db=OTHER_DB) as d:
            stored = [bytes(r[0]) for r in d.execute("SELECT pan FROM rl_cards")]
        assert len(stored) == 2 and not any(v.encode() in s for s in stored
                                            for v in PANS.values())
    finally:
        p.stop()
        with direct(pg, db="postgres") as d:
            d.execute(f"DROP DATABASE IF EXISTS {OTHER_DB} WITH (FORCE)")


def test_a_reload_check_is_not_blinded_by_row_level_security(
        guarded: ProxyProcess, pg: Any) -> None:
    """Row-level security hiding the rows from the role the proxy checks with (a tenant
    policy keyed on a setting the check does not set) must not read as "no envelope":
    the check runs with row_security off, so PostgreSQL refuses it instead of filtering,
    and the reload is refused (before, the hidden envelopes were stranded and the next
    INSERT stored plaintext)."""
    p = guarded
    with direct(pg) as d:
        d.execute("ALTER TABLE rl_cards ENABLE ROW LEVEL SECURITY; "
                  "ALTER TABLE rl_cards FORCE ROW LEVEL SECURITY; "  # (app owns it)
                  f"CREATE POLICY rl_tenant ON rl_cards TO {APP_USER} "
                  "USING (id::text = current_setting('app.tenant', true))")
    _reload(p, {"protect": {EMPTY: p.config["protect"][EMPTY]}}, expect="reload rejected")
    assert "configuration reloaded" not in p.log()
    assert "could not be asked" in p.log() and "row-level security" in p.log()
    with psycopg.connect(p.conninfo(), autocommit=True) as c:
        c.execute("SET app.tenant = '3'")
        c.execute("INSERT INTO rl_cards (id, pan) VALUES (%s, %s)", (3, PANS[1]))
    assert PANS[1].encode() not in _stored(pg, 3)
