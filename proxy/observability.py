"""Wiring of metrics (proxy/metrics.py) and the audit log (proxy/audit.py) into the proxy.

`build(settings, gate, worker_index)` makes one `Metrics` and (when `audit:` is configured)
one `AuditLog` per process and gives the gate two small adapters with exactly the methods
it calls (`policy_decision(role, decision)`, `denied(session, sql, reason)`). The server
calls the connection-level events; the session keeps bound methods of the few per-message
events (bytes, statement kinds, durations) so the hot path pays a call and an add.

Statement kinds come from the analysis the gate already made: after `gate.query` /
`gate.parse` (or the tracker's plan) `gate.analyses.last_key` names the cached analysis
of that text, and `QueryKinds` maps that key to the kind counters once (a dict hit after
that). Nothing here keeps or logs statement text: audit records carry the fingerprint and
a literal-free normalized text (`audit.statement_fingerprint`).

The audit key is `audit.key_file` (hex, mode 0600), created by `strongroom keys init` when
`audit:` is configured and the file does not exist yet (or `strongroom audit keygen FILE`).
The verifier uses the same file: `strongroom audit verify FILE... --key-file K`.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from proxy.audit import (
    AuditLocked,
    AuditLog,
    read_key_file,
    statement_fingerprint,
    worker_path,
)
from proxy.metrics import OTHER, Metrics, query_kind
from proxy.settings import ConfigError, Settings
from proxy.sql.cache import DEFAULT_CACHE_BYTES, ByteLRU, text_key
from proxy.tracking import AuditRefused, rows_in_tag

if TYPE_CHECKING:
    from proxy.gate import Gate
    from proxy.session import Session
    from proxy.tracking import StatementPlan

log = logging.getLogger("strongroom.observability")

# Analyzer kinds (proxy.sql.info.StatementKind) that are not metric kinds by name.
_KIND_ALIASES = {
    "begin": "transaction", "commit": "transaction", "rollback": "transaction",
    "savepoint": "transaction", "release": "transaction", "rollback_to": "transaction",
    "discard": "set", "reset": "set", "declare": "cursor", "fetch": "cursor",
    "close": "cursor", "move": "cursor", "deallocate": "prepare", "unlisten": "listen",
    "copy_program": "copy_in", "copy_file": "copy_in", "unknown": "unparsed",
    "function": "function_call", "commit_prepared": "prepare_transaction",
    "rollback_prepared": "prepare_transaction",
}  # fmt: skip


def metric_kind(kind: str) -> str:
    """An analyzer statement kind as a `strongroom_queries_total{kind}` label."""
    return query_kind(_KIND_ALIASES.get(kind, kind))


# ------------------------------------------------------------------------ policy reasons

_REASONS: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(p), r)
    for p, r in (
        (r"is not in the policy", "default_deny"),
        (r"does not parse", "unparsable"),
        (r"could not be classified", "unclassified"),
        (r"set_role|role startup option|set_config\('(role|session_authorization)'\)",
         "role_change"),
        (r"denied column|a whole-row read includes", "column_denied"),
        (r"statements are not allowed|statement kind \S+ is not allowed|without a statement",
         "kind_not_allowed"),
        (r"function ", "function_not_allowed"),
        (r"\bon \S+ is not allowed|does not resolve|cross-database|unknown access",
         "table_not_allowed"),
        (r"cannot track|CASCADE|view dependencies were not loaded", "unsupported"),
        (r"\bDO\b|procedural", "procedural"),
    )
)
_REASON_CACHE_MAX = 4096


def reason_label(reason: str, allowed: bool) -> str:
    """A policy decision's free-text reason folded onto `metrics.POLICY_REASONS`."""
    if allowed:
        return "allowed"
    for pattern, label in _REASONS:
        if pattern.search(reason):
            return label
    return "other"


