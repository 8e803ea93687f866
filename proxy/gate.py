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
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from proxy.policy.engine import Decision
from proxy.policy.pg_builtins import PG_CATALOG_FUNCTIONS
from proxy.protocol import messages as m
from proxy.protocol import rows
from proxy.protocol.messages import ProtocolViolation
from proxy.sql import encoding
from proxy.sql.cache import DEFAULT_CACHE_BYTES, AnalysisCache, text_key
from proxy.sql.info import ALL, Analysis, StatementInfo
from proxy.sql.names import parse_search_path, quote_ident
from proxy.tracking import STALE_PORTAL_EXECUTE, ClientRefusal, refusal_sql

if TYPE_CHECKING:
    from proxy.policy import Decision, Policy, PolicyCache
    from proxy.session import Session
    from proxy.settings import Settings

log = logging.getLogger("strongroom.gate")

_ALLOWED = Decision(True, "allowed")  # what a memoised allowed Parse is counted as

_EFFECT_KINDS = frozenset(
    {"set", "set_role", "prepare", "deallocate", "discard", "begin", "commit", "rollback",
     "savepoint", "release", "rollback_to", "prepare_transaction", "explain",
     "declare", "fetch", "move", "close"}
)
_ROLE_PARAMS = frozenset({"role", "session_authorization"})
_UNKNOWN_OID = 25  # text
_SCHEMA_DDL = frozenset({"CreateSchemaStmt", "RenameStmt", "AlterObjectSchemaStmt"})
_CATALOG_CHANGES = frozenset({"ddl", "do"})  # may create, rename or drop functions

PRELUDE_SQL = (
    "SELECT nspname FROM pg_catalog.pg_namespace; "
    "SELECT pg_catalog.current_setting('search_path'), pg_catalog.current_setting('role'), "
    "session_user, pg_catalog.current_database(), pg_catalog.getdatabaseencoding()"
)

# pg_proc by OID, for FunctionCall messages (which name a function by OID only): loaded
# by the prelude of the first session of a database in this process, and again by the
# first one after this process saw DDL there (`Gate._functions`).
FUNCTIONS_SQL = (
    "SELECT p.oid, n.nspname, p.proname FROM pg_catalog.pg_proc p "
    "JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace"
)

# With `expand_views`: what every view's query reads, one row per (view, referenced
# relation, referenced column or NULL) from the dependencies of its `_RETURN` rule, and
# whether the rule has a whole-row reference anywhere (a Var with attno 0, which records
# no column dependency of its own). Only run when the policy asks for it.
VIEWS_SQL = (
    "WITH rules AS (SELECT r.oid, r.ev_class, vn.nspname, v.relname, "
    "pg_catalog.strpos(r.ev_action::pg_catalog.text, ':varattno 0 ') > 0 AS wholerow "
    "FROM pg_catalog.pg_rewrite r "
    "JOIN pg_catalog.pg_class v ON v.oid = r.ev_class AND v.relkind IN ('v', 'm') "
    "JOIN pg_catalog.pg_namespace vn ON vn.oid = v.relnamespace "
    "WHERE r.rulename = '_RETURN' "
    "AND vn.nspname NOT IN ('pg_catalog', 'information_schema')) "
    "SELECT DISTINCT rules.nspname, rules.relname, bn.nspname, b.relname, a.attname, "
    "rules.wholerow FROM rules "
    "JOIN pg_catalog.pg_depend d ON d.objid = rules.oid "
    "AND d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass "
    "AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass "
    "AND d.refobjid <> rules.ev_class "
    "JOIN pg_catalog.pg_class b ON b.oid = d.refobjid "
    "JOIN pg_catalog.pg_namespace bn ON bn.oid = b.relnamespace "
    "LEFT JOIN pg_catalog.pg_attribute a ON d.refobjsubid > 0 "
    "AND a.attrelid = d.refobjid AND a.attnum = d.refobjsubid"
)

_ViewMap = tuple[
    dict[tuple[str, str], frozenset[tuple[str, str]]],
    dict[tuple[str, str], dict[tuple[str, str], frozenset[str]]],
]


def function_map(rows: list[list[bytes | None]]) -> dict[int, tuple[str, str]]:
    """FUNCTIONS_SQL rows -> {oid: (schema, name)}."""
    out: dict[int, tuple[str, str]] = {}
    for row in rows:
        oid, schema, name = ((v or b"").decode() for v in row[:3])
        out[int(oid)] = (schema, name)
    return out


def _quoted(ident: str) -> str:
    """Always quoted: a function named like a keyword (``left``) still parses."""
    return '"' + ident.replace('"', '""') + '"'


def view_map(rows: list[list[bytes | None]]) -> _ViewMap:
    """VIEWS_SQL rows -> (view -> relations it reads, view -> relation -> columns)."""
    bases: dict[tuple[str, str], set[tuple[str, str]]] = {}
    columns: dict[tuple[str, str], dict[tuple[str, str], set[str]]] = {}
    for row in rows:
        vs, vn, bs, bn, col, whole = ((v or b"").decode() for v in row[:6])
        view, base = (vs, vn), (bs, bn)
        bases.setdefault(view, set()).add(base)
        cols = columns.setdefault(view, {}).setdefault(base, set())
        if col:
            cols.add(col)
        if whole == "t":
            cols.add(ALL)
    return (
        {k: frozenset(v) for k, v in bases.items()},
        {k: {b: frozenset(c) for b, c in v.items() if c} for k, v in columns.items()},
    )


# What a SET can change and a transaction end can undo: search_path, the current role
# (SET ROLE) and the session role (SET SESSION AUTHORIZATION).
_State = tuple[tuple[str, ...], str, str]


