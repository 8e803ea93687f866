"""Ciphertext is bound to the database it was written in (issue 17, section 5).

Two databases of one server behind one proxy, with the same table and column names: an
envelope copied from one into the other (a backup or ETL dump loaded into a scratch
database, or someone with write access there) must not open through the proxy in the
second, or the proxy would read it past the first database's grants and RLS. Envelopes
written before the binding (version 1) still read where they are, are refused once
`keys.database_binding.require` is set, and `keys rotate` upgrades them; the offline
tools bind to the database they connect to.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import psycopg
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keys import keyring as kr
from keys.providers.local import LocalKekProvider
from proxy.crypto.envelope import HEADER, NONCE_LEN, Algorithm, associated_data
from proxy.crypto.kdf import LABEL_GCM, derive
from tests.conftest import APP_DB, APP_PASSWORD, APP_USER, ROOT, ProxyProcess
from tests.integration.encryption_env import direct, start_encrypted

OTHER_DB = "dbb_scratch"
PAN = "public.dbb_cards.pan"
PROTECT = {
    PAN: {"type": "text"},
    "public.dbb_cards.email": {"type": "text", "mode": "deterministic"},
}
SCHEMA = "CREATE TABLE dbb_cards (id int PRIMARY KEY, pan bytea, email bytea, note text);"
CARD, EMAIL = "4111111111111111", "ann@example.com"


@pytest.fixture(scope="module")
def dbs(pg: Any) -> Iterator[Any]:
    """The app database and a second one, each with an empty dbb_cards."""
    pg.psql(f"CREATE DATABASE {OTHER_DB} OWNER {APP_USER}")
    try:
        for db in (APP_DB, OTHER_DB):
            pg.psql("SET ROLE app;\n" + SCHEMA, db=db)
        yield pg
    finally:
        pg.psql("DROP TABLE IF EXISTS dbb_cards", db=APP_DB)
        pg.psql(f"DROP DATABASE IF EXISTS {OTHER_DB} WITH (FORCE)")


@pytest.fixture()
def clean(dbs: Any) -> Any:
    for db in (APP_DB, OTHER_DB):
        with direct(dbs, db) as c:
            c.execute("TRUNCATE dbb_cards")
    return dbs


def _proxy(pg: Any, binding: dict[str, Any] | None = None,
           like: ProxyProcess | None = None) -> ProxyProcess:
    """A proxy for PROTECT; `like`: with the keys of that one (a restart with other
    settings), else fresh keys."""
    extra = {"keys": {"database_binding": binding}} if binding is not None else None
    if like is None:
        return start_encrypted(pg, PROTECT, extra)
    p = ProxyProcess(pg, {**like.config, **(extra or {})})
    p.config["keys"] = {**like.config["keys"], **({"database_binding": binding}
                                                     if binding is not None else {})}
    for name in ("dev.kek", "keyring.json"):
        (p.dir / name).write_bytes((like.dir / name).read_bytes())
        os.chmod(p.dir / name, 0o600)
    return p.start()


def _copy_row(pg: Any, row_id: int, src: str = APP_DB, dst: str = OTHER_DB) -> None:
    """The stored bytes of one row, copied as they are into the other database."""
    with direct(pg, src) as a:
        row = a.execute("SELECT id, pan, email, note FROM dbb_cards WHERE id = %s",
                        (row_id,)).fetchone()
    with direct(pg, dst) as b:
        b.execute("INSERT INTO dbb_cards VALUES (%s, %s, %s, %s)", row)


def _read(p: ProxyProcess, db: str, sql: str, params: tuple[Any, ...] = ()) -> Any:
    with psycopg.connect(p.conninfo(db=db), autocommit=True) as c:
        return c.execute(sql, params).fetchall()


def _refused(p: ProxyProcess, db: str, sql: str) -> str:
    with pytest.raises(psycopg.Error) as info:
        _read(p, db, sql)
    return str(info.value.sqlstate)


def _v1_envelope(p: ProxyProcess, plain: bytes) -> bytes:
    """A `pan` envelope as the proxy wrote it before database binding (version 1): the
    column's live key from the keyring, sealed with the old associated data."""
    kek = LocalKekProvider(p.dir / "dev.kek")
    keys = kr.load(p.dir / "keyring.json", kek).column_keys(PAN, "encrypt", kek)
    header = HEADER.pack(1, Algorithm.AES_256_GCM, keys.primary_id)
    aead = AESGCM(derive(keys.material(keys.primary_id), LABEL_GCM, PAN, 32))
    nonce = os.urandom(NONCE_LEN)
    return header + nonce + aead.encrypt(nonce, plain, associated_data(header, PAN, "text"))


