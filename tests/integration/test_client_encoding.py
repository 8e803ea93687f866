"""Issue 11, route 1: the proxy parses statement text exactly as the server does, or refuses.

With client_encoding GBK the bytes ``E4 B8 AD 5C`` are one UTF-8 character and a
backslash to a UTF-8 parser but two GBK characters to the server, so the proxy and the
server disagreed on where ``E'...'`` ends: a denied column came back, a protected value
was stored as plaintext. The same holds for standard_conforming_strings off. The proxy now
learns those settings from the server's ParameterStatus and accepts only client_encoding
UTF8 (SQL_ASCII on a UTF8 database) with standard_conforming_strings on: every other
client encoding is refused at startup and at SET, in both protocols, in relay and tracking
mode, with or without a policy. Every encoding the server accepts is tried.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import pq

from proxy import devcluster
from tests.conftest import (
    APP_DB,
    APP_PASSWORD,
    APP_USER,
    TRUST_USER,
    ProxyProcess,
    RawPG,
    error_fields,
    query_msg,
    startup_packet,
)
from tests.integration import policy_env
from tests.integration.encryption_env import direct, login_role_sql, setup_sql, start_encrypted

TAX = "123-45-6789"  # policy_env's customers.tax_id of Ada, and enc_customers' below
ADDRESS = "221B Baker Street"
GBK_TRICK = b"\xe4\xb8\xad\x5c"  # UTF-8: one character and a backslash; GBK: two characters

PROTECT = {
    "public.enc_customers.tax_id": {"type": "text", "mode": "randomized"},
    "public.enc_customers.address": {"type": "text", "mode": "randomized", "mask": "redact"},
}
TRACKED_POLICY = {
    "roles": {
        APP_USER: {"tables": {"public.enc_customers": ["select", "insert", "update", "delete"]}},
        "support_agent": {
            "tables": {"public.enc_customers": ["select"]},
            "columns": {"public.enc_customers.tax_id": "deny",
                        "public.enc_customers.address": "masked"},
        },
    },
    "default": "deny",
}
TABLES_SQL = """
DROP TABLE IF EXISTS enc_customers;
CREATE TABLE enc_customers (id int PRIMARY KEY, name text, tax_id bytea, address bytea);
GRANT ALL ON enc_customers TO PUBLIC;
"""

# name -> (what it is, the login role its tests use)
MODES = {
    "relay": "plain relay, no policy",
    "relay_policy": "plain relay with the policy_env policy",
    "tracked": "tracking mode (protect:) with a policy",
    "tracked_bare": "tracking mode (protect:) without a policy",
}
USERS = {"relay": APP_USER, "relay_policy": "support_agent", "tracked": APP_USER,
         "tracked_bare": APP_USER}


def _password(user: str) -> str:
    return APP_PASSWORD if user == APP_USER else policy_env.password(user)


@pytest.fixture(scope="module")
def proxies(pg: devcluster.Cluster) -> Iterator[dict[str, ProxyProcess]]:
    policy_env.ensure_schema(pg)
    setup_sql(pg, TABLES_SQL)
    started = {
        "relay": ProxyProcess(pg).start(),
        "relay_policy": ProxyProcess(pg, policy_env.POLICY).start(),
        "tracked": start_encrypted(pg, PROTECT, TRACKED_POLICY),
        "tracked_bare": start_encrypted(pg, PROTECT),
    }
    try:
        # The row the tracked tests try to read: written through the proxy (sealed).
        with psycopg.connect(started["tracked"].conninfo(), autocommit=True) as conn:
            conn.execute("INSERT INTO enc_customers VALUES (1, 'Ada', %s, %s)", (TAX, ADDRESS))
        yield started
    finally:
        for p in started.values():
            p.stop()


@pytest.fixture(scope="module")
def client_encodings(pg: devcluster.Cluster) -> list[str]:
    """Every encoding this server accepts as a client encoding (a UTF8 database)."""
    conn = _connect(None, pg, APP_USER)  # libpq itself: Python need not know the codec
    try:
        res = conn.exec_(b"SELECT pg_encoding_to_char(i) FROM generate_series(0, 50) i")
        names = [v.decode() for v in (res.get_value(r, 0) for r in range(res.ntuples)) if v]
        accepted = [n for n in names if conn.exec_(
            f"SET client_encoding = '{n}'".encode()).status == pq.ExecStatus.COMMAND_OK]
    finally:
        conn.finish()
    assert {"UTF8", "SQL_ASCII", "GBK", "BIG5", "SJIS", "UHC", "GB18030", "JOHAB",
            "LATIN1", "EUC_JP", "WIN1252"} <= set(accepted), accepted
    return accepted


HANDLED = {"UTF8", "SQL_ASCII"}  # on a UTF8 database


def _conninfo(p: ProxyProcess | None, pg: devcluster.Cluster, user: str, **params: str) -> bytes:
    port = p.port if p is not None else pg.port
    base = {"host": "127.0.0.1", "port": str(port), "user": user, "password": _password(user),
            "dbname": APP_DB, "sslmode": "disable"} | params
    return " ".join(f"{k}='{v}'" for k, v in base.items()).encode()


def _connect(p: ProxyProcess | None, pg: devcluster.Cluster, user: str,
             **params: str) -> pq.PGconn:
    return pq.PGconn.connect(_conninfo(p, pg, user, **params))


def _run(conn: pq.PGconn, sql: bytes, extended: bool,
         params: list[bytes | None] | None = None) -> pq.PGresult:
    if extended:
        return conn.exec_params(sql, params or [])
    return conn.exec_(sql)


def _sqlstate(res: pq.PGresult) -> str | None:
    state = res.error_field(pq.DiagnosticField.SQLSTATE)
    return state.decode() if state else None


def _outcome(res: pq.PGresult) -> tuple[object, ...]:
    """What a statement did, comparable across connections: rows as bytes, or SQLSTATE."""
    if res.status in (pq.ExecStatus.TUPLES_OK, pq.ExecStatus.COMMAND_OK):
        return ("ok", tuple(tuple(res.get_value(r, c) for c in range(res.nfields))
                            for r in range(res.ntuples)))
    return ("error", _sqlstate(res))


def _show(conn: pq.PGconn, name: str) -> bytes:
    res = conn.exec_(f"SHOW {name}".encode())
    assert res.status == pq.ExecStatus.TUPLES_OK, res.error_message
    return res.get_value(0, 0) or b""


def _refused_at_startup(conn: pq.PGconn) -> bool:
    msg = conn.error_message.decode(errors="replace")
    return conn.status == pq.ConnStatus.BAD and "strongroom" in msg \
        and ("client_encoding" in msg or "standard_conforming_strings" in msg)


def _psql(p: ProxyProcess, user: str, stdin: bytes, encoding: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PGPASSWORD": _password(user), "PGCLIENTENCODING": encoding}
    return subprocess.run(
        ["psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1",
         "-p", str(p.port), "-U", user, "-d", APP_DB],
        input=stdin, env=env, capture_output=True, timeout=30,
    )


# ------------------------------------------------------------------ the routes of issue 11


@pytest.mark.parametrize("mode", ["relay_policy", "tracked"])
@pytest.mark.parametrize("how", ["startup", "set"])
def test_gbk_cannot_read_a_denied_column(proxies: dict[str, ProxyProcess],
                                         pg: devcluster.Cluster, mode: str, how: str) -> None:
    """As support_agent (tax_id: deny), the GBK trick ends the proxy's E'' string early
    for the server, which then ran `SELECT ..., tax_id FROM customers` and returned it."""
    table = "customers" if mode == "relay_policy" else "enc_customers"
    trick = b"SELECT E'" + GBK_TRICK + b"', id, tax_id FROM " + table.encode() + b" --', 1;\n"
    if how == "startup":
        res = _psql(proxies[mode], "support_agent", trick, "GBK")
    else:
        res = _psql(proxies[mode], "support_agent", b"SET client_encoding = 'GBK';\n" + trick,
                    "UTF8")
    err = res.stderr.decode(errors="replace")
    assert TAX.encode() not in res.stdout
    with direct(pg) as conn:
        stored = [bytes(v) for (v,) in conn.execute("SELECT tax_id FROM enc_customers")]
    assert not any(s.hex().encode() in res.stdout for s in stored)
    assert res.returncode != 0 and "client_encoding" in err and "strongroom" in err, err


@pytest.mark.parametrize("mode", ["tracked", "tracked_bare"])
@pytest.mark.parametrize("how", ["startup", "set"])
def test_gbk_cannot_store_plaintext(proxies: dict[str, ProxyProcess], pg: devcluster.Cluster,
                                    mode: str, how: str) -> None:
    """As app, the proxy sealed the value it saw for `address` ('x'), while the server
    stored the dollar-quoted plaintext that the proxy took for part of `name`."""
    row = {"startup": 7, "set": 8}[how] + (10 if mode == "tracked_bare" else 0)
    insert = (
        f"INSERT INTO enc_customers (id, name, address) VALUES ({row}, E'".encode()
        + GBK_TRICK + f"', $${ADDRESS}$$) --', 'x');\n".encode()
    )
    if how == "startup":
        res = _psql(proxies[mode], APP_USER, insert, "GBK")
    else:
        res = _psql(proxies[mode], APP_USER, b"SET client_encoding = 'GBK';\n" + insert, "UTF8")
    with direct(pg) as conn:
        stored = [bytes(v) for (v,) in conn.execute(
            "SELECT address FROM enc_customers WHERE address IS NOT NULL")]
        conn.execute("DELETE FROM enc_customers WHERE id <> 1")
    assert not [s for s in stored if ADDRESS.encode() in s]
    err = res.stderr.decode(errors="replace")
    assert res.returncode != 0 and "client_encoding" in err, err


# ------------------------------------------------------------------ every client encoding


@pytest.mark.parametrize("mode", list(MODES))
def test_every_client_encoding_at_startup(proxies: dict[str, ProxyProcess],
                                          pg: devcluster.Cluster, client_encodings: list[str],
                                          mode: str) -> None:
    """Asked for in the startup packet or in `options`: handled, or a FATAL before any
    statement; the server's own answer (it accepts every one of them) is the reference."""
    user = USERS[mode]
    wrong = []
    for enc in client_encodings:
        for params in ({"client_encoding": enc}, {"options": f"-c client_encoding={enc}"}):
            ref = _connect(None, pg, user, **params)
            assert ref.status == pq.ConnStatus.OK, ref.error_message
            assert _show(ref, "client_encoding") == enc.encode()
            ref.finish()
            conn = _connect(proxies[mode], pg, user, **params)
            try:
                if enc in HANDLED:
                    if conn.status != pq.ConnStatus.OK or \
                            _show(conn, "client_encoding") != enc.encode():
                        wrong.append((enc, params, conn.error_message))
                elif not _refused_at_startup(conn):
                    wrong.append((enc, params, conn.status, conn.error_message))
            finally:
                conn.finish()
    assert not wrong, wrong