@dataclass(slots=True)
class SessionPolicy:
    """What the policy needs to know about one session, tracked statement by statement.

    Three copies of the trackable state, as PostgreSQL keeps them: ``path``/``role``/
    ``session_role`` are in effect now (SET LOCAL included); ``level`` is what survives
    the end of the current transaction if it commits (plain SETs); ``committed`` is what a
    rollback returns to. Savepoints keep their own snapshots. Statements are applied when
    they are sent (so the next statement of a pipeline is decided with them in force);
    ReadyForQuery settles the transaction: an error in an implicit transaction undoes it.
    """

    login_role: str
    role: str
    path: tuple[str, ...] = ("$user", "public")
    reset_path: tuple[str, ...] = ("$user", "public")
    session_role: str = ""
    level: _State = ((), "", "")
    committed: _State = ((), "", "")
    savepoints: list[tuple[str, _State, _State]] = field(default_factory=list)
    aborted: bool = False  # the server said the transaction block failed (status E)
    error: bool = False  # an ErrorResponse since the last ReadyForQuery
    refuse_all: str | None = None
    prepared: dict[str, StatementInfo] = field(default_factory=dict)
    prepared_path: dict[str, tuple[str, ...]] = field(default_factory=dict)
    refused: set[bytes] = field(default_factory=set)  # statement names substituted
    staged: dict[bytes, Analysis] = field(default_factory=dict)  # effects applied at Bind
    # After a reload, while a portal bound before it may still exist (until the
    # transaction ends, `Gate.ready`): the portals bound since. An Execute of any other
    # is refused (`Gate.execute`): it would run what the replaced policy allowed.
    portals_bound: set[bytes] | None = None
    named: dict[bytes, tuple[str, str, tuple[str, ...], int]] = field(default_factory=dict)
    """Allowed named statements: (text, role, search_path, policy generation) they were
    decided with (`Gate.generation`: a reload decides them again at their next Bind)."""
    last_status: bytes = b"I"
    # The last unnamed Parse body allowed without effects, with what it was decided
    # under (role, search_path, decision cache): a driver that re-sends the same Parse
    # every transaction (libpq's extended mode) then costs one comparison.
    unnamed_ok: tuple[bytes, str, tuple[str, ...], object, Any] | None = None
    # SQL cursors declared through the proxy: name -> (query, search_path, the roles in
    # effect when it was declared). A FETCH is decided and revealed under the stricter
    # of the declaring and the fetching role.
    cursors: dict[str, tuple[StatementInfo, tuple[str, ...], tuple[str, ...]]] = field(
        default_factory=dict)
    # Every role in effect while the last applied request ran (SET ROLE in the middle
    # of a string, a cursor declared by another role): its rows are revealed under the
    # strictest view of them (SessionProtector.viewer).
    request_roles: tuple[str, ...] = ()
    # The request just applied runs user code (DO, CALL, a function outside pg_catalog,
    # EXECUTE or FETCH of such a statement): code the proxy cannot see into may change
    # search_path, role or client_encoding, so the session observes them after it
    # (Session: the observation barrier) instead of trusting its simulation.
    user_code: bool = False
    # Names made by SQL PREPARE: PostgreSQL lets a protocol Bind use them too, but the
    # proxy decides them at EXECUTE (with the search_path they were prepared under and
    # the one of the moment); a Bind of one is refused (`Gate.bind`, the tracker).
    sql_prepared: set[str] = field(default_factory=set)
    # A transaction in which user code ran: its end (COMMIT may drop a SET LOCAL the
    # code made, ROLLBACK may undo a SET) is observed too.
    observe_at_end: bool = False

    def __post_init__(self) -> None:
        if not self.session_role:
            self.session_role = self.login_role
        self.level = self.committed = self.now()

    def now(self) -> _State:
        return (self.path, self.role, self.session_role)

    def put(self, state: _State) -> None:
        self.path, self.role, self.session_role = state


_TXN_ENDS = frozenset({"commit", "rollback", "rollback_to", "prepare_transaction"})


def _changes_role(info: StatementInfo) -> bool:
    while info.kind == "explain" and info.inner is not None:
        info = info.inner
    if info.kind == "set_role" or (info.kind == "discard" and info.name == "all"):
        return True
    return any(c.param in _ROLE_PARAMS for c in info.config_calls)


SQL_PREPARED_BIND = (
    "permission denied by strongroom: a statement made by SQL PREPARE is run with EXECUTE, "
    "not bound with the protocol")
"""Bound instead of a SQL-PREPAREd name: a statement name that cannot exist (26000)."""


def cursor_execute(st: SessionPolicy | None, portal: bytes) -> bytes | None:
    """A protocol Execute of a SQL cursor (DECLARE) would run its query as the role of
    the moment without a FETCH for the proxy to decide: it becomes an Execute of a portal
    that cannot exist, named with the reason (34000)."""
    if st is None or not st.cursors or portal.decode(errors="surrogateescape") not in st.cursors:
        return None
    reason = ("permission denied by strongroom: a cursor made by DECLARE is read with FETCH, "
              "not executed with the protocol")
    return m.message(b"E", reason.encode() + b"\0" + b"\0\0\0\0")


OBSERVE_SQL = ("SELECT pg_catalog.current_setting('search_path'), current_user, "
               "session_user")
"""What the session asks the server after user code ran (the observation barrier)."""


def _user_code(info: StatementInfo) -> bool:
    """DO, CALL, or a call of a function outside pg_catalog (a schema-qualified one, or
    an unqualified name that is not a built-in): code the proxy cannot see into."""
    if info.kind in ("do", "call"):
        return True
    for fn in info.functions:
        if fn.schema == "pg_catalog" or (fn.schema is None and fn.name in PG_CATALOG_FUNCTIONS):
            continue
        return True
    return False


def _needs_steps(analysis: Analysis) -> bool:
    """Does a statement before the last change (or possibly undo) the role?"""
    stmts = analysis.statements
    return len(stmts) > 1 and any(
        _changes_role(s) or s.kind in _TXN_ENDS for s in stmts[:-1]
    )


