"""Issue 11, route 6: a masked or ciphertext view is not an equality oracle.

A role that sees ``pan`` masked recovered the full PAN by bisecting ``pan IN (<5,000
candidates>)``: the proxy sealed each literal (blind index) and the server answered which
one matched. The rule: such a column may only be *shown*, as a bare result column; any
other read is denied unless the policy grants ``lookup``, which allows equality only.

Each construct is one row, classified by how it reads ``public.cards.pan``; the expected
verdict per view follows from the class (``EXPECTED``).
"""

from __future__ import annotations

import pytest

from proxy.policy import Environment, Policy, PolicyCache, PolicyError, decide
from proxy.sql import analyze

PAN = "4111111111111486"  # a literal that must never appear in a reason

VIEWS: dict[str, object] = {
    "plain": "plaintext",
    "masked": "masked",
    "cipher": "ciphertext",
    "deny": "deny",
    "m_lookup": {"view": "masked", "lookup": True},
    "c_lookup": {"view": "ciphertext", "lookup": True},
}
KINDS = ["select", "insert", "update", "delete", "copy_out"]
POLICY = Policy.from_dict(
    {
        "roles": {
            role: {
                "tables": {"public.cards": KINDS, "public.other": KINDS},
                "columns": {"public.cards.pan": view},
                "allow": ["ddl"],
            }
            for role, view in VIEWS.items()
        },
        "default": "deny",
    }
)
ENV = Environment(existing_schemas=frozenset({"public", "pg_catalog", "information_schema"}))
PATH = ("$user", "public")
DB = "app"

SHOW, NONE, EQ, USE = "show", "none", "eq", "use"
"""shown bare / no read of pan / compared by equality / any other use."""

EXPECTED = {
    # class: plain masked cipher deny m_lookup c_lookup
    SHOW: (True, True, True, False, True, True),
    NONE: (True, True, True, True, True, True),
    EQ: (True, False, False, False, True, True),
    USE: (True, False, False, False, False, False),
}

