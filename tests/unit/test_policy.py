"""Policy decisions, table-driven: (sql, role, allowed) rows per POLICY-SEMANTICS.md category."""

from __future__ import annotations

import time

import pytest

from proxy.policy import (
    ColumnView,
    Environment,
    Policy,
    PolicyCache,
    PolicyError,
    decide,
    search_path_after,
)
from proxy.sql import analyze
from proxy.sql.info import StatementInfo

POLICY_DICT = {
    "roles": {
        "base_reader": {"tables": {"public.orders": ["select"]}},
        "support_agent": {
            "inherits": ["base_reader"],
            "tables": {
                "public.customers": ["select"],
                "public.cards": ["select"],
                "reporting.*": ["select"],
            },
            "columns": {"public.cards.pan": "masked", "public.customers.tax_id": "deny"},
            "allow": ["listen"],
            "functions": ["public.my_func"],
        },
        "payments": {
            "tables": {
                "public.cards": ["select", "insert", "update"],
                "public.customers": ["select"],
                "public.audit": ["insert"],
            },
            "columns": {"public.cards.pan": "plaintext"},
        },
        "writer": {
            "tables": {
                "public.orders": ["select", "insert", "update", "delete", "truncate"],
                "public.customers": ["select"],
            },
            "columns": {"public.customers.tax_id": "deny"},
        },
        "updater": {"tables": {"public.orders": ["update", "delete"], "public.items": ["insert"]}},
        "etl": {
            "tables": {
                "public.cards": ["select", "copy_out"],
                "public.orders": ["select", "insert", "copy_in"],
            },
            "columns": {"public.cards.pan": "ciphertext"},
        },
        "ops": {
            "tables": {"public.orders": ["select"]},
            "allow": [
                "ddl",
                "admin",
                "do",
                "call",
                "set_role",
                "listen",
                "notify",
                "prepare_transaction",
            ],
            "functions": ["public.proc1"],
        },
        "quoted": {"tables": {'public."Cards"': ["select"], '"Sales"."Q1"': ["select"]}},
        "locker": {
            "tables": {
                "public.orders": ["select"],
                "public.customers": ["insert"],
                "public.cards": ["delete"],
            },
            "columns": {"public.customers.tax_id": "deny"},
        },
        "mixed": {"tables": {"public.orders": ["select"], "secret.orders": ["select"]}},
        "lobs": {"allow": ["large_objects"]},
    },
    "default": "deny",
}

POLICY = Policy.from_dict(POLICY_DICT)
ENV = Environment(
    existing_schemas=frozenset(
        {"public", "reporting", "Sales", "secret", "pg_catalog", "information_schema"}
    )
)
PATH = ("$user", "public")
DB = "app"

Y, N = True, False
SA, PAY, WR, UPD, ETL, OPS, Q, LK, MIX = (
    "support_agent",
    "payments",
    "writer",
    "updater",
    "etl",
    "ops",
    "quoted",
    "locker",
    "mixed",
)

