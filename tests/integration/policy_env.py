"""The fintech schema, PostgreSQL roles and Strongroom policy the policy tests share.

Every role gets broad *PostgreSQL* privileges (ALL on every table, EXECUTE, CREATE,
membership of each other), so a 42501 whose message does not name strongroom is a test
bug, and a 42501 that does is the proxy's decision. ``ops_admin`` owns the objects so its
allowed DDL really runs; every row runs inside BEGIN ... ROLLBACK, so nothing persists.
"""

from __future__ import annotations

import re
from typing import Any

from proxy import devcluster
from tests.integration.encryption_env import login_role_sql

ROLES = ("support_agent", "payments_service", "analyst", "dba_readonly", "ops_admin",
         "unlisted_user")


def password(role: str) -> str:
    return f"{role}-pw"


SCHEMA_SQL = r"""
CREATE SCHEMA reporting AUTHORIZATION ops_admin;
GRANT CREATE ON SCHEMA public TO ops_admin;
SET ROLE ops_admin;
CREATE TABLE public.customers (id int PRIMARY KEY, name text, email text, tax_id text);
CREATE TABLE public.accounts (id int PRIMARY KEY, customer_id int REFERENCES public.customers,
                              balance numeric);
CREATE TABLE public.cards (id int PRIMARY KEY, account_id int REFERENCES public.accounts,
                           pan text, expiry date);
CREATE TABLE public.audit_events (id bigserial PRIMARY KEY, actor text, event text,
                                  at timestamptz DEFAULT now());
CREATE TABLE public.transactions (id bigint, account_id int, amount numeric,
                                  booked date NOT NULL) PARTITION BY RANGE (booked);
CREATE TABLE public.transactions_2024 PARTITION OF public.transactions
    FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
CREATE TABLE public.transactions_2025 PARTITION OF public.transactions
    FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE VIEW public.customer_summary AS SELECT id, name FROM public.customers;
CREATE TABLE public."Cards" (id int, pan text);
CREATE TABLE reporting.daily_totals (day date PRIMARY KEY, total numeric);
CREATE TABLE reporting.customers (id int, segment text);
CREATE FUNCTION reporting.risk_score(int) RETURNS int LANGUAGE sql AS 'SELECT $1 * 2';
CREATE FUNCTION public.exfiltrate(text) RETURNS text LANGUAGE sql AS 'SELECT $1';
CREATE PROCEDURE public.recompute() LANGUAGE sql AS 'SELECT 1';
INSERT INTO public.customers VALUES (1, 'Ada', 'ada@example.com', '123-45-6789'),
                                    (2, 'Bob', 'bob@example.com', '987-65-4321');
INSERT INTO public.accounts VALUES (1, 1, 100), (2, 2, 250);
INSERT INTO public.cards VALUES (1, 1, '4111111111111111', '2030-01-31'),
                                (2, 2, '5500000000000004', '2031-06-30');
INSERT INTO public.transactions VALUES (1, 1, 10, '2024-03-01'), (2, 2, 20, '2025-03-01');
INSERT INTO reporting.daily_totals VALUES ('2024-03-01', 10);
INSERT INTO reporting.customers VALUES (1, 'retail');
GRANT USAGE, CREATE ON SCHEMA reporting TO PUBLIC;
GRANT ALL ON public.customers, public.accounts, public.cards, public.audit_events,
    public.transactions, public.transactions_2024, public.transactions_2025,
    public.customer_summary, public."Cards", reporting.daily_totals, reporting.customers
    TO PUBLIC;
GRANT EXECUTE ON FUNCTION reporting.risk_score(int), public.exfiltrate(text) TO PUBLIC;
GRANT EXECUTE ON PROCEDURE public.recompute() TO PUBLIC;
RESET ROLE;
-- As superuser: other modules' tables (and sequences) may already live in public.
GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO PUBLIC;
GRANT CREATE ON SCHEMA public TO PUBLIC;
GRANT pg_read_server_files TO ops_admin;
GRANT EXECUTE ON FUNCTION pg_read_file(text), lo_import(text) TO ops_admin;
"""

POLICY: dict[str, Any] = {
    "roles": {
        "support_agent": {
            "tables": {
                "public.customers": ["select"],
                "public.accounts": ["select"],
                "public.cards": ["select"],
                "public.customer_summary": ["select"],
                "public.audit_events": ["insert"],
            },
            "columns": {"public.customers.tax_id": "deny", "public.cards.pan": "masked"},
        },
        "payments_service": {
            "tables": {
                "public.cards": ["select", "insert", "update"],
                "public.accounts": ["select", "insert", "update", "delete"],
                "public.transactions": ["select", "insert", "copy_in"],
                "public.audit_events": ["select", "insert"],
            },
            "columns": {"public.cards.pan": "plaintext"},
            "allow": ["listen", "notify"],
        },
        "analyst": {
            "tables": {
                "reporting.*": ["select", "copy_out"],
                "public.customer_summary": ["select"],
                "public.transactions": ["select"],
            },
            "functions": ["reporting.risk_score"],
        },
        "dba_readonly": {
            "inherits": ["analyst"],
            "tables": {"public.*": ["select", "copy_out"]},
            "columns": {"public.customers.tax_id": "deny"},
        },
        "ops_admin": {
            "tables": {
                "public.*": ["select", "insert", "update", "delete", "truncate", "copy_in",
                             "copy_out", "references"],
                "reporting.*": ["select", "insert", "update", "delete", "truncate"],
            },
            "columns": {"public.customers.tax_id": "plaintext"},
            "allow": ["ddl", "do", "call", "set_role", "admin", "listen", "notify",
                      "prepare_transaction"],
            "functions": ["public.exfiltrate", "public.recompute"],
        },
    },
    "default": "deny",
}


def ensure_schema(pg: devcluster.Cluster, db: str = "app") -> None:
    """Create the roles and the schema once per cluster (idempotent across modules)."""
    if pg.psql("SELECT 1 FROM pg_namespace WHERE nspname = 'reporting'", db=db).strip():
        return
    for role in ROLES:
        pg.psql(login_role_sql(role, password(role)))
    pg.psql(f"GRANT CONNECT ON DATABASE {db} TO PUBLIC")
    # ops_admin (the one role the policy lets SET ROLE) may become any other role.
    others = ", ".join(r for r in ROLES if r != "ops_admin")
    pg.psql(f"GRANT {others} TO ops_admin")
    pg.psql(SCHEMA_SQL, db=db)


_LITERAL = re.compile(r"'((?:[^']|'')*)'")
_NOT_VALUES = frozenset({"role", "session_authorization", "search_path"})


def literal_values(sql: str) -> list[str]:
    """String literals of a statement that look like data (long enough to be specific).

    Parameter and role names (``set_config('role', 'analyst', ...)``) are names, which a
    message should show, not values."""
    return [
        v for v in _LITERAL.findall(sql)
        if len(v) >= 4 and v.lower() not in _NOT_VALUES and v not in ROLES
    ]
