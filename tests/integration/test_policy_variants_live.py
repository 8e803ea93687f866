"""Hypothesis through the proxy: spelling variations get the canonical form's decision.

Templates mark ``«expr»`` (may gain redundant parentheses) and ``@`` (may become
``public.`` or stay unqualified); everything else varies per token through pglast's
scanner: quoting of lower-case identifiers, keyword case, whitespace and comments.
Each variant runs through a real proxy (simple and extended protocol alternately)
inside BEGIN ... ROLLBACK, and must be refused exactly when the canonical text is.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import pq

from tests.conftest import ProxyProcess
from tests.integration.policy_env import POLICY, ensure_schema, password
from tests.sql_variants import canonical, variant

TEMPLATES = [
    ("SELECT name, id FROM @customers WHERE «id = 1» ORDER BY name", "support_agent"),
    ("SELECT name FROM @customers WHERE «tax_id = '123-45-6789'»", "support_agent"),
    ("SELECT a.id FROM @accounts a JOIN @customers c ON «c.id = a.customer_id»",
     "support_agent"),
    ("SELECT row_to_json(c) FROM @customers c", "support_agent"),
    ("WITH x AS (SELECT id FROM @transactions) SELECT «1»", "support_agent"),
    ("DELETE FROM @accounts WHERE «id = 999»", "payments_service"),
    ("DELETE FROM @cards WHERE «id = 999»", "payments_service"),
    ("UPDATE @cards SET expiry = expiry WHERE «id = 2» RETURNING pan", "payments_service"),
    ("INSERT INTO @audit_events (actor, event) SELECT «'svc'», name FROM @customers",
     "payments_service"),
    ("SELECT id FROM @cards WHERE «id > 0» FOR UPDATE", "support_agent"),
    ("SELECT * FROM @transactions WHERE «amount > 5» LIMIT «10»", "analyst"),
]

@pytest.fixture(scope="module")
def conns(pg: Any) -> Iterator[dict[str, psycopg.Connection]]:
    ensure_schema(pg)
    proxy = ProxyProcess(pg, dict(POLICY)).start()
    out: dict[str, psycopg.Connection] = {}
    try:
        for role in {r for _, r in TEMPLATES}:
            out[role] = psycopg.connect(proxy.conninfo(user=role, password=password(role)),
                                        autocommit=True, prepare_threshold=None)
        yield out
    finally:
        for conn in out.values():
            conn.close()
        proxy.stop()


def decision(conn: psycopg.Connection, sql: str, simple: bool) -> str:
    pgc = conn.pgconn
    pgc.exec_(b"BEGIN")
    res = pgc.exec_(sql.encode()) if simple else pgc.exec_params(sql.encode(), None)
    state = (res.error_field(pq.DiagnosticField.SQLSTATE) or b"").decode()
    message = (res.error_field(pq.DiagnosticField.MESSAGE_PRIMARY) or b"").decode()
    pgc.exec_(b"ROLLBACK")
    assert conn.info.transaction_status == pq.TransactionStatus.IDLE
    if state == "42501" and "strongroom" in message:
        return "denied"
    assert not state, f"unexpected PostgreSQL error {state} {message} for {sql!r}"
    return "allowed"


def test_templates_cover_both_outcomes(conns: dict[str, psycopg.Connection]) -> None:
    got = {decision(conns[role], canonical(t), True) for t, role in TEMPLATES}
    assert got == {"allowed", "denied"}


@pytest.mark.parametrize(("template", "role"), TEMPLATES, ids=[t[:40] for t, _ in TEMPLATES])
def test_variants_decide_like_canonical(
    conns: dict[str, psycopg.Connection], template: str, role: str
) -> None:
    conn = conns[role]
    want = decision(conn, canonical(template), True)

    @settings(max_examples=30, deadline=None, derandomize=False,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(sql=variant(template), simple=st.booleans())
    def check(sql: str, simple: bool) -> None:
        assert decision(conn, sql, simple) == want, sql

    check()