CASES: list[tuple[str, str, bool]] = [
    # --- plain reads, kinds --------------------------------------------------------
    ("SELECT name FROM customers", SA, Y),
    ("SELECT name FROM public.customers", SA, Y),
    ("SELECT id FROM orders", SA, Y),  # inherited from base_reader
    ("SELECT id FROM secrets", SA, N),
    ("SELECT id FROM public.secrets", SA, N),
    ("TABLE orders", SA, Y),
    ("TABLE customers", SA, N),  # whole row includes tax_id (deny)
    ("SELECT * FROM reporting.daily", SA, Y),  # schema wildcard
    ("SELECT * FROM reporting.daily JOIN reporting.weekly USING (d)", SA, Y),
    ("SELECT 1", SA, Y),
    ("VALUES (1), (2)", SA, Y),
    ("SELECT now(), lower('X'), count(*) FROM orders", SA, Y),
    ("SELECT 1", "nobody", N),  # unlisted role, default deny
    ("", SA, Y),
    (";", SA, Y),
    ("SELECT * FROM orders LIMIT (SELECT count(*) FROM secrets)", SA, N),
    ("SELECT * FROM orders WHERE false AND id IN (SELECT id FROM secrets)", SA, N),
    ("SELECT * FROM orders LIMIT 0", SA, Y),
    ("SELECT id FROM orders UNION SELECT id FROM secrets", SA, N),
    ("SELECT id FROM orders UNION ALL SELECT id FROM cards", SA, Y),
    ("SELECT (SELECT max(id) FROM secrets) FROM orders", SA, N),
    ("SELECT * FROM (SELECT id FROM secrets) s", SA, N),
    ("SELECT * FROM orders o, LATERAL (SELECT 1 FROM secrets) x", SA, N),
    ("VALUES ((SELECT 1 FROM secrets))", SA, N),
    # --- writes ------------------------------------------------------------------
    ("INSERT INTO orders (id) VALUES (1)", WR, Y),
    ("INSERT INTO orders (id) VALUES (1)", SA, N),
    ("INSERT INTO orders (id) SELECT id FROM customers", WR, Y),
    ("INSERT INTO orders (id) SELECT tax_id FROM customers", WR, N),
    ("INSERT INTO orders (id) SELECT id FROM secrets", WR, N),
    ("UPDATE orders SET status = 'x' WHERE id = 1", WR, Y),
    ("UPDATE orders SET status = 'x'", UPD, Y),  # no read of the target
    ("UPDATE orders SET status = 'x' WHERE id = 1", UPD, N),  # WHERE reads -> needs select
    ("DELETE FROM orders", UPD, Y),
    ("DELETE FROM orders WHERE id = 1", UPD, N),
    ("DELETE FROM orders WHERE id = 1", WR, Y),
    ("DELETE FROM orders USING customers c WHERE c.id = orders.cid", WR, Y),
    ("DELETE FROM orders USING secrets s WHERE s.id = orders.sid", WR, N),
    ("UPDATE orders SET cid = c.id FROM customers c WHERE c.name = orders.n", WR, Y),
    ("UPDATE orders SET cid = c.tax_id FROM customers c", WR, N),
    ("UPDATE orders o SET x = 1 FROM customers c WHERE c.tax_id = o.t", WR, N),
    ("INSERT INTO orders (id) VALUES (1) RETURNING id", WR, Y),
    ("INSERT INTO orders (id) VALUES (1) RETURNING *", WR, Y),
    ("INSERT INTO items (id) VALUES (1) RETURNING id", UPD, N),  # RETURNING needs select
    ("INSERT INTO items (id) VALUES (1)", UPD, Y),
    ("INSERT INTO items VALUES (1)", UPD, Y),
    ("INSERT INTO orders (id) VALUES (1) ON CONFLICT DO NOTHING", WR, Y),
    ("INSERT INTO items (id) VALUES (1) ON CONFLICT DO NOTHING", UPD, Y),
    ("INSERT INTO items (id) VALUES (1) ON CONFLICT (id) DO UPDATE SET id = 2", UPD, N),
    ("INSERT INTO orders (id) VALUES (1) ON CONFLICT (id) DO UPDATE SET n = excluded.n", WR, Y),
    ("INSERT INTO cards (id) VALUES (1) ON CONFLICT (id) DO UPDATE SET n = 1", PAY, Y),
    ("INSERT INTO customers (id) VALUES (1) ON CONFLICT (id) DO UPDATE SET n = 1", PAY, N),
    ("INSERT INTO audit (x) VALUES (1)", PAY, Y),
    ("UPDATE cards SET pan = '1' WHERE id = 1", PAY, Y),
    ("UPDATE orders SET status = 'x' WHERE id = 1 RETURNING *", WR, Y),
    # --- deny columns: every reading position ---------------------------------------
    ("SELECT tax_id FROM customers", SA, N),
    ("SELECT c.tax_id FROM customers c", SA, N),
    ("SELECT public.customers.tax_id FROM public.customers", SA, N),
    ("SELECT name FROM customers WHERE tax_id = '1'", SA, N),
    ("SELECT name FROM customers ORDER BY tax_id", SA, N),
    ("SELECT count(*) FROM customers GROUP BY tax_id", SA, N),
    ("SELECT count(*) FROM customers GROUP BY name HAVING max(tax_id) > '1'", SA, N),
    ("SELECT DISTINCT ON (tax_id) name FROM customers", SA, N),
    ("SELECT string_agg(name, ',' ORDER BY tax_id) FROM customers", SA, N),
    ("SELECT count(*) FILTER (WHERE tax_id > '1') FROM customers", SA, N),
    ("SELECT rank() OVER (PARTITION BY tax_id) FROM customers", SA, N),
    ("SELECT rank() OVER w FROM customers WINDOW w AS (ORDER BY tax_id)", SA, N),
    ("SELECT o.id FROM orders o JOIN customers c ON c.tax_id = o.x", SA, N),
    ("SELECT o.id FROM orders o JOIN customers c USING (tax_id)", SA, N),
    ("SELECT o.id FROM orders o NATURAL JOIN customers c", SA, N),
    ("SELECT o.id FROM orders o JOIN customers c USING (id)", SA, Y),
    ("SELECT lower(tax_id) FROM customers", SA, N),
    (
        "SELECT id FROM orders o WHERE EXISTS (SELECT 1 FROM customers c WHERE c.tax_id = 'x')",
        SA,
        N,
    ),
    ("SELECT (SELECT c.tax_id FROM customers c LIMIT 1)", SA, N),
    ("SELECT id FROM customers c WHERE id IN (SELECT id FROM orders WHERE x = c.tax_id)", SA, N),
    ("SELECT name FROM customers", SA, Y),
    ("SELECT c.name, c.id FROM customers c WHERE c.name LIKE 'a%' ORDER BY c.id", SA, Y),
    # whole-row reads
    ("SELECT * FROM customers", SA, N),
    ("SELECT c.* FROM customers c", SA, N),
    ("SELECT (c).* FROM customers c", SA, N),
    ("SELECT (c).tax_id FROM customers c", SA, N),
    ("SELECT (c).name FROM customers c", SA, Y),
    ("SELECT ROW(c.*) FROM customers c", SA, N),
    ("SELECT row_to_json(c) FROM customers c", SA, N),
    ("SELECT to_jsonb(customers) FROM customers", SA, N),
    ("SELECT json_agg(c) FROM customers c", SA, N),
    ("SELECT c::text FROM customers c", SA, N),
    ("SELECT customers FROM customers", SA, N),
    ("SELECT name FROM customers ORDER BY customers", SA, N),
    ("SELECT count(*) FROM customers", SA, Y),
    ("SELECT FROM customers", SA, Y),
    ("SELECT name FROM (SELECT * FROM customers) s", SA, N),
    ("WITH s AS (SELECT * FROM customers) SELECT name FROM s", SA, N),
    ("WITH s AS (SELECT name FROM customers) SELECT * FROM s", SA, Y),
    ("SELECT x FROM customers AS c(a, b, x)", SA, N),  # alias hides which column: ALL
    ("SELECT * FROM cards", SA, Y),  # masked is readable
    ("SELECT pan FROM cards", ETL, Y),  # ciphertext readable
    ("SELECT name FROM customers RETURNING", SA, N),  # syntax error -> denied
    ("UPDATE orders SET x = 1 RETURNING (SELECT tax_id FROM customers LIMIT 1)", WR, N),
    ("DELETE FROM orders WHERE cid IN (SELECT id FROM customers WHERE tax_id = '1')", WR, N),
    (
        "INSERT INTO orders (id) VALUES (1) ON CONFLICT (id) DO UPDATE SET x = "
        "(SELECT tax_id FROM customers LIMIT 1)",
        WR,
        N,
    ),
    ("UPDATE orders SET x = (SELECT tax_id FROM customers LIMIT 1)", WR, N),
    ("INSERT INTO customers (tax_id) VALUES ('1')", LK, Y),  # writing is not reading
    # --- CTEs ---------------------------------------------------------------------
    ("WITH secrets AS (SELECT 1 AS id) SELECT id FROM secrets", SA, Y),
    ("WITH x AS (SELECT 1) SELECT id FROM secrets", SA, N),
    ("WITH x AS (SELECT * FROM secrets) SELECT 1", SA, N),  # unreferenced CTE still checked
    ("WITH secrets AS (SELECT 1) SELECT * FROM public.secrets", SA, N),  # qualified: real table
    ("WITH a AS (SELECT * FROM secrets), secrets AS (SELECT 1) SELECT * FROM a", SA, N),
    ("WITH RECURSIVE a AS (SELECT * FROM secrets), secrets AS (SELECT 1) SELECT * FROM a", SA, Y),
    ("WITH secrets AS (SELECT 1), a AS (SELECT * FROM secrets) SELECT * FROM a", SA, Y),
    ("SELECT * FROM (WITH secrets AS (SELECT 1) SELECT * FROM secrets) s", SA, Y),
    ("SELECT * FROM (WITH secrets AS (SELECT 1) SELECT 1) s, secrets", SA, N),  # not visible
    ("WITH secrets AS (SELECT 1) SELECT (SELECT count(*) FROM secrets)", SA, Y),  # below
    (
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 5) "
        "SELECT * FROM r",
        SA,
        Y,
    ),
    ("WITH d AS (DELETE FROM orders RETURNING *) SELECT * FROM d", SA, N),
    ("WITH d AS (DELETE FROM orders RETURNING *) SELECT * FROM d", WR, Y),
    ("WITH d AS (DELETE FROM orders RETURNING *) SELECT * FROM d", UPD, N),  # RETURNING reads
    ("WITH i AS (INSERT INTO orders (id) VALUES (1) RETURNING id) SELECT * FROM i", SA, N),
    ("WITH u AS (UPDATE orders SET x = 1 RETURNING id) SELECT count(*) FROM u", WR, Y),
    ("WITH orders AS (SELECT 1) DELETE FROM orders", SA, N),  # DML target is never a CTE
    ("WITH orders AS (SELECT 1) INSERT INTO orders VALUES (1)", SA, N),
    # --- names: quoting, U&, search_path, catalogs -----------------------------------------
    ('SELECT * FROM "Cards"', Q, Y),
    ('SELECT * FROM public."Cards"', Q, Y),
    ("SELECT * FROM cards", Q, N),  # public.cards is not public."Cards"
    ('SELECT * FROM "cards"', SA, Y),
    ('SELECT * FROM "CARDS"', SA, N),
    ('SELECT * FROM U&"\\0063ards"', SA, Y),
    ('SELECT * FROM U&"C\\0061rds"', Q, Y),
    ('SELECT * FROM "Sales"."Q1"', Q, Y),
    ("SELECT * FROM sales.q1", Q, N),
    ("SELECT * FROM app.public.orders", SA, Y),  # current database
    ("SELECT * FROM other.public.orders", SA, N),
    ("SELECT * FROM orders", MIX, Y),
    ("SELECT * FROM pg_class", SA, Y),
    ("SELECT * FROM pg_catalog.pg_class", SA, Y),
    ("SELECT * FROM information_schema.tables", SA, Y),
    ("SELECT * FROM pg_authid", SA, N),
    ("SELECT * FROM pg_catalog.pg_shadow", SA, N),
    ("SELECT * FROM pg_stats", SA, N),
    ("SELECT * FROM pg_catalog.pg_statistic", SA, N),
    ("SELECT * FROM pg_largeobject", SA, N),
    ("SELECT * FROM pg_user_mapping", SA, N),
    ("SELECT * FROM pg_roles", SA, Y),
    ("DELETE FROM pg_class", SA, N),
    ("SELECT * FROM pg_class", "nobody", N),
    # --- functions --------------------------------------------------------------------
    ("SELECT my_func()", SA, Y),
    ("SELECT public.my_func()", SA, Y),
    ("SELECT other_func()", SA, N),
    ("SELECT public.other_func()", SA, N),
    ("SELECT * FROM orders WHERE id = public.other_func()", SA, N),
    ("SELECT pg_read_file('/etc/passwd')", SA, N),
    ("SELECT pg_catalog.pg_read_file('/etc/passwd')", SA, N),
    ("SELECT pg_read_binary_file('x')", SA, N),
    ("SELECT pg_ls_dir('.')", SA, N),
    ("SELECT pg_ls_waldir()", SA, N),
    ("SELECT pg_stat_file('x')", SA, N),
    ("SELECT lo_import('/etc/passwd')", SA, N),
    ("SELECT lo_export(1, '/tmp/x')", SA, N),
    ("SELECT loread(0, 1)", SA, N),
    ("SELECT lo_get(1)", SA, N),
    ("SELECT pg_terminate_backend(1)", SA, N),
    ("SELECT pg_cancel_backend(1)", SA, N),
    ("SELECT pg_reload_conf()", SA, N),
    ("SELECT pg_rotate_logfile()", SA, N),
    ("SELECT query_to_xml('select * from secrets', true, true, '')", SA, N),
    ("SELECT table_to_xml('secrets', true, true, '')", SA, N),
    ("SELECT cursor_to_xml('c', 1, true, true, '')", SA, N),
    ("SELECT * FROM ts_stat('select v from secrets')", SA, N),
    ("SELECT dblink('host=x', 'select 1')", SA, N),
    ("SELECT public.dblink_exec('x')", SA, N),
    ("SELECT pg_read_file('x')", OPS, Y),  # admin may
    ("SELECT lo_import('/tmp/x')", OPS, Y),
    # large objects: allow large_objects (or admin); server files stay admin
    ("SELECT lo_creat(-1)", SA, N),
    ("SELECT lo_creat(-1)", "lobs", Y),
    ("SELECT lo_open(1, 262144), loread(0, 1), lowrite(0, 'x'), lo_close(0)", "lobs", Y),
    ("SELECT lo_get(1), lo_put(1, 0, 'x'), lo_from_bytea(0, 'x'), lo_unlink(1)", "lobs", Y),
    ("SELECT pg_catalog.lo_lseek64(0, 0, 0), lo_tell(0), lo_truncate(0, 1)", "lobs", Y),
    ("SELECT lo_import('/etc/passwd')", "lobs", N),
    ("SELECT lo_export(1, '/tmp/x')", "lobs", N),
    ("SELECT pg_read_file('x')", "lobs", N),
    ("SELECT loread(0, 1)", OPS, Y),
    ("SELECT 1 OPERATOR(public.+) 2", SA, N),
    ("SELECT 1 OPERATOR(pg_catalog.+) 2", SA, Y),
    ("SELECT * FROM generate_series(1, 3)", SA, Y),
    ("SELECT * FROM generate_series(1, (SELECT count(*) FROM secrets))", SA, N),
    # set_config
    ("SELECT set_config('search_path', 'reporting', false)", SA, Y),
    ("SELECT set_config('search_path', 'reporting', true)", SA, Y),
    ("SELECT set_config('application_name', 'x', false)", SA, Y),
    ("SELECT set_config('role', 'admin', false)", SA, N),
    ("SELECT set_config('ROLE', 'admin', false)", SA, N),
    ("SELECT pg_catalog.set_config('session_authorization', 'x', true)", SA, N),
    ("SELECT set_config('role', 'x', false)", OPS, Y),
    ("SELECT set_config(name, 'x', false) FROM orders", SA, N),
    ("SELECT set_config('ro' || 'le', 'x', false)", SA, N),
    ("SELECT set_config('search_path', current_user, false)", SA, N),
    # --- statement kinds ---------------------------------------------------------------
    ("SHOW search_path", SA, Y),
    ("SET search_path TO reporting, public", SA, Y),
    ("SET LOCAL search_path = public", SA, Y),
    ("RESET search_path", SA, Y),
    ("SET search_path TO DEFAULT", SA, Y),
    ("SET statement_timeout = 1000", SA, Y),
    ("RESET ALL", SA, Y),
    ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", SA, Y),
    ("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY", SA, Y),
    ("BEGIN", SA, Y),
    ("START TRANSACTION READ ONLY", SA, Y),
    ("COMMIT", SA, Y),
    ("ROLLBACK", SA, Y),
    ("SAVEPOINT a", SA, Y),
    ("RELEASE SAVEPOINT a", SA, Y),
    ("ROLLBACK TO SAVEPOINT a", SA, Y),
    ("DISCARD ALL", SA, Y),
    ("DEALLOCATE ALL", SA, Y),
    ("CLOSE ALL", SA, Y),
    ("BEGIN", "nobody", N),
    # set_role spellings
    ("SET ROLE admin", SA, N),
    ("SET SESSION ROLE admin", SA, N),
    ("SET LOCAL ROLE admin", SA, N),
    ("RESET ROLE", SA, N),
    ("SET ROLE NONE", SA, N),
    ("SET SESSION AUTHORIZATION admin", SA, N),
    ("SET SESSION AUTHORIZATION DEFAULT", SA, N),
    ("RESET SESSION AUTHORIZATION", SA, N),
    ('SET "ROLE" TO admin', SA, N),
    ("SET role = 'admin'", SA, N),
    ("SET ROLE admin", OPS, Y),
    # two-phase commit
    ("PREPARE TRANSACTION 'g1'", SA, N),
    ("COMMIT PREPARED 'g1'", SA, N),
    ("ROLLBACK PREPARED 'g1'", SA, N),
    ("PREPARE TRANSACTION 'g1'", OPS, Y),
    ("COMMIT PREPARED 'g1'", OPS, Y),
    # LISTEN / NOTIFY
    ("LISTEN ch", SA, Y),
    ("LISTEN ch", PAY, N),
    ("NOTIFY ch", SA, N),
    ("NOTIFY ch, 'x'", OPS, Y),
    ("SELECT pg_notify('ch', 'x')", SA, N),
    ("SELECT pg_notify('ch', 'x')", OPS, Y),
    ("UNLISTEN *", PAY, Y),
    # DO / CALL
    ("DO $$BEGIN PERFORM 1; END$$", SA, N),
    ("DO $$BEGIN PERFORM 1; END$$", OPS, Y),
    ("CALL proc1()", SA, N),
    ("CALL proc1()", OPS, Y),
    ("CALL proc2()", OPS, N),  # not in functions
    # DDL / admin
    ("CREATE TABLE t (a int)", SA, N),
    ("CREATE TEMP TABLE t (a int)", SA, N),
    ("CREATE TABLE t (a int)", OPS, Y),
    ("ALTER TABLE orders ADD COLUMN x int", SA, N),
    ("DROP TABLE orders", SA, N),
    ("COMMENT ON TABLE orders IS 'x'", SA, N),
    ("SELECT * INTO newtab FROM orders", SA, N),
    ("SELECT * INTO newtab FROM orders", OPS, Y),
    ("CREATE TABLE x AS SELECT * FROM secrets", OPS, N),
    ("CREATE VIEW v AS SELECT * FROM orders", OPS, Y),
    ("ALTER ROLE support_agent SUPERUSER", SA, N),
    ("CREATE EXTENSION dblink", SA, N),
    ("GRANT SELECT ON secrets TO support_agent", SA, N),
    ("REVOKE SELECT ON orders FROM public", SA, N),
    ("ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO public", SA, N),
    ("ALTER SYSTEM SET work_mem = '1GB'", SA, N),
    ("VACUUM orders", SA, N),
    ("ANALYZE orders", SA, N),
    ("REINDEX TABLE orders", SA, N),
    ("CLUSTER orders", SA, N),
    ("CHECKPOINT", SA, N),
    ("CHECKPOINT", OPS, Y),
    ("GRANT SELECT ON orders TO x", OPS, Y),
    # LOCK
    ("LOCK TABLE orders IN ACCESS SHARE MODE", SA, Y),
    ("LOCK TABLE orders", SA, N),  # ACCESS EXCLUSIVE
    ("LOCK TABLE orders IN ROW EXCLUSIVE MODE", SA, N),
    ("LOCK TABLE customers IN ROW EXCLUSIVE MODE", LK, Y),  # insert suffices
    ("LOCK TABLE customers IN SHARE MODE", LK, N),
    ("LOCK TABLE cards IN EXCLUSIVE MODE", LK, Y),  # delete suffices
    ("LOCK TABLE cards IN ACCESS EXCLUSIVE MODE", LK, Y),
    ("LOCK TABLE orders IN ROW SHARE MODE", LK, N),
    ("LOCK TABLE orders, secrets IN ACCESS SHARE MODE", SA, N),
    # row locks
    ("SELECT * FROM orders FOR UPDATE", SA, N),
    ("SELECT * FROM orders FOR SHARE", SA, N),
    ("SELECT * FROM orders FOR KEY SHARE", SA, N),
    ("SELECT * FROM orders FOR UPDATE", WR, Y),
    ("SELECT * FROM orders o JOIN customers c ON c.id = o.cid FOR UPDATE", WR, N),
    ("SELECT o.id FROM orders o JOIN customers c ON c.id = o.cid FOR UPDATE OF o", WR, Y),
    ("SELECT * FROM (SELECT id FROM customers) s FOR UPDATE", WR, N),
    # TRUNCATE
    ("TRUNCATE orders", WR, Y),
    ("TRUNCATE orders", SA, N),
    ("TRUNCATE TABLE orders, customers", WR, N),
    ("TRUNCATE orders CASCADE", WR, N),
    ("TRUNCATE orders RESTART IDENTITY", WR, Y),
    # COPY
    ("COPY cards TO STDOUT", ETL, Y),
    ("COPY cards (id, pan) TO STDOUT", ETL, Y),
    ("COPY cards TO STDOUT", SA, N),  # no copy_out
    ("COPY (SELECT * FROM cards) TO STDOUT", ETL, Y),
    ("COPY (SELECT * FROM cards JOIN orders USING (id)) TO STDOUT", ETL, N),
    ("COPY orders FROM STDIN", ETL, Y),
    ("COPY orders (id) FROM STDIN", ETL, Y),
    ("COPY cards FROM STDIN", ETL, N),
    ("COPY orders TO '/tmp/x'", ETL, N),
    ("COPY orders FROM PROGRAM 'id'", ETL, N),
    ("COPY orders TO PROGRAM 'cat'", OPS, N),  # admin yes, copy_out no
    ("COPY (SELECT 1) TO PROGRAM 'cat'", OPS, Y),
    # EXPLAIN / PREPARE / DECLARE
    ("EXPLAIN SELECT * FROM orders", SA, Y),
    ("EXPLAIN SELECT * FROM secrets", SA, N),
    ("EXPLAIN ANALYZE SELECT * FROM orders", SA, Y),
    ("EXPLAIN ANALYZE DELETE FROM orders", SA, N),
    ("EXPLAIN (ANALYZE, BUFFERS) DELETE FROM orders", WR, Y),
    ("EXPLAIN DELETE FROM orders", SA, N),
    ("EXPLAIN SELECT tax_id FROM customers", SA, N),
    ("PREPARE p AS SELECT * FROM orders WHERE id = $1", SA, Y),
    ("PREPARE p AS SELECT * FROM secrets", SA, N),
    ("PREPARE p (int) AS DELETE FROM orders WHERE id = $1", SA, N),
    ("DECLARE c CURSOR FOR SELECT * FROM orders", SA, Y),
    ("DECLARE c CURSOR FOR SELECT * FROM secrets", SA, N),
    ("DECLARE c CURSOR FOR SELECT tax_id FROM customers", SA, N),
    ("FETCH 10 FROM c", SA, Y),
    ("MOVE c", SA, Y),
    ("EXECUTE unknown_stmt", SA, N),
    # MERGE
    (
        "MERGE INTO orders o USING customers c ON o.cid = c.id "
        "WHEN MATCHED THEN UPDATE SET n = c.name",
        WR,
        Y,
    ),
    ("MERGE INTO orders o USING customers c ON o.cid = c.id WHEN MATCHED THEN DELETE", WR, Y),
    (
        "MERGE INTO orders o USING customers c ON o.cid = c.id "
        "WHEN NOT MATCHED THEN INSERT (cid) VALUES (c.id)",
        WR,
        Y,
    ),
    (
        "MERGE INTO orders o USING customers c ON o.cid = c.id "
        "WHEN MATCHED THEN UPDATE SET n = c.name",
        SA,
        N,
    ),
    ("MERGE INTO orders o USING secrets s ON o.id = s.id WHEN MATCHED THEN DELETE", WR, N),
    ("MERGE INTO orders o USING customers c ON o.x = c.tax_id WHEN MATCHED THEN DELETE", WR, N),
    (
        "MERGE INTO orders o USING customers c ON o.cid = c.id "
        "WHEN MATCHED AND c.tax_id = '1' THEN DELETE",
        WR,
        N,
    ),
    ("MERGE INTO cards k USING customers c ON k.cid = c.id WHEN MATCHED THEN DELETE", PAY, N),
    # --- multi-statement strings ---------------------------------------------------------
    ("SELECT 1; SELECT * FROM orders", SA, Y),
    ("SELECT * FROM orders; SELECT * FROM secrets", SA, N),
    ("BEGIN; DELETE FROM orders; COMMIT", SA, N),
    ("BEGIN; INSERT INTO orders (id) VALUES (1); COMMIT", WR, Y),
    ("SET search_path = secret; SELECT * FROM orders", SA, N),
    ("SET search_path = secret; SELECT * FROM orders", MIX, Y),
    ("SELECT set_config('search_path', 'secret', false); SELECT * FROM orders", SA, N),
    ("SET search_path = reporting; SELECT * FROM daily", SA, Y),
    ("SET search_path = reporting; ROLLBACK; SELECT * FROM daily", SA, N),
    ("INSERT INTO customers (id) VALUES (1) ON CONFLICT (tax_id) DO NOTHING", LK, N),
]


