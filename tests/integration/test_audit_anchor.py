"""The audit trail can prove it is complete (issue 17, section 3), on a real proxy and PG.

* The head of the chain is anchored in the database (a row written by the proxy's own
  role, periodically and at stop) and in Prometheus (`strongroom_audit_head_sequence`).
* A tail cut back to an earlier clean stop passes `audit verify --require-stop` (the
  chain alone cannot tell) but fails `--anchor DSN`, and the next start alerts: an error
  in the log, `strongroom_audit_anchor_mismatch 1`, an `anchor_gap` record in the chain.
* Verifying only the newest file after rotation is "older files missing" (exit 3).
* Audit files are 0600 in a 0700 directory; a group-writable directory is refused.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from proxy import devcluster
from tests.conftest import APP_DB, ROOT, ProxyProcess
from tests.integration.encryption_env import direct, login_role_sql
from tests.integration.observability_env import scrape, start_observed_proxy, traffic

ANCHOR_ROLE = "strongroom_anchor"
ANCHOR_PASSWORD = "anchor-secret-7"
TABLE = "strongroom_audit_anchor"


def anchor_dsn(pg: devcluster.Cluster) -> str:
    return pg.dsn(user=ANCHOR_ROLE, password=ANCHOR_PASSWORD, db=APP_DB) + "?sslmode=disable"


@pytest.fixture
def anchor_role(pg: devcluster.Cluster) -> str:
    """The proxy's own role, allowed to create its table in `public`; no rows left over."""
    pg.psql(login_role_sql(ANCHOR_ROLE, ANCHOR_PASSWORD))
    pg.psql(f"GRANT CREATE, USAGE ON SCHEMA public TO {ANCHOR_ROLE}; "
            f"DROP TABLE IF EXISTS public.{TABLE}", db=APP_DB)
    return anchor_dsn(pg)


def start_anchored(pg: devcluster.Cluster, dsn: str, **audit: Any) -> ProxyProcess:
    return start_observed_proxy(pg, audit={"anchor": {"dsn": dsn, "interval": 0.3}, **audit})


