"""Issue 11, routes 3 and 5: the proxy's picture of the session is the server's.

Route 3: the proxy used to apply a ``set_config('search_path', ...)`` when it *saw* it, not
when the server ran it (``WHERE false``, a Parse and Bind without Execute, a PREPAREd or
cursor call run later), so the policy resolved names in another schema than the server.
Route 5: after ``SET ROLE`` the column views stayed those of the login role, and a cursor
declared as one role could be fetched as another.

Every test runs against both client paths: the plain relay (policy only) and tracking
mode (``protect:`` configured), since both decide statements.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from tests.conftest import ProxyProcess
from tests.integration.encryption_env import both_paths, direct, start_encrypted

ROLES = {"st_login": "st-login-pw", "st_peon": "st-peon-pw", "st_boss": "st-boss-pw"}
SECRET = "4999000011112222"

SETUP = """
DO $$BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'st_login') THEN
    CREATE ROLE st_login LOGIN PASSWORD 'st-login-pw';
    CREATE ROLE st_peon LOGIN PASSWORD 'st-peon-pw';
    CREATE ROLE st_boss LOGIN PASSWORD 'st-boss-pw';
  END IF;
END$$;
GRANT st_peon TO st_login;
GRANT st_peon TO st_boss;
DROP TABLE IF EXISTS public.st_open, public.st_secret, public.st_cards;
CREATE TABLE public.st_open (id int);
CREATE TABLE public.st_secret (id int, note text);
CREATE TABLE public.st_cards (id int, pan bytea);
INSERT INTO public.st_open VALUES (1);
INSERT INTO public.st_secret VALUES (1, 'top secret');
GRANT ALL ON public.st_open, public.st_secret, public.st_cards TO PUBLIC;
DROP SCHEMA IF EXISTS st_c CASCADE;
CREATE SCHEMA st_c;
CREATE TABLE st_c.st_cards (id int, pan bytea);
GRANT USAGE ON SCHEMA st_c TO PUBLIC;
GRANT ALL ON st_c.st_cards TO PUBLIC;
"""

POLICY: dict[str, Any] = {
    "roles": {
        # May switch to st_peon; may not read st_secret itself.
        "st_login": {"tables": {"public.st_open": ["select"]}, "allow": ["set_role"]},
        "st_peon": {"tables": {"public.st_open": ["select"], "public.st_secret": ["select"],
                               "public.st_cards": ["select", "insert"]},
                    "columns": {"public.st_cards.pan": "masked"}},
        "st_boss": {"tables": {"public.st_cards": ["select", "insert"],
                               "st_c.st_cards": ["select", "insert"]},
                    "allow": ["set_role"]},
    },
    "default": "deny",
}
PROTECT = {"public.st_cards.pan": {"type": "text", "mode": "randomized", "mask": "last4"}}


@pytest.fixture(scope="module")
def proxies(pg: Any) -> Iterator[dict[str, ProxyProcess]]:
    pg.psql(SETUP, db="app")
    with both_paths(pg, PROTECT, POLICY) as started:
        with psycopg.connect(started["tracking"].conninfo(
                user="st_boss", password=ROLES["st_boss"]), autocommit=True) as conn:
            conn.execute("INSERT INTO st_cards VALUES (1, %s)", (SECRET,))
        yield started


@pytest.fixture(params=["relay", "tracking"])
def proxy_of(request: pytest.FixtureRequest, proxies: dict[str, ProxyProcess]) -> ProxyProcess:
    return proxies[request.param]


def connect(p: ProxyProcess, role: str = "st_login") -> psycopg.Connection:
    return psycopg.connect(p.conninfo(user=role, password=ROLES[role]), autocommit=True)


def secret_denied(conn: psycopg.Connection) -> None:
    """The probe: the login role may not read st_secret, whatever the path says."""
    with pytest.raises(psycopg.Error) as err:
        conn.execute("SELECT * FROM st_secret").fetchall()
    assert err.value.sqlstate in ("42501", "42P01"), err.value
    assert "top secret" not in str(err.value)


def server_path(conn: psycopg.Connection) -> str:
    return conn.execute("SELECT current_setting('search_path')").fetchone()[0]


# -- route 3: search_path ---------------------------------------------------------------


def test_set_config_under_where_false_is_refused(proxy_of: ProxyProcess) -> None:
    with connect(proxy_of) as conn:
        with pytest.raises(psycopg.Error) as err:
            conn.execute("SELECT set_config('search_path', 'information_schema', false) "
                         "WHERE false")
        assert err.value.sqlstate == "42501"
        assert server_path(conn) == '"$user", public'
        secret_denied(conn)


@pytest.mark.parametrize("sql", [
    "SELECT CASE WHEN false THEN set_config('search_path', 'information_schema', false) END",
    "SELECT set_config('search_path', 'information_schema', false) LIMIT 0",
    "SELECT set_config('search_path', 'information_schema', false), 1 / 0",
    "WITH x AS (SELECT set_config('search_path', 'information_schema', false)) SELECT 1",
    "SELECT 1 FROM (SELECT set_config('search_path', 'information_schema', false)) s",
    "SELECT set_config('role', 'st_peon', false) WHERE false",
])
def test_set_config_in_any_other_form_is_refused(proxy_of: ProxyProcess, sql: str) -> None:
    with connect(proxy_of) as conn:
        with pytest.raises(psycopg.Error) as err:
            conn.execute(sql)
        assert err.value.sqlstate == "42501", err.value
        secret_denied(conn)


def test_set_config_as_its_own_statement_is_followed(proxy_of: ProxyProcess) -> None:
    with connect(proxy_of) as conn:
        conn.execute("SELECT set_config('search_path', 'information_schema', false)")
        assert server_path(conn) == "information_schema"
        # Both sides now look in information_schema: no st_secret there.
        with pytest.raises(psycopg.Error) as err:
            conn.execute("SELECT * FROM st_secret")
        assert err.value.sqlstate in ("42501", "42P01")
        conn.execute("SELECT pg_catalog.set_config('search_path', 'public', false)")
        assert conn.execute("SELECT count(*) FROM st_open").fetchone() == (1,)
        secret_denied(conn)


def test_parse_and_bind_without_execute_change_nothing(proxy_of: ProxyProcess) -> None:
    """A Parse and Bind of set_config with no Execute: the server never runs it."""
    with connect(proxy_of) as conn:
        pgconn = conn.pgconn
        pgconn.send_prepare(b"sc", b"SELECT set_config('search_path', 'information_schema', "
                            b"false)")
        pgconn.flush()
        res = pgconn.get_result()
        assert res is not None and res.status == psycopg.pq.ExecStatus.COMMAND_OK
        while pgconn.get_result() is not None:
            pass
        # Describe it and drop it: no Execute ever happens.
        pgconn.send_describe_prepared(b"sc")
        pgconn.flush()
        while pgconn.get_result() is not None:
            pass
        conn.execute("DEALLOCATE sc")
        assert server_path(conn) == '"$user", public'
        secret_denied(conn)


def test_prepare_and_cursor_with_set_config_are_refused(proxy_of: ProxyProcess) -> None:
    with connect(proxy_of) as conn:
        conn.execute("SET search_path = information_schema")
        with pytest.raises(psycopg.Error) as err:
            conn.execute("PREPARE p AS SELECT set_config('search_path', 'public', false)")
        assert err.value.sqlstate == "42501"
        conn.execute("BEGIN")
        with pytest.raises(psycopg.Error) as err:
            conn.execute("DECLARE c CURSOR FOR "
                         "SELECT set_config('search_path', 'public', false)")
        assert err.value.sqlstate == "42501"
        conn.execute("ROLLBACK")
        assert server_path(conn) == "information_schema"
        with pytest.raises(psycopg.Error) as err2:
            conn.execute("SELECT * FROM st_secret")
        assert err2.value.sqlstate in ("42501", "42P01")


def test_bound_set_config_applies_at_execute(proxy_of: ProxyProcess) -> None:
    """Through the extended protocol the call is followed when the portal runs; a value
    the proxy cannot know (a parameter) is refused."""
    with connect(proxy_of) as conn:
        conn.execute("SELECT set_config('search_path', 'information_schema', false)",
                     prepare=True)
        assert server_path(conn) == "information_schema"
        conn.execute("SELECT set_config('search_path', 'public', false)", prepare=True)
        secret_denied(conn)
        with pytest.raises(psycopg.Error) as err:
            conn.execute("SELECT set_config('search_path', %s, false)",
                         ("information_schema",))
        assert err.value.sqlstate == "42501"
        secret_denied(conn)


def test_prepared_insert_replanned_by_the_server_is_not_sent_plaintext(
        proxies: dict[str, ProxyProcess], pg: Any) -> None:
    """PostgreSQL re-analyses a prepared statement under the search_path of each
    execution: an INSERT prepared where `st_cards` is a plain table and executed after
    SET search_path = public would store into the protected public.st_cards as sent."""
    p = proxies["tracking"]
    with connect(p, "st_boss") as conn:
        conn.execute("SET search_path = st_c")
        conn.pgconn.prepare(b"ins", b"INSERT INTO st_cards VALUES ($1, $2)")
        conn.execute("SET search_path = public")
        res = conn.pgconn.exec_prepared(b"ins", [b"77", b"4111000077770000"])
        assert res.status == psycopg.pq.ExecStatus.FATAL_ERROR
        assert res.error_field(psycopg.pq.DiagnosticField.SQLSTATE) == b"0A000"
    with direct(pg) as conn:
        rows = conn.execute("SELECT pan FROM public.st_cards WHERE id = 77").fetchall()
        assert rows == []


# -- route 5: SET ROLE and cursors ------------------------------------------------------


def test_set_role_changes_the_column_view(proxies: dict[str, ProxyProcess]) -> None:
    p = proxies["tracking"]
    with connect(p, "st_boss") as conn:
        assert conn.execute("SELECT pan FROM st_cards").fetchone() == (SECRET,)
        conn.execute("SET ROLE st_peon")
        for prepare in (False, True):
            (pan,) = conn.execute("SELECT pan FROM st_cards WHERE id = %s", (1,),
                                  prepare=prepare).fetchone()
            assert pan == "*" * 12 + SECRET[-4:], pan
        (pan,) = conn.execute("SELECT pan FROM st_cards").fetchone()
        assert pan != SECRET
        conn.execute("RESET ROLE")
        assert conn.execute("SELECT pan FROM st_cards").fetchone() == (SECRET,)


def test_set_role_in_the_same_string_reveals_the_strictest(
        proxies: dict[str, ProxyProcess]) -> None:
    p = proxies["tracking"]
    with connect(p, "st_boss") as conn:
        cur = conn.cursor()
        cur.execute("SET ROLE st_peon; SELECT pan FROM st_cards; RESET ROLE")
        assert cur.nextset()
        assert cur.fetchone() == ("*" * 12 + SECRET[-4:],)


def test_statement_parsed_before_set_role_is_revealed_as_the_new_role(
        proxies: dict[str, ProxyProcess]) -> None:
    p = proxies["tracking"]
    with connect(p, "st_boss") as conn:
        conn.execute("PREPARE q AS SELECT pan FROM st_cards")
        pgconn = conn.pgconn
        pgconn.prepare(b"qq", b"SELECT pan FROM st_cards")
        conn.execute("SET ROLE st_peon")
        res = pgconn.exec_prepared(b"qq", [])
        assert res.get_value(0, 0) != SECRET.encode()
        assert conn.execute("EXECUTE q").fetchone() != (SECRET,)


def test_cursor_declared_as_other_role_is_fetched_under_both(
        proxies: dict[str, ProxyProcess]) -> None:
    for p in proxies.values():
        with connect(p, "st_login") as conn:
            conn.execute("BEGIN")
            conn.execute("SET ROLE st_peon")
            conn.execute("DECLARE c CURSOR FOR SELECT * FROM st_secret")
            conn.execute("RESET ROLE")
            with pytest.raises(psycopg.Error) as err:
                conn.execute("FETCH ALL FROM c").fetchall()
            assert err.value.sqlstate == "42501"
            assert "top secret" not in str(err.value)
            conn.execute("ROLLBACK")
    p = proxies["tracking"]
    with connect(p, "st_boss") as conn:
        conn.execute("BEGIN")
        conn.execute("DECLARE c CURSOR FOR SELECT pan FROM st_cards")
        conn.execute("SET ROLE st_peon")
        (pan,) = conn.execute("FETCH 1 FROM c").fetchone()
        assert pan == "*" * 12 + SECRET[-4:]
        conn.execute("ROLLBACK")
    with connect(p, "st_boss") as conn:
        conn.execute("BEGIN")
        conn.execute("SET ROLE st_peon")
        conn.execute("DECLARE c CURSOR FOR SELECT pan FROM st_cards")
        conn.execute("RESET ROLE")
        (pan,) = conn.execute("FETCH 1 FROM c").fetchone()
        assert pan == "*" * 12 + SECRET[-4:], "declared as st_peon: stays masked"
        conn.execute("ROLLBACK")


def test_stored_value_is_ciphertext(proxies: dict[str, ProxyProcess], pg: Any) -> None:
    del proxies
    with direct(pg) as conn:
        (raw,) = conn.execute("SELECT pan FROM st_cards WHERE id = 1").fetchone()
        assert SECRET.encode() not in bytes(raw)


# -- the class: a property test over random sequences of state changes -------------------

PROBE_SETUP = """
DROP SCHEMA IF EXISTS st_a CASCADE;
DROP SCHEMA IF EXISTS st_b CASCADE;
CREATE SCHEMA st_a;
CREATE SCHEMA st_b;
CREATE TABLE st_a.probe_t (v text);
CREATE TABLE st_b.probe_t (v text);
INSERT INTO st_a.probe_t VALUES ('a');
INSERT INTO st_b.probe_t VALUES ('b');
GRANT USAGE ON SCHEMA st_a, st_b TO PUBLIC;
GRANT ALL ON st_a.probe_t, st_b.probe_t TO PUBLIC;
CREATE OR REPLACE FUNCTION public.st_to_b() RETURNS text LANGUAGE sql
  AS $f$ SELECT set_config('search_path', 'st_b', false) $f$;
