"""Test harness: one real PostgreSQL per run, proxies as real subprocesses.

The database is never mocked. The cluster is initdb'ed into a temp dir with SCRAM auth
and TLS on a random port; each proxy is `python -m proxy.cli serve` with its own YAML,
so tests exercise exactly what ops run. Server and proxy logs are printed on failure.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy import devcluster

ROOT = Path(__file__).resolve().parent.parent
APP_USER = "app"
APP_PASSWORD = "app-secret"
APP_DB = "app"


class ProxyProcess:
    """A strongroom subprocess with its own config file and log."""

    def __init__(self, cluster: devcluster.Cluster, config: dict[str, Any] | None = None):
        self.cluster = cluster
        self.dir = Path(tempfile.mkdtemp(prefix="strongroom-proxy-"))
        self.port = devcluster.free_port()
        self.config: dict[str, Any] = {
            "listen": {"host": "127.0.0.1", "port": self.port},
            "upstream": {"host": "127.0.0.1", "port": cluster.port},
            "log_level": "info",
        }
        for key, value in (config or {}).items():
            if isinstance(value, dict) and isinstance(self.config.get(key), dict):
                self.config[key] = {**self.config[key], **value}
            else:
                self.config[key] = value
        self.config["listen"]["port"] = self.port
        self.config_path = self.dir / "strongroom.yaml"
        self.log_path = self.dir / "proxy.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def write_config(self, config: dict[str, Any] | None = None) -> None:
        self.config_path.write_text(yaml.safe_dump(config or self.config))

    def start(self, timeout: float = 15.0) -> ProxyProcess:
        self.write_config()
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "serve", "--config", str(self.config_path)],
            cwd=str(ROOT),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"proxy exited early:\n{self.log()}")
            try:
                devcluster.wait_port("127.0.0.1", self.port, timeout=0.2)
                return self
            except devcluster.ClusterError:
                continue
        raise RuntimeError(f"proxy did not listen within {timeout}s:\n{self.log()}")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def dsn(self, user: str = APP_USER, password: str = APP_PASSWORD, db: str = APP_DB,
            **params: str) -> str:
        extra = "".join(f"&{k}={v}" for k, v in params.items())
        return f"postgresql://{user}:{password}@127.0.0.1:{self.port}/{db}?sslmode=disable{extra}"

    def conninfo(self, user: str = APP_USER, password: str = APP_PASSWORD, db: str = APP_DB,
                 **params: str) -> str:
        base = {"host": "127.0.0.1", "port": str(self.port), "user": user,
                "password": password, "dbname": db, "sslmode": "disable"} | params
        return " ".join(f"{k}={v}" for k, v in base.items())


@pytest.fixture(scope="session")
def pg() -> Iterator[devcluster.Cluster]:
    cluster = devcluster.create(
        tls=True, extra_conf={"shared_preload_libraries": "'pg_stat_statements'"}
    )
    try:
        cluster.psql(f"CREATE ROLE {APP_USER} LOGIN PASSWORD '{APP_PASSWORD}'")
        cluster.psql(f"CREATE DATABASE {APP_DB} OWNER {APP_USER}")
        cluster.psql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements", db=APP_DB)
        yield cluster
    finally:
        if os.environ.get("STRONGROOM_KEEP_CLUSTER"):
            print(f"cluster kept at {cluster.base} port {cluster.port}")
        else:
            cluster.destroy()


@pytest.fixture(scope="session")
def proxy(pg: devcluster.Cluster) -> Iterator[ProxyProcess]:
    """A default proxy shared by tests that do not change its configuration."""
    p = ProxyProcess(pg).start()
    yield p
    p.stop()


@pytest.fixture
def make_proxy(pg: devcluster.Cluster) -> Iterator[Any]:
    """Factory for proxies with a custom config; all are stopped after the test."""
    started: list[ProxyProcess] = []

    def factory(config: dict[str, Any] | None = None, start: bool = True) -> ProxyProcess:
        p = ProxyProcess(pg, config)
        started.append(p)
        return p.start() if start else p

    yield factory
    for p in started:
        p.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        for name in ("proxy", "make_proxy"):
            fx = item.funcargs.get(name) if hasattr(item, "funcargs") else None
            if isinstance(fx, ProxyProcess):
                report.sections.append(("proxy log", fx.log()[-5000:]))
        cluster = item.funcargs.get("pg") if hasattr(item, "funcargs") else None
        if isinstance(cluster, devcluster.Cluster):
            report.sections.append(("postgres log", cluster.log_tail(40)))
