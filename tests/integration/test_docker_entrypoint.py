"""The image's entrypoint, run for real outside Docker, against the test PostgreSQL.

There is no Docker engine here, so the parts of the image that can run without one do:
`docker/entrypoint.sh` itself (in a temp dir laid out like the image's volumes, with the
compose configuration rewritten only where the network differs), the HEALTHCHECK command of
the Dockerfile, and the package installed the way the Dockerfile installs it (its COPY
lines, then `pip install .`), used with no source tree around it.

First start creates the KEK, keyring and audit key and serves; the second reuses them and
the old rows still decrypt; a keyring whose KEK is gone stops the start instead of getting
a new KEK.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from proxy import devcluster
from tests.conftest import APP_PASSWORD, APP_USER, PROXY_DIRS
from tests.integration.encryption_env import login_role_sql
from tests.unit.test_compose import _dockerfile_instructions, dockerfile_healthcheck

ROOT = Path(__file__).resolve().parent.parent.parent
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
DB = "entrypoint_app"
PAN = "4111111111111111"


@dataclass
class Image:
    """A temp dir laid out like the container: /etc/strongroom, the two volumes, a PATH."""

    root: Path
    config: Path
    listen_port: int
    metrics_port: int
    env: dict[str, str]

    def path(self, image_path: str) -> Path:
        return self.root / image_path.lstrip("/")


def _rebase(value: str, root: Path) -> str:
    return str(root / value.lstrip("/"))


def _image_layout(root: Path, pg: devcluster.Cluster) -> Image:
    """docker/strongroom.yaml with its absolute paths under `root`, its upstream pointed at
    the test server and free ports; everything else (keys, protect, roles, audit) as is."""
    cfg: dict[str, Any] = yaml.safe_load((ROOT / "docker" / "strongroom.yaml").read_text())
    listen_port, metrics_port = devcluster.free_port(), devcluster.free_port()
    cfg["listen"].update(host="127.0.0.1", port=listen_port)
    cfg["metrics"].update(host="127.0.0.1", port=metrics_port)
    cfg["upstream"].update(host="127.0.0.1", port=pg.port)
    for section, key in (("keys", "path"), ("keys", "keyring"), ("audit", "path"),
                         ("audit", "key_file")):
        cfg[section][key] = _rebase(cfg[section][key], root)
    config = root / "etc" / "strongroom" / "strongroom.yaml"
    config.parent.mkdir(parents=True)
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    # What the Dockerfile's RUN makes: the volume directories, keys 0700.
    (root / "var" / "lib" / "strongroom" / "keys").mkdir(parents=True, mode=0o700)
    (root / "var" / "log" / "strongroom").mkdir(parents=True)
    # `python` and `strongroom` as the image has them on PATH, running this tree's code.
    bin_dir = root / "usr" / "local" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    (bin_dir / "strongroom").write_text('#!/bin/sh\nexec python -m proxy.cli "$@"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "PYTHONPATH": str(ROOT),
        "HOME": str(root),
        "STRONGROOM_CONFIG": str(config),
    }
    return Image(root, config, listen_port, metrics_port, env)


@pytest.fixture
def app_db(pg: devcluster.Cluster) -> Iterator[str]:
    """The compose demo's schema (docker/init/01-schema.sql) in a fresh database. The
    harness already made the `app` login role; the other two are made if missing."""
    pg.psql(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
    pg.psql(f"CREATE DATABASE {DB}")
    for role in ("support_agent", "etl_backup"):
        pg.psql(login_role_sql(role))
    sql = (ROOT / "docker" / "init" / "01-schema.sql").read_text()
    pg.psql(re.sub(r"^CREATE ROLE .*$", "", sql, flags=re.M), db=DB)
    yield DB
    pg.psql(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")


class Started:
    """One run of the entrypoint script, its output in a file."""

    def __init__(self, image: Image, log: Path) -> None:
        self.image, self.log_path = image, log
        self._log = open(log, "wb")
        self.proc = subprocess.Popen([str(ENTRYPOINT)], env=image.env, cwd=str(image.root),
                                     stdout=self._log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_serving(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"entrypoint exited:\n{self.output()}"
            try:
                devcluster.wait_port("127.0.0.1", self.image.listen_port, timeout=0.2)
                devcluster.wait_port("127.0.0.1", self.image.metrics_port, timeout=0.2)
                return
            except devcluster.ClusterError:
                continue
        raise AssertionError(f"not serving after {timeout}s:\n{self.output()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(25)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def _health(image: Image, url: str) -> int:
    """Run the Dockerfile's HEALTHCHECK command as Docker would (/bin/sh -c)."""
    cmd = dockerfile_healthcheck((ROOT / "Dockerfile").read_text())
    env = image.env | {"STRONGROOM_HEALTH_URL": url}
    return subprocess.run(["/bin/sh", "-c", cmd], env=env, timeout=30,
                          capture_output=True).returncode


