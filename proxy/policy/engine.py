"""``decide()``: apply a Policy to an analysed statement, per POLICY-SEMANTICS.md.

Pure and deterministic: the same (policy, role, analysis, search_path, database,
environment) always yields the same Decision, which is what makes PolicyCache sound.

Name resolution without a catalog (documented choice, fail closed): an unqualified
relation ``n`` is checked in *every* schema of the effective search_path that could hold
it, in order, stopping after the first schema where the policy names ``n`` exactly (the
operator asserts it exists there; PostgreSQL picks the first match).  ``$user`` expands
to the role; ``pg_catalog`` is searched first unless listed, and holds ``n`` only if ``n``
is a known catalog relation; schemas known not to exist (Environment.existing_schemas,
loaded by the proxy from pg_namespace) are skipped; ``pg_temp`` is skipped (a temporary
table shadowing a name is the session's own data and needed ``ddl`` to create).
Unqualified functions resolve the same way, with ``pg_catalog`` holding the name when it
is a known built-in.

Views (opt-in, ``expand_views: true``): a view is always checked as the view; with
expansion, an access to a view is also that same access to every relation the view's
query reads, recursively through views over views (SELECT v needs select on its bases,
UPDATE v update, LOCK v the lock, as PostgreSQL locks them too; a write through a view
over several relations needs the write on each, fail closed, since the dependencies do
not say which one is the target). A select, update, delete or copy_out of a view also
reads every base column its definition references, anywhere in it (and every column of
a base when the definition has a whole-row reference): a ``deny`` column there denies the
statement, whichever view columns the statement names (fail closed: the dependencies say
which base columns a view uses, not which output column uses which). Views in
``pg_catalog`` / ``information_schema`` are not expanded.

Oracles: a ``masked`` or ``ciphertext`` column may only be shown, as a bare result column
(select list, RETURNING, ``*``). Any other read (a predicate, join, ``IN``, comparison,
``CASE``, grouping, ordering, ``DISTINCT``, window, aggregate or function argument, a
non-ALL set operation, ``ON CONFLICT``, ``MERGE`` condition, the output of a subquery
that is itself used) lets the role ask the server questions about the value and learn it
(bisection over an ``IN`` list of candidates), so it is denied; the analysis records per
column whether it is shown, compared by equality or otherwise used. ``lookup`` on the
column allows equality comparisons only. With ``expand_views``, any comparison or use of
a view's columns counts as one of every masked/ciphertext base column it references (the
dependencies do not say which view column comes from which base column).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from proxy.policy.functions import is_admin_function, is_large_object_function
from proxy.policy.model import Policy, RolePolicy
from proxy.policy.pg_builtins import (
    INFORMATION_SCHEMA_RELATIONS,
    PG_CATALOG_FUNCTIONS,
    PG_CATALOG_RELATIONS,
)
from proxy.sql.info import (
    ACCESS_ALTERNATIVES,
    ALL,
    TRANSACTION_KINDS,
    Analysis,
    StatementInfo,
)
from proxy.sql.names import FunctionName, RelationName, quote_ident

CATALOG_SCHEMAS = frozenset({"pg_catalog", "information_schema"})
ORACLE_VIEWS = frozenset({"masked", "ciphertext"})
"""Views that show a column but must not answer questions about its value."""
SECRET_CATALOG_RELATIONS = frozenset(
    {
        # spec
        "pg_authid",
        "pg_shadow",
        "pg_user_mapping",
        "pg_statistic",
        "pg_stats",
        "pg_stats_ext",
        "pg_stats_ext_exprs",
        "pg_statistic_ext_data",
        "pg_largeobject",
        # fail-closed extras: may show user-mapping options (passwords)
        "pg_user_mappings",
        "_pg_user_mappings",
        "user_mapping_options",
    }
)

_NEEDS_ALLOW = {
    "ddl": "ddl",
    "admin": "admin",
    "do": "do",
    "call": "call",
    "set_role": "set_role",
    "listen": "listen",
    "notify": "notify",
    "prepare_transaction": "prepare_transaction",
    "commit_prepared": "prepare_transaction",
    "rollback_prepared": "prepare_transaction",
    "copy_program": "admin",
    "copy_file": "admin",
}
_TXN_END = frozenset(
    {"commit", "rollback", "rollback_to", "prepare_transaction", "release", "begin"}
)
_VIEW_READS = frozenset({"select", "update", "delete", "copy_out"})
"""Accesses to a view that run its query over stored rows (its WHERE filters them)."""
_PLAIN_KINDS = (
    frozenset(
        {
            "select",
            "insert",
            "update",
            "delete",
            "merge",
            "truncate",
            "copy_in",
            "copy_out",
            "lock",
            "show",
            "set",
            "discard",
            "deallocate",
            "close",
            "fetch",
            "move",
            "unlisten",
            "empty",
        }
    )
    | TRANSACTION_KINDS
)


@dataclass(frozen=True, slots=True)
class Environment:
    """Catalog facts the proxy may load at startup (defaults: stock PostgreSQL 15)."""

    builtin_functions: frozenset[str] = PG_CATALOG_FUNCTIONS
    catalog_relations: frozenset[str] = PG_CATALOG_RELATIONS
    existing_schemas: frozenset[str] | None = None
    """Schemas that exist (pg_namespace); None: any schema may exist (strictest)."""
    reset_search_path: tuple[str, ...] = ("$user", "public")
    """What RESET / SET ... TO DEFAULT / RESET ALL / DISCARD ALL restore."""
    view_bases: Mapping[tuple[str, str], frozenset[tuple[str, str]]] | None = field(
        default=None, hash=False
    )
    """Views (and materialized views) of the database -> the relations their query reads
    (pg_depend of the ``_RETURN`` rule), loaded only when the policy has ``expand_views``.
    None: not loaded, so with ``expand_views`` no non-catalog relation can be checked."""
    view_columns: Mapping[tuple[str, str], Mapping[tuple[str, str], frozenset[str]]] = field(
        default_factory=dict, hash=False
    )
    """View -> base relation -> the base columns its query references anywhere (select
    list, WHERE, JOIN...); ALL when it has a whole-row reference."""


DEFAULT_ENVIRONMENT = Environment()


@dataclass(frozen=True, slots=True)
class ColumnView:
    """How a protected column this statement reads must be returned to this role."""

    schema: str
    table: str
    column: str
    view: str


@dataclass(frozen=True, slots=True)
class Decision:
    """The verdict; ``reason`` names role, kind and object, never a value."""

    allowed: bool
    reason: str
    statement_index: int | None = None
    column_views: tuple[ColumnView, ...] = ()


class Denied(Exception):
    """Internal: carries the first reason a statement is denied."""


def decide(
    policy: Policy,
    role: str,
    statement: Analysis | StatementInfo,
    search_path: tuple[str, ...],
    current_database: str,
    *,
    env: Environment = DEFAULT_ENVIRONMENT,
    prepared: Mapping[str, StatementInfo] | None = None,
) -> Decision:
    """Allow or deny a whole query string (denied as a whole if any statement is).

    ``prepared`` maps prepared-statement names to the StatementInfo the session recorded
    at PREPARE (the ``inner``); EXECUTE of a name not in it is denied.
    """
    rp = policy.role(role)
    if rp is None:
        return Decision(False, f'role "{role}" is not in the policy (default: deny)')
    stmts = statement.statements if isinstance(statement, Analysis) else (statement,)
    checker = _Checker(policy, rp, role, current_database, env, prepared or {})
    # A SET changes search_path for later statements of the same string; a transaction
    # end (ROLLBACK, ROLLBACK TO, COMMIT of a SET LOCAL...) may undo it, after which any
    # path seen so far may be in effect: check against each of them (fail closed).
    paths = [search_path]
    seen = [search_path]
    for index, info in enumerate(stmts):
        for path in paths:
            try:
                checker.statement(info, path)
            except Denied as denied:
                # Every reason opens with the role, then which statement of a string.
                where = f"statement {index + 1}: " if len(stmts) > 1 else ""
                return Decision(False, f'role "{role}": {where}{denied}', index)
        if info.kind in _TXN_END:
            paths = list(seen)
        else:
            paths = list(
                dict.fromkeys(search_path_after(info, p, env.reset_search_path) for p in paths)
            )
            seen = list(dict.fromkeys(seen + paths))
    return Decision(True, "allowed", None, tuple(dict.fromkeys(checker.views)))


TRACKED_PARAMS = frozenset({"search_path", "role", "session_authorization"})
"""Settings the policy follows; set_config of them must be exact (ConfigCall.exact)."""


def search_path_after(
    info: StatementInfo, path: tuple[str, ...], reset_to: tuple[str, ...]
) -> tuple[str, ...]:
    """The search_path after ``info`` runs (ignoring transaction ends; the session does those).

    Returns ``path`` unchanged for statements that do not touch it.
    """
    setting = info.setting
    if setting is not None and setting.param in ("search_path", "all"):
        if setting.action == "value" and setting.param == "search_path":
            return setting.values
        if setting.action == "default":
            return reset_to
    if info.kind == "discard" and info.name == "all":
        return reset_to  # DISCARD ALL includes RESET ALL
    for call in info.config_calls:
        if call.param == "search_path" and call.values is not None:
            path = call.values
    if info.kind == "explain" and info.explain_analyze and info.inner is not None:
        return search_path_after(info.inner, path, reset_to)
    return path


class _Checker:
    def __init__(
        self,
        policy: Policy,
        rp: RolePolicy,
        role: str,
        database: str,
        env: Environment,
        prepared: Mapping[str, StatementInfo],
    ) -> None:
        self.policy, self.rp, self.role, self.database = policy, rp, role, database
        self.env, self.prepared = env, prepared
        self.views: list[ColumnView] = []

    def deny(self, message: str) -> Denied:
        """A denial; `decide` words it as `role "r": [statement n: ]message`."""
        return Denied(message)

    # -- statements --------------------------------------------------------------------

    def statement(self, info: StatementInfo, path: tuple[str, ...]) -> None:
        kind = info.kind
        if kind == "unknown":
            raise self.deny(
                f"the statement could not be classified ({info.detail or 'unknown'})")
        if kind in ("explain", "prepare", "declare"):
            if info.inner is None:
                raise self.deny(f"{kind.upper()} without a statement to check")
            tracked = sorted({c.param for c in info.inner.config_calls
                              if c.param in TRACKED_PARAMS})
            if tracked and not (kind == "explain" and info.explain_analyze):
                # A PREPAREd statement or a cursor runs the call later (EXECUTE, FETCH),
                # possibly never or many times; a plain EXPLAIN never runs it.
                raise self.deny(f"set_config('{tracked[0]}') inside {kind.upper()} "
                                "is not allowed")
            self.statement(info.inner, path)
            return
        if kind == "execute":
            self.touches(info, path)
            inner = self.prepared.get(info.name or "")
            if inner is None:
                raise self.deny(
                    f"EXECUTE of prepared statement {quote_ident(info.name or '')}, which "
                    "this session has not prepared through the proxy")
            self.statement(inner, path)
            return
        need = _NEEDS_ALLOW.get(kind)
        if need is not None:
            if need not in self.rp.allow:
                raise self.deny(f"{kind} statements are not allowed (needs allow: {need})")
        elif kind not in _PLAIN_KINDS:
            raise self.deny(f"statement kind {kind} is not allowed")
        if info.cascade:
            raise self.deny(
                "TRUNCATE ... CASCADE reaches tables the proxy cannot see; name them instead"
            )
        self.touches(info, path)

    def touches(self, info: StatementInfo, path: tuple[str, ...]) -> None:
        """Relations, columns, functions and set_config calls of one statement."""
        for rel, access in sorted(info.accesses, key=lambda a: (str(a[0]), a[1])):
            how = _how(rel, info)
            for schema, name in self.resolve(rel, path):
                self.access(schema, name, access)
            if self.policy.expand_views and schema not in CATALOG_SCHEMAS:
                self.expand(schema, name, access, (), how)
        for rel, cols in info.columns_read.items():
            compared = info.columns_compared.get(rel, frozenset())
            used = info.columns_used.get(rel, frozenset())
            for schema, name in self.resolve(rel, path):
                self.columns(schema, name, cols, compared=compared, used=used)
        # (schema is None for an unqualified name: sorted by text, never None < str)
        for fn in sorted(info.functions, key=lambda f: (f.schema or "", f.name, f.catalog or "")):
            self.function(fn, path)
        for call in info.config_calls:
            if call.param is None:
                raise self.deny("set_config with a parameter name that is not a constant")
            if call.param in TRACKED_PARAMS and not call.exact:
                # Observe or force: the proxy follows these settings statement by
                # statement, so it must know whether the call ran. Only a statement that
                # is the call alone runs it exactly when the statement runs (not under
                # WHERE false, a CASE, a LIMIT, a cursor or a PREPARE run later).
                raise self.deny(
                    f"set_config('{call.param}') is only allowed as a statement of its own "
                    f"(SELECT set_config('{call.param}', '...', false))"
                )
            if call.param in ("role", "session_authorization"):
                if "set_role" not in self.rp.allow:
                    raise self.deny(f"set_config('{call.param}') is a set_role, which is not "
                                    "allowed (needs allow: set_role)")
            elif call.param == "search_path" and (call.values is None or call.is_local is None):
                raise self.deny("set_config('search_path') with a value the proxy cannot track")

    # -- relations ---------------------------------------------------------------------

    def effective_path(self, path: Iterable[str]) -> list[str]:
        out: list[str] = []
        for schema in path:
            schema = self.role if schema == "$user" else schema
            if schema == "pg_temp" or schema.startswith("pg_temp_"):
                continue
            if schema not in out:
                out.append(schema)
        if "pg_catalog" not in out:
            out.insert(0, "pg_catalog")
        existing = self.env.existing_schemas
        if existing is not None:
            out = [s for s in out if s in existing or s in CATALOG_SCHEMAS]
        return out

    def resolve(self, rel: RelationName, path: tuple[str, ...]) -> list[tuple[str, str]]:
        """Every (schema, name) the relation may be; see the module docstring."""
        if rel.catalog is not None and rel.catalog != self.database:
            raise self.deny(f"cross-database reference {rel}")
        if rel.schema is not None:
            return [(rel.schema, rel.name)]
        out: list[tuple[str, str]] = []
        for schema in self.effective_path(path):
            if schema == "pg_catalog":
                if rel.name in self.env.catalog_relations:
                    out.append((schema, rel.name))
                    break
                continue
            if schema == "information_schema" and rel.name in INFORMATION_SCHEMA_RELATIONS:
                out.append((schema, rel.name))
                break
            out.append((schema, rel.name))
            if (schema, rel.name) in self.policy.explicit_relations:
                break
        if not out:
            raise self.deny(f"relation {rel} does not resolve in search_path")
        return out

    def expand(
        self, schema: str, name: str, access: str, chain: tuple[str, ...], how: str | None
    ) -> None:
        """``access`` to (schema, name), if it is a view, is that access to its bases.
        ``how``: the statement compares ("equality") or uses ("use") the view's columns."""
        bases = self.env.view_bases
        if bases is None:
            raise self.deny(
                f"{access} on {_obj(schema, name)}: view dependencies were not loaded for "
                "this session (expand_views was turned on after it started); reconnect"
            )
        direct = bases.get((schema, name))
        if not direct:
            return
        via = (*chain, _obj(schema, name))
        if len(via) > 64:  # PostgreSQL rejects cyclic views; this only bounds a bad map
            raise self.deny(f"views are nested too deeply under {via[0]}")
        reads = access in _VIEW_READS
        columns = self.env.view_columns.get((schema, name), {})
        for bschema, bname in sorted(direct):
            if (bschema, bname) == (schema, name) or _obj(bschema, bname) in via:
                continue
            note = f" (read by view {' -> '.join(via)})"
            self.access(bschema, bname, access, note)
            if reads:
                cols = columns.get((bschema, bname))
                if cols:
                    self.columns(
                        bschema, bname, cols, note, record=False,
                        compared=cols if how == "equality" else frozenset(),
                        used=cols if how == "use" else frozenset(),
                    )
            if bschema not in CATALOG_SCHEMAS:
                self.expand(bschema, bname, access, via, how)

    def access(self, schema: str, name: str, access: str, note: str = "") -> None:
        needed = ACCESS_ALTERNATIVES.get(access)
        if needed is None:
            raise self.deny(f"unknown access {access} on {_obj(schema, name)}{note}")
        if self.rp.kinds_for(schema, name) & needed:
            return
        if schema in CATALOG_SCHEMAS and "select" in needed:
            if name not in SECRET_CATALOG_RELATIONS:
                return
            raise self.deny(
                f"{access} on {_obj(schema, name)} is not allowed (holds secrets){note}"
            )
        what = access if len(needed) == 1 else f"{access} (needs one of {sorted(needed)})"
        raise self.deny(f"{what} on {_obj(schema, name)} is not allowed{note}")

    def columns(
        self,
        schema: str,
        name: str,
        cols: frozenset[str],
        note: str = "",
        record: bool = True,
        *,
        compared: frozenset[str] = frozenset(),
        used: frozenset[str] = frozenset(),
    ) -> None:
        """``cols`` read; of them ``compared`` by equality, ``used`` otherwise (ALL: any)."""
        protected = self.rp.columns.get((schema, name))
        if not protected:
            return
        whole = ALL in cols
        lookups = self.rp.lookups.get((schema, name), frozenset())
        for col, view in protected.items():
            if not whole and col not in cols:
                continue
            if view == "deny":
                column = f"{_obj(schema, name)}.{quote_ident(col)}"
                if whole and col not in cols:
                    raise self.deny(
                        f"the statement reads every column of {_obj(schema, name)} (a "
                        f"whole-row reference or *), including denied column {column}{note}"
                    )
                raise self.deny(f"the statement reads denied column {column}{note}")
            if view in ORACLE_VIEWS:
                column = f"{_obj(schema, name)}.{quote_ident(col)}"
                if col in used or ALL in used:
                    only = "lookup allows equality only" if col in lookups else "no lookup"
                    raise self.deny(
                        f"{view} column {column} used in an expression, predicate, join, "
                        f"grouping, ordering or subquery; a {view} view may only be selected "
                        f"as a bare result column ({only}){note}"
                    )
                if (col in compared or ALL in compared) and col not in lookups:
                    raise self.deny(
                        f"{view} column {column} compared by equality without lookup on it "
                        f"(a {view} view may only be selected as a bare result column){note}"
                    )
            if record:
                self.views.append(ColumnView(schema, name, col, view))

    # -- functions ---------------------------------------------------------------------

    def function(self, fn: FunctionName, path: tuple[str, ...]) -> None:
        if fn.catalog is not None and fn.catalog != self.database:
            raise self.deny(f"cross-database function reference {fn}")
        if fn.schema is not None:
            if (fn.schema, fn.name) in self.rp.functions:
                return
            if fn.schema == "pg_catalog":
                self.builtin(fn.name)
                return
            raise self.deny(f"function {fn} is not allowed")
        checked = False
        for schema in self.effective_path(path):
            if schema == "pg_catalog":
                if fn.name in self.env.builtin_functions:
                    if ("pg_catalog", fn.name) not in self.rp.functions:
                        self.builtin(fn.name)
                    return
                continue
            if (schema, fn.name) not in self.rp.functions:
                raise self.deny(
                    f"function {quote_ident(fn.name)} (may resolve to "
                    f"{_obj(schema, fn.name)}) is not allowed"
                )
            checked = True
            if (schema, fn.name) in self.policy.explicit_functions:
                return
        if not checked:
            raise self.deny(f"function {fn} does not resolve in search_path")

    def builtin(self, name: str) -> None:
        if is_large_object_function(name):
            if "large_objects" not in self.rp.allow and "admin" not in self.rp.allow:
                raise self.deny(f"large-object function pg_catalog.{name} is not allowed "
                                "(needs allow: large_objects)")
            return
        if is_admin_function(name) and "admin" not in self.rp.allow:
            raise self.deny(f"admin function pg_catalog.{name} is not allowed (needs allow: admin)")
        if name == "pg_notify" and "notify" not in self.rp.allow:
            raise self.deny("pg_notify sends a NOTIFY, which is not allowed (needs allow: notify)")


def _how(rel: RelationName, info: StatementInfo) -> str | None:
    """Whether the statement uses (``use``) or compares (``equality``) a relation's columns."""
    if info.columns_used.get(rel):
        return "use"
    if info.columns_compared.get(rel):
        return "equality"
    return None


def _obj(schema: str, name: str) -> str:
    return f"{quote_ident(schema)}.{quote_ident(name)}"
