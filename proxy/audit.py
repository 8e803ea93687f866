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
whose oldest file begins with a `rotate` record is intact but not provably complete: the
verifier reports it as "older files missing" (`incomplete`, CLI exit 3), never as OK.

What the chain cannot see. It cannot prove that complete records were cut from the end of
the newest file; a half-written last line is detected, `require_stop=True` (CLI
`--require-stop`) fails unless the newest record is a `stop`, and the head anchored outside
the file (proxy/audit_anchor.py: a database row and a Prometheus gauge; CLI `--anchor DSN`)
finds a tail cut back even to an earlier clean stop.

Files are 0600 in a directory created 0700; a group- or world-writable directory is
refused (`private_dir`).

No values. Statements are logged as the pglast fingerprint and a normalized text in which
every literal (string, number, bit string, boolean) is replaced by `$n` and comments are
dropped - done by re-scanning pglast's `normalize` output, because `normalize` leaves
literals in some utility statements (`PREPARE ... AS`, `COMMENT`, column defaults).
A statement that does not even scan is logged without text.

Writes. Each record is one `os.write` of one complete line on an O_APPEND descriptor
(no user-space buffer): the kernel has the whole line or, after a failed or short write,
the proxy cuts the file back to the last whole line, rolls the chain state back and
raises, and the caller applies `audit.on_failure`. Records a failure cost are counted
and the next record that gets written is preceded by a `gap` record (`reason:
write_failed`, `lost: N`). fsync policy: no fsync per record (milliseconds each); a
proxy crash loses nothing the kernel accepted, a host crash may lose the newest records
(`--require-stop` and the external anchors tell); the file is fsynced at rotation and at
stop. A host crash can still leave a torn last line: on start it is cut off and a `gap`
record (`reason: torn_tail`, its byte count and SHA-256) chains from the last whole
record, so the chain goes on and `verify` reports the gap instead of failing for ever.

One writer per file. The running proxy holds an exclusive `flock` on `.FILE.lock` (beside
the file, stable across rotations); a second proxy configured with the same file refuses
to start (`AuditLocked`) instead of writing into the live chain. With `workers: N` each
worker has its own file (`worker_path`) and so its own lock: two processes appending to
one chain would interleave and break it.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import hashlib
import hmac
import json
import logging
import os
import re
import stat
import sys
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

log = logging.getLogger("strongroom.audit")

GENESIS = "0" * 64
VIEWS = frozenset({"plaintext", "masked", "ciphertext", "deny"})
EVENTS = frozenset(
    {"start", "stop", "rotate", "connect", "disconnect", "auth_failure", "statement",
     "anchor_gap", "statement_end", "gap"}
)
#: How a reveal ended (`statement_end.outcome`): CommandComplete; an error (the server's or
#: the proxy's) after rows were sent; a row-limited portal closed before it finished
#: (Close, transaction end); the client or server connection went away.
OUTCOMES = frozenset({"complete", "error", "portal_closed", "disconnect"})
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


class AuditLocked(Exception):
    """Another running process holds this audit file's lock (see `AuditLog`)."""