@pytest.mark.parametrize("extended", [False, True], ids=["simple", "extended"])
@pytest.mark.parametrize("mode", list(MODES))
def test_every_client_encoding_at_set(proxies: dict[str, ProxyProcess], pg: devcluster.Cluster,
                                      client_encodings: list[str], mode: str,
                                      extended: bool) -> None:
    """SET client_encoding, SET NAMES and set_config to each encoding, in any case: the
    handled ones run, the others are refused with 0A000 before the server sees them (the
    session stays UTF8 and usable)."""
    conn = _connect(proxies[mode], pg, USERS[mode], client_encoding="UTF8")
    assert conn.status == pq.ConnStatus.OK, conn.error_message
    wrong = []
    try:
        for enc in client_encodings:
            for stmt in (f"SET client_encoding = '{enc}'", f"SET NAMES '{enc.lower()}'",
                         f"SELECT set_config('CLIENT_ENCODING', '{enc}', false)",
                         f"SET LOCAL client_encoding TO '{enc}'"):
                res = _run(conn, stmt.encode(), extended)
                if enc in HANDLED:
                    if res.status not in (pq.ExecStatus.TUPLES_OK, pq.ExecStatus.COMMAND_OK):
                        wrong.append((stmt, res.error_message))
                    _run(conn, b"SET client_encoding = 'UTF8'", extended)
                elif _sqlstate(res) != "0A000":
                    wrong.append((stmt, res.status, res.error_message))
                shown = _show(conn, "client_encoding")
                if shown not in (b"UTF8",) and not (enc in HANDLED and shown == enc.encode()):
                    wrong.append((stmt, "left client_encoding", shown))
                    conn.exec_(b"SET client_encoding = 'UTF8'")
    finally:
        conn.finish()
    assert not wrong, wrong