class GateMetrics:
    """What `Gate` calls on `gate.metrics`: one policy decision (a `policy.Decision`)."""

    __slots__ = ("_count", "_labels")

    def __init__(self, metrics: Metrics) -> None:
        self._count = metrics.policy_decision
        self._labels: dict[tuple[bool, str], tuple[str, str]] = {}

    def policy_decision(self, role: str, decision: Any) -> None:
        key = (decision.allowed, decision.reason)
        labels = self._labels.get(key)
        if labels is None:
            # Reasons name relations the client wrote: bounded by folding, capped here.
            if len(self._labels) >= _REASON_CACHE_MAX:
                self._labels.clear()
            labels = self._labels[key] = (
                "allow" if decision.allowed else "deny",
                reason_label(decision.reason, decision.allowed),
            )
        self._count(role, labels[0], labels[1])


# ------------------------------------------------------------------------ audit adapters


def session_role(session: Any) -> str:
    st = getattr(session, "policy_state", None)
    role = getattr(st, "role", None)
    return role if role else session.user


def application_name(session: Any) -> str | None:
    startup = getattr(session, "startup", None)
    return startup.get("application_name") if startup is not None else None


class _StatementInfo:
    """Audit facts about one statement text that do not depend on the session."""

    __slots__ = ("fingerprint", "kind", "tables")

    def __init__(self, fingerprint: tuple[str | None, str | None], kind: str,
                 tables: tuple[str, ...]) -> None:
        self.fingerprint, self.kind, self.tables = fingerprint, kind, tables


class StatementFacts:
    """Fingerprint, kind and relations of statement texts, memoized by the text's keyed
    digest (`text_key`: never the text, whose literals may be a protected column's
    plaintext), bounded in entries and bytes; the values hold no literal (fingerprint
    and normalized text only).
    """

    def __init__(self, gate: Gate, size: int = 4096) -> None:
        self.gate = gate
        self.size = size
        self._memo = ByteLRU(size, getattr(gate, "cache_bytes", DEFAULT_CACHE_BYTES))

    def get(self, sql: str, tables: tuple[str, ...] | None = None) -> _StatementInfo:
        key = text_key(sql)
        info = self._memo.get(key)
        if info is not None:
            return info  # type: ignore[no-any-return]
        kind, found = "unparsed", ()
        try:
            analysis = self.gate.analyses.analyze(sql)
            stmts = analysis.statements
            kind = stmts[0].kind if len(stmts) == 1 else "+".join(s.kind for s in stmts)
            found = tuple(sorted({str(r) for s in stmts for r in s.relations}))
        except Exception:
            pass
        info = _StatementInfo(statement_fingerprint(sql) if sql else (None, None), kind,
                              tables if tables is not None else found)
        self._memo.put(key, info, 16 + len(info.fingerprint[1] or "")
                       + sum(len(t) for t in info.tables))
        return info


class GateAudit:
    """What `Gate` calls on `gate.audit`: a statement the policy refused."""

    __slots__ = ("audit", "facts")

    def __init__(self, audit: AuditLog, facts: StatementFacts) -> None:
        self.audit = audit
        self.facts = facts

    def denied(self, session: Session, sql: str, reason: str) -> None:
        info = self.facts.get(sql)
        try:
            self.audit.statement(
                session.id, session_role(session), session.peer,
                application_name=application_name(session), kind=info.kind,
                fingerprint=info.fingerprint, tables=info.tables, columns={},
                decision="deny", reason=reason,
            )
        except OSError as exc:  # the statement is denied anyway: nothing to refuse
            _write_failed("statement", exc)


rows_from_tag = rows_in_tag