class AuditLog:
    """Appends chained records to a file (rotated by size) or to a stream such as stdout.

    Not for use by two processes at once (the file's lock enforces it); safe from several
    threads of one process. `writer` is `os.write` (a unit test may pass a failing one);
    `on_write_failure` is called once per record that could not be written.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        key: bytes,
        *,
        max_bytes: int = 100 * 1024 * 1024,
        keep: int = 10,
        stream: IO[str] | None = None,
        writer: Callable[[int, bytes], int] | None = None,
        on_write_failure: Callable[[], None] | None = None,
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
        self._write = writer if writer is not None else os.write
        self.on_write_failure = on_write_failure
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self._size = 0
        self._dirty_tail = False  # a short write left bytes that could not be cut off
        self._gap: dict[str, Any] | None = None  # a gap record to write before the next
        self.lost = 0  # records that could not be written since the last gap record
        self.failures = 0
        self.seq = 0
        self.last_mac = GENESIS
        self.dropped = 0
        if self.path is not None:
            self._open_file()
        # The head found on disk, before this process wrote anything: what the external
        # anchor (proxy/audit_anchor.py) compares with the head it last published.
        self.resumed: tuple[int, str] = (self.seq, self.last_mac)
        try:
            self._append({"event": "start", "pid": os.getpid()})
        except BaseException:
            self._release()
            raise

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

    def anchor_gap(self, anchored_seq: int, anchored_mac: str, found_seq: int,
                   reason: str) -> None:
        """The file was behind (or disagreed with) its external anchor at start: records
        after `found_seq` up to `anchored_seq` were cut. Recorded inside the chain so the
        gap stays visible (and MAC-protected) after the anchor moves on."""
        self._append({"event": "anchor_gap", "anchored_seq": anchored_seq,
                      "anchored_mac": anchored_mac, "found_seq": found_seq, "reason": reason})

    def durable_head(self) -> tuple[int, str, int | None]:
        """(seq, mac, a duplicate of the file descriptor or None) taken under the lock:
        every record up to `seq` has been handed to that descriptor, so fsyncing it (off
        the event loop; the caller closes it) makes the head durable before it is anchored.
        A duplicate stays valid when rotation closes the original."""
        with self._lock:
            fd = os.dup(self._fd) if self._fd is not None else None
            return self.seq, self.last_mac, fd

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
        phase: str | None = None,
    ) -> int:
        """A statement that touched a protected column or was denied; returns its `seq`.

        Pass `sql` (fingerprinted and normalized here, never logged as is) or a
        precomputed `fingerprint=statement_fingerprint(sql)`. `columns` maps each protected
        `schema.table.column` to how it was returned: plaintext, masked, ciphertext, deny.
        `phase="begin"`: written before the statement's first revealed row, without a row
        count; a `statement_end` record naming this `seq` completes it.
        """
        if fingerprint is None:
            fingerprint = statement_fingerprint(sql) if sql is not None else (None, None)
        fp, text = fingerprint
        cols = {c: (v if v in VIEWS else "unknown") for c, v in (columns or {}).items()}
        return self._append(
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
                "phase": phase,
            }
        )

    def statement_end(
        self,
        session: int | str,
        begin: int,
        *,
        rows: int,
        outcome: str,
        sqlstate: str | None = None,
    ) -> int:
        """The end of a reveal whose `statement` record (`seq` = `begin`) came first: the
        rows the client was sent and how it ended (`OUTCOMES`)."""
        return self._append(
            {
                "event": "statement_end",
                "session": session,
                "statement_seq": begin,
                "rows": rows,
                "outcome": outcome if outcome in OUTCOMES else "unknown",
                "sqlstate": _short(sqlstate),
            }
        )

    def close(self) -> None:
        """Write the `stop` record (marks a clean end for `--require-stop`) and close."""
        with self._lock:
            if self._fd is None and self._stream is None:
                return
        try:
            self._append({"event": "stop", "pid": os.getpid()})
        except OSError as exc:
            log.error("audit log %s: cannot write the stop record: %s", self.path, exc.strerror)
        with self._lock:
            if self._fd is not None:
                with contextlib.suppress(OSError):
                    os.fsync(self._fd)
            self._release()
            self._stream = None

    # ------------------------------------------------------------------ internals

    def _release(self) -> None:
        """Close the file and give up its lock."""
        for name in ("_fd", "_lock_fd"):
            fd = getattr(self, name)
            if fd is not None:
                setattr(self, name, None)
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _open_file(self) -> None:
        """Lock, then open for append, continuing the chain from the last whole record in
        the file. A torn last line (a host crash mid-write) is cut off and recorded by a
        `gap` record written before anything else."""
        assert self.path is not None
        private_dir(self.path.parent)
        self._lock_fd = _take_lock(self.path)
        try:
            self._fd = _open_private(self.path)
            seq, mac, good, torn = _tail_state(self.path)
            if seq is not None and mac is not None:
                self.seq, self.last_mac = seq, mac
            if torn:
                log.warning("audit log %s ends in a torn record (%d bytes): cut off and "
                            "recorded as a gap", self.path, len(torn))
                os.ftruncate(self._fd, good)
                self._gap = {"event": "gap", "reason": "torn_tail", "torn_bytes": len(torn),
                             "torn_sha256": hashlib.sha256(torn).hexdigest()}
            self._size = os.fstat(self._fd).st_size
        except BaseException:
            self._release()
            raise

    def _append(self, fields: dict[str, Any]) -> int:
        """Seal and write one record (after a pending `gap` record, in the same write);
        returns its `seq`.

        After `close()` records are dropped and logged (a late disconnect during shutdown
        must not crash its session). A write error (disk full, EIO, short write) rolls the
        chain state back, counts the lost record and propagates: whether to fail closed is
        the caller's policy decision.
        """
        with self._lock:
            if self._fd is None and self._stream is None:
                self.dropped += 1
                log.error("audit log closed; dropped a %s record", fields.get("event"))
                return 0
            state = (self.seq, self.last_mac)
            gap = self._gap
            if gap is None and self.lost:
                gap = {"event": "gap", "reason": "write_failed", "lost": self.lost}
            line = (self._seal(gap) if gap is not None else b"") + self._seal(fields)
            try:
                self._write_line(line)
            except OSError:
                self._write_failed(state)
                raise
            self._gap = None
            self.lost = 0
            seq = self.seq
            if self._fd is not None:
                self._size += len(line)
                # Never after `stop`: the newest file must end with it (--require-stop).
                if self._size >= self.max_bytes and fields["event"] != "stop":
                    self._rotate()
            return seq

    def _write_failed(self, state: tuple[int, str]) -> None:
        """A record was not written: the chain goes back to `state`, the loss is counted
        (the next record written is preceded by a `gap` record) and reported."""
        self.seq, self.last_mac = state
        self.lost += 1
        self.failures += 1
        if self.on_write_failure is not None:
            self.on_write_failure()

    def _write_line(self, line: bytes) -> None:
        """One `write` of whole lines; a short write is cut back and is a failure."""
        if self._fd is None:
            assert self._stream is not None
            self._stream.write(line.decode())
            self._stream.flush()
            return
        if self._dirty_tail:
            os.ftruncate(self._fd, self._size)  # OSError: still cannot write safely
            self._dirty_tail = False
        n = self._write(self._fd, line)
        if n != len(line):
            try:
                os.ftruncate(self._fd, self._size)
            except OSError:
                self._dirty_tail = True
            raise OSError(errno.EIO, f"short write to the audit log ({n} of {len(line)} bytes)")

    def _seal(self, fields: dict[str, Any]) -> bytes:
        self.seq += 1
        record = {"ts": utc_now(), "seq": self.seq, "prev": self.last_mac, **fields}
        record = {k: v for k, v in record.items() if v is not None}
        record["mac"] = compute_mac(self._key, self.last_mac, record)
        self.last_mac = record["mac"]
        return canonical(record) + b"\n"

    def _rotate(self) -> None:
        assert self.path is not None and self._fd is not None
        with contextlib.suppress(OSError):
            os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        oldest = self.path.with_name(f"{self.path.name}.{self.keep}")
        with contextlib.suppress(FileNotFoundError):
            oldest.unlink()
        for i in range(self.keep - 1, 0, -1):
            src = self.path.with_name(f"{self.path.name}.{i}")
            if src.exists():
                src.rename(self.path.with_name(f"{self.path.name}.{i + 1}"))
        self.path.rename(self.path.with_name(f"{self.path.name}.1"))
        self._fd = _open_private(self.path)
        self._size = 0
        state = (self.seq, self.last_mac)
        line = self._seal({"event": "rotate", "previous_file": f"{self.path.name}.1"})
        try:
            self._write_line(line)
        except OSError:
            # The next record is written after a `gap` record in the new file; verify
            # then reports the chain as starting at a rotation with a recorded gap.
            self._write_failed(state)
            log.error("audit log %s: cannot write the rotate record", self.path)
            return
        self._size = len(line)


def _take_lock(path: Path) -> int:
    """An exclusive, non-blocking `flock` on `.FILE.lock` (the running proxy's pid in it).

    Beside the file rather than on it: rotation renames the file, the lock must stay.
    Released by the kernel when the process ends, however it ends."""
    lock_path = path.with_name(f".{path.name}.lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        except OSError:
            holder = "?"
        os.close(fd)
        raise AuditLocked(
            f"audit log {path} is in use by another running proxy (pid {holder}, lock "
            f"{lock_path}); stop it first or give this one its own audit.path") from None
    except BaseException:
        os.close(fd)
        raise
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _open_private(path: Path) -> int:
    """Open `path` for append as a file only its owner can read (0600, whatever the umask).

    Audit records name roles, client addresses and normalized statements: not for every
    local user. A file left at a wider mode (an older version created 0644) is narrowed;
    rotated files keep the mode they were written with, so they stay 0600 too.
    """
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISREG(mode) and mode & 0o077:  # (never chmod a device or a FIFO)
            os.fchmod(fd, 0o600)
        return fd
    except BaseException:
        os.close(fd)
        raise


def private_dir(directory: Path) -> None:
    """Create the audit directory 0700; refuse one that group or others may write.

    Whoever can write the directory can rename, delete or replace the (0600) audit files
    in it without reading them, so a group- or world-writable directory is refused (with
    the sticky bit too: the owner of a planted file could still swap it). A directory
    only group/others can list is warned about: the files stay unreadable to them, but
    their names and sizes (the amount of activity) are visible."""
    missing = [d for d in (directory, *directory.parents) if not d.exists()]
    for d in reversed(missing):  # pathlib would create the parents at the umask's mode
        with contextlib.suppress(FileExistsError):
            d.mkdir(mode=0o700)
    mode = stat.S_IMODE(os.stat(directory).st_mode)
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PermissionError(
            errno.EPERM, f"audit directory {directory} is group- or world-writable "
            f"(mode {mode:04o}): anyone who can write it can delete or replace the audit "
            f"files; chmod 700 {directory}"
        )
    if mode & 0o077:
        log.warning("audit directory %s is accessible by group or others (mode %04o); "
                    "chmod 700 %s", directory, mode, directory)


def _tail_state(path: Path) -> tuple[int | None, str | None, int, bytes]:
    """(seq, mac) of the last whole record of `path`, the offset where its line ends, and
    the torn bytes after it (a last line without its newline; b"" when none)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return None, None, 0, b""
    if size == 0:
        return None, None, 0, b""
    with open(path, "rb") as fh:
        start = max(0, size - 65536)
        fh.seek(start)
        tail = fh.read()
    cut = tail.rfind(b"\n") + 1  # 0: no newline in the tail
    if cut == 0 and start > 0:  # a torn line longer than 64 KiB: not ours, but cut too
        start, tail = 0, path.read_bytes()
        cut = tail.rfind(b"\n") + 1
    torn = tail[cut:]
    good = start + cut
    for raw in reversed(tail[:cut].split(b"\n")[:-1]):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
            return int(rec["seq"]), str(rec["mac"]), good, torn
        except (ValueError, KeyError, TypeError):
            log.warning("audit log %s: last line is not a record; chain restarts", path)
            return None, None, good, torn
    return None, None, good, torn


# --------------------------------------------------------------------------- verify


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """Outcome of `verify`. On failure `file` and `line` (1-based) name the first bad line."""

    ok: bool
    line: int | None
    reason: str
    file: str | None = None
    records: int = 0
    # Intact but not provably complete (older files missing, a recorded anchor gap).
    incomplete: bool = False
    gaps: tuple[str, ...] = ()  # "file:line reason" of each `gap` record (chain intact)

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
    paths: Sequence[str | os.PathLike[str]], key: bytes, *, require_stop: bool = False,
    anchor: tuple[int, str] | None = None,
) -> VerifyResult:
    """Check one chain across `paths` (oldest first). Names the first bad file:line.

    Detects: an edited field or reformatted line (MAC or canonical form), a deleted,
    reordered or inserted line (`prev`/`seq` break), a half-written or cut last line,
    a file set that does not start at a chain start, with `require_stop` a log whose
    newest record is not a clean `stop`, and with `anchor` (the (seq, mac) published
    outside the file, see proxy/audit_anchor.py) whole records cut from the end or a
    chain replaced by another one.

    A chain that is intact but cannot be shown complete is not OK either: it is reported
    with `incomplete=True` - a first record that chains from a previous file that was not
    given ("older files missing"), or an `anchor_gap` record (a start found the file cut).
    """
    prev: str | None = None
    seq: int | None = None
    count = 0
    last_event: str | None = None
    last_file: str | None = None
    last_line = 0
    first: tuple[int, str, int] | None = None  # (seq, file, line) of the first record
    at_anchor: tuple[str, str, int] | None = None  # (mac, file, line) of the anchored seq
    anchor_gaps: list[str] = []
    gaps: list[str] = []
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
            if count == 0 and rec["prev"] != GENESIS:
                first = (rec["seq"], name, lineno)
            if anchor is not None and rec["seq"] == anchor[0]:
                at_anchor = (rec["mac"], name, lineno)
            if rec["event"] == "anchor_gap":
                anchor_gaps.append(f"{name}:{lineno} (records {rec.get('found_seq', 0) + 1}.."
                            f"{rec.get('anchored_seq')} cut before a restart)")
            prev, seq, last_event = rec["mac"], rec["seq"], rec["event"]
            if last_event == "gap":
                gaps.append(f"{name}:{lineno} {_gap_text(rec)}")
            count += 1
            last_file, last_line = name, lineno
    if count == 0:
        return VerifyResult(False, None, "no records", None, 0)
    if anchor is not None:
        bad_anchor = _anchor_problem(anchor, seq or 0, at_anchor)
        if bad_anchor:
            return VerifyResult(False, last_line, bad_anchor, last_file, count)
    if require_stop and last_event != "stop":
        return VerifyResult(
            False, last_line, "log does not end with a clean stop record", last_file, count
        )
    if first is not None:
        return VerifyResult(
            False, first[2], f"older files missing: the chain starts at a rotation (seq "
            f"{first[0]} chains from a previous file that was not given); pass every "
            "rotated file to prove the log complete", first[1], count, incomplete=True,
        )
    if anchor_gaps:
        why = "the chain records an anchor gap (records were cut): " + "; ".join(anchor_gaps)
        return VerifyResult(False, None, why, None, count, incomplete=True, gaps=tuple(gaps))
    note = f", head seq {seq} matches the anchor" if anchor is not None else ""
    if gaps:
        note += f"; {len(gaps)} recorded gap(s): " + "; ".join(gaps)
    return VerifyResult(True, None, f"{count} records verified{note}", None, count,
                        gaps=tuple(gaps))


