"""analyze(): kinds, accesses, columns, functions, settings; plus the cache."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.policy import decide
from proxy.sql import ALL, AnalysisError, RelationName, analyze, fingerprint, parse_search_path
from proxy.sql.analyzer import describe
from proxy.sql.cache import AnalysisCache, text_key
from proxy.sql.info import StatementInfo
from tests.unit.test_policy import POLICY


def one(sql: str) -> StatementInfo:
    statements = analyze(sql).statements
    assert len(statements) == 1
    return statements[0]


def R(name: str, schema: str | None = None, catalog: str | None = None) -> RelationName:
    return RelationName(schema, name, catalog)


KINDS = [
    ("SELECT 1", "select"),
    ("TABLE t", "select"),
    ("VALUES (1)", "select"),
    ("INSERT INTO t VALUES (1)", "insert"),
    ("UPDATE t SET a = 1", "update"),
    ("DELETE FROM t", "delete"),
    ("MERGE INTO t USING u ON true WHEN MATCHED THEN DELETE", "merge"),
    ("TRUNCATE t", "truncate"),
    ("COPY t FROM STDIN", "copy_in"),
    ("COPY t TO STDOUT", "copy_out"),
    ("COPY t TO PROGRAM 'x'", "copy_program"),
    ("COPY t FROM '/f'", "copy_file"),
    ("CREATE TABLE t (a int)", "ddl"),
    ("SELECT 1 INTO t", "ddl"),
    ("COMMENT ON TABLE t IS ''", "ddl"),
    ("ALTER ROLE r LOGIN", "ddl"),
    ("CREATE EXTENSION x", "ddl"),
    ("GRANT SELECT ON t TO r", "admin"),
    ("VACUUM", "admin"),
    ("CHECKPOINT", "admin"),
    ("ALTER SYSTEM SET a = 1", "admin"),
    ("SET ROLE r", "set_role"),
    ("SET SESSION AUTHORIZATION r", "set_role"),
    ("RESET ROLE", "set_role"),
    ("SET x.y = 1", "set"),
    ("SET TRANSACTION READ ONLY", "set"),
    ("BEGIN", "begin"),
    ("START TRANSACTION", "begin"),
    ("COMMIT", "commit"),
    ("END", "commit"),
    ("ABORT", "rollback"),
    ("SAVEPOINT s", "savepoint"),
    ("RELEASE s", "release"),
    ("ROLLBACK TO s", "rollback_to"),
    ("PREPARE TRANSACTION 'g'", "prepare_transaction"),
    ("COMMIT PREPARED 'g'", "commit_prepared"),
    ("ROLLBACK PREPARED 'g'", "rollback_prepared"),
    ("LISTEN c", "listen"),
    ("NOTIFY c", "notify"),
    ("UNLISTEN c", "unlisten"),
    ("DO 'begin end'", "do"),
    ("CALL p()", "call"),
    ("LOCK t", "lock"),
    ("EXPLAIN SELECT 1", "explain"),
    ("PREPARE p AS SELECT 1", "prepare"),
    ("EXECUTE p", "execute"),
    ("DEALLOCATE p", "deallocate"),
    ("DECLARE c CURSOR FOR SELECT 1", "declare"),
    ("FETCH c", "fetch"),
    ("MOVE c", "move"),
    ("CLOSE c", "close"),
    ("DISCARD ALL", "discard"),
    ("SHOW ALL", "show"),
    ("", "empty"),
    ("-- just a comment", "empty"),
]


@pytest.mark.parametrize(("sql", "kind"), KINDS)
def test_kind(sql: str, kind: str) -> None:
    assert one(sql).kind == kind


@pytest.mark.parametrize("sql", ["SELEC 1", "SELECT (", "\x00", "SELECT 'unterminated"])
def test_unparseable_raises_analysis_error(sql: str) -> None:
    with pytest.raises(AnalysisError):
        analyze(sql)


def test_unknown_and_malformed_nodes_fail_closed() -> None:
    assert describe({"SomeFutureStmt": {}}).kind == "unknown"
    broken = describe({"SelectStmt": {"fromClause": [{"RangeVar": {}}]}})
    assert broken.kind == "unknown" and "KeyError" in broken.detail
    decision = decide(POLICY, "ops", broken, ("public",), "app")
    assert not decision.allowed and "could not be classified" in decision.reason


def test_accesses_and_columns() -> None:
    info = one(
        "SELECT c.name, o.total FROM customers c JOIN s.orders o ON o.cid = c.id "
        "WHERE c.active ORDER BY o.created"
    )
    assert info.accesses == {(R("customers"), "select"), (R("orders", "s"), "select")}
    assert info.columns_read[R("customers")] == {"name", "id", "active"}
    assert info.columns_read[R("orders", "s")] == {"total", "cid", "created"}


def test_unqualified_columns_attributed_to_every_relation() -> None:
    info = one("SELECT name FROM a, b")
    assert info.columns_read[R("a")] == {"name"} and info.columns_read[R("b")] == {"name"}


def test_star_and_whole_row() -> None:
    assert one("SELECT * FROM t").columns_read[R("t")] == {ALL}
    assert ALL in one("SELECT row_to_json(t) FROM t").columns_read[R("t")]
    assert one("SELECT count(*) FROM t").columns_read.get(R("t"), frozenset()) == frozenset()
    assert ALL in one("SELECT a FROM t AS x(a)").columns_read[R("t")]
    assert one("SELECT b FROM t AS x(a)").columns_read[R("t")] == {"b"}


def test_writes() -> None:
    assert one("INSERT INTO t (a, b) VALUES (1, 2)").columns_written[R("t")] == {"a", "b"}
    assert one("INSERT INTO t VALUES (1)").columns_written[R("t")] == {ALL}
    info = one("UPDATE t SET a = 1, b = c")
    assert info.columns_written[R("t")] == {"a", "b"}
    assert info.columns_read[R("t")] == {"c"}
    assert one("COPY t (a) FROM STDIN").columns_written[R("t")] == {"a"}


def test_on_conflict_do_update_needs_insert_and_update() -> None:
    info = one("INSERT INTO t (a) VALUES (1) ON CONFLICT (a) DO UPDATE SET b = 2")
    assert {k for _, k in info.accesses} == {"insert", "update"}
    assert "a" in info.columns_read[R("t")]


def test_cte_shadowing_levels() -> None:
    assert one("WITH t AS (SELECT 1) SELECT * FROM t").accesses == frozenset()
    assert one("WITH a AS (SELECT * FROM b), b AS (SELECT 1) SELECT * FROM a").accesses == {
        (R("b"), "select")
    }
    assert (
        one("WITH RECURSIVE a AS (SELECT * FROM b), b AS (SELECT 1) SELECT * FROM a").accesses
        == frozenset()
    )
    assert one("SELECT * FROM (WITH t AS (SELECT 1) SELECT 1) s, t").accesses == {
        (R("t"), "select")
    }


def test_data_modifying_cte() -> None:
    info = one("WITH d AS (DELETE FROM t RETURNING id) SELECT * FROM d")
    assert info.accesses == {(R("t"), "delete"), (R("t"), "select")}


def test_row_locks() -> None:
    info = one("SELECT * FROM a JOIN b ON true FOR UPDATE OF a")
    assert (R("a"), "update") in info.accesses and (R("b"), "update") not in info.accesses
    info = one("SELECT * FROM (SELECT * FROM a) s FOR SHARE")
    assert (R("a"), "update") in info.accesses


def test_lock_modes() -> None:
    assert one("LOCK t IN ACCESS SHARE MODE").accesses == {(R("t"), "select")}
    assert one("LOCK t IN ROW EXCLUSIVE MODE").accesses == {(R("t"), "lock_row_exclusive")}
    info = one("LOCK t")
    assert info.lock_mode == "ACCESS EXCLUSIVE" and info.accesses == {(R("t"), "lock_strong")}


def test_names() -> None:
    assert one('SELECT * FROM "My"."T"').relations == {R("T", "My")}
    assert one("SELECT * FROM My.T").relations == {R("t", "my")}
    assert one('SELECT * FROM U&"\\0074"').relations == {R("t")}
    assert one("SELECT * FROM db.s.t").relations == {R("t", "s", "db")}
    assert one("SELECT * FROM " + "A" * 70).relations == {R("a" * 63)}


def test_functions() -> None:
    info = one("SELECT lower(x), s.f(1), count(*) FROM t WHERE pg_catalog.now() > y")
    names = {(f.schema, f.name) for f in info.functions}
    assert names == {(None, "lower"), ("s", "f"), (None, "count"), ("pg_catalog", "now")}


def test_settings() -> None:
    s = one("SET LOCAL search_path TO a, \"B\", '$user'").setting
    assert s is not None and s.param == "search_path" and s.values == ("a", "B", "$user")
    assert s.is_local and s.action == "value"
    s = one("SET search_path TO DEFAULT").setting
    assert s is not None and s.action == "default"
    s = one("RESET search_path").setting
    assert s is not None and s.action == "default"
    s = one("RESET ALL").setting
    assert s is not None and s.param == "all"
    s = one('SET "Search_Path" = x').setting
    assert s is not None and s.param == "search_path"
    s = one("SET SCHEMA 'x'").setting
    assert s is not None and s.param == "search_path"


def test_set_config_calls() -> None:
    (call,) = one("SELECT set_config('SEARCH_PATH', 'a, \"B\"', true)").config_calls
    assert call.param == "search_path" and call.values == ("a", "B") and call.is_local is True
    (call,) = one("SELECT set_config($1, 'x', false)").config_calls
    assert call.param is None
    (call,) = one("SELECT set_config('role', 'x'::text, 'off')").config_calls
    assert call.param == "role" and call.is_local is False


def test_wrappers() -> None:
    info = one("EXPLAIN (ANALYZE, FORMAT JSON) DELETE FROM t")
    assert info.explain_analyze and info.inner is not None and info.inner.kind == "delete"
    assert not one("EXPLAIN (ANALYZE off) SELECT 1").explain_analyze
    info = one("PREPARE p (int) AS SELECT * FROM t WHERE a = $1")
    assert info.name == "p" and info.param_count == 1 and info.inner is not None
    assert one("EXECUTE p (1)").name == "p"
    assert one("DECLARE c CURSOR FOR SELECT 1").name == "c"


def test_copy_query() -> None:
    info = one("COPY (SELECT a FROM t) TO STDOUT")
    assert info.accesses == {(R("t"), "select"), (R("t"), "copy_out")}


def test_truncate_cascade() -> None:
    assert one("TRUNCATE a, b CASCADE").cascade
    assert not one("TRUNCATE a").cascade


def test_multi_statement_and_params() -> None:
    a = analyze("SELECT $2; SELECT 1; DELETE FROM t")
    assert [s.kind for s in a.statements] == ["select", "select", "delete"]
    assert a.param_count == 2 and not a.has_execute
    assert analyze("EXECUTE p").has_execute


def test_fingerprint() -> None:
    assert fingerprint("SELECT 1") == fingerprint("select 2")
    with pytest.raises(AnalysisError):
        fingerprint("SELEC")


def test_parse_search_path() -> None:
    assert parse_search_path('"$user", public, "My Schema", Other') == (
        "$user",
        "public",
        "My Schema",
        "other",
    )
    assert parse_search_path("") == ()


def test_deep_nesting_is_denied_not_crashing() -> None:
    sql = "SELECT " + "(" * 2000 + "1" + ")" * 2000
    try:
        info = analyze(sql).statements[0]
    except AnalysisError:
        return
    assert info.kind in ("select", "unknown")


def test_analysis_cache_hits_and_errors() -> None:
    cache = AnalysisCache(maxsize=2)
    a = cache.analyze("SET work_mem = '1MB'")
    assert cache.analyze("SET work_mem = '1MB'") is a and cache.hits == 1
    for _ in range(2):
        with pytest.raises(AnalysisError):
            cache.analyze("SELEC")
    assert cache.misses == 2
    cache.analyze("SET work_mem = '2MB'")
    assert len(cache) == 2  # the first SET evicted (LRU): SETs are cached by exact text
    cache.analyze("SET work_mem = '1MB'")
    assert cache.misses == 4


def test_analysis_cache_shares_templates_of_plain_dml() -> None:
    """Same statement, other constants: one parse, and the decision key is the template."""
    cache = AnalysisCache()
    first = cache.analyze("SELECT abalance FROM accounts WHERE aid = 1")
    key = cache.last_key
    assert cache.analyze("SELECT abalance FROM accounts WHERE aid = 4242") is first
    assert cache.last_key == key and key.startswith("\0")
    assert cache.misses == 1 and cache.hits == 1
    # A constant that changes the meaning is never shared.
    r1 = cache.analyze("SELECT set_config('search_path', 'a', false)")
    r2 = cache.analyze("SELECT set_config('search_path', 'b', false)")
    assert r1 is not r2
    assert cache.last_key == text_key("SELECT set_config('search_path', 'b', false)")


def test_analysis_cache_remembers_texts_of_templates(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same text again is answered without normalising it again, under the same key;
    when its template is evicted, the text is analysed afresh, not answered stale."""
    from proxy.sql import cache as cache_mod

    calls: list[str] = []
    real = cache_mod.parser.normalize
    monkeypatch.setattr(cache_mod.parser, "normalize", lambda sql: calls.append(sql) or real(sql))
    def text() -> str:  # a new str object each time: the one-entry memo keys on identity
        return "".join(["SELECT ", "1"])

    cache = AnalysisCache(maxsize=2)
    first = cache.analyze(text())
    key = cache.last_key
    assert key.startswith("\0") and len(calls) == 1
    assert cache.analyze(text()) is first and cache.last_key == key
    assert len(calls) == 1 and cache.hits == 1
    cache.analyze("SELECT a FROM t WHERE b = 2")
    cache.analyze("SELECT c FROM u WHERE d = 3")  # evicts the template of SELECT 1
    calls.clear()
    again = cache.analyze(text())
    assert again is not first and calls == ["SELECT 1"] and cache.last_key == key


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_analyze_raises_only_its_own_error(sql: str) -> None:
    try:
        analyze(sql)
    except AnalysisError:
        pass


def test_foreign_key_needs_references() -> None:
    info = one("CREATE TABLE t (a int REFERENCES public.u (b))")
    assert info.kind == "ddl" and info.accesses == {(R("u", "public"), "references")}
    info = one("CREATE VIEW v AS SELECT * FROM s.base")
    assert info.kind == "ddl" and info.accesses == {(R("base", "s"), "select")}
