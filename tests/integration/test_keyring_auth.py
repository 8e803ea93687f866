"""The keyring is authenticated (issue 17, section 4), against a real proxy and PostgreSQL.

Reported on the code before: editing `state: retired` -> `decrypt_only` in keyring.json,
or swapping the `active` and `retired` states, was accepted by the next start or SIGHUP
("configuration reloaded"), and new INSERTs were sealed under the old key; a keyring of
mode 0666 in a 0777 directory was accepted. Here every such edit (and a changed wrapped
key that nothing unwraps at start) is refused: at start with one line and exit status 1,
on reload with the running keys kept for open and new sessions, a log line and
`strongroom_keyring_auth_failures_total`; and `strongroom keys` refuses to work on it.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from keys import cli_ops
from tests.conftest import APP_DB, APP_PASSWORD, APP_USER, ROOT, ProxyProcess
from tests.integration.encryption_env import direct, keys_cli, setup_sql, start_encrypted
from tests.integration.observability_env import scrape, wait_metrics

PAN = "public.ka_cards.pan"
PROTECT = {PAN: {"type": "text", "search": "blind_index"}}
# The keyring in a directory of its own, so that its directory's mode is tested apart
# from the config file's (whose directory is checked already).
KEYS = {"provider": "local", "path": "dev.kek", "keyring": "ring/keyring.json"}


def _ring(p: ProxyProcess) -> Path:
    return p.dir / "ring" / "keyring.json"


def _ids(p: ProxyProcess, purpose: str = "encrypt") -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for k in cli_ops.show(_ring(p)):  # (read before any tampering)
        if k["column"] == PAN and k["purpose"] == purpose:
            out.setdefault(k["state"], []).append(k["id"])
    return out


def _cli(p: ProxyProcess, *args: str) -> str:
    res = keys_cli(p, *args)
    assert res.returncode == 0, (args, res.stderr)
    return res.stdout


def _rotate_keys(p: ProxyProcess) -> tuple[int, int]:
    """A second encrypt and blind-index key promoted, the first ones retired, with
    `strongroom keys` (the table is empty, so retire finds no use of the old keys).
    Returns (old, new) encrypt key ids."""
    old = _ids(p)["active"][0]
    old_bidx = _ids(p, "blind_index")["active"][0]
    dsn = ["--dsn", p.cluster.dsn(APP_USER, APP_PASSWORD, APP_DB)]
    for purpose, retired in (("encrypt", old), ("blind_index", old_bidx)):
        added = _cli(p, "add", "--column", PAN, "--purpose", purpose)
        new_id = re.search(r"added key (\d+)", added).group(1)  # type: ignore[union-attr]
        _cli(p, "promote", new_id)
        _cli(p, "retire", *dsn, str(retired))
    return old, _ids(p)["active"][0]


def _edit(path: Path, change: Any) -> None:
    """Edit the keyring JSON by hand, as an attacker with write access to the file would."""
    doc = json.loads(path.read_text())
    change({k["id"]: k for k in doc["keys"]})
    path.write_text(json.dumps(doc, indent=2))


def _unretire_by_hand(old: int) -> Any:
    def change(keys: dict[int, dict[str, Any]]) -> None:
        keys[old]["state"] = "decrypt_only"
    return change


def _swap_by_hand(old: int, new: int) -> Any:
    def change(keys: dict[int, dict[str, Any]]) -> None:
        keys[old]["state"], keys[new]["state"] = keys[new]["state"], keys[old]["state"]
    return change


def _flip_retired_bidx(keys: dict[int, dict[str, Any]]) -> None:
    """A changed wrapped key that nothing unwraps at start (a retired blind-index key):
    only a MAC over the whole keyring notices it."""
    (entry,) = [k for k in keys.values()
                if k["purpose"] == "blind_index" and k["state"] == "retired"]
    raw = bytearray(base64.b64decode(entry["wrapped"]))
    raw[-1] ^= 1
    entry["wrapped"] = base64.b64encode(bytes(raw)).decode()


def _serve(p: ProxyProcess) -> subprocess.CompletedProcess[str]:
    """`strongroom serve` expected to refuse: a proxy that starts instead is stopped
    after a while and counts as a failure (exit status None)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "serve", "--config", str(p.config_path)],
        cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=20)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        return subprocess.CompletedProcess(proc.args, -999, out, err)


def _key_of(stored: bytes) -> int:
    """The key id an envelope names (bytes 3..6 of its header)."""
    return int.from_bytes(stored[2:6], "big")


def _stored_key(p: ProxyProcess, row_id: int) -> int:
    with direct(p.cluster) as c:
        (v,) = c.execute("SELECT pan FROM ka_cards WHERE id = %s", (row_id,)).fetchone()
    return _key_of(bytes(v))


@pytest.fixture
def kproxy(pg: Any) -> Iterator[ProxyProcess]:
    """A proxy (not started) with a rotated keyring: old keys retired, new ones active."""
    setup_sql(pg, "DROP TABLE IF EXISTS ka_cards; "
                  "CREATE TABLE ka_cards (id int PRIMARY KEY, pan bytea, pan_bidx bytea)")
    p = start_encrypted(pg, PROTECT, {"keys": KEYS}, start=False)
    try:
        yield p
    finally:
        p.stop()
        setup_sql(pg, "DROP TABLE IF EXISTS ka_cards")


TAMPERS = {
    "retired_to_decrypt_only": lambda old, new: _unretire_by_hand(old),
    "active_and_retired_swapped": lambda old, new: _swap_by_hand(old, new),
    "retired_wrapped_key_changed": lambda old, new: _flip_retired_bidx,
}