def _gap_text(rec: Mapping[str, Any]) -> str:
    """What a `gap` record says was lost, in words."""
    if rec.get("reason") == "torn_tail":
        return f"torn tail of {rec.get('torn_bytes')} bytes cut off at restart"
    if rec.get("reason") == "write_failed":
        return f"{rec.get('lost')} record(s) could not be written"
    return str(rec.get("reason"))


def _anchor_problem(anchor: tuple[int, str], last_seq: int,
                    at_anchor: tuple[str, str, int] | None) -> str:
    """Why the verified chain contradicts its anchored head, or "" (see verify)."""
    a_seq, a_mac = anchor
    if last_seq < a_seq:
        return (f"behind its anchor: the anchor says the chain reached seq {a_seq}, the "
                f"files end at seq {last_seq}: records {last_seq + 1}..{a_seq} were cut")
    if at_anchor is not None and not hmac.compare_digest(at_anchor[0], a_mac):
        return (f"record seq {a_seq} ({at_anchor[1]}:{at_anchor[2]}) is not the anchored "
                "one (different MAC): the chain was replaced or rewritten")
    return ""


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


def ok_line(result: VerifyResult, files: int) -> str:
    """The verifier's success line; recorded gaps are named, never hidden in an OK."""
    line = f"OK: {result.records} records in {files} file(s)"
    if result.gaps:
        line += f"; {len(result.gaps)} recorded gap(s): " + "; ".join(result.gaps)
    return line


