"""Issue 11, found by attacking the first round of fixes: the two names of one portal.

PostgreSQL keeps protocol portals and SQL cursors in one namespace, and protocol
statements and SQL PREPAREd ones in another: SQL `FETCH` can run a portal the client
bound with the protocol, a protocol `Execute` can read a `DECLARE`d cursor, and a
protocol `Bind` can use a statement made by SQL `PREPARE` (re-analysed by the server
under the search_path of the moment). Each crossing ran a statement, or a set_config in
it, where the proxy decides nothing; now each is refused, and these tests fail on the
code before that.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import (
    SYNC,
    ProxyProcess,
    RawPG,
    bind_msg,
    error_fields,
    execute_msg,
    parse_msg,
    query_msg,
)
from tests.integration.encryption_env import both_paths, direct
from tests.integration.test_session_state import (
    PROBE_SETUP,
    PROTECT,
    ROLES,
    SETUP,
    STATE_POLICY,
)

POLICY: dict[str, Any] = {
    "roles": {
        **STATE_POLICY["roles"],
        "st_login": {**STATE_POLICY["roles"]["st_login"],
                     "tables": {"st_a.probe_t": ["select"], "public.st_open": ["select"]}},
        "st_peon": {**STATE_POLICY["roles"]["st_peon"],
                    "tables": {"st_b.probe_t": ["select"], "public.st_secret": ["select"]}},
        "st_boss": {"tables": {"public.st_cards": ["select", "insert"],
                               "st_c.st_cards": ["select", "insert"]}},
    },
    "default": "deny",
}


@pytest.fixture(scope="module")
def proxies(pg: Any) -> Iterator[dict[str, ProxyProcess]]:
    pg.psql(SETUP, db="app")
    pg.psql(PROBE_SETUP, db="app")
    with both_paths(pg, PROTECT, POLICY) as started:
        yield started


@pytest.fixture(params=["relay", "tracking"])
def proxy_of(request: pytest.FixtureRequest, proxies: dict[str, ProxyProcess]) -> ProxyProcess:
    return proxies[request.param]


def login(p: ProxyProcess, role: str = "st_login") -> RawPG:
    raw = RawPG(p.port)
    raw.login(role, ROLES[role], database="app")
    return raw


def run(raw: RawPG, data: bytes) -> list[tuple[bytes, bytes]]:
    raw.send(data)
    return raw.read_until(b"Z")


def errors(replies: list[tuple[bytes, bytes]]) -> list[dict[str, str]]:
    return [error_fields(body) for kind, body in replies if kind == b"E"]


def rows(replies: list[tuple[bytes, bytes]]) -> list[bytes]:
    return [body for kind, body in replies if kind == b"D"]


def search_path(raw: RawPG) -> bytes:
    (row,) = rows(run(raw, query_msg("SHOW search_path")))
    return row[6:]


def test_sql_fetch_of_a_protocol_portal_is_refused(proxy_of: ProxyProcess) -> None:
    """The portal's set_config would run at FETCH, where no Execute shows it."""
    with login(proxy_of) as raw:
        run(raw, query_msg("SET search_path = st_a"))
        run(raw, query_msg("BEGIN"))
        run(raw, parse_msg("SELECT set_config('search_path', 'st_b', false)")
            + bind_msg(portal="p") + SYNC)
        replies = run(raw, query_msg("FETCH ALL FROM p"))
        (err,) = errors(replies)
        assert err["C"] == "42501" and "protocol portal" in err["M"], err
        run(raw, query_msg("ROLLBACK"))
        assert search_path(raw) == b"st_a"
        assert rows(run(raw, query_msg("SELECT v FROM probe_t"))) != [], "st_a is the role's"


def test_sql_fetch_of_a_portal_bound_as_another_role_is_refused(
        proxy_of: ProxyProcess) -> None:
    with login(proxy_of) as raw:
        run(raw, query_msg("BEGIN"))
        run(raw, query_msg("SET ROLE st_peon"))
        run(raw, parse_msg("SELECT * FROM st_secret") + bind_msg(portal="p") + SYNC)
        run(raw, query_msg("RESET ROLE"))
        replies = run(raw, query_msg("FETCH ALL FROM p"))
        assert not rows(replies)
        assert errors(replies)[0]["C"] == "42501"
        run(raw, query_msg("ROLLBACK"))


