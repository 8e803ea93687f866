"""The policy as immutable, pre-indexed values, built from the already-parsed YAML dict.

Inheritance, wildcards and default column views are resolved once here, so a decision is
a few dict lookups.  Every problem is reported (not just the first) with the path of the
offending key, so settings can turn it into ``file:line: message``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

from proxy.sql.info import TABLE_KINDS
from proxy.sql.names import IdentifierError, parse_qualified

COLUMN_VIEWS: Final = ("plaintext", "masked", "ciphertext", "deny")
"""Least to most restrictive; among parents the most restrictive view wins."""

ALLOW_KINDS: Final = frozenset(
    {"ddl", "do", "call", "set_role", "listen", "notify", "admin", "prepare_transaction",
     "large_objects"}
)
POLICY_KEYS: Final = ("roles", "default", "default_column_view", "expand_views")
"""Top-level config keys that belong to the policy (settings and the gate pass these)."""
_TOP_KEYS: Final = frozenset(POLICY_KEYS)
_ROLE_KEYS: Final = frozenset({"inherits", "tables", "columns", "allow", "functions"})

TableKey = tuple[str, str]
ColumnKey = tuple[str, str, str]
ColumnRight = tuple[str, bool]
"""(view, lookup): how the role sees a column and whether it may compare it by equality."""
LOOKUP_VIEWS: Final = frozenset({"masked", "ciphertext"})
"""Views ``lookup`` applies to: plaintext allows every use, deny none."""


@dataclass(frozen=True, slots=True)
class PolicyIssue:
    """One validation problem: the key path (for file:line lookup) and what is wrong."""

    path: tuple[str, ...]
    message: str

    def __str__(self) -> str:
        where = ".".join(self.path) or "<policy>"
        return f"{where}: {self.message}"


class PolicyError(ValueError):
    """The policy is invalid; ``issues`` lists every problem found."""

    def __init__(self, issues: list[PolicyIssue]) -> None:
        self.issues = tuple(issues)
        super().__init__("invalid policy:\n" + "\n".join(f"  {i}" for i in issues))


@dataclass(frozen=True, slots=True)
class RolePolicy:
    """A role's effective grants after inheritance: what the engine consults."""

    name: str
    tables: Mapping[TableKey, frozenset[str]]
    schemas: Mapping[str, frozenset[str]]
    """``schema.*`` grants."""
    columns: Mapping[TableKey, Mapping[str, str]]
    """(schema, table) -> column -> view."""
    allow: frozenset[str]
    functions: frozenset[TableKey]
    lookups: Mapping[TableKey, frozenset[str]] = field(default_factory=dict)
    """(schema, table) -> masked/ciphertext columns the role may compare by equality."""

    def kinds_for(self, schema: str, name: str) -> frozenset[str]:
        """Granted kinds; exact entries and the schema wildcard add up."""
        exact = self.tables.get((schema, name), frozenset())
        wild = self.schemas.get(schema)
        return exact | wild if wild else exact


@dataclass(frozen=True, slots=True)
class Policy:
    """A validated policy. Swap the whole object to reload; caches key on its identity."""

    roles: Mapping[str, RolePolicy]
    default: str | None
    """Role whose grants unlisted roles get; None means deny."""
    explicit_relations: frozenset[TableKey] = field(default=frozenset())
    """Relations named exactly in any role: the operator asserts they exist there."""
    explicit_functions: frozenset[TableKey] = field(default=frozenset())
    expand_views: bool = False
    """A read of a view also needs the role's access to every relation the view reads
    (recursively); the proxy then loads view dependencies at session start."""

    def role(self, name: str) -> RolePolicy | None:
        found = self.roles.get(name)
        if found is None and self.default is not None:
            return self.roles.get(self.default)
        return found

    @classmethod
    def from_dict(cls, data: Any) -> Policy:
        """Validate and index the policy section; raises PolicyError listing every issue."""
        return _Builder(data).build()


