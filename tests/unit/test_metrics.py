"""Metrics: valid exposition (checked by the real promtool) and bounded cardinality.

The cardinality tests play a hostile client: whatever strings reach the event methods,
the number of series must stay within what the configuration and fixed enums allow.
"""

from __future__ import annotations

import shutil
import subprocess
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.metrics import (
    CRYPTO_OPS,
    DISCONNECT_REASONS,
    PG_SQLSTATES,
    POLICY_REASONS,
    QUERY_KINDS,
    Metrics,
    bounded_sqlstate,
    query_kind,
    stop_http,
    worker_port,
)

ROLES = ["support_agent", "payments_service", "etl_backup"]
COLUMNS = ["public.cards.pan", "public.customers.tax_id", "public.accounts.iban"]


def _promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is required (apt-get install prometheus); this test must not skip"
    return path


def _series(m: Metrics) -> dict[str, set[tuple[tuple[str, str], ...]]]:
    """Metric family name -> set of label sets, as a scraper would see them."""
    out: dict[str, set[tuple[tuple[str, str], ...]]] = {}
    for fam in text_string_to_metric_families(m.render().decode()):
        for s in fam.samples:
            out.setdefault(s.name, set()).add(tuple(sorted(s.labels.items())))
    return out


def _value(m: Metrics, name: str, **labels: str) -> float:
    for fam in text_string_to_metric_families(m.render().decode()):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise AssertionError(f"no sample {name} {labels}")


def _busy_metrics() -> Metrics:
    m = Metrics()
    m.set_known_roles(ROLES)
    m.set_protected_columns(COLUMNS)
    m.set_key_ids({"public.cards.pan": [1, 2], "public.customers.tax_id": [7]})
    m.track_plan_cache(lambda: (41, 3))
    for _ in range(3):
        m.client_accepted()
    m.client_rejected()
    m.client_closed("client_terminate")
    m.startup_began()
    m.startup_began()
    m.startup_ended()
    m.startup_rejected("per_ip")
    m.upstream_connected(0.004)
    m.upstream_connect_failed()
    m.upstream_response(0.0007)
    m.query_done("select", 0.0012)
    m.query_done("InsertStmt", 0.002)
    m.query("TransactionStmt")
    m.bytes_in(120)
    m.bytes_out(4096)
    m.policy_decision("support_agent", "deny", "column_denied")
    m.policy_decision("payments_service", "allow", "allowed")
    m.crypto_done("public.cards.pan", "decrypt", ok=10, errors=1, seconds=0.00002)
    m.crypto_done("public.cards.pan", "encrypt", ok=2, seconds=0.00001)
    m.crypto_done("public.customers.tax_id", "blind_index", ok=1, seconds=0.000003)
    m.analyzer_parsed(0.00004)
    m.protocol_error("08P01")
    m.error_sent("42501")
    m.auth_failed("28P01")
    m.config_reloaded(True)
    m.config_reloaded(False)
    return m


def test_exposition_passes_promtool_check_metrics() -> None:
    text = _busy_metrics().render()
    proc = subprocess.run(
        [_promtool(), "check", "metrics"], input=text, capture_output=True, timeout=30
    )
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()
    # promtool prints lint warnings (naming, units) with exit code 0 in some versions.
    assert proc.stdout.strip() == b"" and proc.stderr.strip() == b"", proc.stdout + proc.stderr