def read_key_file(path: str | os.PathLike[str]) -> bytes:
    """Audit key from a file: hex text (64+ hex digits, whitespace ignored) or raw bytes."""
    data = Path(path).read_bytes()
    text = data.strip()
    if len(text) >= 32 and re.fullmatch(rb"[0-9a-fA-F]+", text) and len(text) % 2 == 0:
        return bytes.fromhex(text.decode())
    return data


def add_verify_arguments(ap: argparse.ArgumentParser) -> None:
    """The options of `strongroom audit verify` (shared by proxy/cli.py and this module)."""
    ap.add_argument("files", nargs="+", metavar="FILE",
                    help="audit files; rotations (FILE.N) are put oldest first")
    ap.add_argument("--key-file", required=True, help="audit key: hex text or raw bytes")
    ap.add_argument("--require-stop", action="store_true",
                    help="fail unless the log ends with a clean stop")
    ap.add_argument("--keep-order", action="store_true",
                    help="verify the files in the order given")
    ap.add_argument("--anchor", metavar="DSN",
                    help="check the files against the head the proxy published to this "
                    "database (audit.anchor): fails when records were cut from the end")
    ap.add_argument("--anchor-table", default="strongroom_audit_anchor", metavar="TABLE",
                    help="[schema.]table of the anchor (default strongroom_audit_anchor)")
    ap.add_argument("--anchor-id", metavar="ID",
                    help="row of the anchor table (default: the absolute path of the "
                    "newest file, as the proxy names it; INSTANCE:PATH when the proxy "
                    "sets audit.anchor.instance)")