@pytest.mark.parametrize(
    ("sql", "role", "allowed"), CASES, ids=[f"{r}:{s[:60]}" for s, r, _ in CASES]
)
def test_decision(sql: str, role: str, allowed: bool) -> None:
    cache = PolicyCache(POLICY, env=ENV)
    decision = cache.decide(sql, role, PATH, DB)
    assert decision.allowed is allowed, decision.reason
    if not allowed:
        assert f'"{role}"' in decision.reason


def test_case_count() -> None:
    assert len(CASES) >= 150


SEARCH_PATH_CASES = [
    # (sql, role, search_path, env, allowed)
    ("SELECT * FROM daily", SA, ("reporting",), ENV, Y),
    ("SELECT * FROM daily", SA, ("public",), ENV, N),
    ("SELECT * FROM orders", SA, ("reporting", "public"), ENV, Y),  # reporting.* select too
    ("SELECT * FROM orders", WR, ("reporting", "public"), ENV, N),  # reporting.orders unknown
    ("SELECT * FROM orders", MIX, ("secret", "public"), ENV, Y),
    ("SELECT * FROM orders", SA, ("secret", "public"), ENV, N),
    ("SELECT * FROM orders", SA, ("public", "secret"), ENV, Y),  # stops at explicit public
    ("SELECT * FROM orders", SA, ("$user", "public"), Environment(), N),  # $user may exist
    ("SELECT * FROM orders", SA, ("$user", "public"), ENV, Y),
    ("SELECT * FROM orders", SA, (), ENV, N),
    ("SELECT * FROM pg_class", SA, ("public", "pg_catalog"), ENV, N),  # public first
    ("SELECT * FROM pg_class", SA, ("pg_catalog", "public"), ENV, Y),
    ("SELECT * FROM orders", SA, ("pg_temp", "public"), ENV, Y),
    ("SELECT my_func()", SA, ("reporting", "public"), ENV, N),
    ("SELECT my_func()", SA, ("public", "reporting"), ENV, Y),
    ("SELECT lower('a')", SA, ("public", "pg_catalog"), ENV, N),  # public.lower possible
    ("SELECT lower('a')", SA, ("public",), ENV, Y),
]


