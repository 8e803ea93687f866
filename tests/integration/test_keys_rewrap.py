"""KEK rotation with `strongroom keys rewrap`: data keys are re-wrapped by a new KEK, the
stored ciphertexts are not touched, and a proxy on the new configuration reads them."""

from __future__ import annotations

import subprocess
import sys

import psycopg
import yaml

from tests.conftest import ROOT, ProxyProcess
from tests.integration.encryption_env import direct, keys_cli, setup_sql, start_encrypted

PROTECT = {"public.w_cards.pan": {"type": "text", "search": "blind_index"},
           "public.w_cards.balance": {"type": "numeric"}}
ROWS = {1: ("4111111111111111", "12.50"), 2: ("5500000000000004", "-3")}


def test_rewrap_to_a_new_kek_keeps_every_value_readable(pg) -> None:
    setup_sql(pg, "CREATE TABLE w_cards (id int PRIMARY KEY, pan bytea, pan_bidx bytea, "
                  "balance bytea)")
    old = start_encrypted(pg, PROTECT)
    new = None
    try:
        with psycopg.connect(old.conninfo(), autocommit=True) as c:
            for i, (pan, bal) in ROWS.items():
                c.execute("INSERT INTO w_cards (id, pan, balance) VALUES (%s, %s, %s)",
                          (i, pan, bal))
        with direct(pg) as c:
            stored = c.execute("SELECT * FROM w_cards ORDER BY id").fetchall()

        # the new configuration: same everything, another KEK file and keyring file
        cfg = yaml.safe_load(old.config_path.read_text())
        cfg["keys"] |= {"path": "next.kek", "keyring": "keyring-next.json"}
        to = old.dir / "next.yaml"
        to.write_text(yaml.safe_dump(cfg))
        res = keys_cli(old, "rewrap", "--to", str(to))
        assert res.returncode == 0, res.stderr
        assert (old.dir / "next.kek").stat().st_mode & 0o077 == 0
        before = keys_cli(old, "show").stdout
        res = subprocess.run([sys.executable, "-m", "proxy.cli", "keys", "show", "-c", str(to)],
                             cwd=str(ROOT), capture_output=True, text=True, timeout=60)
        assert res.stdout == before  # same ids, columns, states, times
        old_ring = (old.dir / "keyring.json").read_text()
        new_ring = (old.dir / "keyring-next.json").read_text()
        assert yaml.safe_load(old_ring)["kek_id"] != yaml.safe_load(new_ring)["kek_id"]

        # a second rewrap onto the file just written is refused, nothing is overwritten
        res = keys_cli(old, "rewrap", "--to", str(to))
        assert res.returncode == 1 and "exists" in res.stderr
        assert (old.dir / "keyring-next.json").read_text() == new_ring

        old.stop()
        new = ProxyProcess(pg, cfg)
        new.dir = old.dir  # the same directory: relative key paths resolve there
        new.config_path = to
        new.log_path = old.dir / "proxy-next.log"
        new.start()
        with psycopg.connect(new.conninfo(), autocommit=True) as c:
            got = c.execute("SELECT id, pan, balance FROM w_cards ORDER BY id").fetchall()
            assert [(i, pan, str(bal)) for i, pan, bal in got] == [
                (i, pan, bal) for i, (pan, bal) in ROWS.items()]
            assert c.execute("SELECT id FROM w_cards WHERE pan = %s",
                             (ROWS[2][0],)).fetchall() == [(2,)]
        with direct(pg) as c:  # nothing was re-encrypted
            assert c.execute("SELECT * FROM w_cards ORDER BY id").fetchall() == stored
    finally:
        if new is not None:
            new.stop()
        old.stop()
        setup_sql(pg, "DROP TABLE w_cards")


def test_proxy_with_an_aws_kms_kek(pg, monkeypatch) -> None:
    """The aws_kms provider end to end: `keys init` and the proxy reach KMS over HTTP
    (moto's KMS server; boto3's standard credential chain from the environment)."""
    import boto3
    from moto.server import ThreadedMotoServer

    from proxy import devcluster

    port = devcluster.free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    for var, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                       ("AWS_DEFAULT_REGION", "eu-central-1")):
        monkeypatch.setenv(var, value)
    setup_sql(pg, "CREATE TABLE w_kms (id int PRIMARY KEY, iban bytea)")
    p = None
    try:
        endpoint = f"http://127.0.0.1:{port}"
        kms = boto3.client("kms", region_name="eu-central-1", endpoint_url=endpoint)
        key = kms.create_key(Description="strongroom test KEK")["KeyMetadata"]
        kms.create_alias(AliasName="alias/strongroom-test", TargetKeyId=key["KeyId"])
        keys = {"provider": "aws_kms", "kms_key_id": "alias/strongroom-test",
                "endpoint_url": endpoint, "keyring": "keyring.json"}
        p = start_encrypted(pg, {"public.w_kms.iban": {"type": "text", "mode": "deterministic"}},
                            {"keys": keys})
        ring = yaml.safe_load((p.dir / "keyring.json").read_text())
        assert ring["kek_id"] == f"aws-kms:{key['Arn']}"  # the ARN, not the alias
        with psycopg.connect(p.conninfo(), autocommit=True) as c:
            c.execute("INSERT INTO w_kms (id, iban) VALUES (1, %s)", ("DE89370400440532013000",))
            assert c.execute("SELECT iban FROM w_kms WHERE iban = %s",
                             ("DE89370400440532013000",)).fetchall() == [
                                 ("DE89370400440532013000",)]
        with direct(pg) as c:
            (stored,) = c.execute("SELECT iban FROM w_kms").fetchone()
            assert b"DE8937" not in bytes(stored)
    finally:
        if p is not None:
            p.stop()
        server.stop()
        setup_sql(pg, "DROP TABLE w_kms")