def row(pg: devcluster.Cluster, ident: str) -> dict[str, Any] | None:
    with direct(pg) as c, c.cursor(row_factory=psycopg.rows.dict_row) as cur:
        try:
            return cur.execute(f"SELECT * FROM {TABLE} WHERE log_id = %s", (ident,)).fetchone()
        except psycopg.errors.UndefinedTable:
            return None


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def verify(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", "audit", "verify", *map(str, args)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )


def metric(p: ProxyProcess, name: str) -> float | None:
    try:
        text = scrape(p)
    except OSError:  # the metrics endpoint opens just after the listening port
        return None
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def wait_for(what: str, check: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_head_is_anchored_periodically_at_stop_and_in_metrics(
    pg: devcluster.Cluster, anchor_role: str,
) -> None:
    p = start_anchored(pg, anchor_role)
    try:
        log = p.dir / "audit.jsonl"
        ident = str(log.resolve())
        first = wait_for("the first anchor row", lambda: row(pg, ident))
        assert first["seq"] >= 1 and first["gaps"] == 0
        traffic(p)
        head = records(log)[-1]["seq"]
        assert head > first["seq"]
        # Published by the periodic task while the proxy runs (interval 0.3 s).
        moved = wait_for("a periodic anchor update",
                         lambda: (r := row(pg, ident)) and r["seq"] >= head and r)
        assert moved["updated_at"] > first["updated_at"]
        # Prometheus carries the head too, with the file as label and nothing else.
        text = scrape(p)
        assert 'strongroom_audit_head_sequence{file="audit.jsonl"}' in text, text
        assert metric(p, "strongroom_audit_head_sequence") == records(log)[-1]["seq"]
        assert metric(p, "strongroom_audit_anchor_mismatch") == 0
        assert anchor_role.split("@")[0].split(":")[-1] not in text  # no password
    finally:
        p.stop()
    last = records(log)[-1]
    assert last["event"] == "stop"
    final = row(pg, ident)
    assert final is not None and (final["seq"], final["mac"]) == (last["seq"], last["mac"])
    res = verify(log, "--key-file", p.dir / "audit.key", "--require-stop", "--anchor",
                 anchor_role)
    assert res.returncode == 0 and "matches the anchor" in res.stdout, res.stdout + res.stderr


def test_tail_cut_to_an_earlier_stop_fails_verify_anchor_and_the_next_start_alerts(
    pg: devcluster.Cluster, anchor_role: str,
) -> None:
    p = start_anchored(pg, anchor_role)
    p.stop()
    log = p.dir / "audit.jsonl"
    key = p.dir / "audit.key"
    earlier_stop = log.read_bytes()
    cut_at = records(log)[-1]["seq"]
    p.start()
    traffic(p)  # the records someone wants gone
    p.stop()
    anchored = records(log)[-1]["seq"]
    assert anchored > cut_at + 5
    log.write_bytes(earlier_stop)  # cut back to the earlier clean stop

    # The chain alone cannot tell: it is intact and ends with a clean stop.
    res = verify(log, "--key-file", key, "--require-stop")
    assert res.returncode == 0, res.stdout + res.stderr
    # The anchor can.
    res = verify(log, "--key-file", key, "--require-stop", "--anchor", anchor_role)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "behind its anchor" in res.stdout, res.stdout
    assert f"records {cut_at + 1}..{anchored} were cut" in res.stdout, res.stdout
    assert ANCHOR_PASSWORD not in res.stdout + res.stderr

    # The next start finds the file behind its anchor: logs, alerts, records the gap.
    p.start()
    try:
        assert wait_for("the mismatch metric",
                        lambda: metric(p, "strongroom_audit_anchor_mismatch") == 1)
        assert "audit file is behind its anchor" in p.log()
        gap = [r for r in records(log) if r["event"] == "anchor_gap"]
        assert len(gap) == 1 and gap[0]["anchored_seq"] == anchored, gap
        assert gap[0]["found_seq"] == cut_at
        stored = row(pg, str(log.resolve()))
        assert stored is not None and stored["gaps"] == 1 and "were cut" in stored["last_gap"]
    finally:
        p.stop()
    # The chain now records the gap: intact, but not provably complete (exit 3).
    res = verify(log, "--key-file", key, "--require-stop")
    assert res.returncode == 3 and "gap" in res.stdout, res.stdout + res.stderr


def test_replaced_chain_disagrees_with_the_anchor(
    pg: devcluster.Cluster, anchor_role: str, tmp_path: Path,
) -> None:
    """A fresh chain (file deleted, proxy restarted, as long as the old one) has another
    MAC at the anchored sequence: verify --anchor fails."""
    p = start_anchored(pg, anchor_role)
    traffic(p)
    p.stop()
    log = p.dir / "audit.jsonl"
    anchored = records(log)[-1]["seq"]
    from proxy.audit import AuditLog, read_key_file

    forged = tmp_path / "audit.jsonl"
    fake = AuditLog(forged, read_key_file(p.dir / "audit.key"))  # an insider with the key
    while fake.seq < anchored + 3:
        fake.connect(1, "app", "127.0.0.1:1")
    fake.close()
    res = verify(forged, "--key-file", p.dir / "audit.key", "--anchor", anchor_role,
                 "--anchor-id", str(log.resolve()))
    assert res.returncode == 1 and "different MAC" in res.stdout, res.stdout + res.stderr


def test_newest_file_alone_is_older_files_missing(pg: devcluster.Cluster) -> None:
    p = start_observed_proxy(pg, audit={"max_bytes": 2048, "keep": 50})
    try:
        traffic(p)
    finally:
        p.stop()
    key = p.dir / "audit.key"
    newest = p.dir / "audit.jsonl"
    rotated = sorted(p.dir.glob("audit.jsonl.*"))
    assert rotated, "the traffic should have rotated the 2 KiB audit file"
    res = verify(newest, "--key-file", key, "--require-stop")
    assert res.returncode == 3, res.stdout + res.stderr
    assert "older files missing" in res.stdout and "OK" not in res.stdout, res.stdout
    res = verify(newest, *rotated, "--key-file", key, "--require-stop")
    assert res.returncode == 0 and res.stdout.startswith("OK"), res.stdout + res.stderr


def test_audit_files_are_0600_in_a_0700_directory(pg: devcluster.Cluster) -> None:
    p = start_observed_proxy(pg, audit={"path": "audit/sub/audit.jsonl", "max_bytes": 2048})
    try:
        traffic(p)
    finally:
        p.stop()
    directory = p.dir / "audit" / "sub"
    for d in (p.dir / "audit", directory):
        assert d.stat().st_mode & 0o777 == 0o700, (d, oct(d.stat().st_mode))
    files = list(directory.iterdir())
    assert len(files) >= 2, files  # rotated at least once
    for f in files:
        assert f.stat().st_mode & 0o777 == 0o600, (f, oct(f.stat().st_mode))


def test_group_writable_audit_directory_is_refused(pg: devcluster.Cluster) -> None:
    p = start_observed_proxy(pg, audit={"path": "shared/audit.jsonl"})
    p.stop()
    (p.dir / "shared").chmod(0o770)
    with pytest.raises(RuntimeError, match="group- or world-writable"):
        p.start()