# Quotes, backslashes, E'' and dollar quotes, and the GBK bytes (valid UTF-8 here).
DIFFERENTIAL = [
    b"SELECT 'a''b', E'c\\'d', $$e'f$$, $t$g\\h$t$, 'x\\y', U&'\\0041', '\xe4\xb8\xad\xe6\x96\x87'",
    b"SELECT E'" + GBK_TRICK + b"', 1 --', 2",
    b"SELECT E'" + GBK_TRICK + b"' || $$z$$ --', 'w'",
    b"SELECT $$'$$ || E'\\'' || '\\', length(E'\\\\'), 'it''s'",
    b"SELECT \"a\"\"b\" FROM (SELECT 1 AS \"a\"\"b\") t",
    b"SELECT '\xe4\xb8\xad' || $q$\\$q$ -- '\n, 3",
    b"SELECT E'\\x41\\101\\u0042', 'no\\escape'",
]


@pytest.mark.parametrize("extended", [False, True], ids=["simple", "extended"])
@pytest.mark.parametrize("mode", list(MODES))
def test_handled_encodings_parse_as_the_server_does(
        proxies: dict[str, ProxyProcess], pg: devcluster.Cluster,
        client_encodings: list[str], mode: str, extended: bool) -> None:
    """The handled encodings: the same bytes give the same result direct and through
    the proxy (what the server parsed is what the proxy parsed)."""
    user = USERS[mode]
    handled = [enc for enc in client_encodings if enc in HANDLED]
    assert handled == sorted(HANDLED, key=client_encodings.index)
    for enc in handled:
        ref = _connect(None, pg, user, client_encoding=enc)
        conn = _connect(proxies[mode], pg, user, client_encoding=enc)
        assert conn.status == pq.ConnStatus.OK, conn.error_message
        try:
            for sql in DIFFERENTIAL:
                want = _outcome(_run(ref, sql, extended))
                assert want[0] == "ok", (enc, sql, want)
                assert _outcome(_run(conn, sql, extended)) == want, (enc, sql)
            sql = b"SELECT $1::text || E'\\\\' || '\\'"
            want = _outcome(_run(ref, sql, True, [b"p\\'"]))
            assert _outcome(_run(conn, sql, True, [b"p\\'"])) == want
            # Not UTF-8: the server rejects it (the proxy may refuse it first).
            got = _outcome(_run(conn, b"SELECT E'\xe4\x5c', 1 --', 2", extended))
            assert got[0] == "error", got
        finally:
            ref.finish()
            conn.finish()