CONSTRUCTS: list[tuple[str, str]] = [
    # --- shown: the bare column as a result column --------------------------------------
    ("SELECT pan FROM cards", SHOW),
    ("SELECT id, pan FROM cards WHERE id = 74", SHOW),
    ("SELECT * FROM cards WHERE id = 74", SHOW),
    ("SELECT c.* FROM cards c WHERE c.customer_id = 3", SHOW),
    ("SELECT c.pan AS p FROM cards c ORDER BY c.id", SHOW),
    ("SELECT pan, id FROM cards ORDER BY 2", SHOW),
    ("SELECT s.pan FROM (SELECT id, pan FROM cards) s WHERE s.id = 1", SHOW),
    ("WITH w AS (SELECT pan, id FROM cards) SELECT pan FROM w WHERE id = 1", SHOW),
    ("SELECT * FROM (SELECT * FROM cards) s", SHOW),
    ("SELECT count(*) FROM (SELECT pan FROM cards) s", SHOW),
    ("SELECT pan FROM cards UNION ALL SELECT pan FROM cards", SHOW),
    ("SELECT c.pan, o.pan FROM cards c JOIN other o ON o.id = c.id", SHOW),
    ("UPDATE cards SET customer_id = 1 WHERE id = 1 RETURNING pan", SHOW),
    ("DELETE FROM cards WHERE id = 1 RETURNING *", SHOW),
    ("INSERT INTO cards (id, pan) VALUES (1, 'x') RETURNING id, pan", SHOW),
    ("WITH d AS (DELETE FROM cards WHERE id = 1 RETURNING pan) SELECT pan FROM d", SHOW),
    ("COPY cards TO STDOUT", SHOW),
    ("COPY (SELECT id, pan FROM cards WHERE id < 9) TO STDOUT", SHOW),
    ("DECLARE c CURSOR FOR SELECT pan FROM cards", SHOW),
    # --- no read of pan: writes, count(*) -------------------------------------------------
    (f"INSERT INTO cards (id, pan) VALUES (1, '{PAN}')", NONE),
    (f"UPDATE cards SET pan = '{PAN}' WHERE id = 1", NONE),
    ("UPDATE cards SET pan = $1 WHERE id = $2", NONE),
    ("SELECT count(*) FROM cards WHERE id > 3", NONE),
    ("INSERT INTO cards (id, pan) VALUES (1, 'x') ON CONFLICT (id) DO NOTHING", NONE),
    ("SELECT o.pan FROM other o WHERE o.pan = 'x' ORDER BY o.pan", NONE),
    # --- compared by equality -----------------------------------------------------------
    (f"SELECT id FROM cards WHERE pan = '{PAN}'", EQ),
    (f"SELECT id, pan FROM cards WHERE id = 74 AND pan IN ('1', '{PAN}', '3')", EQ),
    (f"SELECT pan = '{PAN}' FROM cards WHERE id = 74", EQ),
    (f"SELECT id FROM cards WHERE '{PAN}' = pan", EQ),
    ("SELECT id FROM cards WHERE pan = $1", EQ),
    ("SELECT id FROM cards WHERE pan <> 'x'", EQ),
    ("SELECT id FROM cards WHERE pan IS NOT DISTINCT FROM 'x'", EQ),
    ("SELECT id FROM cards WHERE pan IS NULL", EQ),
    ("SELECT id FROM cards WHERE pan = ANY ('{a,b}')", EQ),
    ("SELECT id FROM cards WHERE pan OPERATOR(pg_catalog.=) 'x'", EQ),
    ("SELECT NULLIF(pan, 'x') FROM cards", EQ),
    ("SELECT CASE WHEN pan = 'x' THEN 1 END FROM cards", EQ),
    ("SELECT c.id FROM cards c JOIN other o ON o.pan = c.pan", EQ),
    ("SELECT * FROM cards JOIN other USING (pan)", EQ),
    ("SELECT * FROM cards NATURAL JOIN other", EQ),
    ("SELECT id FROM cards WHERE pan IN (SELECT o.pan FROM other o)", EQ),
    ("SELECT * FROM (SELECT id, pan FROM cards) s WHERE s.pan = 'x'", EQ),
    ("SELECT * FROM (SELECT id, pan AS p FROM cards) s WHERE p = 'x'", EQ),
    ("SELECT * FROM (SELECT pan FROM cards) s(q) WHERE q = 'x'", EQ),
    ("WITH w AS (SELECT pan FROM cards) SELECT 1 FROM w WHERE pan = 'x'", EQ),
    ("WITH w AS (SELECT pan FROM cards), v AS (SELECT pan FROM w) SELECT 1 FROM v "
     "WHERE v.pan = 'x'", EQ),
    ("SELECT c1.pan FROM cards c1 WHERE c1.id IN "
     "(SELECT c2.id FROM cards c2 WHERE c2.pan = 'x')", EQ),
    ("DELETE FROM cards WHERE pan = 'x'", EQ),
    ("UPDATE cards SET customer_id = 1 WHERE pan = 'x'", EQ),
    ("INSERT INTO cards (id, pan) VALUES (1, 'x') ON CONFLICT (id) DO UPDATE "
     "SET customer_id = 2 WHERE cards.pan = 'a'", EQ),
    ("MERGE INTO other o USING cards c ON o.pan = c.pan WHEN MATCHED THEN DELETE", EQ),
    ("EXPLAIN ANALYZE SELECT id FROM cards WHERE pan = 'x'", EQ),
    ("PREPARE p AS SELECT id FROM cards WHERE pan = $1", EQ),
    ("COPY (SELECT id FROM cards WHERE pan = 'x') TO STDOUT", EQ),
    # --- any other use ------------------------------------------------------------------
    ("SELECT id FROM cards WHERE pan LIKE '4111%'", USE),
    ("SELECT id FROM cards WHERE pan > '4'", USE),
    ("SELECT id FROM cards WHERE pan BETWEEN '4' AND '5'", USE),
    ("SELECT id FROM cards WHERE lower(pan) = 'x'", USE),
    ("SELECT id FROM cards WHERE pan::text = 'x'", USE),
    ("SELECT length(pan) FROM cards", USE),
    ("SELECT pan || '' FROM cards", USE),
    ("SELECT CASE pan WHEN 'x' THEN 1 END FROM cards", USE),
    ("SELECT CASE WHEN id = 1 THEN pan END FROM cards", USE),
    ("SELECT id FROM cards ORDER BY pan", USE),
    ("SELECT pan, id FROM cards ORDER BY 1", USE),
    ("SELECT pan AS p FROM cards ORDER BY p", USE),
    ("SELECT pan FROM cards GROUP BY pan", USE),
    ("SELECT pan, count(*) FROM cards GROUP BY 1", USE),
    ("SELECT pan, count(*) FROM cards GROUP BY ROLLUP (1)", USE),
    ("SELECT DISTINCT pan FROM cards", USE),
    ("SELECT DISTINCT id, pan FROM cards", USE),
    ("SELECT DISTINCT ON (pan) id FROM cards", USE),
    ("SELECT pan FROM cards UNION SELECT pan FROM cards", USE),
    ("SELECT pan FROM cards INTERSECT SELECT o.pan FROM other o", USE),
    ("SELECT pan FROM cards EXCEPT SELECT 'x'", USE),
    ("SELECT pan FROM cards UNION ALL SELECT o.pan FROM other o ORDER BY 1", USE),
    ("SELECT * FROM (SELECT pan FROM cards) s ORDER BY s.pan", USE),
    ("SELECT * FROM (SELECT pan FROM cards UNION SELECT 'x') s", USE),
    ("WITH w AS (SELECT pan FROM cards) SELECT * FROM w ORDER BY 1", USE),
    ("SELECT * FROM (SELECT pan FROM cards) s JOIN other o ON o.pan > s.pan", USE),
    ("SELECT max(pan) FROM cards", USE),
    ("SELECT count(DISTINCT pan) FROM cards", USE),
    ("SELECT count(pan) FROM cards", USE),
    ("SELECT string_agg(pan, ',') FROM cards", USE),
    ("SELECT count(*) FILTER (WHERE pan > 'x') FROM cards", USE),
    ("SELECT id, row_number() OVER (ORDER BY pan) FROM cards", USE),
    ("SELECT id, count(*) OVER w FROM cards WINDOW w AS (PARTITION BY pan)", USE),
    ("SELECT customer_id FROM cards GROUP BY customer_id HAVING max(pan) > '4'", USE),
    ("SELECT id FROM cards WHERE EXISTS (SELECT 1 FROM other o WHERE o.pan > cards.pan)",
     USE),
    ("SELECT id FROM cards WHERE EXISTS (SELECT pan FROM cards)", USE),
    ("SELECT (SELECT pan FROM cards LIMIT 1)", USE),
    ("SELECT row_to_json(c) FROM cards c", USE),
    ("SELECT c FROM cards c", USE),
    ("SELECT (c).pan FROM cards c WHERE (c).pan > 'x'", USE),
    ("UPDATE cards SET customer_id = 1 WHERE id = 1 RETURNING pan || 'x'", USE),
    ("DELETE FROM cards WHERE id = 1 RETURNING lower(pan)", USE),
    ("INSERT INTO cards (id, pan) VALUES (1, 'x') ON CONFLICT (id) DO UPDATE "
     "SET customer_id = 2 WHERE cards.pan > 'a'", USE),
    ("INSERT INTO cards (id, pan) VALUES (1, 'x') ON CONFLICT (pan) DO NOTHING", USE),
    ("INSERT INTO cards (id, pan) VALUES (1, 'x') ON CONFLICT (id) DO UPDATE "
     "SET pan = excluded.pan || cards.pan", USE),
    ("INSERT INTO other (id, pan) SELECT id, pan FROM cards", USE),
    ("UPDATE other SET pan = c.pan FROM cards c WHERE c.id = other.id", USE),
    ("UPDATE cards SET pan = pan WHERE id = 1", USE),
    ("MERGE INTO other o USING cards c ON o.id = c.id WHEN MATCHED AND c.pan > 'x' "
     "THEN DELETE", USE),
    ("SELECT id FROM cards ORDER BY pan LIMIT 1", USE),
    ("SELECT id, pan INTO copied FROM cards", USE),
    ("CREATE TABLE copied AS SELECT id, pan FROM cards", USE),
    ("CREATE VIEW shown AS SELECT id, pan FROM cards", USE),
    ("SELECT id FROM cards c, LATERAL (SELECT c.pan) s(p) WHERE s.p = 'x'", EQ),
]

