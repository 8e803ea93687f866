"""The observability glue: reason folding, kind mapping, tags, audit key and config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from proxy import observability as obs
from proxy.gate import Gate
from proxy.metrics import POLICY_REASONS, QUERY_KINDS, Metrics
from proxy.policy import Decision
from proxy.settings import ConfigError, parse_text

DENIALS = {
    'role "x" is not in the policy (default: deny)': "default_deny",
    'role "x": statement does not parse; denied': "unparsable",
    'role "x": statement could not be classified (AlterFoo)': "unclassified",
    'role "x": the statement reads denied column public.c.tax_id': "column_denied",
    'role "x": the statement reads every column of public.c (a whole-row reference or *), '
    "including denied column public.c.tax_id": "column_denied",
    'role "x": ddl statements are not allowed (needs allow: ddl)': "kind_not_allowed",
    'role "x": select on public.zz is not allowed': "table_not_allowed",
    'role "x": relation zz does not resolve in search_path': "table_not_allowed",
    'role "x": set_config(\'role\') is a set_role, which is not allowed (needs allow: '
    'set_role)': "role_change",
    'role "x": a role startup option is a set_role, which is not allowed (needs allow: '
    'set_role)': "role_change",
    'role "x": select on public.c is not allowed (read by view public.v -> public.w)':
        "table_not_allowed",
    'role "x": the statement reads denied column public.c.tax_id (read by view public.v)':
        "column_denied",
    'role "x": select on public.c: view dependencies were not loaded for this session '
    '(expand_views was turned on after it started); reconnect': "unsupported",
}


@pytest.mark.parametrize("reason", sorted(DENIALS))
def test_reasons_fold_onto_the_fixed_enum(reason: str) -> None:
    assert obs.reason_label(reason, False) == DENIALS[reason]
    assert obs.reason_label(reason, True) == "allowed"


def test_gate_adapter_counts_by_bounded_labels() -> None:
    m = Metrics()
    m.set_known_roles(["support_agent"])
    adapter = obs.GateMetrics(m)
    for i in range(500):
        adapter.policy_decision(f"hostile{i}", Decision(False, f'role "h": select on t{i} is '
                                                        "not allowed"))
    adapter.policy_decision("support_agent", Decision(True, "allowed"))
    labels = set(m.policy.cells)
    assert labels == {("unlisted", "deny", "table_not_allowed"),
                      ("support_agent", "allow", "allowed")}
    assert all(r in POLICY_REASONS for _, _, r in labels)


def test_every_analyzer_kind_has_a_metric_kind() -> None:
    from typing import get_args

    from proxy.sql.info import StatementKind

    for kind in get_args(StatementKind):
        assert obs.metric_kind(kind) in QUERY_KINDS
        assert obs.metric_kind(kind) != "other", kind


def test_query_kinds_follow_the_analysis_cache() -> None:
    m = Metrics()
    gate = Gate()
    kinds = obs.QueryKinds(m, gate)
    for sql in ("SELECT 1", "SELECT 2", "INSERT INTO t VALUES (1)", "BEGIN; COMMIT", "SELEC"):
        try:
            gate.analyses.analyze(sql)
        except Exception:
            pass
        kinds.count()
    assert m.query_counter("select")[0] == 2
    assert m.query_counter("insert")[0] == 1
    assert m.query_counter("transaction")[0] == 2
    assert m.query_counter("unparsed")[0] == 1


def test_rows_from_command_tags() -> None:
    def tag(t: bytes) -> bytes:
        return b"C" + (len(t) + 5).to_bytes(4, "big") + t + b"\0"

    assert obs.rows_from_tag(tag(b"SELECT 5")) == 5
    assert obs.rows_from_tag(tag(b"INSERT 0 2")) == 2
    assert obs.rows_from_tag(tag(b"CREATE TABLE")) is None


def test_audit_key_file_is_created_private_once(tmp_path: Path) -> None:
    key = tmp_path / "k" / "audit.key"
    assert obs.create_key_file(key)
    assert os.stat(key).st_mode & 0o777 == 0o600
    first = key.read_bytes()
    assert len(bytes.fromhex(first.decode().strip())) == 32
    assert not obs.create_key_file(key)
    assert key.read_bytes() == first


def test_audit_config_is_validated_and_built(tmp_path: Path) -> None:
    cfg_path = tmp_path / "s.yaml"
    cfg_path.write_text("audit: {path: a/audit.jsonl, max_bytes: 4096}\n")
    from proxy.settings import load

    cfg = load(cfg_path)
    with pytest.raises(ConfigError, match=r"audit\.key_file"):
        obs.build_audit(cfg)
    obs.create_key_file(tmp_path / "audit.key")
    log = obs.build_audit(cfg)
    assert log is not None and log.path == tmp_path / "a" / "audit.jsonl"
    log.close()
    with pytest.raises(ConfigError):
        parse_text("audit: {max_bytes: 4096}\n")  # neither path nor stdout
    with pytest.raises(ConfigError):
        parse_text("audit: {path: x, colour: red}\n")


def test_parse_time_is_observed_on_misses_only() -> None:
    m = Metrics()
    gate = Gate()
    settings = parse_text("{}", "<test>")
    obs.configure_metrics(m, settings, gate)
    assert gate.analyses.on_parse is not None

    def count() -> float:
        line = next(ln for ln in m.render().decode().splitlines()
                    if ln.startswith("strongroom_analyzer_parse_seconds_count"))
        return float(line.split()[-1])

    assert count() == 0
    for sql in ("SELECT 1", "SELECT 1", "SELEC", "SELEC", "SELECT a FROM t WHERE b = 1",
                "SELECT a FROM t WHERE b = 2"):  # repeats and same-template are hits
        try:
            gate.analyses.analyze(sql)
        except Exception:
            pass
    assert count() == 3