CREATE OR REPLACE FUNCTION public.st_peon_local() RETURNS text LANGUAGE sql
  AS $f$ SELECT set_config('role', 'st_peon', true) $f$;
GRANT EXECUTE ON FUNCTION public.st_to_b(), public.st_peon_local() TO PUBLIC;
"""

# Statements that change (or try to change) search_path and the current role, in every
# position the issue names; some are refused, some fail on the server, some do nothing.
STEPS = [
    "SET search_path = st_a", "SET search_path = st_b", "SET LOCAL search_path = st_b",
    "RESET search_path", "SET search_path TO DEFAULT", "RESET ALL", "DISCARD ALL",
    "SELECT set_config('search_path', 'st_b', false)",
    "SELECT set_config('search_path', 'st_a', true)",
    "SELECT set_config('search_path', 'st_b', false) WHERE false",
    "SET ROLE st_peon", "RESET ROLE", "SET ROLE NONE",
    "SELECT set_config('role', 'st_peon', false)",
    "BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT s1", "ROLLBACK TO SAVEPOINT s1",
    "RELEASE SAVEPOINT s1", "SELECT 1 / 0", "PREPARE pp AS SELECT v FROM probe_t",
    "EXECUTE pp", "DEALLOCATE ALL", "SET search_path = st_a; SELECT 1 / 0",
    "SET search_path = st_b; SET ROLE st_peon",
    # user code that changes settings where no analysis sees it (observed after it)
    "SELECT public.st_to_b()", "SELECT public.st_peon_local()",
    "DO $$BEGIN PERFORM set_config('search_path', 'st_a', false); END$$",
    # cursors, declared and fetched under whichever role is in effect
    "DECLARE cc CURSOR WITH HOLD FOR SELECT v FROM probe_t", "FETCH 1 FROM cc", "CLOSE cc",
]
STATE_POLICY: dict[str, Any] = {
    "roles": {
        "st_login": {"tables": {"st_a.probe_t": ["select"]}, "allow": ["set_role", "do"],
                     "functions": ["public.st_to_b", "public.st_peon_local"]},
        "st_peon": {"tables": {"st_b.probe_t": ["select"]}, "allow": ["do"],
                    "functions": ["public.st_to_b", "public.st_peon_local"]},
    },
    "default": "deny",
}


def _run(conn: psycopg.Connection, sql: str, extended: bool) -> tuple[str, list[Any]]:
    """Run `sql` in the simple protocol or the extended one (an unnamed statement: no
    driver-side cache of named statements to go stale after DISCARD / DEALLOCATE ALL).
    Returns (the SQLSTATE or "" and, for an error, its message; else the rows)."""
    pgconn = conn.pgconn
    if extended:
        results = [pgconn.exec_params(sql.encode(), [])]
    else:
        pgconn.send_query(sql.encode())
        results = []
        while (res := pgconn.get_result()) is not None:
            results.append(res)
    rows: list[Any] = []
    for res in results:
        if res.status == psycopg.pq.ExecStatus.FATAL_ERROR:
            state = (res.error_field(psycopg.pq.DiagnosticField.SQLSTATE) or b"").decode()
            return state, [(res.error_message or b"").decode(errors="replace")]
        for r in range(res.ntuples):
            rows.append(tuple(None if res.get_value(r, c) is None
                              else res.get_value(r, c).decode()  # type: ignore[union-attr]
                              for c in range(res.nfields)))
    return "", rows


def _server_truth(conn: psycopg.Connection) -> tuple[str | None, str]:
    """(the table probe_t resolves to on the server, current_user), or None if none."""
    state, rows = _run(conn, (
        "SELECT (SELECT n.nspname || '.' || c.relname FROM pg_catalog.pg_class c "
        "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.oid = pg_catalog.to_regclass('probe_t')), current_user"), False)
    assert state == "", rows
    return rows[0][0], rows[0][1]


def _expected(where: str | None, role: str) -> str:
    if where is None:
        return "denied"  # the proxy cannot resolve it either: it fails closed
    allowed = {("st_login", "st_a.probe_t"), ("st_peon", "st_b.probe_t")}
    return "ok" if (role, where) in allowed else "denied"


def _probe(conn: psycopg.Connection, prepare: bool) -> str:
    state, rows = _run(conn, "SELECT v FROM probe_t", prepare)
    if not state:
        return "ok"
    if state in ("42501", "26000") and "strongroom" in rows[0]:
        return "denied"  # (26000: a named statement re-decided for a new role)
    return "denied" if state == "42P01" else f"error {state}"


@pytest.mark.parametrize("prepare", [False, True], ids=["simple", "extended"])
def test_random_state_sequences_match_the_server(
        proxies: dict[str, ProxyProcess], pg: Any, prepare: bool) -> None:
    """After every step of random sequences, the proxy's decision on an unqualified
    name equals what the server's own search_path and current_user make of it."""
    import random

    pg.psql(PROBE_SETUP, db="app")
    rng = random.Random(1100 + prepare)
    for mode in ("relay", "tracking"):
        p = ProxyProcess(pg, STATE_POLICY) if mode == "relay" else start_encrypted(
            pg, PROTECT, STATE_POLICY, start=False)
        p.start()
        try:
            for _seq in range(12):
                with connect(p) as conn:
                    conn.execute("SET search_path = st_a")
                    history: list[str] = []
                    for _ in range(10):
                        step = rng.choice(STEPS)
                        history.append(step)
                        _run(conn, step, prepare and ";" not in step)
                        if conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR:
                            _run(conn, "ROLLBACK", False)
                        where, role = _server_truth(conn)
                        got = _probe(conn, prepare)
                        if conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR:
                            _run(conn, "ROLLBACK", False)
                            where, role = _server_truth(conn)
                            got = _probe(conn, prepare)
                        assert got == _expected(where, role), (mode, history, where, role)
        finally:
            p.stop()