class StatementAuditor:
    """Tracking mode: the audit records of one session's statements over protected
    columns (called by the tracker).

    A statement that reveals protected values (a plaintext or masked view) gets its
    `statement` record (`phase: begin`) before its first revealed row is sent, and a
    `statement_end` record with the rows sent and the outcome when it completes, fails,
    is closed unfinished or the session ends (`begin` / `end`). One that reveals no row
    (writes, ciphertext views, no rows) gets one `statement` record at CommandComplete
    (`__call__`). When `begin` cannot write, `on_failure` decides: "refuse" raises
    `AuditRefused` (the tracker sends 58030 instead of the rows), "serve_and_alert" logs
    and serves; `strongroom_audit_write_failures_total` counts every failed record.
    """

    __slots__ = ("audit", "facts", "refuse", "session")

    def __init__(self, audit: AuditLog, facts: StatementFacts, session: Session,
                 on_failure: str = "refuse") -> None:
        self.audit, self.facts, self.session = audit, facts, session
        self.refuse = on_failure != "serve_and_alert"

    def _columns(self, plan: StatementPlan | None, revealed: Any) -> dict[str, str]:
        columns: dict[str, str] = {}
        if plan is not None:
            for cols in plan.outputs:
                for rc in cols or ():
                    if rc is not None and hasattr(rc, "runtime"):
                        columns[rc.runtime.qualified] = rc.view
        for _i, crypto, _fmt in revealed or ():
            if hasattr(crypto, "runtime"):
                columns[crypto.runtime.qualified] = crypto.view
        if plan is not None:
            written = [rc for _action, rc in plan.params.values()]
            written += [d[3] for d in plan.derived] + list(plan.literals)
            for rc in written:
                if hasattr(rc, "runtime"):
                    columns.setdefault(rc.runtime.qualified, rc.view)
        return columns

    def _info(self, plan: StatementPlan | None) -> _StatementInfo:
        if plan is None or not plan.source:
            return _StatementInfo((None, None), "unknown", plan.tables if plan else ())
        return self.facts.get(plan.source, plan.tables or None)

    def __call__(self, plan: StatementPlan, msg: bytes, revealed: Any = None) -> None:
        if plan.refusal is not None or not plan.source:
            return  # refused: the gate adapter (or the rewriter's refusal path) logs it
        info = self._info(plan)
        s = self.session
        try:
            self.audit.statement(
                s.id, session_role(s), s.peer, application_name=application_name(s),
                kind=info.kind, fingerprint=info.fingerprint, tables=info.tables,
                columns=self._columns(plan, revealed), decision="allow",
                rows=rows_from_tag(msg),
            )
        except OSError as exc:  # nothing was revealed: counted, and a gap record follows
            _write_failed("statement", exc)

    def begin(self, plan: StatementPlan | None, revealed: Any) -> int | None:
        """Before the first revealed row: the `statement` record, written through to the
        kernel. Returns its `seq` (None when it could not be written and is served)."""
        info = self._info(plan)
        s = self.session
        try:
            return self.audit.statement(
                s.id, session_role(s), s.peer, application_name=application_name(s),
                kind=info.kind, fingerprint=info.fingerprint, tables=info.tables,
                columns=self._columns(plan, revealed), decision="allow", phase="begin",
            )
        except OSError as exc:
            _write_failed("statement", exc)
            if self.refuse:
                raise AuditRefused from None
            return None

    def end(self, token: int | None, rows: int, outcome: str, sqlstate: str | None) -> None:
        """The reveal begun by `begin` (record `token`) ended."""
        try:
            self.audit.statement_end(self.session.id, token or 0, rows=rows, outcome=outcome,
                                     sqlstate=sqlstate)
        except OSError as exc:  # the rows are sent: nothing left to refuse
            _write_failed("statement_end", exc)

    def refused(self, sql: str, tables: tuple[str, ...], reason: str) -> None:
        """The rewriter refused a statement over protected columns (not the policy)."""
        s = self.session
        info = self.facts.get(sql, tables or None)
        try:
            self.audit.statement(
                s.id, session_role(s), s.peer, application_name=application_name(s),
                kind=info.kind, fingerprint=info.fingerprint, tables=info.tables,
                columns={}, decision="deny", reason=reason,
            )
        except OSError as exc:
            _write_failed("statement", exc)


def _write_failed(event: str, exc: OSError) -> None:
    """Log a record that could not be written (the AuditLog counted it for the metric
    and writes a `gap` record before its next record)."""
    log.error("audit: cannot write a %s record: %s", event, exc.strerror or exc)


# ------------------------------------------------------------------------ statement kinds


