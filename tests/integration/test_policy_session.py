"""Policy and the session: transactions, pipelines, savepoints, tracked search_path and
role, prepared statements, reload on SIGHUP, unlisted roles and ``default:``.

A denial is PostgreSQL's own error raised by a substituted statement, so these tests
check what a client can observe: the transaction is aborted exactly as for a real
permission error, pipelines get what PostgreSQL would send, and the proxy's idea of
search_path and role follows the server's through COMMIT, ROLLBACK, SET LOCAL,
savepoints and failed implicit transactions.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from typing import Any

import asyncpg
import psycopg
import pytest
from psycopg import pq

from tests.conftest import ProxyProcess
from tests.integration.policy_env import POLICY, ensure_schema, password

IDLE, INTRANS, INERROR = (
    pq.TransactionStatus.IDLE, pq.TransactionStatus.INTRANS, pq.TransactionStatus.INERROR
)


@pytest.fixture(scope="module")
def policy_proxy(pg: Any) -> Iterator[ProxyProcess]:
    ensure_schema(pg)
    p = ProxyProcess(pg, dict(POLICY)).start()
    yield p
    p.stop()


def connect(proxy: ProxyProcess, role: str, **kw: Any) -> psycopg.Connection:
    return psycopg.connect(proxy.conninfo(user=role, password=password(role)),
                           autocommit=True, **kw)


def refused(exc: BaseException, *needles: str) -> bool:
    text = str(exc)
    return (getattr(exc, "sqlstate", None) == "42501" and "strongroom" in text
            and all(n in text for n in needles))


def outcome(conn: psycopg.Connection, sql: str) -> str:
    """'ok', 'denied' (strongroom), or the SQLSTATE of PostgreSQL's own error."""
    try:
        conn.execute(sql)
    except psycopg.Error as exc:
        return "denied" if refused(exc) else str(exc.sqlstate)
    return "ok"


# ------------------------------------------------------------------ transaction fidelity


def test_denial_inside_begin_aborts_like_a_permission_error(policy_proxy: ProxyProcess) -> None:
    with connect(policy_proxy, "support_agent") as conn:
        conn.execute("BEGIN")
        conn.execute("SELECT id FROM customers")
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
            conn.execute("SELECT tax_id FROM customers")
        assert refused(info.value, 'role "support_agent"', "tax_id")
        assert conn.info.transaction_status == INERROR
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.execute("ROLLBACK")
        assert conn.info.transaction_status == IDLE
        assert conn.execute("SELECT count(*) FROM customers").fetchone() == (2,)


def test_savepoint_rollback_to_after_denial(policy_proxy: ProxyProcess) -> None:
    with connect(policy_proxy, "payments_service") as conn:
        conn.execute("BEGIN")
        conn.execute("INSERT INTO audit_events(actor, event) VALUES ('svc', 'one')")
        conn.execute("SAVEPOINT s1")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DELETE FROM cards WHERE id = %s", [1])
        assert conn.info.transaction_status == INERROR
        conn.execute("ROLLBACK TO SAVEPOINT s1")
        assert conn.info.transaction_status == INTRANS
        conn.execute("INSERT INTO audit_events(actor, event) VALUES ('svc', 'two')")
        n = conn.execute("SELECT count(*) FROM audit_events WHERE actor = 'svc'").fetchone()
        assert n == (2,)
        conn.execute("ROLLBACK")


def test_pipeline_allowed_denied_allowed_with_params(policy_proxy: ProxyProcess) -> None:
    with connect(policy_proxy, "support_agent") as conn:
        cur1, cur2, cur3 = conn.cursor(), conn.cursor(), conn.cursor()
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
            with conn.pipeline():
                cur1.execute("SELECT name FROM customers WHERE id = %s", [1])
                cur2.execute("SELECT id FROM customers WHERE tax_id = %s", ["123-45-6789"])
                cur3.execute("SELECT name FROM customers WHERE id = %s", [2])
        assert refused(info.value, "tax_id")
        assert "123-45-6789" not in str(info.value)
        assert cur1.fetchall() == [("Ada",)]
        assert conn.info.transaction_status == IDLE
        # After the Sync the connection works, parameters and all.
        assert conn.execute("SELECT name FROM customers WHERE id = %s", [2]).fetchall() == [
            ("Bob",)
        ]


