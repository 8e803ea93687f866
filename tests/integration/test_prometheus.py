"""A real Prometheus scrapes a real proxy's /metrics; promtool checks the shipped configs.

The scrape target is a `strongroom serve` subprocess (encryption + policy + audit, metrics
port from its config; see observability_env.py) driven by real clients. Every tool here is
the real binary from the Debian `prometheus` package: missing means failure, not a skip,
because a skipped observability test proves nothing.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy import devcluster
from tests.conftest import ProxyProcess
from tests.integration.observability_env import (
    Prometheus,
    start_observed_proxy,
    tool,
    total,
    traffic,
)

ROOT = Path(__file__).resolve().parent.parent.parent


_tool = tool


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


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    """Each rule of config/alerts.yml is exercised by tests/data/alerts_test.yml (which
    promtool runs above) both firing and staying quiet, including the operational ones:
    max_clients rejections, an authentication failure spike, statement latency p99."""
    import yaml

    rules = yaml.safe_load((ROOT / "config" / "alerts.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert {"ClientsRejectedAtMaxClients", "AuthFailuresSpike",
            "StatementLatencyP99High"} <= alerts
    unit = yaml.safe_load((ROOT / "tests" / "data" / "alerts_test.yml").read_text())
    cases = [c for t in unit["tests"] for c in t.get("alert_rule_test", [])]
    fires = {c["alertname"] for c in cases if c.get("exp_alerts")}
    quiet = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    assert alerts - fires == set(), "alerts never tested firing"
    assert alerts - quiet == set(), "alerts never tested quiet"
    assert (fires | quiet) <= alerts, "unit tests for alerts that do not exist"


@pytest.fixture
def scraped_proxy(pg: devcluster.Cluster, tmp_path: Path,
                  ) -> Iterator[tuple[ProxyProcess, Prometheus]]:
    p = start_observed_proxy(pg)
    prom = Prometheus(tmp_path, [f"127.0.0.1:{p.config['metrics']['port']}"])
    try:
        yield p, prom
    finally:
        prom.stop()
        p.stop()


def test_real_prometheus_scrapes_the_proxy_and_series_move(
    scraped_proxy: tuple[ProxyProcess, Prometheus],
) -> None:
    p, prom = scraped_proxy
    up = prom.wait_for('up{job="strongroom"}', lambda r: list(r.values()) == [1.0])
    assert up
    traffic(p)
    conns = prom.wait_for(
        "strongroom_client_connections_total", lambda r: total(r, result="accepted") >= 4
    )
    first_accepted = total(conns, result="accepted")
    first_queries = total(prom.wait_for(
        'strongroom_queries_total{kind="select"}', lambda r: total(r) > 0))
    denials = prom.wait_for(
        'strongroom_policy_decisions_total{decision="deny"}',
        lambda r: total(r, role="support_agent") > 0 and total(r, role="unlisted") > 0,
    )
    assert total(denials, role="support_agent", reason="column_denied") >= 1
    assert total(denials, role="unlisted", reason="default_deny") >= 1
    decrypts = prom.wait_for(
        'strongroom_crypto_operations_total{op="decrypt",result="ok"}',
        lambda r: total(r, column="public.obs_cards.pan") > 0,
    )
    first_decrypts = total(decrypts, column="public.obs_cards.pan")
    assert total(decrypts, column="public.obs_customers.tax_id") > 0
    enc = prom.query('strongroom_crypto_operations_total{op="encrypt",result="ok"}')
    assert total(enc, column="public.obs_cards.pan") >= 2  # a literal and a parameter
    assert total(prom.query("strongroom_auth_failures_total")) >= 1
    assert total(prom.query('strongroom_errors_total{sqlstate="42501"}')) >= 1
    assert total(prom.query("strongroom_upstream_connect_seconds_count")) >= 4
    assert total(prom.query("strongroom_query_duration_seconds_count")) > 0
    assert total(prom.query('strongroom_bytes_total{direction="server_to_client"}')) > 0
    keys = prom.query("strongroom_key_ids_in_use")
    assert {dict(k)["column"] for k in keys} == {"public.obs_cards.pan",
                                                 "public.obs_customers.tax_id"}
    assert total(prom.query("strongroom_build_info")) == 1

    # The series move as traffic runs.
    traffic(p, rounds=3)
    prom.wait_for("strongroom_client_connections_total",
                  lambda r: total(r, result="accepted") >= first_accepted + 4)
    prom.wait_for('strongroom_queries_total{kind="select"}',
                  lambda r: total(r) > first_queries)
    prom.wait_for('strongroom_crypto_operations_total{op="decrypt",result="ok"}',
                  lambda r: total(r, column="public.obs_cards.pan") >= first_decrypts + 3)
    prom.wait_for("strongroom_client_connections_active", lambda r: total(r) == 0)

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
