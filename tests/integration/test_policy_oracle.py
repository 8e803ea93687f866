"""Issue 11, route 6, through the real proxy: a masked or ciphertext view is no oracle.

As reported: a role that sees ``pan`` masked (``************1486``) asked
``WHERE id = 74 AND pan IN (<5,000 Luhn-valid candidates>)`` and bisected to the PAN in
13 queries, and ``SELECT pan = '...'`` answered directly; the proxy sealed the literals
for the blind index, so the server answered the question. Now each is a 42501 naming
role and column (never a value) unless the policy grants ``lookup``, and with ``lookup``
the same lookups work.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from tests.integration.encryption_env import setup_sql, start_encrypted

PAN = "4111111111111486"
PROTECT = {
    "public.o_cards.pan": {"type": "text", "mode": "randomized", "search": "blind_index",
                           "mask": "last4"},
}
SCHEMA = "CREATE TABLE o_cards (id int PRIMARY KEY, holder text, pan bytea, pan_bidx bytea);"
VIEWS: dict[str, Any] = {
    "o_plain": "plaintext",
    "o_masked": "masked",
    "o_cipher": "ciphertext",
    "o_deny": "deny",
    "o_lookup": {"view": "masked", "lookup": True},
}
POLICY = {
    "roles": {
        "app": {"tables": {"public.*": ["select", "insert", "update", "delete"]},
                "allow": ["ddl"]},
        **{role: {"tables": {"public.o_cards": ["select", "update"]},
                  "columns": {"public.o_cards.pan": view}} for role, view in VIEWS.items()},
    },
    "default": "deny",
}


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def candidates(n: int = 5000) -> list[str]:
    """``n`` Luhn-valid 16-digit numbers ending in 1486, the stored PAN among them."""
    out = [PAN]
    middle = 0
    while len(out) < n:
        guess = f"411111{middle:06d}1486"
        middle += 1
        if guess != PAN and _luhn_ok(guess):
            out.append(guess)
    return out


@pytest.fixture(scope="module")
def oproxy(pg: Any) -> Iterator[Any]:
    setup_sql(pg, SCHEMA)
    for role in VIEWS:
        pg.psql(f"DROP ROLE IF EXISTS {role}; CREATE ROLE {role} LOGIN PASSWORD '{role}-pw'")
    pg.psql("GRANT SELECT, UPDATE ON o_cards TO " + ", ".join(VIEWS), db="app")
    p = start_encrypted(pg, PROTECT, POLICY)
    try:
        with psycopg.connect(p.conninfo(), autocommit=True) as c:
            c.execute("INSERT INTO o_cards (id, holder, pan) VALUES (74, 'Ada', %s), "
                      "(75, 'Bob', '5500000000000004')", (PAN,))
        yield p
    finally:
        p.stop()
        setup_sql(pg, "DROP TABLE o_cards")
        pg.psql("DROP ROLE " + ", ".join(VIEWS))


def _connect(p: Any, role: str) -> psycopg.Connection:
    return psycopg.connect(p.conninfo(user=role, password=f"{role}-pw"), autocommit=True)


def _denied(conn: psycopg.Connection, sql: str, params: Any = None, *,
            role: str, needle: str = "o_cards.pan") -> str:
    with pytest.raises(psycopg.Error) as info:
        conn.execute(sql, params).fetchall()
    err = info.value
    assert err.diag.sqlstate == "42501", err
    message = err.diag.message_primary or ""
    assert "strongroom" in message and f'"{role}"' in message and needle in message, message
    assert PAN not in str(err) and PAN[-4:] not in message, message
    return message


def _in_list(cands: list[str], inline: bool = False) -> str:
    """The reported query: one known id, and the candidates as literals or parameters."""
    items = [f"'{x}'" for x in cands] if inline else ["%s"] * len(cands)
    return f"SELECT id, pan FROM o_cards WHERE id = 74 AND pan IN ({', '.join(items)})"


@pytest.mark.parametrize("role", ["o_masked", "o_cipher"])
def test_in_list_oracle_is_denied(oproxy: Any, role: str) -> None:
    cands = candidates()
    with _connect(oproxy, role) as c:
        # simple protocol (literals), extended (parameters), a bisection step
        for text, params in ((_in_list(cands, inline=True), None), (_in_list(cands), cands),
                             (_in_list(cands[:2500], inline=True), None)):
            message = _denied(c, text, params, role=role)
            assert "without lookup" in message
        # the direct question
        _denied(c, f"SELECT pan = '{PAN}' FROM o_cards WHERE id = 74", role=role)
        _denied(c, "SELECT pan = %s FROM o_cards WHERE id = 74", (PAN,), role=role)
        # the bare column is still shown, as the view says
        assert c.execute("SELECT id FROM o_cards WHERE id = 74").fetchall() == [(74,)]
        shown = c.execute("SELECT pan FROM o_cards WHERE id = 74").fetchone()
        assert shown is not None and shown[0] != PAN


def test_lookup_grant_allows_the_same_lookups(oproxy: Any) -> None:
    cands = candidates()
    with _connect(oproxy, "o_lookup") as c:
        assert c.execute(_in_list(cands), cands).fetchall() == [(74, "************1486")]
        assert c.execute(_in_list(cands[1:]), cands[1:]).fetchall() == []
        assert c.execute(_in_list(cands[:2500], inline=True)).fetchall() == [
            (74, "************1486")]
        assert c.execute(f"SELECT pan = '{PAN}' FROM o_cards WHERE id = 74").fetchone() == (
            True,)
        assert c.execute("SELECT id FROM o_cards WHERE pan = %s", (PAN,)).fetchall() == [(74,)]
        # lookup is equality only
        message = _denied(c, "SELECT id FROM o_cards ORDER BY pan", role="o_lookup")
        assert "lookup allows equality only" in message


CONSTRUCTS = [
    # (sql, allowed for: plaintext, masked, ciphertext, deny)
    ("SELECT id, pan FROM o_cards WHERE id = 74", (True, True, True, False)),
    ("SELECT * FROM o_cards WHERE id = 75", (True, True, True, False)),
    ("SELECT count(*) FROM o_cards", (True, True, True, True)),
    ("UPDATE o_cards SET holder = holder WHERE id = 74 RETURNING pan", (True, True, True, False)),
    (f"SELECT id FROM o_cards WHERE pan = '{PAN}'", (True, False, False, False)),
    (f"SELECT id FROM o_cards WHERE id IN (SELECT id FROM o_cards WHERE pan = '{PAN}')",
     (True, False, False, False)),
    (f"SELECT CASE WHEN pan = '{PAN}' THEN 1 ELSE 0 END FROM o_cards WHERE id = 74",
     (True, False, False, False)),
    ("SELECT a.id FROM o_cards a JOIN o_cards b USING (pan) WHERE a.id = 74",
     (None, False, False, False)),
    ("SELECT id FROM o_cards ORDER BY pan", (None, False, False, False)),
    ("SELECT count(DISTINCT pan) FROM o_cards", (None, False, False, False)),
    ("SELECT pan FROM o_cards UNION SELECT pan FROM o_cards", (None, False, False, False)),
    (f"UPDATE o_cards SET holder = holder WHERE pan = '{PAN}'", (True, False, False, False)),
]
ROLES = ("o_plain", "o_masked", "o_cipher", "o_deny")


@pytest.mark.parametrize("extended", [False, True], ids=["simple", "extended"])
@pytest.mark.parametrize(("sql", "expect"), CONSTRUCTS, ids=[s[:50] for s, _ in CONSTRUCTS])
def test_constructs_per_view(oproxy: Any, sql: str, expect: tuple[bool | None, ...],
                             extended: bool) -> None:
    """None: the policy allows it; what the server or the encryption planner then makes
    of a construct on ciphertext is not this test's concern (no policy denial)."""
    for role, allowed in zip(ROLES, expect, strict=True):
        with _connect(oproxy, role) as c:
            run = (lambda s: c.execute(s, prepare=True)) if extended else (
                lambda s: c.execute(s, prepare=False))
            if allowed is False:
                with pytest.raises(psycopg.Error) as info:
                    run(sql)
                assert info.value.diag.sqlstate == "42501", (role, info.value)
                assert "strongroom" in str(info.value) and role in str(info.value)
                assert PAN not in str(info.value)
            elif allowed:
                run(sql)
            else:
                try:
                    run(sql)
                except psycopg.Error as exc:
                    assert "permission denied by strongroom" not in str(exc), (role, exc)
