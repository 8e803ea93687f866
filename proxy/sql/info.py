"""What the analyzer knows about a statement: plain frozen values, cheap to cache and share.

The policy engine, the session (search_path and role tracking, prepared statements) and the
audit log all read these; none of them ever sees a parse tree.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, Literal

from proxy.sql.names import FunctionName, RelationName

ALL: Final = "*"
"""Column marker: the whole row (``*``, ``t.*``, ``row_to_json(t)``...) or an unknown column."""

TABLE_KINDS: Final = frozenset(
    {"select", "insert", "update", "delete", "truncate", "copy_in", "copy_out", "references"}
)
"""Kinds a policy grants per relation."""

ACCESS_ALTERNATIVES: Final[Mapping[str, frozenset[str]]] = MappingProxyType(
    {
        **{k: frozenset({k}) for k in TABLE_KINDS},
        # LOCK TABLE, as PostgreSQL's LockTableAclCheck: any one of the kinds suffices.
        "lock_row_exclusive": frozenset({"insert", "update", "delete", "truncate"}),
        "lock_strong": frozenset({"update", "delete", "truncate"}),
    }
)
"""Access kinds the analyzer emits -> the granted kinds any one of which satisfies it."""

TRANSACTION_KINDS: Final = frozenset(
    {"begin", "commit", "rollback", "savepoint", "release", "rollback_to"}
)
TWO_PHASE_KINDS: Final = frozenset({"prepare_transaction", "commit_prepared", "rollback_prepared"})
WRAPPER_KINDS: Final = frozenset({"explain", "prepare", "declare"})
"""Kinds whose meaning is their ``inner`` statement."""

StatementKind = Literal[
    "select",
    "insert",
    "update",
    "delete",
    "merge",
    "truncate",
    "copy_in",
    "copy_out",
    "copy_program",
    "copy_file",
    "ddl",
    "admin",
    "set_role",
    "set",
    "begin",
    "commit",
    "rollback",
    "savepoint",
    "release",
    "rollback_to",
    "prepare_transaction",
    "commit_prepared",
    "rollback_prepared",
    "listen",
    "notify",
    "unlisten",
    "do",
    "call",
    "lock",
    "explain",
    "prepare",
    "execute",
    "deallocate",
    "declare",
    "fetch",
    "move",
    "close",
    "discard",
    "show",
    "empty",
    "unknown",
]

_EMPTY: Final[Mapping[RelationName, frozenset[str]]] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class SetInfo:
    """A SET/RESET statement, so the session can track search_path and role.

    ``param`` is lower-cased (GUC names are case-insensitive): ``all`` for RESET ALL,
    ``transaction`` / ``session characteristics`` for SET TRANSACTION and friends.
    ``action`` is ``value``, ``default`` (RESET, TO DEFAULT) or ``current`` (FROM CURRENT,
    i.e. no change).  For ``search_path`` each value is one schema name, exact.
    """

    param: str
    action: Literal["value", "default", "current"]
    values: tuple[str, ...]
    is_local: bool


@dataclass(frozen=True, slots=True)
class ConfigCall:
    """A ``set_config(name, value, is_local)`` call anywhere in a statement.

    ``param`` is None when the name is not a constant (the policy denies it). ``values``
    is the parsed schema list for search_path, the text for other parameters, None when
    not a constant; ``is_local`` None when not a constant.

    ``exact`` is True only for the one form whose execution the proxy can know from the
    protocol alone: the call is the whole statement (``SELECT set_config(c, c, c)``, no
    FROM, WHERE, LIMIT, set operation, CTE or second output column), so it runs exactly
    once when the statement runs, and not at all when it does not.
    """

    param: str | None
    values: tuple[str, ...] | None
    is_local: bool | None
    exact: bool = False


@dataclass(frozen=True, slots=True)
class StatementInfo:
    """One statement: its kind and everything it touches.

    ``accesses`` holds (relation as written, access kind); kinds are keys of
    ACCESS_ALTERNATIVES.  ``columns_read`` maps a relation to the columns read (ALL for a
    whole-row read or a column that cannot be named without the catalog), in any way.
    Of those, ``columns_compared`` are also compared by equality (=, <>, IN, IS [NOT]
    DISTINCT FROM, IS NULL, NULLIF, JOIN USING / NATURAL) and ``columns_used`` also used
    any other way (an expression, predicate, join condition, grouping, ordering, window,
    aggregate, the output of a subquery that is itself used...); a column in neither is
    only shown, bare, as a result column of the statement (select list, RETURNING).
    """

    kind: StatementKind
    accesses: frozenset[tuple[RelationName, str]] = frozenset()
    columns_read: Mapping[RelationName, frozenset[str]] = field(default_factory=lambda: _EMPTY)
    columns_written: Mapping[RelationName, frozenset[str]] = field(default_factory=lambda: _EMPTY)
    columns_compared: Mapping[RelationName, frozenset[str]] = field(
        default_factory=lambda: _EMPTY
    )
    columns_used: Mapping[RelationName, frozenset[str]] = field(default_factory=lambda: _EMPTY)
    by_position: bool = False
    """A result column is named by number (``ORDER BY 2``): which column is used depends
    on an integer constant, so the analysis must not be shared by a template."""
    functions: frozenset[FunctionName] = frozenset()
    config_calls: tuple[ConfigCall, ...] = ()
    setting: SetInfo | None = None
    name: str | None = None
    """Prepared statement, cursor, savepoint, 2PC gid, channel or parameter name."""
    lock_mode: str | None = None
    explain_analyze: bool = False
    cascade: bool = False
    inner: StatementInfo | None = None
    """The statement an EXPLAIN / PREPARE / DECLARE wraps."""
    param_count: int = 0
    detail: str = ""
    """Parse node type (for ddl/admin/unknown messages); never statement text."""

    @property
    def relations(self) -> frozenset[RelationName]:
        """Every relation this statement (not its ``inner``) names with an access."""
        return frozenset(rel for rel, _ in self.accesses)


@dataclass(frozen=True, slots=True)
class Analysis:
    """A whole query string: one StatementInfo per statement (one ``empty`` if none)."""

    statements: tuple[StatementInfo, ...]

    @property
    def param_count(self) -> int:
        """Highest ``$n`` used anywhere, a hint for Bind validation."""
        return max((s.param_count for s in self.statements), default=0)

    @property
    def has_execute(self) -> bool:
        """True when a decision depends on the session's prepared statements."""
        return any(_has_execute(s) for s in self.statements)


def _has_execute(info: StatementInfo) -> bool:
    while info is not None:
        if info.kind == "execute":
            return True
        info = info.inner  # type: ignore[assignment]
    return False
