"""Issue 12: the denials the gate words itself, as a client of the real proxy reads them.

Companion of tests/unit/test_denial_messages.py (the engine's templates): a role
startup option, FunctionCall messages, a statement after user code in one string, a
cursor FETCHed after SET ROLE, a role change inside one string and a set_config of the
role with a value the proxy cannot follow. Each is a 42501 opening with
`permission denied by strongroom: role "<role in effect>"`, naming what was denied and
no value of the statement.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from tests.conftest import ProxyProcess, RawPG, error_fields, function_call_msg
from tests.integration.policy_env import POLICY, ensure_schema, literal_values, password

SECRET = "Secret Name 77"


@pytest.fixture(scope="module")
def gproxy(pg: Any) -> Iterator[ProxyProcess]:
    ensure_schema(pg)
    p = ProxyProcess(pg, dict(POLICY)).start()
    yield p
    p.stop()


def _check(message: str, role: str, sql: str, *words: str) -> None:
    assert message.startswith(f'permission denied by strongroom: role "{role}": '), message
    assert not re.search(r"\b(\w+) \1\b", message), message
    for value in [*literal_values(sql), SECRET]:
        if value not in ("public", "support_agent", "analyst"):
            assert value not in message, (value, message)
    for word in words:
        assert word in message, (word, message)


def _denied(conn: psycopg.Connection, sql: str) -> str:
    with pytest.raises(psycopg.Error) as info:
        conn.execute(sql)
    assert info.value.diag.sqlstate == "42501", info.value
    return info.value.diag.message_primary or ""


def _connect(p: ProxyProcess, role: str, **kw: str) -> psycopg.Connection:
    return psycopg.connect(p.conninfo(user=role, password=password(role), **kw),
                           autocommit=True)


def test_gate_denials_read_as_sentences(gproxy: ProxyProcess) -> None:
    # a role startup option is a role change (PostgreSQL would allow this one)
    gproxy.cluster.psql("GRANT analyst TO support_agent")
    try:
        with _connect(gproxy, "support_agent", options="'-c role=analyst'") as c:
            _check(_denied(c, "SELECT 1"), "support_agent", "", "startup option", "set_role")
    finally:
        gproxy.cluster.psql("REVOKE analyst FROM support_agent")
    with _connect(gproxy, "ops_admin") as c:
        # a statement after user code in the same string
        sql = "DO $$BEGIN PERFORM 1; END$$; SELECT 1"
        _check(_denied(c, sql), "ops_admin", sql, "statement 2", "user code")
        # the role changes inside the string: each statement is decided as its role
        sql = f"SET ROLE support_agent; SELECT tax_id FROM public.customers WHERE name = '{SECRET}'"
        _check(_denied(c, sql), "support_agent", sql, "statement 2: ",
               "public.customers.tax_id")
        c.execute("RESET ROLE")
        # a cursor declared by one role, fetched by another
        sql = f"DECLARE cur CURSOR FOR SELECT tax_id FROM public.customers WHERE name = '{SECRET}'"
        c.execute("BEGIN")
        c.execute(sql)
        c.execute("SET ROLE support_agent")
        _check(_denied(c, "FETCH 1 FROM cur"), "support_agent", sql, "cursor cur",
               "public.customers.tax_id")
        c.execute("ROLLBACK")
        # set_config of the role with a value the proxy cannot follow
        sql = "SELECT set_config('role', current_user, false)"
        _check(_denied(c, sql), "ops_admin", sql, "set_config('role')")
    # FunctionCall messages the proxy cannot decide
    with RawPG(gproxy.port) as raw:
        raw.login("support_agent", password("support_agent"))
        for oid, words in ((1, ("OID 1", "FunctionCall")),
                           (2078, ("set_config", "FunctionCall"))):
            raw.send(function_call_msg(oid, (b"search_path", b"x", b"f")))
            errors = [error_fields(b) for k, b in raw.read_until(b"Z") if k == b"E"]
            assert len(errors) == 1 and errors[0]["C"] == "42501", errors
            _check(errors[0]["M"], "support_agent", "", *words)
