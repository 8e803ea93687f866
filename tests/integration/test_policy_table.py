"""Table-driven policy suite: (role, sql, expected outcome) through real drivers.

Every row runs through psycopg and asyncpg, each in the simple and the extended query
protocol, inside ``BEGIN ... ROLLBACK`` on one connection per (driver, role), so the
whole table costs one proxy and a few connections. Outcomes:

* ``ok``    - allowed: must not fail at all;
* ``deny``  - strongroom's refusal: SQLSTATE 42501, message names strongroom, the role
  and (``needle``) the object or kind, and carries no literal value of the statement;
* ``syntax``- text that does not parse: strongroom's 42501 or PostgreSQL's 42601;
* a SQLSTATE - allowed by strongroom, then PostgreSQL's own error (never strongroom's).

A multi-statement row allowed by the policy gets PostgreSQL's 42601 in the extended
protocol (one statement per Parse); a denied one still gets the refusal.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any, NamedTuple

import asyncpg
import psycopg
import pytest
from psycopg import pq

from proxy.sql import analyze
from tests.conftest import ProxyProcess
from tests.integration.policy_env import POLICY, ensure_schema, literal_values, password


class Row(NamedTuple):
    role: str
    sql: str
    expect: str
    needle: str = ""


SA, PS, AN, DBA, OPS, NOBODY = (
    "support_agent", "payments_service", "analyst", "dba_readonly", "ops_admin", "unlisted_user"
)

ROWS: list[Row] = [
    # ---- plain reads, columns, whole-row reads --------------------------------------------
    Row(SA, "SELECT id, name FROM customers", "ok"),
    Row(SA, "SELECT * FROM customers", "deny", "tax_id"),
    Row(SA, "SELECT tax_id FROM customers", "deny", "tax_id"),
    Row(SA, "SELECT id FROM customers WHERE tax_id = '123-45-6789'", "deny", "tax_id"),
    Row(SA, "SELECT id FROM customers ORDER BY tax_id", "deny", "tax_id"),
    Row(SA, "SELECT name, count(*) FROM customers GROUP BY name, tax_id", "deny", "tax_id"),
    Row(SA, "SELECT c FROM customers c", "deny", "tax_id"),
    Row(SA, "SELECT row_to_json(c) FROM customers c", "deny", "tax_id"),
    Row(SA, "SELECT c.* FROM customers c", "deny", "tax_id"),
    Row(SA, "SELECT to_jsonb(customers) FROM customers", "deny", "tax_id"),
    Row(SA, "SELECT customers::text FROM customers", "deny", "tax_id"),
    Row(SA, "SELECT id FROM customers ORDER BY customers", "deny", "tax_id"),
    Row(SA, "SELECT count(*) FROM customers", "ok"),
    Row(SA, "SELECT count(*) FILTER (WHERE tax_id LIKE '999%') FROM customers", "deny", "tax_id"),
    Row(SA, "SELECT pan FROM cards", "ok"),
    Row(SA, "SELECT * FROM cards", "ok"),
    Row(SA, "TABLE cards", "ok"),
    Row(SA, "TABLE customers", "deny", "tax_id"),
    Row(SA, "SELECT * FROM audit_events", "deny", "audit_events"),
    Row(SA, "SELECT 1", "ok"),
    Row(SA, "SELECT now(), version(), current_user", "ok"),
    Row(SA, "VALUES (1, 'a'), (2, 'b')", "ok"),
    Row(SA, "SHOW search_path", "ok"),
    Row(SA, "", "ok"),
    # ---- names: qualified, quoted, case, unicode escapes, catalog, cross-db ---------------
    Row(SA, "SELECT id, name FROM public.customers", "ok"),
    Row(SA, 'SELECT "id" FROM "public"."customers"', "ok"),
    Row(SA, "SELECT ID FROM PUBLIC.CUSTOMERS", "ok"),
    Row(SA, 'SELECT id FROM U&"\\0063ustomers"', "ok"),
    Row(SA, "SELECT id FROM app.public.customers", "ok"),
    Row(SA, "SELECT id FROM otherdb.public.customers", "deny", "cross-database"),
    Row(SA, 'SELECT * FROM public."Cards"', "deny", '"Cards"'),
    Row(SA, 'SELECT * FROM "Cards"', "deny", '"Cards"'),
    Row(SA, "SELECT * FROM reporting.customers", "deny", "reporting.customers"),
    Row(DBA, 'SELECT * FROM "Cards"', "ok"),
    # ---- joins, subqueries, set operations, LIMIT, WHERE false -----------------------------
    Row(SA, "SELECT a.id, c.name FROM accounts a JOIN customers c ON c.id = a.customer_id", "ok"),
    Row(SA, "SELECT a.id FROM accounts a JOIN customers c ON c.tax_id = a.id::text", "deny",
        "tax_id"),
    Row(SA, "SELECT * FROM accounts NATURAL JOIN customers", "deny", "tax_id"),
    Row(SA, "SELECT id FROM accounts WHERE customer_id IN "
            "(SELECT id FROM customers WHERE tax_id LIKE '987%')", "deny", "tax_id"),
    Row(SA, "SELECT id FROM accounts a WHERE EXISTS "
            "(SELECT 1 FROM transactions t WHERE t.account_id = a.id)", "deny", "transactions"),
    Row(SA, "SELECT (SELECT max(amount) FROM transactions) AS m", "deny", "transactions"),
    Row(SA, "SELECT id FROM customers UNION SELECT id FROM reporting.customers", "deny",
        "reporting"),
    Row(SA, "SELECT id FROM customers LIMIT (SELECT count(*) FROM transactions)", "deny",
        "transactions"),
    Row(SA, "SELECT * FROM transactions WHERE false", "deny", "transactions"),
    Row(SA, "SELECT * FROM transactions LIMIT 0", "deny", "transactions"),
    Row(SA, "SELECT id FROM customers WHERE false", "ok"),
    Row(SA, "SELECT x.* FROM (SELECT id, name FROM customers) x", "ok"),
    Row(SA, "SELECT x.id FROM (SELECT * FROM customers) x", "deny", "tax_id"),
    # An alias column list makes the analyzer count any renamed column as the whole row
    # (it has no catalog to map a -> id): over-denial, fail closed.
    Row(SA, "SELECT a FROM customers AS x(a, b, c, d)", "deny", "tax_id"),
    Row(SA, "SELECT d FROM customers AS x(a, b, c, d)", "deny", "tax_id"),
    Row(SA, "SELECT id FROM accounts a, LATERAL (SELECT name FROM customers c "
            "WHERE c.id = a.customer_id) l", "ok"),
    # ---- CTEs -------------------------------------------------------------------------------
    Row(SA, "WITH x AS (SELECT id, name FROM customers) SELECT * FROM x", "ok"),
    Row(SA, "WITH x AS (SELECT * FROM customers) SELECT id FROM x", "deny", "tax_id"),
    Row(SA, "WITH unused AS (SELECT * FROM transactions) SELECT 1", "deny", "transactions"),
    Row(SA, "WITH transactions AS (SELECT 1 AS id) SELECT id FROM transactions", "ok"),
    Row(SA, "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 3) "
            "SELECT n FROM r", "ok"),
    Row(SA, "WITH d AS (DELETE FROM cards WHERE id = 99 RETURNING *) SELECT count(*) FROM d",
        "deny", "delete"),
    Row(PS, "WITH d AS (DELETE FROM accounts WHERE id = 999 RETURNING id) "
            "SELECT count(*) FROM d", "ok"),
    Row(PS, "WITH d AS (DELETE FROM cards WHERE id = 999 RETURNING id) SELECT * FROM d",
        "deny", "delete"),
    Row(PS, "WITH i AS (INSERT INTO audit_events(actor, event) VALUES ('svc', 'card-issued') "
            "RETURNING id) SELECT id FROM i", "ok"),
    Row(SA, "WITH i AS (INSERT INTO audit_events(actor, event) VALUES ('agent-7', 'peek') "
            "RETURNING id) SELECT id FROM i", "deny", "audit_events"),
    # ---- writes, RETURNING, INSERT..SELECT, UPDATE..FROM, DELETE USING, ON CONFLICT --------
    Row(SA, "INSERT INTO audit_events(actor, event) VALUES ('agent-7', 'viewed-card')", "ok"),
    Row(SA, "INSERT INTO audit_events(actor, event) VALUES ('agent-7', 'x') RETURNING id", "deny",
        "audit_events"),
    Row(SA, "UPDATE customers SET name = 'Mallory' WHERE id = 1", "deny", "update"),
    Row(SA, "DELETE FROM cards WHERE id = 1", "deny", "delete"),
    Row(PS, "SELECT * FROM cards", "ok"),
    Row(PS, "UPDATE cards SET expiry = '2032-01-31' WHERE id = 1", "ok"),
    Row(PS, "UPDATE cards SET expiry = '2032-01-31' WHERE id = 1 RETURNING pan", "ok"),
    Row(PS, "INSERT INTO cards VALUES (9, 1, '4000000000000002', '2030-01-31')", "ok"),
    Row(PS, "INSERT INTO cards VALUES (1, 1, '4000000000000002', '2030-01-31') "
            "ON CONFLICT (id) DO UPDATE SET pan = excluded.pan", "ok"),
    Row(PS, "INSERT INTO cards VALUES (1, 1, '4000000000000002', '2030-01-31') "
            "ON CONFLICT DO NOTHING", "ok"),
    Row(PS, "DELETE FROM cards WHERE id = 1", "deny", "delete"),
    Row(PS, "DELETE FROM accounts WHERE id = 999", "ok"),
    Row(PS, "DELETE FROM accounts a USING customers c WHERE c.id = a.customer_id AND c.id = 0",
        "deny", "customers"),
    Row(PS, "UPDATE accounts SET balance = balance - 10 FROM cards "
            "WHERE cards.account_id = accounts.id AND cards.id = 1", "ok"),
    Row(PS, "UPDATE accounts SET balance = 0 FROM customers "
            "WHERE customers.id = accounts.customer_id", "deny", "customers"),
    Row(PS, "INSERT INTO audit_events(actor, event) SELECT 'svc', pan FROM cards", "ok"),
    Row(PS, "INSERT INTO audit_events(actor, event) SELECT 'svc', name FROM customers", "deny",
        "customers"),
    Row(PS, "INSERT INTO customers VALUES (3, 'Eve', 'eve@example.com', '555-55-5555')", "deny",
        "customers"),
    Row(SA, "INSERT INTO audit_events(actor, event) SELECT 'agent-7', tax_id FROM customers",
        "deny", "tax_id"),
    Row(SA, "UPDATE accounts SET balance = 1 WHERE id IN (SELECT customer_id FROM accounts)",
        "deny", "update"),
    # ---- MERGE ------------------------------------------------------------------------------
    Row(PS, "MERGE INTO accounts a USING cards c ON a.id = c.account_id "
            "WHEN MATCHED THEN UPDATE SET balance = 0", "ok"),
    Row(PS, "MERGE INTO accounts a USING cards c ON a.id = c.account_id AND c.id < 0 "
            "WHEN MATCHED THEN DELETE", "ok"),
    Row(PS, "MERGE INTO cards c USING accounts a ON a.id = c.account_id "
            "WHEN MATCHED THEN DELETE", "deny", "delete"),
    Row(PS, "MERGE INTO accounts a USING customers c ON a.customer_id = c.id "
            "WHEN NOT MATCHED THEN INSERT VALUES (c.id, c.id, 0)", "deny", "customers"),
    Row(PS, "MERGE INTO cards c USING (SELECT 7 AS id) s ON c.id = s.id "
            "WHEN NOT MATCHED THEN INSERT VALUES (s.id, 1, '4111111111111111', '2030-01-31')",
        "ok"),
    # ---- partitions, views ------------------------------------------------------------------
    Row(PS, "INSERT INTO transactions VALUES (9, 1, 10, '2024-05-01')", "ok"),
    Row(PS, "INSERT INTO transactions_2024 VALUES (9, 1, 10, '2024-05-01')", "deny",
        "transactions_2024"),
    Row(PS, "SELECT * FROM transactions", "ok"),
    Row(PS, "SELECT * FROM ONLY transactions", "ok"),
    Row(PS, "SELECT * FROM transactions_2025", "deny", "transactions_2025"),
    Row(AN, "SELECT * FROM transactions", "ok"),
    Row(AN, "SELECT * FROM transactions_2024", "deny", "transactions_2024"),
    Row(DBA, "SELECT * FROM transactions_2024", "ok"),
    Row(SA, "SELECT * FROM customer_summary", "ok"),
    Row(AN, "SELECT * FROM customer_summary", "ok"),
    Row(AN, "SELECT * FROM customers", "deny", "customers"),
    Row(PS, "SELECT * FROM customer_summary", "deny", "customer_summary"),
    # ---- EXPLAIN ------------------------------------------------------------------------------
    Row(SA, "EXPLAIN SELECT id FROM customers", "ok"),
    Row(SA, "EXPLAIN SELECT * FROM transactions", "deny", "transactions"),
    Row(SA, "EXPLAIN ANALYZE DELETE FROM cards", "deny", "delete"),
    Row(SA, "EXPLAIN (ANALYZE, FORMAT JSON) SELECT tax_id FROM customers", "deny", "tax_id"),
    Row(PS, "EXPLAIN ANALYZE UPDATE cards SET expiry = expiry WHERE id = -1", "ok"),
    Row(PS, "EXPLAIN ANALYZE DELETE FROM cards WHERE id = -1", "deny", "delete"),
    # ---- PREPARE / EXECUTE / DEALLOCATE, cursors ----------------------------------------------
    Row(SA, "PREPARE sr_p AS SELECT tax_id FROM customers", "deny", "tax_id"),
    Row(SA, "PREPARE sr_ok AS SELECT id FROM customers WHERE id = $1; EXECUTE sr_ok(1); "
            "DEALLOCATE sr_ok", "ok"),
    Row(SA, "PREPARE sr_d AS DELETE FROM cards; EXECUTE sr_d", "deny", "delete"),
    Row(SA, "EXECUTE never_prepared", "deny", "never_prepared"),
    Row(SA, "DECLARE sr_c CURSOR FOR SELECT id, name FROM customers", "ok"),
    Row(SA, "DECLARE sr_c CURSOR FOR SELECT * FROM customers", "deny", "tax_id"),
    Row(SA, "DECLARE sr_c CURSOR FOR SELECT id FROM transactions", "deny", "transactions"),
    Row(SA, "DECLARE sr_c CURSOR FOR SELECT id FROM cards; FETCH 1 FROM sr_c; CLOSE sr_c", "ok"),
    Row(SA, "DEALLOCATE ALL", "ok"),
    # ---- row locks, LOCK, TRUNCATE -------------------------------------------------------------
    Row(SA, "SELECT id FROM customers FOR UPDATE", "deny", "update"),
    Row(SA, "SELECT id FROM customers FOR SHARE", "deny", "update"),
    Row(PS, "SELECT id FROM cards FOR UPDATE", "ok"),
    Row(PS, "SELECT c.id FROM cards c JOIN customer_summary s ON s.id = c.id FOR UPDATE OF c",
        "deny", "customer_summary"),
    Row(PS, "SELECT id FROM transactions FOR UPDATE", "deny", "update"),
    Row(SA, "LOCK TABLE customers IN ACCESS SHARE MODE", "ok"),
    Row(SA, "LOCK TABLE customers", "deny", "customers"),
    Row(SA, "LOCK TABLE customers IN ROW EXCLUSIVE MODE", "deny", "customers"),
    Row(PS, "LOCK TABLE accounts IN ROW EXCLUSIVE MODE", "ok"),
    Row(PS, "LOCK TABLE accounts", "ok"),
    Row(PS, "LOCK TABLE cards IN SHARE MODE", "ok"),
    Row(PS, "LOCK TABLE transactions", "deny", "transactions"),
    Row(PS, "LOCK TABLE transactions IN ROW EXCLUSIVE MODE", "ok"),
    Row(SA, "TRUNCATE cards", "deny", "truncate"),
    Row(PS, "TRUNCATE accounts", "deny", "truncate"),
    Row(OPS, "TRUNCATE audit_events", "ok"),
    Row(OPS, "TRUNCATE accounts CASCADE", "deny", "CASCADE"),
    # ---- COPY -----------------------------------------------------------------------------------
    Row(SA, "COPY customers TO STDOUT", "deny", "copy_out"),
    Row(SA, "COPY (SELECT id FROM customers) TO STDOUT", "deny", "copy_out"),
    Row(SA, "COPY cards FROM STDIN", "deny", "copy_in"),
    Row(AN, "COPY reporting.daily_totals TO STDOUT", "ok"),
    Row(AN, "COPY (SELECT * FROM reporting.daily_totals) TO STDOUT", "ok"),
    Row(AN, "COPY reporting.daily_totals FROM STDIN", "deny", "copy_in"),
    Row(PS, "COPY transactions FROM STDIN", "ok"),
    Row(PS, "COPY transactions TO STDOUT", "deny", "copy_out"),
    Row(DBA, "COPY cards TO STDOUT", "ok"),
    Row(DBA, "COPY customers TO STDOUT", "deny", "tax_id"),
    Row(DBA, "COPY customers (id, name) TO STDOUT", "ok"),
    Row(SA, "COPY customers TO PROGRAM 'cat > /tmp/leak'", "deny", "admin"),
    Row(SA, "COPY cards FROM '/etc/hostname'", "deny", "admin"),
    Row(OPS, "COPY customers TO PROGRAM 'cat > /dev/null'", "42501"),
    # ---- DDL -------------------------------------------------------------------------------------
    Row(SA, "CREATE TABLE sr_t (id int)", "deny", "ddl"),
    Row(SA, "CREATE TEMP TABLE sr_t (id int)", "deny", "ddl"),
    Row(SA, "SELECT id, name INTO sr_copy FROM customers", "deny", "ddl"),
    Row(SA, "CREATE TABLE sr_t AS SELECT id FROM customers", "deny", "ddl"),
    Row(SA, "DROP TABLE customers", "deny", "ddl"),
    Row(SA, "ALTER TABLE customers ADD COLUMN note text", "deny", "ddl"),
    Row(SA, "COMMENT ON TABLE customers IS 'pwned'", "deny", "ddl"),
    Row(SA, "CREATE FUNCTION sr_f() RETURNS int LANGUAGE sql AS 'SELECT 1'", "deny", "ddl"),
    Row(SA, "CREATE EXTENSION IF NOT EXISTS dblink", "deny", "ddl"),
    Row(SA, "ALTER ROLE support_agent SET search_path = reporting", "deny", "ddl"),
    Row(OPS, "CREATE TABLE sr_t (id int)", "ok"),
    Row(OPS, "CREATE TEMP TABLE sr_t (id int)", "ok"),
    Row(OPS, "ALTER TABLE customers ADD COLUMN note text", "ok"),
    Row(OPS, "COMMENT ON TABLE cards IS 'card data'", "ok"),
    Row(OPS, "DROP VIEW customer_summary", "ok"),
    # ---- GRANT / REVOKE / admin ------------------------------------------------------------------
    Row(SA, "GRANT SELECT ON customers TO analyst", "deny", "admin"),
    Row(SA, "REVOKE SELECT ON customers FROM analyst", "deny", "admin"),
    Row(SA, "GRANT ops_admin TO support_agent", "deny", "admin"),
    Row(SA, "ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO analyst", "deny", "admin"),
    Row(SA, "ANALYZE customers", "deny", "admin"),
    Row(SA, "VACUUM customers", "deny", "admin"),
    Row(SA, "ALTER SYSTEM SET work_mem = '64MB'", "deny", "admin"),
    Row(OPS, "GRANT SELECT ON cards TO analyst", "ok"),
    Row(OPS, "REVOKE SELECT ON cards FROM analyst", "ok"),
    Row(OPS, "ANALYZE customers", "ok"),
    Row(OPS, "VACUUM customers", "25001"),
    # ---- SET ROLE and friends --------------------------------------------------------------------
    Row(SA, "SET ROLE ops_admin", "deny", "set_role"),
    Row(SA, "SET LOCAL ROLE ops_admin", "deny", "set_role"),
    Row(SA, "SET role TO 'ops_admin'", "deny", "set_role"),
    Row(SA, "SET SESSION AUTHORIZATION ops_admin", "deny", "set_role"),
    Row(SA, "SET SESSION AUTHORIZATION DEFAULT", "deny", "set_role"),
    Row(SA, "RESET ROLE", "deny", "set_role"),
    Row(SA, "SET ROLE NONE", "deny", "set_role"),
    Row(SA, "RESET SESSION AUTHORIZATION", "deny", "set_role"),
    Row(SA, "SELECT set_config('role', 'ops_admin', false)", "deny", "set_role"),
    Row(SA, "SELECT set_config('ROLE', 'ops_admin', true)", "deny", "set_role"),
    Row(SA, "SELECT pg_catalog.set_config('session_authorization', 'ops_admin', false)",
        "deny", "set_role"),
    Row(SA, "SELECT set_config(name, 'ops_admin', false) FROM (VALUES ('role')) v(name)",
        "deny", "set_config"),
    Row(AN, "SET ROLE support_agent", "deny", "set_role"),
    Row(OPS, "SET ROLE analyst", "ok"),
    Row(OPS, "SET ROLE analyst; SELECT * FROM reporting.daily_totals", "ok"),
    Row(OPS, "SET ROLE analyst; SELECT id FROM customers", "deny", 'role "analyst"'),
    Row(OPS, "SET LOCAL ROLE support_agent; SELECT * FROM customers", "deny",
        'role "support_agent"'),
    Row(OPS, "SELECT set_config('role', 'analyst', false); SELECT id FROM cards", "deny",
        'role "analyst"'),
    Row(OPS, "SET ROLE analyst; RESET ROLE; SELECT id FROM cards", "ok"),
    Row(OPS, "SET ROLE analyst; SET ROLE NONE; SELECT id FROM cards", "ok"),
    Row(OPS, "SELECT * FROM customers", "ok"),
    Row(OPS, "SET SESSION AUTHORIZATION analyst", "42501"),
    # ---- procedural code, functions -------------------------------------------------------------
    Row(SA, "DO $$BEGIN PERFORM 1; END$$", "deny", "do"),
    Row(SA, "CALL recompute()", "deny", "call"),
    Row(SA, "SELECT exfiltrate(name) FROM customers", "deny", "exfiltrate"),
    Row(SA, "SELECT public.exfiltrate('x')", "deny", "exfiltrate"),
    Row(SA, "SELECT id FROM customers WHERE name = exfiltrate('Ada')", "deny", "exfiltrate"),
    Row(SA, "SELECT lo_import('/etc/passwd')", "deny", "lo_import"),
    Row(SA, "SELECT lo_export(1, '/tmp/out')", "deny", "lo_export"),
    Row(SA, "SELECT pg_read_file('/etc/passwd')", "deny", "pg_read_file"),
    Row(SA, "SELECT pg_ls_dir('.')", "deny", "pg_ls_dir"),
    Row(SA, "SELECT query_to_xml('select * from customers', true, true, '')", "deny",
        "query_to_xml"),
    Row(SA, "SELECT pg_terminate_backend(1)", "deny", "pg_terminate_backend"),
    Row(SA, "SELECT upper(name), length(name) FROM customers", "ok"),
    Row(AN, "SELECT reporting.risk_score(1)", "ok"),
    Row(AN, "SELECT risk_score(1)", "deny", "risk_score"),
    Row(DBA, "SELECT reporting.risk_score(2)", "ok"),
    Row(OPS, "DO $$BEGIN PERFORM 1; END$$", "ok"),
    Row(OPS, "CALL recompute()", "ok"),
    Row(OPS, "SELECT exfiltrate('x')", "ok"),
    Row(OPS, "SELECT length(pg_read_file('PG_VERSION')) > 0", "ok"),
    Row(OPS, "SELECT lo_import('/nonexistent/strongroom')", "58P01"),
    # ---- LISTEN / NOTIFY ------------------------------------------------------------------------
    Row(SA, "LISTEN payments", "deny", "listen"),
    Row(SA, "NOTIFY payments, 'card 4111'", "deny", "notify"),
    Row(SA, "SELECT pg_notify('payments', 'card 4111')", "deny", "notify"),
    Row(SA, "UNLISTEN *", "ok"),
    Row(PS, "LISTEN payments", "ok"),
    Row(PS, "NOTIFY payments, 'settled'", "ok"),
    Row(PS, "SELECT pg_notify('payments', 'settled')", "ok"),
    # ---- two-phase commit (max_prepared_transactions = 0 on the test cluster) -------------------
    Row(SA, "PREPARE TRANSACTION 'sr_gid'", "deny", "prepare_transaction"),
    Row(SA, "COMMIT PREPARED 'sr_gid'", "deny", "prepare_transaction"),
    Row(SA, "ROLLBACK PREPARED 'sr_gid'", "deny", "prepare_transaction"),
    Row(OPS, "PREPARE TRANSACTION 'sr_gid'", "55000"),
    Row(OPS, "COMMIT PREPARED 'sr_gid'", "25001"),
    # ---- catalogs -------------------------------------------------------------------------------
    Row(SA, "SELECT relname FROM pg_class WHERE relname = 'customers'", "ok"),
    Row(SA, "SELECT table_name FROM information_schema.tables", "ok"),
    Row(SA, "SELECT rolname, rolpassword FROM pg_authid", "deny", "pg_authid"),
    Row(SA, "SELECT * FROM pg_catalog.pg_shadow", "deny", "pg_shadow"),
    Row(SA, "SELECT * FROM pg_stats", "deny", "pg_stats"),
    Row(SA, "SELECT * FROM pg_largeobject", "deny", "pg_largeobject"),
    Row(OPS, "SELECT * FROM pg_authid", "deny", "pg_authid"),
    # ---- multi-statement strings ----------------------------------------------------------------
    Row(SA, "SELECT 1; SELECT * FROM transactions", "deny", "statement 2"),
    Row(SA, "SELECT id FROM customers; SELECT name FROM customers", "ok"),
    Row(SA, "INSERT INTO audit_events(actor, event) VALUES ('agent-7', 'first'); "
            "DELETE FROM cards", "deny", "statement 2"),
    # ---- search_path (inside one string; session tracking has its own tests) ---------------------
    Row(SA, "SET search_path TO reporting", "ok"),
    Row(SA, "SET search_path TO reporting; SELECT * FROM customers", "deny", "reporting"),
    Row(SA, "SET search_path TO reporting, public; SELECT id FROM customers", "deny",
        "reporting"),
    Row(AN, "SET search_path = reporting; SELECT * FROM daily_totals", "ok"),
    Row(AN, "SELECT * FROM daily_totals", "deny", "daily_totals"),
    Row(AN, "SELECT set_config('search_path', 'reporting', false); SELECT * FROM customers",
        "ok"),
    Row(SA, 'SET search_path = "$user", public; SELECT id FROM customers', "ok"),
    Row(SA, "SET search_path = reporting; RESET search_path; SELECT id FROM customers", "ok"),
    Row(SA, "SELECT set_config('search_path', current_setting('search_path'), false)", "deny",
        "search_path"),
    # ---- transaction control and ordinary settings are always allowed for a listed role --------
    Row(SA, "SAVEPOINT s1", "ok"),
    Row(SA, "SAVEPOINT s1; RELEASE s1", "ok"),
    Row(SA, "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ", "ok"),
    Row(SA, "SET statement_timeout = '5s'", "ok"),
    Row(SA, "SET LOCAL work_mem = '8MB'", "ok"),
    Row(SA, "DISCARD ALL", "25001"),
    Row(SA, "DISCARD TEMP", "ok"),
    # ---- text that does not parse ---------------------------------------------------------------
    Row(SA, "SELEC * FROM customers", "syntax"),
    Row(SA, "SELECT * FROM customers WHERE", "syntax"),
    Row(SA, "SELECT 1; DELETE FROM cards WHERE (", "syntax"),
    # ---- unlisted role: nothing at all ----------------------------------------------------------
    Row(NOBODY, "SELECT 1", "deny", "not in the policy"),
    Row(NOBODY, "SELECT id FROM customer_summary", "deny", "not in the policy"),
    Row(NOBODY, "SHOW search_path", "deny", "not in the policy"),
    Row(NOBODY, "BEGIN", "deny", "not in the policy"),
]

MODES = ("psycopg-simple", "psycopg-extended", "asyncpg-simple", "asyncpg-extended")


def _is_multi(sql: str) -> bool:
    try:
        return len(analyze(sql).statements) > 1
    except Exception:
        return False


def expected(row: Row, mode: str) -> str:
    if row.expect == "ok" and mode.endswith("extended") and _is_multi(row.sql):
        return "42601"  # one statement per Parse: PostgreSQL's own error
    return row.expect


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def policy_proxy(pg: Any) -> Iterator[ProxyProcess]:
    ensure_schema(pg)
    p = ProxyProcess(pg, dict(POLICY)).start()
    yield p
    p.stop()


class Outcome(NamedTuple):
    sqlstate: str | None
    message: str


def _pq_run(conn: psycopg.Connection, sql: str, simple: bool) -> Outcome:
    """libpq directly: simple Query, or Parse/Bind/Execute/Sync; COPY in both directions."""
    pgc = conn.pgconn
    if simple:
        pgc.send_query(sql.encode())
    else:
        pgc.send_query_params(sql.encode(), None)
    error: Outcome | None = None
    while True:
        res = pgc.get_result()
        if res is None:
            break
        if res.status == pq.ExecStatus.COPY_OUT:
            while pgc.get_copy_data(0)[0] >= 0:
                pass
        elif res.status == pq.ExecStatus.COPY_IN:
            pgc.put_copy_end()
        elif res.status == pq.ExecStatus.FATAL_ERROR and error is None:
            error = Outcome(
                (res.error_field(pq.DiagnosticField.SQLSTATE) or b"").decode(),
                (res.error_field(pq.DiagnosticField.MESSAGE_PRIMARY) or b"").decode(),
            )
    return error or Outcome(None, "")


def _psycopg_run(conn: psycopg.Connection, sql: str, mode: str) -> Outcome:
    # Not conn.execute(): without parameters psycopg sends a simple Query. libpq's
    # PQsendQueryParams always speaks Parse/Bind/Describe/Execute/Sync.
    return _pq_run(conn, sql, simple=mode == "psycopg-simple")


async def _asyncpg_run(conn: asyncpg.Connection, sql: str, mode: str) -> Outcome:
    try:
        if mode == "asyncpg-simple":
            await asyncio.wait_for(conn.execute(sql), 10)
        else:
            await asyncio.wait_for(conn.fetch(sql), 10)
    except asyncpg.PostgresError as exc:
        return Outcome(exc.sqlstate, str(exc))
    return Outcome(None, "")


def _is_copy_stdio(sql: str) -> bool:
    up = sql.upper()
    return up.lstrip().startswith("COPY") and ("STDIN" in up or "STDOUT" in up)


class Clients:
    """One connection per (driver, role), opened on first use."""

    def __init__(self, proxy: ProxyProcess) -> None:
        self.proxy = proxy
        self.pg: dict[str, psycopg.Connection] = {}
        self.apg: dict[str, asyncpg.Connection] = {}

    def psycopg(self, role: str) -> psycopg.Connection:
        conn = self.pg.get(role)
        if conn is None or conn.closed:
            conn = psycopg.connect(
                self.proxy.conninfo(user=role, password=password(role)), autocommit=True,
                prepare_threshold=None,  # DEALLOCATE ALL rows must not break its cache
            )
            self.pg[role] = conn
        return conn

    async def asyncpg(self, role: str) -> asyncpg.Connection:
        conn = self.apg.get(role)
        if conn is None or conn.is_closed():
            conn = await asyncpg.connect(
                self.proxy.dsn(user=role, password=password(role)), statement_cache_size=0
            )
            self.apg[role] = conn
        return conn


@pytest.fixture(scope="module")
def clients(policy_proxy: ProxyProcess) -> Iterator[Clients]:
    c = Clients(policy_proxy)
    yield c
    for conn in c.pg.values():
        conn.close()
    for aconn in c.apg.values():
        aconn.terminate()


async def run_row(clients: Clients, row: Row, mode: str) -> Outcome:
    wrap = row.role != NOBODY  # an unlisted role may not even BEGIN
    if mode.startswith("psycopg"):
        conn = clients.psycopg(row.role)
        if wrap:
            conn.execute("BEGIN")
        out = _psycopg_run(conn, row.sql, mode)
        if wrap:
            conn.execute("ROLLBACK")
        status = conn.info.transaction_status
        assert status == pq.TransactionStatus.IDLE, f"connection left in {status!r}"
        return out
    aconn = await clients.asyncpg(row.role)
    if wrap:
        await aconn.execute("BEGIN")
    out = await _asyncpg_run(aconn, row.sql, mode)
    if wrap:
        await aconn.execute("ROLLBACK")
    assert not aconn.is_in_transaction()
    return out


def check(row: Row, mode: str, out: Outcome) -> None:
    want = expected(row, mode)
    where = f"[{mode}] {row.role}: {row.sql!r} -> {out}"
    is_refusal = out.sqlstate == "42501" and "strongroom" in out.message
    if want == "ok":
        assert out.sqlstate is None, f"expected success: {where}"
    elif want == "deny":
        assert is_refusal, f"expected a strongroom denial: {where}"
        # The role in effect: the login role, or the one a SET ROLE in the string chose.
        named = row.needle if row.needle.startswith('role "') else f'role "{row.role}"'
        assert named in out.message, where
        if row.needle:
            assert row.needle in out.message, f"message should name {row.needle!r}: {where}"
        for value in literal_values(row.sql):
            assert value not in out.message, f"message leaks a literal: {where}"
    elif want == "syntax":
        assert is_refusal or out.sqlstate == "42601", f"expected denial or 42601: {where}"
    else:
        assert out.sqlstate == want and not is_refusal, f"expected PostgreSQL {want}: {where}"


def _id(row: Row) -> str:
    return f"{row.role}:{row.sql[:60]}"


def test_table_size() -> None:
    assert len(ROWS) >= 150
    roles = {r.role for r in ROWS}
    assert roles == {SA, PS, AN, DBA, OPS, NOBODY}
    assert {r.expect for r in ROWS} >= {"ok", "deny", "syntax"}


def _runnable(row: Row, mode: str) -> bool:
    """Combinations a driver cannot express are not generated (rather than skipped):
    asyncpg's execute() fails on an EmptyQueryResponse by itself, and asyncpg runs COPY
    only through its copy_* API. psycopg runs those rows in both protocols."""
    if row.sql == "" and mode == "asyncpg-simple":
        return False
    return not (mode.startswith("asyncpg") and row.expect != "deny" and _is_copy_stdio(row.sql))


@pytest.mark.parametrize(
    ("row", "mode"),
    [
        pytest.param(row, mode, id=f"{_id(row)}-{mode}")
        for row in ROWS
        for mode in MODES
        if _runnable(row, mode)
    ],
)
async def test_row(clients: Clients, row: Row, mode: str) -> None:
    check(row, mode, await run_row(clients, row, mode))
