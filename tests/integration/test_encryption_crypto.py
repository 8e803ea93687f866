"""Issue 4, point 5 (crypto design, keys CLI) and column views through policy roles.

Ciphertexts are moved and tampered with *directly* in PostgreSQL (superuser), then read
through the proxy: each must fail with XX001 (data_corrupted, see proxy/encryption.py),
never come back as garbage or ciphertext, and the session must stay usable.
"""

from __future__ import annotations

import asyncio
import base64
import json

import asyncpg
import psycopg
import pytest

from keys.providers.local import init_kek_file
from tests.integration.encryption_env import direct, keys_cli, setup_sql, start_encrypted

PROTECT = {
    "public.k_cards.pan": {"type": "text", "search": "blind_index", "mask": "last4"},
    "public.k_cards.expiry": {"type": "date"},
    "public.k_cards.cvv": {"type": "text"},
    "public.k_other.secret": {"type": "text"},
}
SCHEMA = """
CREATE TABLE k_cards (id int PRIMARY KEY, pan bytea, pan_bidx bytea, expiry bytea, cvv bytea);
CREATE TABLE k_other (id int PRIMARY KEY, secret bytea);
"""
ROLES = {"k_plain": "plaintext", "k_masked": "masked", "k_cipher": "ciphertext",
         "k_deny": "deny"}
POLICY = {
    "roles": {
        "app": {"tables": {"public.*": ["select", "insert", "update", "delete"]},
                "allow": ["ddl"]},
        **{role: {"tables": {"public.k_cards": ["select"]},
                  "columns": {"public.k_cards.pan": view}} for role, view in ROLES.items()},
    },
    "default": "deny",
}


@pytest.fixture(scope="module")
def kproxy(pg):
    setup_sql(pg, SCHEMA)
    for role in ROLES:
        pg.psql(f"DROP ROLE IF EXISTS {role}; CREATE ROLE {role} LOGIN PASSWORD '{role}-pw'")
    pg.psql("GRANT SELECT ON k_cards TO " + ", ".join(ROLES), db="app")
    p = start_encrypted(pg, PROTECT, POLICY)
    with psycopg.connect(p.conninfo(), autocommit=True) as c:
        for i in range(1, 6):
            c.execute("INSERT INTO k_cards (id, pan, expiry, cvv) VALUES (%s, %s, %s, %s)",
                      (i, f"41110000000011{i:02d}", "2030-01-31", f"{i:03d}"))
        c.execute("INSERT INTO k_other (id, secret) VALUES (1, 'other secret')")
    yield p
    p.stop()
    setup_sql(pg, "DROP TABLE k_cards, k_other")


def _expect_xx001(conn: psycopg.Connection, sql: str) -> None:
    with pytest.raises(psycopg.Error) as info:
        conn.execute(sql).fetchall()
    assert info.value.diag.sqlstate == "XX001", info.value
    assert "failed authentication" in info.value.diag.message_primary


def test_moved_and_tampered_ciphertexts_fail_xx001(pg, kproxy) -> None:
    with direct(pg) as d:
        # another column of the same type and table
        d.execute("UPDATE k_cards SET cvv = (SELECT pan FROM k_cards WHERE id = 1) WHERE id = 1")
        # another table
        d.execute("UPDATE k_other SET secret = (SELECT pan FROM k_cards WHERE id = 2)")
        # another row type (a text ciphertext into a date column)
        d.execute("UPDATE k_cards SET expiry = cvv WHERE id = 3")
        # one flipped bit in the ciphertext body, and one in the header's key id
        d.execute("UPDATE k_cards SET pan = set_byte(pan, 25, get_byte(pan, 25) # 1) "
                  "WHERE id = 4")
        d.execute("UPDATE k_cards SET pan = set_byte(pan, 5, get_byte(pan, 5) # 1) "
                  "WHERE id = 5")
    cases = ["SELECT cvv FROM k_cards WHERE id = 1", "SELECT secret FROM k_other",
             "SELECT expiry FROM k_cards WHERE id = 3", "SELECT pan FROM k_cards WHERE id = 4",
             "SELECT id, pan FROM k_cards WHERE id = 5"]
    with psycopg.connect(kproxy.conninfo(), autocommit=True) as c:
        for sql in cases:
            _expect_xx001(c, sql)
            assert c.execute("SELECT pan FROM k_cards WHERE id = 2").fetchone() == \
                ("4111000000001102",)
            with c.cursor(binary=True) as cur:
                with pytest.raises(psycopg.Error) as info:
                    cur.execute(sql).fetchall()
                assert info.value.diag.sqlstate == "XX001"
    # In a transaction block the failure aborts the transaction, as an error raised by
    # PostgreSQL would: later statements get 25P02, COMMIT rolls back (the row written
    # before the failure is gone), and the session is reusable after it.
    failed = psycopg.pq.TransactionStatus.INERROR
    with psycopg.connect(kproxy.conninfo()) as c:
        for n, sql in enumerate(cases[3:]):  # extended protocol
            c.execute("INSERT INTO k_other (id, secret) VALUES (%s, 'written before')",
                      (10 + n,))
            _expect_xx001(c, sql)
            assert c.info.transaction_status == failed
            with pytest.raises(psycopg.errors.InFailedSqlTransaction):
                c.execute("SELECT 1")
            assert c.pgconn.exec_(b"COMMIT").command_status == b"ROLLBACK"
            assert c.execute("SELECT pan FROM k_cards WHERE id = 1").fetchone() == \
                ("4111000000001101",)
            c.rollback()
    with psycopg.connect(kproxy.conninfo(), autocommit=True) as c:  # simple protocol
        res = c.pgconn.exec_(b"BEGIN; INSERT INTO k_other (id, secret) VALUES (20, 'x'); "
                             + cases[3].encode())
        assert res.error_field(psycopg.pq.DiagnosticField.SQLSTATE) == b"XX001"
        assert c.info.transaction_status == failed
        assert c.pgconn.exec_(b"COMMIT").command_status == b"ROLLBACK"
        # outside a transaction block there is nothing to abort: the session goes on
        _expect_xx001(c, cases[3])
        assert c.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    with direct(pg) as d:
        assert d.execute("SELECT count(*) FROM k_other WHERE id >= 10").fetchone() == (0,)

    async def via_asyncpg() -> None:
        conn = await asyncpg.connect(kproxy.dsn())
        try:
            for sql in cases:
                with pytest.raises(asyncpg.PostgresError) as info:
                    await conn.fetch(sql)
                assert info.value.sqlstate == "XX001"
                assert await conn.fetchval("SELECT pan FROM k_cards WHERE id = 2") == \
                    "4111000000001102"
        finally:
            await conn.close()

    asyncio.run(via_asyncpg())


