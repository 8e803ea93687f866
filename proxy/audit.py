"""Tamper-evident audit log: JSON lines chained by HMAC-SHA256 (PCI DSS 10.2 / 10.3).

One record per event: `statement` (touched a protected column, or was denied),
`connect`, `disconnect`, `auth_failure`, plus the log's own `start`, `stop` and `rotate`.

Chain. Every record carries `prev`, the `mac` of the record before it (64 zeros for the
very first record of a chain), and `mac = HMAC-SHA256(key, bytes.fromhex(prev) ||
canonical JSON of the record without "mac")`. Canonical JSON is sorted keys, no spaces,
ASCII only; the line on disk *is* that canonical form plus `"mac"`, so the verifier can
also insist that each line is byte-for-byte what the writer produced. Because `prev` and
`seq` are inside the MAC, deleting, editing, reordering or inserting a line breaks the chain
at that line, and a forger without the key cannot repair it.

Rotation by size. When the file grows past `max_bytes` it is renamed to `FILE.1` (older
ones shift to `FILE.2` ... `FILE.<keep>`, the oldest beyond `keep` is removed) and the new
file starts with a `rotate` record whose `prev` is the last MAC of the previous file, so
`verify([FILE.2, FILE.1, FILE], key)` checks one unbroken chain across files. A file set
whose oldest file begins with a `rotate` record is accepted as "anchored at rotation":
its predecessor was removed by retention, which the verifier reports.

What it cannot see. A chain alone cannot prove that complete records were cut from the
end of the newest file; a half-written last line is detected, and `require_stop=True`
(CLI `--require-stop`) fails unless the newest record is the `stop` written on clean
shutdown. Ship records off the host (SIEM) for the rest.

No values. Statements are logged as the pglast fingerprint and a normalized text in which
every literal (string, number, bit string, boolean) is replaced by `$n` and comments are
dropped - done by re-scanning pglast's `normalize` output, because `normalize` leaves
literals in some utility statements (`PREPARE ... AS`, `COMMENT`, column defaults).
A statement that does not even scan is logged without text.

Cost. Records are small (< 1 KiB) and written with one `write` + `flush` each from the
event loop thread; a buffered append to a local file is a few microseconds and only
happens for audited statements. No fsync per record (that would cost milliseconds);
`flush()` hands the line to the kernel, so a proxy crash loses nothing, a host crash may.
With `workers: N`, give each worker its own file (`worker_path`): two processes appending
to one chain would interleave and break it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import sys
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

log = logging.getLogger("strongroom.audit")

GENESIS = "0" * 64
VIEWS = frozenset({"plaintext", "masked", "ciphertext", "deny"})
EVENTS = frozenset(
    {"start", "stop", "rotate", "connect", "disconnect", "auth_failure", "statement"}
)
_LITERAL_TOKENS = frozenset(
    {"SCONST", "USCONST", "ICONST", "FCONST", "BCONST", "XCONST", "TRUE_P", "FALSE_P"}
)
_COMMENT_TOKENS = frozenset({"C_COMMENT", "SQL_COMMENT"})
_MAX_TEXT = 64  # application_name and other client-supplied strings are cut to this


def canonical(record: Mapping[str, Any]) -> bytes:
    """The one byte form of a record that MACs are computed over and lines are written in."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def compute_mac(key: bytes, prev: str, record: Mapping[str, Any]) -> str:
    """HMAC-SHA256(key, prev MAC bytes || canonical record without "mac"), as hex."""
    body = {k: v for k, v in record.items() if k != "mac"}
    return hmac.new(key, bytes.fromhex(prev) + canonical(body), hashlib.sha256).hexdigest()