ROLES = list(VIEWS)


def _cases() -> list[tuple[str, str, bool]]:
    return [
        (sql, role, EXPECTED[cls][i]) for sql, cls in CONSTRUCTS for i, role in enumerate(ROLES)
    ]


@pytest.mark.parametrize(
    ("sql", "role", "allowed"), _cases(), ids=[f"{r}:{s[:70]}" for s, r, _ in _cases()]
)
def test_oracle_rule(sql: str, role: str, allowed: bool) -> None:
    decision = PolicyCache(POLICY, env=ENV).decide(sql, role, PATH, DB)
    assert decision.allowed is allowed, decision.reason
    if not allowed:
        assert f'"{role}"' in decision.reason
        assert "pan" in decision.reason
        assert PAN not in decision.reason


@pytest.mark.parametrize("role", ["masked", "cipher"])
def test_reason_says_masked_or_ciphertext_without_lookup(role: str) -> None:
    view = {"masked": "masked", "cipher": "ciphertext"}[role]
    eq = decide(POLICY, role, analyze(f"SELECT pan = '{PAN}' FROM cards"), PATH, DB, env=ENV)
    assert not eq.allowed
    assert f'role "{role}"' in eq.reason and f"{view} column public.cards.pan" in eq.reason
    assert "without lookup" in eq.reason and PAN not in eq.reason
    used = decide(POLICY, role, analyze("SELECT id FROM cards ORDER BY pan"), PATH, DB, env=ENV)
    assert not used.allowed and "no lookup" in used.reason