def test_pipeline_in_transaction_later_statements_skipped(policy_proxy: ProxyProcess) -> None:
    with connect(policy_proxy, "support_agent") as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            with conn.pipeline() as p:
                conn.execute("BEGIN")
                conn.execute("SELECT name FROM customers WHERE id = %s", [1])
                p.sync()
                conn.execute("SELECT * FROM transactions WHERE id = %s", [1])
                conn.execute("SELECT name FROM customers WHERE id = %s", [2])
                p.sync()
        assert conn.info.transaction_status == INERROR
        conn.execute("ROLLBACK")
        assert conn.execute("SELECT 1").fetchone() == (1,)


async def test_asyncpg_prepared_denied_with_params_is_42501(policy_proxy: ProxyProcess) -> None:
    conn = await asyncpg.connect(policy_proxy.dsn(user="support_agent",
                                                  password=password("support_agent")))
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError) as info:
            await conn.fetch("SELECT id FROM customers WHERE tax_id = $1", "123-45-6789")
        assert "strongroom" in str(info.value) and "123-45-6789" not in str(info.value)
        # The refusal declares the statement's parameter count (types the client left
        # open are text), so a prepared statement binds and fails at execution.
        stmt = await conn.prepare("DELETE FROM cards WHERE pan = $1 AND id = $2::int")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await stmt.fetch("4111111111111111", "1")
        await conn.execute("BEGIN")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("UPDATE cards SET pan = $1 WHERE id = $2::int", "x", "1")
        with pytest.raises(asyncpg.InFailedSQLTransactionError):
            await conn.fetch("SELECT 1")
        await conn.execute("ROLLBACK")
        assert not conn.is_in_transaction()
        assert await conn.fetchval("SELECT name FROM customers WHERE id = $1", 1) == "Ada"
    finally:
        await conn.close()


# ------------------------------------------------------------------ search_path tracking


def test_search_path_set_commit_rollback_local(policy_proxy: ProxyProcess) -> None:
    # support_agent may read public.customers but not reporting.customers.
    with connect(policy_proxy, "support_agent") as conn:
        q = "SELECT id FROM customers"
        assert outcome(conn, q) == "ok"
        conn.execute("SET search_path TO reporting")
        assert outcome(conn, q) == "denied"
        conn.execute("RESET search_path")
        assert outcome(conn, q) == "ok"
        # A SET rolled back is undone.
        conn.execute("BEGIN")
        conn.execute("SET search_path TO reporting")
        assert outcome(conn, q) == "denied"
        conn.execute("ROLLBACK")
        assert outcome(conn, q) == "ok"
        # SET LOCAL ends with the transaction, committed or not.
        conn.execute("BEGIN")
        conn.execute("SET LOCAL search_path TO reporting")
        assert outcome(conn, q) == "denied"
        conn.execute("COMMIT")
        assert outcome(conn, q) == "ok"
        conn.execute("BEGIN")
        conn.execute("SELECT set_config('search_path', 'reporting', true)")
        assert outcome(conn, q) == "denied"
        conn.execute("COMMIT")
        assert outcome(conn, q) == "ok"
        # A plain SET inside a committed transaction stays.
        conn.execute("BEGIN")
        conn.execute("SET search_path TO reporting")
        conn.execute("COMMIT")
        assert outcome(conn, q) == "denied"
        assert conn.execute("SHOW search_path").fetchone() == ("reporting",)
        conn.execute("SET search_path TO DEFAULT")
        assert outcome(conn, q) == "ok"


