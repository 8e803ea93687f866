"""encrypt-column / decrypt-column / keys rotate against a real PostgreSQL (issue 4, point 6).

What is proved here, directly in the database (never through the proxy):
* no row lost: count and an md5 over every (id, plaintext) pair are equal before the
  migration and after decrypting what it wrote;
* no plaintext left: not in any value of `SELECT *`, and, after `VACUUM FULL`, not
  anywhere in the table's heap file (read raw with pg_read_binary_file). Before the
  VACUUM FULL the heap still holds it (dropped column data), which is why the tool
  offers `--vacuum-full` and says so;
* resumable: interrupted between batches (`--max-batches`) and inside a batch (a hook
  that raises before commit), then rerun to completion;
* decrypt-column restores every value's text exactly, with the original column types;
* the whole rotation dance: add -> promote -> rotate -> retire, then a fresh keyring
  load reads everything and no envelope names the old key.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml

from keys import cli_ops
from keys import keyring as kr
from keys.providers.local import LocalKekProvider
from keys.rotation import rotate_column
from proxy import migrate
from proxy.encryption import Encryption, protect_columns_for_keys
from tests.conftest import APP_DB, APP_PASSWORD, APP_USER, ROOT

MARK = "SRMARK"  # every secret text value contains it, so the heap can be searched for it


def _name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


class Setup:
    """A config + keyring in tmp_path for one table, and helpers around them."""

    def __init__(self, pg: Any, tmp_path: Path, table: str, protect: dict[str, Any]) -> None:
        self.pg = pg
        self.dir = tmp_path
        self.table = table
        self.protect = {f"public.{table}.{col}": spec for col, spec in protect.items()}
        self.keys_cfg = {"provider": "local", "path": "dev.kek", "keyring": "keyring.json"}
        self.config = self.dir / "strongroom.yaml"
        self.config.write_text(yaml.safe_dump({
            "upstream": {"host": "127.0.0.1", "port": pg.port, "database": APP_DB},
            "keys": self.keys_cfg,
            "protect": self.protect,
        }))
        cli_ops.init(self.dir / "dev.kek", self.dir / "keyring.json",
                     protect_columns_for_keys(self.protect))

    @property
    def keyring(self) -> Path:
        return self.dir / "keyring.json"

    def provider(self) -> LocalKekProvider:
        return LocalKekProvider(self.dir / "dev.kek")

    def enc(self) -> Encryption:
        """A fresh load of the keyring, as a reloaded proxy would have."""
        return Encryption(self.protect, self.keys_cfg, str(self.dir), None)

    def rt(self, column: str, enc: Encryption | None = None) -> Any:
        return (enc or self.enc()).columns_for(APP_DB)[("public", self.table, column)]

    def cli(self, *args: str, env: dict[str, str] | None = None,
            dsn: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "proxy.cli", *args, "--config", str(self.config)]
        if dsn:
            cmd += ["--dsn", self.pg.dsn(APP_USER, APP_PASSWORD, APP_DB)]
        return subprocess.run(cmd, cwd=str(ROOT), capture_output=True, text=True,
                              env={**os.environ, **(env or {})}, timeout=120)


async def app_conn(pg: Any) -> asyncpg.Connection:
    return await migrate.connect(pg.dsn(APP_USER, APP_PASSWORD, APP_DB))


async def super_conn(pg: Any) -> asyncpg.Connection:
    return await asyncpg.connect(pg.dsn(db=APP_DB))


def pan_value(i: int) -> str | None:
    if i % 7 == 0:
        return None
    if i % 11 == 0:
        return f"{MARK}-ünïcødé-€-{i:05d}"
    return f"{MARK}-4111-1111-{i:06d}"


async def make_cards(pg: Any, table: str, n: int = 250) -> None:
    conn = await app_conn(pg)
    try:
        await conn.execute(
            f"CREATE TABLE {table} (id bigint PRIMARY KEY, pan text, note text NOT NULL)"
        )
        await conn.executemany(
            f"INSERT INTO {table} VALUES ($1, $2, $3)",
            [(i, pan_value(i), f"note {i}") for i in range(1, n + 1)],
        )
    finally:
        await conn.close()


def checksum(pairs: list[tuple[int, str | None]]) -> tuple[int, str]:
    """Same formula as `plain_checksum`'s SQL, computed from decrypted values."""
    text = ",".join(f"{i}:{'<null>' if v is None else v}" for i, v in sorted(pairs))
    return len(pairs), hashlib.md5(text.encode()).hexdigest()


