"""Deployment files hang together: no docker engine runs here, so check their structure.

docker-compose.yml is parsed with PyYAML: services, ports, and every bind-mounted host path
must exist in the repo; the files those mounts carry must agree with each other (the
scrape target, the metrics port, the config path in the Dockerfile's ENTRYPOINT). The
dashboard and alert rules may only use metric names the proxy really exports.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from pglast import parser
from prometheus_client.parser import text_string_to_metric_families

from proxy.metrics import Metrics
from proxy.settings import load

ROOT = Path(__file__).resolve().parent.parent.parent


def _compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _mounts(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(kind, source, target) for short and long volume syntax; kind is bind or volume."""
    out = []
    for v in service.get("volumes", []):
        if isinstance(v, str):
            source, target = v.split(":")[:2]
            kind = "bind" if source.startswith((".", "/")) else "volume"
        else:
            source, target, kind = v["source"], v["target"], v.get("type", "volume")
        out.append((kind, source, target))
    return out


def _ports(service: dict[str, Any]) -> set[int]:
    """Container ports a service publishes."""
    ports = set()
    for p in service.get("ports", []):
        if isinstance(p, dict):
            ports.add(int(p["target"]))
        else:
            ports.add(int(str(p).rsplit(":", 1)[-1].split("/")[0]))
    return ports


def test_services_exist_with_their_images() -> None:
    services = _compose()["services"]
    assert {"postgres", "strongroom", "prometheus"} <= set(services)
    assert services["postgres"]["image"].startswith("postgres:15")
    assert services["prometheus"]["image"].startswith("prom/prometheus")
    build = services["strongroom"]["build"]
    context = build if isinstance(build, str) else build.get("context", ".")
    assert (ROOT / context / "Dockerfile").is_file()


def test_ports() -> None:
    services = _compose()["services"]
    assert {6432, 9187} <= _ports(services["strongroom"])
    assert 9090 in _ports(services["prometheus"])
    if "grafana" in services:
        assert 3000 in _ports(services["grafana"])


def test_every_bind_mount_exists_and_volumes_are_declared() -> None:
    compose = _compose()
    declared = set(compose.get("volumes") or {})
    binds = 0
    for name, service in compose["services"].items():
        for kind, source, _target in _mounts(service):
            if kind == "bind":
                assert not source.startswith("/"), f"{name}: absolute host path {source}"
                assert (ROOT / source).exists(), f"{name}: {source} does not exist in the repo"
                binds += 1
            else:
                assert source in declared, f"{name}: volume {source} not declared"
    assert binds >= 4


def test_mounted_files_agree_with_each_other() -> None:
    services = _compose()["services"]
    sr_targets = {t: s for _, s, t in _mounts(services["strongroom"])}
    dockerfile = (ROOT / "Dockerfile").read_text()
    entry = re.search(r"^ENTRYPOINT\s+(\[.*\])\s*$", dockerfile, re.M)
    assert entry
    argv = json.loads(entry.group(1))
    assert argv[:2] == ["strongroom", "serve"]
    config_target = argv[argv.index("--config") + 1]
    assert config_target in sr_targets, "the ENTRYPOINT's config is not mounted"
    assert re.search(r"^FROM python:3\.11-slim\s*$", dockerfile, re.M)
    assert re.search(r"^EXPOSE\s+6432\s+9187\s*$", dockerfile, re.M)
    users = re.findall(r"^USER\s+(\S+)", dockerfile, re.M)
    assert users and users[-1] not in ("root", "0")

    # The proxy config loads with the real loader and matches the topology.
    settings = load(ROOT / sr_targets[config_target])
    assert settings.listen.host == "0.0.0.0" and settings.listen.port == 6432
    assert settings.metrics.host == "0.0.0.0" and settings.metrics.port == 9187
    assert settings.upstream.host == "postgres"
    for section in ("keys", "protect", "roles", "default", "audit"):
        assert section in settings.raw, section

    # Prometheus scrapes strongroom:9187 and loads the mounted alert rules.
    pr_targets = {t: s for _, s, t in _mounts(services["prometheus"])}
    prom_cfg = yaml.safe_load((ROOT / pr_targets["/etc/prometheus/prometheus.yml"]).read_text())
    targets = [
        t
        for job in prom_cfg["scrape_configs"]
        for sc in job["static_configs"]
        for t in sc["targets"]
    ]
    assert "strongroom:9187" in targets
    for rule_file in prom_cfg["rule_files"]:
        assert rule_file in pr_targets, f"rule file {rule_file} is not mounted"
        assert pr_targets[rule_file].endswith("config/alerts.yml")


def test_init_sql_creates_protected_bytea_columns() -> None:
    sql = (ROOT / "docker" / "init" / "01-schema.sql").read_text()
    columns: dict[str, dict[str, str]] = {}
    for raw in parser.parse_sql(sql):
        stmt = raw.stmt
        if type(stmt).__name__ != "CreateStmt":
            continue
        cols = {}
        for elt in stmt.tableElts:
            if type(elt).__name__ == "ColumnDef":
                cols[elt.colname] = elt.typeName.names[-1].sval
        columns[stmt.relation.relname] = cols
    expected = {
        "customers": ["tax_id", "tax_id_bidx", "address"],
        "accounts": ["iban", "balance"],
        "cards": ["pan", "pan_bidx", "expiry"],
    }
    for table, protected in expected.items():
        for col in protected:
            assert columns[table][col] == "bytea", f"{table}.{col}"
    assert "CREATE ROLE app LOGIN" in sql
    # Every protected column of the compose config exists in the schema as bytea.
    cfg = yaml.safe_load((ROOT / "docker" / "strongroom.yaml").read_text())
    for name in cfg["protect"]:
        _schema, table, col = name.split(".")
        assert columns[table][col] == "bytea", name


def _exported_names() -> set[str]:
    m = Metrics()
    m.set_protected_columns(["public.cards.pan"])
    m.set_key_ids({"public.cards.pan": [1]})
    names = {"up"}
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    for fam in text_string_to_metric_families(m.render().decode()):
        # Families without samples yet (labelled, never incremented) still count.
        names.update(fam.name + suffix for suffix in suffixes[fam.type])
    return names


def _metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(strongroom_[a-z0-9_]+|up)\b", expr))


def test_dashboard_and_alerts_use_only_exported_metrics() -> None:
    exported = _exported_names()
    dash = json.loads((ROOT / "config" / "grafana-dashboard.json").read_text())
    used: set[str] = set()
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            used |= _metric_names(target["expr"])
    alerts = yaml.safe_load((ROOT / "config" / "alerts.yml").read_text())
    for group in alerts["groups"]:
        for rule in group["rules"]:
            used |= _metric_names(rule["expr"])
    assert used, "no metric names found"
    assert used <= exported, used - exported


def test_grafana_provisioning_points_at_the_dashboard() -> None:
    services = _compose()["services"]
    if "grafana" not in services:
        return
    mounts = {t: s for _, s, t in _mounts(services["grafana"])}
    prov = ROOT / mounts["/etc/grafana/provisioning"]
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())
    assert ds["datasources"][0]["url"] == "http://prometheus:9090"
    dashboards = yaml.safe_load((prov / "dashboards" / "strongroom.yml").read_text())
    folder = dashboards["providers"][0]["options"]["path"]
    assert any(t.startswith(folder + "/") and s.endswith(".json") for t, s in mounts.items())
