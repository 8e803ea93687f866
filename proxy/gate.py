"""The statement gate: every Query and Parse is analysed and decided before it goes up.

The session hands the gate each statement-bearing message body; the gate answers None
(forward unchanged) or the bytes to send instead. Analysis and decisions are cached by
the exact statement text, so a repeated statement costs a dict lookup, not a parse.

A denied statement is not answered by the proxy: it is *replaced* by a statement that
makes PostgreSQL raise the same error itself (`DO ... RAISE ... ERRCODE '42501'`). The
server then aborts the transaction and orders the replies in a pipeline exactly as it
would for a real permission error, and the client and server never disagree on state.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from proxy.protocol import messages as m
from proxy.protocol import rows
from proxy.sql.cache import AnalysisCache
from proxy.sql.info import Analysis, StatementInfo
from proxy.sql.names import parse_search_path
from proxy.tracking import ClientRefusal, refusal_sql

if TYPE_CHECKING:
    from proxy.policy import Policy, PolicyCache
    from proxy.session import Session
    from proxy.settings import Settings

log = logging.getLogger("strongroom.gate")

_EFFECT_KINDS = frozenset(
    {"set", "set_role", "prepare", "deallocate", "discard", "begin", "commit", "rollback",
     "rollback_to", "explain"}
)

PRELUDE_SQL = (
    "SELECT nspname FROM pg_catalog.pg_namespace; "
    "SELECT pg_catalog.current_setting('search_path')"
)


@dataclass(slots=True)
class SessionPolicy:
    """What the policy needs to know about one session, tracked statement by statement."""

    login_role: str
    role: str
    path: tuple[str, ...] = ("$user", "public")
    reset_path: tuple[str, ...] = ("$user", "public")
    committed_path: tuple[str, ...] = ("$user", "public")
    txn_end: str | None = None  # "commit" | "rollback" seen in the current transaction
    prepared: dict[str, StatementInfo] = field(default_factory=dict)
    last_status: bytes = b"I"


class Gate:
    """Analyses statements on the hot path and applies policy (and, through the tracker,
    encryption) to them."""

    def __init__(self, settings: Settings | None = None, cache_size: int = 10_000) -> None:
        self.analyses = AnalysisCache(cache_size)
        self.metrics: Any = None
        self.audit: Any = None
        self.policy: Policy | None = None
        self._caches: dict[str, PolicyCache] = {}
        self._effects: dict[str, bool] = {}
        self.encryption: Any = None  # proxy.encryption wiring, when `protect:` is configured
        if settings is not None:
            self.configure(settings)

    # ------------------------------------------------------------------ configuration

    def configure(self, settings: Settings) -> None:
        """Install the policy of a (re)loaded configuration. Cached decisions are dropped,
        so a reload applies to the next statement of every existing session."""
        from proxy.policy import Policy

        raw = settings.raw
        if "roles" in raw or "default" in raw:
            self.policy = Policy.from_dict(
                {k: raw[k] for k in ("roles", "default", "default_column_view") if k in raw}
            )
        else:
            self.policy = None
        for cache in self._caches.values():
            cache.swap(policy=self.policy)
        if raw.get("protect"):
            import os

            from proxy.encryption import Encryption

            base = os.path.dirname(os.path.abspath(settings.source)) \
                if not settings.source.startswith("<") else os.getcwd()
            self.encryption = Encryption(raw["protect"], raw.get("keys") or {}, base, self)
        else:
            self.encryption = None

    def _cache_for(self, database: str) -> PolicyCache:
        cache = self._caches.get(database)
        if cache is None:
            from proxy.policy import PolicyCache

            assert self.policy is not None
            cache = PolicyCache(self.policy, analyses=self.analyses)
            self._caches[database] = cache
        return cache

    # ------------------------------------------------------------------ session start

    def session_started(self, session: Session) -> str | None:
        """SQL the session must run before the client may go on, or None."""
        if self.policy is None and self.encryption is None:
            return None
        sql = PRELUDE_SQL
        if self.encryption is not None:
            sql += "; " + self.encryption.catalog_sql()
        return sql

    def prelude_done(self, session: Session, results: list[list[list[bytes | None]]]) -> None:
        from proxy.policy import Environment

        schemas = frozenset((r[0] or b"").decode() for r in results[0])
        path = parse_search_path((results[1][0][0] or b"").decode())
        if self.policy is not None:
            cache = self._cache_for(session.database)
            env = cache.env
            if env.existing_schemas != schemas or env.reset_search_path != path:
                cache.swap(env=Environment(existing_schemas=schemas, reset_search_path=path))
            session.policy_state = SessionPolicy(
                login_role=session.user, role=session.user, path=path, reset_path=path,
                committed_path=path,
            )
            session.watch_ready = True
        if self.encryption is not None:
            self.encryption.attach(session, results[2] if len(results) > 2 else [])

    # ------------------------------------------------------------------ statements

    def decide(self, session: Session, sql: str) -> ClientRefusal | None:
        """Policy verdict for one statement text in this session (None: allowed)."""
        st: SessionPolicy | None = session.policy_state  # type: ignore[assignment]
        if self.policy is None or st is None:
            return None
        cache = self._cache_for(session.database)
        decision = cache.decide(sql, st.role, st.path, session.database, st.prepared)
        if self.metrics is not None:
            self.metrics.policy_decision(st.role, decision)
        if not decision.allowed:
            if self.audit is not None:
                self.audit.denied(session, sql, decision.reason)
            log.info("session %s role=%s: denied: %s", session.id, st.role, decision.reason)
            return ClientRefusal("42501", f"permission denied by strongroom: {decision.reason}")
        effects = self._effects.get(sql)
        if effects is None:
            effects = self._has_effects(sql)
        if effects:
            self._apply_effects(st, self.analyses.analyze(sql))
        return None

    def is_ddl(self, sql: str) -> bool:
        """Whether a statement may change tables (the encryption catalog then reloads)."""
        try:
            analysis = self.analyses.analyze(sql)
        except Exception:
            return False
        return any(s.kind == "ddl" for s in analysis.statements)

    def _has_effects(self, sql: str) -> bool:
        try:
            analysis = self.analyses.analyze(sql)
        except Exception:
            return False
        result = any(
            s.kind in _EFFECT_KINDS or s.config_calls for s in analysis.statements
        )
        if len(self._effects) > 10_000:
            self._effects.clear()
        self._effects[sql] = result
        return result

    def _apply_effects(self, st: SessionPolicy, analysis: Analysis) -> None:
        from proxy.policy import search_path_after

        for info in analysis.statements:
            kind = info.kind
            if kind == "prepare" and info.name and info.inner is not None:
                st.prepared[info.name] = info.inner
            elif kind == "deallocate":
                if info.name:
                    st.prepared.pop(info.name, None)
                else:
                    st.prepared.clear()
            elif kind == "set_role":
                setting = info.setting
                if setting is None or setting.action != "value" or not setting.values:
                    st.role = st.login_role
                else:
                    st.role = setting.values[0]
            elif kind == "discard" and info.name == "all":
                st.role = st.login_role
                st.prepared.clear()
            elif kind in ("commit", "rollback"):
                st.txn_end = kind
            new = search_path_after(info, st.path, st.reset_path)
            if new != st.path:
                st.path = new
                if info.setting is None or not info.setting.is_local:
                    if st.last_status == b"I" and kind != "begin":
                        st.committed_path = new

    def ready(self, session: Session, status: bytes) -> None:
        """ReadyForQuery: a transaction that ended takes its SETs with it or keeps them."""
        st: SessionPolicy | None = session.policy_state  # type: ignore[assignment]
        if st is None:
            return
        if status == b"I" and st.last_status != b"I":
            if st.txn_end == "commit" and st.last_status == b"T":
                st.committed_path = st.path
            # SET LOCAL ends with any transaction; a rolled-back SET is undone.
            st.path = st.committed_path
            st.txn_end = None
        elif status == b"I":
            st.committed_path = st.path
        st.last_status = status

    def query(self, session: Session, body: bytes) -> bytes | None:
        sql = m.query_text(body)
        if self.policy is None:
            self._analyze_quietly(sql)
            return None
        refusal = self.decide(session, sql)
        if refusal is None:
            return None
        return m.message(b"Q", refusal_sql(refusal) + b"\0")

    def _analyze_quietly(self, sql: str) -> None:
        try:
            self.analyses.analyze(sql)
        except Exception:  # unparseable text: the server will say so itself
            pass

    def parse(self, session: Session, body: bytes) -> bytes | None:
        name, query, _oids = rows.decode_parse(body)
        sql = query.decode(errors="surrogateescape")
        if self.policy is None:
            self._analyze_quietly(sql)
            return None
        refusal = self.decide(session, sql)
        if refusal is None:
            session.denied.discard(name)
            return None
        session.denied.add(name)
        return rows.encode_parse(name, refusal_sql(refusal), [])

    def bind(self, session: Session, body: bytes) -> bytes | None:
        """A Bind to a substituted statement must carry no parameters, or the server would
        answer 08P01 instead of the refusal."""
        bind = rows.decode_bind(body)
        if bind.statement not in session.denied:
            return None
        bind.params = []
        bind.param_formats = []
        return rows.encode_bind(bind)