# ------------------------------------------------------------------ standard_conforming_strings


@pytest.mark.parametrize("mode", list(MODES))
def test_standard_conforming_strings_off_refused_at_startup(
        proxies: dict[str, ProxyProcess], pg: devcluster.Cluster, mode: str) -> None:
    for value in ("off", "false", "0", "no"):
        conn = _connect(proxies[mode], pg, USERS[mode],
                        options=f"-c standard_conforming_strings={value}")
        try:
            assert _refused_at_startup(conn), conn.error_message
        finally:
            conn.finish()
    conn = _connect(proxies[mode], pg, USERS[mode], options="-c standard_conforming_strings=on")
    try:
        assert conn.status == pq.ConnStatus.OK, conn.error_message
    finally:
        conn.finish()


REFUSED = [
    "SET standard_conforming_strings = off",
    "SET standard_conforming_strings TO false",
    "SET SESSION standard_conforming_strings = 0",
    "set Standard_Conforming_Strings to 'of'",
    "SELECT set_config('standard_conforming_strings', 'off', false)",
    "SELECT 1 WHERE set_config('standard_conforming_strings', 'no', true) IS NULL",
    "SET NAMES 'gbk'",
    "set session CLIENT_ENCODING to \"BIG5\"",
    "SELECT * FROM set_config('client_encoding', 'SJIS', false)",
    "SELECT set_config('client_encoding', $1, false)",
    "SELECT set_config($1, 'UTF8', false)",
    "SELECT set_config(lower('CLIENT_ENCODING'), 'GBK', false)",
    "SELECT set_config(setting_name => 'client_encoding', new_value => 'GBK', is_local => false)",
    "PREPARE enc_p AS SELECT set_config('client_encoding', 'UHC', false)",
    "EXPLAIN ANALYZE SELECT set_config('client_encoding', 'JOHAB', false)",
    "WITH x AS (SELECT pg_catalog.set_config('client_encoding', 'GB18030', false)) SELECT * FROM x",
    "SET client_encoding = 'LATIN1'",
    "SET client_encoding = 'UTF8', 'GBK'",
]
ALLOWED = [
    "SET client_encoding = 'utf-8'", "SET client_encoding = 'Unicode'", "SET NAMES 'UTF8'",
    "SET client_encoding TO utf8", "RESET client_encoding", "SET client_encoding TO DEFAULT",
    "SELECT set_config('client_encoding', 'UTF8', false)",
    "SET standard_conforming_strings = on", "SET standard_conforming_strings = true",
    "SET standard_conforming_strings = 1", "SET standard_conforming_strings = yes",
    "RESET standard_conforming_strings", "RESET ALL", "DISCARD ALL",
]