def test_protocol_execute_of_a_declared_cursor_is_refused(proxy_of: ProxyProcess) -> None:
    with login(proxy_of) as raw:
        run(raw, query_msg("BEGIN"))
        run(raw, query_msg("SET ROLE st_peon"))
        run(raw, query_msg("DECLARE c CURSOR FOR SELECT * FROM st_secret"))
        run(raw, query_msg("RESET ROLE"))
        replies = run(raw, execute_msg("c") + SYNC)
        assert not rows(replies)
        (err,) = errors(replies)
        assert "read with FETCH" in err["M"], err
        run(raw, query_msg("ROLLBACK"))
        assert rows(run(raw, query_msg("SELECT 1")))


def test_protocol_bind_of_a_sql_prepared_statement_is_refused(proxy_of: ProxyProcess) -> None:
    with login(proxy_of) as raw:
        run(raw, query_msg("SET ROLE st_peon"))
        run(raw, query_msg("PREPARE s AS SELECT * FROM st_secret"))
        run(raw, query_msg("RESET ROLE"))
        replies = run(raw, bind_msg(stmt="s") + execute_msg() + SYNC)
        assert not rows(replies)
        (err,) = errors(replies)
        assert "SQL PREPARE" in err["M"], err
        assert errors(run(raw, query_msg("EXECUTE s")))[0]["C"] == "42501"
        # A protocol Parse of the same name afterwards is the client's own statement.
        run(raw, query_msg("DEALLOCATE s"))
        replies = run(raw, parse_msg("SELECT 5", name="s") + bind_msg(stmt="s")
                      + execute_msg() + SYNC)
        assert not errors(replies) and len(rows(replies)) == 1


def test_sql_prepared_insert_bound_after_search_path_change_stores_nothing(
        proxies: dict[str, ProxyProcess], pg: Any) -> None:
    """The server re-analyses it under the new search_path: into the protected table."""
    with login(proxies["tracking"], "st_boss") as raw:
        run(raw, query_msg("SET search_path = st_c"))
        run(raw, query_msg("PREPARE w(int, bytea) AS INSERT INTO st_cards VALUES ($1, $2)"))
        run(raw, query_msg("SET search_path = public"))
        replies = run(raw, bind_msg((b"88", b"4111000088880000"), stmt="w")
                      + execute_msg() + SYNC)
        assert errors(replies)
    with direct(pg) as conn:
        assert conn.execute("SELECT pan FROM public.st_cards WHERE id = 88").fetchall() == []


def test_a_dead_offload_worker_is_replaced(proxies: dict[str, ProxyProcess]) -> None:
    """One lost worker process (an OOM kill) must not fail every later big statement: a
    statement that was on it (or raced its death) ends its own session with 53400, never
    analysed on the event loop; the next ones get a new worker."""
    p = proxies["relay"]
    big = "SELECT count(*) FROM st_open WHERE id IN (" + ",".join(
        str(i) for i in range(20_000)) + ")"
    with login(p) as raw:
        run(raw, query_msg("SET search_path = public"))
        assert rows(run(raw, query_msg(big)))
    assert p.proc is not None
    children = subprocess.run(["pgrep", "-P", str(p.proc.pid)], capture_output=True,
                              text=True).stdout.split()
    assert children, "the worker process runs"
    for pid in children:
        os.kill(int(pid), signal.SIGKILL)
    outcomes = []
    for n in range(4):
        with login(p) as raw:
            run(raw, query_msg("SET search_path = public"))
            try:
                replies = run(raw, query_msg(big + f" OR id = {n}"))
            except EOFError:
                outcomes.append("closed")
                continue
            failed = errors(replies)
            outcomes.append(failed[0]["C"] if failed else "ok")
    assert outcomes[1:] == ["ok", "ok", "ok"], outcomes
    assert outcomes[0] in ("ok", "53400", "closed"), outcomes
