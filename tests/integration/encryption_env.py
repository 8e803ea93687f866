"""Shared set-up for the column-encryption tests: a proxy with keys, and direct access.

Each test module owns its tables (distinct names) and one proxy for the module, so the
suite stays fast. ``start_encrypted`` writes the config, runs ``strongroom keys init``
exactly as ops do, then starts the proxy. ``direct`` connects to PostgreSQL as the
superuser without the proxy: that is how tests look at what really got stored.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

from proxy import devcluster
from tests.conftest import APP_DB, ROOT, ProxyProcess

KEYS = {"provider": "local", "path": "dev.kek", "keyring": "keyring.json"}


def keys_cli(p: ProxyProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", "keys", *args, "-c", str(p.config_path)],
        cwd=str(ROOT), capture_output=True, text=True, timeout=60,
    )


def start_encrypted(pg: devcluster.Cluster, protect: dict[str, Any],
                    extra: dict[str, Any] | None = None, *, start: bool = True) -> ProxyProcess:
    """A proxy protecting ``protect``, with a fresh KEK and keyring in its directory."""
    p = ProxyProcess(pg, {"keys": dict(KEYS), "protect": protect, **(extra or {})})
    p.write_config()
    res = keys_cli(p, "init")
    assert res.returncode == 0, res.stderr
    return p.start() if start else p


@contextmanager
def both_paths(pg: devcluster.Cluster, protect: dict[str, Any], config: dict[str, Any],
               extra: Callable[[], dict[str, Any]] = dict) -> Iterator[dict[str, ProxyProcess]]:
    """The two client paths with one policy: "relay" (policy only) and "tracking"
    (`protect:` configured too), each with `extra()` merged into its config; both are
    stopped on the way out, whatever happened."""
    started: list[ProxyProcess] = []
    try:
        started.append(ProxyProcess(pg, {**config, **extra()}).start())
        started.append(start_encrypted(pg, protect, {**config, **extra()}))
        yield {"relay": started[0], "tracking": started[1]}
    finally:
        for p in started:
            p.stop()


def direct(pg: devcluster.Cluster, db: str = APP_DB, **kw: Any) -> psycopg.Connection:
    """Superuser connection straight to PostgreSQL (not through the proxy)."""
    return psycopg.connect(pg.dsn(db=db) + "?sslmode=disable", autocommit=True, **kw)


def login_role_sql(role: str, password: str | None = None) -> str:
    """A LOGIN role, created unless it exists (the modules share one cluster)."""
    pw = f" PASSWORD '{password}'" if password else ""
    return (f"DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') "
            f"THEN CREATE ROLE {role} LOGIN{pw}; END IF; END$$;\n")


def setup_sql(pg: devcluster.Cluster, sql: str) -> None:
    """Run DDL as the app role (so it owns the tables), as superuser over the socket."""
    pg.psql("SET ROLE app;\n" + sql, db=APP_DB)


def stored_bytes(pg: devcluster.Cluster, table: str, columns: list[str]) -> list[bytes]:
    """Every non-NULL stored value of ``columns`` (bytea), read directly."""
    with direct(pg) as conn:
        out: list[bytes] = []
        for col in columns:
            for (v,) in conn.execute(f"SELECT {col} FROM {table}"):
                if v is not None:
                    out.append(bytes(v))
        return out


def leaks(haystacks: list[bytes], secrets: list[str]) -> list[str]:
    """The secrets found (as UTF-8, or as hex text) in any haystack."""
    found = []
    for s in secrets:
        needles = {s.encode(), s.encode().hex().encode()}
        if any(n in h for h in haystacks for n in needles):
            found.append(s)
    return found