def test_keys_show_prints_no_key_material(kproxy) -> None:
    res = keys_cli(kproxy, "show")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    for col in ("public.k_cards.pan", "public.k_cards.expiry", "public.k_other.secret"):
        assert col in out
    assert "blind_index" in out and "active" in out.lower()
    ring = json.loads((kproxy.dir / "keyring.json").read_text())
    blobs: list[str] = []

    def walk(x: object) -> None:
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
        elif isinstance(x, str) and len(x) >= 24:
            blobs.append(x)

    walk(ring)
    kek = (kproxy.dir / "dev.kek").read_bytes()
    secrets = [*blobs, kek.hex(), base64.b64encode(kek).decode(), kek.strip().decode(
        errors="ignore")]
    for s in secrets:
        if s and len(s) >= 24 and not s.startswith(("public.", "joingroup.")):
            assert s not in out and s not in res.stderr


def test_wrong_kek_refuses_to_start(pg, kproxy) -> None:
    p = start_encrypted(pg, {"public.k_cards.pan": PROTECT["public.k_cards.pan"]},
                        start=False)
    try:
        (p.dir / "keyring.json").write_bytes((kproxy.dir / "keyring.json").read_bytes())
        kek_path = p.dir / "dev.kek"
        kek_path.unlink()
        init_kek_file(kek_path)  # a different KEK than the keyring was wrapped with
        with pytest.raises(RuntimeError) as info:
            p.start(timeout=10)
        log = str(info.value)
        assert "cannot load the column keys" in log and "KEK" in log
        assert "Traceback" not in log
        assert "key" in log.lower() and ("unwrap" in log.lower() or "kek" in log.lower())
        assert kek_path.read_bytes().hex() not in log
    finally:
        p.stop()


@pytest.mark.parametrize("role", list(ROLES))
def test_column_views_by_role(kproxy, role) -> None:
    with psycopg.connect(kproxy.conninfo(user=role, password=f"{role}-pw"),
                         autocommit=True) as c:
        if ROLES[role] == "deny":
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute("SELECT pan FROM k_cards WHERE id = 2")
            assert c.execute("SELECT id FROM k_cards WHERE id = 2").fetchone() == (2,)
            return
        cur = c.execute("SELECT id, pan FROM k_cards WHERE id = 2")
        value = cur.fetchone()[1]
        type_oid = cur.description[1].type_code
        if ROLES[role] == "plaintext":
            assert (value, type_oid) == ("4111000000001102", 25)
        elif ROLES[role] == "masked":
            assert (value, type_oid) == ("************1102", 25)
        else:
            assert type_oid == 17 and isinstance(value, bytes)
            assert value[:1] == b"\x02" and b"4111000000001102" not in value
            assert len(value) > 16 + 12
        with c.cursor(binary=True) as bcur:
            bvalue = bcur.execute("SELECT pan FROM k_cards WHERE id = 2").fetchone()[0]
        assert bvalue == value
