"""Every reveal is audited before it happens, and the audit file survives failures.

Through a real proxy (observability_env: `obs_cards.pan` protected, `payments_service`
sees plaintext): the `statement` record of a statement that reveals protected values is
written before its first row and a `statement_end` record says how it ended (error
midway, portal never finished, client gone); when the record cannot be written (the
kernel refuses the write: RLIMIT_FSIZE set on the running proxy, so its writes past the
limit are short or fail with EFBIG) the statement is refused with 58030 before any value
is sent, or served and counted with `audit.on_failure: serve_and_alert`; a torn last line
is sealed with a recorded gap on restart; a second `serve` on the same file refuses to
start.
"""

from __future__ import annotations

import asyncio
import json
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import asyncpg
import psycopg
import pytest

from proxy import devcluster
from tests.conftest import ROOT, ProxyProcess
from tests.integration import policy_env
from tests.integration.observability_env import PAN, connect, scrape, start_observed_proxy

PANS = [f"41111111111111{i:02d}" for i in range(1, 11)]


@pytest.fixture
def proxy(pg: devcluster.Cluster, request: pytest.FixtureRequest) -> Iterator[ProxyProcess]:
    """A fresh proxy per test (extra `audit` options: indirect parameter), ten cards."""
    p = start_observed_proxy(pg, audit=getattr(request, "param", None))
    try:
        with connect(p, "payments_service") as c:
            c.execute("DELETE FROM obs_cards")
            for i, pan in enumerate(PANS, 1):
                c.execute("INSERT INTO obs_cards VALUES (%s, %s)", (i, pan))
        yield p
    finally:
        p.stop()


def records(p: ProxyProcess) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (p.dir / "audit.jsonl").read_text().splitlines()]


def reveals(p: ProxyProcess, needle: str) -> list[tuple[dict[str, Any], dict[str, Any] | None]]:
    """(begin record, its end record or None) of each reveal whose text holds `needle`."""
    recs = records(p)
    ends = {r["statement_seq"]: r for r in recs if r["event"] == "statement_end"}
    return [(r, ends.get(r["seq"])) for r in recs
            if r["event"] == "statement" and r.get("phase") == "begin"
            and needle in (r.get("statement") or "")]


def verify(p: ProxyProcess, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", "audit", "verify", str(p.dir / "audit.jsonl"),
         "--key-file", str(p.dir / "audit.key"), *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )


def failures(p: ProxyProcess) -> float:
    for line in scrape(p).splitlines():
        if line.startswith("strongroom_audit_write_failures_total"):
            return float(line.split()[-1])
    raise AssertionError("no strongroom_audit_write_failures_total in /metrics")


def limit_file_size(p: ProxyProcess, size: int | None) -> None:
    """The kernel refuses the proxy's file writes past `size` bytes (None: no limit)."""
    assert p.proc is not None
    soft = resource.RLIM_INFINITY if size is None else size
    resource.prlimit(p.proc.pid, resource.RLIMIT_FSIZE, (soft, resource.RLIM_INFINITY))


# ------------------------------------------------------------------ record before rows


def test_error_midway_is_audited_with_the_rows_sent(proxy: ProxyProcess) -> None:
    """4 PANs reach the client, then division by zero: the reveal was recorded before
    the rows, and its end record says error, 22012, 4 rows (no record at all before)."""
    with connect(proxy, "payments_service") as c:
        with pytest.raises(psycopg.errors.DivisionByZero):
            c.execute("SELECT id, pan, 1/(id-5) FROM obs_cards ORDER BY id").fetchall()
        assert c.execute("SELECT 1").fetchone() == (1,)
    found = reveals(proxy, "1/(id-$")
    assert len(found) == 1, records(proxy)
    begin, end = found[0]
    assert begin["columns"] == {"public.obs_cards.pan": "plaintext"}
    assert "rows" not in begin
    assert end is not None and end["seq"] > begin["seq"]
    assert (end["outcome"], end["sqlstate"], end["rows"]) == ("error", "22012", 4)
    assert verify(proxy).returncode == 0


def test_copy_to_stdout_is_audited_before_its_data(proxy: ProxyProcess) -> None:
    with connect(proxy, "payments_service") as c, c.cursor() as cur:
        with cur.copy("COPY obs_cards (id, pan) TO STDOUT") as copy:
            data = b"".join(bytes(b) for b in copy)
    assert PANS[0].encode() in data
    found = reveals(proxy, "COPY obs_cards")
    assert len(found) == 1 and found[0][1] is not None, records(proxy)
    assert found[0][0]["columns"] == {"public.obs_cards.pan": "plaintext"}
    assert (found[0][1]["outcome"], found[0][1]["rows"]) == ("complete", 10)