def test_series_and_values() -> None:
    m = _busy_metrics()
    assert _value(m, "strongroom_client_connections_active") == 2
    assert _value(m, "strongroom_client_connections_total", result="accepted") == 3
    assert _value(m, "strongroom_client_connections_total", result="rejected") == 1
    assert _value(m, "strongroom_client_disconnections_total", reason="client_terminate") == 1
    assert _value(m, "strongroom_upstream_connections_active") == 1
    assert _value(m, "strongroom_client_connections_starting") == 1
    assert _value(m, "strongroom_startups_rejected_total", reason="per_ip") == 1
    assert _value(m, "strongroom_startups_rejected_total", reason="total") == 0
    assert _value(m, "strongroom_upstream_connect_seconds_count") == 1
    assert _value(m, "strongroom_upstream_connect_failures_total") == 1
    assert _value(m, "strongroom_queries_total", kind="select") == 1
    assert _value(m, "strongroom_queries_total", kind="insert") == 1
    assert _value(m, "strongroom_queries_total", kind="transaction") == 1
    assert _value(m, "strongroom_query_duration_seconds_count") == 2
    assert _value(m, "strongroom_bytes_total", direction="client_to_server") == 120
    assert _value(m, "strongroom_bytes_total", direction="server_to_client") == 4096
    assert (
        _value(
            m,
            "strongroom_policy_decisions_total",
            role="support_agent",
            decision="deny",
            reason="column_denied",
        )
        == 1
    )
    pan = "public.cards.pan"
    assert (
        _value(m, "strongroom_crypto_operations_total", column=pan, op="decrypt", result="ok") == 10
    )
    assert (
        _value(m, "strongroom_crypto_operations_total", column=pan, op="decrypt", result="error")
        == 1
    )
    assert _value(m, "strongroom_crypto_seconds_count", op="decrypt") == 1
    assert _value(m, "strongroom_analyzer_cache_total", result="hit") == 41
    assert _value(m, "strongroom_analyzer_cache_total", result="miss") == 3
    assert _value(m, "strongroom_analyzer_parse_seconds_count") == 1
    assert _value(m, "strongroom_protocol_errors_total", sqlstate="08P01") == 1
    assert _value(m, "strongroom_errors_total", sqlstate="42501") == 1
    assert _value(m, "strongroom_errors_total", sqlstate="28P01") == 1
    assert _value(m, "strongroom_auth_failures_total") == 1
    assert _value(m, "strongroom_config_reloads_total", result="ok") == 1
    assert _value(m, "strongroom_config_reloads_total", result="failed") == 1
    assert _value(m, "strongroom_key_ids_in_use", column=pan, key_id="2") == 1
    assert _value(m, "strongroom_build_info") == 1


def test_registries_are_independent() -> None:
    a, b = Metrics(), Metrics()
    a.client_accepted()
    assert _value(a, "strongroom_client_connections_total", result="accepted") == 1
    assert _value(b, "strongroom_client_connections_total", result="accepted") == 0


def test_hostile_inputs_do_not_grow_series() -> None:
    m = _busy_metrics()
    before = {name: len(labels) for name, labels in _series(m).items()}
    hostile = [f'evil_{i}\n"}} {{x="{i}' for i in range(10_000)]
    for i, s in enumerate(hostile):
        m.policy_decision(s, "deny" if i % 2 else s, s)
        m.policy_decision(s, "allow", "allowed")
        m.query(s)
        m.query_done(s, 0.001)
        m.protocol_error(s)
        m.error_sent(f"{i % 100000:05d}")  # syntactically valid, mostly unknown codes
        m.error_sent(f"Z{i % 10000:04d}")
        m.client_accepted()
        m.client_closed(s)
        m.crypto_done(s, "decrypt", ok=1)
    with pytest.raises(ValueError):
        m.crypto_done("public.cards.pan", "rot13", ok=1)  # ops come from code only
    after = _series(m)
    # Fixed upper bounds, independent of the 10,000 inputs.
    roles = len(ROLES) + 1  # + "unlisted"
    assert len(after["strongroom_policy_decisions_total"]) <= roles * 3 * len(POLICY_REASONS)
    assert len(after["strongroom_queries_total"]) == len(QUERY_KINDS)
    assert len(after["strongroom_client_disconnections_total"]) == len(DISCONNECT_REASONS)
    assert len(after["strongroom_protocol_errors_total"]) <= len(PG_SQLSTATES) + 1
    assert len(after["strongroom_errors_total"]) <= len(PG_SQLSTATES) + 1
    assert len(after["strongroom_crypto_operations_total"]) == (
        (len(COLUMNS) + 1) * len(CRYPTO_OPS) * 2)
    total = sum(len(v) for v in after.values())
    assert total <= sum(before.values()) + 2 * (len(PG_SQLSTATES) + 1) + roles * 3 * 13
    # Nothing a client sent is a label value.
    text = m.render().decode()
    assert "evil_" not in text and "Z0001" not in text
    roles_seen = {dict(ls)["role"] for ls in after["strongroom_policy_decisions_total"]}
    assert roles_seen <= {*ROLES, "unlisted"}
    # The hot-path caches stay bounded too.
    assert len(m._policy) <= 4096


def test_bounding_helpers() -> None:
    assert bounded_sqlstate("42501") == "42501"
    assert bounded_sqlstate(b"08P01") == "08P01"
    assert bounded_sqlstate("AB123") == "other"  # valid shape, not a PostgreSQL code
    assert bounded_sqlstate("4250") == "other"
    assert bounded_sqlstate("42501\n") == "other"
    assert bounded_sqlstate(None) == "other"
    assert query_kind("SelectStmt") == "select"
    assert query_kind("copy_out") == "copy_out"
    assert query_kind("DROP TABLE x") == "other"
    assert worker_port(9187, 0) == 9187 and worker_port(9187, 3) == 9190
    assert worker_port(0, 2) == 0


