"""Issue 11: user code can change the session where no analysis sees it.

A function the policy lists, a DO block or a procedure can call `set_config` itself
(search_path, role, client_encoding). The proxy cannot see into them, so after every
request that ran user code it asks the server (the observation barrier) and holds the
client's next messages until the answer is in; a statement after user code in the same
string or pipeline batch is refused. Each test fails on the code before the barrier: the
proxy kept its simulated search_path while the server had another.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from tests.conftest import ProxyProcess
from tests.integration.encryption_env import both_paths, login_role_sql
from tests.integration.test_session_state import PROBE_SETUP, PROTECT, _probe, _server_truth

ROLE, PASSWORD = "uc_user", "uc-user-pw"
SETUP = login_role_sql(ROLE, PASSWORD) + """
DROP TABLE IF EXISTS public.st_cards;
CREATE TABLE public.st_cards (id int, pan bytea);
GRANT ALL ON public.st_cards TO PUBLIC;
CREATE OR REPLACE FUNCTION public.uc_switch() RETURNS text LANGUAGE sql
  AS $f$ SELECT set_config('search_path', 'st_b', false) $f$;
CREATE OR REPLACE FUNCTION public.uc_local() RETURNS text LANGUAGE sql
  AS $f$ SELECT set_config('search_path', 'st_b', true) $f$;
CREATE OR REPLACE FUNCTION public.uc_noop() RETURNS int LANGUAGE sql AS $f$ SELECT 1 $f$;
CREATE OR REPLACE PROCEDURE public.uc_proc() LANGUAGE sql
  AS $f$ SELECT set_config('search_path', 'st_b', false) $f$;
GRANT EXECUTE ON FUNCTION public.uc_switch(), public.uc_local(), public.uc_noop() TO PUBLIC;
GRANT EXECUTE ON PROCEDURE public.uc_proc() TO PUBLIC;
"""
POLICY: dict[str, Any] = {
    "roles": {
        ROLE: {
            "tables": {"st_a.probe_t": ["select"]},
            "functions": ["public.uc_switch", "public.uc_local", "public.uc_noop",
                          "public.uc_proc"],
            "allow": ["do", "call"],
        },
    },
    "default": "deny",
}


@pytest.fixture(scope="module")
def proxies(pg: Any) -> Iterator[dict[str, ProxyProcess]]:
    pg.psql(PROBE_SETUP, db="app")
    pg.psql(SETUP, db="app")
    with both_paths(pg, PROTECT, POLICY) as started:
        yield started


@pytest.fixture(params=["relay", "tracking"])
def proxy_of(request: pytest.FixtureRequest, proxies: dict[str, ProxyProcess]) -> ProxyProcess:
    return proxies[request.param]


def connect(p: ProxyProcess) -> psycopg.Connection:
    conn = psycopg.connect(p.conninfo(user=ROLE, password=PASSWORD), autocommit=True)
    conn.execute("SET search_path = st_a")
    return conn


def agrees(conn: psycopg.Connection, prepare: bool = False) -> str:
    """The proxy's decision on `probe_t` equals what the server's state makes of it."""
    where, role = _server_truth(conn)
    got = _probe(conn, prepare)
    expected = "ok" if (role, where) == (ROLE, "st_a.probe_t") else "denied"
    assert got == expected, (where, role, got)
    return got


@pytest.mark.parametrize("call", [
    "SELECT public.uc_switch()",
    "SELECT * FROM public.uc_switch()",
    "SELECT 1 WHERE public.uc_switch() IS NOT NULL",
    "CALL public.uc_proc()",
    "DO $$BEGIN PERFORM set_config('search_path', 'st_b', false); END$$",
])
@pytest.mark.parametrize("prepare", [False, True], ids=["simple", "extended"])
def test_user_code_that_changes_search_path_is_observed(
        proxy_of: ProxyProcess, call: str, prepare: bool) -> None:
    with connect(proxy_of) as conn:
        assert agrees(conn, prepare) == "ok"
        conn.execute(call, prepare=prepare and not call.startswith("DO"))
        assert _server_truth(conn)[0] == "st_b.probe_t"
        assert agrees(conn, prepare) == "denied"  # st_b.probe_t is not the role's


def test_a_statement_after_user_code_in_one_string_is_refused(proxy_of: ProxyProcess) -> None:
    with connect(proxy_of) as conn:
        with pytest.raises(psycopg.Error) as err:
            conn.execute("SELECT public.uc_switch(); SELECT v FROM probe_t")
        assert err.value.sqlstate == "42501"
        assert "follows a call of user code" in str(err.value)
        agrees(conn)


def test_a_statement_after_user_code_in_one_batch_is_refused(proxy_of: ProxyProcess) -> None:
    with connect(proxy_of) as conn:
        with pytest.raises(psycopg.Error) as err:
            with conn.pipeline():
                conn.execute("SELECT public.uc_switch()", prepare=True)
                conn.execute("SELECT v FROM probe_t", prepare=True).fetchall()
        assert "after a call of user code" in str(err.value)
        assert "b" not in [r for r in str(err.value).split() if r == "b"]
    with connect(proxy_of) as conn:
        # A batch that ends with the call is fine, and observed.
        with conn.pipeline():
            conn.execute("SELECT 1")
            conn.execute("SELECT public.uc_switch()")
        agrees(conn)


def test_user_code_that_changes_nothing_costs_only_the_question(proxy_of: ProxyProcess) -> None:
    with connect(proxy_of) as conn:
        for _ in range(3):
            assert conn.execute("SELECT public.uc_noop()").fetchone() == (1,)
        assert agrees(conn) == "ok"
        with conn.pipeline():
            for _ in range(3):
                conn.execute("SELECT 2")
            conn.execute("SELECT public.uc_noop()")
        assert agrees(conn) == "ok"


def test_set_local_in_user_code_ends_with_the_transaction(proxy_of: ProxyProcess) -> None:
    with connect(proxy_of) as conn:
        conn.execute("BEGIN")
        conn.execute("SELECT public.uc_local()")
        assert agrees(conn) == "denied"
        conn.execute("COMMIT")
        assert agrees(conn) == "ok"
        conn.execute("BEGIN")
        conn.execute("SELECT public.uc_switch()")
        assert agrees(conn) == "denied"
        conn.execute("ROLLBACK")
        assert agrees(conn) == "ok"
        conn.execute("BEGIN")
        conn.execute("SELECT public.uc_switch()")
        conn.execute("COMMIT")
        assert agrees(conn) == "denied"


def test_observation_in_a_failed_transaction_keeps_the_session_in_step(
        proxy_of: ProxyProcess) -> None:
    """In an aborted transaction block the observation query fails too (25P02): the
    client sees only its own error, and the end of the transaction is observed."""
    with connect(proxy_of) as conn:
        conn.execute("BEGIN")
        conn.execute("SELECT public.uc_switch()")
        with pytest.raises(psycopg.Error):
            conn.execute("SELECT 1 / 0")
        with pytest.raises(psycopg.Error) as err:
            conn.execute("SELECT public.uc_noop()")
        assert err.value.sqlstate == "25P02"
        conn.execute("ROLLBACK")
        assert agrees(conn) == "ok"
        assert conn.execute("SELECT 7").fetchone() == (7,)