def test_unfinished_portal_and_disconnect_are_audited(proxy: ProxyProcess) -> None:
    """Row-limited Executes (a cursor of asyncpg): a portal closed with its transaction
    after 3 rows, and one whose client vanished after 2; each was recorded before its
    first row and ended with the rows sent (neither reached CommandComplete, so there was
    no record at all)."""
    pw = policy_env.password("payments_service")

    async def run() -> None:
        conn = await asyncpg.connect(proxy.dsn(user="payments_service", password=pw))
        async with conn.transaction():
            cur = await conn.cursor("SELECT id, pan FROM obs_cards WHERE id > 0 ORDER BY id")
            got = await cur.fetch(3)
            assert [r["pan"] for r in got] == PANS[:3]
        conn2 = await asyncpg.connect(proxy.dsn(user="payments_service", password=pw))
        tr = conn2.transaction()
        await tr.start()
        cur = await conn2.cursor("SELECT id, pan FROM obs_cards WHERE id >= 2 ORDER BY id")
        assert len(await cur.fetch(2)) == 2
        conn2.terminate()  # the client goes away with the portal open
        await conn.close()

    asyncio.run(run())
    closed = reveals(proxy, "id > $1")
    assert len(closed) == 1 and closed[0][1] is not None, records(proxy)
    assert (closed[0][1]["outcome"], closed[0][1]["rows"]) == ("portal_closed", 3)
    for _ in range(100):  # the disconnect is seen when the proxy notices the close
        gone = reveals(proxy, "id >= $1")
        if gone and gone[0][1] is not None:
            break
        time.sleep(0.05)
    assert len(gone) == 1 and gone[0][1] is not None, records(proxy)
    assert (gone[0][1]["outcome"], gone[0][1]["rows"]) == ("disconnect", 2)
    assert verify(proxy).returncode == 0


# ------------------------------------------------------------------ write failures


def test_unwritable_audit_refuses_the_reveal(proxy: ProxyProcess) -> None:
    """The record cannot be written (a short write, then EFBIG): 58030 before any PAN is
    sent, the session goes on, the failures are counted, and once the disk is back the
    chain holds with the loss recorded as a gap."""
    with connect(proxy, "payments_service") as c:
        limit_file_size(proxy, (proxy.dir / "audit.jsonl").stat().st_size + 40)
        try:
            for _ in range(2):
                cur = c.cursor()
                with pytest.raises(psycopg.Error) as err:
                    cur.execute("SELECT id, pan FROM obs_cards ORDER BY id")
                    cur.fetchall()
                assert err.value.sqlstate == "58030", err.value
                assert "audit" in str(err.value)
                assert c.execute("SELECT 1").fetchone() == (1,)  # still usable
            with pytest.raises(psycopg.Error) as err, c.cursor() as cur:
                with cur.copy("COPY obs_cards (id, pan) TO STDOUT") as copy:
                    sent = sum(len(b) for b in copy)  # (a count: no PAN in a message)
                    assert sent == 0, f"{sent} bytes of COPY data were sent"
            assert err.value.sqlstate == "58030", err.value
            assert c.execute("SELECT 1").fetchone() == (1,)
            assert failures(proxy) >= 3
        finally:
            limit_file_size(proxy, None)
        assert c.execute("SELECT pan FROM obs_cards WHERE id = 1").fetchone() == (PANS[0],)
    data = (proxy.dir / "audit.jsonl").read_bytes()
    assert PAN.encode() not in data and PANS[0].encode() not in data
    proxy.stop()
    res = verify(proxy, "--require-stop")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "recorded gap" in res.stdout and "could not be written" in res.stdout, res.stdout


@pytest.mark.parametrize("proxy", [{"on_failure": "serve_and_alert"}], indirect=True)
def test_serve_and_alert_serves_and_counts(proxy: ProxyProcess) -> None:
    with connect(proxy, "payments_service") as c:
        limit_file_size(proxy, (proxy.dir / "audit.jsonl").stat().st_size)
        try:
            got = c.execute("SELECT pan FROM obs_cards ORDER BY id").fetchall()
            assert [r[0] for r in got] == PANS
            assert failures(proxy) >= 1
        finally:
            limit_file_size(proxy, None)
        assert c.execute("SELECT 1").fetchone() == (1,)
    proxy.stop()
    res = verify(proxy, "--require-stop")
    assert res.returncode == 0 and "recorded gap" in res.stdout, res.stdout + res.stderr


# ------------------------------------------------------------------ the file itself


def test_torn_tail_is_sealed_with_a_gap(proxy: ProxyProcess) -> None:
    proxy.stop()
    path = proxy.dir / "audit.jsonl"
    whole = path.read_bytes()
    with open(path, "ab") as fh:
        fh.write(b'{"event":"statement","mac":"0a1b')  # a host crash mid-write
    proxy.start()
    with connect(proxy, "payments_service") as c:
        assert c.execute("SELECT pan FROM obs_cards WHERE id = 2").fetchone() == (PANS[1],)
    proxy.stop()
    assert path.read_bytes().startswith(whole)
    res = verify(proxy, "--require-stop")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 recorded gap(s)" in res.stdout and "torn tail of 32 bytes" in res.stdout
    gap = next(r for r in records(proxy) if r["event"] == "gap")
    assert gap["reason"] == "torn_tail" and gap["torn_bytes"] == 32


def test_second_serve_on_the_same_audit_file_refuses(proxy: ProxyProcess) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "serve", "--config", str(proxy.config_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()  # (before it: a root warning, as root)
    assert "in use by another running proxy" in lines[-1], res.stderr
    assert "Traceback" not in res.stderr and str(proxy.proc.pid) in lines[-1], res.stderr
    starts = [r for r in records(proxy) if r["event"] == "start"]
    assert [r["pid"] for r in starts] == [proxy.proc.pid]  # none written into the live chain
    assert proxy.alive()
    assert verify(proxy).returncode == 0