@pytest.mark.parametrize(("sql", "role", "path", "env", "allowed"), SEARCH_PATH_CASES)
def test_search_path(
    sql: str, role: str, path: tuple[str, ...], env: Environment, allowed: bool
) -> None:
    decision = decide(POLICY, role, analyze(sql), path, DB, env=env)
    assert decision.allowed is allowed, decision.reason


def test_user_schema_expands_to_role() -> None:
    policy = Policy.from_dict({"roles": {"alice": {"tables": {"alice.notes": ["select"]}}}})
    env = Environment(existing_schemas=frozenset({"alice", "public"}))
    assert decide(policy, "alice", analyze("SELECT * FROM notes"), PATH, DB, env=env).allowed
    assert not decide(policy, "alice", analyze("SELECT * FROM x"), PATH, DB, env=env).allowed


def test_default_role() -> None:
    policy = Policy.from_dict({**POLICY_DICT, "default": "base_reader"})
    assert decide(policy, "stranger", analyze("SELECT * FROM orders"), PATH, DB, env=ENV).allowed
    assert not decide(policy, "stranger", analyze("SELECT * FROM cards"), PATH, DB, env=ENV).allowed


def test_reason_names_role_kind_object_not_values() -> None:
    d = decide(POLICY, SA, analyze("DELETE FROM orders WHERE id = 424242"), PATH, DB, env=ENV)
    assert not d.allowed
    assert '"support_agent"' in d.reason and "delete" in d.reason
    assert "public.orders" in d.reason and "424242" not in d.reason
    d = decide(
        POLICY, SA, analyze("SELECT * FROM customers WHERE name = 'Mallory'"), PATH, DB, env=ENV
    )
    assert "tax_id" in d.reason and "Mallory" not in d.reason