class _Builder:
    def __init__(self, data: Any) -> None:
        self.data = data
        self.issues: list[PolicyIssue] = []

    def fail(self, path: tuple[str, ...], message: str) -> None:
        self.issues.append(PolicyIssue(path, message))

    def build(self) -> Policy:
        data = self.data
        if not isinstance(data, Mapping):
            raise PolicyError([PolicyIssue((), "policy must be a mapping")])
        for key in data:
            if key not in _TOP_KEYS:
                self.fail((str(key),), f"unknown key (expected one of {sorted(_TOP_KEYS)})")
        raw_roles = data.get("roles") or {}
        if not isinstance(raw_roles, Mapping):
            self.fail(("roles",), "must be a mapping of role name to role")
            raw_roles = {}
        defaults = self.columns(data.get("default_column_view") or {}, ("default_column_view",))
        parsed = {str(n): self.role(str(n), r) for n, r in raw_roles.items()}
        expand_views = data.get("expand_views", False)
        if not isinstance(expand_views, bool):
            self.fail(("expand_views",), f"must be true or false, not {expand_views!r}")
            expand_views = False
        default = data.get("default", "deny")
        if default is None or default == "deny":
            default_role = None
        elif isinstance(default, str) and default in parsed:
            default_role = default
        else:
            self.fail(("default",), f"must be 'deny' or a role under roles, not {default!r}")
            default_role = None
        for name, role in parsed.items():
            for parent in role["inherits"]:
                if parent not in parsed:
                    self.fail(("roles", name, "inherits"), f"unknown role {parent!r}")
        roles: dict[str, RolePolicy] = {}
        if not self.issues:
            for name in parsed:
                roles[name] = self.effective(name, parsed, defaults, ())
        if self.issues:
            raise PolicyError(self.issues)
        explicit = frozenset(k for r in parsed.values() for k in r["tables"]) | frozenset(
            k[:2] for r in parsed.values() for k in r["columns"]
        )
        functions = frozenset(f for r in parsed.values() for f in r["functions"])
        return Policy(MappingProxyType(roles), default_role, explicit, functions, expand_views)

    # -- one role, as written ----------------------------------------------------------

    def role(self, name: str, raw: Any) -> dict[str, Any]:
        path = ("roles", name)
        out: dict[str, Any] = {
            "inherits": [],
            "tables": {},
            "schemas": {},
            "columns": {},
            "allow": set(),
            "functions": set(),
        }
        if raw is None:
            return out
        if not isinstance(raw, Mapping):
            self.fail(path, "must be a mapping")
            return out
        for key in raw:
            if key not in _ROLE_KEYS:
                self.fail((*path, str(key)), f"unknown key (expected one of {sorted(_ROLE_KEYS)})")
        out["inherits"] = self.names(raw.get("inherits"), (*path, "inherits"))
        tables = raw.get("tables") or {}
        if not isinstance(tables, Mapping):
            self.fail((*path, "tables"), "must be a mapping of schema.table to kinds")
            tables = {}
        for key, kinds in tables.items():
            kpath = (*path, "tables", str(key))
            checked = self.kinds(kinds, kpath, TABLE_KINDS)
            parts = self.qualified(str(key), 2, kpath)
            if parts is None:
                continue
            if str(key).rstrip().endswith(".*") and parts[1] == "*":
                out["schemas"][parts[0]] = checked
            else:
                out["tables"][parts] = checked
        out["columns"] = self.columns(raw.get("columns") or {}, (*path, "columns"))
        out["allow"] = self.kinds(raw.get("allow") or [], (*path, "allow"), ALLOW_KINDS)
        for i, fn in enumerate(self.names(raw.get("functions"), (*path, "functions"))):
            parts = self.qualified(fn, 2, (*path, "functions", str(i)))
            if parts is not None:
                out["functions"].add(parts)
        return out

    def names(self, raw: Any, path: tuple[str, ...]) -> list[str]:
        if raw is None:
            return []
        if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
            self.fail(path, "must be a list of names")
            return []
        return raw

    def kinds(self, raw: Any, path: tuple[str, ...], allowed: frozenset[str]) -> frozenset[str]:
        if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
            self.fail(path, f"must be a list drawn from {sorted(allowed)}")
            return frozenset()
        bad = [x for x in raw if x not in allowed]
        if bad:
            self.fail(path, f"unknown kind(s) {bad} (expected {sorted(allowed)})")
        return frozenset(x for x in raw if x in allowed)

    def qualified(self, text: str, n: int, path: tuple[str, ...]) -> tuple[str, ...] | None:
        what = "schema.table" if n == 2 else "schema.table.column"
        try:
            parts = parse_qualified(text)
        except IdentifierError as exc:
            self.fail(path, str(exc))
            return None
        if len(parts) != n:
            self.fail(path, f"must be a qualified {what} (quote names containing dots)")
            return None
        return parts

    def columns(self, raw: Any, path: tuple[str, ...]) -> dict[ColumnKey, ColumnRight]:
        """``schema.table.column: VIEW`` or ``schema.table.column: {view: VIEW, lookup: B}``."""
        if not isinstance(raw, Mapping):
            self.fail(path, "must be a mapping of schema.table.column to a view")
            return {}
        out: dict[ColumnKey, ColumnRight] = {}
        for key, value in raw.items():
            kpath = (*path, str(key))
            parts = self.qualified(str(key), 3, kpath)
            right = self.column_right(value, kpath)
            if right is not None and parts is not None:
                out[parts] = right  # type: ignore[index]
        return out

    def column_right(self, value: Any, path: tuple[str, ...]) -> ColumnRight | None:
        lookup: Any = False
        if isinstance(value, Mapping):
            extra = sorted(str(k) for k in value if k not in ("view", "lookup"))
            if extra:
                self.fail(path, f"unknown key(s) {extra} (expected view, lookup)")
                return None
            view, lookup = value.get("view"), value.get("lookup", False)
        else:
            view = value
        if view not in COLUMN_VIEWS:
            self.fail(path, f"view must be one of {list(COLUMN_VIEWS)}, not {view!r}")
            return None
        if not isinstance(lookup, bool):
            self.fail(path, f"lookup must be true or false, not {lookup!r}")
            return None
        if lookup and view not in LOOKUP_VIEWS:
            self.fail(path, f"lookup applies to masked or ciphertext views, not {view}")
            return None
        return view, lookup

    # -- inheritance -------------------------------------------------------------------

    def effective(
        self,
        name: str,
        parsed: dict[str, dict[str, Any]],
        defaults: dict[ColumnKey, ColumnRight],
        seen: tuple[str, ...],
    ) -> RolePolicy:
        if name in seen:
            self.fail(
                ("roles", name, "inherits"), "inheritance cycle: " + " -> ".join((*seen, name))
            )
            raise PolicyError(self.issues)
        own = parsed[name]
        parents = [self.effective(p, parsed, defaults, (*seen, name)) for p in own["inherits"]]
        tables: dict[TableKey, frozenset[str]] = dict(own["tables"])
        schemas: dict[str, frozenset[str]] = dict(own["schemas"])
        allow, functions = set(own["allow"]), set(own["functions"])
        inherited: dict[ColumnKey, ColumnRight] = {}
        for parent in parents:
            for key, kinds in parent.tables.items():
                tables[key] = tables.get(key, frozenset()) | kinds
            for key, kinds in parent.schemas.items():
                schemas[key] = schemas.get(key, frozenset()) | kinds
            allow |= parent.allow
            functions |= parent.functions
            for table, cols in parent.columns.items():
                lookups = parent.lookups.get(table, frozenset())
                for col, view in cols.items():
                    k = (*table, col)
                    inherited[k] = _stricter(inherited.get(k), (view, col in lookups))
        merged = {**defaults, **inherited, **own["columns"]}
        columns: dict[TableKey, dict[str, str]] = {}
        lookup: dict[TableKey, set[str]] = {}
        for (schema, table, col), (view, may_look) in merged.items():
            columns.setdefault((schema, table), {})[col] = view
            if may_look:
                lookup.setdefault((schema, table), set()).add(col)
        return RolePolicy(
            name=name,
            tables=MappingProxyType(tables),
            schemas=MappingProxyType(schemas),
            columns=MappingProxyType({k: MappingProxyType(v) for k, v in columns.items()}),
            allow=frozenset(allow),
            functions=frozenset(functions),
            lookups=MappingProxyType({k: frozenset(v) for k, v in lookup.items()}),
        )


def _stricter(have: ColumnRight | None, other: ColumnRight) -> ColumnRight:
    """Of two parents' rights on a column: the more restrictive view wins; on the same
    view, lookup only if both grant it."""
    if have is None:
        return other
    rank_have, rank_other = COLUMN_VIEWS.index(have[0]), COLUMN_VIEWS.index(other[0])
    if rank_other != rank_have:
        return other if rank_other > rank_have else have
    return have[0], have[1] and other[1]
