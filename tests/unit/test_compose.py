"""Deployment files hang together: no docker engine runs here, so check their structure.

docker-compose.yml is parsed with PyYAML: services, ports, and every bind-mounted host path
must exist in the repo; the files those mounts carry must agree with each other (the
scrape target, the metrics port, the config path in the Dockerfile's ENTRYPOINT). The
dashboard and alert rules may only use metric names the proxy really exports.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
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
    config_target = _dockerfile_env(dockerfile)["STRONGROOM_CONFIG"]
    assert config_target in sr_targets, "the image's STRONGROOM_CONFIG is not mounted"
    assert re.search(r"^FROM python:3\.11\.\d+-slim-bookworm\s*$", dockerfile, re.M)
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
    """Every series of a proxy with audit.anchor configured (no connection is made)."""
    import tempfile

    from proxy.audit import AuditLog
    from proxy.audit_anchor import Anchor, AnchorConfig, AuditCollector

    m = Metrics()
    m.set_protected_columns(["public.cards.pan"])
    m.set_key_ids({"public.cards.pan": [1]})
    with tempfile.TemporaryDirectory() as tmp:
        audit = AuditLog(Path(tmp) / "audit.jsonl", b"k" * 32)
        audit.close()
    m.registry.register(AuditCollector(audit, Anchor(audit, AnchorConfig(dsn="postgresql://"))))
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


# --------------------------------------------------------------------------- image and entrypoint
# hadolint-like checks in Python (no hadolint, no Docker engine here), plus the agreement
# between the image, its entrypoint, the compose file and the mounted configuration.

ENTRYPOINT_SCRIPT = ROOT / "docker" / "entrypoint.sh"


def _dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    joined = re.sub(r"\\\n", " ", "\n".join(
        line for line in text.splitlines() if not line.lstrip().startswith("#")))
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _dockerfile_env(text: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for word, args in _dockerfile_instructions(text):
        if word == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", args)))
    return env


def dockerfile_healthcheck(text: str) -> str:
    """The shell command of the image's HEALTHCHECK (run by tests/integration)."""
    checks = [a for w, a in _dockerfile_instructions(text) if w == "HEALTHCHECK"]
    assert len(checks) == 1, "exactly one HEALTHCHECK"
    cmd = checks[0].split(" CMD ", 1)
    assert len(cmd) == 2 and not cmd[1].lstrip().startswith("["), "HEALTHCHECK ... CMD shell"
    return cmd[1].strip()


