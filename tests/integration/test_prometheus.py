"""A real Prometheus scrapes Strongroom's /metrics; promtool checks the shipped configs.

For now the scrape target is the `Metrics` HTTP endpoint started in-process (the proxy is
not wired to it yet); the lead will point it at a real proxy subprocess once it is. Every
tool here is the real binary from the Debian `prometheus` package: missing means failure,
not a skip, because a skipped observability test proves nothing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.devcluster import free_port
from proxy.metrics import Metrics, stop_http

ROOT = Path(__file__).resolve().parent.parent.parent


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is required (apt-get install prometheus); this test must not skip"
    return path


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_promtool_check_config() -> None:
    proc = _run(_tool("promtool"), "check", "config", "config/prometheus.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = _run(_tool("promtool"), "check", "config", "docker/prometheus.yml", "--syntax-only")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_check_rules() -> None:
    proc = _run(_tool("promtool"), "check", "rules", "config/alerts.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_promtool_alert_unit_tests() -> None:
    """The alerts fire (and stay quiet) on synthetic series as intended."""
    proc = _run(_tool("promtool"), "test", "rules", "tests/data/alerts_test.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr


class _Prometheus:
    def __init__(self, base: str) -> None:
        self.base = base

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


@pytest.fixture
def scraped_metrics(tmp_path: Path) -> Iterator[tuple[Metrics, _Prometheus, Path]]:
    metrics = Metrics()
    metrics.set_known_roles(["support_agent"])
    metrics.set_protected_columns(["public.cards.pan"])
    server, mport = metrics.start_http("127.0.0.1", 0)
    shutil.copy(ROOT / "config" / "alerts.yml", tmp_path / "alerts.yml")
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "rule_files: [alerts.yml]\n"
        "scrape_configs:\n"
        "  - job_name: strongroom\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{mport}']}}]\n"
    )
    pport = free_port()
    log = open(tmp_path / "prometheus.log", "wb")
    proc = subprocess.Popen(
        [
            _tool("prometheus"),
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{pport}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    prom = _Prometheus(f"http://127.0.0.1:{pport}")
    try:
        deadline = time.monotonic() + 15
        while True:
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
            try:
                with urllib.request.urlopen(f"{prom.base}/-/ready", timeout=1) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "prometheus did not become ready"
            time.sleep(0.1)
        yield metrics, prom, tmp_path
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        stop_http(server)


def _wait_for(prom: _Prometheus, expr: str, ok, timeout: float = 10.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    result = prom.query(expr)
    while not ok(result):
        assert time.monotonic() < deadline, f"{expr}: last result {result}"
        time.sleep(0.2)
        result = prom.query(expr)
    return result


def test_real_prometheus_scrapes_and_series_move(
    scraped_metrics: tuple[Metrics, _Prometheus, Path],
) -> None:
    metrics, prom, _ = scraped_metrics
    for _ in range(3):
        metrics.client_accepted()
    metrics.client_rejected()
    metrics.query_done("select", 0.002)
    metrics.policy_decision("support_agent", "deny", "column_denied")
    metrics.policy_decision("a-client-made-this-up", "deny", "table_not_allowed")

    def key(result: dict, label: str) -> float | None:  # type: ignore[type-arg]
        for labels, value in result.items():
            if dict(labels).get("result") == label:
                return value
        return None

    first = _wait_for(
        prom, "strongroom_client_connections_total", lambda r: key(r, "accepted") == 3
    )
    assert key(first, "rejected") == 1
    up = prom.query('up{job="strongroom"}')
    assert list(up.values()) == [1.0]

    # The series move as traffic runs.
    for _ in range(5):
        metrics.client_accepted()
    _wait_for(prom, "strongroom_client_connections_total", lambda r: key(r, "accepted") == 8)
    active = _wait_for(prom, "strongroom_client_connections_active", lambda r: r)
    assert list(active.values()) == [8.0]
    roles = prom.query("sum by (role) (strongroom_policy_decisions_total)")
    assert {dict(k)["role"] for k in roles} == {"support_agent", "unlisted"}
    kinds = prom.query('strongroom_queries_total{kind="select"}')
    assert list(kinds.values()) == [1.0]

    # The shipped alert rules load into a real Prometheus.
    rules = prom.get("/api/v1/rules")["data"]["groups"]
    names = {r["name"] for g in rules for r in g["rules"]}
    assert {"ProxyDown", "UpstreamDown", "PolicyDenialsSpike", "DecryptFailures"} <= names

    # Every Grafana panel query is valid PromQL for this Prometheus.
    dash = json.loads((ROOT / "config" / "grafana-dashboard.json").read_text())
    for panel in dash["panels"]:
        for target in panel["targets"]:
            expr = (
                target["expr"]
                .replace("$__rate_interval", "1m")
                .replace("$job", "strongroom")
                .replace("$instance", ".*")
            )
            result = prom.get("/api/v1/query", query=expr)
            assert result["status"] == "success", (panel["title"], expr, result)