def _cli(p: ProxyProcess, db: str, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "proxy.cli", *args, "--config", str(p.config_path),
           "--dsn", p.cluster.dsn(APP_USER, APP_PASSWORD, db)]
    return subprocess.run(cmd, cwd=str(ROOT), capture_output=True, text=True, timeout=120)


def test_envelope_copied_into_another_database_does_not_open_there(clean: Any) -> None:
    p = _proxy(clean)
    try:
        with psycopg.connect(p.conninfo(), autocommit=True) as c:
            c.execute("INSERT INTO dbb_cards VALUES (1, %s, %s, 'n')", (CARD, EMAIL))
        _copy_row(clean, 1)
        # Where it was written: plaintext, and the deterministic lookup finds it.
        assert _read(p, APP_DB, "SELECT pan, email FROM dbb_cards") == [(CARD, EMAIL)]
        assert _read(p, APP_DB, "SELECT id FROM dbb_cards WHERE email = %s", (EMAIL,)) == [(1,)]
        # Copied: each protected column fails authentication, never plaintext.
        assert _refused(p, OTHER_DB, "SELECT pan FROM dbb_cards") == "XX001"
        assert _refused(p, OTHER_DB, "SELECT email FROM dbb_cards") == "XX001"
        # ... also after the source database warmed the decrypt cache with those bytes
        assert _read(p, APP_DB, "SELECT pan FROM dbb_cards") == [(CARD,)]
        assert _refused(p, OTHER_DB, "SELECT pan FROM dbb_cards") == "XX001"
        # and a deterministic lookup of the value finds nothing there (no oracle).
        assert _read(p, OTHER_DB, "SELECT id FROM dbb_cards WHERE email = %s", (EMAIL,)) == []
        # What the proxy writes in the second database opens there.
        with psycopg.connect(p.conninfo(db=OTHER_DB), autocommit=True) as c:
            c.execute("INSERT INTO dbb_cards VALUES (2, %s, %s, 'n')", (CARD, EMAIL))
        assert _read(p, OTHER_DB, "SELECT pan, email FROM dbb_cards WHERE id = 2") == [
            (CARD, EMAIL)]
        assert CARD not in p.log()
    finally:
        p.stop()


def test_bind_as_lets_a_deliberate_restore_read(clean: Any) -> None:
    """`bind_as: {scratch: app}`: a copy restored on purpose reads (and writes) as app."""
    p = _proxy(clean)
    try:
        with psycopg.connect(p.conninfo(), autocommit=True) as c:
            c.execute("INSERT INTO dbb_cards VALUES (1, %s, %s, 'n')", (CARD, EMAIL))
        _copy_row(clean, 1)
    finally:
        p.stop()
    restored = _proxy(clean, {"bind_as": {OTHER_DB: APP_DB}}, like=p)
    try:
        assert _read(restored, OTHER_DB, "SELECT pan, email FROM dbb_cards") == [(CARD, EMAIL)]
        assert _read(restored, APP_DB, "SELECT pan, email FROM dbb_cards") == [(CARD, EMAIL)]
    finally:
        restored.stop()


def test_unbound_envelope_reads_until_required_and_rotation_binds_it(clean: Any) -> None:
    p = _proxy(clean)
    try:
        old = _v1_envelope(p, CARD.encode())
        with direct(clean) as c:
            c.execute("INSERT INTO dbb_cards (id, pan) VALUES (1, %s)", (old,))
        # Written before the binding: still reads where it is, counted in the log.
        assert _read(p, APP_DB, "SELECT pan FROM dbb_cards") == [(CARD,)]
        p.stop()
        assert "written before database binding" in p.log()
    finally:
        p.stop()
    strict = _proxy(clean, {"require": True}, like=p)
    try:
        assert _refused(strict, APP_DB, "SELECT pan FROM dbb_cards") == "XX001"
        # The rotation rewrites it bound to the database it connects to.
        res = _cli(strict, APP_DB, "keys", "rotate", "--column", PAN)
        assert res.returncode == 0, res.stderr
        assert "rewrote 1" in res.stdout, res.stdout
        with direct(clean) as c:
            (stored,) = c.execute("SELECT pan FROM dbb_cards WHERE id = 1").fetchone()
        assert bytes(stored)[0] == 2 and bytes(stored)[2:6] == old[2:6]
        assert _read(strict, APP_DB, "SELECT pan FROM dbb_cards") == [(CARD,)]
        # A second run finds nothing left to do.
        again = _cli(strict, APP_DB, "keys", "rotate", "--column", PAN)
        assert again.returncode == 0 and "rewrote 0" in again.stdout, again.stdout
        _copy_row(clean, 1)
        assert _refused(strict, OTHER_DB, "SELECT pan FROM dbb_cards") == "XX001"
    finally:
        strict.stop()


