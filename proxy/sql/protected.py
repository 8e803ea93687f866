"""Which columns are encrypted, as the SQL rewriter needs to see them.

The rewriter (``proxy.sql.rewrite``) works on names as PostgreSQL resolves them: folded,
schema-qualified, looked up through the session's ``search_path``.  This module is the
bridge from the ``protect:`` configuration to those names; it holds no keys and does no
I/O, so it can be built once per settings reload and shared by every session.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from proxy.sql.names import quote_ident

MODES = frozenset({"randomized", "deterministic"})

LOGICAL_TYPES = frozenset(
    {"text", "varchar", "numeric", "int4", "int8", "date", "timestamptz", "bool", "uuid", "jsonb"}
)
"""The logical types a protected column may have (ARCHITECTURE.md §4)."""

TYPE_ALIASES: Mapping[str, str] = {
    "integer": "int4",
    "int": "int4",
    "bigint": "int8",
    "smallint": "int2",
    "boolean": "bool",
    "decimal": "numeric",
    "character varying": "varchar",
    "timestamp with time zone": "timestamptz",
    "double precision": "float8",
    "real": "float4",
}
"""SQL spellings of type names mapped to the catalog names the parser produces."""


def normalize_type(name: str) -> str:
    """Catalog name of a type as written in the config or SQL (``integer`` -> ``int4``)."""
    low = " ".join(name.lower().split())
    if low.startswith("pg_catalog."):
        low = low[len("pg_catalog.") :]
    return TYPE_ALIASES.get(low, low)


TableKey = tuple[str, str]
"""A resolved relation: (schema, table)."""

TableExists = Callable[[str, str], bool]
"""``table_exists(schema, name)``: does the live catalog have that relation?"""


@dataclass(frozen=True, slots=True)
class ProtectedColumn:
    """One encrypted column: where it lives, what the app thinks it is, how it is sealed.

    ``bidx_column`` defaults to ``<column>_bidx`` when ``blind_index`` is set, because that
    is the documented default layout and every caller would otherwise repeat it.
    """

    schema: str
    table: str
    column: str
    logical_type: str
    mode: str
    blind_index: bool = False
    bidx_column: str | None = None
    index_length: int = 16  # bytes of HMAC kept in the blind index (`protect: index_length`)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"{self.qualified}: mode must be one of {sorted(MODES)}")
        ltype = normalize_type(self.logical_type)
        if ltype not in LOGICAL_TYPES:
            raise ValueError(f"{self.qualified}: unsupported logical type {self.logical_type!r}")
        object.__setattr__(self, "logical_type", ltype)
        if self.blind_index and self.bidx_column is None:
            object.__setattr__(self, "bidx_column", f"{self.column}_bidx")
        if not self.blind_index and self.bidx_column is not None:
            raise ValueError(f"{self.qualified}: bidx_column given without blind_index")

    @property
    def qualified(self) -> str:
        """``schema.table.column``, quoted where needed, as messages show it."""
        return ".".join(quote_ident(p) for p in (self.schema, self.table, self.column))

    @property
    def table_key(self) -> TableKey:
        """The (schema, table) this column belongs to."""
        return (self.schema, self.table)


@dataclass(frozen=True, slots=True)
class FunctionResult:
    """The result columns of a user function (all overloads of one schema-qualified
    name) as far as the proxy's storage columns go: ``columns`` in order (None when the
    overloads disagree), ``storage`` the ones that are storage columns (a blind-index
    sibling in the protected row type it returns, or an OUT / TABLE column named like
    one), each with the protected column it serves."""

    columns: tuple[str, ...] | None
    storage: Mapping[str, ProtectedColumn]


class ProtectedSchema(Mapping[TableKey, Mapping[str, ProtectedColumn]]):
    """All protected columns, by (schema, table) then column name; immutable.

    Also keeps the set of protected table *names* so the rewriter can decide in a few
    substring checks that a statement cannot touch any protected table.
    """

    __slots__ = ("_functions", "_lower_names", "_names", "_needles", "_tables")

    def __init__(self, columns: Iterable[ProtectedColumn] = ()) -> None:
        tables: dict[TableKey, dict[str, ProtectedColumn]] = {}
        for col in columns:
            per_table = tables.setdefault(col.table_key, {})
            if col.column in per_table:
                raise ValueError(f"{col.qualified} is configured twice")
            per_table[col.column] = col
        self._tables: dict[TableKey, Mapping[str, ProtectedColumn]] = {
            k: dict(v) for k, v in tables.items()
        }
        self._functions: dict[TableKey, FunctionResult] = {}
        self._names: frozenset[str] = frozenset(t for _, t in tables)
        self._lower_names: tuple[str, ...] = tuple(sorted({n.lower() for n in self._names}))
        self._needles: tuple[str, ...] = tuple(
            sorted(
                {
                    f'"relname":{json.dumps(n, ensure_ascii=a)}'
                    for n in self._names
                    for a in (True, False)
                }
            )
        )

    def __getitem__(self, key: TableKey) -> Mapping[str, ProtectedColumn]:
        return self._tables[key]

    def __iter__(self) -> Iterator[TableKey]:
        return iter(self._tables)

    def __len__(self) -> int:
        return len(self._tables)

    def __repr__(self) -> str:
        return f"ProtectedSchema({sorted(self._tables)!r})"

    @property
    def table_names(self) -> frozenset[str]:
        """Exact (folded) names of protected tables, without schema."""
        return self._names

    @property
    def lower_names(self) -> tuple[str, ...]:
        """Lower-cased table names, for the cheap "can this text mention one?" prefilter."""
        return self._lower_names

    @property
    def relname_needles(self) -> tuple[str, ...]:
        """How each protected name appears as a RangeVar in pglast's JSON parse tree
        (both escapings of non-ASCII), so a tree can be screened without decoding it."""
        return self._needles

    def storage(self, key: TableKey) -> Mapping[str, ProtectedColumn]:
        """The proxy's storage columns of a relation (blind-index siblings), by name, each
        with the protected column it serves. No role may read or write them: a sibling
        holds an HMAC of its column, equal for equal values, so reading it links rows
        (and tables) with the same value whatever the role's view of the column."""
        return {pc.bidx_column: pc for pc in self._tables.get(key, {}).values()
                if pc.blind_index and pc.bidx_column is not None and pc.table_key == key}

    def function(self, key: TableKey) -> FunctionResult | None:
        """What the user function(s) ``key`` return, when that may hold a storage column
        (see :class:`FunctionResult`); None for any other function."""
        return self._functions.get(key)

    def function_lookup(self, name: list[str], search_path: tuple[str, ...]
                        ) -> tuple[TableKey, FunctionResult] | None:
        """Resolve a function name as written (``[schema,] name``) to one whose result
        may hold a storage column. Unqualified: the first schema of the path that has
        one of that name (``pg_catalog`` holds none); an earlier schema's function of
        the same name that returns no storage is not known here, so this may answer
        for a name PostgreSQL resolves elsewhere: the caller only refuses or hides
        more, never less."""
        if len(name) >= 2:
            key = (name[-2], name[-1])
            hit = self._functions.get(key)
            return (key, hit) if hit is not None else None
        for sch in search_path:
            hit = self._functions.get((sch, name[-1]))
            if hit is not None:
                return (sch, name[-1]), hit
        return None

    def with_functions(self, functions: Mapping[TableKey, FunctionResult]) -> ProtectedSchema:
        """A copy that also knows ``functions``; their names join the prefilter, so a
        statement calling one is planned even when it names no protected table."""
        if not functions:
            return self
        out = copy.copy(self)
        out._functions = {**self._functions, **functions}
        names = set(self._names) | {n for _, n in functions}
        out._names = frozenset(names)
        out._lower_names = tuple(sorted({n.lower() for n in names}))
        out._needles = tuple(sorted(set(self._needles) | {
            f'"sval":{json.dumps(n, ensure_ascii=a)}' for _, n in functions
            for a in (True, False)}))
        return out

    def lookup(
        self,
        relation: tuple[str | None, str],
        search_path: tuple[str, ...],
        table_exists: TableExists | None = None,
    ) -> TableKey | None:
        """Resolve a relation as written to a protected (schema, table), or None.

        A qualified name is protected iff configured.  An unqualified one goes through
        ``search_path`` like PostgreSQL does: the first schema holding a relation of that
        name wins.  Without ``table_exists`` only protected tables are known, so the first
        schema with a protected table of that name wins; with it, an unprotected table
        earlier in the path (or a temporary table, which PostgreSQL searches first)
        shadows the protected one.
        """
        schema, name = relation
        if schema is not None:
            return (schema, name) if (schema, name) in self._tables else None
        if name not in self._names:
            return None
        if table_exists is not None and table_exists("pg_temp", name):
            return None
        for sch in search_path:
            if (sch, name) in self._tables:
                return (sch, name)
            if table_exists is not None and table_exists(sch, name):
                return None
        return None
