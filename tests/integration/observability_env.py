"""A real proxy with encryption + policy + metrics + audit, a real Prometheus, and traffic.

Shared by test_prometheus.py and test_observability.py. The proxy protects two columns of
its own tables (`obs_cards.pan`, `obs_customers.tax_id`) and runs a small policy over the
roles `policy_env` creates; the traffic puts known plaintexts (a test PAN and a tax id)
through it, so the leak test can look for them in every output.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import psycopg

from proxy import devcluster
from proxy.devcluster import free_port
from tests.conftest import ROOT, ProxyProcess
from tests.integration import policy_env
from tests.integration.encryption_env import login_role_sql, setup_sql, start_encrypted

PAN = "4111111111111111"
TAX_ID = "123-45-6789"
SECRETS = [PAN, TAX_ID, "5500000000000004"]

PROTECT = {
    "public.obs_cards.pan": {"type": "text", "mode": "randomized", "mask": "last4"},
    "public.obs_customers.tax_id": {"type": "text", "mode": "randomized"},
}

POLICY: dict[str, Any] = {
    "roles": {
        "payments_service": {
            "tables": {
                "public.obs_cards": ["select", "insert", "delete", "copy_out"],
                "public.obs_customers": ["select", "insert", "delete"],
            },
            "columns": {"public.obs_cards.pan": "plaintext",
                        "public.obs_customers.tax_id": "plaintext"},
        },
        "support_agent": {
            "tables": {"public.obs_cards": ["select"], "public.obs_customers": ["select"]},
            "columns": {"public.obs_cards.pan": "masked", "public.obs_customers.tax_id": "deny"},
        },
    },
    "default": "deny",
}

ROLES = ("payments_service", "support_agent", "analyst")

TABLES_SQL = """
DROP TABLE IF EXISTS obs_cards, obs_customers;
CREATE TABLE obs_cards (id int PRIMARY KEY, pan bytea);
CREATE TABLE obs_customers (id int PRIMARY KEY, name text, tax_id bytea);
GRANT ALL ON obs_cards, obs_customers TO PUBLIC;
"""


def start_observed_proxy(pg: devcluster.Cluster, audit: dict[str, Any] | None = None,
                         ) -> ProxyProcess:
    """Tables, roles, keys (`keys init` also creates the audit key), then the proxy."""
    for role in ROLES:  # the roles only, not policy_env's whole schema
        pg.psql(login_role_sql(role, policy_env.password(role)))
    setup_sql(pg, TABLES_SQL)
    extra = {
        **POLICY,
        "metrics": {"host": "127.0.0.1", "port": free_port()},
        "audit": {"path": "audit.jsonl", "key_file": "audit.key", **(audit or {})},
    }
    p = start_encrypted(pg, PROTECT, extra)
    wait_metrics(p)
    return p


def metrics_url(p: ProxyProcess) -> str:
    return f"http://127.0.0.1:{p.config['metrics']['port']}/metrics"


def scrape(p: ProxyProcess) -> str:
    with urllib.request.urlopen(metrics_url(p), timeout=5) as resp:
        return resp.read().decode()


def wait_metrics(p: ProxyProcess, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            scrape(p)
            return
        except OSError:
            assert time.monotonic() < deadline, f"no /metrics from the proxy:\n{p.log()}"
            time.sleep(0.05)


def connect(p: ProxyProcess, role: str, **kw: Any) -> psycopg.Connection:
    return psycopg.connect(p.conninfo(user=role, password=policy_env.password(role)),
                           autocommit=True, **kw)


def traffic(p: ProxyProcess, rounds: int = 1) -> None:
    """Writes and reads of protected values, masked reads, denials, a failed login."""
    with connect(p, "payments_service", application_name="payments") as c:
        c.execute("DELETE FROM obs_cards")
        c.execute("DELETE FROM obs_customers")
        c.execute(f"INSERT INTO obs_cards VALUES (1, '{PAN}')")  # literal: sealed in SQL
        c.execute("INSERT INTO obs_cards VALUES (%s, %s)", (2, "5500000000000004"))  # param
        c.execute("INSERT INTO obs_customers VALUES (%s, %s, %s)", (1, "Ada", TAX_ID))
        for _ in range(rounds):
            assert c.execute("SELECT pan FROM obs_cards WHERE id = 1").fetchone() == (PAN,)
            assert c.execute("SELECT tax_id FROM obs_customers").fetchall() == [(TAX_ID,)]
    with connect(p, "support_agent", application_name="helpdesk") as c:
        for _ in range(rounds):
            row = c.execute("SELECT id, pan FROM obs_cards ORDER BY id").fetchall()
            assert row[0] == (1, "************1111"), row
            try:
                c.execute("SELECT tax_id FROM obs_customers")
                raise AssertionError("tax_id must be denied to support_agent")
            except psycopg.errors.InsufficientPrivilege:
                pass
    with connect(p, "analyst") as c:  # a role the policy does not list: "unlisted"
        try:
            c.execute("SELECT 1")
        except psycopg.errors.InsufficientPrivilege:
            pass
    try:
        psycopg.connect(p.conninfo(user="support_agent", password="wrong"), connect_timeout=5)
        raise AssertionError("a wrong password must fail")
    except psycopg.OperationalError:
        pass


# ---------------------------------------------------------------------------- prometheus


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is required (apt-get install prometheus); this test must not skip"
    return path


class Prometheus:
    """A real Prometheus process scraping `targets` every second, with the shipped rules."""

    def __init__(self, workdir: Path, targets: list[str]) -> None:
        shutil.copy(ROOT / "config" / "alerts.yml", workdir / "alerts.yml")
        (workdir / "prometheus.yml").write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "rule_files: [alerts.yml]\n"
            "scrape_configs:\n"
            "  - job_name: strongroom\n"
            f"    static_configs: [{{targets: {json.dumps(targets)}}}]\n"
        )
        self.workdir = workdir
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        self._log = open(workdir / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [tool("prometheus"), f"--config.file={workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
             "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 15
        while True:
            assert self.proc.poll() is None, (workdir / "prometheus.log").read_text()
            try:
                with urllib.request.urlopen(f"{self.base}/-/ready", timeout=1) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "prometheus did not become ready"
            time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()

    def get(self, path: str, **params: str) -> dict:  # type: ignore[type-arg]
        url = f"{self.base}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=5) as resp:
            return json.loads(resp.read())

    def query(self, expr: str) -> dict[tuple[tuple[str, str], ...], float]:
        data = self.get("/api/v1/query", query=expr)
        assert data["status"] == "success", data
        return {
            tuple(sorted((k, v) for k, v in r["metric"].items() if k != "__name__")): float(
                r["value"][1]
            )
            for r in data["data"]["result"]
        }

    def wait_for(self, expr: str, ok: Any, timeout: float = 15.0) -> dict:  # type: ignore[type-arg]
        deadline = time.monotonic() + timeout
        result = self.query(expr)
        while not ok(result):
            assert time.monotonic() < deadline, f"{expr}: last result {result}"
            time.sleep(0.2)
            result = self.query(expr)
        return result


def total(samples: dict, /, **labels: str) -> float:  # type: ignore[type-arg]
    """Sum of the samples whose labels include `labels`."""
    return sum(v for k, v in samples.items() if all(dict(k).get(a) == b for a, b in labels.items()))
