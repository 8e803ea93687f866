"""Metrics exposition, label cardinality, the audit log and plaintext leaks, on a real proxy.

One proxy for the module (encryption + policy + metrics + audit with small rotation size,
see observability_env.py); the tests run in file order and the leak test comes last, so it
sees every log line, metric and audit record the module produced.
"""

from __future__ import annotations

import asyncio
import json
import random
import string
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy import devcluster
from tests.conftest import ROOT, ProxyProcess, startup_packet
from tests.integration.encryption_env import leaks
from tests.integration.observability_env import (
    SECRETS,
    connect,
    scrape,
    start_observed_proxy,
    tool,
    traffic,
)

AUDIT_MAX_BYTES = 4096


@pytest.fixture(scope="module")
def observed(pg: devcluster.Cluster) -> Iterator[ProxyProcess]:
    p = start_observed_proxy(pg, audit={"max_bytes": AUDIT_MAX_BYTES, "keep": 100})
    try:
        traffic(p, rounds=2)
        yield p
    finally:
        p.stop()


def audit_files(p: ProxyProcess) -> list[Path]:
    """Oldest first: audit.jsonl.N ... audit.jsonl.1, audit.jsonl."""
    files = sorted(p.dir.glob("audit.jsonl.*"), key=lambda f: -int(f.suffix[1:]))
    return [*files, p.dir / "audit.jsonl"]


def records(p: ProxyProcess) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(line) for f in audit_files(p) for line in f.read_text().splitlines()]


def verify(files: list[Path | str], key: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", "audit", "verify", *map(str, files),
         "--key-file", str(key)],
        cwd=str(ROOT), capture_output=True, text=True, timeout=60,
    )