def test_multi_statement_reports_index() -> None:
    d = decide(POLICY, SA, analyze("SELECT 1; SELECT 2; DROP TABLE orders"), PATH, DB, env=ENV)
    assert not d.allowed and d.statement_index == 2
    assert d.reason.startswith('role "support_agent": statement 3:')


def test_column_views_returned() -> None:
    d = decide(POLICY, SA, analyze("SELECT id, pan FROM cards"), PATH, DB, env=ENV)
    assert d.allowed
    assert d.column_views == (ColumnView("public", "cards", "pan", "masked"),)
    d = decide(POLICY, SA, analyze("SELECT id FROM cards"), PATH, DB, env=ENV)
    assert d.column_views == ()
    d = decide(POLICY, PAY, analyze("SELECT * FROM cards"), PATH, DB, env=ENV)
    assert d.column_views == (ColumnView("public", "cards", "pan", "plaintext"),)


def test_execute_uses_session_prepared_statements() -> None:
    read = analyze("PREPARE p AS SELECT * FROM orders").statements[0].inner
    delete = analyze("PREPARE d AS DELETE FROM orders").statements[0].inner
    assert isinstance(read, StatementInfo) and isinstance(delete, StatementInfo)
    prepared = {"p": read, "d": delete}
    ok = decide(POLICY, SA, analyze("EXECUTE p"), PATH, DB, env=ENV, prepared=prepared)
    assert ok.allowed
    bad = decide(POLICY, SA, analyze("EXECUTE d"), PATH, DB, env=ENV, prepared=prepared)
    assert not bad.allowed
    params = decide(
        POLICY,
        SA,
        analyze("EXECUTE p((SELECT 1 FROM secrets))"),
        PATH,
        DB,
        env=ENV,
        prepared=prepared,
    )
    assert not params.allowed
    cache = PolicyCache(POLICY, env=ENV)
    assert cache.decide("EXECUTE p", SA, PATH, DB, prepared=prepared).allowed
    assert not cache.decide("EXECUTE p", SA, PATH, DB, prepared={}).allowed  # not cached