def test_search_path_undone_by_failed_implicit_transaction(
    policy_proxy: ProxyProcess,
) -> None:
    with connect(policy_proxy, "support_agent") as conn:
        q = "SELECT id FROM customers"
        # One simple Query is one implicit transaction: the error undoes the SET.
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SET search_path TO reporting; SELECT 1/0")
        assert conn.execute("SHOW search_path").fetchone()[0] != "reporting"
        assert outcome(conn, q) == "ok"
        # The same with a committed transaction first and the failure after it.
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("BEGIN; SET search_path TO reporting; COMMIT; "
                         "SET search_path TO public; SELECT 1/0")
        assert conn.execute("SHOW search_path").fetchone() == ("reporting",)
        assert outcome(conn, q) == "denied"
        conn.execute("RESET search_path")
        # Savepoints: ROLLBACK TO undoes what came after it.
        conn.execute("BEGIN")
        conn.execute("SAVEPOINT a")
        conn.execute("SET search_path TO reporting")
        assert outcome(conn, q) == "denied"  # aborts the transaction
        conn.execute("ROLLBACK TO SAVEPOINT a")
        assert outcome(conn, q) == "ok"
        conn.execute("ROLLBACK")


def test_set_search_path_through_a_named_statement_applies_when_run(
    policy_proxy: ProxyProcess,
) -> None:
    """A prepared SET runs each time it is executed, not when it is parsed."""
    with connect(policy_proxy, "support_agent") as conn:
        pgc = conn.pgconn
        q = "SELECT id FROM customers"
        assert pgc.prepare(b"to_rep", b"SET search_path TO reporting").status == \
            pq.ExecStatus.COMMAND_OK
        assert pgc.prepare(b"to_pub", b"SET search_path TO public").status == \
            pq.ExecStatus.COMMAND_OK
        assert outcome(conn, q) == "ok"  # parsed, not run: the path is unchanged
        pgc.exec_prepared(b"to_rep", None)
        assert outcome(conn, q) == "denied"
        pgc.exec_prepared(b"to_pub", None)
        assert outcome(conn, q) == "ok"
        pgc.exec_prepared(b"to_rep", None)  # again: runs again
        assert conn.execute("SHOW search_path").fetchone() == ("reporting",)
        assert outcome(conn, q) == "denied"


def test_named_statement_rechecked_after_set_role(policy_proxy: ProxyProcess) -> None:
    """psycopg prepares a statement after a few runs; SET ROLE afterwards must not let
    the already-parsed statement run as a role the policy denies it to."""
    with connect(policy_proxy, "ops_admin") as conn:
        for _ in range(6):  # past psycopg's prepare_threshold (5)
            conn.execute("SELECT id FROM cards WHERE id = %s", [1])
        conn.execute("SET ROLE analyst")
        with pytest.raises(psycopg.Error) as info:
            conn.execute("SELECT id FROM cards WHERE id = %s", [1])
        assert "strongroom" in str(info.value) and 'role "analyst"' in str(info.value)
        conn.execute("RESET ROLE")
        assert conn.execute("SELECT id FROM cards WHERE id = %s", [1]).fetchone() == (1,)


async def test_asyncpg_prepared_set_not_executed(policy_proxy: ProxyProcess) -> None:
    conn = await asyncpg.connect(policy_proxy.dsn(user="support_agent",
                                                  password=password("support_agent")))
    try:
        await conn.prepare("SET search_path TO reporting")  # parsed, never run
        assert await conn.fetchval("SELECT count(*) FROM customers") == 2
    finally:
        await conn.close()


def test_startup_search_path_option(policy_proxy: ProxyProcess) -> None:
    with psycopg.connect(
        policy_proxy.conninfo(user="analyst", password=password("analyst"),
                              options="'-c search_path=reporting'"), autocommit=True,
    ) as conn:
        assert outcome(conn, "SELECT * FROM daily_totals") == "ok"
        conn.execute("SET search_path TO public")
        assert outcome(conn, "SELECT * FROM daily_totals") == "denied"
        conn.execute("RESET search_path")  # back to the startup value
        assert outcome(conn, "SELECT * FROM daily_totals") == "ok"
    # Another session's RESET goes to its own startup value, not this one's.
    with connect(policy_proxy, "analyst") as conn:
        conn.execute("SET search_path TO reporting")
        conn.execute("RESET search_path")
        assert outcome(conn, "SELECT * FROM daily_totals") == "denied"


