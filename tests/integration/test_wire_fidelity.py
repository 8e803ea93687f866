"""Issue 13, "fix on the way": three places where the proxy's wire behaviour differed
from PostgreSQL's, each checked in both client paths (plain relay, and tracking mode
with `protect:`) against a real server.

- Parameter counts are unsigned Int16 on the wire: PostgreSQL takes up to 65,535
  parameters in a Parse or Bind; the proxy refused more than 32,767 as a protocol
  violation.
- A client that sends its startup packet and hangs up at once is a clean close, not a
  protocol error.
- A denial the proxy substitutes (a `DO` block that raises) carries no `CONTEXT:
  PL/pgSQL function inline_code_block` line: that Where field describes the proxy's own
  code, not the client's statement. The server's own errors keep every field.
"""

from __future__ import annotations

import re
import socket
import struct
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from proxy import devcluster
from tests.conftest import (
    SYNC,
    ProxyProcess,
    RawPG,
    bind_msg,
    describe_msg,
    execute_msg,
    parse_msg,
    query_msg,
    startup_packet,
)
from tests.integration.encryption_env import both_paths, direct, login_role_sql

ROLE, PASSWORD = "wf_user", "wf-user-pw"
SETUP = login_role_sql(ROLE, PASSWORD) + """
DROP TABLE IF EXISTS public.wf_open, public.wf_closed, public.wf_cards;
CREATE TABLE public.wf_open (id int);
CREATE TABLE public.wf_closed (id int);
CREATE TABLE public.wf_cards (id int, pan bytea, pan_bidx bytea);
INSERT INTO public.wf_open SELECT generate_series(1, 10);
GRANT ALL ON public.wf_open, public.wf_closed, public.wf_cards TO PUBLIC;
"""
POLICY: dict[str, Any] = {
    "roles": {ROLE: {"tables": {"public.wf_open": ["select"],
                                "public.wf_cards": ["select", "insert"]},
                     "allow": ["do"]}},
    "default": "deny",
}
PROTECT = {"public.wf_cards.pan": {"type": "text", "search": "blind_index"}}
MANY = 40_000  # more than a signed Int16 holds, fewer than PostgreSQL's 65,535


@pytest.fixture(scope="module")
def proxies(pg: Any) -> Iterator[dict[str, ProxyProcess]]:
    pg.psql(SETUP, db="app")
    with both_paths(pg, PROTECT, POLICY, extra=_metrics) as started:
        yield started


@pytest.fixture(params=["relay", "tracking"])
def proxy_of(request: pytest.FixtureRequest, proxies: dict[str, ProxyProcess]) -> ProxyProcess:
    return proxies[request.param]


def _metrics() -> dict[str, Any]:
    return {"metrics": {"host": "127.0.0.1", "port": devcluster.free_port()}}


def connect(p: ProxyProcess) -> psycopg.Connection:
    return psycopg.connect(p.conninfo(user=ROLE, password=PASSWORD), autocommit=True)


def protocol_errors(p: ProxyProcess) -> float:
    body = urllib.request.urlopen(
        f"http://127.0.0.1:{p.config['metrics']['port']}/metrics", timeout=5).read().decode()
    return sum(float(v) for v in re.findall(
        r"^strongroom_protocol_errors_total(?:\{[^}]*\})? ([0-9.e+]+)$", body, re.M))


def many_params_sql(n: int) -> str:
    return ("SELECT array_length(ARRAY[" + ",".join("%s::int" for _ in range(n))
            + "], 1), (SELECT count(*) FROM wf_open WHERE id <= %s::int)")


def test_more_than_32767_parameters(proxy_of: ProxyProcess, pg: Any) -> None:
    """psycopg sends the 40,001 parameters with Parse (their types) and Bind (values)."""
    sql = many_params_sql(MANY)
    params = [*range(MANY), 5]
    with direct(pg) as conn:
        expected = conn.execute(sql, params).fetchone()
    assert expected == (MANY, 5)
    with connect(proxy_of) as conn:
        assert conn.execute(sql, params).fetchone() == expected
        # and a denied statement with as many parameters is refused as a denial
        with pytest.raises(psycopg.Error) as err:
            conn.execute(sql.replace("wf_open", "wf_closed"), params)
        assert err.value.sqlstate == "42501"
        assert conn.execute("SELECT 1").fetchone() == (1,)


def raw_many_params(port: int) -> list[tuple[bytes, bytes]]:
    """Parse with 40,000 declared int4 parameters, Describe (ParameterDescription of
    40,000 types), Bind, Execute: every count above 32,767, as raw messages."""
    sql = ("SELECT array_length(ARRAY[" + ",".join(f"${i}" for i in range(1, MANY + 1))
           + "], 1) FROM wf_open WHERE id = 1")
    with RawPG(port) as raw:
        raw.login(ROLE, PASSWORD, database="app")
        raw.send(parse_msg(sql, "many", (23,) * MANY) + describe_msg(b"S", "many")
                 + bind_msg(tuple(str(i).encode() for i in range(MANY)), stmt="many")
                 + execute_msg() + SYNC)
        return [(k, b) for k, b in raw.read_until(b"Z")]