def series(text: str) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    return {
        (s.name, tuple(sorted(s.labels.items())))
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


# ---------------------------------------------------------------------------- metrics


def test_promtool_checks_the_real_exposition(observed: ProxyProcess) -> None:
    text = scrape(observed)
    proc = subprocess.run([tool("promtool"), "check", "metrics"], input=text,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # What the traffic did is there, by bounded labels.
    assert 'strongroom_queries_total{kind="select"}' in text
    assert 'strongroom_crypto_operations_total{column="public.obs_cards.pan",op="decrypt",' \
           'result="ok"}' in text
    assert 'role="support_agent"' in text and 'role="unlisted"' in text
    assert 'strongroom_analyzer_cache_total{result="hit"}' in text
    # Crypto time is observed for the sealing and opening the traffic did.
    counts = {
        dict(s.labels).get("op"): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == "strongroom_crypto_seconds_count"
    }
    assert counts.get("encrypt", 0) > 0 and counts.get("decrypt", 0) > 0, counts


def _parse_count(text: str) -> float:
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "strongroom_analyzer_parse_seconds_count":
                return s.value
    raise AssertionError("strongroom_analyzer_parse_seconds_count is not exposed")


def test_analyzer_parse_time_is_observed(observed: ProxyProcess) -> None:
    before = _parse_count(scrape(observed))
    assert before > 0  # the fixture's traffic was analysed
    with connect(observed, "support_agent") as c:
        fresh = [f"SELECT {i} AS parse_probe_{_random(8)}" for i in range(3)]
        for sql in fresh:
            c.execute(sql)
        after_misses = _parse_count(scrape(observed))
        for sql in fresh:  # the same texts again: cache hits, not timed
            c.execute(sql)
        after_hits = _parse_count(scrape(observed))
    assert after_misses >= before + len(fresh)
    assert after_hits == after_misses


def _random(n: int) -> str:
    return "".join(random.choices(string.ascii_lowercase + string.digits, k=n))


async def _hostile_startups(port: int, names: list[tuple[str, str]]) -> None:
    """Startup packets with made-up user and application names; hang up at the auth
    request (or at whatever the server answers)."""
    sem = asyncio.Semaphore(16)

    async def one(user: str, app: str) -> None:
        async with sem:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(startup_packet({"user": user, "database": "app",
                                         "application_name": app}))
            await writer.drain()
            await asyncio.wait_for(reader.read(1), 10)
            writer.close()

    await asyncio.gather(*(one(u, a) for u, a in names))


def test_hostile_client_cannot_grow_the_series(observed: ProxyProcess) -> None:
    before = series(scrape(observed))
    tokens = [(f"u{_random(12)}", f"a{_random(12)}") for _ in range(2000)]
    asyncio.run(_hostile_startups(observed.port, tokens))
    bad_sql = []
    with connect(observed, "support_agent", application_name=f"x{_random(12)}") as c:
        for i in range(300):
            t = f"t{_random(12)}"
            bad_sql.append(t)
            sql = [f"SELECT * FROM {t}", f"SELEC {t}", f"DO $$BEGIN RAISE EXCEPTION "
                   f"USING ERRCODE = 'Z{i % 10}{_random(3).upper()}'; END$$"][i % 3]
            try:
                c.execute(sql)
            except psycopg.Error:
                pass
    with connect(observed, "payments_service") as c:  # server errors with odd SQLSTATEs
        for i in range(100):
            try:
                c.execute(f"SELECT 1/0, '{_random(8)}'" if i % 2 else f"SELECT nope_{i}")
            except psycopg.Error:
                pass
    text = scrape(observed)
    after = series(text)
    grown = after - before
    # New series can only come from fixed enums (SQLSTATE list, reasons, kinds).
    assert len(grown) <= 40, sorted(grown)
    assert len(after) < 1000, len(after)
    for u, a in tokens[:200]:
        assert u not in text and a not in text
    for t in bad_sql:
        assert t not in text


# ---------------------------------------------------------------------------- audit


def test_audit_log_verifies_and_records_accesses(observed: ProxyProcess) -> None:
    key = observed.dir / "audit.key"
    assert key.stat().st_mode & 0o777 == 0o600
    files = audit_files(observed)
    assert len(files) >= 2, "the traffic should have rotated the 4 KiB audit file"
    res = verify(files, key)
    assert res.returncode == 0, res.stdout + res.stderr
    recs = records(observed)
    events = {r["event"] for r in recs}
    assert {"start", "rotate", "connect", "disconnect", "auth_failure", "statement",
            "statement_end"} <= events
    stmts = [r for r in recs if r["event"] == "statement"]
    masked = [r for r in stmts if r["role"] == "support_agent" and r["decision"] == "allow"]
    assert masked, stmts
    rec = masked[0]
    assert rec["kind"] == "select"
    assert rec["tables"] == ["public.obs_cards"]
    assert rec["columns"] == {"public.obs_cards.pan": "masked"}
    # Written before its rows (no count yet); its end record has them.
    assert rec["phase"] == "begin" and "rows" not in rec
    end = next(r for r in recs if r["event"] == "statement_end"
               and r["statement_seq"] == rec["seq"] and r["session"] == rec["session"])
    assert (end["rows"], end["outcome"]) == (2, "complete")
    assert rec["application_name"] == "helpdesk"
    assert rec["fingerprint"] and "obs_cards" in rec["statement"]
    assert rec["client"].startswith("127.0.0.1:")
    plain = [r for r in stmts if r["role"] == "payments_service" and r["kind"] == "select"]
    assert {"public.obs_cards.pan": "plaintext"} in [r["columns"] for r in plain]
    writes = [r for r in stmts if r["kind"] == "insert"]
    assert writes and all("$" in r["statement"] for r in writes), writes
    denied = [r for r in stmts if r["decision"] == "deny"]
    assert any(r["role"] == "support_agent" and "tax_id" in r["reason"] for r in denied)
    assert any(r["role"] == "analyst" for r in denied)
    fails = [r for r in recs if r["event"] == "auth_failure"]
    assert fails[0]["role"] == "support_agent" and fails[0]["sqlstate"] == "28P01"


def test_tampered_audit_line_is_named(observed: ProxyProcess, tmp_path: Path) -> None:
    key = observed.dir / "audit.key"
    copies = []
    for f in audit_files(observed):
        copies.append(tmp_path / f.name)
        copies[-1].write_bytes(f.read_bytes())
    newest = copies[-1]
    lines = newest.read_text().splitlines(keepends=True)
    target = next(i for i, line in enumerate(lines) if '"event":"statement"' in line
                  or '"event":"connect"' in line)
    lines[target] = lines[target].replace('"role":"', '"role":"x', 1)
    newest.write_text("".join(lines))
    res = verify(copies, key)
    assert res.returncode == 1, res.stdout
    assert f"{newest}:{target + 1}" in res.stdout, res.stdout
    # A deleted line in an older (rotated) file is found too.
    newest.write_text("".join(lines[:target]) + "".join(lines[target + 1 :]))
    older = copies[-2]
    old_lines = older.read_text().splitlines(keepends=True)
    older.write_text("".join(old_lines[:1] + old_lines[2:]))
    res = verify(copies, key)
    assert res.returncode == 1 and f"{older}:2" in res.stdout, res.stdout


def test_audit_survives_more_rotation_and_a_restart(observed: ProxyProcess) -> None:
    before = len(audit_files(observed))
    traffic(observed, rounds=3)
    assert len(audit_files(observed)) > before
    res = verify(audit_files(observed), observed.dir / "audit.key")
    assert res.returncode == 0, res.stdout + res.stderr


# ---------------------------------------------------------------------------- leaks (last)


def test_no_plaintext_in_logs_metrics_or_audit(observed: ProxyProcess) -> None:
    metrics_text = scrape(observed)
    observed.stop()  # flushes the audit log's stop record and the proxy log
    haystacks = [observed.log_path.read_bytes(), metrics_text.encode()]
    haystacks += [f.read_bytes() for f in audit_files(observed)]
    assert b'"event":"stop"' in haystacks[-1]
    assert leaks(haystacks, SECRETS) == []
    res = verify([*audit_files(observed), "--require-stop"], observed.dir / "audit.key")
    assert res.returncode == 0, res.stdout