# ------------------------------------------------------------------ role tracking


def test_set_role_tracked_and_undone(policy_proxy: ProxyProcess) -> None:
    # No automatic prepare here: this is about tracking (prepared statements re-checked
    # after SET ROLE have their own test).
    with connect(policy_proxy, "ops_admin", prepare_threshold=None) as conn:
        cards = "SELECT id FROM cards"
        assert outcome(conn, cards) == "ok"
        conn.execute("SET ROLE analyst")
        assert conn.execute("SELECT current_user").fetchone() == ("analyst",)
        assert outcome(conn, cards) == "denied"
        conn.execute("RESET ROLE")  # the session role's right, not analyst's
        assert outcome(conn, cards) == "ok"
        conn.execute("BEGIN")
        conn.execute("SET ROLE analyst")
        conn.execute("ROLLBACK")
        assert conn.execute("SELECT current_user").fetchone() == ("ops_admin",)
        assert outcome(conn, cards) == "ok"
        conn.execute("BEGIN")
        conn.execute("SET LOCAL ROLE analyst")
        assert outcome(conn, cards) == "denied"
        conn.execute("ROLLBACK")
        conn.execute("BEGIN")
        conn.execute("SELECT set_config('role', 'analyst', true)")
        conn.execute("COMMIT")
        assert outcome(conn, cards) == "ok"
        conn.execute("SELECT set_config('role', 'analyst', false)")
        assert outcome(conn, cards) == "denied"
        conn.execute("SET ROLE NONE")
        assert outcome(conn, cards) == "ok"
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SET ROLE analyst; SELECT 1/0")
        assert conn.execute("SELECT current_user").fetchone() == ("ops_admin",)
        assert outcome(conn, cards) == "ok"
        conn.execute("SET ROLE analyst")
        conn.execute("DISCARD ALL")
        assert outcome(conn, cards) == "ok"


def test_set_config_role_with_untrackable_value_denied(policy_proxy: ProxyProcess) -> None:
    with connect(policy_proxy, "ops_admin") as conn:
        assert outcome(conn, "SELECT set_config('role', r, false) FROM "
                             "(VALUES ('analyst')) v(r)") == "denied"


def test_role_startup_option_is_tracked(policy_proxy: ProxyProcess) -> None:
    # `-c role=...` is a SET ROLE at login: ops_admin may, and then runs as analyst.
    with psycopg.connect(policy_proxy.conninfo(
        user="ops_admin", password=password("ops_admin"), options="'-c role=analyst'"),
        autocommit=True,
    ) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("analyst",)
        assert outcome(conn, "SELECT id FROM cards") == "denied"
        assert outcome(conn, "SELECT * FROM reporting.daily_totals") == "ok"


# ------------------------------------------------------------------ PREPARE / EXECUTE


def test_prepare_execute_deallocate(policy_proxy: ProxyProcess) -> None:
    with connect(policy_proxy, "support_agent") as conn:
        conn.execute("PREPARE p1(int) AS SELECT name FROM customers WHERE id = $1")
        assert conn.execute("EXECUTE p1(1)").fetchall() == [("Ada",)]
        assert outcome(conn, "EXPLAIN EXECUTE p1(1)") == "ok"
        conn.execute("DEALLOCATE p1")
        assert outcome(conn, "EXECUTE p1(1)") == "denied"
        assert outcome(conn, "PREPARE p2 AS SELECT tax_id FROM customers") == "denied"
        assert outcome(conn, "EXECUTE p2") == "denied"
        conn.execute("PREPARE p3 AS SELECT id FROM customers")
        conn.execute("DEALLOCATE ALL")
        assert outcome(conn, "EXECUTE p3") == "denied"


def test_execute_checked_with_the_path_it_was_prepared_with(
    policy_proxy: ProxyProcess,
) -> None:
    # After a SET, PostgreSQL re-plans a prepared statement: which table it reads depends
    # on the plan cache. The proxy checks EXECUTE with both paths: support_agent may
    # read public.customers but not reporting.customers, so it is denied.
    with connect(policy_proxy, "ops_admin") as conn:
        conn.execute("SET search_path TO reporting")
        conn.execute("PREPARE rp AS SELECT id FROM customers")
        conn.execute("SET search_path TO public")
        assert outcome(conn, "EXECUTE rp") == "ok"
        conn.execute("SET ROLE support_agent")
        assert outcome(conn, "EXECUTE rp") == "denied"
        conn.execute("RESET ROLE")


