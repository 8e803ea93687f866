"""`strongroom keys retire` cannot lose data (issue 12, "Data loss").

The reported sequence was: `keys add --column public.cards.expiry` -> `keys promote NEW`
-> `keys retire OLD` -> SIGHUP -> `SELECT * FROM cards` answered XX001, `promote`
refused the retired key and `rotate` failed; only editing keyring.json by hand got the
data back. Here, against a real proxy and a real PostgreSQL:

* retire is refused (exit 1, one line, the counts per column) while a stored envelope
  names the key, and while a blind index was computed under it; there is no --force;
* after `keys rotate` the same retire goes through;
* a retired key still decrypts: an envelope under it put back directly into the table
  (a restored backup) reads through the reloaded proxy, and `keys rotate` moves it;
* `keys unretire` brings a key retired by mistake back to decrypt-only.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from keys import cli_ops
from tests.conftest import APP_DB, APP_PASSWORD, APP_USER
from tests.integration.encryption_env import direct, keys_cli, setup_sql, start_encrypted

PROTECT = {
    "public.kr_cards.pan": {"type": "text", "search": "blind_index"},
    "public.kr_cards.expiry": {"type": "date"},
}
ROWS = [(1, "4111111111111111", "2030-01-31"), (2, "5500000000000004", "2031-02-28"),
        (3, "6011000000000004", "2032-03-31")]
EXPIRY = "public.kr_cards.expiry"
PAN = "public.kr_cards.pan"


@pytest.fixture(scope="module")
def rproxy(pg: Any) -> Any:
    setup_sql(pg, "CREATE TABLE kr_cards (id int PRIMARY KEY, pan bytea, pan_bidx bytea, "
                  "expiry bytea)")
    p = start_encrypted(pg, PROTECT)
    try:
        with psycopg.connect(p.conninfo(), autocommit=True) as c:
            for row in ROWS:
                c.execute("INSERT INTO kr_cards (id, pan, expiry) VALUES (%s, %s, %s)", row)
        yield p
    finally:
        p.stop()
        setup_sql(pg, "DROP TABLE kr_cards")


def _dsn(p: Any) -> list[str]:
    return ["--dsn", p.cluster.dsn(APP_USER, APP_PASSWORD, APP_DB)]


def _keys(p: Any, column: str, purpose: str = "encrypt") -> dict[str, int]:
    return {k["state"]: k["id"] for k in cli_ops.show(p.dir / "keyring.json")
            if k["column"] == column and k["purpose"] == purpose and k["state"] != "retired"}


def _state(p: Any, key_id: int) -> str:
    return next(k["state"] for k in cli_ops.show(p.dir / "keyring.json") if k["id"] == key_id)


def _read(p: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(p.conninfo(), autocommit=True) as c:
        return [(i, pan, str(exp)) for i, pan, exp in
                c.execute("SELECT id, pan, expiry FROM kr_cards ORDER BY id").fetchall()]


def _one_line_error(res: Any) -> str:
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr + res.stdout
    lines = [x for x in res.stderr.strip().splitlines() if " strongroom.progress: " not in x]
    assert len(lines) == 1, res.stderr
    return lines[0]


def test_retire_is_refused_while_values_use_the_key_then_allowed_after_rotate(
        rproxy: Any) -> None:
    p = rproxy
    old = _keys(p, EXPIRY)["active"]
    res = keys_cli(p, "add", "--column", EXPIRY)
    assert res.returncode == 0, res.stderr
    new = _keys(p, EXPIRY)["decrypt_only"]
    p.reload()
    assert keys_cli(p, "promote", str(new)).returncode == 0
    p.reload()
    with psycopg.connect(p.conninfo(), autocommit=True) as c:  # one value under the new key
        c.execute("UPDATE kr_cards SET expiry = %s WHERE id = 1", (ROWS[0][2],))

    line = _one_line_error(keys_cli(p, "retire", str(old), *_dsn(p)))
    assert f"{EXPIRY}: 2 values" in line and "keys rotate" in line, line
    assert _state(p, old) == "decrypt_only"  # nothing changed
    res = keys_cli(p, "retire", "--force", str(old), *_dsn(p))
    assert res.returncode == 2 and "Traceback" not in res.stderr  # there is no --force
    p.reload()
    assert _read(p) == [(i, pan, exp) for i, pan, exp in ROWS]

    res = keys_cli(p, "rotate", "--column", EXPIRY, *_dsn(p))
    assert res.returncode == 0, res.stderr
    res = keys_cli(p, "retire", str(old), *_dsn(p))
    assert res.returncode == 0, res.stderr
    assert f"{EXPIRY}: 0 values" in res.stdout, res.stdout
    assert _state(p, old) == "retired"
    p.reload()
    assert _read(p) == [(i, pan, exp) for i, pan, exp in ROWS]


def test_a_retired_key_still_decrypts_a_restored_value_and_unretire(rproxy: Any) -> None:
    """A backup taken before the rotation is restored: its envelopes name a key that is
    retired by now. They must read, and `keys rotate` must move them to the primary."""
    p = rproxy
    with direct(p.cluster) as d:
        (backup,) = d.execute("SELECT expiry FROM kr_cards WHERE id = 2").fetchone()
    old = _keys(p, EXPIRY)["active"]
    assert keys_cli(p, "add", "--column", EXPIRY).returncode == 0
    new = _keys(p, EXPIRY)["decrypt_only"]
    assert keys_cli(p, "promote", str(new)).returncode == 0
    p.reload()
    assert keys_cli(p, "rotate", "--column", EXPIRY, *_dsn(p)).returncode == 0
    res = keys_cli(p, "retire", str(old), *_dsn(p))
    assert res.returncode == 0, res.stderr
    p.reload()

    with direct(p.cluster) as d:  # the restore
        d.execute("UPDATE kr_cards SET expiry = %s WHERE id = 2", (backup,))
        assert bytes(backup)[2:6] == old.to_bytes(4, "big")
    assert _read(p) == [(i, pan, exp) for i, pan, exp in ROWS]

    # a retired key cannot be retired again, nor promoted; unretire brings it back
    line = _one_line_error(keys_cli(p, "retire", str(old), *_dsn(p)))
    assert "already retired" in line
    line = _one_line_error(keys_cli(p, "promote", str(old)))
    assert "unretire" in line
    res = keys_cli(p, "unretire", str(old))
    assert res.returncode == 0, res.stderr
    assert _state(p, old) == "decrypt_only"
    line = _one_line_error(keys_cli(p, "unretire", str(old)))
    assert "not retired" in line
    line = _one_line_error(keys_cli(p, "retire", str(old), *_dsn(p)))
    assert f"{EXPIRY}: 1 value;" in line

    assert keys_cli(p, "rotate", "--column", EXPIRY, *_dsn(p)).returncode == 0
    with direct(p.cluster) as d:
        (now,) = d.execute("SELECT expiry FROM kr_cards WHERE id = 2").fetchone()
    assert bytes(now)[2:6] == new.to_bytes(4, "big")
    assert keys_cli(p, "retire", str(old), *_dsn(p)).returncode == 0
    assert _read(p) == [(i, pan, exp) for i, pan, exp in ROWS]


def test_retire_of_a_blind_index_key_waits_for_the_reindex(rproxy: Any) -> None:
    """A blind index carries no key id: use is observed by recomputing each row's index
    under the key to be retired (from the decrypted value) and comparing."""
    p = rproxy
    old = _keys(p, PAN, "blind_index")["active"]
    assert keys_cli(p, "add", "--column", PAN, "--purpose", "blind_index").returncode == 0
    new = _keys(p, PAN, "blind_index")["decrypt_only"]
    p.reload()
    assert keys_cli(p, "promote", str(new)).returncode == 0
    p.reload()
    line = _one_line_error(keys_cli(p, "retire", str(old), *_dsn(p)))
    assert f"{PAN}: 3 blind indexes" in line, line
    assert _state(p, old) == "decrypt_only"

    res = keys_cli(p, "rotate", "--column", PAN, *_dsn(p))  # reindexes: two live bidx keys
    assert res.returncode == 0, res.stderr
    res = keys_cli(p, "retire", str(old), *_dsn(p))
    assert res.returncode == 0, res.stderr
    p.reload()
    with psycopg.connect(p.conninfo(), autocommit=True) as c:
        assert c.execute("SELECT id FROM kr_cards WHERE pan = %s",
                         (ROWS[2][1],)).fetchall() == [(3,)]


def test_retire_of_a_blind_index_key_during_an_unfinished_encrypt_column(pg: Any) -> None:
    """Found by the second red-team pass: `encrypt-column` writes blind indexes while the
    column is still plaintext; the usage count skipped such a table, so the key could be
    retired and lookups silently missed the rows indexed under it."""
    setup_sql(pg, "CREATE TABLE kr_half (id int PRIMARY KEY, pan text, pan_bidx bytea)")
    p = start_encrypted(pg, {"public.kr_half.pan": {"type": "text", "search": "blind_index"}},
                        start=False)
    try:
        setup_sql(pg, "INSERT INTO kr_half VALUES (1, '4111000011110000', '\\x0102')")
        column = "public.kr_half.pan"
        old = _keys(p, column, "blind_index")["active"]
        assert keys_cli(p, "add", "--column", column, "--purpose", "blind_index").returncode == 0
        new = _keys(p, column, "blind_index")["decrypt_only"]
        assert keys_cli(p, "promote", str(new)).returncode == 0
        res = keys_cli(p, "retire", str(old), *_dsn(p))
        assert res.returncode == 1, res.stdout
        assert column in _one_line_error(res)
        assert _state(p, old) == "decrypt_only"
    finally:
        setup_sql(pg, "DROP TABLE kr_half")
