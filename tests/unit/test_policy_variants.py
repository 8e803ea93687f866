"""Hypothesis: spelling variations of a statement get the decision of its canonical form.

Templates mark ``«expr»`` (may gain redundant parentheses) and ``@rel`` (may gain a
``public.`` qualifier); everything else varies at token level, via pglast's scanner:
quoting of lower-case identifiers, keyword case, whitespace and comments between tokens.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.policy import decide
from proxy.sql import analyze
from tests.sql_variants import canonical, variant
from tests.unit.test_policy import DB, ENV, PATH, POLICY

TEMPLATES = [
    ("SELECT name, id FROM @customers WHERE «id = 1» ORDER BY name", "support_agent"),
    ("SELECT name FROM @customers WHERE «tax_id = 'x'»", "support_agent"),
    ("SELECT c.name FROM @customers c JOIN @orders o ON «o.cid = c.id»", "support_agent"),
    ("SELECT row_to_json(c) FROM @customers c", "support_agent"),
    ("SELECT pan FROM @cards WHERE «id > 3» LIMIT «5»", "support_agent"),
    ("WITH secrets AS (SELECT 1 AS id) SELECT id FROM secrets", "support_agent"),
    ("WITH x AS (SELECT id FROM @secrets) SELECT 1", "support_agent"),
    ("DELETE FROM @orders WHERE «id = 1»", "writer"),
    ("DELETE FROM @orders WHERE «id = 1»", "support_agent"),
    ("UPDATE @orders SET status = «'x'» WHERE «id = 2» RETURNING id", "writer"),
    ("INSERT INTO @orders (id) SELECT «id» FROM @customers WHERE «name = 'a'»", "writer"),
    ("INSERT INTO @orders (id) SELECT tax_id FROM @customers", "writer"),
    ("SELECT count(*) FILTER (WHERE «tax_id = 'a'») FROM @customers", "support_agent"),
    ("SELECT my_func(«1»)", "support_agent"),
    ("SELECT pg_read_file(«'x'»)", "support_agent"),
    ("SELECT set_config('role', 'x', false)", "support_agent"),
    ("LOCK TABLE @orders IN ACCESS SHARE MODE", "support_agent"),
    ("SELECT * FROM @orders FOR UPDATE", "support_agent"),
    ("COPY @cards TO STDOUT", "etl"),
    ("EXPLAIN ANALYZE DELETE FROM @orders WHERE «id = 1»", "support_agent"),
    (
        "MERGE INTO @orders o USING @customers c ON «o.cid = c.id» WHEN MATCHED THEN DELETE",
        "writer",
    ),
]

def _decision(sql: str, role: str) -> bool:
    return decide(POLICY, role, analyze(sql), PATH, DB, env=ENV).allowed


@pytest.mark.parametrize(("template", "role"), TEMPLATES)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_variants_decide_like_canonical(template: str, role: str, data: st.DataObject) -> None:
    expected = _decision(canonical(template), role)
    sql = data.draw(variant(template))
    assert _decision(sql, role) is expected, sql


def test_templates_cover_both_outcomes() -> None:
    outcomes = {
        _decision(canonical(t), r) for t, r in TEMPLATES
    }
    assert outcomes == {True, False}