class Gate:
    """Analyses statements on the hot path and applies policy (and, through the tracker,
    encryption) to them."""

    def __init__(self, settings: Settings | None = None, cache_size: int = 10_000) -> None:
        self.analyses = AnalysisCache(cache_size)
        self.cache_bytes = DEFAULT_CACHE_BYTES  # `limits.statement_cache_bytes`, per cache
        self.metrics: Any = None
        self.audit: Any = None
        self.policy: Policy | None = None
        # Decisions depend on the environment, and RESET's target is per session: one
        # cache per (database, reset search_path), so sessions never share a wrong one.
        self._caches: dict[tuple[str, tuple[str, ...]], PolicyCache] = {}
        self._schemas: dict[str, frozenset[str] | None] = {}
        self._views: dict[str, _ViewMap] = {}  # per database, with expand_views
        # Per database: pg_proc by OID and the DDL generation it was loaded at; it is
        # stale once `_ddl_seen` of the database moved past that (see FUNCTIONS_SQL).
        self._functions: dict[str, tuple[dict[int, tuple[str, str]], int]] = {}
        self._ddl_seen: dict[str, int] = {}
        # What each session's prelude asked for (the config may be reloaded meanwhile):
        # (catalog, views, functions: the DDL generation they are loaded at, or None).
        self._preludes: weakref.WeakKeyDictionary[
            Session, tuple[bool, bool, int | None]
        ] = weakref.WeakKeyDictionary()
        # text_key(text) -> whether it has session effects: a 16-byte key and a bool, so
        # the 10,000 entries bound it in bytes too (never the text: proxy.sql.cache).
        self._effects: dict[bytes, bool] = {}
        self._template_user_code: dict[str, bool] = {}  # template key -> runs user code
        self.encryption: Any = None  # proxy.encryption wiring, when `protect:` is configured
        # Bumped by every (re)load. Named statements remember the generation they were
        # decided under; the sessions with a policy state are kept (weakly) so a reload
        # can send their next Binds of those statements through `bind` again.
        self.generation = 0
        self._sessions: weakref.WeakSet[Session] = weakref.WeakSet()
        if settings is not None:
            self.configure(settings)

    # ------------------------------------------------------------------ configuration

    def configure(self, settings: Settings) -> None:
        """Install the policy of a (re)loaded configuration. Cached decisions are dropped,
        so a reload applies to the next statement of every existing session.

        Everything that can fail (the policy, the keys: a keyring that does not
        authenticate) is built before anything is replaced, so a refused reload leaves
        the running policy and keys in force without reading any file again."""
        from proxy.policy import Policy
        from proxy.policy.model import POLICY_KEYS

        raw = settings.raw
        policy = None
        if "roles" in raw or "default" in raw or "default_column_view" in raw:
            policy = Policy.from_dict({k: raw[k] for k in POLICY_KEYS if k in raw})
        encryption = None
        if raw.get("protect"):
            import os

            from proxy.encryption import Encryption

            base = os.path.dirname(os.path.abspath(settings.source)) \
                if not settings.source.startswith("<") else os.getcwd()
            encryption = Encryption(raw["protect"], raw.get("keys") or {}, base, self)
            if "catalog_max_age" in raw:
                encryption.catalog_max_age = float(raw["catalog_max_age"])
        # Nothing of the running configuration has changed up to here.
        self.cache_bytes = settings.limits.statement_cache_bytes
        self.analyses.resize(self.cache_bytes)
        expanded = self.policy is not None and self.policy.expand_views
        self.policy = policy
        if self.policy is not None and self.policy.expand_views and not expanded:
            # Turned on now: what was loaded before may be stale; sessions that start
            # from now on load it again (older ones are refused until one does).
            self._views.clear()
        for (db, reset), cache in self._caches.items():
            cache.max_bytes = self.cache_bytes
            cache.swap(policy=self.policy, env=self._env(db, reset))
        self.generation += 1
        for session in self._sessions:
            st: SessionPolicy | None = session.policy_state  # type: ignore[assignment]
            if st is not None:
                st.unnamed_ok = None
                self._watch_named(session, st)
                if session.tracker is None and (  # (tracking: `Tracker._client_execute`)
                        st.last_status != b"I" or session.outstanding):  # portals may exist
                    st.portals_bound = set()
                    session.watch_portals = True
        if encryption is not None:
            if self.encryption is not None:
                encryption.inherit(self.encryption)
            encryption.plan_cache.resize(self.cache_bytes)
            encryption.set_max_cell_size(settings.limits.max_cell_size)
        self.encryption = encryption

    def _cache_for(self, database: str, reset_path: tuple[str, ...]) -> PolicyCache:
        cache = self._caches.get((database, reset_path))
        if cache is None:
            from proxy.policy import PolicyCache

            assert self.policy is not None
            if len(self._caches) > 1000:  # unbounded distinct startup paths: start over
                self._caches.clear()
            cache = PolicyCache(
                self.policy, env=self._env(database, reset_path), analyses=self.analyses,
                max_bytes=self.cache_bytes,
            )
            self._caches[(database, reset_path)] = cache
        return cache

    def _env(self, database: str, reset_path: tuple[str, ...]) -> Any:
        """The Environment of (database, reset search_path) from what the gate knows."""
        from proxy.policy import Environment

        views = self._views.get(database)
        return Environment(
            existing_schemas=self._schemas.get(database),
            reset_search_path=reset_path,
            view_bases=views[0] if views is not None else None,
            view_columns=views[1] if views is not None else {},
        )

    def _reset_envs(self, database: str) -> None:
        for (db, reset), cache in self._caches.items():
            if db == database:
                cache.swap(env=self._env(db, reset))

    def _set_schemas(self, database: str, schemas: frozenset[str] | None) -> None:
        """New knowledge of the database's schemas: every cache of it starts over."""
        if self._schemas.get(database, ()) == schemas:
            return
        self._schemas[database] = schemas
        self._reset_envs(database)

    def _set_views(self, database: str, views: _ViewMap) -> None:
        """New knowledge of the database's views: every cache of it starts over."""
        if self._views.get(database) == views:
            return
        self._views[database] = views
        self._reset_envs(database)

    # ------------------------------------------------------------------ session start

    def session_started(self, session: Session) -> str | None:
        """SQL the session must run before the client may go on, or None."""
        if self.policy is None and self.encryption is None:
            return None
        # Results: [0] schemas, [1] settings, then the encryption catalog (always [2] when
        # asked for: Encryption.attach takes it), then the view dependencies.
        sql = PRELUDE_SQL
        catalog = self.encryption is not None
        views = self.policy is not None and self.policy.expand_views
        if catalog:
            sql += "; " + self.encryption.catalog_sql()
        if views:
            sql += "; " + VIEWS_SQL
        # Last: its results follow the others'. One query per database per process (and
        # per DDL seen), not per session.
        generation = self._ddl_seen.get(session.database, 0)
        loaded = self._functions.get(session.database)
        functions = None
        if loaded is None or loaded[1] != generation:
            sql += "; " + FUNCTIONS_SQL
            functions = generation
        self._preludes[session] = (catalog, views, functions)
        return sql

    def prelude_done(self, session: Session, results: list[list[list[bytes | None]]]) -> None:
        catalog, views, functions = self._preludes.pop(session, (False, False, None))
        index = 3 if catalog else 2
        if views and len(results) > index:
            self._set_views(session.database, view_map(results[index]))
        if functions is not None:
            at = 2 + catalog + views
            if len(results) > at:
                self._functions[session.database] = (function_map(results[at]), functions)
        schemas = frozenset((r[0] or b"").decode() for r in results[0])
        row = [(v or b"").decode() for v in results[1][0]]
        path = parse_search_path(row[0])
        if self.policy is not None:
            self._set_schemas(session.database, schemas)
            role_opt, session_user = (row[1], row[2]) if len(row) >= 3 else ("none", "")
            session_user = session_user or session.user
            st = SessionPolicy(
                login_role=session.user,
                role=session_user if role_opt == "none" else role_opt,
                path=path,
                reset_path=path,
                session_role=session_user,
            )
            if st.role != session.user or st.session_role != session.user:
                # A `role` / `session_authorization` startup option is a SET ROLE.
                rp = self.policy.role(session.user)
                if rp is None or "set_role" not in rp.allow:
                    st.refuse_all = (
                        f'role "{session.user}": a role startup option is a set_role, which is '
                        "not allowed (needs allow: set_role)"
                    )
            session.policy_state = st
            session.watch_ready = True
            self._sessions.add(session)
        if self.encryption is not None:
            # The database envelopes are bound to: the server's answer, not the startup
            # packet (see encryption.DatabaseBinding); a session cannot change it.
            from proxy.encryption import bindable_database

            database = bindable_database(row[3], row[4]) if len(row) > 4 else ""
            self.encryption.attach(session, results[2] if catalog and len(results) > 2 else [],
                                   database)

    # ------------------------------------------------------------------ function calls

    def function_call(self, session: Session, body: bytes) -> bytes | None:
        """A FunctionCall message: None to forward it, or the Query to send instead,
        which makes the server raise the refusal (ErrorResponse then ReadyForQuery, as
        for a failed call, with the transaction state the server's own)."""
        if self.policy is None and self.encryption is None:
            return None  # nothing is checked or tracked: the plain relay
        refusal = self._function_refusal(session, body)
        if refusal is None:
            return None
        return m.message(b"Q", refusal_sql(refusal) + b"\0")

    def _function_refusal(self, session: Session, body: bytes) -> ClientRefusal | None:
        """The same rules as a call written in SQL (POLICY-SEMANTICS "Functions"): the
        OID is resolved to ``schema.name`` through pg_proc as loaded from this server,
        then decided as ``SELECT schema.name()`` would be. An OID the proxy does not know
        (a function created since the map was loaded, or none at all) is denied, and so
        is ``set_config``: the proxy could not follow the setting it changes."""
        if len(body) < 4:
            raise ProtocolViolation("invalid FunctionCall message")
        oid = int.from_bytes(body[:4], "big")
        st: SessionPolicy | None = session.policy_state  # type: ignore[assignment]
        role = st.role if st is not None else session.user
        loaded = self._functions.get(session.database)
        target = loaded[0].get(oid) if loaded is not None else None
        if target is None:
            return self._refuse_call(
                session, role, f"function with OID {oid} is not known to the proxy "
                "(FunctionCall message); call it by name in SQL")
        schema, name = target
        sql = f"SELECT {_quoted(schema)}.{_quoted(name)}()"  # what the call amounts to
        if schema == "pg_catalog" and name == "set_config":
            return self._refuse_call(
                session, role, "set_config in a FunctionCall message (the proxy cannot "
                "follow the setting it changes); use SET or SELECT set_config(...)", sql)
        if self.policy is None:
            return None
        refusal = self.decide(session, sql, apply=False)
        if refusal is None and st is not None and schema != "pg_catalog":
            st.user_code = True  # the session observes its state after the call
        return refusal

    def functions_changed(self, database: str) -> None:
        """Functions may have appeared, moved or gone (DDL, or a DO that may run it, was
        sent): the next session of this database loads pg_proc again."""
        self._ddl_seen[database] = self._ddl_seen.get(database, 0) + 1

    def _refuse_call(self, session: Session, role: str, reason: str,
                     sql: str = "") -> ClientRefusal:
        """A refusal of a FunctionCall the engine did not decide, counted and audited
        as every other denial."""
        reason = f'role "{role}": {reason}'
        if self.metrics is not None:
            self.metrics.policy_decision(role, Decision(False, reason))
        return self._refuse(session, role, reason, sql)

    # ------------------------------------------------------------------ statements

    def decide(
        self, session: Session, sql: str, apply: bool = True
    ) -> ClientRefusal | None:
        """Policy verdict for one statement text in this session (None: allowed).

        With ``apply`` the statement's effects on the session (SET, SET ROLE, PREPARE,
        transaction ends...) are applied when it is allowed; the extended protocol applies
        them at Bind instead (a Parse may never be executed, or executed many times).
        """
        st: SessionPolicy | None = session.policy_state  # type: ignore[assignment]
        if self.policy is None:
            return self.text_rules(session, sql)
        if st is None:
            # The policy was loaded after this session started without one: its
            # search_path and role were never read, so nothing can be decided.
            return self._refuse(session, session.user, f'role "{session.user}": this session '
                                "started before the policy was loaded; reconnect")
        if st.refuse_all is not None:
            return self._refuse(session, st.role, st.refuse_all)
        st.request_roles = ()
        st.user_code = False
        cache = self._cache_for(session.database, st.reset_path)
        effects = self._effects.get(text_key(sql))
        decision: Decision | None = None
        if effects is None:
            # Plain DML seen before with other constants: its template analysis has no
            # session effects, and its decision is cached under the template.
            try:
                analysis = self.analyses.analyze(sql)
            except Exception:
                analysis = None
            key = self.analyses.last_key
            if analysis is not None and key[:1] == "\0":
                user_code = self._template_user_code.get(key)
                if user_code is None:
                    user_code = any(_user_code(s) for s in analysis.statements)
                    if len(self._template_user_code) > 10_000:
                        self._template_user_code.clear()
                    self._template_user_code[key] = user_code
                if user_code:
                    # A call of user code with constants: its session is observed
                    # after it (the effects path marks it), whatever the constants.
                    effects = self._has_effects(sql)
                else:
                    decision = cache.decide_keyed(
                        key, analysis, st.role, st.path, session.database, st.prepared
                    )
                    effects = False
            else:
                effects = self._has_effects(sql)
        if decision is None:
            if effects:
                decision = self._decide_effects(cache, session, st, sql)
            else:
                decision = cache.decide(sql, st.role, st.path, session.database, st.prepared)
        if self.metrics is not None:
            self.metrics.policy_decision(st.role, decision)
        if not decision.allowed:
            return self._refuse(session, st.role, decision.reason, sql)
        if effects:
            # Statements that change how the server reads text have effects (see
            # _has_effects): what the policy allows of them is refused here.
            refusal = self.text_rules(session, sql)
            if refusal is not None:
                return refusal
        if effects and apply:
            self._apply_effects(session, st, self.analyses.analyze(sql))
        return None

    def text_rules(self, session: Session, sql: str) -> ClientRefusal | None:
        """Refuse a statement that would change how the server reads statement text
        (client_encoding, standard_conforming_strings; see proxy.sql.encoding), with or
        without a policy. Unparseable text is the server's to reject (or, with a policy,
        denied by it)."""
        try:
            analysis = self.analyses.analyze(sql)
        except Exception:
            return None
        reason = encoding.analysis_refusal(analysis, session.server_params)
        if reason is None:
            return None
        if self.audit is not None:
            self.audit.denied(session, sql, reason)
        log.info("session %s user=%s: refused: %s", session.id, session.user, reason)
        return ClientRefusal(encoding.SQLSTATE, reason, hint=encoding.HINT)

    def _refuse(self, session: Session, role: str, reason: str, sql: str = "") -> ClientRefusal:
        if self.audit is not None:
            self.audit.denied(session, sql, reason)
        log.info("session %s role=%s: denied: %s", session.id, role, reason)
        return ClientRefusal("42501", f"permission denied by strongroom: {reason}")

    def _decide_effects(self, cache: PolicyCache, session: Session, st: SessionPolicy,
                        sql: str) -> Decision:
        from proxy.policy import Decision

        stmts = self.analyses.analyze(sql).statements
        for index, info in enumerate(stmts[:-1]):
            if self._runs_user_code(st, info):
                # The statements after it would run in a session the code may have
                # changed (search_path, role) before the proxy could observe it.
                return Decision(False, f'role "{st.role}": statement {index + 2} follows a '
                                "call of user code (DO, CALL or a function outside "
                                "pg_catalog) in the same string; send it separately", index + 1)
        decision = self._decide_effects_text(cache, session, st, sql)
        if decision.allowed:
            return self._decide_fetches(cache, session, st, sql) or decision
        return decision

    def _decide_fetches(self, cache: PolicyCache, session: Session, st: SessionPolicy,
                        sql: str) -> Decision | None:
        """FETCH / MOVE run the cursor's query as the role in effect now: it must be
        allowed to that role too (PostgreSQL checked it for the declaring role only)."""
        from proxy.policy import Decision, decide

        assert self.policy is not None
        declared: set[str] = set()  # by a DECLARE earlier in the same string
        statements = self.analyses.analyze(sql).statements
        role_changes = any(_changes_role(s) for s in statements)
        for info in statements:
            if info.kind == "declare" and info.name:
                declared.add(info.name)
            elif info.kind in ("fetch", "move") and info.name is not None:
                if info.name in declared:
                    if role_changes:  # declared as one role, fetched as another
                        return Decision(False, f'role "{st.role}": {info.kind.upper()} of '
                                        f"{info.name}: a cursor declared in a string that "
                                        "changes the role")
                    continue  # decided with its DECLARE, as the same role, just before
                cursor = st.cursors.get(info.name)
                if cursor is None:
                    # A portal the client bound with the protocol: FETCH would run it
                    # (and any set_config in it) where no Execute shows it to the proxy.
                    return Decision(False, f'role "{st.role}": {info.kind.upper()} of '
                                    f"{info.name}: not a cursor declared with DECLARE "
                                    "(a protocol portal: use Execute)")
                query, path, _roles = cursor
                found = decide(self.policy, st.role, query, path, session.database,
                               env=cache.env, prepared=st.prepared)
                if not found.allowed:
                    return Decision(False, f"{found.reason} (the query of cursor "
                                    f"{quote_ident(info.name)}, run by FETCH or MOVE)")
        return None

    def _decide_effects_text(self, cache: PolicyCache, session: Session, st: SessionPolicy,
                             sql: str) -> Decision:
        """Statements with session effects need what the per-text cache cannot see: the
        PREPAREs earlier in the same string, the search_path a prepared statement was
        planned with (PostgreSQL keeps it), role changes the proxy could not follow."""
        from proxy.policy import Decision

        analysis = self.analyses.analyze(sql)  # parsed already: _has_effects said so
        for info in analysis.statements:
            for call in info.config_calls:
                if call.param in _ROLE_PARAMS and (call.values is None or call.is_local is None):
                    return Decision(False, f'role "{st.role}": set_config(\'{call.param}\') '
                                    "with a value the proxy cannot track")
        role = st.role
        if all(info.kind == "set_role" for info in analysis.statements):
            # Switching roles is the authenticated (session) role's right, as in
            # PostgreSQL: after SET ROLE to a role without set_role, RESET ROLE still works.
            role = st.session_role
        if not analysis.has_execute:
            decision = cache.decide(sql, role, st.path, session.database, st.prepared)
            if decision.allowed and _needs_steps(analysis):
                return self._decide_steps(cache, session, st, analysis, st.prepared)
            return decision
        prepared = dict(st.prepared)
        paths = {st.path}
        executed: set[str] = set()
        for info in analysis.statements:
            while info.kind == "explain" and info.inner is not None:
                info = info.inner
            if info.kind == "prepare" and info.name and info.inner is not None:
                if info.name not in executed:  # else both definitions would be in play
                    prepared[info.name] = info.inner
            elif info.kind == "execute" and info.name:
                executed.add(info.name)
                if info.name in st.prepared_path:
                    paths.add(st.prepared_path[info.name])
        decision: Decision | None = None
        for path in sorted(paths):
            decision = cache.decide(sql, st.role, path, session.database, prepared)
            if not decision.allowed:
                break
        assert decision is not None
        if decision.allowed and _needs_steps(analysis):
            return self._decide_steps(cache, session, st, analysis, prepared)
        return decision

    def _decide_steps(self, cache: PolicyCache, session: Session, st: SessionPolicy,
                      analysis: Analysis, prepared: dict[str, StatementInfo]) -> Decision:
        """A string that changes role (or ends a transaction that may undo a role change)
        before its last statement: the engine decides a string as one role, PostgreSQL
        runs each statement as the role then in effect. Follow it statement by statement
        on a scratch copy of the session state; every statement must pass as the role
        and search_path it will really run with (on top of the whole-string decision)."""
        from proxy.policy import Decision, decide

        assert self.policy is not None
        sim = SessionPolicy(login_role=st.login_role, role=st.role, path=st.path,
                            reset_path=st.reset_path, session_role=st.session_role)
        sim.level, sim.committed, sim.aborted = st.level, st.committed, st.aborted
        sim.savepoints = list(st.savepoints)
        sim.prepared, sim.prepared_path = dict(prepared), dict(st.prepared_path)
        for index, info in enumerate(analysis.statements):
            role = sim.session_role if info.kind == "set_role" else sim.role
            found = decide(self.policy, role, info, sim.path, session.database,
                           env=cache.env, prepared=sim.prepared)
            if not found.allowed:
                return Decision(False, _at_statement(found.reason, role, index), index)
            self._apply_one(session, sim, info, scratch=True)
        return Decision(True, "allowed")

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
            s.kind in _EFFECT_KINDS or s.config_calls or s.kind == "execute"
            or s.kind in _CATALOG_CHANGES or _user_code(s)
            for s in analysis.statements
        ) or encoding.analysis_refusal(analysis, {}) is not None
        if len(self._effects) > 10_000:
            self._effects.clear()
        self._effects[text_key(sql)] = result
        return result

    def _runs_user_code(self, st: SessionPolicy, info: StatementInfo) -> bool:
        """Whether running `info` may run code the proxy cannot see into."""
        while info.kind == "explain" and info.inner is not None:
            if not info.explain_analyze:
                return False
            info = info.inner
        if _user_code(info):
            return True
        if info.kind == "execute" and info.name in st.prepared:
            return _user_code(st.prepared[info.name])
        if info.kind in ("fetch", "move") and info.name in st.cursors:
            return _user_code(st.cursors[info.name][0])
        return False

    def observed(self, session: Session, row: list[bytes | None]) -> None:
        """The server's own answer after user code ran: search_path, current_user,
        session_user. It replaces what the proxy simulated (observe, never simulate)."""
        st: SessionPolicy | None = session.policy_state  # type: ignore[assignment]
        if st is None or len(row) < 3:
            return
        path = parse_search_path((row[0] or b"").decode())
        role = (row[1] or b"").decode() or st.role
        srole = (row[2] or b"").decode() or st.session_role
        if (path, role, srole) != st.now():
            log.warning("session %s: user code changed the session (search_path %s, role "
                        "%s); following the server", session.id, ", ".join(path), role)
            st.put((path, role, srole))
            st.level = st.now()
            self._watch_named(session, st)
        if st.last_status == b"I":
            st.level = st.committed = st.now()
            st.observe_at_end = False

    def _apply_effects(self, session: Session, st: SessionPolicy, analysis: Analysis) -> None:
        before = (st.role, st.path)
        roles = [st.role]
        for info in analysis.statements:
            if info.kind in ("fetch", "move") and info.name in st.cursors:
                roles.extend(st.cursors[info.name][2])
            self._apply_one(session, st, info)
            roles.append(st.role)
        st.request_roles = tuple(dict.fromkeys(roles))
        if (st.role, st.path) != before:
            self._watch_named(session, st)

    @staticmethod
    def _watch_named(session: Session, st: SessionPolicy) -> None:
        """Role or search_path changed: Binds of earlier named statements need a look."""
        session.denied.update(st.named)

    def _apply_one(self, session: Session, st: SessionPolicy, info: StatementInfo,
                   scratch: bool = False) -> None:
        kind = info.kind
        if not scratch and self._runs_user_code(st, info):
            st.user_code = True
            if st.last_status != b"I" or kind == "begin":
                st.observe_at_end = True
        if not scratch and st.observe_at_end and kind in _TXN_ENDS:
            st.user_code = True  # the end of the transaction is observed as well
        if kind == "explain":
            if info.explain_analyze and info.inner is not None:
                self._apply_one(session, st, info.inner, scratch)
            return
        if kind == "prepare" and info.name and info.inner is not None:
            st.prepared[info.name] = info.inner
            st.prepared_path[info.name] = st.path
            if not scratch:
                st.sql_prepared.add(info.name)
                session.denied.add(info.name.encode(errors="surrogateescape"))
        elif kind == "deallocate":
            if info.name:
                st.prepared.pop(info.name, None)
                st.prepared_path.pop(info.name, None)
                if not scratch:
                    st.sql_prepared.discard(info.name)
            else:
                st.prepared.clear()
                st.prepared_path.clear()
                if not scratch:
                    st.sql_prepared.clear()
        elif kind == "discard" and info.name == "all":
            # SET SESSION AUTHORIZATION DEFAULT; RESET ALL; DEALLOCATE ALL; ... (no block)
            st.prepared.clear()
            st.prepared_path.clear()
            st.cursors.clear()
            if not scratch:
                st.sql_prepared.clear()
            self._set(st, "session_authorization", None, False)
            self._set(st, "search_path", None, False)
        elif kind == "begin":
            st.savepoints.clear()
        elif kind == "declare" and info.name and info.inner is not None:
            if len(st.cursors) >= 1000 and info.name not in st.cursors:
                st.cursors.pop(next(iter(st.cursors)))
            st.cursors[info.name] = (info.inner, st.path, (st.role,))
        elif kind == "close":
            if info.name:
                st.cursors.pop(info.name, None)
            else:
                st.cursors.clear()
        elif kind in ("commit", "prepare_transaction"):
            if st.aborted:  # COMMIT of a failed block is a ROLLBACK
                st.put(st.committed)
                st.level = st.committed
            else:
                st.put(st.level)
                st.committed = st.level
            st.savepoints.clear()
        elif kind == "rollback":
            st.put(st.committed)
            st.level = st.committed
            st.savepoints.clear()
        elif kind == "savepoint" and info.name:
            st.savepoints.append((info.name, st.now(), st.level))
        elif kind in ("rollback_to", "release") and info.name:
            for i in range(len(st.savepoints) - 1, -1, -1):
                if st.savepoints[i][0] == info.name:
                    _, now, level = st.savepoints[i]
                    if kind == "rollback_to":
                        st.put(now)
                        st.level = level
                        del st.savepoints[i + 1 :]
                    else:
                        del st.savepoints[i:]
                    break
        elif kind in _CATALOG_CHANGES and not scratch:
            if kind == "ddl" and info.detail in _SCHEMA_DDL:
                # A schema appeared or moved: stop trusting the list read at session
                # start (None: every schema of the path may hold a name; fail closed).
                self._set_schemas(session.database, None)
            self.functions_changed(session.database)
        setting = info.setting
        if setting is not None and kind in ("set", "set_role"):
            param = setting.param
            if param == "all" and setting.action == "default":
                self._set(st, "search_path", None, setting.is_local)
            elif param in ("search_path", "role", "session_authorization"):
                if setting.action == "value":
                    value: Any = setting.values if param == "search_path" else (
                        setting.values[0] if setting.values else None)
                    self._set(st, param, value, setting.is_local)
                elif setting.action == "default":
                    self._set(st, param, None, setting.is_local)
        for call in info.config_calls:
            if call.param in ("search_path", "role", "session_authorization"):
                if call.values is None or call.is_local is None:
                    continue  # denied before it got here
                value = call.values if call.param == "search_path" else call.values[0]
                if call.param != "search_path" and value in ("", "default"):
                    value = None
                self._set(st, call.param, value, call.is_local)

    def _set(self, st: SessionPolicy, param: str, value: Any, local: bool) -> None:
        """SET [LOCAL] param = value (None: RESET / DEFAULT / NONE)."""
        path, role, srole = st.now()
        if param == "search_path":
            path = st.reset_path if value is None else tuple(value)
        elif param == "role":
            role = srole if value is None or value == "none" else value
        else:  # session_authorization also makes the current role the new session role
            srole = st.login_role if value is None else value
            role = srole
        st.put((path, role, srole))
        if not local:
            lpath, lrole, lsrole = st.level
            if param == "search_path":
                st.level = (path, lrole, lsrole)
            elif param == "role":
                st.level = (lpath, role, lsrole)
            else:
                st.level = (lpath, role, srole)

    def server_error(self, session: Session) -> None:
        """An ErrorResponse went by: the transaction it belongs to will not commit."""
        st: SessionPolicy | None = session.policy_state  # type: ignore[assignment]
        if st is not None:
            st.error = True

    def ready(self, session: Session, status: bytes) -> None:
        """ReadyForQuery: settle what the finished request did to the transaction."""
        st: SessionPolicy | None = session.policy_state  # type: ignore[assignment]
        if st is None:
            return
        before = (st.role, st.path)
        if status == b"I":
            if st.error:
                # The implicit transaction (or what followed the last COMMIT in it)
                # rolled back, and with it every SET of the request.
                st.level = st.committed
            st.committed = st.level
            st.put(st.level)  # SET LOCAL ends with any transaction
            st.savepoints.clear()
            st.aborted = False
            if st.portals_bound is not None and not session.outstanding:
                # The transaction ended, with every portal bound in it: none left from
                # before the reload.
                st.portals_bound = None
                session.watch_portals = False
        elif status == b"E":
            st.aborted = True
        else:
            st.aborted = False
        st.error = False
        st.last_status = status
        if (st.role, st.path) != before:
            self._watch_named(session, st)

    def query(self, session: Session, body: bytes) -> bytes | None:
        sql = m.query_text(body)
        if self.policy is None:
            # This runs for every simple-protocol statement: the analysis (cached) and,
            # inline, the cheap text-rules check; only a refusal goes the long way.
            try:
                analysis = self.analyses.analyze(sql)
            except Exception:  # unparseable text: the server will say so itself
                return None
            if encoding.analysis_refusal(analysis, session.server_params) is None:
                return None
        refusal = self.decide(session, sql)
        if refusal is None:
            return None
        return m.message(b"Q", refusal_sql(refusal) + b"\0")

    def parse(self, session: Session, body: bytes) -> bytes | None:
        st_fast: SessionPolicy | None = session.policy_state  # type: ignore[assignment]
        if st_fast is not None and body[:1] == b"\0" and self.policy is not None:
            memo = st_fast.unnamed_ok
            if (
                memo is not None
                and memo[0] == body
                and memo[1] is st_fast.role
                and memo[2] is st_fast.path
                and memo[3] is self._cache_for(session.database, st_fast.reset_path)._data
                and st_fast.refuse_all is None
            ):
                if self.metrics is not None:
                    self.metrics.policy_decision(st_fast.role, memo[4])
                st_fast.refused.discard(b"")
                st_fast.staged.pop(b"", None)
                session.denied.discard(b"")
                return None
        if self.policy is None and body is not None and session.last_parse == body:
            return None  # analysed when it was first seen; nothing decides on it
        name, query, _oids = rows.decode_parse(body)
        sql = query.decode(errors="surrogateescape")
        if self.policy is None:
            refusal = self.text_rules(session, sql)
            if refusal is None:
                session.last_parse = body
                if session.denied:
                    session.denied.discard(name)
                return None
            session.last_parse = None
            session.denied.add(name)
            return rows.encode_parse(name, refusal_sql(refusal), self._refusal_oids(sql, _oids))
        st: SessionPolicy | None = session.policy_state  # type: ignore[assignment]
        refusal = self.decide(session, sql, apply=False)
        if st is not None:
            st.refused.discard(name)
            st.staged.pop(name, None)
            st.named.pop(name, None)
            if st.sql_prepared:
                st.sql_prepared.discard(name.decode(errors="surrogateescape"))
        if refusal is None:
            if st is not None and name:
                if len(st.named) >= 1000 and name not in st.named:
                    st.named.pop(next(iter(st.named)))
                st.named[name] = (sql, st.role, st.path, self.generation)
            if st is not None and self._effects.get(text_key(sql)):
                # Effects happen when the statement runs: the gate must see its Binds.
                st.staged[name] = self.analyses.analyze(sql)
                if name:
                    self._record_parsed(st, name, st.staged[name])
                session.denied.add(name)
            else:
                if st is not None and name:
                    self._record_parsed(st, name, self.analyses.analyze(sql))
                session.denied.discard(name)
                if st is not None and not name:
                    cache = self._cache_for(session.database, st.reset_path)
                    st.unnamed_ok = (body, st.role, st.path, cache._data, _ALLOWED)
            return None
        if st is not None:
            st.refused.add(name)
        session.denied.add(name)
        return rows.encode_parse(name, refusal_sql(refusal), self._refusal_oids(sql, _oids))

    def _refusal_oids(self, sql: str, oids: list[int]) -> list[int]:
        """Parameter types for the substituted statement: as many as the client's
        statement has, so a driver that Describes it (asyncpg) binds its arguments and
        gets the 42501 at Execute instead of failing on a parameter count. Types the
        client left to the server become ``text`` (the server cannot infer a type for a
        parameter the refusal does not use); Bind then sends NULLs only."""
        try:
            count = self.analyses.analyze(sql).param_count
        except Exception:
            count = 0
        count = max(count, len(oids))
        return [oid or _UNKNOWN_OID for oid in oids] + [_UNKNOWN_OID] * (count - len(oids))

    @staticmethod
    def _record_parsed(st: SessionPolicy, name: bytes, analysis: Analysis) -> None:
        """A named protocol statement shares PREPARE's namespace: SQL EXECUTE can run it."""
        if len(analysis.statements) == 1:
            key = name.decode(errors="surrogateescape")
            if len(st.prepared) >= 1000 and key not in st.prepared:
                # Drivers Close old names we do not see: forget the oldest. EXECUTE of a
                # forgotten name is then denied (unknown), which fails closed.
                oldest = next(iter(st.prepared))
                del st.prepared[oldest]
                st.prepared_path.pop(oldest, None)
            st.prepared[key] = analysis.statements[0]
            st.prepared_path[key] = st.path

    def bind(self, session: Session, body: bytes) -> bytes | None:
        """Binds of statements the gate watches (``session.denied``). An allowed one with
        session effects (SET, SET ROLE, PREPARE...) applies them now, each time it runs.
        A substituted one keeps its parameter count (the refusal declares as many) but
        every value becomes NULL: no input function runs, so no type or encoding error
        (or 08P01) can come before the refusal, and no value reaches the server."""
        bind = rows.decode_bind(body)
        st_: SessionPolicy | None = session.policy_state  # type: ignore[assignment]
        if st_ is not None and st_.portals_bound is not None:
            st_.portals_bound.add(bind.portal)
        if session.effect_portals:
            session.effect_portals.pop(bind.portal, None)  # a new Bind replaces the portal
        if bind.statement not in session.denied:
            return None
        st: SessionPolicy | None = session.policy_state  # type: ignore[assignment]
        if st is not None and bind.statement not in st.named and bind.statement.decode(
                errors="surrogateescape") in st.sql_prepared:
            bind.statement = SQL_PREPARED_BIND.encode()
            return rows.encode_bind(bind)
        if st is not None and bind.statement not in st.refused:
            named = st.named.get(bind.statement)
            if named is not None and (named[1], named[2], named[3]) != (
                    st.role, st.path, self.generation):
                # Parsed as another role or search_path (SET ROLE since, or a driver's
                # automatic prepare), or under a policy reloaded since: decide again
                # for the role it will now run as, under the policy in force.
                refusal = self.decide(session, named[0], apply=False)
                if refusal is not None:
                    # The server already holds the real statement; bind to a name that
                    # cannot exist instead, which fails (26000) with the refusal's words.
                    bind.statement = refusal.text.encode()
                    return rows.encode_bind(bind)
                st.named[bind.statement] = (named[0], st.role, st.path, self.generation)
            staged = st.staged.get(bind.statement)
            if staged is not None:
                # Effects happen when the portal runs, not when it is bound: a Bind
                # without an Execute changes nothing on the server (`execute`).
                session.effect_portals[bind.portal] = staged
            else:
                session.denied.discard(bind.statement)  # back on the fast path
            return None
        bind.params = [None] * len(bind.params)
        return rows.encode_bind(bind)

    def execute(self, session: Session, portal: bytes) -> bytes | None:
        """Execute of a portal whose statement has session effects (SET, set_config,
        PREPARE...): the server applies them now, so the gate does too. Only an Execute
        makes a statement run; Parse and Bind alone change nothing on the server.
        An Execute of a SQL cursor (DECLARE) is refused: it is decided at FETCH (see
        `cursor_execute`). Returns the Execute to send instead, or None."""
        st: SessionPolicy | None = session.policy_state  # type: ignore[assignment]
        if st is not None and st.portals_bound is not None and portal not in st.portals_bound:
            return STALE_PORTAL_EXECUTE  # bound before a reload (see SessionPolicy)
        refused = cursor_execute(st, portal)
        if refused is not None:
            return refused
        staged = session.effect_portals.get(portal)
        if staged is not None and st is not None:
            self._apply_effects(session, st, staged)
        return None

    def staged_effects(self, sql: str) -> Analysis | None:
        """The analysis of a parsed statement whose session effects wait for Execute."""
        if self._effects.get(text_key(sql)) is None:
            self._has_effects(sql)
        return self.analyses.analyze(sql) if self._effects.get(text_key(sql)) else None

    def apply_staged(self, session: Session, analysis: Analysis) -> None:
        st: SessionPolicy | None = session.policy_state  # type: ignore[assignment]
        if st is not None:
            self._apply_effects(session, st, analysis)

    def heavy_work(self, session: Session, kind: int, body: bytes,
                   ) -> list[tuple[Future[Any], Callable[[Any], None]]] | None:
        """For a big Query (kind 'Q') or Parse body: its analysis (and, with `protect:`,
        its rewrite plan) started in the worker process (`proxy.sql.offload`), each with
        the function that installs the result in its cache on the event loop. None when
        both are cached already, or when this session just had this text worked on."""
        from proxy.sql import offload

        if kind == ord("Q"):
            sql = m.query_text(body)
        else:
            sql = rows.decode_parse(body)[1].decode(errors="surrogateescape")
        if session.heavy_done == sql:
            return None
        jobs: list[tuple[Future[Any], Callable[[Any], None]]] = []
        analyses = self.analyses
        if not analyses.cached(sql):
            jobs.append((offload.analyse(sql),
                         lambda prepared: analyses.install(sql, *prepared)))
        tracker = getattr(session, "tracker", None)
        heavy_plan = getattr(tracker.protector, "heavy_plan", None) if tracker else None
        job = heavy_plan(sql) if heavy_plan is not None else None
        if job is not None:
            jobs.append(job)
        if not jobs:
            return None
        session.heavy_done = sql
        return jobs


def _at_statement(reason: str, role: str, index: int) -> str:
    """A denial of one statement of a string, worded as the engine words one:
    `role "r": statement n: ...` (the role first, as in every denial)."""
    head = f'role "{role}": '
    if reason.startswith(head):
        return f"{head}statement {index + 1}: {reason[len(head):]}"
    return f"{reason} (statement {index + 1})"