def verify_command(args: argparse.Namespace, key: bytes) -> int:
    """Run and print a verification: 0 complete and intact, 1 tampered (or contradicting
    the anchor), 3 intact but not provably complete (older files missing, a recorded
    anchor gap); 2 stays argparse's usage error."""
    files = list(args.files) if args.keep_order else order_rotated(args.files)
    anchor = None
    if args.anchor:
        from proxy import audit_anchor

        ident = args.anchor_id or audit_anchor.log_id(files[-1])
        try:
            anchor = audit_anchor.fetch_anchor(args.anchor, args.anchor_table, ident)
        except LookupError as exc:
            print(f"FAIL: {exc}")
            return 1
    result = verify(files, key, require_stop=args.require_stop, anchor=anchor)
    if result.ok:
        print(ok_line(result, len(files))
              + (f", head matches the anchor (seq {anchor[0]})" if anchor else ""))
        return 0
    if result.incomplete:
        print(f"INCOMPLETE {result.where}: {result.reason}")
        return 3
    print(f"FAIL {result.where}: {result.reason}")
    return 1


def audit_verify_main(argv: Sequence[str] | None = None) -> int:
    """`strongroom audit verify FILE... --key-file K`: see verify_command; 2 usage error."""
    ap = argparse.ArgumentParser(
        prog="strongroom audit verify",
        description="Verify the HMAC chain of audit log files (rotated files oldest first).",
    )
    add_verify_arguments(ap)
    args = ap.parse_args(argv)
    try:
        key = read_key_file(args.key_file)
    except OSError as exc:
        print(f"cannot read key file {args.key_file}: {exc.strerror}", file=sys.stderr)
        return 2
    if not key:
        print(f"key file {args.key_file} is empty", file=sys.stderr)
        return 2
    return verify_command(args, key)