def test_policy_cache_swaps_and_hits() -> None:
    cache = PolicyCache(POLICY, env=ENV)
    sql = "SELECT * FROM orders WHERE id = 1"
    first = cache.decide(sql, SA, PATH, DB)
    assert first.allowed and cache.decide(sql, SA, PATH, DB) is first
    stricter = Policy.from_dict({"roles": {SA: {"tables": {}}}})
    cache.swap(stricter)
    assert not cache.decide(sql, SA, PATH, DB).allowed
    start = time.perf_counter()
    for _ in range(10_000):
        cache.decide(sql, SA, PATH, DB)
    per_hit = (time.perf_counter() - start) / 10_000
    assert per_hit < 50e-6  # generous: only guards against accidental re-analysis


def test_unparseable_is_denied() -> None:
    d = PolicyCache(POLICY, env=ENV).decide("SELEC * FROM orders", SA, PATH, DB)
    assert not d.allowed and "does not parse" in d.reason


def test_search_path_after() -> None:
    reset = ("$user", "public")
    s = analyze("SET search_path TO a, 'B C'").statements[0]
    assert search_path_after(s, ("x",), reset) == ("a", "B C")
    s = analyze("RESET search_path").statements[0]
    assert search_path_after(s, ("x",), reset) == reset
    s = analyze("SELECT set_config('search_path', 'a, \"B\"', true)").statements[0]
    assert search_path_after(s, ("x",), reset) == ("a", "B")
    s = analyze("DISCARD ALL").statements[0]
    assert search_path_after(s, ("x",), reset) == reset
    s = analyze("SELECT 1").statements[0]
    assert search_path_after(s, ("x",), reset) == ("x",)


INVALID = [
    ({"roles": {"a": {"tables": {"public.t": ["selct"]}}}}, "roles.a.tables.public.t"),
    ({"roles": {"a": {"tables": {"t": ["select"]}}}}, "qualified schema.table"),
    ({"roles": {"a": {"columns": {"public.t.c": "hidden"}}}}, "view must be one of"),
    ({"roles": {"a": {"columns": {"public.t": "deny"}}}}, "schema.table.column"),
    ({"roles": {"a": {"inherits": ["b"]}}}, "unknown role 'b'"),
    ({"roles": {"a": {"inherits": ["b"]}, "b": {"inherits": ["a"]}}}, "inheritance cycle"),
    ({"roles": {"a": {"allow": ["superpower"]}}}, "unknown kind"),
    ({"roles": {"a": {"tabels": {}}}}, "unknown key"),
    ({"roles": {}, "default": "ghost"}, "default"),
    ({"rolez": {}}, "unknown key"),
    ({"roles": {"a": {"functions": ["nofunc"]}}}, "roles.a.functions.0"),
    ({"roles": {"a": {"tables": {'public."t': ["select"]}}}}, "unterminated"),
    ([], "must be a mapping"),
]


@pytest.mark.parametrize(("data", "fragment"), INVALID)
def test_invalid_policy(data: object, fragment: str) -> None:
    with pytest.raises(PolicyError) as info:
        Policy.from_dict(data)
    assert fragment in str(info.value)