@pytest.mark.parametrize("extended", [False, True], ids=["simple", "extended"])
@pytest.mark.parametrize("mode", list(MODES))
def test_statements_that_change_text_rules(proxies: dict[str, ProxyProcess],
                                           pg: devcluster.Cluster, mode: str,
                                           extended: bool) -> None:
    """Every spelling, position and protocol: refused (0A000) unless the result is
    handled; after each, the server still reports UTF8 and standard_conforming_strings on."""
    conn = _connect(proxies[mode], pg, USERS[mode])
    assert conn.status == pq.ConnStatus.OK, conn.error_message
    wrong = []
    try:
        for stmt in REFUSED + ALLOWED:
            params: list[bytes | None] = [b"GBK"] if "$1" in stmt else []
            if "$1" in stmt and not extended:
                continue
            res = _run(conn, stmt.encode(), extended, params)
            state = _sqlstate(res)
            # 0A000, or 42501 where the policy denies it first (a set_config name that is
            # not a constant); either way refused by the proxy, never run.
            if stmt in REFUSED and (state not in ("0A000", "42501")
                                    or b"strongroom" not in res.error_message):
                wrong.append((stmt, res.status, res.error_message))
            if stmt in ALLOWED and state is not None:
                wrong.append((stmt, res.error_message))
            if (_show(conn, "client_encoding"), _show(conn, "standard_conforming_strings")) \
                    != (b"UTF8", b"on"):
                wrong.append((stmt, "changed the session"))
                conn.exec_(b"RESET ALL")
    finally:
        conn.finish()
    assert not wrong, wrong