class QueryKinds:
    """Counts the statement kinds of the analysis the gate made last, by cache key."""

    __slots__ = ("_analyses", "_cells", "_metrics", "_unparsed")

    def __init__(self, metrics: Metrics, gate: Gate) -> None:
        self._metrics = metrics
        self._analyses = gate.analyses
        self._cells: dict[str | bytes, tuple[list[float], ...]] = {}
        self._unparsed = (metrics.query_counter("unparsed"),)

    def count(self) -> None:
        """Count the statement(s) of `gate.analyses.last_key` (one dict hit when seen)."""
        key = self._analyses.last_key
        cells = self._cells.get(key)
        if cells is None:
            cells = self._bind(key)
        for cell in cells:
            cell[0] += 1

    def _bind(self, key: str | bytes) -> tuple[list[float], ...]:
        analyses = self._analyses
        found = analyses.peek(key)
        if found is None or not hasattr(found, "statements"):
            cells = self._unparsed
        else:
            cells = tuple(
                self._metrics.query_counter(metric_kind(s.kind)) for s in found.statements
            )
        if len(self._cells) >= analyses.maxsize:
            self._cells.clear()
        if len(key) <= 4096:  # a long template key is not kept alive here
            self._cells[key] = cells
        return cells


# ------------------------------------------------------------------------ building


def audit_settings(settings: Settings) -> dict[str, Any] | None:
    cfg = settings.raw.get("audit")
    return dict(cfg) if cfg else None


def _base(settings: Settings) -> Path:
    src = settings.source
    return Path(src).resolve().parent if src and not src.startswith("<") else Path.cwd()


def audit_key_path(settings: Settings) -> Path | None:
    cfg = audit_settings(settings)
    if cfg is None:
        return None
    p = Path(os.path.expanduser(cfg.get("key_file", "audit.key")))
    return p if p.is_absolute() else _base(settings) / p


def create_key_file(path: str | os.PathLike[str]) -> bool:
    """Write a fresh 256-bit audit key as hex, mode 0600; False if the file exists."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32) + "\n")
    return True


def audit_key_mode_problem(settings: Settings) -> str | None:
    """Why the configured audit key file may not be used, or None (no audit, no file yet,
    or mode 0600/0400). Whoever can read the key can recompute every MAC of the chain and
    so rewrite the audit trail unnoticed: a key group or others can reach is refused,
    never just warned about (`serve`, reload and `check-config` alike)."""
    path = audit_key_path(settings)
    if path is None:
        return None
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None  # a missing key is load_audit_key's message
    if not mode & 0o077:
        return None
    from proxy.settings import line_in_file

    line = line_in_file(settings.source, ["audit", "key_file"]) if settings.source else 1
    return (f"{settings.source}:{line}: audit.key_file: {path} is accessible by group or "
            f"others (mode {mode & 0o777:04o}): anyone who can read it can rewrite the audit "
            f"trail unnoticed; chmod 600 {path}")


def load_audit_key(settings: Settings) -> bytes:
    path = audit_key_path(settings)
    assert path is not None
    problem = audit_key_mode_problem(settings)
    if problem:
        raise ConfigError([problem])
    try:
        key = read_key_file(path)
    except OSError as exc:
        raise ConfigError([
            f"{settings.source}: audit.key_file: cannot read {path}: {exc.strerror} "
            "(`strongroom keys init` or `strongroom audit keygen FILE` creates it)"
        ]) from None
    if len(key) < 16:
        raise ConfigError([f"{settings.source}: audit.key_file: {path} holds no usable key "
                           "(need at least 16 bytes; 32 random bytes in hex recommended)"])
    return key


def audit_on_failure(settings: Settings) -> str:
    """`audit.on_failure`: "refuse" (default, fail closed) or "serve_and_alert"."""
    cfg = audit_settings(settings) or {}
    return "serve_and_alert" if cfg.get("on_failure") == "serve_and_alert" else "refuse"


def build_audit(settings: Settings, worker_index: int = 0,
                on_write_failure: Callable[[], None] | None = None) -> AuditLog | None:
    """The audit log of one process (`audit.path`, per-worker file), or None. Refused
    (ConfigError) when another running proxy holds the file's lock."""
    cfg = audit_settings(settings)
    if cfg is None:
        return None
    key = load_audit_key(settings)
    path = cfg.get("path")
    stream = None
    if cfg.get("stdout") and not path:
        import sys

        stream = sys.stdout
    if path:
        p = Path(os.path.expanduser(path))
        path = worker_path(p if p.is_absolute() else _base(settings) / p, worker_index)
    try:
        return AuditLog(
            path, key, max_bytes=int(cfg.get("max_bytes", 100 * 1024 * 1024)),
            keep=int(cfg.get("keep", 10)), stream=stream, on_write_failure=on_write_failure,
        )
    except AuditLocked as exc:
        raise ConfigError([f"{settings.source}: audit.path: {exc}"]) from None
    except OSError as exc:
        raise ConfigError([f"{settings.source}: audit.path: cannot open {path}: "
                           f"{exc.strerror}"]) from None