def test_encrypt_column_binds_the_database_it_connects_to(clean: Any) -> None:
    """The offline tool writes envelopes the proxy opens in that database only."""
    p = _proxy(clean)
    table = "dbb_plain"
    try:
        with direct(clean, OTHER_DB) as c:
            c.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, pan text)")
            c.execute(f"ALTER TABLE {table} OWNER TO {APP_USER}")
            c.execute(f"INSERT INTO {table} VALUES (1, %s)", (CARD,))
        with direct(clean) as c:
            c.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, pan bytea)")
            c.execute(f"ALTER TABLE {table} OWNER TO {APP_USER}")
        p.stop()
        cfg = dict(p.config)
        cfg["protect"] = {**PROTECT, f"public.{table}.pan": {"type": "text"}}
        p.config = cfg
        p.write_config()
        res = subprocess.run(
            [sys.executable, "-m", "proxy.cli", "keys", "init", "-c", str(p.config_path)],
            cwd=str(ROOT), capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        res = _cli(p, OTHER_DB, "encrypt-column", f"public.{table}.pan")
        assert res.returncode == 0, res.stderr
        p.start()
        assert _read(p, OTHER_DB, f"SELECT pan FROM {table}") == [(CARD,)]
        with direct(clean, OTHER_DB) as b:
            (stored,) = b.execute(f"SELECT pan FROM {table}").fetchone()
        assert bytes(stored)[0] == 2
        with direct(clean) as a:
            a.execute(f"INSERT INTO {table} VALUES (1, %s)", (stored,))
        assert _refused(p, APP_DB, f"SELECT pan FROM {table}") == "XX001"
    finally:
        p.stop()
        for db in (APP_DB, OTHER_DB):
            with direct(clean, db) as c:
                c.execute(f"DROP TABLE IF EXISTS {table}")


def test_a_database_whose_name_reads_as_another_ones_does_not_share_its_binding(
        clean: Any) -> None:
    """Two databases, one name as the server reports it: a LATIN1 database whose raw
    name bytes are the UTF-8 of `dbb_é` reports its name, converted, as `dbb_Ã©`, the
    name of a UTF8 database. Someone who can create (or write into) the first must not
    read the second's copied envelopes there: the binding is to the name's stored bytes,
    and a name whose bytes are not its reported UTF-8 is refused rather than guessed."""
    victim, twin = "dbb_\u00c3\u00a9", "dbb_\u00e9"
    clean.psql(f'CREATE DATABASE "{victim}" OWNER {APP_USER}')
    clean.psql(f'CREATE DATABASE "{twin}" OWNER {APP_USER} ENCODING LATIN1 '
               "LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
    p = _proxy(clean)
    try:
        for db in (victim, twin):
            with direct(clean, db) as c:
                c.execute(f"SET ROLE {APP_USER}; " + SCHEMA)
        with direct(clean, twin) as c:  # the server reports the twin's name as victim's
            assert c.execute("SELECT current_database()").fetchone() == (victim,)
        with psycopg.connect(p.conninfo(db=victim), autocommit=True) as c:
            c.execute("INSERT INTO dbb_cards VALUES (1, %s, %s, 'n')", (CARD, EMAIL))
        _copy_row(clean, 1, victim, twin)
        assert _read(p, victim, "SELECT pan, email FROM dbb_cards") == [(CARD, EMAIL)]
        twin_info = p.conninfo(db=twin) + " client_encoding=UTF8"
        with pytest.raises(psycopg.Error) as info, psycopg.connect(twin_info) as c:
            c.execute("SELECT pan, email FROM dbb_cards").fetchall()
        assert "could not prepare the session" in str(info.value), info.value
        assert CARD not in str(info.value)
        with pytest.raises(psycopg.Error), psycopg.connect(twin_info) as c:
            c.execute("SELECT id FROM dbb_cards WHERE email = %s", (EMAIL,)).fetchall()
        assert "non-ASCII name in a LATIN1 database" in p.log()
        # The offline tools refuse to bind to it as well (rotation would rewrite the
        # copied rows there as the twin's own).
        res = _cli(p, quote(twin), "keys", "rotate", "--column", PAN)
        assert res.returncode == 1, res.stdout + res.stderr
        assert "non-ASCII name in a LATIN1 database" in res.stderr, res.stderr
    finally:
        p.stop()
        for db in (victim, twin):
            clean.psql(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