@pytest.mark.parametrize("tamper", sorted(TAMPERS))
def test_start_refuses_a_tampered_keyring(kproxy: ProxyProcess, tamper: str) -> None:
    old, new = _rotate_keys(kproxy)
    _edit(_ring(kproxy), TAMPERS[tamper](old, new))
    res = _serve(kproxy)
    assert res.returncode == 1, (res.returncode, res.stderr[-2000:])
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "fails authentication" in lines[0], res.stderr
    # check-config --live says the same before a deploy (the keys are checked first)
    chk = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "check-config", "--live", str(kproxy.config_path)],
        cwd=str(ROOT), capture_output=True, text=True, timeout=60)
    assert chk.returncode == 1 and "fails authentication" in chk.stdout, chk.stdout


def test_keys_cli_refuses_a_tampered_keyring(kproxy: ProxyProcess) -> None:
    old, _ = _rotate_keys(kproxy)
    ring = _ring(kproxy)
    _edit(ring, _unretire_by_hand(old))
    before = ring.read_bytes()
    for args in (("show",), ("promote", str(old)), ("unretire", str(old)),
                 ("add", "--column", PAN)):
        res = keys_cli(kproxy, *args)
        assert res.returncode == 1 and "fails authentication" in res.stderr, (args, res)
    assert ring.read_bytes() == before  # nothing was re-MACed over the edit
    # what the file says is still visible, marked as unverified
    res = keys_cli(kproxy, "show", "--unverified")
    assert res.returncode == 0 and "NOT AUTHENTICATED" in res.stderr
    assert re.search(rf"{old}\s+{re.escape(PAN)}\s+encrypt\s+decrypt_only", res.stdout)


def _insert(conn: psycopg.Connection, row_id: int) -> None:
    conn.execute("INSERT INTO ka_cards (id, pan) VALUES (%s, %s)",
                 (row_id, f"41111111{row_id:08d}"))


def _reload_refused(p: ProxyProcess, marker: int) -> None:
    p.signal(signal.SIGHUP)
    deadline = time.monotonic() + 15
    while p.log().count("reload rejected") <= marker:
        assert time.monotonic() < deadline, p.log()[-3000:]
        time.sleep(0.05)


@pytest.mark.parametrize("tamper", ["retired_to_decrypt_only", "active_and_retired_swapped"])
def test_reload_refuses_a_tampered_keyring_and_keeps_the_running_keys(
    kproxy: ProxyProcess, tamper: str,
) -> None:
    from proxy import devcluster

    old, new = _rotate_keys(kproxy)
    kproxy.config["metrics"] = {"host": "127.0.0.1", "port": devcluster.free_port()}
    kproxy.start()
    wait_metrics(kproxy)
    with psycopg.connect(kproxy.conninfo(), autocommit=True) as open_session:
        _insert(open_session, 1)
        assert _stored_key(kproxy, 1) == new
        _edit(_ring(kproxy), TAMPERS[tamper](old, new))
        _reload_refused(kproxy, kproxy.log().count("reload rejected"))
        assert "configuration reloaded" not in kproxy.log()
        assert "fails authentication" in kproxy.log()
        # the open session and a new one still write under the authentic primary
        _insert(open_session, 2)
        with psycopg.connect(kproxy.conninfo(), autocommit=True) as fresh:
            _insert(fresh, 3)
            got = fresh.execute("SELECT id, pan FROM ka_cards ORDER BY id").fetchall()
        assert [r[0] for r in got] == [1, 2, 3]
        assert [r[1] for r in got] == [f"41111111{i:08d}" for i in (1, 2, 3)]
    assert [_stored_key(kproxy, i) for i in (1, 2, 3)] == [new, new, new]
    text = scrape(kproxy)
    assert re.search(r"^strongroom_keyring_auth_failures_total 1\.0$", text, re.M), text
    assert re.search(r'^strongroom_config_reloads_total\{result="failed"\} 1\.0$', text, re.M)
    assert kproxy.alive()


@pytest.mark.parametrize("target", ["file", "directory"])
def test_group_or_world_writable_keyring_is_refused(kproxy: ProxyProcess, target: str) -> None:
    ring = _ring(kproxy)
    path, mode = (ring, 0o666) if target == "file" else (ring.parent, 0o777)
    os.chmod(path, mode)
    try:
        res = _serve(kproxy)
        assert res.returncode == 1, (res.returncode, res.stderr[-2000:])
        assert "group- or world-writable" in res.stderr and str(path) in res.stderr
        res = keys_cli(kproxy, "show")
        assert res.returncode == 1 and "group- or world-writable" in res.stderr, res.stderr
        for live in (["--live"], []):  # the mode needs no KEK: said without --live too
            chk = subprocess.run(
                [sys.executable, "-m", "proxy.cli", "check-config", *live,
                 str(kproxy.config_path)], cwd=str(ROOT), capture_output=True, text=True,
                timeout=60)
            assert chk.returncode == 1 and "group- or world-writable" in chk.stdout, chk.stdout
            assert "keys.keyring" in chk.stdout or live, chk.stdout
    finally:
        os.chmod(path, 0o600 if target == "file" else 0o700)


def test_reload_refuses_a_keyring_made_world_writable(kproxy: ProxyProcess) -> None:
    kproxy.start()
    ring = _ring(kproxy)
    os.chmod(ring, 0o666)
    try:
        _reload_refused(kproxy, 0)
        assert "group- or world-writable" in kproxy.log()
        with psycopg.connect(kproxy.conninfo(), autocommit=True) as c:
            _insert(c, 1)
            assert c.execute("SELECT pan FROM ka_cards").fetchone() == ("4111111100000001",)
    finally:
        os.chmod(ring, 0o600)