async def plain_checksum(conn: asyncpg.Connection, table: str, col: str) -> tuple[int, str]:
    row = await conn.fetchrow(
        f"SELECT count(*) AS n, md5(string_agg(id::text || ':' || coalesce({col}::text, "
        f"'<null>'), ',' ORDER BY id)) AS h FROM {table}"
    )
    return row["n"], row["h"]


async def decrypted(conn: asyncpg.Connection, table: str, col: str,
                    rt: Any) -> list[tuple[int, str | None]]:
    rows = await conn.fetch(f"SELECT id, {col} FROM {table} ORDER BY id")
    out = []
    for r in rows:
        blob = r[col]
        out.append((r["id"], None if blob is None
                    else rt.codec.to_text(rt.cipher.decrypt(blob)).decode()))
    return out


async def column_types(conn: asyncpg.Connection, table: str) -> dict[str, str]:
    rows = await conn.fetch(
        "SELECT attname, format_type(atttypid, atttypmod) AS t FROM pg_attribute "
        "WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped", table,
    )
    return {r["attname"]: r["t"] for r in rows}


async def heap_bytes(pg: Any, table: str) -> bytes:
    """The table's heap file as PostgreSQL wrote it (after a CHECKPOINT flushed it)."""
    conn = await super_conn(pg)
    try:
        await conn.execute("CHECKPOINT")
        path = await conn.fetchval("SELECT pg_relation_filepath($1::regclass)", table)
        return bytes(await conn.fetchval("SELECT pg_read_binary_file($1)", path))
    finally:
        await conn.close()


async def all_value_bytes(conn: asyncpg.Connection, table: str) -> bytes:
    """Every value of `SELECT *`, as the bytes a reader gets (bytea raw, others as text)."""
    rows = await conn.fetch(f"SELECT * FROM {table}")
    parts: list[bytes] = []
    for r in rows:
        for v in r.values():
            if isinstance(v, bytes | bytearray):
                parts.append(bytes(v))
            elif v is not None:
                parts.append(str(v).encode())
    return b"\x00".join(parts)


# ------------------------------------------------------------------------- encrypt-column


async def test_encrypt_column_interrupted_resumed_no_loss_no_plaintext(pg: Any,
                                                                       tmp_path: Path) -> None:
    table = _name("cards")
    s = Setup(pg, tmp_path, table, {"pan": {"type": "text", "search": "blind_index"}})
    await make_cards(pg, table)
    conn = await app_conn(pg)
    try:
        before = await plain_checksum(conn, table, "pan")
        assert MARK.encode() in await heap_bytes(pg, table)  # the probe works

        res = s.cli("encrypt-column", f"public.{table}.pan", "--batch", "40",
                    "--max-batches", "2")
        assert res.returncode == 3, res.stderr
        assert "rerun to continue" in res.stderr
        cols = await column_types(conn, table)
        assert cols["pan"] == "text" and cols["pan__sr_new"] == "bytea"
        assert cols["pan_bidx"] == "bytea"
        done = await conn.fetchval(f"SELECT count(pan__sr_new) FROM {table}")
        assert done == 80  # exactly two committed batches

        res = s.cli("encrypt-column", f"public.{table}.pan", "--batch", "40")
        assert res.returncode == 0, res.stderr
        assert "swapped in" in res.stdout
        for stream in (res.stdout, res.stderr):
            assert MARK not in stream

        cols = await column_types(conn, table)
        assert cols == {"id": "bigint", "pan": "bytea", "note": "text", "pan_bidx": "bytea"}
        rt = s.rt("pan")
        after = await decrypted(conn, table, "pan", rt)
        assert checksum(after) == before
        # blind indexes are what the proxy computes for the same value, NULL for NULL
        for r in await conn.fetch(f"SELECT pan, pan_bidx FROM {table}"):
            if r["pan"] is None:
                assert r["pan_bidx"] is None
            else:
                assert r["pan_bidx"] == rt.blind_index.compute(rt.cipher.decrypt(r["pan"]))

        assert MARK.encode() not in await all_value_bytes(conn, table)
        # the dropped column's data is still in the pages: why --vacuum-full exists
        assert MARK.encode() in await heap_bytes(pg, table)
        await conn.execute(f"VACUUM FULL {table}")
        assert MARK.encode() not in await heap_bytes(pg, table)

        res = s.cli("encrypt-column", f"public.{table}.pan")
        assert res.returncode == 0 and "already encrypted" in res.stdout
    finally:
        await conn.close()


class Crash(Exception):
    pass