def test_invalid_policy_reports_all_issues() -> None:
    with pytest.raises(PolicyError) as info:
        Policy.from_dict({"roles": {"a": {"tables": {"t": ["x"]}, "allow": ["y"]}}})
    assert len(info.value.issues) == 3


def test_inheritance_and_column_precedence() -> None:
    policy = Policy.from_dict(
        {
            "roles": {
                "p1": {"columns": {"public.t.c": "masked"}, "tables": {"public.t": ["select"]}},
                "p2": {"columns": {"public.t.c": "deny"}},
                "child": {"inherits": ["p1", "p2"]},
                "own": {"inherits": ["p1", "p2"], "columns": {"public.t.c": "plaintext"}},
            },
            "default_column_view": {"public.t.d": "deny"},
        }
    )
    assert not decide(policy, "child", analyze("SELECT c FROM public.t"), PATH, DB).allowed
    assert decide(policy, "own", analyze("SELECT c FROM public.t"), PATH, DB).allowed
    assert not decide(policy, "own", analyze("SELECT d FROM public.t"), PATH, DB).allowed
    assert decide(policy, "p1", analyze("SELECT c FROM public.t"), PATH, DB).allowed


# --- expand_views: a view is also its base relations --------------------------------

VIEW_POLICY_DICT = {
    "roles": {
        # allowed on the views only, not on what they read
        "view_only": {
            "tables": {
                "public.summary": ["select", "update"],
                "public.summary_ids": ["select"],
                "public.tax_view": ["select"],
                "public.orders": ["select"],
            }
        },
        "reader": {
            "tables": {
                "public.summary": ["select", "update", "insert"],
                "public.summary_ids": ["select"],
                "public.tax_view": ["select"],
                "public.whole_view": ["select"],
                "public.count_view": ["select"],
                "public.catalog_view": ["select"],
                "public.customers": ["select", "update"],
                "public.orders": ["select"],
            },
            "columns": {"public.customers.tax_id": "deny"},
        },
        "locker": {"tables": {"public.summary": ["update"], "public.customers": ["select"]}},
    },
}
VIEW_POLICY = Policy.from_dict({**VIEW_POLICY_DICT, "expand_views": True})
VIEW_POLICY_OFF = Policy.from_dict(VIEW_POLICY_DICT)
VIEW_ENV = Environment(
    existing_schemas=frozenset({"public", "pg_catalog", "information_schema"}),
    view_bases={
        ("public", "summary"): frozenset({("public", "customers")}),
        # a view over a view, which also reads a table in a subquery
        ("public", "summary_ids"): frozenset({("public", "summary"), ("public", "orders")}),
        ("public", "tax_view"): frozenset({("public", "customers")}),
        ("public", "whole_view"): frozenset({("public", "customers")}),
        ("public", "count_view"): frozenset({("public", "customers")}),
        ("public", "catalog_view"): frozenset({("pg_catalog", "pg_class")}),
        ("public", "secret_view"): frozenset({("pg_catalog", "pg_authid")}),
    },
    view_columns={
        ("public", "summary"): {("public", "customers"): frozenset({"id", "name"})},
        ("public", "summary_ids"): {
            ("public", "summary"): frozenset({"id"}),
            ("public", "orders"): frozenset({"customer_id"}),
        },
        # the denied column only in the view's WHERE: still read (oracle)
        ("public", "tax_view"): {("public", "customers"): frozenset({"id", "tax_id"})},
        ("public", "whole_view"): {("public", "customers"): frozenset({"*"})},
    },
)
VR, VO = "reader", "view_only"

VIEW_CASES: list[tuple[str, str, bool, bool]] = [
    # (sql, role, allowed with expand_views, allowed without)
    ("SELECT id, name FROM summary", VO, N, Y),
    ("SELECT id, name FROM public.summary", VR, Y, Y),
    ("SELECT count(*) FROM summary", VO, N, Y),
    ("SELECT * FROM customers", VO, N, N),
    ("SELECT id FROM summary_ids", VO, N, Y),  # nested: summary -> customers
    ("SELECT id FROM summary_ids", VR, Y, Y),  # needs summary, orders, customers
    ("SELECT id FROM tax_view", VO, N, Y),
    ("SELECT id FROM tax_view", VR, N, Y),  # the view reads customers.tax_id (deny)
    ("SELECT j FROM whole_view", VR, N, Y),  # whole-row reference includes tax_id
    ("SELECT * FROM count_view", VR, Y, Y),  # no column dependency
    ("SELECT relname FROM catalog_view", VR, Y, Y),
    ("SELECT 1 FROM customers c JOIN summary s USING (id)", VO, N, N),
    ("SELECT id FROM customers WHERE id IN (SELECT id FROM summary)", VR, Y, Y),
    ("WITH x AS (SELECT id FROM summary) SELECT 1", VO, N, Y),  # unreferenced CTE
    ("EXPLAIN SELECT * FROM summary", VO, N, Y),
    ("COPY (SELECT * FROM summary) TO STDOUT", VR, N, N),  # no copy_out on the view
    ("UPDATE summary SET name = 'x'", VO, N, Y),  # update on customers too
    ("UPDATE summary SET name = 'x' WHERE id = 1", VR, Y, Y),
    ("INSERT INTO summary (id) VALUES (1)", VR, N, Y),  # no insert on customers
    ("LOCK summary IN ACCESS EXCLUSIVE MODE", "locker", N, Y),  # customers: select only
    ("SELECT id FROM summary", "locker", N, N),
]


@pytest.mark.parametrize(
    ("sql", "role", "expanded", "plain"),
    VIEW_CASES,
    ids=[f"{r}:{s[:60]}" for s, r, _, _ in VIEW_CASES],
)
def test_expand_views(sql: str, role: str, expanded: bool, plain: bool) -> None:
    on = PolicyCache(VIEW_POLICY, env=VIEW_ENV).decide(sql, role, PATH, DB)
    assert on.allowed is expanded, on.reason
    off = PolicyCache(VIEW_POLICY_OFF, env=VIEW_ENV).decide(sql, role, PATH, DB)
    assert off.allowed is plain, off.reason