def _connect(image: Image) -> psycopg.Connection[Any]:
    return psycopg.connect(host="127.0.0.1", port=image.listen_port, user=APP_USER,
                           password=APP_PASSWORD, dbname=DB, sslmode="disable",
                           autocommit=True, connect_timeout=10)


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_entrypoint_first_start_initializes_then_restarts_reuse_the_keys(
    pg: devcluster.Cluster, app_db: str, tmp_path: Path,
) -> None:
    root = tmp_path / "container"
    root.mkdir()
    PROXY_DIRS.append(root)  # the harness scans it for plaintext when the run ends
    image = _image_layout(root, pg)
    kek = image.path("/var/lib/strongroom/keys/dev.kek")
    keyring = image.path("/var/lib/strongroom/keys/keyring.json")
    audit_key = image.path("/var/lib/strongroom/keys/audit.key")
    audit_log = image.path("/var/log/strongroom/audit.jsonl")

    # --- first start: says what it creates, then the same process serves
    first = Started(image, tmp_path / "first.log")
    try:
        first.wait_serving()
        out = first.output()
        for line in (f"created KEK {kek} (mode 0600)", f"created keyring {keyring}",
                     f"created audit key {audit_key} (mode 0600"):
            assert line in out, out
        for f in (kek, keyring, audit_key):
            assert _mode(f) == 0o600, (f, oct(_mode(f)))
        # exec, not a child: the entrypoint's pid is the proxy (docker stop reaches it).
        cmdline = Path(f"/proc/{first.proc.pid}/cmdline").read_bytes().split(b"\0")
        assert b"proxy.cli" in cmdline and b"serve" in cmdline, cmdline
        # The image's HEALTHCHECK passes against /healthz, and is a real check.
        base = f"http://127.0.0.1:{image.metrics_port}"
        assert _health(image, f"{base}/healthz") == 0
        assert _health(image, f"{base}/no-such-path") != 0
        with _connect(image) as conn:
            cid = conn.execute("INSERT INTO customers (name, tax_id) VALUES ('Ann', 'DE123') "
                               "RETURNING id").fetchone()[0]
            conn.execute("INSERT INTO cards (customer_id, pan, expiry) VALUES (%s, %s, "
                         "'2030-01-31')", (cid, PAN))
            assert conn.execute("SELECT pan FROM cards").fetchall() == [(PAN,)]
        stored = pg.psql("SELECT encode(pan, 'hex') FROM cards", db=DB)
        assert stored.strip() and PAN.encode().hex() not in stored
        assert _mode(audit_log) == 0o600
    finally:
        assert first.stop() == 0, first.output()
    keys_before = {f: f.read_bytes() for f in (kek, keyring, audit_key)}

    # --- second start: nothing created, same keys, the old row still decrypts
    second = Started(image, tmp_path / "second.log")
    try:
        second.wait_serving()
        out = second.output()
        assert "created" not in out, out
        assert f"keyring {keyring} exists: keys reused" in out
        assert f"audit key {audit_key} exists: reused" in out
        assert {f: f.read_bytes() for f in keys_before} == keys_before
        with _connect(image) as conn:
            assert conn.execute("SELECT pan FROM cards").fetchall() == [(PAN,)]
            assert conn.execute("SELECT tax_id FROM customers").fetchall() == [("DE123",)]
    finally:
        assert second.stop() == 0, second.output()

    # --- the KEK volume lost its KEK: no new KEK, the container does not start
    kek.rename(kek.with_name("dev.kek.moved"))
    third = Started(image, tmp_path / "third.log")
    try:
        assert third.proc.wait(30) == 1, third.output()
    finally:
        third.stop()
    assert f"keyring {keyring} exists but its KEK file {kek} does not" in third.output()
    assert "Traceback" not in third.output()
    assert not kek.exists()
    assert keyring.read_bytes() == keys_before[keyring]


def test_entrypoint_runs_other_strongroom_commands_as_given(
    pg: devcluster.Cluster, tmp_path: Path,
) -> None:
    """`docker compose run --rm strongroom check-config FILE`: the command itself, with
    no key creation on the way."""
    image = _image_layout(tmp_path, pg)
    proc = subprocess.run([str(ENTRYPOINT), "check-config", str(image.config)], env=image.env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{image.config}: OK" in proc.stdout
    assert not any(image.path("/var/lib/strongroom/keys").iterdir())


def test_package_installed_as_the_dockerfile_does_works_without_the_source_tree(
    tmp_path: Path,
) -> None:
    """The Dockerfile's COPY lines, `pip install .`, then the proxy's config loader from
    the installed package alone: the schema must ship inside it (no PYTHONPATH=/src)."""
    src, target = tmp_path / "src", tmp_path / "site"
    src.mkdir()
    for word, args in _dockerfile_instructions((ROOT / "Dockerfile").read_text()):
        parts = args.split()
        if word != "COPY" or parts[0].startswith("--") or "docker/" in args:
            continue
        *sources, dest = parts
        for s in sources:
            dst = src / Path(dest) / s if dest.endswith("/") and dest != "./" else src / s
            if (ROOT / s).is_dir():
                shutil.copytree(ROOT / s, dst, symlinks=True,
                                ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy(ROOT / s, dst)
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
         str(target), "."], cwd=src, capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stdout + install.stderr
    shutil.rmtree(src)  # as the image does: nothing of the source tree is left
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(target), "HOME": str(tmp_path)}
    probe = subprocess.run(
        [sys.executable, "-c",
         "import sys, proxy.cli; assert proxy.cli.__file__.startswith(sys.argv[1]), "
         "proxy.cli.__file__; sys.exit(proxy.cli.main(['check-config', sys.argv[2]]))",
         str(target), str(ROOT / "docker" / "strongroom.yaml")],
        env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stdout + probe.stderr
    assert "strongroom.yaml: OK" in probe.stdout
