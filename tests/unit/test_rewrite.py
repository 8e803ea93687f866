"""The rewrite planner: what is encrypted, renamed, refused; pure, no server.

Expected rewrites are written with the splices rendered as ``E[value]`` (encrypt) and
``B[value]`` (blind index), so a row shows exactly which bytes the session replaces.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pglast.parser import parse_sql_json

from proxy.sql.protected import ProtectedColumn, ProtectedSchema
from proxy.sql.rewrite import NO_PROTECTED, RewritePlan, apply_splices, plan_statement

PAN = ProtectedColumn("public", "cards", "pan", "text", "randomized", blind_index=True)
EXPIRY = ProtectedColumn("public", "cards", "expiry", "date", "randomized")
IBAN = ProtectedColumn("public", "accounts", "iban", "text", "deterministic")
BALANCE = ProtectedColumn("public", "accounts", "balance", "numeric", "randomized")
OPENED = ProtectedColumn("public", "accounts", "opened", "timestamptz", "deterministic")
LIMIT_ = ProtectedColumn("public", "accounts", "lim", "int8", "deterministic")
TAX = ProtectedColumn("public", "customers", "tax_id", "text", "randomized", blind_index=True)
PAY_IBAN = ProtectedColumn("public", "payments", "iban", "text", "deterministic")
FLAG = ProtectedColumn("public", "payments", "flag", "bool", "deterministic")
REF = ProtectedColumn("public", "payments", "ref", "uuid", "deterministic")
DOC = ProtectedColumn("public", "payments", "doc", "jsonb", "deterministic")
QTY = ProtectedColumn("public", "payments", "qty", "int4", "deterministic")
NOTE = ProtectedColumn("public", "payments", "note", "varchar", "deterministic")
VAULT = ProtectedColumn("vault", "Secrets", "Code", "text", "deterministic")

SCHEMA = ProtectedSchema(
    [PAN, EXPIRY, IBAN, BALANCE, OPENED, LIMIT_, TAX, PAY_IBAN, FLAG, REF, DOC, QTY, NOTE, VAULT]
)
PATH = ("public",)


def plan(sql: str, path: tuple[str, ...] = PATH, **kw: object) -> RewritePlan:
    return plan_statement(sql, SCHEMA, path, **kw)  # type: ignore[arg-type]


def render(sql: str, p: RewritePlan) -> str:
    return apply_splices(
        sql, p.splices, lambda s: f"{'E' if s.action == 'encrypt' else 'B'}[{s.literal}]"
    )


def params(p: RewritePlan) -> dict[int, tuple[str, str]]:
    return {n: (a.action, a.column.column) for n, a in p.params.items()}


# (sql, rewritten, params)
REWRITES: list[tuple[str, str, dict[int, tuple[str, str]]]] = [
    # literal syntaxes into a deterministic text column
    (
        "INSERT INTO accounts(iban) VALUES ('DE01')",
        "INSERT INTO accounts(iban) VALUES (E[DE01])",
        {},
    ),
    (
        "INSERT INTO accounts(iban) VALUES (E'DE\\'01\\n')",
        "INSERT INTO accounts(iban) VALUES (E[DE'01\n])",
        {},
    ),
    (
        "INSERT INTO accounts(iban) VALUES ('it''s')",
        "INSERT INTO accounts(iban) VALUES (E[it's])",
        {},
    ),
    (
        "INSERT INTO accounts(iban) VALUES ($$dollar 'quoted'$$)",
        "INSERT INTO accounts(iban) VALUES (E[dollar 'quoted'])",
        {},
    ),
    (
        "INSERT INTO accounts(iban) VALUES ($tag$x$$y$tag$)",
        "INSERT INTO accounts(iban) VALUES (E[x$$y])",
        {},
    ),
    (
        "INSERT INTO accounts(iban) VALUES (U&'d\\0061t')",
        "INSERT INTO accounts(iban) VALUES (E[dat])",
        {},
    ),
    (
        "INSERT INTO accounts(iban) VALUES (U&'d!0061t' UESCAPE '!')",
        "INSERT INTO accounts(iban) VALUES (E[dat])",
        {},
    ),
    (
        "INSERT INTO accounts(iban) VALUES ('Grüße €')",
        "INSERT INTO accounts(iban) VALUES (E[Grüße €])",
        {},
    ),
    ("INSERT INTO accounts(iban) VALUES ('')", "INSERT INTO accounts(iban) VALUES (E[])", {}),
    (
        "INSERT INTO accounts(iban) VALUES ('a'\n'b')",
        "INSERT INTO accounts(iban) VALUES (E[ab])",
        {},
    ),
    (
        "INSERT INTO accounts(iban) VALUES ('x'::text)",
        "INSERT INTO accounts(iban) VALUES (E[x])",
        {},
    ),
    (
        "INSERT INTO accounts(iban) VALUES (CAST('x' AS varchar))",
        "INSERT INTO accounts(iban) VALUES (E[x])",
        {},
    ),
    (
        "INSERT INTO accounts(iban) VALUES ('x'::pg_catalog.text)",
        "INSERT INTO accounts(iban) VALUES (E[x])",
        {},
    ),
    ("INSERT INTO accounts(iban) VALUES (NULL)", "INSERT INTO accounts(iban) VALUES (NULL)", {}),
    (
        "INSERT INTO accounts(iban) VALUES (DEFAULT)",
        "INSERT INTO accounts(iban) VALUES (DEFAULT)",
        {},
    ),
    # other logical types
    (
        "INSERT INTO accounts(balance) VALUES (-5)",
        "INSERT INTO accounts(balance) VALUES (E[-5])",
        {},
    ),
    (
        "INSERT INTO accounts(balance) VALUES (- 12.50)",
        "INSERT INTO accounts(balance) VALUES (E[-12.50])",
        {},
    ),
    (
        "INSERT INTO accounts(balance) VALUES (+3)",
        "INSERT INTO accounts(balance) VALUES (E[3])",
        {},
    ),
    (
        "INSERT INTO accounts(balance) VALUES ('NaN'::numeric)",
        "INSERT INTO accounts(balance) VALUES (E[NaN])",
        {},
    ),
    (
        "INSERT INTO accounts(balance) VALUES (1e10)",
        "INSERT INTO accounts(balance) VALUES (E[1e10])",
        {},
    ),
    (
        "INSERT INTO accounts(lim) VALUES (9223372036854775807)",
        "INSERT INTO accounts(lim) VALUES (E[9223372036854775807])",
        {},
    ),
    ("INSERT INTO accounts(lim) VALUES (0)", "INSERT INTO accounts(lim) VALUES (E[0])", {}),
    (
        "INSERT INTO accounts(opened) VALUES ('2024-01-01 10:00+02'::timestamp with time zone)",
        "INSERT INTO accounts(opened) VALUES (E[2024-01-01 10:00+02])",
        {},
    ),
    (
        "INSERT INTO accounts(opened) VALUES (TIMESTAMPTZ 'infinity')",
        "INSERT INTO accounts(opened) VALUES (E[infinity])",
        {},
    ),
    (
        "INSERT INTO cards(expiry) VALUES (DATE '2024-01-01')",
        "INSERT INTO cards(expiry) VALUES (E[2024-01-01])",
        {},
    ),
    (
        "INSERT INTO cards(expiry) VALUES ('-infinity'::date)",
        "INSERT INTO cards(expiry) VALUES (E[-infinity])",
        {},
    ),
    (
        "INSERT INTO payments(flag, qty) VALUES (true, 42)",
        "INSERT INTO payments(flag, qty) VALUES (E[true], E[42])",
        {},
    ),
    (
        "INSERT INTO payments(flag) VALUES (false)",
        "INSERT INTO payments(flag) VALUES (E[false])",
        {},
    ),
    (
        "INSERT INTO payments(ref) VALUES ('a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid)",
        "INSERT INTO payments(ref) VALUES (E[a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11])",
        {},
    ),
    (
        "INSERT INTO payments(doc) VALUES ('{\"a\": [1, 2]}'::jsonb)",
        'INSERT INTO payments(doc) VALUES (E[{"a": [1, 2]}])',
        {},
    ),
    (
        "INSERT INTO payments(note) VALUES ('v'::varchar)",
        "INSERT INTO payments(note) VALUES (E[v])",
        {},
    ),
    # multi-row VALUES, mixed columns, params
    (
        "INSERT INTO accounts(id, iban, balance) VALUES (1, 'A', 1.5), (2, $1, $2)",
        "INSERT INTO accounts(id, iban, balance) VALUES (1, E[A], E[1.5]), (2, $1, $2)",
        {1: ("encrypt", "iban"), 2: ("encrypt", "balance")},
    ),
    (
        "INSERT INTO accounts(iban) VALUES ($1::text)",
        "INSERT INTO accounts(iban) VALUES ($1)",
        {1: ("encrypt", "iban")},
    ),
    (
        "INSERT INTO accounts(iban) VALUES (CAST($1 AS text))",
        "INSERT INTO accounts(iban) VALUES ($1)",
        {1: ("encrypt", "iban")},
    ),
    # blind-indexed column: sibling column and value added
    (
        "INSERT INTO cards(id, pan) VALUES (1, '4111'), (2, '4222')",
        "INSERT INTO cards(id, pan, pan_bidx) VALUES (1, E[4111], B[4111]), (2, E[4222], B[4222])",
        {},
    ),
    (
        "INSERT INTO cards(pan, expiry) VALUES ($1, $2)",
        "INSERT INTO cards(pan, pan_bidx, expiry) VALUES ($1, $3, $2)",
        {1: ("encrypt", "pan"), 2: ("encrypt", "expiry")},
    ),
    (
        "INSERT INTO cards(pan) VALUES (NULL)",
        "INSERT INTO cards(pan, pan_bidx) VALUES (NULL, NULL)",
        {},
    ),
    (
        "UPDATE cards SET pan = '4111' WHERE id = 1",
        "UPDATE cards SET pan = E[4111], pan_bidx = B[4111] WHERE id = 1",
        {},
    ),
    (
        "UPDATE cards SET pan = pan WHERE id = 1",
        "UPDATE cards SET pan = pan, pan_bidx = pan_bidx WHERE id = 1",
        {},
    ),
    # upserts
    (
        "INSERT INTO accounts(id, iban) VALUES (1, 'A') ON CONFLICT (id) DO UPDATE "
        "SET iban = EXCLUDED.iban",
        "INSERT INTO accounts(id, iban) VALUES (1, E[A]) ON CONFLICT (id) DO UPDATE "
        "SET iban = EXCLUDED.iban",
        {},
    ),
    (
        "INSERT INTO cards(id, pan) VALUES (1, $1) ON CONFLICT (id) DO UPDATE "
        "SET pan = excluded.pan",
        "INSERT INTO cards(id, pan, pan_bidx) VALUES (1, $1, $2) ON CONFLICT (id) DO UPDATE "
        "SET pan = excluded.pan, pan_bidx = excluded.pan_bidx",
        {1: ("encrypt", "pan")},
    ),
    (
        "INSERT INTO accounts(id, iban) VALUES (1, 'A') ON CONFLICT (id) DO UPDATE "
        "SET iban = $1 WHERE accounts.iban = 'B'",
        "INSERT INTO accounts(id, iban) VALUES (1, E[A]) ON CONFLICT (id) DO UPDATE "
        "SET iban = $1 WHERE accounts.iban = E[B]",
        {1: ("encrypt", "iban")},
    ),
    (
        "INSERT INTO accounts(iban) VALUES ('A') ON CONFLICT (iban) DO NOTHING",
        "INSERT INTO accounts(iban) VALUES (E[A]) ON CONFLICT (iban) DO NOTHING",
        {},
    ),
    # INSERT ... SELECT
    (
        "INSERT INTO accounts(id, iban) SELECT id, 'X' FROM staging",
        "INSERT INTO accounts(id, iban) SELECT id, E[X] FROM staging",
        {},
    ),
    (
        "INSERT INTO accounts(iban, balance) SELECT $1, 10",
        "INSERT INTO accounts(iban, balance) SELECT $1, E[10]",
        {1: ("encrypt", "iban")},
    ),
    (
        "INSERT INTO accounts(iban) SELECT iban FROM accounts WHERE id = 3",
        "INSERT INTO accounts(iban) SELECT iban FROM accounts WHERE id = 3",
        {},
    ),
    # UPDATE
    (
        "UPDATE accounts SET balance = 5, iban = $2 WHERE iban = $1",
        "UPDATE accounts SET balance = E[5], iban = $2 WHERE iban = $1",
        {1: ("encrypt", "iban"), 2: ("encrypt", "iban")},
    ),
    (
        "UPDATE accounts a SET (iban, id) = ('N', 2) WHERE a.id = 1",
        "UPDATE accounts a SET (iban, id) = (E[N], 2) WHERE a.id = 1",
        {},
    ),
    ("UPDATE accounts SET balance = NULL", "UPDATE accounts SET balance = NULL", {}),
    # WHERE with deterministic columns
    ("SELECT id FROM accounts WHERE iban = 'A'", "SELECT id FROM accounts WHERE iban = E[A]", {}),
    ("SELECT id FROM accounts WHERE 'A' = iban", "SELECT id FROM accounts WHERE E[A] = iban", {}),
    (
        "SELECT id FROM accounts WHERE $1 = iban",
        "SELECT id FROM accounts WHERE $1 = iban",
        {1: ("encrypt", "iban")},
    ),
    ("SELECT id FROM accounts WHERE iban <> 'A'", "SELECT id FROM accounts WHERE iban <> E[A]", {}),
    (
        "SELECT id FROM accounts WHERE iban != $1",
        "SELECT id FROM accounts WHERE iban != $1",
        {1: ("encrypt", "iban")},
    ),
    (
        "SELECT id FROM accounts WHERE iban IN ('A', $1, 'C')",
        "SELECT id FROM accounts WHERE iban IN (E[A], $1, E[C])",
        {1: ("encrypt", "iban")},
    ),
    (
        "SELECT id FROM accounts WHERE iban NOT IN ('A')",
        "SELECT id FROM accounts WHERE iban NOT IN (E[A])",
        {},
    ),
    (
        "SELECT id FROM accounts WHERE iban IS NOT DISTINCT FROM $1",
        "SELECT id FROM accounts WHERE iban IS NOT DISTINCT FROM $1",
        {1: ("encrypt", "iban")},
    ),
    (
        "SELECT id FROM accounts WHERE iban IS NULL OR balance IS NOT NULL",
        "SELECT id FROM accounts WHERE iban IS NULL OR balance IS NOT NULL",
        {},
    ),
    ("SELECT id FROM accounts WHERE iban = NULL", "SELECT id FROM accounts WHERE iban = NULL", {}),
    (
        "SELECT id FROM accounts WHERE opened = '2024-01-01T00:00:00Z'::timestamptz",
        "SELECT id FROM accounts WHERE opened = E[2024-01-01T00:00:00Z]",
        {},
    ),
    ("SELECT id FROM accounts WHERE lim = -1", "SELECT id FROM accounts WHERE lim = E[-1]", {}),
    (
        "SELECT id FROM accounts WHERE NOT (iban = 'A') AND id > 3",
        "SELECT id FROM accounts WHERE NOT (iban = E[A]) AND id > 3",
        {},
    ),
    # randomized + blind index: rename to the sibling column
    (
        "SELECT pan FROM cards WHERE pan = $1",
        "SELECT pan , pan AS strongroom_recheck_1 FROM cards WHERE pan_bidx = $1",
        {1: ("blind_index", "pan")},
    ),
    (
        "SELECT c.pan FROM cards c WHERE c.pan = '4111'",
        "SELECT c.pan , c.pan AS strongroom_recheck_1 FROM cards c WHERE c.pan_bidx = B[4111]",
        {},
    ),
    (
        "SELECT pan FROM public.cards WHERE public.cards.pan IN ('1', '2')",
        "SELECT pan , public.cards.pan AS strongroom_recheck_1 FROM public.cards "
        "WHERE public.cards.pan_bidx IN (B[1], B[2])",
        {},
    ),
    (
        'SELECT pan FROM cards WHERE "pan" <> $1',
        "SELECT pan FROM cards WHERE pan_bidx <> $1",
        {1: ("blind_index", "pan")},
    ),
    (
        "SELECT pan FROM cards WHERE pan = $1::text",
        "SELECT pan , pan AS strongroom_recheck_1 FROM cards WHERE pan_bidx = $1",
        {1: ("blind_index", "pan")},
    ),
    (
        "DELETE FROM customers WHERE tax_id = 'T1' RETURNING tax_id",
        "DELETE FROM customers WHERE tax_id_bidx = B[T1] RETURNING tax_id",
        {},
    ),
    # subqueries, CTEs, aliases
    (
        "SELECT id FROM orders WHERE card_id IN (SELECT id FROM cards WHERE pan = $1)",
        "SELECT id FROM orders WHERE card_id IN (SELECT id FROM cards WHERE pan_bidx = $1)",
        {1: ("blind_index", "pan")},
    ),
    (
        "SELECT * FROM orders o WHERE EXISTS (SELECT 1 FROM accounts a WHERE a.iban = 'Z')",
        "SELECT * FROM orders o WHERE EXISTS (SELECT 1 FROM accounts a WHERE a.iban = E[Z])",
        {},
    ),
    (
        "WITH x AS (SELECT iban FROM accounts) SELECT iban FROM x WHERE iban = 'A'",
        "WITH x AS (SELECT iban FROM accounts) SELECT iban FROM x WHERE iban = E[A]",
        {},
    ),
    (
        "SELECT s.i FROM (SELECT iban AS i FROM accounts) s WHERE s.i = $1",
        "SELECT s.i FROM (SELECT iban AS i FROM accounts) s WHERE s.i = $1",
        {1: ("encrypt", "iban")},
    ),
    (
        "WITH ins AS (INSERT INTO accounts(iban) VALUES ('N') RETURNING id) SELECT id FROM ins",
        "WITH ins AS (INSERT INTO accounts(iban) VALUES (E[N]) RETURNING id) SELECT id FROM ins",
        {},
    ),
    (
        "SELECT a.id FROM accounts a JOIN payments p ON a.iban = p.iban WHERE p.iban = 'Q'",
        "SELECT a.id FROM accounts a JOIN payments p ON a.iban = p.iban WHERE p.iban = E[Q]",
        {},
    ),
    (
        "SELECT a.id FROM accounts a JOIN payments p USING (iban)",
        "SELECT a.id FROM accounts a JOIN payments p USING (iban)",
        {},
    ),
    (
        "SELECT id FROM accounts WHERE iban IN (SELECT iban FROM payments)",
        "SELECT id FROM accounts WHERE iban IN (SELECT iban FROM payments)",
        {},
    ),
    # names: quoted, qualified, non-default schema
    (
        'SELECT "Code" FROM vault."Secrets" WHERE "Code" = \'s\'',
        'SELECT "Code" FROM vault."Secrets" WHERE "Code" = E[s]',
        {},
    ),
    # aggregates and grouping allowed
    (
        "SELECT iban, count(*) FROM accounts GROUP BY iban",
        "SELECT iban, count(*) FROM accounts GROUP BY iban",
        {},
    ),
    (
        "SELECT count(pan), count(DISTINCT iban) FROM cards, accounts",
        "SELECT count(pan), count(DISTINCT iban) FROM cards, accounts",
        {},
    ),
    ("SELECT DISTINCT iban FROM accounts", "SELECT DISTINCT iban FROM accounts", {}),
    (
        "SELECT CASE WHEN pan IS NULL THEN 'none' END FROM cards",
        "SELECT CASE WHEN pan IS NULL THEN 'none' END FROM cards",
        {},
    ),
    # COPY (query), views (EXPLAIN of a sealed value is refused: see REFUSALS)
    (
        "CREATE VIEW v AS SELECT id FROM accounts WHERE iban = 'A'",
        "CREATE VIEW v AS SELECT id FROM accounts WHERE iban = E[A]",
        {},
    ),
    # multi-statement strings: splices over the whole string
    (
        "SELECT 'ü'; INSERT INTO accounts(iban) VALUES ('é'); SELECT iban FROM accounts "
        "WHERE iban = 'ß'",
        "SELECT 'ü'; INSERT INTO accounts(iban) VALUES (E[é]); SELECT iban FROM accounts "
        "WHERE iban = E[ß]",
        {},
    ),
    (
        "INSERT INTO cards(pan) SELECT pan FROM cards WHERE id = 1",
        "INSERT INTO cards(pan, pan_bidx) SELECT pan, pan_bidx FROM cards WHERE id = 1",
        {},
    ),
    (
        "UPDATE customers SET tax_id = $1, id = $2 WHERE tax_id = $3",
        "UPDATE customers SET tax_id = $1, tax_id_bidx = $4, id = $2 WHERE tax_id_bidx = $3",
        {1: ("encrypt", "tax_id"), 3: ("blind_index", "tax_id")},
    ),
    (
        "select PAN from CARDS where Pan = 'x'",
        "select PAN , Pan AS strongroom_recheck_1 from CARDS where pan_bidx = B[x]",
        {},
    ),
    (
        "SELECT id FROM accounts a WHERE EXISTS (SELECT 1 FROM payments p WHERE p.iban = a.iban)",
        "SELECT id FROM accounts a WHERE EXISTS (SELECT 1 FROM payments p WHERE p.iban = a.iban)",
        {},
    ),
    (
        "SELECT id FROM accounts WHERE EXISTS (SELECT 1 FROM orders o WHERE iban = 'q')",
        "SELECT id FROM accounts WHERE EXISTS (SELECT 1 FROM orders o WHERE iban = E[q])",
        {},
    ),
    (
        "DECLARE cur CURSOR FOR SELECT pan FROM cards WHERE pan = $1",
        "DECLARE cur CURSOR FOR SELECT pan FROM cards WHERE pan_bidx = $1",
        {1: ("blind_index", "pan")},
    ),
    (
        "SELECT id FROM accounts WHERE iban = 'x' UNION SELECT id FROM payments WHERE iban = 'y'",
        "SELECT id FROM accounts WHERE iban = E[x] UNION SELECT id FROM payments WHERE iban = E[y]",
        {},
    ),
    (
        "SELECT id FROM accounts WHERE iban = E'\\u00e9' OR iban = 'a'::\"text\"",
        "SELECT id FROM accounts WHERE iban = E[é] OR iban = E[a]",
        {},
    ),
    ("LOCK cards", "LOCK cards", {}),
    ("CREATE INDEX ON cards (pan_bidx)", "CREATE INDEX ON cards (pan_bidx)", {}),
    # redundant parentheses around a value: pglast drops them from the tree, the
    # blind-index companion goes after them and a cast covers them
    (
        "INSERT INTO cards (id, pan) VALUES (1, ('x'))",
        "INSERT INTO cards (id, pan, pan_bidx) VALUES (1, (E[x]), B[x])",
        {},
    ),
    (
        "INSERT INTO cards (pan) VALUES (('x')), ((('y')))",
        "INSERT INTO cards (pan, pan_bidx) VALUES ((E[x]), B[x]), (((E[y])), B[y])",
        {},
    ),
    (
        "INSERT INTO cards (pan, id) VALUES (('x')::text, 1), ((('y'))::text, 2)",
        "INSERT INTO cards (pan, pan_bidx, id) VALUES (E[x], B[x], 1), (E[y], B[y], 2)",
        {},
    ),
    (
        "INSERT INTO cards (pan, id) VALUES (+(5), 1), (-(5), 2), (-(-(5)), 3)",
        "INSERT INTO cards (pan, pan_bidx, id) VALUES (E[5], B[5], 1), (E[-5], B[-5], 2), "
        "(E[5], B[5], 3)",
        {},
    ),
    (
        "UPDATE cards SET pan = ('x'), id = 2",
        "UPDATE cards SET pan = (E[x]), pan_bidx = B[x], id = 2",
        {},
    ),
    (
        "UPDATE cards SET pan = ((($1)::text))",
        "UPDATE cards SET pan = (($1)), pan_bidx = $2",
        {1: ("encrypt", "pan")},
    ),
    (
        "INSERT INTO cards (pan) SELECT (('x'))",
        "INSERT INTO cards (pan, pan_bidx) SELECT ((E[x])), B[x]",
        {},
    ),
    (
        "INSERT INTO cards (id, pan) VALUES (1, ($1)) "
        "ON CONFLICT (id) DO UPDATE SET pan = ((excluded.pan))",
        "INSERT INTO cards (id, pan, pan_bidx) VALUES (1, ($1), $2) "
        "ON CONFLICT (id) DO UPDATE SET pan = ((excluded.pan)), pan_bidx = excluded.pan_bidx",
        {1: ("encrypt", "pan")},
    ),
    # literals not aimed at protected columns stay
    (
        "UPDATE accounts SET note = 'plain' WHERE id = 4 AND iban = 'A'",
        "UPDATE accounts SET note = 'plain' WHERE id = 4 AND iban = E[A]",
        {},
    ),
]


@pytest.mark.parametrize(("sql", "expected", "want_params"), REWRITES)
def test_rewrite(sql: str, expected: str, want_params: dict[int, tuple[str, str]]) -> None:
    p = plan(sql)
    assert p.refusal is None, p.refusal
    assert p.touches_protected
    assert render(sql, p) == expected
    assert params(p) == want_params
    parse_sql_json(apply_splices(sql, p.splices, lambda s: "'\\x00'::bytea"))


# (sql, column named in the message, words that must not appear)
REFUSALS: list[tuple[str, str, tuple[str, ...]]] = [
    ("SELECT id FROM accounts WHERE balance > 100", "public.accounts.balance", ("100",)),
    ("SELECT id FROM accounts WHERE balance <= $1", "public.accounts.balance", ()),
    (
        "SELECT id FROM accounts WHERE iban BETWEEN 'A1' AND 'B2'",
        "public.accounts.iban",
        ("A1", "B2"),
    ),
    ("SELECT id FROM cards WHERE pan LIKE '4111%'", "public.cards.pan", ("4111",)),
    ("SELECT id FROM cards WHERE pan ILIKE $1", "public.cards.pan", ()),
    ("SELECT id FROM cards WHERE pan SIMILAR TO '41%'", "public.cards.pan", ("41%",)),
    ("SELECT id FROM cards WHERE pan ~ '^41'", "public.cards.pan", ("^41",)),
    ("SELECT pan FROM cards ORDER BY pan", "public.cards.pan", ()),
    ("SELECT pan FROM cards ORDER BY 1", "public.cards.pan", ()),
    ("SELECT id FROM accounts ORDER BY iban DESC", "public.accounts.iban", ()),
    ("SELECT expiry, count(*) FROM cards GROUP BY expiry", "public.cards.expiry", ()),
    ("SELECT DISTINCT balance FROM accounts", "public.accounts.balance", ()),
    ("SELECT DISTINCT ON (pan) id FROM cards", "public.cards.pan", ()),
    ("SELECT upper(pan) FROM cards", "public.cards.pan", ()),
    ("SELECT pan || 'x' FROM cards", "public.cards.pan", ("'x'",)),
    ("SELECT sum(balance) FROM accounts", "public.accounts.balance", ()),
    ("SELECT id FROM cards WHERE lower(pan) = 'abc'", "public.cards.pan", ("abc",)),
    ("SELECT pan::text FROM cards", "public.cards.pan", ()),
    ("SELECT count(DISTINCT pan) FROM cards", "public.cards.pan", ()),
    ("SELECT id FROM cards WHERE expiry = '2024-01-01'", "public.cards.expiry", ("2024-01-01",)),
    ("SELECT id FROM cards WHERE expiry IN ($1, $2)", "public.cards.expiry", ()),
    ("SELECT id FROM cards WHERE pan = ANY($1)", "public.cards.pan", ()),
    ("SELECT iban FROM accounts UNION SELECT 'leak'", "public.accounts.iban", ("leak",)),
    ("SELECT id, pan FROM cards EXCEPT SELECT 1, 'y'", "public.cards.pan", ()),
    ("INSERT INTO cards(pan) VALUES ('4111' || '1111')", "public.cards.pan", ("4111", "1111")),
    ("UPDATE cards SET pan = upper($1)", "public.cards.pan", ()),
    ("UPDATE accounts SET iban = note", "public.accounts.iban", ()),
    ("INSERT INTO accounts(iban) SELECT pan FROM cards", "public.accounts.iban", ()),
    (
        "INSERT INTO accounts(iban) SELECT x FROM (VALUES ('secret')) v(x)",
        "public.accounts.iban",
        ("secret",),
    ),
    ("INSERT INTO accounts(iban) VALUES (coalesce($1, 'dflt'))", "public.accounts.iban", ("dflt",)),
    ("INSERT INTO accounts(iban) VALUES ('x'::varchar(3))", "public.accounts.iban", ("'x'",)),
    ("INSERT INTO accounts(balance) VALUES ('1.5'::float8)", "public.accounts.balance", ("1.5",)),
    ("INSERT INTO accounts(iban) VALUES ($1::int)", "public.accounts.iban", ()),
    ("SELECT id FROM customers WHERE tax_id = 'T' || 'X'", "public.customers.tax_id", ("'T'",)),
    ("SELECT a.id FROM accounts a JOIN cards c ON a.iban = c.pan", "public.accounts.iban", ()),
    (
        "SELECT a.id FROM accounts a JOIN cards c ON a.balance = a.balance",
        "public.accounts.balance",
        (),
    ),
    ("SELECT id FROM accounts a NATURAL JOIN payments", "public.", ()),
    ("SELECT id FROM accounts WHERE iban = (SELECT note FROM x)", "public.accounts.iban", ()),
    (
        "SELECT id FROM x WHERE 'leak' IN (SELECT iban FROM accounts)",
        "public.accounts.iban",
        ("leak",),
    ),
    ("SELECT row_to_json(c) FROM cards c", "public.cards.", ()),
    ("SELECT * FROM (SELECT pan FROM cards) s WHERE s.pan = $1", "public.cards.pan", ()),
    ("DO $$BEGIN INSERT INTO cards(pan) VALUES ('4111'); END$$", "cards", ("4111",)),
    (
        "DO $$BEGIN EXECUTE 'UPDATE CARDS SET pan = ' || quote_literal('9'); END$$",
        "cards",
        ("'9'",),
    ),
    ("CREATE FUNCTION f() RETURNS void LANGUAGE sql AS 'DELETE FROM cards'", "cards", ()),
    (
        "CREATE PROCEDURE p() LANGUAGE plpgsql AS $$BEGIN UPDATE accounts SET iban = 'x'; END$$",
        "accounts",
        ("'x'",),
    ),
    ("COPY cards FROM '/tmp/cards.csv'", "public.cards.", ()),
    ("COPY accounts FROM PROGRAM 'cat x'", "public.accounts.", ("cat x",)),
    ("COPY cards FROM STDIN", "public.cards.pan", ()),
    ("INSERT INTO accounts VALUES (1, 'x')", "public.accounts.", ("'x'",)),
    (
        "MERGE INTO accounts a USING s ON a.id = s.id WHEN MATCHED THEN UPDATE SET iban = 'q'",
        "public.accounts.",
        ("'q'",),
    ),
    ("PREPARE q AS INSERT INTO accounts(iban) VALUES ($1)", "public.accounts.iban", ()),
    ("EXECUTE q('4111')", "public.", ("4111",)),
    ("ALTER TABLE accounts ALTER COLUMN iban SET DEFAULT 'dflt'", "public.accounts.", ("dflt",)),
    ("INSERT INTO accounts(iban, note) VALUES ($1, $1)", "public.accounts.iban", ()),
    ("INSERT INTO cards(pan, pan_bidx) VALUES ('1', '2')", "public.cards.pan", ()),
    ("SELECT id FROM accounts WHERE iban = $1 AND balance = $1", "public.accounts.balance", ()),
    ("SELECT * FROM cards c(a, b)", "public.cards.", ()),
    ("SELECT id FROM accounts WHERE (iban, id) = ('Z9', 1)", "public.accounts.iban", ("Z9",)),
    ("SELECT row_number() OVER (ORDER BY pan) FROM cards", "public.cards.pan", ()),
    ("CREATE INDEX ON accounts (lower(iban))", "public.accounts.", ()),
    ("SELECT c FROM cards c", "public.cards.", ()),
    ("SELECT c1.id FROM cards c1 JOIN cards c2 ON c1.pan = c2.pan", "public.cards.pan", ()),
    ("SELECT pan FROM cards WHERE pan = 'k9' COLLATE \"C\"", "public.cards.pan", ("k9",)),
    ("SELECT * FROM cards c, LATERAL f(c.pan) g", "public.cards.pan", ()),
    ("SELECT * FROM payments WHERE flag", "public.payments.flag", ()),
    ("SELECT pan FROM cards WHERE pan IN (SELECT pan FROM cards)", "public.cards.pan", ()),
    ("SELECT 1 FROM accounts WHERE balance = 5", "public.accounts.balance", ()),
    ("UPDATE cards SET pan = $1 WHERE pan = $1", "public.cards.pan", ()),
    # the plan text would print the sealed value (deterministic ciphertext, blind index)
    ("EXPLAIN SELECT id FROM accounts WHERE iban = 'A7'", "public.accounts.iban", ("A7",)),
    ("EXPLAIN (VERBOSE) SELECT id FROM cards WHERE pan = $1", "public.cards.pan", ()),
    ("EXPLAIN INSERT INTO accounts (iban) VALUES ('Q8')", "public.accounts.iban", ("Q8",)),
]


@pytest.mark.parametrize(("sql", "column", "forbidden"), REFUSALS)
def test_refusal(sql: str, column: str, forbidden: tuple[str, ...]) -> None:
    p = plan(sql)
    assert p.refusal is not None, render(sql, p)
    assert p.touches_protected
    assert column in p.refusal
    for word in forbidden:
        assert word not in p.refusal


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 1",
        "SELECT * FROM orders WHERE note = 'cards'",
        "INSERT INTO orders(note) VALUES ('4111')",
        "SELECT * FROM other.cards WHERE pan = 'x'",
        "WITH cards AS (SELECT 'x' AS pan) SELECT pan FROM cards WHERE pan < 'y'",
        "BEGIN",
        "DO $$BEGIN PERFORM 1; END$$",
        "DROP TABLE IF EXISTS scratch",
        "-- cards\nSELECT 2",
    ],
)
def test_no_protected(sql: str) -> None:
    assert plan(sql) is NO_PROTECTED


def test_fast_exit_before_parsing() -> None:
    # text that cannot name a protected table is not even parsed (a syntax error passes)
    assert plan("SELEC nonsense ((") is NO_PROTECTED
    assert plan("SELEC cards ((").refusal is not None


def test_search_path_resolution() -> None:
    sql = 'SELECT 1 FROM "Secrets" WHERE "Code" = \'k\''
    assert plan(sql) is NO_PROTECTED  # vault not on the path
    p = plan(sql, ("public", "vault"))
    assert render(sql, p) == 'SELECT 1 FROM "Secrets" WHERE "Code" = E[k]'
    assert p.tables_referenced == frozenset({("vault", "Secrets")})
    assert plan("SELECT 1 FROM secrets WHERE \"Code\" = 'k'", ("vault",)) is NO_PROTECTED
    # an unprotected table earlier on the path shadows the protected one
    shadow = plan(
        "SELECT id FROM accounts WHERE iban = 'k'",
        ("app", "public"),
        table_exists=lambda s, t: s == "app",
    )
    assert shadow is NO_PROTECTED
    assert ProtectedSchema([PAN]).lookup((None, "cards"), ("x", "public")) == ("public", "cards")


def test_columns_selected() -> None:
    p = plan("SELECT c.pan AS p, id, expiry, (SELECT iban FROM accounts LIMIT 1) FROM cards c")
    assert p.columns_selected == ((PAN, None, EXPIRY, IBAN),)
    p = plan("SELECT * FROM accounts")  # column order unknown
    assert p.columns_selected == (None,)
    # (`*` over a table with a blind index is written out without its storage column)
    p = plan("SELECT * FROM cards", column_order=lambda s, t: ("id", "pan", "pan_bidx", "expiry"))
    assert p.columns_selected == ((None, PAN, EXPIRY),)
    p = plan("UPDATE cards SET id = 2 RETURNING pan, id")
    assert p.columns_selected == ((PAN, None),)
    p = plan("SELECT x.i FROM (SELECT iban AS i FROM accounts) x; DELETE FROM accounts")
    assert p.columns_selected == ((IBAN,), ())


def test_insert_without_columns_uses_catalog_order() -> None:
    order = {("public", "accounts"): ("id", "iban", "balance")}
    sql = "INSERT INTO accounts VALUES (1, 'A', 2)"
    p = plan(sql, column_order=lambda s, t: order.get((s, t)))
    # The order the proxy assumed is written out: a table changed since the catalog
    # snapshot then gets each sealed value in the column it was sealed for (or an error).
    assert render(sql, p) == "INSERT INTO accounts (id, iban, balance) VALUES (1, E[A], E[2])"
    # Fewer values than columns (legal without a list: the rest take their defaults).
    sql = "INSERT INTO accounts VALUES (1, 'A'), (2, 'B')"
    p = plan(sql, column_order=lambda s, t: order.get((s, t)))
    assert render(sql, p) == "INSERT INTO accounts (id, iban) VALUES (1, E[A]), (2, E[B])"
    sql = "INSERT INTO accounts SELECT 1, 'A'"
    p = plan(sql, column_order=lambda s, t: order.get((s, t)))
    assert render(sql, p) == "INSERT INTO accounts (id, iban) SELECT 1, E[A]"
    sql = "INSERT INTO public.accounts AS a SELECT 1, 'A', 2 ON CONFLICT DO NOTHING"
    p = plan(sql, column_order=lambda s, t: order.get((s, t)))
    assert render(sql, p) == ("INSERT INTO public.accounts AS a (id, iban, balance) "
                              "SELECT 1, E[A], E[2] ON CONFLICT DO NOTHING")
    sql = 'INSERT INTO "accounts" VALUES (1, \'A\', 2), (2, \'B\', 3)'
    p = plan(sql, column_order=lambda s, t: order.get((s, t)))
    assert render(sql, p) == ('INSERT INTO "accounts" (id, iban, balance) '
                              "VALUES (1, E[A], E[2]), (2, E[B], E[3])")
    # a blind-indexed table needs the list (the sibling column must be added)
    p = plan("INSERT INTO cards VALUES (1, '4111')", column_order=lambda s, t: ("id", "pan"))
    assert p.refusal is not None and "name the columns" in p.refusal


SHORT = ProtectedColumn("public", "tokens", "tok", "text", "randomized", blind_index=True,
                        index_length=4)
SHORT_SCHEMA = ProtectedSchema([PAN, TAX, SHORT])


def _rechecks(p: RewritePlan) -> list[tuple[str, int, tuple[str, ...], tuple[int, ...]]]:
    return [(r.column.column, r.statement, r.literals, r.params) for r in p.recheck]


@pytest.mark.parametrize(
    ("sql", "rendered", "rechecks"),
    [
        (
            "SELECT id FROM cards WHERE pan = $1 AND id > 3",
            "SELECT id , pan AS strongroom_recheck_1 FROM cards WHERE pan_bidx = $1 AND id > 3",
            [("pan", 0, (), (1,))],
        ),
        (  # one hidden column per condition; IN collects every accepted value
            "SELECT c.id, u.id FROM cards c JOIN customers u ON u.id = c.id "
            "WHERE u.tax_id IN ('a', NULL, $2) AND c.pan = '4111' LIMIT 5",
            "SELECT c.id, u.id , u.tax_id AS strongroom_recheck_1, c.pan AS strongroom_recheck_2 "
            "FROM cards c JOIN customers u ON u.id = c.id "
            "WHERE u.tax_id_bidx IN (B[a], NULL, $2) AND c.pan_bidx = B[4111] LIMIT 5",
            [("tax_id", 0, ("a",), (2,)), ("pan", 0, ("4111",), ())],
        ),
        (  # the FROM of a subquery in the select list is not the statement's FROM
            "SELECT (SELECT 1 FROM accounts LIMIT 1), extract(year from now()) "
            "FROM cards WHERE (pan = $1)",
            "SELECT (SELECT 1 FROM accounts LIMIT 1), extract(year from now()) "
            ", pan AS strongroom_recheck_1 FROM cards WHERE (pan_bidx = $1)",
            [("pan", 0, (), (1,))],
        ),
        (  # a FROM inside the last select item is not the FROM clause
            "SELECT id, pan IS NOT DISTINCT FROM NULL AS x, id IS DISTINCT FROM 2 "
            "FROM ROWS FROM (generate_series(1, 2)) g, cards WHERE pan = $1",
            "SELECT id, pan IS NOT DISTINCT FROM NULL AS x, id IS DISTINCT FROM 2 "
            ", pan AS strongroom_recheck_1 FROM ROWS FROM (generate_series(1, 2)) g, cards "
            "WHERE pan_bidx = $1",
            [("pan", 0, (), (1,))],
        ),
        (  # statement index per statement of a multi-statement string
            "SELECT 1; SELECT id FROM cards WHERE pan IS NOT DISTINCT FROM $1",
            "SELECT 1; SELECT id , pan AS strongroom_recheck_1 FROM cards "
            "WHERE pan_bidx IS NOT DISTINCT FROM $1",
            [("pan", 1, (), (1,))],
        ),
    ],
)
def test_blind_index_lookups_get_a_hidden_recheck_column(
    sql: str, rendered: str, rechecks: list[tuple[str, int, tuple[str, ...], tuple[int, ...]]]
) -> None:
    p = plan(sql)
    assert p.refusal is None, p.refusal
    assert render(sql, p) == rendered
    assert _rechecks(p) == rechecks
    # the client-visible result columns do not include the hidden ones
    assert all(cols is None or "strongroom" not in str(cols) for cols in p.columns_selected)


NOT_RECHECKABLE = [
    "SELECT id FROM cards WHERE pan = $1 OR id = 2",  # OR: other rows may match
    "SELECT id FROM cards WHERE pan <> $1",  # the server already dropped the matches
    "SELECT id FROM cards WHERE NOT (pan = $1)",
    "SELECT count(*) FROM cards WHERE pan = $1",  # aggregate: no row per match
    "SELECT id FROM cards WHERE pan = $1 GROUP BY id",
    "SELECT DISTINCT id FROM cards WHERE pan = $1",
    "SELECT row_number() OVER () FROM cards WHERE pan = $1",
    "SELECT my_agg(id) FROM cards WHERE pan = $1",  # unknown function: maybe an aggregate
    "SELECT id FROM cards WHERE pan = $1 UNION SELECT 1",
    "SELECT x FROM (SELECT id AS x FROM cards WHERE pan = $1) s",  # not the statement's WHERE
    "SELECT id FROM cards WHERE id IN (SELECT id FROM cards WHERE pan = $1)",
    "UPDATE cards SET id = 1 WHERE pan = $1",
    "DELETE FROM cards WHERE pan = $1 RETURNING id",
    "DECLARE c CURSOR FOR SELECT id FROM cards WHERE pan = $1",
    "SELECT id INTO t2 FROM cards WHERE pan = $1",
]


@pytest.mark.parametrize("sql", NOT_RECHECKABLE)
def test_lookups_that_cannot_be_rechecked(sql: str) -> None:
    # with a 16-byte index (128 bits) they run without a recheck...
    p = plan(sql)
    assert p.refusal is None, p.refusal
    assert p.recheck == ()
    assert "strongroom_recheck" not in render(sql, p)
    # ...with a short one a collision could return or change a wrong row: refused
    short = sql.replace("cards", "tokens").replace("pan", "tok")
    p = plan_statement(short, SHORT_SCHEMA, PATH)
    assert p.refusal is not None and "index_length: 16" in p.refusal, short
    assert "public.tokens.tok" in p.refusal


def test_short_index_lookups_that_can_be_rechecked() -> None:
    sql = "SELECT id FROM tokens t WHERE t.tok IN ($1, $2) AND id = 3"
    p = plan_statement(sql, SHORT_SCHEMA, PATH)
    assert p.refusal is None, p.refusal
    assert _rechecks(p) == [("tok", 0, (), (1, 2))]
    # LIMIT counts the rows before the recheck drops any: refused for a short index only
    p = plan_statement("SELECT id FROM tokens WHERE tok = $1 LIMIT 1", SHORT_SCHEMA, PATH)
    assert p.refusal is not None and "LIMIT" in p.refusal
    assert _rechecks(plan("SELECT id FROM cards WHERE pan = $1 LIMIT 1")) == [
        ("pan", 0, (), (1,))
    ]


def test_derived_params() -> None:
    p = plan("INSERT INTO cards(pan) VALUES ($4), ($4), ($2)")
    assert [(d.number, d.source, d.action) for d in p.derived_params] == [
        (5, 4, "blind_index"),
        (6, 2, "blind_index"),
    ]
    assert render("INSERT INTO cards(pan) VALUES ($4), ($4), ($2)", p) == (
        "INSERT INTO cards(pan, pan_bidx) VALUES ($4, $5), ($4, $5), ($2, $6)"
    )


def test_join_pairs() -> None:
    p = plan("SELECT 1 FROM accounts a JOIN payments p ON a.iban = p.iban")
    assert p.join_pairs == ((IBAN, PAY_IBAN),)


def test_copy_plans() -> None:
    p = plan(
        "COPY accounts (id, iban) FROM STDIN WITH (FORMAT csv, DELIMITER ';', HEADER true, NULL '')"
    )
    assert p.copy is not None
    assert (p.copy.table, p.copy.columns, p.copy.direction, p.copy.format) == (
        ("public", "accounts"),
        ("id", "iban"),
        "in",
        "csv",
    )
    assert p.copy.options["delimiter"] == ";" and p.copy.options["null"] == ""
    assert p.copy.options["header"] == "true"
    order = {("public", "accounts"): ("id", "iban", "balance")}
    for sql, rendered, direction in (
        ("COPY accounts TO STDOUT (FORMAT binary)",
         "COPY accounts (id, iban, balance) TO STDOUT (FORMAT binary)", "out"),
        ("COPY public.accounts FROM STDIN (FORMAT binary)",
         "COPY public.accounts (id, iban, balance) FROM STDIN (FORMAT binary)", "in"),
    ):
        p = plan(sql, column_order=lambda s, t: order.get((s, t)))
        assert render(sql, p) == rendered
        assert p.copy is not None and (p.copy.columns, p.copy.direction, p.copy.format) == (
            ("id", "iban", "balance"), direction, "binary")
        # columns not known (no catalog yet): refused rather than guessed
        p = plan(sql)
        assert p.copy is None and p.refusal is not None and "name the columns" in p.refusal
    sql = "COPY public.cards (id, pan) FROM STDIN"
    p = plan(sql)
    assert render(sql, p) == "COPY public.cards (id, pan, pan_bidx) FROM STDIN"
    assert p.copy is not None and p.copy.index_columns == (("pan_bidx", PAN),)
    p = plan("COPY (SELECT id, pan FROM cards WHERE pan = $1) TO STDOUT WITH CSV HEADER")
    assert p.copy is not None and p.copy.table is None
    assert p.copy.query_columns == (None, PAN) and p.copy.format == "csv"
    assert plan("COPY cards TO '/tmp/x'").copy is None  # server writes ciphertext only


def test_execute_with_prepared_plan() -> None:
    prepared = plan("SELECT id FROM accounts WHERE iban = $1 AND id = $2")
    sql = "EXECUTE q('DE1', 7)"
    p = plan(sql, prepared=lambda name: prepared if name == "q" else None)
    assert render(sql, p) == "EXECUTE q(E[DE1], 7)"


def test_byte_offsets() -> None:
    sql = "SELECT '€€' ; SELECT id FROM accounts WHERE iban = 'x'"
    (s,) = plan(sql).splices
    raw = sql.encode()
    assert raw[s.start : s.end] == b"'x'"
    assert s.start != sql.index("'x'")  # char index differs: offsets are bytes


def test_noop_string_of_statements_without_protected_is_shared() -> None:
    assert plan("SELECT 1; SELECT 2") is NO_PROTECTED


# ---------------------------------------------------------------- property test

_TEXTS = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    min_size=0,
    max_size=12,
)


def _quote(kind: str, value: str) -> str:
    if kind == "std":
        return "'" + value.replace("'", "''") + "'"
    if kind == "e":
        return "E'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if kind == "dollar":
        return (
            "$q$" + value + "$q$"
            if "$q" not in value and not value.endswith("$")
            else "'" + value.replace("'", "''") + "'"
        )
    return "'" + value.replace("'", "''") + "'::text"


_TEMPLATES = [
    "INSERT INTO accounts(id, iban) VALUES (1, {v}), (2, {w})",
    "INSERT INTO cards(pan, id) VALUES ({v}, 3), ({w}, 4)",
    "UPDATE cards SET pan = {v} WHERE pan = {w}",
    "SELECT id FROM accounts WHERE iban IN ({v}, {w}) AND note = 'keep'",
    "INSERT INTO accounts(iban) SELECT {v} UNION ALL SELECT {w}",
    "INSERT INTO customers(tax_id) VALUES ({v}) ON CONFLICT (id) DO UPDATE SET tax_id = {w}",
    "SELECT 'keep'; DELETE FROM customers WHERE tax_id = {v} OR tax_id = {w}",
    "WITH c AS (SELECT id FROM cards WHERE pan = {v}) UPDATE accounts SET iban = {w} "
    "FROM c WHERE accounts.id = c.id",
]


@settings(max_examples=300, deadline=None)
@given(
    template=st.sampled_from(_TEMPLATES),
    v=_TEXTS,
    w=_TEXTS,
    kv=st.sampled_from(["std", "e", "dollar", "cast"]),
    kw=st.sampled_from(["std", "e", "dollar", "cast"]),
)
def test_splices_remove_every_protected_literal(
    template: str, v: str, w: str, kv: str, kw: str
) -> None:
    marker_v, marker_w = "QX" + v + "VQ", "QX" + w + "WQ"
    sql = template.format(v=_quote(kv, marker_v), w=_quote(kw, marker_w))
    p = plan(sql)
    if p.refusal is not None:
        # only the set-operation template is refused, and without the values
        assert "UNION" in sql
        assert marker_v not in p.refusal and marker_w not in p.refusal
        return
    seen = {s.literal for s in p.splices if s.action != "rename"}
    assert {marker_v, marker_w} <= seen
    out = apply_splices(sql, p.splices, lambda s: "'\\x00ff'::bytea")
    parse_sql_json(out)
    assert marker_v not in out and marker_w not in out
    # Unprotected literals survive (the markers themselves may contain "keep").
    outside = sql.replace(marker_v, "").replace(marker_w, "")
    assert "keep" in out or "keep" not in outside


def test_copy_steps_in_statement_order() -> None:
    """Every COPY to or from the client gets a step, in order, also one moving nothing
    protected (its data passes as is, but the session must know which stream is whose);
    a COPY to or from a server file gets none (it never enters copy mode)."""
    p = plan("COPY accounts (id, iban) FROM STDIN; COPY other FROM STDIN; "
             "COPY accounts (id, iban) TO STDOUT; COPY other TO '/tmp/x'")
    assert [(d, cp is not None) for d, cp in p.copies] == [
        ("in", True), ("in", False), ("out", True)]
    assert p.copy is p.copies[0][1]
    # touches nothing protected: still one pass-through step per COPY
    p = plan("copy other from stdin; select 1; Copy (select 1) TO STDOUT")
    assert not p.touches_protected and p.copies == (("in", None), ("out", None))
    assert plan("SELECT 1").copies == () and plan("COPY other TO '/tmp/x'").copies == ()
    assert plan("SELECT 'copy'").copies == ()
