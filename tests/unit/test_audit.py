"""Audit log: chain verification catches every kind of tampering and survives rotation."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from proxy.audit import (
    GENESIS,
    AuditLocked,
    AuditLog,
    audit_verify_main,
    canonical,
    compute_mac,
    order_rotated,
    statement_fingerprint,
    verify,
)

SECRET_PAN = "4111111111111111"
SECRET_TAX = "DE-TAX-987654321"


@pytest.fixture
def key() -> bytes:
    return os.urandom(32)


def _write_log(path: Path, key: bytes, n: int = 6) -> list[bytes]:
    log = AuditLog(path, key)
    log.connect(1001, "support_agent", "10.0.0.5:50412", "psql")
    for i in range(n):
        log.statement(
            1001,
            "support_agent",
            "10.0.0.5:50412",
            application_name="psql",
            kind="select",
            sql=f"SELECT pan FROM cards WHERE pan = '{SECRET_PAN}' AND id = {i}",
            tables=["public.cards"],
            columns={"public.cards.pan": "masked"},
            decision="allow",
            reason="allowed",
            rows=1,
        )
    log.disconnect(1001, "support_agent", "10.0.0.5:50412", "psql", reason="client_terminate")
    log.close()
    return path.read_bytes().splitlines(keepends=True)


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_clean_log_verifies_and_has_the_fields(tmp_path: Path, key: bytes) -> None:
    path = tmp_path / "audit.jsonl"
    lines = _write_log(path, key)
    res = verify([path], key, require_stop=True)
    assert res.ok, res
    assert res.records == len(lines) == 10
    recs = [json.loads(x) for x in lines]
    assert [r["event"] for r in recs[:2]] == ["start", "connect"]
    assert recs[0]["prev"] == GENESIS
    stmt = recs[2]
    for field in (
        "ts", "seq", "session", "role", "client", "application_name", "kind", "fingerprint",
        "statement", "tables", "columns", "decision", "reason", "rows", "prev", "mac",
    ):  # fmt: skip
        assert field in stmt, field
    assert stmt["ts"].endswith("Z") and len(stmt["ts"]) == len("2024-01-01T00:00:00.000Z")
    assert stmt["columns"] == {"public.cards.pan": "masked"}
    assert stmt["statement"] == "SELECT pan FROM cards WHERE pan = $1 AND id = $2"
    assert len(stmt["fingerprint"]) == 16
    assert [r["seq"] for r in recs] == list(range(1, 11))
    assert all(b[r] == a["mac"] for a, b, r in zip(recs, recs[1:], ["prev"] * 99, strict=False))
    assert SECRET_PAN.encode() not in path.read_bytes()


def test_wrong_key_fails(tmp_path: Path, key: bytes) -> None:
    path = tmp_path / "audit.jsonl"
    _write_log(path, key)
    res = verify([path], os.urandom(32))
    assert not res.ok and res.line == 1 and "MAC" in res.reason


def _tamper_and_verify(tmp_path: Path, key: bytes, mutate) -> tuple:  # type: ignore[no-untyped-def]
    path = tmp_path / "audit.jsonl"
    lines = _write_log(path, key)
    new_lines, bad_line = mutate(list(lines))
    path.write_bytes(b"".join(new_lines))
    res = verify([path], key)
    assert not res.ok
    assert res.file == str(path)
    assert res.line == bad_line, res
    assert res.where == f"{path}:{bad_line}"
    return res


def test_deleted_line_is_detected(tmp_path: Path, key: bytes) -> None:
    def mutate(lines: list[bytes]) -> tuple[list[bytes], int]:
        del lines[4]  # the 5th record
        return lines, 5  # the record now on line 5 no longer follows line 4

    res = _tamper_and_verify(tmp_path, key, mutate)
    assert "chain broken" in res.reason


def test_edited_field_is_detected(tmp_path: Path, key: bytes) -> None:
    def mutate(lines: list[bytes]) -> tuple[list[bytes], int]:
        lines[3] = lines[3].replace(b'"decision":"allow"', b'"decision":"deny"')
        return lines, 4

    res = _tamper_and_verify(tmp_path, key, mutate)
    assert "MAC" in res.reason


def test_edited_whitespace_is_detected(tmp_path: Path, key: bytes) -> None:
    def mutate(lines: list[bytes]) -> tuple[list[bytes], int]:
        lines[2] = lines[2].replace(b'","', b'", "', 1)
        return lines, 3

    res = _tamper_and_verify(tmp_path, key, mutate)
    assert "canonical" in res.reason


def test_reordered_lines_are_detected(tmp_path: Path, key: bytes) -> None:
    def mutate(lines: list[bytes]) -> tuple[list[bytes], int]:
        lines[3], lines[4] = lines[4], lines[3]
        return lines, 4

    res = _tamper_and_verify(tmp_path, key, mutate)
    assert "chain broken" in res.reason


def test_inserted_forged_line_is_detected(tmp_path: Path, key: bytes) -> None:
    def mutate(lines: list[bytes]) -> tuple[list[bytes], int]:
        prev = json.loads(lines[2])
        forged = dict(prev, seq=prev["seq"] + 1, prev=prev["mac"], role="nobody")
        forged["mac"] = compute_mac(os.urandom(32), prev["mac"], forged)  # no real key
        lines.insert(3, canonical(forged) + b"\n")
        return lines, 4

    res = _tamper_and_verify(tmp_path, key, mutate)
    assert "MAC" in res.reason


def test_replayed_line_is_detected(tmp_path: Path, key: bytes) -> None:
    def mutate(lines: list[bytes]) -> tuple[list[bytes], int]:
        lines.insert(6, lines[3])  # a genuine record, copied
        return lines, 7

    _tamper_and_verify(tmp_path, key, mutate)


def test_truncated_tail_is_detected(tmp_path: Path, key: bytes) -> None:
    def mutate(lines: list[bytes]) -> tuple[list[bytes], int]:
        lines[-1] = lines[-1][:40]
        return lines, len(lines)

    res = _tamper_and_verify(tmp_path, key, mutate)
    assert "truncated" in res.reason


def test_cut_whole_records_need_require_stop(tmp_path: Path, key: bytes) -> None:
    path = tmp_path / "audit.jsonl"
    lines = _write_log(path, key)
    path.write_bytes(b"".join(lines[:-2]))
    assert verify([path], key).ok  # the chain alone cannot see a clean cut ...
    res = verify([path], key, require_stop=True)  # ... the stop marker can
    assert not res.ok and res.line == len(lines) - 2 and "stop" in res.reason


def test_deleted_head_is_detected(tmp_path: Path, key: bytes) -> None:
    path = tmp_path / "audit.jsonl"
    lines = _write_log(path, key)
    path.write_bytes(b"".join(lines[2:]))
    res = verify([path], key)
    assert not res.ok and res.line == 1 and "does not start" in res.reason


def test_rotation_keeps_one_chain_across_files(tmp_path: Path, key: bytes) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, key, max_bytes=2000, keep=3)
    for i in range(60):
        log.statement(
            i,
            "etl_backup",
            "127.0.0.1:1",
            kind="copy_out",
            sql=f"COPY (SELECT * FROM cards WHERE id > {i}) TO STDOUT",
            tables=["public.cards"],
            columns={"public.cards.pan": "ciphertext"},
            decision="allow",
            rows=i,
        )
    log.close()
    names = sorted(p.name for p in tmp_path.glob("audit.jsonl*"))  # not the .lock
    assert names == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2", "audit.jsonl.3"]
    files = [tmp_path / n for n in ("audit.jsonl.3", "audit.jsonl.2", "audit.jsonl.1")]
    files.append(path)
    for f in files:
        assert f.stat().st_size < 2000 + 1000
        assert json.loads(_lines(f)[0])["event"] in ("rotate", "start")
    # The oldest files went to retention: the chain is intact but cannot be shown
    # complete, which is not OK (`audit verify` exits 3, "older files missing").
    res = verify(files, key, require_stop=True)
    assert not res.ok and res.incomplete, res
    assert res.reason.startswith("older files missing") and res.file == str(files[0]), res
    # Shell glob order is fixed up by order_rotated.
    assert order_rotated([str(f) for f in reversed(files)]) == [str(f) for f in files]
    # Files in the wrong order, or one missing in the middle, break the chain.
    swapped = [files[0], files[2], files[1], files[3]]
    bad = verify(swapped, key)
    assert not bad.ok and bad.file == str(files[2]) and bad.line == 1
    bad = verify([files[0], files[2], files[3]], key)
    assert not bad.ok and bad.file == str(files[2]) and bad.line == 1


def test_reopen_continues_the_chain(tmp_path: Path, key: bytes) -> None:
    path = tmp_path / "audit.jsonl"
    _write_log(path, key, n=2)
    _write_log(path, key, n=2)  # a restart appends to the same file
    res = verify([path], key, require_stop=True)
    assert res.ok and res.records == 12, res


def test_crash_partial_line_then_restart(tmp_path: Path, key: bytes) -> None:
    """A torn last line is cut off on start and sealed by a `gap` record chained from the
    last whole record: the chain goes on and verify reports the gap (it used to fail for
    ever at the torn line)."""
    path = tmp_path / "audit.jsonl"
    lines = _write_log(path, key, n=2)
    path.write_bytes(b"".join(lines[:-1]) + lines[-1][:30])  # crash mid-write
    log = AuditLog(path, key)
    log.close()
    res = verify([path], key, require_stop=True)
    assert res.ok, res
    assert len(res.gaps) == 1 and "torn tail of 30 bytes" in res.gaps[0], res
    recs = [json.loads(x) for x in _lines(path)]
    gap = recs[len(lines) - 1]
    assert gap["event"] == "gap" and gap["reason"] == "torn_tail"
    assert gap["prev"] == recs[len(lines) - 2]["mac"]
    assert [r["event"] for r in recs[len(lines):]] == ["start", "stop"]
    assert all(x.endswith(b"\n") for x in _lines(path))


def test_failed_and_short_writes_do_not_break_the_chain(tmp_path: Path, key: bytes) -> None:
    """A write error or a short write raises, leaves no torn line, rolls the chain back;
    the next record that gets written is preceded by a gap record saying how many were
    lost."""
    path = tmp_path / "audit.jsonl"
    mode = {"fail": None}
    failures: list[int] = []

    def writer(fd: int, data: bytes) -> int:
        if mode["fail"] == "enospc":
            raise OSError(28, "No space left on device")
        if mode["fail"] == "short":
            return os.write(fd, data[: len(data) // 2])
        return os.write(fd, data)

    log = AuditLog(path, key, writer=writer, on_write_failure=lambda: failures.append(1))
    log.connect(1, "app", "127.0.0.1:1")
    for how in ("enospc", "short"):
        mode["fail"] = how
        with pytest.raises(OSError):
            log.statement(1, "app", "127.0.0.1:1", kind="select", sql="SELECT 1",
                          decision="allow", phase="begin")
    assert failures == [1, 1] and log.lost == 2
    assert path.read_bytes().endswith(b"\n")
    mode["fail"] = None
    seq = log.statement(1, "app", "127.0.0.1:1", kind="select", sql="SELECT 1",
                        decision="allow", phase="begin")
    log.statement_end(1, seq, rows=3, outcome="complete")
    log.close()
    res = verify([path], key, require_stop=True)
    assert res.ok and len(res.gaps) == 1 and "2 record(s)" in res.gaps[0], res
    events = [json.loads(x)["event"] for x in _lines(path)]
    assert events == ["start", "connect", "gap", "statement", "statement_end", "stop"]


def test_second_writer_is_refused_by_the_lock(tmp_path: Path, key: bytes) -> None:
    path = tmp_path / "audit.jsonl"
    first = AuditLog(path, key)
    before = path.read_bytes()
    with pytest.raises(AuditLocked, match="in use by another running proxy"):
        AuditLog(path, key)
    assert path.read_bytes() == before  # no `start` record written into the live chain
    first.close()
    AuditLog(path, key).close()  # released at close
    assert verify([path], key, require_stop=True).ok


def test_stream_output(key: bytes) -> None:
    buf = io.StringIO()
    log = AuditLog(None, key, stream=buf)
    log.auth_failure(7, "mallory", "10.9.9.9:4444", "x" * 500, sqlstate="28P01")
    log.close()
    recs = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert [r["event"] for r in recs] == ["start", "auth_failure", "stop"]
    assert len(recs[1]["application_name"]) <= 70


def test_closed_log_drops_instead_of_raising(tmp_path: Path, key: bytes) -> None:
    log = AuditLog(tmp_path / "a.jsonl", key)
    log.close()
    log.disconnect(1, "app", "127.0.0.1:1")  # e.g. a session ending during shutdown
    assert log.dropped == 1
    assert verify([tmp_path / "a.jsonl"], key, require_stop=True).ok


def test_normalized_statements_carry_no_literals() -> None:
    cases = [
        f"INSERT INTO cards (pan) VALUES ('{SECRET_PAN}')",
        f"PREPARE p AS SELECT * FROM cards WHERE pan = '{SECRET_PAN}'",
        f"COMMENT ON TABLE cards IS '{SECRET_TAX}'",
        f"SELECT 1 /* {SECRET_PAN} */ -- {SECRET_TAX}\n",
        f"SELECT $tag${SECRET_PAN}$tag$, {SECRET_PAN}, x'ff', true",
        f"CREATE TABLE t (a text DEFAULT '{SECRET_TAX}')",
        f"DO $$BEGIN PERFORM '{SECRET_PAN}'; END$$",
    ]
    for sql in cases:
        fp, text = statement_fingerprint(sql)
        assert text is not None, sql
        assert SECRET_PAN not in text and SECRET_TAX not in text, text
        assert "true" not in text.lower() and "'ff'" not in text, text
    fp, text = statement_fingerprint("SELEC garbage 'unterminated")
    assert fp is None and text is None
    fp, text = statement_fingerprint(f"SELEC pan FROM cards WHERE pan = '{SECRET_PAN}'")
    assert fp is None and text is not None and SECRET_PAN not in text
    # Same fingerprint, other literal: served from the cache, which holds no literals.
    a = statement_fingerprint("SELECT * FROM cards WHERE pan = '1111'")
    b = statement_fingerprint("SELECT * FROM cards WHERE pan = '2222'")
    assert a == b and a[1] == "SELECT * FROM cards WHERE pan = $1"
    from proxy import audit

    assert not any("1111" in (v or "") for v in audit._FP_CACHE.values())


def test_cli(tmp_path: Path, key: bytes, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "audit.jsonl"
    lines = _write_log(path, key)
    hex_key = tmp_path / "audit.key"
    hex_key.write_text(key.hex() + "\n")
    raw_key = tmp_path / "audit.raw"
    raw_key.write_bytes(key)
    assert audit_verify_main([str(path), "--key-file", str(hex_key)]) == 0
    assert "OK: 10 records" in capsys.readouterr().out
    assert audit_verify_main([str(path), "--key-file", str(raw_key), "--require-stop"]) == 0
    del lines[3]
    path.write_bytes(b"".join(lines))
    assert audit_verify_main([str(path), "--key-file", str(hex_key)]) == 1
    assert f"FAIL {path}:4:" in capsys.readouterr().out
    assert audit_verify_main([str(path), "--key-file", str(tmp_path / "nope")]) == 2


def test_log_files_are_owner_only_including_rotated_ones(tmp_path: Path, key: bytes) -> None:
    """0600 whatever the umask (records name roles, clients and statements); rotated files
    keep it, and a file an older version left at 0644 is narrowed on open."""
    old_umask = os.umask(0o022)
    try:
        path = tmp_path / "audit.jsonl"
        log = AuditLog(path, key, max_bytes=1500, keep=3)
        for i in range(40):
            log.connect(i, "support_agent", "10.0.0.5:50412", "psql")
        log.close()
        files = sorted(tmp_path.iterdir())
        assert len(files) == 5, files  # the file, 3 rotated ones and the hidden .lock
        for f in files:
            assert f.stat().st_mode & 0o777 == 0o600, (f.name, oct(f.stat().st_mode))

        legacy = tmp_path / "legacy.jsonl"
        legacy.write_bytes(b"")
        legacy.chmod(0o644)
        AuditLog(legacy, key).close()
        assert legacy.stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old_umask)
