"""Issue 4: `strongroom check-config` reports a protected column that does not exist or is
not bytea in the live database, as `file:line: message`, and keys that do not unwrap."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from keys.providers.local import init_kek_file
from proxy import devcluster
from tests.conftest import APP_DB, ROOT
from tests.integration.encryption_env import setup_sql, start_encrypted

SCHEMA = """
CREATE TABLE cl_cards (id int PRIMARY KEY, pan bytea, pan_bidx bytea, expiry bytea);
CREATE TABLE cl_plain (id int PRIMARY KEY, tax text, tax_bidx text, note bytea);
"""
GOOD = {
    "public.cl_cards.pan": {"type": "text", "search": "blind_index"},
    "public.cl_cards.expiry": {"type": "date"},
}
BAD = {
    **GOOD,
    "public.cl_plain.tax": {"type": "text", "search": "blind_index"},  # text, text sibling
    "public.cl_plain.note": {"type": "text", "search": "blind_index",
                             "bidx_column": "note_idx"},  # sibling missing
    "public.cl_cards.cvv": {"type": "text"},  # no such column
    "public.cl_gone.x": {"type": "int4"},  # no such table
}


def check(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", "check-config", str(config), *args],
        cwd=str(ROOT), capture_output=True, text=True, timeout=60,
    )


def line_of(config: Path, key: str) -> int:
    for n, text in enumerate(config.read_text().splitlines(), 1):
        if text.strip().startswith(f"{key}:"):
            return n
    raise AssertionError(key)


def test_live_check_reports_each_mismatch_with_its_line(pg: devcluster.Cluster) -> None:
    setup_sql(pg, SCHEMA)
    dsn = pg.dsn(db=APP_DB) + "?sslmode=disable"
    try:
        good = start_encrypted(pg, GOOD, start=False).config_path
        res = check(good, "--dsn", dsn)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "match the live database" in res.stdout
        res = check(good)  # without --live: says what it did not check
        assert res.returncode == 0 and "add --live" in res.stdout

        bad = start_encrypted(pg, BAD, start=False).config_path
        res = check(bad, "--dsn", dsn)
        assert res.returncode == 1, res.stdout + res.stderr
        got = res.stdout.splitlines()
        want = [
            (line_of(bad, "public.cl_plain.tax"),
             "protect.public.cl_plain.tax: the column public.cl_plain.tax is text, not bytea "
             "(convert it with `strongroom encrypt-column public.cl_plain.tax`)"),
            (line_of(bad, "public.cl_plain.tax"),
             "protect.public.cl_plain.tax: its blind-index column public.cl_plain.tax_bidx is "
             "text, not bytea"),
            (line_of(bad, "public.cl_plain.note"),
             "protect.public.cl_plain.note: its blind-index column public.cl_plain.note_idx "
             f"does not exist in database {APP_DB}"),
            (line_of(bad, "public.cl_cards.cvv"),
             "protect.public.cl_cards.cvv: the column public.cl_cards.cvv does not exist in "
             f"database {APP_DB}"),
            (line_of(bad, "public.cl_gone.x"),
             f"protect.public.cl_gone.x: table public.cl_gone does not exist in database "
             f"{APP_DB}"),
        ]
        assert sorted(got) == sorted(f"{bad}:{n}: {m}" for n, m in want)
        assert not any("cl_cards.pan" in line or "expiry" in line for line in got)
    finally:
        setup_sql(pg, "DROP TABLE cl_cards, cl_plain")


def test_keys_that_do_not_unwrap_and_unreachable_database(pg: devcluster.Cluster) -> None:
    p = start_encrypted(pg, GOOD, start=False)
    cfg = yaml.safe_load(p.config_path.read_text())
    # another KEK: the keyring was wrapped by the first one
    init_kek_file(p.dir / "other.kek")
    cfg["keys"]["path"] = "other.kek"
    p.config_path.write_text(yaml.safe_dump(cfg))
    res = check(p.config_path, "--live")
    assert res.returncode == 1
    assert res.stdout.startswith(f"{p.config_path}:{line_of(p.config_path, 'keys')}: keys: ")
    assert "cannot load the column keys" in res.stdout
    (p.dir / "dev.kek").rename(p.dir / "moved.kek")  # a missing KEK file: no traceback
    cfg["keys"]["path"] = "dev.kek"
    p.config_path.write_text(yaml.safe_dump(cfg))
    res = check(p.config_path, "--live")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "dev.kek does not exist" in res.stdout
    (p.dir / "moved.kek").rename(p.dir / "dev.kek")

    cfg["keys"]["path"] = "dev.kek"
    p.config_path.write_text(yaml.safe_dump(cfg))
    port = devcluster.free_port()  # nothing listens there
    res = check(p.config_path, "--dsn",
                f"postgresql://u:Pa55-secret@127.0.0.1:{port}/x?sslmode=disable")
    assert res.returncode == 1
    line = line_of(p.config_path, "upstream")
    assert res.stdout.startswith(f"{p.config_path}:{line}: upstream: cannot connect")
    assert "Pa55-secret" not in res.stdout + res.stderr