def test_expand_views_reason_names_view_and_base() -> None:
    d = decide(VIEW_POLICY, VO, analyze("SELECT id FROM summary_ids"), PATH, DB, env=VIEW_ENV)
    assert not d.allowed
    assert "select on public.customers" in d.reason
    assert "public.summary_ids -> public.summary" in d.reason
    d = decide(VIEW_POLICY, VR, analyze("SELECT id FROM tax_view"), PATH, DB, env=VIEW_ENV)
    assert "public.customers.tax_id" in d.reason and "public.tax_view" in d.reason
    # base columns read through a view return no column view of their own
    d = decide(VIEW_POLICY, VR, analyze("SELECT name FROM summary"), PATH, DB, env=VIEW_ENV)
    assert d.allowed and d.column_views == ()


def test_expand_views_secret_catalog_base() -> None:
    policy = Policy.from_dict(
        {"roles": {"r": {"tables": {"public.secret_view": ["select"]}}}, "expand_views": True}
    )
    sql = analyze("SELECT * FROM secret_view")
    d = decide(policy, "r", sql, PATH, DB, env=VIEW_ENV)
    assert not d.allowed and "pg_authid" in d.reason


def test_expand_views_cycle_in_map_terminates() -> None:
    env = Environment(
        view_bases={
            ("public", "a"): frozenset({("public", "b")}),
            ("public", "b"): frozenset({("public", "a"), ("public", "t")}),
        }
    )
    policy = Policy.from_dict(
        {
            "roles": {"r": {"tables": {"public.a": ["select"], "public.b": ["select"]}}},
            "expand_views": True,
        }
    )
    d = decide(policy, "r", analyze("SELECT * FROM public.a"), PATH, DB, env=env)
    assert not d.allowed and "public.t" in d.reason


def test_expand_views_without_dependencies_fails_closed() -> None:
    # The proxy loads view dependencies at session start only when expand_views is on.
    d = decide(VIEW_POLICY, VR, analyze("SELECT id FROM customers"), PATH, DB, env=ENV)
    assert not d.allowed and "reconnect" in d.reason
    assert decide(VIEW_POLICY, VR, analyze("SELECT 1"), PATH, DB, env=ENV).allowed
    d = decide(VIEW_POLICY, VR, analyze("SELECT relname FROM pg_class"), PATH, DB, env=ENV)
    assert d.allowed, d.reason


def test_expand_views_is_a_boolean() -> None:
    assert not VIEW_POLICY_OFF.expand_views and VIEW_POLICY.expand_views
    with pytest.raises(PolicyError) as info:
        Policy.from_dict({"roles": {}, "expand_views": "yes"})
    assert "expand_views" in str(info.value)


class _Session:
    """What Gate.session_started / prelude_done read of a session."""

    def __init__(self) -> None:
        self.database, self.user = "app", "reader"
        self.policy_state: object | None = None
        self.watch_ready = False


class _Encryption:
    def __init__(self) -> None:
        self.attached: list[object] = []

    def catalog_sql(self) -> str:
        return "SELECT 'catalog'"

    def attach(self, session: object, rows: object, database: str) -> None:
        self.attached.append(rows)


_VIEW_ROWS = [
    [b"public", b"summary", b"public", b"customers", b"id", b"f"],
    [b"public", b"summary", b"public", b"customers", b"name", b"f"],
    [b"public", b"whole_view", b"public", b"customers", None, b"t"],
    [b"public", b"count_view", b"public", b"customers", None, b"f"],
]


@pytest.mark.parametrize("encrypted", [False, True])
def test_gate_loads_view_dependencies_only_when_asked(encrypted: bool) -> None:
    from proxy.gate import VIEWS_SQL, Gate
    from proxy.settings import parse_text

    text = "roles: {reader: {tables: {public.summary: [select]}}}\n"
    for expand in (False, True):
        gate = Gate(parse_text(text + f"expand_views: {str(expand).lower()}\n", "<t>"))
        assert gate.policy is not None and gate.policy.expand_views is expand
        enc = gate.encryption = _Encryption() if encrypted else None
        session = _Session()
        sql = gate.session_started(session)  # type: ignore[arg-type]
        assert sql is not None and (VIEWS_SQL in sql) is expand
        results: list[list[list[bytes | None]]] = [
            [[b"public"], [b"pg_catalog"]], [[b'"$user", public', b"none", b"reader"]]
        ]
        catalog_rows: list[list[bytes | None]] = [[b"catalog row"]]
        if encrypted:
            results.append(catalog_rows)
        if expand:
            results.append(list(_VIEW_ROWS))
        gate.prelude_done(session, results)  # type: ignore[arg-type]
        if enc is not None:
            assert enc.attached == [catalog_rows]  # the catalog keeps its place
        env = gate._cache_for("app", ("$user", "public")).env
        if not expand:
            assert env.view_bases is None
            continue
        assert env.view_bases == {
            ("public", "summary"): frozenset({("public", "customers")}),
            ("public", "whole_view"): frozenset({("public", "customers")}),
            ("public", "count_view"): frozenset({("public", "customers")}),
        }
        assert env.view_columns == {
            ("public", "summary"): {("public", "customers"): frozenset({"id", "name"})},
            ("public", "whole_view"): {("public", "customers"): frozenset({"*"})},
            ("public", "count_view"): {},
        }
        d = gate._cache_for("app", ("$user", "public")).decide(
            "SELECT * FROM summary", "reader", ("$user", "public"), "app"
        )
        assert not d.allowed and "public.customers" in d.reason


def test_expand_views_config_is_checked_with_line() -> None:
    from proxy.gate import Gate
    from proxy.settings import ConfigError, parse_text

    with pytest.raises(ConfigError) as info:
        parse_text("roles: {}\nexpand_views: 3\n", "p.yaml")
    assert "p.yaml:2" in str(info.value) and "expand_views" in str(info.value)
    # On its own it is no policy (a policy needs roles or a default).
    assert Gate(parse_text("expand_views: true\n", "<t>")).policy is None


def test_qualified_and_unqualified_functions_in_one_statement() -> None:
    """psql's `\\d table` sends a query calling both `pg_get_expr(...)` and
    `pg_catalog.generate_series(...)`: deciding it must not fail (it did, comparing the
    unqualified name's missing schema with a schema, and the session was closed)."""
    sql = ("SELECT pg_get_expr(pr.prqual, c.oid), (SELECT string_agg(attname, ', ') FROM "
           "pg_catalog.generate_series(0, 3) s, pg_catalog.pg_attribute) "
           "FROM pg_catalog.pg_publication_rel pr JOIN pg_catalog.pg_class c "
           "ON c.oid = pr.prrelid")
    for role in (SA, OPS):
        decision = decide(POLICY, role, analyze(sql), PATH, DB, env=ENV)
        assert decision.allowed, decision.reason