TYPED = {
    "amount": ("numeric", ["1.50", "-0.000001", "NaN", "123456789012345678901234.5", "0"]),
    "born": ("date", ["2024-02-29", "infinity", "-infinity", "0001-01-01", "1999-12-31"]),
    "seen": ("timestamptz", ["2024-01-02 03:04:05.123456+00", "infinity",
                             "1970-01-01 00:00:00+00", "2038-01-19 03:14:07+00",
                             "2000-06-30 23:59:59.5+00"]),
    "doc": ("jsonb", ['{"a": [1, 2.50, "x"], "b": null}', "[]", '"s"', "{}", "1e3"]),
    "flag": ("bool", ["true", "false", "true", "false", "true"]),
    "ref": ("uuid", [str(uuid.UUID(int=i)) for i in range(5)]),
    "big": ("int8", ["9223372036854775807", "-9223372036854775808", "0", "-1", "42"]),
    "name": ("varchar", ["", f"{MARK} x", "ü", " lead", "trail "]),
}


async def make_typed(pg: Any, table: str, n: int = 60) -> None:
    conn = await app_conn(pg)
    try:
        cols = ", ".join(f"{c} {t}" for c, (t, _) in TYPED.items())
        await conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, {cols})")
        names = list(TYPED)
        for i in range(1, n + 1):
            values = [None if (i + k) % 9 == 0 else TYPED[c][1][i % 5]
                      for k, c in enumerate(names)]
            exprs = ", ".join(f"${k + 2}::text::{TYPED[c][0]}" for k, c in enumerate(names))
            await conn.execute(f"INSERT INTO {table} VALUES ($1, {exprs})", i, *values)
    finally:
        await conn.close()


async def snapshot(conn: asyncpg.Connection, table: str) -> list[tuple[Any, ...]]:
    cols = ", ".join(f"{c}::text" for c in TYPED)
    return [tuple(r) for r in await conn.fetch(f"SELECT id, {cols} FROM {table} ORDER BY id")]


async def test_every_type_crash_mid_batch_then_decrypt_restores_exactly(pg: Any,
                                                                        tmp_path: Path) -> None:
    table = _name("typed")
    s = Setup(pg, tmp_path, table, {c: {"type": t} for c, (t, _) in TYPED.items()})
    await make_typed(pg, table)
    conn = await app_conn(pg)
    try:
        original = await snapshot(conn, table)
        types = await column_types(conn, table)
        enc = s.enc()
        for col in TYPED:
            def boom(n: int) -> None:
                if n == 3:
                    raise Crash  # after batch 3's UPDATE, before its COMMIT
            with pytest.raises(Crash):
                await migrate.encrypt_column(conn, s.rt(col, enc), batch=10, hook=boom)
            # batches 1-2 committed, batch 3 rolled back as a whole
            assert await conn.fetchval(
                f"SELECT count({col}__sr_new) FROM {table}") == 20
            out = await migrate.encrypt_column(conn, s.rt(col, enc), batch=10)
            assert out.swapped and out.converted == (
                await conn.fetchval(f"SELECT count({col}) FROM {table}")) - 20
        assert set((await column_types(conn, table)).values()) == {"integer", "bytea"}
        for col in TYPED:  # what the proxy would read back
            rt = s.rt(col, enc)
            got = dict(await decrypted(conn, table, col, rt))
            want = {r[0]: r[1 + list(TYPED).index(col)] for r in original}
            for key, value in want.items():
                if value is None:
                    assert got[key] is None
                else:
                    canonical = rt.codec.from_text(value.encode())
                    assert got[key] == rt.codec.to_text(canonical).decode()

        for col in TYPED:
            with pytest.raises(migrate.Interrupted):
                await migrate.decrypt_column(conn, s.rt(col, enc), batch=7, max_batches=1)
            out = await migrate.decrypt_column(conn, s.rt(col, enc), batch=7)
            assert out.swapped
        assert await snapshot(conn, table) == original
        assert await column_types(conn, table) == {
            c: (t if c != "name" else "character varying") for c, t in types.items()
        }
    finally:
        await conn.close()