# ------------------------------------------------------------------ set by the server


@pytest.mark.parametrize("mode", list(MODES))
def test_role_setting_refused_at_startup(proxies: dict[str, ProxyProcess],
                                         pg: devcluster.Cluster, mode: str) -> None:
    """ALTER ROLE ... SET client_encoding: the client asked for nothing, the server
    reports GBK after authentication; the proxy goes by what the server reports."""
    role = "enc_gbk_role"
    pg.psql(login_role_sql(role, "gbk-pw"))
    pg.psql(f"ALTER ROLE {role} SET client_encoding = 'GBK'")
    p = proxies[mode]
    conn = pq.PGconn.connect(
        f"host=127.0.0.1 port={p.port} user={role} password=gbk-pw dbname={APP_DB} "
        "sslmode=disable".encode())
    try:
        assert _refused_at_startup(conn), (conn.status, conn.error_message)
    finally:
        conn.finish()


@pytest.mark.parametrize("how", ["function", "do"])
@pytest.mark.parametrize("mode", ["relay", "tracked_bare"])
def test_function_that_changes_encoding_ends_the_session(
        proxies: dict[str, ProxyProcess], pg: devcluster.Cluster, mode: str, how: str) -> None:
    """The backstop: a function or DO block changes client_encoding where the proxy's
    analysis cannot see it; the server reports it, and the proxy ends the session with a
    FATAL (0A000) instead of forwarding anything more."""
    pg.psql("CREATE OR REPLACE FUNCTION public.enc_flip() RETURNS int LANGUAGE plpgsql AS "
            "$$BEGIN PERFORM set_config('client_encoding', 'LATIN1', false); RETURN 1; END$$; "
            "GRANT EXECUTE ON FUNCTION public.enc_flip() TO PUBLIC", db=APP_DB)
    conn = _connect(proxies[mode], pg, USERS[mode])
    assert conn.status == pq.ConnStatus.OK, conn.error_message
    try:
        sql = {"function": b"SELECT public.enc_flip()",
               "do": b"DO $$BEGIN SET client_encoding = 'GBK'; END$$"}[how]
        res = conn.exec_(sql)
        assert res.status == pq.ExecStatus.FATAL_ERROR
        assert b"strongroom: client_encoding" in conn.error_message, conn.error_message
        assert conn.status == pq.ConnStatus.BAD
        with pytest.raises(psycopg.OperationalError):
            conn.exec_(b"SELECT 1")
    finally:
        conn.finish()

def test_startup_refusal_on_the_wire(proxy_aux: ProxyProcess) -> None:
    """Raw messages: authentication completes, then a FATAL with SQLSTATE 0A000 instead
    of ReadyForQuery, and the connection closes."""
    with RawPG(proxy_aux.port) as raw:
        raw.send(startup_packet({"user": TRUST_USER, "database": APP_DB,
                                 "client_encoding": "GBK"}))
        got = raw.read_to_close()
    kinds = [k for k, _ in got]
    assert b"Z" not in kinds and kinds[-1] == b"E", kinds
    fields = error_fields(got[-1][1])
    assert (fields["S"], fields["C"]) == ("FATAL", "0A000"), fields
    assert "client_encoding" in fields["M"] and "GBK" in fields["M"]


def test_backstop_on_the_wire(proxy_aux: ProxyProcess) -> None:
    """Raw messages: the DO block's results, then a FATAL 0A000 in place of the server's
    ParameterStatus; the Query pipelined behind it gets nothing back."""
    with RawPG(proxy_aux.port) as raw:
        raw.login(TRUST_USER)
        raw.send(query_msg("DO $$BEGIN SET client_encoding = 'LATIN1'; END$$")
                 + query_msg("SELECT 1"))
        got = raw.read_to_close()
    kinds = [k for k, _ in got]
    assert kinds == [b"C", b"E"], got
    fields = error_fields(got[-1][1])
    assert (fields["S"], fields["C"]) == ("FATAL", "0A000"), fields