def test_reconfiguring_roles_and_key_ids() -> None:
    m = Metrics()
    m.policy_decision("alice", "allow", "allowed")
    assert _value(m, "strongroom_policy_decisions_total", role="unlisted") == 1
    m.set_known_roles(["alice"])
    m.policy_decision("alice", "allow", "allowed")
    assert _value(m, "strongroom_policy_decisions_total", role="alice") == 1
    m.set_protected_columns(["public.t.c"])
    m.set_key_ids({"public.t.c": [1]})
    m.set_key_ids({"public.t.c": [2]})
    ids = {dict(ls)["key_id"] for ls in _series(m)["strongroom_key_ids_in_use"]}
    assert ids == {"2"}


def test_http_endpoint_serves_metrics() -> None:
    m = _busy_metrics()
    server, port = m.start_http("127.0.0.1", 0)
    try:
        assert port > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            body = resp.read().decode()
        assert "strongroom_client_connections_total" in body
    finally:
        stop_http(server)


def test_lock_free_histogram_matches_prometheus_client() -> None:
    """The hand-written histogram exports exactly what prometheus_client's would."""
    from prometheus_client import CollectorRegistry, Histogram

    from proxy.metrics import LATENCY_BUCKETS

    reg = CollectorRegistry()
    ref = Histogram("ref_seconds", "reference", buckets=LATENCY_BUCKETS, registry=reg)
    m = Metrics()
    values = [0.0, 0.0001, 0.00010001, 0.001, 0.0049, 0.005, 0.7, 10.0, 11.0, 1e9]
    for v in values:
        ref.observe(v)
        m.query_done(None, v)

    def buckets(text: str, name: str) -> list[tuple[str, float]]:
        out = []
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name in (f"{name}_bucket", f"{name}_count", f"{name}_sum"):
                    out.append((s.name.rsplit("_", 1)[1] + s.labels.get("le", ""), s.value))
        return out

    from prometheus_client import generate_latest

    got = buckets(m.render().decode(), "strongroom_query_duration_seconds")
    want = buckets(generate_latest(reg).decode(), "ref_seconds")
    assert got == want


def test_hot_path_is_cheap() -> None:
    """A statement's metrics (kind, duration, bytes, decision) stay around a microsecond."""
    import time

    m = Metrics()
    m.set_known_roles(["app"])
    n = 20_000
    t0 = time.perf_counter()
    for _ in range(n):
        m.query("select")
        m.policy_decision("app", "allow", "allowed")
        m.bytes_in(64)
        m.bytes_out(512)
        m.query_done(None, 0.0004)
    per_statement = (time.perf_counter() - t0) / n
    assert per_statement < 20e-6, f"{per_statement * 1e6:.1f} us per statement"


def _get(port: int, path: str, method: str = "GET") -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_http_serves_metrics_only_at_metrics_and_health_at_healthz() -> None:
    """prometheus-client's default server answers every path with the metrics; ours
    answers /metrics, /healthz, and 404 elsewhere (a probe or scrape config pointed at a
    wrong path must fail, not pass on a scrape)."""
    m = _busy_metrics()
    healthy = [True]
    server, port = m.start_http("127.0.0.1", 0, healthy=lambda: healthy[0])
    try:
        status, body = _get(port, "/metrics")
        assert status == 200 and b"strongroom_client_connections_total" in body
        assert _get(port, "/healthz") == (200, b"ok\n")
        assert _get(port, "/healthz", "HEAD")[0] == 200
        for path in ("/", "/healthz/", "/metricsx", "/favicon.ico", "/metrics/x", "/readyz"):
            status, body = _get(port, path)
            assert status == 404, path
            assert b"strongroom_" not in body, path
        healthy[0] = False  # shutting down: the probe says so
        assert _get(port, "/healthz") == (503, b"stopping\n")
    finally:
        stop_http(server)


def test_standard_process_and_python_collectors() -> None:
    """process_* and python_* series, as every Prometheus dashboard expects of a process."""
    names = {fam.name for fam in text_string_to_metric_families(Metrics().render().decode())}
    for name in ("process_cpu_seconds", "process_resident_memory_bytes", "process_open_fds",
                 "process_start_time_seconds", "python_info", "python_gc_objects_collected",
                 "python_gc_collections"):
        assert name in names, name
    # Each Metrics has its own registry, so two of them never collide over these names.
    Metrics()