async def test_decrypt_column_cli_drops_blind_index(pg: Any, tmp_path: Path) -> None:
    table = _name("cards")
    s = Setup(pg, tmp_path, table, {"pan": {"type": "text", "search": "blind_index"}})
    await make_cards(pg, table, n=90)
    conn = await app_conn(pg)
    try:
        before = await plain_checksum(conn, table, "pan")
        original = await conn.fetch(f"SELECT id, pan FROM {table} ORDER BY id")
        # connection built from the config's upstream + --user + PGPASSWORD
        env = {"PGPASSWORD": APP_PASSWORD}
        args = ("--user", APP_USER, "--batch", "25")
        res = s.cli("encrypt-column", f"public.{table}.pan", *args, env=env, dsn=False)
        assert res.returncode == 0, res.stderr
        res = s.cli("decrypt-column", f"public.{table}.pan", *args, "--max-batches", "1",
                    env=env, dsn=False)
        assert res.returncode == 3, res.stderr
        res = s.cli("decrypt-column", f"public.{table}.pan", *args, "--vacuum-full",
                    env=env, dsn=False)
        assert res.returncode == 0, res.stderr
        assert MARK not in res.stdout + res.stderr
        assert await column_types(conn, table) == {"id": "bigint", "pan": "text",
                                                   "note": "text"}
        assert await plain_checksum(conn, table, "pan") == before
        assert await conn.fetch(f"SELECT id, pan FROM {table} ORDER BY id") == original
        res = s.cli("decrypt-column", f"public.{table}.pan", *args, env=env, dsn=False)
        assert res.returncode == 0 and "already decrypted" in res.stdout
    finally:
        await conn.close()


async def test_refusals(pg: Any, tmp_path: Path) -> None:
    table = _name("nopk")
    s = Setup(pg, tmp_path, table, {"pan": {"type": "text"}, "num": {"type": "numeric"}})
    conn = await app_conn(pg)
    try:
        await conn.execute(f"CREATE TABLE {table} (pan text, num text)")
        await conn.execute(f"INSERT INTO {table} VALUES ('{MARK}-1', 'not a number')")
        res = s.cli("encrypt-column", f"public.{table}.pan")
        assert res.returncode == 1 and "no primary key" in res.stderr
        res = s.cli("encrypt-column", f"public.{table}.other")
        assert res.returncode == 1 and "not in the config's protect" in res.stderr
        await conn.execute(f"ALTER TABLE {table} ADD COLUMN id serial PRIMARY KEY")
        # a value that is not valid for the configured type: refused, value not shown
        with pytest.raises(migrate.MigrationError) as info:
            await migrate.encrypt_column(conn, s.rt("num"))
        assert "not a valid numeric" in str(info.value) and "not a number" not in str(info.value)
        assert (await column_types(conn, table))["num"] == "text"  # nothing swapped
        with pytest.raises(migrate.MigrationError, match="not bytea"):
            await rotate_column(conn, s.rt("pan"), 1)
    finally:
        await conn.close()


async def test_not_null_is_carried_over_both_ways(pg: Any, tmp_path: Path) -> None:
    table = _name("nn")
    s = Setup(pg, tmp_path, table, {"pan": {"type": "text"}})
    conn = await app_conn(pg)
    try:
        await conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, pan text NOT NULL, "
                           "other text)")
        await conn.executemany(f"INSERT INTO {table} VALUES ($1, $2, 'x')",
                               [(i, f"{MARK}{i}") for i in range(10)])
        not_null = f"SELECT attnotnull FROM pg_attribute WHERE attrelid = '{table}'::regclass " \
            "AND attname = 'pan'"
        assert (await migrate.encrypt_column(conn, s.rt("pan"), batch=3)).swapped
        assert await conn.fetchval(not_null) is True
        assert (await column_types(conn, table))["pan"] == "bytea"
        assert (await migrate.decrypt_column(conn, s.rt("pan"), batch=3)).swapped
        assert await conn.fetchval(not_null) is True
        assert [r["pan"] for r in await conn.fetch(f"SELECT pan FROM {table} ORDER BY id")] == [
            f"{MARK}{i}" for i in range(10)]
    finally:
        await conn.close()


# --------------------------------------------------------------------------- keys rotate


