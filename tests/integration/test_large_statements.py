"""Issue 11: a statement big enough to stall the event loop is analysed off it.

A 400k-item IN list (2.7 MB) held every session of the process for about two seconds
while it was parsed. Statements over 64 KiB are now analysed (and, with `protect:`,
planned) in a worker process while that client's later bytes wait; these tests check that
the deferred path decides, seals and orders exactly like the inline one. (How long other
sessions wait is a benchmark figure, not a test: see the closing note of the session.)
"""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from proxy import devcluster
from tests.conftest import ProxyProcess
from tests.integration.encryption_env import both_paths, direct, login_role_sql

ROLE, PASSWORD = "big_user", "big-user-pw"
SETUP = login_role_sql(ROLE, PASSWORD) + """
DROP TABLE IF EXISTS public.big_open, public.big_closed, public.big_cards;
CREATE TABLE public.big_open (id int);
CREATE TABLE public.big_closed (id int);
CREATE TABLE public.big_cards (id int, pan bytea, pan_bidx bytea);
INSERT INTO public.big_open SELECT generate_series(1, 1000);
GRANT ALL ON public.big_open, public.big_closed, public.big_cards TO PUBLIC;
"""
POLICY: dict[str, Any] = {
    "roles": {ROLE: {"tables": {"public.big_open": ["select"],
                                "public.big_cards": ["select", "insert"]}}},
    "default": "deny",
}
PROTECT = {"public.big_cards.pan": {"type": "text", "search": "blind_index"}}


@pytest.fixture(scope="module")
def proxies(pg: Any) -> Iterator[dict[str, ProxyProcess]]:
    pg.psql(SETUP, db="app")
    with both_paths(pg, PROTECT, POLICY, extra=lambda: {"metrics": _metrics()}) as started:
        yield started


def _metrics() -> dict[str, Any]:
    return {"host": "127.0.0.1", "port": devcluster.free_port()}


def connect(p: ProxyProcess) -> psycopg.Connection:
    return psycopg.connect(p.conninfo(user=ROLE, password=PASSWORD), autocommit=True)


def offloaded(p: ProxyProcess) -> float:
    body = urllib.request.urlopen(
        f"http://127.0.0.1:{p.config['metrics']['port']}/metrics", timeout=5).read().decode()
    found = re.search(r"^strongroom_statements_offloaded_total ([0-9.e+]+)$", body, re.M)
    assert found, "the offload counter is exported"
    return float(found.group(1))


def in_list(n: int) -> str:
    return ",".join(str(i) for i in range(n))


@pytest.mark.parametrize("mode", ["relay", "tracking"])
def test_big_statements_are_decided_like_small_ones(
        proxies: dict[str, ProxyProcess], mode: str) -> None:
    p = proxies[mode]
    before = offloaded(p)
    with connect(p) as conn:
        big = f"SELECT count(*) FROM big_open WHERE id IN ({in_list(200_000)})"
        assert len(big) > 1_000_000
        assert conn.execute(big).fetchone() == (1000,)
        # The same text again is a cache hit: not sent to a worker twice.
        assert conn.execute(big).fetchone() == (1000,)
        with pytest.raises(psycopg.Error) as err:
            conn.execute(f"SELECT count(*) FROM big_closed WHERE id IN ({in_list(100_000)})")
        assert err.value.sqlstate == "42501"
        # Extended protocol (Parse), and statements pipelined behind a big one keep
        # their order.
        with conn.pipeline():
            cur1 = conn.execute(f"SELECT count(*) FROM big_open WHERE id = %s AND id IN "
                                f"({in_list(150_000)})", (7,))
            cur2 = conn.execute("SELECT 2")
            cur3 = conn.execute(f"SELECT count(*) FROM big_open WHERE id IN ({in_list(90_000)})"
                                " AND id < %s", (11,))
        assert cur1.fetchone() == (1,)
        assert cur2.fetchone() == (2,)
        assert cur3.fetchone() == (10,)
    assert offloaded(p) >= before + 4


def test_big_protected_statements_are_sealed(proxies: dict[str, ProxyProcess], pg: Any) -> None:
    p = proxies["tracking"]
    before = offloaded(p)
    pans = [f"4000{i:012d}" for i in range(6000)]
    values = ",".join(f"({i}, '{pan}')" for i, pan in enumerate(pans))
    with connect(p) as conn:
        conn.execute(f"INSERT INTO big_cards (id, pan) VALUES {values}")
        absent = [f"5000{i:012d}" for i in range(3000)]
        wanted = ",".join(f"'{pan}'" for pan in pans[::2] + absent)
        rows = conn.execute(f"SELECT id, pan FROM big_cards WHERE pan IN ({wanted}) "
                            "ORDER BY id").fetchall()
        assert rows == [(i, pans[i]) for i in range(0, 6000, 2)]
    assert offloaded(p) >= before + 2
    with direct(pg) as conn:
        stored = conn.execute("SELECT pan, pan_bidx FROM big_cards").fetchall()
    assert len(stored) == 6000
    assert all(b"4000" not in bytes(pan) and bidx is not None for pan, bidx in stored)