def test_more_than_32767_declared_parameters_raw(proxy_of: ProxyProcess, pg: Any) -> None:
    expected = raw_many_params(pg.port)
    assert [k for k, _ in expected] == [b"1", b"t", b"T", b"2", b"D", b"C", b"Z"], expected
    assert raw_many_params(proxy_of.port) == expected


def startup_then_close(port: int, packet: bytes, *, await_auth: bool = False) -> None:
    """Send `packet` and hang up, as a health check or port scanner does: at once, or
    once the server has asked for a password (then the proxy's upstream session is
    certainly in authentication)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(packet)
        if await_auth:
            head = sock.recv(5, socket.MSG_WAITALL)
            assert head[:1] == b"R", head
            sock.recv(struct.unpack("!I", head[1:])[0] - 4, socket.MSG_WAITALL)


LOGIN = startup_packet({"user": ROLE, "database": "app"})


def hang_ups(port: int) -> None:
    startup_then_close(port, LOGIN, await_auth=True)
    startup_then_close(port, LOGIN)


def server_complaints(pg: Any, since: int) -> list[str]:
    """Errors the server logged since offset `since` (its log is at `warning`, so
    anything at all but a client's own reset is a complaint)."""
    added = pg.logfile.read_text(errors="replace")[since:]
    return [line for line in added.splitlines()
            if "FATAL" in line or "ERROR" in line or "startup packet" in line]


def test_startup_packet_then_close_is_a_clean_close(proxy_of: ProxyProcess, pg: Any) -> None:
    """PostgreSQL ends a session whose client left during authentication silently. The
    proxy sent the server a Terminate there, which the server logged as a FATAL
    ("expected SASL response, got message type 88")."""
    before_pg = len(pg.logfile.read_text(errors="replace"))
    hang_ups(pg.port)
    time.sleep(0.5)
    assert server_complaints(pg, before_pg) == [], "direct, the server says nothing"
    before_pg = len(pg.logfile.read_text(errors="replace"))
    before_errors, before_log = protocol_errors(proxy_of), len(proxy_of.log())
    hang_ups(proxy_of.port)
    # the proxy ends what it cannot forward (a packet cut short, a bare SSLRequest)
    # quietly too, as the server would
    startup_then_close(proxy_of.port, LOGIN[:20])
    startup_then_close(proxy_of.port, struct.pack("!II", 8, 80877103))
    startup_then_close(proxy_of.port, b"")
    time.sleep(1.0)
    # still serving, nothing counted or logged as a protocol error, here or upstream
    with connect(proxy_of) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    added = proxy_of.log()[before_log:]
    assert "protocol violation" not in added and "startup packet" not in added, added
    assert protocol_errors(proxy_of) == before_errors
    assert server_complaints(pg, before_pg) == []


USER_DO = ("DO $$BEGIN\n  PERFORM 1;\n  RAISE EXCEPTION USING ERRCODE = '22012', "
           "MESSAGE = 'user raised', SCHEMA = 'user_schema';\nEND$$")


def test_a_denial_carries_no_context_of_the_proxys_do_block(
        proxy_of: ProxyProcess, pg: Any) -> None:
    with connect(proxy_of) as conn:
        for params in (None, (1,)):  # simple Query, and Parse/Bind/Execute
            with pytest.raises(psycopg.Error) as err:
                conn.execute("SELECT * FROM wf_closed WHERE id = %s" if params
                             else "SELECT * FROM wf_closed", params)
            diag = err.value.diag
            assert err.value.sqlstate == "42501", diag.message_primary
            assert diag.context is None, diag.context
            assert diag.schema_name is None, "the proxy's mark never reaches the client"
        assert conn.execute("SELECT count(*) FROM wf_open").fetchone() == (10,)


def test_a_server_error_keeps_every_field(proxy_of: ProxyProcess, pg: Any) -> None:
    """A user's own DO block keeps its context line, byte for byte as direct."""
    with RawPG(pg.port) as raw:
        raw.login(ROLE, PASSWORD, database="app")
        raw.send(query_msg(USER_DO))
        expected = [body for kind, body in raw.read_until(b"Z") if kind == b"E"]
    assert len(expected) == 1 and b"WPL/pgSQL function inline_code_block line 3" in expected[0]
    with RawPG(proxy_of.port) as raw:
        raw.login(ROLE, PASSWORD, database="app")
        raw.send(query_msg(USER_DO))
        replies = raw.read_until(b"Z")
    assert [body for kind, body in replies if kind == b"E"] == expected
    with connect(proxy_of) as conn, pytest.raises(psycopg.Error) as err:
        conn.execute(USER_DO)
    assert err.value.diag.context is not None and "inline_code_block" in err.value.diag.context
    assert err.value.diag.schema_name == "user_schema"