async def test_rotation_dance(pg: Any, tmp_path: Path) -> None:
    """Written under key A through Encryption objects; add+promote B; rotate; retire A."""
    table = _name("rot")
    s = Setup(pg, tmp_path, table, {"pan": {"type": "text", "search": "blind_index"},
                                    "amount": {"type": "numeric"}})
    column = f"public.{table}.pan"
    conn = await app_conn(pg)
    try:
        await conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, pan bytea, "
                           "pan_bidx bytea, amount bytea)")
        enc_a = s.enc()
        pan_a, amount_a = s.rt("pan", enc_a), s.rt("amount", enc_a)
        plain = {i: pan_value(i) for i in range(1, 131)}
        rows = []
        for i, v in plain.items():
            c = None if v is None else v.encode()
            rows.append((i, None if c is None else pan_a.cipher.encrypt(c),
                         None if c is None else pan_a.blind_index.compute(c),
                         amount_a.cipher.encrypt(amount_a.codec.from_text(f"{i}.25".encode()))))
        await conn.executemany(f"INSERT INTO {table} VALUES ($1, $2, $3, $4)", rows)
        ring = kr.load(s.keyring, s.provider())
        enc_id_a = ring.primary(column, "encrypt").id
        bidx_id_a = ring.primary(column, "blind_index").id

        # add (decrypt-only) -> proxies reload -> promote -> proxies reload
        enc_id_b = cli_ops.add(s.keyring, s.provider(), column, "encrypt")
        bidx_id_b = cli_ops.add(s.keyring, s.provider(), column, "blind_index")
        mid = s.enc()  # a reloaded proxy: reads B, still writes A
        assert mid.columns_for(APP_DB)[("public", table, "pan")].cipher.key_id_of(
            mid.columns_for(APP_DB)[("public", table, "pan")].cipher.encrypt(b"x")) == enc_id_a
        cli_ops.promote(s.keyring, enc_id_b, s.provider())
        cli_ops.promote(s.keyring, bidx_id_b, s.provider())

        # an app write after the reload goes under B and must survive the rotation as is
        enc_b = s.enc()
        pan_b = s.rt("pan", enc_b)
        fresh = pan_b.cipher.encrypt(b"written-under-b")
        await conn.execute(f"UPDATE {table} SET pan = $1, pan_bidx = $2 WHERE id = 1",
                           fresh, pan_b.blind_index.compute(b"written-under-b"))
        plain[1] = "written-under-b"

        res = s.cli("keys", "rotate", "--column", column, "--batch", "30", "--max-batches", "2")
        assert res.returncode == 3, res.stderr
        under_a = await conn.fetchval(
            f"SELECT count(*) FROM {table} WHERE substr(pan, 3, 4) = $1",
            enc_id_a.to_bytes(4, "big"))
        assert 0 < under_a < len([v for v in plain.values() if v is not None])

        res = s.cli("keys", "rotate", "--column", column, "--batch", "30")
        assert res.returncode == 0, res.stderr
        assert str(enc_id_a) in res.stdout and str(bidx_id_a) in res.stdout  # safe to retire
        assert MARK not in res.stdout + res.stderr
        again = await rotate_column(conn, pan_b, enc_id_b, batch=30, reindex=True)
        assert again.rewritten == 0 and again.remaining == 0  # idempotent
        assert await conn.fetchval(f"SELECT pan FROM {table} WHERE id = 1") == fresh

        cli_ops.retire(s.keyring, enc_id_a, s.provider())
        cli_ops.retire(s.keyring, bidx_id_a, s.provider())
        enc_c = s.enc()  # only B is live now
        pan_c = s.rt("pan", enc_c)
        assert await conn.fetchval(
            f"SELECT count(*) FROM {table} WHERE substr(pan, 3, 4) <> $1",
            enc_id_b.to_bytes(4, "big")) == 0
        got = dict(await decrypted(conn, table, "pan", pan_c))
        assert got == plain
        for r in await conn.fetch(f"SELECT pan, pan_bidx FROM {table} WHERE pan IS NOT NULL"):
            assert r["pan_bidx"] == pan_c.blind_index.compute(pan_c.cipher.decrypt(r["pan"]))
        # the other column was not touched and still reads under its own (unrotated) key
        amount_c = s.rt("amount", enc_c)
        for r in await conn.fetch(f"SELECT id, amount FROM {table}"):
            assert amount_c.cipher.decrypt(r["amount"]) == amount_c.codec.from_text(
                f"{r['id']}.25".encode())

        # a column without blind index: candidates are selected by envelope key id in SQL
        amount_col = f"public.{table}.amount"
        amount_b = cli_ops.add(s.keyring, s.provider(), amount_col, "encrypt")
        cli_ops.promote(s.keyring, amount_b, s.provider())
        amount_d = s.rt("amount")
        with pytest.raises(migrate.Interrupted):
            await rotate_column(conn, amount_d, amount_b, batch=50, max_batches=1)
        out = await rotate_column(conn, amount_d, amount_b, batch=50)
        assert (out.rewritten, out.remaining) == (80, 0)  # 130 rows, 50 done before
        assert (await rotate_column(conn, amount_d, amount_b, batch=50)).examined == 0
    finally:
        await conn.close()