def test_lookup_allows_equality_only() -> None:
    d = decide(POLICY, "m_lookup", analyze("SELECT id FROM cards WHERE pan > 'x'"), PATH, DB,
               env=ENV)
    assert not d.allowed and "lookup allows equality only" in d.reason


@pytest.mark.parametrize(
    ("shown", "used"),
    [
        # same template (DISTINCT ON's number is normalised to $1)
        ("SELECT DISTINCT ON (2) pan, id FROM cards",
         "SELECT DISTINCT ON (1) pan, id FROM cards"),
        # same shape (integer literals in the same places) as a template-cached text
        ("SELECT pan, id FROM cards ORDER BY 2 LIMIT 5",
         "SELECT pan, id FROM cards ORDER BY 1 LIMIT 5"),
        ("SELECT pan, id FROM cards GROUP BY 2 LIMIT 5",
         "SELECT pan, id FROM cards GROUP BY 1 LIMIT 5"),
    ],
)
def test_positional_reference_is_not_shared_by_template(shown: str, used: str) -> None:
    """A result column named by number: the analysis depends on an integer constant."""
    cache = PolicyCache(POLICY, env=ENV)
    for _ in range(2):
        assert cache.decide(shown, "masked", PATH, DB).allowed
        assert not cache.decide(used, "masked", PATH, DB).allowed
    assert cache.decide("SELECT pan, id FROM cards WHERE id = 7", "masked", PATH, DB).allowed
    assert not cache.decide(
        "SELECT pan, id FROM cards WHERE id = 7 AND pan = '8'", "masked", PATH, DB
    ).allowed


def test_expand_views_counts_a_use_of_the_view_as_a_use_of_its_bases() -> None:
    policy = Policy.from_dict(
        {
            "roles": {
                "r": {
                    "tables": {"public.v": ["select"], "public.cards": ["select"]},
                    "columns": {"public.cards.pan": "masked"},
                },
            },
            "expand_views": True,
        }
    )
    env = Environment(
        existing_schemas=ENV.existing_schemas,
        view_bases={("public", "v"): frozenset({("public", "cards")})},
        view_columns={("public", "v"): {("public", "cards"): frozenset({"id", "pan"})}},
    )
    assert decide(policy, "r", analyze("SELECT * FROM v"), PATH, DB, env=env).allowed
    for sql in ("SELECT id FROM v WHERE card = 'x'", "SELECT card FROM v ORDER BY card"):
        d = decide(policy, "r", analyze(sql), PATH, DB, env=env)
        assert not d.allowed and "public.cards.pan" in d.reason, sql


# --- the lookup right in the policy model ------------------------------------------------


def test_lookup_mapping_form_and_inheritance() -> None:
    policy = Policy.from_dict(
        {
            "roles": {
                "look": {"columns": {"public.t.c": {"view": "masked", "lookup": True}}},
                "nolook": {"columns": {"public.t.c": {"view": "masked"}}},
                "both": {"inherits": ["look", "nolook"]},
                "onlylook": {"inherits": ["look"]},
                "stricter": {
                    "inherits": ["look"],
                    "columns": {"public.t.c": "ciphertext"},
                },
            },
            "default_column_view": {"public.t.d": {"view": "ciphertext", "lookup": True}},
        }
    )
    lookups = {name: role.lookups.get(("public", "t"), frozenset())
               for name, role in policy.roles.items()}
    assert lookups["look"] == {"c", "d"}
    assert lookups["nolook"] == {"d"}
    assert lookups["both"] == {"d"}  # lookup only if every parent grants it
    assert lookups["onlylook"] == {"c", "d"}
    assert lookups["stricter"] == {"d"}  # the role's own entry replaces the parent's
    assert policy.roles["look"].columns[("public", "t")]["c"] == "masked"


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ({"view": "plaintext", "lookup": True}, "lookup applies to masked or ciphertext"),
        ({"view": "deny", "lookup": True}, "lookup applies to masked or ciphertext"),
        ({"view": "masked", "lookup": "yes"}, "lookup must be true or false"),
        ({"view": "masked", "lookups": True}, "unknown key"),
        ({"lookup": True}, "view must be one of"),
        ({"view": "shown"}, "view must be one of"),
    ],
)
def test_invalid_lookup(value: object, fragment: str) -> None:
    with pytest.raises(PolicyError) as info:
        Policy.from_dict({"roles": {"a": {"columns": {"public.t.c": value}}}})
    assert fragment in str(info.value)
    assert "roles.a.columns.public.t.c" in str(info.value)