def utc_now() -> str:
    """RFC 3339 UTC timestamp with millisecond precision, e.g. 2024-05-01T12:00:00.123Z."""
    now = datetime.now(UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def worker_path(path: str | os.PathLike[str], worker_index: int) -> Path:
    """Per-worker audit file: `audit.jsonl` -> `audit.w1.jsonl` for worker 1 (0 keeps it)."""
    p = Path(path)
    if worker_index == 0:
        return p
    return p.with_name(f"{p.stem}.w{worker_index}{p.suffix}")


# --------------------------------------------------------------------------- statements


_FP_CACHE: dict[str, str | None] = {}
_FP_CACHE_SIZE = 4096
_FP_CACHE_MAX_TEXT = 64 * 1024  # a longer normalized text is not kept (bytes bound)


def statement_fingerprint(sql: str) -> tuple[str | None, str | None]:
    """(pglast fingerprint hex, normalized text without literal values) for `sql`.

    The normalized text is cached by fingerprint, not by `sql`: a cache keyed by the raw
    text would keep plaintext literals alive in memory. Statements with one fingerprint
    differ only in literals and layout, so the first one seen stands for all of them.
    """
    from pglast import parser

    try:
        fp: str | None = parser.fingerprint(sql)
    except Exception:
        fp = None
    if fp is not None and fp in _FP_CACHE:
        return fp, _FP_CACHE[fp]
    try:
        text = parser.normalize(sql)
    except Exception:
        text = sql  # unparsable: the scanner may still tokenize it
    redacted = _redact(text)
    if fp is not None and len(redacted or "") <= _FP_CACHE_MAX_TEXT:
        if len(_FP_CACHE) >= _FP_CACHE_SIZE:
            _FP_CACHE.pop(next(iter(_FP_CACHE)))
        _FP_CACHE[fp] = redacted
    return fp, redacted


def _redact(text: str) -> str | None:
    """Replace every literal token by `$n` (after the highest existing `$n`), drop comments."""
    from pglast import parser

    try:
        tokens = parser.scan(text)
    except Exception:
        return None  # cannot tell literals from the rest: log no text at all
    top = 0
    for t in tokens:
        if t.name == "PARAM":
            with contextlib.suppress(ValueError):
                top = max(top, int(text[t.start + 1 : t.end + 1]))
    out: list[str] = []
    pos = 0
    for t in tokens:
        if t.name in _LITERAL_TOKENS:
            top += 1
            out.append(text[pos : t.start])
            out.append(f"${top}")
            pos = t.end + 1
        elif t.name in _COMMENT_TOKENS:
            out.append(text[pos : t.start])
            pos = t.end + 1
    out.append(text[pos:])
    return re.sub(r"\s+", " ", "".join(out)).strip()


def _short(value: object) -> str | None:
    if value is None:
        return None
    text = str(value)
    return text if len(text) <= _MAX_TEXT else text[:_MAX_TEXT] + "..."


# --------------------------------------------------------------------------- writer


class AuditLog:
    """Appends chained records to a file (rotated by size) or to a stream such as stdout.

    Not for use by two processes at once; safe from several threads of one process.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        key: bytes,
        *,
        max_bytes: int = 100 * 1024 * 1024,
        keep: int = 10,
        stream: IO[str] | None = None,
    ) -> None:
        if not key:
            raise ValueError("audit key must not be empty")
        if path is None and stream is None:
            raise ValueError("an audit log needs a path or a stream")
        self.path = Path(path) if path is not None else None
        self._key = bytes(key)
        self.max_bytes = max_bytes
        self.keep = max(1, keep)
        self._stream = stream
        self._lock = threading.Lock()
        self._fh: IO[bytes] | None = None
        self._size = 0
        self.seq = 0
        self.last_mac = GENESIS
        self.dropped = 0
        if self.path is not None:
            self._open_file()
        self._append({"event": "start", "pid": os.getpid()})

    def __repr__(self) -> str:  # never the key
        return f"AuditLog(path={self.path!s}, seq={self.seq})"

    # ------------------------------------------------------------------ events

    def connect(
        self, session: int | str, role: str, client: str, application_name: str | None = None
    ) -> None:
        """A client finished authentication (role proved by the server)."""
        self._append(
            {
                "event": "connect",
                "session": session,
                "role": _short(role),
                "client": client,
                "application_name": _short(application_name),
            }
        )

    def disconnect(
        self,
        session: int | str,
        role: str,
        client: str,
        application_name: str | None = None,
        reason: str | None = None,
    ) -> None:
        self._append(
            {
                "event": "disconnect",
                "session": session,
                "role": _short(role),
                "client": client,
                "application_name": _short(application_name),
                "reason": reason,
            }
        )

    def auth_failure(
        self,
        session: int | str,
        role: str,
        client: str,
        application_name: str | None = None,
        sqlstate: str | None = None,
    ) -> None:
        """The server refused the client's credentials; `role` is the claimed user name."""
        self._append(
            {
                "event": "auth_failure",
                "session": session,
                "role": _short(role),
                "client": client,
                "application_name": _short(application_name),
                "sqlstate": sqlstate,
            }
        )

    def statement(
        self,
        session: int | str,
        role: str,
        client: str,
        *,
        application_name: str | None = None,
        kind: str,
        sql: str | None = None,
        fingerprint: tuple[str | None, str | None] | None = None,
        tables: Iterable[str] = (),
        columns: Mapping[str, str] | None = None,
        decision: str,
        reason: str | None = None,
        rows: int | None = None,
    ) -> None:
        """A statement that touched a protected column or was denied.

        Pass `sql` (fingerprinted and normalized here, never logged as is) or a
        precomputed `fingerprint=statement_fingerprint(sql)`. `columns` maps each protected
        `schema.table.column` to how it was returned: plaintext, masked, ciphertext, deny.
        """
        if fingerprint is None:
            fingerprint = statement_fingerprint(sql) if sql is not None else (None, None)
        fp, text = fingerprint
        cols = {c: (v if v in VIEWS else "unknown") for c, v in (columns or {}).items()}
        self._append(
            {
                "event": "statement",
                "session": session,
                "role": _short(role),
                "client": client,
                "application_name": _short(application_name),
                "kind": kind,
                "fingerprint": fp,
                "statement": text,
                "tables": sorted(set(tables)),
                "columns": cols,
                "decision": decision,
                "reason": reason,
                "rows": rows,
            }
        )

    def close(self) -> None:
        """Write the `stop` record (marks a clean end for `--require-stop`) and close."""
        with self._lock:
            if self._fh is None and self._stream is None:
                return
        self._append({"event": "stop", "pid": os.getpid()})
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None
            self._stream = None

    # ------------------------------------------------------------------ internals

    def _open_file(self) -> None:
        """Open for append, continuing the chain from the last record already in the file."""
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        seq, mac, partial = _tail_state(self.path)
        if seq is not None and mac is not None:
            self.seq, self.last_mac = seq, mac
        self._fh = _open_private(self.path)
        if partial:
            # A crash cut the last line. Finish it so later records stay line-aligned; the
            # verifier will (rightly) report the broken line.
            log.warning("audit log %s ends in a partial record", self.path)
            self._fh.write(b"\n")
            self._fh.flush()
        self._size = self._fh.tell()

    def _append(self, fields: dict[str, Any]) -> None:
        """Seal and write one record.

        After `close()` records are dropped and logged (a late disconnect during shutdown
        must not crash its session). A write error (disk full) rolls the chain state back
        and propagates: whether to fail closed is the caller's policy decision.
        """
        with self._lock:
            if self._fh is None and self._stream is None:
                self.dropped += 1
                log.error("audit log closed; dropped a %s record", fields.get("event"))
                return
            state = (self.seq, self.last_mac)
            line = self._seal(fields)
            try:
                if self._fh is not None:
                    self._fh.write(line)
                    self._fh.flush()
                else:
                    assert self._stream is not None
                    self._stream.write(line.decode())
                    self._stream.flush()
            except OSError:
                self.seq, self.last_mac = state
                raise
            if self._fh is not None:
                self._size += len(line)
                # Never after `stop`: the newest file must end with it (--require-stop).
                if self._size >= self.max_bytes and fields["event"] != "stop":
                    self._rotate()

    def _seal(self, fields: dict[str, Any]) -> bytes:
        self.seq += 1
        record = {"ts": utc_now(), "seq": self.seq, "prev": self.last_mac, **fields}
        record = {k: v for k, v in record.items() if v is not None}
        record["mac"] = compute_mac(self._key, self.last_mac, record)
        self.last_mac = record["mac"]
        return canonical(record) + b"\n"

    def _rotate(self) -> None:
        assert self.path is not None and self._fh is not None
        self._fh.close()
        oldest = self.path.with_name(f"{self.path.name}.{self.keep}")
        with contextlib.suppress(FileNotFoundError):
            oldest.unlink()
        for i in range(self.keep - 1, 0, -1):
            src = self.path.with_name(f"{self.path.name}.{i}")
            if src.exists():
                src.rename(self.path.with_name(f"{self.path.name}.{i + 1}"))
        self.path.rename(self.path.with_name(f"{self.path.name}.1"))
        self._fh = _open_private(self.path)
        line = self._seal({"event": "rotate", "previous_file": f"{self.path.name}.1"})
        self._fh.write(line)
        self._fh.flush()
        self._size = len(line)


def _open_private(path: Path) -> IO[bytes]:
    """Open `path` for append as a file only its owner can read (0600, whatever the umask).

    Audit records name roles, client addresses and normalized statements: not for every
    local user. A file left at a wider mode (an older version created 0644) is narrowed;
    rotated files keep the mode they were written with, so they stay 0600 too.
    """
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, 0o600)
        return os.fdopen(fd, "ab")
    except BaseException:
        os.close(fd)
        raise


