"""The anchor's pure parts: the chain checked against an anchored head, the start-time
comparison, the audit directory's mode (the live behaviour: tests/integration/
test_audit_anchor.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from proxy.audit import AuditLog, private_dir, verify
from proxy.audit_anchor import Anchor, AnchorConfig, gap_reason, mac_at, quoted_table


@pytest.fixture
def key() -> bytes:
    return os.urandom(32)


def _log(path: Path, key: bytes, n: int, **kw: int) -> list[dict]:  # type: ignore[type-arg]
    log = AuditLog(path, key, **kw)
    for i in range(n):
        log.connect(i, "app", "10.0.0.1:5000")
    log.close()
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_verify_against_the_anchor(tmp_path: Path, key: bytes) -> None:
    path = tmp_path / "audit.jsonl"
    recs = _log(path, key, 10)
    head = recs[-1]
    assert verify([path], key, anchor=(head["seq"], head["mac"])).ok
    older = recs[4]  # an anchor from before the last records: still consistent
    assert verify([path], key, anchor=(older["seq"], older["mac"])).ok
    # Cut back to a record: intact chain, but behind the anchor.
    cut = b"".join(path.read_bytes().splitlines(keepends=True)[:6])
    path.write_bytes(cut)
    assert verify([path], key).ok
    res = verify([path], key, anchor=(head["seq"], head["mac"]))
    assert not res.ok and not res.incomplete
    assert f"records 7..{head['seq']} were cut" in res.reason, res
    # Another MAC at the anchored sequence: a replaced chain.
    res = verify([path], key, anchor=(older["seq"], "0" * 64))
    assert not res.ok and "different MAC" in res.reason, res


def test_gap_reason_at_start(tmp_path: Path, key: bytes) -> None:
    path = tmp_path / "audit.jsonl"
    recs = _log(path, key, 5)
    head = (recs[-1]["seq"], recs[-1]["mac"])
    lookup = lambda s: mac_at(path, 3, s)  # noqa: E731
    assert gap_reason(head, head, lookup) is None
    assert gap_reason(head, (2, recs[1]["mac"]), lookup) is None  # anchor lags: fine
    assert "behind its anchor" in (gap_reason((3, recs[2]["mac"]), head, lookup) or "")
    assert "different MAC" in (gap_reason(head, (head[0], "1" * 64), lookup) or "")
    assert "different MAC" in (gap_reason(head, (2, "1" * 64), lookup) or "")
    assert gap_reason(head, (2, "1" * 64), lambda s: None) is None  # rotated away


def test_mac_at_looks_into_rotated_files(tmp_path: Path, key: bytes) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, key, max_bytes=1024, keep=20)
    macs = {}
    for i in range(30):
        log.connect(i, "app", "10.0.0.1:5000")
        macs[log.seq] = log.last_mac
    log.close()
    assert (tmp_path / "audit.jsonl.2").exists()
    seqs = sorted(macs)
    for seq in (seqs[1], seqs[len(seqs) // 2], seqs[-1]):
        assert mac_at(path, 20, seq) == macs[seq]


def test_audit_directory_is_0700_and_a_writable_one_is_refused(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        target = tmp_path / "a" / "b"
        private_dir(target)
        assert (tmp_path / "a").stat().st_mode & 0o777 == 0o700
        assert target.stat().st_mode & 0o777 == 0o700
        target.chmod(0o775)
        with pytest.raises(PermissionError, match="group- or world-writable"):
            AuditLog(target / "audit.jsonl", b"k" * 32)
        target.chmod(0o755)  # only listable by others: a warning, not a refusal
        AuditLog(target / "audit.jsonl", b"k" * 32).close()
    finally:
        os.umask(old)


def test_anchor_table_names_are_identifiers() -> None:
    assert quoted_table("strongroom_audit_anchor") == '"strongroom_audit_anchor"'
    assert quoted_table("ops.anchor") == '"ops"."anchor"'
    for bad in ("a;drop table x", "a.b.c", "", '"x"'):
        with pytest.raises(ValueError):
            quoted_table(bad)


SECRET = "S3cretAnchorPw"
DSN = f"postgresql://strongroom:{SECRET}@db.internal:5432/audit"


@pytest.mark.parametrize("audit", [
    {"anchor": DSN},  # the DSN where the mapping belongs
    {"anchor": {"dsn": [DSN]}},
    {"anchor": {"dsn": DSN, "interval": "soon"}},
    {"anchor": {"dsn": f"host=db.internal password={SECRET}", "table": "bad name"}},
    DSN,
    {"anchor": {"dsn": DSN, "intervall": 5}},
])
def test_config_errors_never_quote_a_credential(audit: object) -> None:
    """A misplaced anchor DSN is a configuration error (check-config, start, SIGHUP, all
    of which print or log it): its text names the key and what is wrong, never the
    password jsonschema would quote with the value."""
    from proxy.settings import ConfigError, parse_text

    text = yaml.safe_dump({"listen": {"host": "127.0.0.1", "port": 6432},
                           "upstream": {"host": "127.0.0.1", "port": 5432}, "audit": audit})
    with pytest.raises(ConfigError) as err:
        parse_text(text, "strongroom.yaml")
    problems = "\n".join(err.value.problems)
    assert "strongroom.yaml:" in problems and "audit" in problems, problems
    assert SECRET not in problems and SECRET not in str(err.value), problems


def test_replicas_sharing_a_table_and_a_path_get_their_own_rows(tmp_path: Path,
                                                                  key: bytes) -> None:
    """Two hosts writing /var/log/strongroom/audit.jsonl into one anchor table: without
    `audit.anchor.instance` they share a row (each start would see the other's head as a
    cut); with it each keeps its own, and the default stays the path alone, stable across
    container restarts."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, key)
    try:
        plain = Anchor(log, AnchorConfig(dsn="x"))
        a = Anchor(log, AnchorConfig(dsn="x", instance="eu-1"))
        b = Anchor(log, AnchorConfig(dsn="x", instance="eu-2"))
    finally:
        log.close()
    assert plain.ident == str(path.resolve())
    assert a.ident == f"eu-1:{path.resolve()}" and b.ident == f"eu-2:{path.resolve()}"
    assert len({plain.ident, a.ident, b.ident}) == 3
