"""pgjdbc through the proxy: a JVM app sees PostgreSQL, protected columns in plaintext.

The Java side is tests/jdbc/JdbcProbe.java, run with the JDK's source launcher against
Debian's pgjdbc jar (scripts/setup.sh installs both with the test tools). It prints one
`name=value` line per check; this test asserts each, and reads the table directly to
check that what pgjdbc wrote is ciphertext.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.conftest import APP_DB, APP_PASSWORD, APP_USER, ROOT
from tests.integration.encryption_env import direct, leaks, setup_sql, start_encrypted

PROTECT = {
    "public.j_cards.pan": {"type": "text", "mode": "randomized", "search": "blind_index"},
    "public.j_cards.balance": {"type": "numeric"},
    "public.j_cards.expiry": {"type": "date"},
}
SCHEMA = """
CREATE TABLE j_cards (id int PRIMARY KEY, pan bytea, pan_bidx bytea, balance bytea,
                      expiry bytea, note text);
"""
JAR = Path("/usr/share/java/postgresql.jar")


def _run_probe(port: int) -> dict[str, str]:
    java = shutil.which("java")
    assert java is not None and JAR.exists(), "run scripts/setup.sh with the test tools"
    res = subprocess.run(
        [java, "-cp", str(JAR), str(ROOT / "tests" / "jdbc" / "JdbcProbe.java"),
         f"jdbc:postgresql://127.0.0.1:{port}/{APP_DB}", APP_USER, APP_PASSWORD],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    return dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)


def test_pgjdbc_through_the_proxy(pg) -> None:
    setup_sql(pg, SCHEMA)
    p = start_encrypted(pg, PROTECT)
    try:
        got = _run_probe(p.port)
        assert got["application_name"] == "jdbc-probe"
        assert got["backend_pid_positive"] == "true"
        assert got["batch_inserted"] == "8" and got["null_row_inserted"] == "1"
        # rounds 0..5 look up rows 2, 3, 4, 2, 3, 4 (named statement from round 3 on)
        want = [f"{i}|41110000000000{i:02d}|{i}00.0{i}|2031-0{i % 9 + 1}-15"
                for i in (2, 3, 4, 2, 3, 4)]
        assert got["lookups"] == ",".join(want)
        assert got["types"] == "text,numeric,date"
        assert got["row1"] == "4111000000000001|100.01|2031-02-15"
        assert got["nulls"] == "true,true,true"
        assert got["fetched"] == " ".join(f"{i}:{i:02d}" for i in range(1, 9))
        assert got["after_rollback"] == "none" and got["rolled_back_rows"] == "0"
        assert got["syntax_error"] == "42601" and got["in_failed_txn"] == "25P02"
        assert got["duplicate_key"] == "23505"
        assert got["range_refused"] == "0A000" and got["still_serving"] == "42"
        assert got["timeout"] == "57014" and got["cancelled_fast"] == "true"
        assert got["generated"] == "10|4111000000000010"
        assert got["done"] == "true"
        with direct(pg) as d:
            stored = d.execute("SELECT pan, pan_bidx, balance, expiry FROM j_cards").fetchall()
        cells = [bytes(v) for row in stored for v in row if v is not None]
        # rows 1-8: pan, its index, balance, expiry; row 9: all NULL; row 10: pan + index
        assert len(stored) == 10 and len(cells) == 4 * 8 + 2
        secrets = [f"41110000000000{i:02d}" for i in range(1, 11)] + ["2031-02-15"]
        assert leaks(cells, secrets) == []
    finally:
        p.stop()
        setup_sql(pg, "DROP TABLE j_cards")