def test_protocol_statement_name_executes_through_sql(policy_proxy: ProxyProcess) -> None:
    with connect(policy_proxy, "support_agent") as conn:
        conn.pgconn.prepare(b"named_one", b"SELECT name FROM customers WHERE id = 1")
        assert outcome(conn, "EXECUTE named_one") == "ok"


# ------------------------------------------------------------------ unparseable text


def test_unparseable_never_reaches_the_server(policy_proxy: ProxyProcess, pg: Any) -> None:
    marker = "strongroom_unparseable_marker"
    with connect(policy_proxy, "support_agent") as conn:
        for sql in (f"SELEC {marker} FROM customers", f"SELECT '{marker}' FROM (",
                    f"DELETE FROM cards WHERE {marker} = 'x"):
            with pytest.raises(psycopg.Error) as info:
                conn.execute(sql)
            assert info.value.sqlstate == "42501" or info.value.sqlstate == "42601"
            assert "strongroom" in str(info.value), "must be refused by the proxy"
    # The server's log shows only the substituted statement, never the text itself.
    assert marker not in pg.log_tail(400)


# ------------------------------------------------------------------ unlisted, default


def test_unlisted_role_gets_nothing(policy_proxy: ProxyProcess) -> None:
    with connect(policy_proxy, "unlisted_user") as conn:
        for sql in ("SELECT 1", "SHOW search_path", "BEGIN", "SELECT * FROM customer_summary"):
            assert outcome(conn, sql) == "denied", sql


def test_default_role_applies_to_unlisted(make_proxy: Any, pg: Any) -> None:
    ensure_schema(pg)
    proxy = make_proxy({**POLICY, "default": "analyst"})
    with connect(proxy, "unlisted_user") as conn:
        assert outcome(conn, "SELECT 1") == "ok"
        assert outcome(conn, "SELECT * FROM reporting.daily_totals") == "ok"
        assert outcome(conn, "SELECT id FROM cards") == "denied"
    with connect(proxy, "support_agent") as conn:  # listed roles keep their own grants
        assert outcome(conn, "SELECT id FROM cards") == "ok"


# ------------------------------------------------------------------ reload


def _wait_log(proxy: ProxyProcess, text: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in proxy.log():
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in proxy log:\n{proxy.log()[-3000:]}")


def test_sighup_reload_applies_to_existing_sessions(make_proxy: Any, pg: Any) -> None:
    ensure_schema(pg)
    proxy = make_proxy(dict(POLICY))
    with connect(proxy, "support_agent") as conn:
        q = "SELECT id FROM cards"
        assert outcome(conn, q) == "ok"
        tighter = {**POLICY, "roles": {**POLICY["roles"], "support_agent": {
            "tables": {"public.customers": ["select"]}}}}
        proxy.write_config({**proxy.config, **tighter})
        proxy.signal(signal.SIGHUP)
        _wait_log(proxy, "configuration reloaded")
        assert outcome(conn, q) == "denied"
        proxy.write_config({**proxy.config, **POLICY})
        proxy.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while outcome(conn, q) != "ok":
            assert time.monotonic() < deadline, "reload back did not apply"
            time.sleep(0.05)
        # A broken policy is rejected; the one in force stays.
        broken = {**POLICY, "roles": {**POLICY["roles"], "support_agent": {
            "tables": {"public.cards": ["select", "fly"]}}}}
        proxy.write_config({**proxy.config, **broken})
        proxy.signal(signal.SIGHUP)
        _wait_log(proxy, "reload rejected")
        assert "fly" in proxy.log()
        assert outcome(conn, q) == "ok"
        assert outcome(conn, "SELECT tax_id FROM customers") == "denied"
    assert proxy.alive()
