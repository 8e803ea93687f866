"""``expand_views``: a role allowed on a view but not on what it reads, through the proxy.

Two proxies over the same database and policy, one with ``expand_views: true``: the
view dependencies come from the proxy's own start-of-session query (pg_depend of each
view's rule), so a view over a view, a denied column used only in a view's WHERE, and a
view created after the proxy started are all seen as PostgreSQL records them.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import asyncpg
import psycopg
import pytest

from tests.conftest import ProxyProcess
from tests.integration.policy_env import POLICY, ensure_schema, password

VIEWS_SQL = r"""
CREATE SCHEMA IF NOT EXISTS expandv;
CREATE TABLE IF NOT EXISTS expandv.people (id int, name text, ssn text);
CREATE OR REPLACE VIEW expandv.people_names AS SELECT id, name FROM expandv.people;
CREATE OR REPLACE VIEW expandv.people_with_ssn AS
    SELECT id FROM expandv.people WHERE ssn IS NOT NULL;
CREATE OR REPLACE VIEW expandv.names_again AS SELECT id, name FROM expandv.people_names;
DROP VIEW IF EXISTS expandv.late_view;
GRANT USAGE ON SCHEMA expandv TO PUBLIC;
GRANT ALL ON ALL TABLES IN SCHEMA expandv TO PUBLIC;
"""


def _policy(expand: bool) -> dict[str, Any]:
    policy = copy.deepcopy(POLICY)
    roles = policy["roles"]
    roles["support_agent"]["tables"].update(
        {
            "expandv.people": ["select"],
            "expandv.people_names": ["select"],
            "expandv.people_with_ssn": ["select"],
            "expandv.names_again": ["select"],
        }
    )
    roles["support_agent"]["columns"]["expandv.people.ssn"] = "deny"
    roles["analyst"]["tables"].update(
        {"expandv.names_again": ["select"], "expandv.late_view": ["select"]}
    )
    if expand:
        policy["expand_views"] = True
    return policy


@pytest.fixture(scope="module")
def proxies(pg: Any) -> Iterator[dict[bool, ProxyProcess]]:
    ensure_schema(pg)
    pg.psql(VIEWS_SQL, db="app")
    started = {flag: ProxyProcess(pg, _policy(flag)).start() for flag in (True, False)}
    yield started
    for p in started.values():
        p.stop()


def outcome(proxy: ProxyProcess, role: str, sql: str, params: list[Any] | None = None) -> str:
    with psycopg.connect(proxy.conninfo(user=role, password=password(role)),
                         autocommit=True) as conn:
        try:
            conn.execute(sql, params)
        except psycopg.Error as exc:
            if exc.sqlstate == "42501" and "strongroom" in str(exc):
                return "denied"
            return str(exc.sqlstate)
    return "ok"


CASES = [
    # (role, sql, with expand_views, without)
    ("analyst", "SELECT id, name FROM customer_summary", "denied", "ok"),
    ("analyst", "SELECT count(*) FROM public.customer_summary", "denied", "ok"),
    ("support_agent", "SELECT name FROM customer_summary", "ok", "ok"),
    ("support_agent", "SELECT id FROM expandv.people_names", "ok", "ok"),
    # the view filters on a denied column: reading it is an oracle on ssn
    ("support_agent", "SELECT id FROM expandv.people_with_ssn", "denied", "ok"),
    # a view over a view: names_again -> people_names -> people
    ("support_agent", "SELECT name FROM expandv.names_again", "ok", "ok"),
    ("analyst", "SELECT name FROM expandv.names_again", "denied", "ok"),
]


@pytest.mark.parametrize(("role", "sql", "expanded", "plain"), CASES,
                         ids=[f"{r}:{s}" for r, s, _, _ in CASES])
def test_views_expanded_only_when_configured(
    proxies: dict[bool, ProxyProcess], role: str, sql: str, expanded: str, plain: str
) -> None:
    assert outcome(proxies[True], role, sql) == expanded
    assert outcome(proxies[False], role, sql) == plain


def test_extended_protocol_with_params(proxies: dict[bool, ProxyProcess]) -> None:
    sql = "SELECT name FROM customer_summary WHERE id = %s"
    with psycopg.connect(proxies[True].conninfo(user="analyst", password=password("analyst")),
                         autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
            conn.execute(sql, [1], prepare=True)
        text = str(info.value)
        assert "strongroom" in text and 'role "analyst"' in text
        assert "public.customers" in text and "public.customer_summary" in text
    with psycopg.connect(proxies[False].conninfo(user="analyst", password=password("analyst")),
                         autocommit=True) as conn:
        assert conn.execute(sql, [1], prepare=True).fetchall() == [("Ada",)]


async def test_asyncpg(proxies: dict[bool, ProxyProcess]) -> None:
    # A text parameter either way: the refusal declares its parameters as text.
    sql = "SELECT id FROM customer_summary WHERE id::text = $1"
    for flag, allowed in ((True, False), (False, True)):
        conn = await asyncpg.connect(proxies[flag].dsn(user="analyst",
                                                       password=password("analyst")))
        try:
            if allowed:
                rows = await conn.fetch(sql, "2")
                assert [r["id"] for r in rows] == [2]
            else:
                with pytest.raises(asyncpg.InsufficientPrivilegeError) as info:
                    await conn.fetch(sql, "2")
                assert "strongroom" in str(info.value)
            # the session is usable afterwards
            assert await conn.fetchval("SELECT 1") == 1
        finally:
            await conn.close()


def test_view_created_later_is_expanded_in_new_sessions(
    pg: Any, proxies: dict[bool, ProxyProcess]
) -> None:
    sql = "SELECT id FROM expandv.late_view"
    assert outcome(proxies[True], "analyst", sql) == "42P01"  # does not exist yet
    pg.psql("CREATE VIEW expandv.late_view AS SELECT id FROM public.customers; "
            "GRANT SELECT ON expandv.late_view TO PUBLIC", db="app")
    try:
        assert outcome(proxies[True], "analyst", sql) == "denied"
        assert outcome(proxies[False], "analyst", sql) == "ok"
    finally:
        pg.psql("DROP VIEW IF EXISTS expandv.late_view", db="app")