def test_dockerfile_installs_the_package_runs_unprivileged_and_checks_health() -> None:
    text = (ROOT / "Dockerfile").read_text()
    ins = _dockerfile_instructions(text)
    words = [w for w, _ in ins]
    # Base image pinned to a patch release (hadolint DL3006/DL3007 go further than a tag).
    base = next(a for w, a in ins if w == "FROM")
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base), base
    # An ordinary install, no source-tree workaround on the path.
    assert "PYTHONPATH" not in text
    runs = " ".join(a for w, a in ins if w == "RUN")
    assert re.search(r"\bpip install \.(\s|$)", runs)
    # Non-root: the last USER is a named, non-root user created in the image, and it owns
    # the volume directories it writes (keys 0700).
    users = [a for w, a in ins if w == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert "useradd" in runs and users[-1] in runs
    for directory in ("/var/lib/strongroom/keys", "/var/log/strongroom"):
        assert directory in runs
    assert re.search(r"chown -R \S+ /var/lib/strongroom /var/log/strongroom", runs)
    assert "chmod 0700 /var/lib/strongroom/keys" in runs
    assert words.index("USER") > words.index("RUN")
    # Health: a HEALTHCHECK against /healthz on the metrics port, after USER.
    health = dockerfile_healthcheck(text)
    env = _dockerfile_env(text)
    assert "STRONGROOM_HEALTH_URL" in health
    assert env["STRONGROOM_HEALTH_URL"] == "http://127.0.0.1:9187/healthz"
    # The entrypoint is the repo's script, copied executable.
    entry = json.loads(next(a for w, a in ins if w == "ENTRYPOINT"))
    copies = [a.split() for w, a in ins if w == "COPY"]
    script = [c for c in copies if c[-1].endswith("/" + entry[0])]
    assert script and script[0][-2] == "docker/entrypoint.sh", (entry, copies)
    assert "--chmod=0755" in script[0]
    assert "CMD" not in words, "arguments come from compose/docker run, not a baked CMD"


def test_entrypoint_script_is_executable_posix_sh_and_execs_serve() -> None:
    assert os.access(ENTRYPOINT_SCRIPT, os.X_OK), "chmod +x docker/entrypoint.sh"
    text = ENTRYPOINT_SCRIPT.read_text()
    assert text.startswith("#!/bin/sh\n")
    assert subprocess.run(["sh", "-n", str(ENTRYPOINT_SCRIPT)]).returncode == 0
    assert "set -eu" in text
    assert re.search(r'^exec strongroom serve --config "\$config" "\$@"$', text, re.M)
    assert re.search(r"^python -m proxy\.bootstrap --config \"\$config\"$", text, re.M)
    default = re.search(r'config="\$\{STRONGROOM_CONFIG:-(\S+)\}"', text)
    assert default and default.group(1) == _dockerfile_env(
        (ROOT / "Dockerfile").read_text())["STRONGROOM_CONFIG"]


def test_compose_strongroom_service_agrees_with_the_image_and_its_config() -> None:
    compose = _compose()
    sr = compose["services"]["strongroom"]
    env = _dockerfile_env((ROOT / "Dockerfile").read_text())
    # The image's entrypoint runs as is: no command or entrypoint override that would skip
    # the first-start key creation.
    assert "entrypoint" not in sr and "command" not in sr
    config = sr.get("environment", {}).get("STRONGROOM_CONFIG", env["STRONGROOM_CONFIG"])
    mounts = {t: (k, s) for k, s, t in _mounts(sr)}
    assert config in mounts and mounts[config][0] == "bind"
    assert any(v.startswith(f"{mounts[config][1]}:{config}:ro") for v in sr["volumes"]
               if isinstance(v, str)), "the configuration is mounted read-only"
    settings = load(ROOT / mounts[config][1])
    raw = settings.raw
    # Everything the process writes lives on a named volume, never in the image or /etc.
    volume_dirs = {t for t, (k, _s) in mounts.items() if k == "volume"}
    written = {
        "keys.path": raw["keys"]["path"],
        "keys.keyring": raw["keys"]["keyring"],
        "audit.key_file": raw["audit"]["key_file"],
        "audit.path": raw["audit"]["path"],
    }
    for key, path in written.items():
        assert Path(path).is_absolute(), key
        assert str(Path(path).parent) in volume_dirs, f"{key} ({path}) is not on a volume"
    assert raw["keys"].get("provider", "local") == "local"
    # Ports: the ones the config listens on are published, and the health probe asks the
    # metrics port's /healthz.
    assert {settings.listen.port, settings.metrics.port} <= _ports(sr)
    probe = " ".join(sr["healthcheck"]["test"])
    assert f"127.0.0.1:{settings.metrics.port}/healthz" in probe
    assert env["STRONGROOM_HEALTH_URL"] == f"http://127.0.0.1:{settings.metrics.port}/healthz"


def test_compose_healthchecks_ordering_and_pinned_images() -> None:
    services = _compose()["services"]
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name}: no healthcheck"
        deps = service.get("depends_on", {})
        assert isinstance(deps, dict), f"{name}: depends_on must wait for health"
        for dep, cond in deps.items():
            assert cond == {"condition": "service_healthy"}, (name, dep)
            assert dep in services
    assert services["prometheus"]["depends_on"] == {"strongroom": {"condition": "service_healthy"}}
    assert re.fullmatch(r"postgres:15\.\d+", services["postgres"]["image"])
    assert re.fullmatch(r"prom/prometheus:v\d+\.\d+\.\d+", services["prometheus"]["image"])
    if "grafana" in services:
        assert re.fullmatch(r"grafana/grafana:\d+\.\d+\.\d+", services["grafana"]["image"])