def _tail_state(path: Path) -> tuple[int | None, str | None, bool]:
    """(seq, mac) of the last complete record of `path`, and whether a partial line follows."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return None, None, False
    if size == 0:
        return None, None, False
    with open(path, "rb") as fh:
        fh.seek(max(0, size - 65536))
        tail = fh.read()
    partial = not tail.endswith(b"\n")
    lines = tail.split(b"\n")
    complete = lines[:-1]  # the piece after the last newline is empty or partial
    for raw in reversed(complete):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
            return int(rec["seq"]), str(rec["mac"]), partial
        except (ValueError, KeyError, TypeError):
            log.warning("audit log %s: last line is not a record; chain restarts", path)
            return None, None, partial
    return None, None, partial


# --------------------------------------------------------------------------- verify


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """Outcome of `verify`. On failure `file` and `line` (1-based) name the first bad line."""

    ok: bool
    line: int | None
    reason: str
    file: str | None = None
    records: int = 0

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}" if self.file else "-"


def order_rotated(paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    """Oldest first: `FILE.3, FILE.2, FILE.1, FILE` whatever order a shell glob gave.

    Only reorders names of the form BASE / BASE.<n> sharing one BASE; anything else keeps
    the order given (the chain check then tells whether that order is right).
    """
    names = [str(p) for p in paths]
    bases = {re.sub(r"\.\d+$", "", n) for n in names}
    if len(bases) != 1:
        return names

    def age(n: str) -> int:
        m = re.search(r"\.(\d+)$", n)
        return int(m.group(1)) if m else 0

    return sorted(names, key=age, reverse=True)


def verify(
    paths: Sequence[str | os.PathLike[str]], key: bytes, *, require_stop: bool = False
) -> VerifyResult:
    """Check one chain across `paths` (oldest first). Names the first bad file:line.

    Detects: an edited field or reformatted line (MAC or canonical form), a deleted,
    reordered or inserted line (`prev`/`seq` break), a half-written or cut last line,
    a file set that does not start at a chain start or rotation, and with `require_stop`
    a log whose newest record is not a clean `stop`.
    """
    prev: str | None = None
    seq: int | None = None
    count = 0
    last_event: str | None = None
    last_file: str | None = None
    last_line = 0
    anchored_at_rotation = False
    for p in paths:
        name = str(p)
        try:
            data = Path(p).read_bytes()
        except OSError as exc:
            return VerifyResult(False, None, f"cannot read: {exc.strerror}", name, count)
        if not data:
            return VerifyResult(False, 1, "empty file", name, count)
        lines = data.split(b"\n")
        if lines[-1] != b"":
            return VerifyResult(
                False, len(lines), "truncated: last record has no line end", name, count
            )
        for lineno, raw in enumerate(lines[:-1], 1):
            bad = _check_line(raw, key, prev, seq, first=count == 0)
            if bad:
                return VerifyResult(False, lineno, bad, name, count)
            rec = json.loads(raw)
            if count == 0:
                anchored_at_rotation = rec["prev"] != GENESIS
            prev, seq, last_event = rec["mac"], rec["seq"], rec["event"]
            count += 1
            last_file, last_line = name, lineno
    if count == 0:
        return VerifyResult(False, None, "no records", None, 0)
    if require_stop and last_event != "stop":
        return VerifyResult(
            False, last_line, "log does not end with a clean stop record", last_file, count
        )
    note = " (chain starts at a rotation: older files were removed)" if anchored_at_rotation else ""
    return VerifyResult(True, None, f"{count} records verified{note}", None, count)


def _check_line(raw: bytes, key: bytes, prev: str | None, seq: int | None, first: bool) -> str:
    """Empty string if `raw` is a valid successor of (prev, seq); else the reason."""
    try:
        rec = json.loads(raw)
    except ValueError:
        return "not a JSON record (edited or truncated)"
    if not isinstance(rec, dict):
        return "not a JSON object"
    missing = [f for f in ("ts", "seq", "prev", "mac", "event") if f not in rec]
    if missing:
        return f"missing field(s): {', '.join(missing)}"
    if not (isinstance(rec["mac"], str) and re.fullmatch(r"[0-9a-f]{64}", rec["mac"])):
        return "malformed mac"
    if not (isinstance(rec["prev"], str) and re.fullmatch(r"[0-9a-f]{64}", rec["prev"])):
        return "malformed prev"
    if canonical(rec) != raw:
        return "line is not in canonical form (edited)"
    if not hmac.compare_digest(compute_mac(key, rec["prev"], rec), rec["mac"]):
        return "MAC mismatch (edited, forged, or wrong key)"
    if first:
        if rec["prev"] != GENESIS and rec["event"] != "rotate":
            return "chain does not start here (earlier records deleted?)"
        return ""
    if rec["prev"] != prev:
        return "chain broken: prev does not match the previous record (deleted/reordered/inserted)"
    if rec["seq"] != (seq or 0) + 1:
        return f"sequence gap: expected {(seq or 0) + 1}, found {rec['seq']}"
    return ""


# --------------------------------------------------------------------------- CLI


def read_key_file(path: str | os.PathLike[str]) -> bytes:
    """Audit key from a file: hex text (64+ hex digits, whitespace ignored) or raw bytes."""
    data = Path(path).read_bytes()
    text = data.strip()
    if len(text) >= 32 and re.fullmatch(rb"[0-9a-fA-F]+", text) and len(text) % 2 == 0:
        return bytes.fromhex(text.decode())
    return data


def audit_verify_main(argv: Sequence[str] | None = None) -> int:
    """`strongroom audit verify FILE... --key-file K`: 0 valid, 1 tampered, 2 usage error."""
    ap = argparse.ArgumentParser(
        prog="strongroom audit verify",
        description="Verify the HMAC chain of audit log files (rotated files oldest first).",
    )
    ap.add_argument("files", nargs="+", help="audit files; FILE.N rotations are ordered")
    ap.add_argument("--key-file", required=True, help="audit key: hex text or raw bytes")
    ap.add_argument(
        "--require-stop", action="store_true", help="fail unless the log ends with a clean stop"
    )
    ap.add_argument("--keep-order", action="store_true", help="verify files in the order given")
    args = ap.parse_args(argv)
    try:
        key = read_key_file(args.key_file)
    except OSError as exc:
        print(f"cannot read key file {args.key_file}: {exc.strerror}", file=sys.stderr)
        return 2
    if not key:
        print(f"key file {args.key_file} is empty", file=sys.stderr)
        return 2
    files = list(args.files) if args.keep_order else order_rotated(args.files)
    result = verify(files, key, require_stop=args.require_stop)
    if result.ok:
        print(f"OK: {result.records} records in {len(files)} file(s)")
        return 0
    print(f"FAIL {result.where}: {result.reason}")
    return 1