def configure_metrics(metrics: Metrics, settings: Settings, gate: Gate) -> None:
    """Bind the configuration's label sets: roles, protected columns, live key ids."""
    policy = gate.policy
    metrics.set_known_roles(policy.roles if policy is not None else ())
    protect = settings.raw.get("protect") or {}
    metrics.set_protected_columns(protect)
    metrics.set_key_ids(key_ids(settings, getattr(gate.encryption, "ring", None)))
    analyses = gate.analyses
    metrics.track_plan_cache(lambda: (analyses.hits, analyses.misses))
    analyses.on_parse = metrics.analyzer_parsed


def key_ids(settings: Settings, ring: Any = None) -> dict[str, list[int]]:
    """Live (not retired) encrypt/blind-index key ids per protected column: of `ring`
    (the gate's, authenticated when it was loaded), else read from the keyring file
    unverified (no key is unwrapped for this; labels only)."""
    protect = settings.raw.get("protect") or {}
    keys_cfg = settings.raw.get("keys") or {}
    if not protect or not keys_cfg.get("keyring"):
        return {}
    from keys import keyring as kr
    from proxy.encryption import key_name, resolve

    try:
        if ring is None:
            ring, _ = kr.load_unverified(resolve(str(_base(settings)), keys_cfg["keyring"]))
    except Exception as exc:  # the gate reports a broken keyring; metrics just go without
        log.warning("key ids for metrics: cannot read the keyring: %s", exc.__class__.__name__)
        return {}
    out: dict[str, list[int]] = {}
    for column, spec in protect.items():
        ident = key_name(tuple(column.split(".")), spec)  # type: ignore[arg-type]
        ids: list[int] = []
        for purpose in ("encrypt", "blind_index"):
            try:
                entries = ring.entries_for(ident, purpose)
            except Exception:
                continue
            ids += [e.id for e in entries if str(e.state) != "retired"]
        out[column] = sorted(set(ids))
    return out


def build(settings: Settings, gate: Gate, worker_index: int = 0,
          ) -> tuple[Metrics, AuditLog | None, StatementFacts]:
    """Metrics and audit log of one process, attached to `gate` through the adapters."""
    metrics = Metrics()
    configure_metrics(metrics, settings, gate)
    audit = build_audit(settings, worker_index, metrics.audit_write_failed)
    facts = StatementFacts(gate)
    gate.metrics = GateMetrics(metrics)
    gate.audit = GateAudit(audit, facts) if audit is not None else None
    return metrics, audit, facts


def flush_crypto(tracker: Any, done: Callable[..., None]) -> None:
    """Move a session's per-column crypto counts (RoleColumn counters) into metrics."""
    # (Called at the end of every request in tracking mode, mostly with nothing to
    # move: written out, with no loop over the two timers.)
    drain = getattr(getattr(tracker, "protector", None), "drain_crypto_counts", None)
    if drain is not None:
        for column, op, ok, errors in drain():
            done(column, op, ok, errors)
    # Crypto time per statement (all its cells), observed once per flush.
    seconds = getattr(tracker, "encrypt_seconds", 0.0)
    if seconds:
        done(OTHER, "encrypt", 0, 0, seconds)
        tracker.encrypt_seconds = 0.0
    seconds = getattr(tracker, "decrypt_seconds", 0.0)
    if seconds:
        done(OTHER, "decrypt", 0, 0, seconds)
        tracker.decrypt_seconds = 0.0
