"""Walk one statement's JSON parse tree and collect relations, columns and functions.

Works on the plain dicts of ``pglast.parser.parse_sql_json`` (about 20x cheaper than AST
objects).  Scoping follows PostgreSQL's parse analysis closely enough to attribute columns
and to apply CTE shadowing; where the catalog would be needed to be exact, it attributes
conservatively (more relations, or ALL columns) so the policy fails closed.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Final

from proxy.sql.info import ALL, ConfigCall
from proxy.sql.names import FunctionName, IdentifierError, RelationName, parse_search_path

Node = dict[str, Any]

OUTPUT, EQUALITY, USE = "output", "equality", "use"
"""How a column reference reads its column (see Collector.read): shown bare as a result
column of the statement, compared by equality (=, <>, IN, IS [NOT] DISTINCT FROM, IS
NULL, NULLIF, JOIN USING / NATURAL), or used any other way (an expression, a predicate,
grouping, ordering, a subquery's output...). A role that sees a column masked or as
ciphertext may only do the first (and the second with ``lookup``): each other use lets
it ask the server questions about the value (an oracle)."""

_EQ_OPERATORS = frozenset({"=", "<>", "!="})
_EQ_KINDS = frozenset({"AEXPR_IN", "AEXPR_DISTINCT", "AEXPR_NOT_DISTINCT", "AEXPR_NULLIF"})
_OP_KINDS = frozenset({"AEXPR_OP", "AEXPR_OP_ANY", "AEXPR_OP_ALL"})


class Outputs:
    """The bare result columns of a derived table (a subquery in FROM, a CTE) and how the
    query around it uses them.

    ``items`` are (output name or None for "any", source, column): the source is a base
    relation or another derived table. ``marks`` are (output name or ALL, how) uses by
    the outer query. A column that leaves a derived table bare and is compared outside
    is compared, not shown; Collector.finish resolves that once the statement is walked.
    """

    __slots__ = ("items", "marks")

    def __init__(self) -> None:
        self.items: list[tuple[str | None, RelationName | Outputs, str]] = []
        self.marks: set[tuple[str, str]] = set()


class _Top:
    """Sink of a statement's own result columns: bare ones there are shown, not used."""


TOP: Final = _Top()
Sink = Outputs | _Top | None
"""Where a query's bare result columns go: TOP (the client), a derived table's Outputs,
or None (they are used: a sublink, an INSERT ... SELECT, a non-ALL set operation...)."""

DML_READ_NEEDS_SELECT = True
"""As PostgreSQL: UPDATE/DELETE/MERGE/ON CONFLICT/RETURNING reading the target needs select.

Only reads seen at the target's own query level count (an unqualified name inside a
subquery most likely belongs to the subquery's own FROM).
"""

_ROLE_PARAMS = frozenset({"role", "session_authorization"})


class Entry:
    """One FROM item (or DML target) as seen by column references."""

    __slots__ = (
        "lockable",
        "members",
        "outputs",
        "relation",
        "renamed",
        "schema",
        "select_on_read",
        "visible",
    )

    def __init__(
        self,
        visible: str | None,
        relation: RelationName | None = None,
        *,
        schema: str | None = None,
        renamed: frozenset[str] = frozenset(),
        members: tuple[Entry, ...] = (),
        lockable: frozenset[RelationName] = frozenset(),
        select_on_read: bool = False,
        outputs: Outputs | None = None,
    ) -> None:
        self.visible = visible
        self.outputs = outputs
        self.relation = relation
        self.schema = schema
        self.renamed = renamed
        self.members = members
        self.lockable = lockable
        self.select_on_read = select_on_read


class Level:
    """A query level: its FROM entries, the CTE names it makes visible, its parent."""

    __slots__ = ("ctes", "entries", "parent")

    def __init__(self, parent: Level | None, ctes: Mapping[str, Outputs] | None = None) -> None:
        self.parent = parent
        self.entries: list[Entry] = []
        self.ctes: Mapping[str, Outputs] = ctes or {}

    def chain(self) -> Iterator[Level]:
        level: Level | None = self
        while level is not None:
            yield level
            level = level.parent

    def is_cte(self, name: str) -> bool:
        return any(name in lvl.ctes for lvl in self.chain())

    def cte(self, name: str) -> Outputs | None:
        """The result columns of the innermost visible CTE called ``name``."""
        for lvl in self.chain():
            found = lvl.ctes.get(name)
            if found is not None:
                return found
        return None


def unwrap(node: Node, *types: str) -> Node:
    """Return the fields of a node that may or may not carry its type wrapper."""
    if len(node) == 1:
        ((key, val),) = node.items()
        if key in types:
            return val
    return node


def const_text(node: Any) -> str | None:
    """The text of a constant (through casts), or None when it is not a constant."""
    if not isinstance(node, dict):
        return None
    if "TypeCast" in node:
        return const_text(node["TypeCast"].get("arg"))
    c = node.get("A_Const")
    if c is None:
        return None
    if "sval" in c:
        return c["sval"].get("sval", "")
    if "ival" in c:
        return str(c["ival"].get("ival", 0))
    if "fval" in c:
        return c["fval"].get("fval", "0")
    if "boolval" in c:
        return "true" if c["boolval"].get("boolval") else "false"
    if "bsval" in c:
        return c["bsval"].get("bsval", "")
    return None


def const_bool(node: Any) -> bool | None:
    """A boolean constant as PostgreSQL's parse_bool reads it, or None."""
    text = const_text(node)
    if text is None:
        return None
    text = text.strip().lower()
    if text in ("t", "true", "tr", "tru", "y", "ye", "yes", "on", "1"):
        return True
    if text in ("f", "false", "fa", "fal", "fals", "n", "no", "off", "of", "0"):
        return False
    return None


def qualified(parts: list[str]) -> tuple[str | None, str | None, str]:
    """(catalog, schema, name) from a dotted name list."""
    if len(parts) == 1:
        return None, None, parts[0]
    if len(parts) == 2:
        return None, parts[0], parts[1]
    return parts[-3], parts[-2], parts[-1]


def strings(nodes: list[Node] | None) -> list[str]:
    return [n["String"]["sval"] for n in nodes or () if "String" in n]


class Collector:
    """Accumulates one statement's accesses, column reads/writes and function calls."""

    def __init__(self) -> None:
        self.accesses: set[tuple[RelationName, str]] = set()
        self.reads: dict[RelationName, set[str]] = {}
        self.writes: dict[RelationName, set[str]] = {}
        self.functions: set[FunctionName] = set()
        self.config_calls: list[ConfigCall] = []
        self.max_param = 0
        self.selected: list[RelationName] = []
        # Column reads other than a bare result column: compared by equality / other uses.
        self.compared: dict[RelationName, set[str]] = {}
        self.used: dict[RelationName, set[str]] = {}
        self.by_position = False
        """ORDER BY / GROUP BY / DISTINCT ON names a result column by its number: which
        column is used then depends on an integer constant (no template caching)."""
        self.sink: Sink = None
        """The sink of the next query walked; each query handler takes it and resets it."""
        self.mode = USE
        self._out: tuple[Sink, str | None] = (None, None)
        self._derived: list[Outputs] = []

    # -- recording ---------------------------------------------------------------------

    def access(self, rel: RelationName, kind: str) -> None:
        self.accesses.add((rel, kind))
        if kind == "select":
            self.selected.append(rel)

    def write(self, rel: RelationName, cols: list[str] | None) -> None:
        self.writes.setdefault(rel, set()).update(cols if cols else (ALL,))

    def read(self, entry: Entry, col: str, same_level: bool) -> None:
        mode = self.mode
        if entry.relation is not None:
            rel, name = entry.relation, ALL if col in entry.renamed else col
            self.reads.setdefault(rel, set()).add(name)
            if mode != OUTPUT:
                (self.compared if mode == EQUALITY else self.used).setdefault(rel, set()).add(
                    name
                )
            elif isinstance(self._out[0], Outputs):
                self._out[0].items.append((self._out[1], rel, name))
            if same_level and entry.select_on_read and DML_READ_NEEDS_SELECT:
                self.access(entry.relation, "select")
        if entry.outputs is not None:
            if mode != OUTPUT:
                entry.outputs.marks.add((col, mode))
            elif isinstance(self._out[0], Outputs):
                self._out[0].items.append((self._out[1], entry.outputs, col))
        for member in entry.members:
            self.read(member, col, same_level)

    def ref_as(self, node: Node, level: Level, mode: str, sink: Sink = None,
               name: str | None = None) -> None:
        """Walk one bare ColumnRef read as ``mode`` (a result column of ``sink`` named
        ``name``, or an equality operand); any other node is an ordinary use."""
        if "ColumnRef" not in node:
            self.expr(node, level)
            return
        saved = self.mode, self._out
        self.mode, self._out = mode, (sink, name)
        try:
            self.column_ref(node["ColumnRef"], level)
        finally:
            self.mode, self._out = saved

    def finish(self) -> None:
        """Resolve the uses of derived tables' result columns into base columns."""
        work = [(o, name, how) for o in self._derived for name, how in o.marks]
        seen = set()
        while work:
            outputs, name, how = work.pop()
            if (id(outputs), name, how) in seen:
                continue
            seen.add((id(outputs), name, how))
            for item_name, source, col in outputs.items:
                if name != ALL and item_name is not None and item_name != name:
                    continue
                if isinstance(source, Outputs):
                    work.append((source, col, how))
                else:
                    target = self.compared if how == EQUALITY else self.used
                    target.setdefault(source, set()).add(col)
        self._derived.clear()

    def derived(self) -> Outputs:
        """A new derived table's result columns, resolved by finish()."""
        outputs = Outputs()
        self._derived.append(outputs)
        return outputs

    def whole(self, entry: Entry, same_level: bool) -> None:
        self.read(entry, ALL, same_level)

    def unqualified(self, col: str, level: Level) -> None:
        """Without the catalog a bare column may belong to any relation in scope."""
        for depth, lvl in enumerate(level.chain()):
            for entry in lvl.entries:
                if entry.relation is not None or entry.outputs is not None:
                    self.read(entry, col, depth == 0)

    # -- name lookup -------------------------------------------------------------------

    @staticmethod
    def find(level: Level, qual: list[str]) -> tuple[Entry, bool] | None:
        """The FROM entry a qualifier names (innermost level first), and if same level."""
        for depth, lvl in enumerate(level.chain()):
            for entry in lvl.entries:
                if entry.visible is None:
                    continue
                if len(qual) == 1 and entry.visible == qual[0]:
                    return entry, depth == 0
                if (
                    len(qual) >= 2
                    and entry.relation is not None
                    and entry.schema is not None
                    and entry.schema == qual[-2]
                    and entry.visible == qual[-1]
                    and (len(qual) == 2 or entry.relation.catalog in (None, qual[-3]))
                ):
                    return entry, depth == 0
        return None

    # -- expressions -------------------------------------------------------------------

    def expr(self, node: Any, level: Level) -> None:
        """Walk any subtree: expressions, nested queries, DDL pieces."""
        if isinstance(node, list):
            for item in node:
                self.expr(item, level)
            return
        if not isinstance(node, dict):
            return
        for key, val in node.items():
            handler = _EXPR_HANDLERS.get(key)
            if handler is not None:
                handler(self, val, level)
            elif isinstance(val, (dict, list)):
                self.expr(val, level)

    def column_ref(self, node: Node, level: Level) -> None:
        fields = node.get("fields", [])
        star = bool(fields) and "A_Star" in fields[-1]
        names = strings(fields)
        if star and not names:
            for entry in level.entries:
                self.whole(entry, True)
            return
        if star:
            found = self.find(level, names)
            if found:
                self.whole(*found)
            return
        if len(names) == 1:
            col = names[0]
            mode, self.mode = self.mode, USE  # a row value is never a bare result column
            try:
                for depth, lvl in enumerate(level.chain()):
                    for entry in lvl.entries:
                        if entry.visible == col:
                            self.whole(entry, depth == 0)
            finally:
                self.mode = mode
            self.unqualified(col, level)
            return
        found = self.find(level, names[:-1])
        if found:
            self.read(found[0], names[-1], found[1])
        else:
            self.unqualified(names[-1], level)

    def indirection(self, node: Node, level: Level) -> None:
        """``(t).col`` reads one column of t; ``(t).*`` the whole row (via the ColumnRef)."""
        arg, ind = node.get("arg", {}), node.get("indirection", [])
        ref = arg.get("ColumnRef") if isinstance(arg, dict) else None
        if ref and ind and "String" in ind[0]:
            names = strings(ref.get("fields"))
            if len(names) == 1 and len(ref["fields"]) == 1:
                found = self.find(level, names)
                if found:
                    self.read(found[0], ind[0]["String"]["sval"], found[1])
                    self.unqualified(names[0], level)
                    self.expr(ind[1:], level)
                    return
        self.expr(arg, level)
        self.expr(ind, level)

    def func_call(self, node: Node, level: Level) -> None:
        catalog, schema, name = qualified(strings(node.get("funcname")))
        self.functions.add(FunctionName(schema, name, catalog))
        if name == "set_config" and schema in (None, "pg_catalog"):
            self.config_calls.append(_config_call(node.get("args") or []))
        for key in ("args", "agg_order", "agg_filter", "over"):
            if key in node:
                self.expr(node[key], level)

    def a_expr(self, node: Node, level: Level) -> None:
        """A schema-qualified operator is a call of that schema's function. A bare column
        operand of an equality operator is compared, not otherwise used."""
        ops = strings(node.get("name"))
        if len(ops) > 1:
            catalog, schema, name = qualified(ops)
            self.functions.add(FunctionName(schema, name, catalog))
        kind = node.get("kind")
        equality = kind in _EQ_KINDS or (
            kind in _OP_KINDS
            and bool(ops)
            and ops[-1] in _EQ_OPERATORS
            and (len(ops) == 1 or ops[:-1] == ["pg_catalog"])
        )
        for side in ("lexpr", "rexpr"):
            operand = node.get(side)
            if not equality or not isinstance(operand, dict):
                self.expr(operand, level)
            elif "List" in operand:  # IN (a, b, c)
                for item in operand["List"].get("items", []):
                    self.ref_as(item, level, EQUALITY)
            else:
                self.ref_as(operand, level, EQUALITY)

    def null_test(self, node: Node, level: Level) -> None:
        """``col IS [NOT] NULL`` compares the column with NULL."""
        self.ref_as(node.get("arg") or {}, level, EQUALITY)

    def sub_link(self, node: Node, level: Level) -> None:
        """``col IN (SELECT ...)`` / ``col = ANY (SELECT ...)`` compare ``col``; the
        subquery's result columns are used (they are what it is compared with)."""
        ops = strings(node.get("operName"))
        kind = node.get("subLinkType")
        test = node.get("testexpr")
        if isinstance(test, dict):
            equality = kind in ("ANY_SUBLINK", "ALL_SUBLINK") and (
                not ops or ops[-1] in _EQ_OPERATORS
            )
            self.ref_as(test, level, EQUALITY) if equality else self.expr(test, level)
        self.expr({k: v for k, v in node.items() if k != "testexpr"}, level)

    def param_ref(self, node: Node, level: Level) -> None:
        self.max_param = max(self.max_param, node.get("number", 0))

    def constraint(self, node: Node, level: Level) -> None:
        """A foreign key needs ``references`` on the table it points at."""
        pk = node.get("pktable")
        if node.get("contype") == "CONSTR_FOREIGN" and pk:
            self.access(range_var_name(unwrap(pk, "RangeVar")), "references")
        self.expr({k: v for k, v in node.items() if k != "pktable"}, level)

    # -- queries -----------------------------------------------------------------------

    def query(self, node: Node, parent: Level | None) -> None:
        """Any query node (wrapped): SELECT or a data-modifying statement."""
        ((kind, body),) = node.items()
        handler = _QUERY_HANDLERS.get(kind)
        if handler is None:
            self.sink = None
            self.expr(body, parent or Level(None))
        else:
            handler(self, body, parent)

    def with_clause(self, wc: Node | None, level: Level) -> None:
        """CTE bodies: non-recursive ones see only earlier CTEs, recursive ones all."""
        if not wc:
            return
        ctes = [unwrap(c, "CommonTableExpr") for c in wc.get("ctes", [])]
        outputs = {c["ctename"]: self.derived() for c in ctes}
        names = list(outputs)
        recursive = bool(wc.get("recursive"))
        for i, cte in enumerate(ctes):
            visible = names if recursive else names[:i]
            scope = Level(level.parent, {n: outputs[n] for n in visible})
            self.sink = self.renamed(outputs[cte["ctename"]], cte.get("aliascolnames"))
            self.query(cte["ctequery"], scope)
        level.ctes = outputs

    def renamed(self, outputs: Outputs, colnames: list[Node] | None) -> Outputs:
        """The sink of a derived table: with a column alias list (``AS s(a, b)``) a use of
        any of its columns is taken as a use of all of them (fail closed, by position)."""
        if not colnames:
            return outputs
        inner = self.derived()
        outputs.items.append((None, inner, ALL))
        return inner

    def select(self, s: Node, parent: Level | None) -> Level:
        sink, self.sink = self.sink, None
        level = Level(parent)
        self.with_clause(s.get("withClause"), level)
        op = s.get("op", "SETOP_NONE")
        if op != "SETOP_NONE":
            # Without ALL, UNION / INTERSECT / EXCEPT compare whole rows; an ORDER BY of
            # the set operation sorts by result columns: all of them count as used then.
            arms = sink if s.get("all") and not s.get("sortClause") else None
            for arm in ("larg", "rarg"):
                if arm in s:
                    if isinstance(arms, Outputs):  # each arm names its columns its own way
                        self.sink = self.derived()
                        arms.items.append((None, self.sink, ALL))
                    else:
                        self.sink = arms
                    self.select(unwrap(s[arm], "SelectStmt"), level)
        for item in s.get("fromClause", []):
            self.from_item(item, level)
        self.targets(s, level, sink)
        for key in (
            "valuesLists",
            "distinctClause",
            "whereClause",
            "groupClause",
            "havingClause",
            "windowClause",
            "sortClause",
            "limitOffset",
            "limitCount",
        ):
            if key in s:
                self.expr(s[key], level)
        for lc in s.get("lockingClause", []):
            self.locking(unwrap(lc, "LockingClause"), level)
        return level

    def targets(self, s: Node, level: Level, sink: Sink) -> None:
        """A SELECT's result columns: a bare column goes to ``sink`` unless the query
        sorts, groups or de-duplicates by it (by number, alias, or plain DISTINCT)."""
        targets = [unwrap(t, "ResTarget") for t in s.get("targetList", [])]
        used = self.used_targets(s, targets) if sink is not None else None
        for i, rt in enumerate(targets):
            val = rt.get("val")
            if sink is None or used is None or i in used or not isinstance(val, dict):
                self.expr(val, level)
            else:
                fields = val.get("ColumnRef", {}).get("fields", [])
                name = rt.get("name") or (
                    fields[-1]["String"]["sval"] if fields and "String" in fields[-1] else None
                )
                self.ref_as(val, level, OUTPUT, sink, name)
            self.expr({k: v for k, v in rt.items() if k != "val"}, level)

    def used_targets(self, s: Node, targets: list[Node]) -> set[int] | None:
        """Result columns ORDER BY / GROUP BY / DISTINCT ON name by number or by alias;
        None when every one is used (plain DISTINCT compares whole rows)."""
        distinct = s.get("distinctClause") or []
        if any(not d for d in distinct):
            return None
        aliases: dict[str, list[int]] = {}
        for i, rt in enumerate(targets):
            if rt.get("name"):
                aliases.setdefault(rt["name"], []).append(i)
        used: set[int] = set()
        stack: list[Any] = [*s.get("sortClause", []), *s.get("groupClause", []), *distinct]
        while stack:
            item = stack.pop()
            if not isinstance(item, dict):
                continue
            if "SortBy" in item:
                stack.append(item["SortBy"].get("node"))
            elif "GroupingSet" in item:
                stack.extend(item["GroupingSet"].get("content", []))
            elif "A_Const" in item and "ival" in item["A_Const"]:
                self.by_position = True
                used.add(int(item["A_Const"]["ival"].get("ival", 0)) - 1)
            elif "A_Const" in item:
                self.by_position = True  # ORDER BY '1' is an error, but fail closed
                return None
            elif "ColumnRef" in item:
                names = strings(item["ColumnRef"].get("fields"))
                if len(names) == 1:
                    used.update(aliases.get(names[0], ()))
        return used

    def locking(self, lc: Node, level: Level) -> None:
        """FOR UPDATE/SHARE needs update on each locked table (OF limits the set)."""
        names = {unwrap(r, "RangeVar")["relname"] for r in lc.get("lockedRels", [])}
        for entry in level.entries:
            if names and entry.visible not in names:
                continue
            for rel in entry.lockable:
                self.access(rel, "update")

    def from_item(self, node: Node, level: Level) -> list[Entry]:
        """Register a FROM item's entries at ``level``; return the base entries under it."""
        ((kind, item),) = node.items()
        if kind == "RangeVar":
            return [self.range_var(item, level)]
        if kind == "RangeTableSample":
            entries = self.from_item(item["relation"], level)
            self.expr(item.get("args"), level)
            return entries
        if kind == "JoinExpr":
            return self.join(item, level)
        if kind == "RangeSubselect":
            start = len(self.selected)
            outputs = self.derived()
            alias = item.get("alias") or {}
            self.sink = self.renamed(outputs, alias.get("colnames"))
            self.query(item["subquery"], level)
            entry = Entry(
                _alias(item), lockable=frozenset(self.selected[start:]), outputs=outputs
            )
            level.entries.append(entry)
            return [entry]
        # RangeFunction, RangeTableFunc, JsonTable...: expressions plus an opaque entry.
        self.expr({k: v for k, v in item.items() if k != "alias"}, level)
        entry = Entry(_alias(item))
        level.entries.append(entry)
        return [entry]

    def range_var(self, rv: Node, level: Level) -> Entry:
        alias = rv.get("alias")
        visible = alias["aliasname"] if alias else rv["relname"]
        if "schemaname" not in rv and "catalogname" not in rv and level.is_cte(rv["relname"]):
            outputs = level.cte(rv["relname"])
            if alias and alias.get("colnames") and outputs is not None:
                renamed = self.derived()
                renamed.items.append((None, outputs, ALL))
                outputs = renamed
            entry = Entry(visible, outputs=outputs)
        else:
            rel = range_var_name(rv)
            self.access(rel, "select")
            entry = Entry(
                visible,
                rel,
                schema=None if alias else rel.schema,
                renamed=frozenset(strings(alias.get("colnames"))) if alias else frozenset(),
                lockable=frozenset({rel}),
            )
        level.entries.append(entry)
        return entry

    def join(self, j: Node, level: Level) -> list[Entry]:
        left = self.from_item(j["larg"], level)
        right = self.from_item(j["rarg"], level)
        under = left + right
        mode, self.mode = self.mode, EQUALITY  # NATURAL and USING join by equality
        try:
            if j.get("isNatural"):
                for entry in under:
                    self.whole(entry, True)
            for col in strings(j.get("usingClause")):
                for entry in under:
                    self.read(entry, col, True)
        finally:
            self.mode = mode
        if "quals" in j:
            self.expr(j["quals"], level)
        if "alias" in j:
            rels = frozenset(r for e in under for r in e.lockable)
            level.entries.append(
                Entry(j["alias"]["aliasname"], members=tuple(under), lockable=rels)
            )
        return under

    # -- data-modifying statements -----------------------------------------------------

    def target(self, rv: Node, kind: str, level: Level) -> Entry:
        """A DML target: never a CTE, reads of it need select (see DML_READ_NEEDS_SELECT)."""
        rv = unwrap(rv, "RangeVar")
        rel = range_var_name(rv)
        self.access(rel, kind)
        alias = rv.get("alias")
        entry = Entry(
            alias["aliasname"] if alias else rv["relname"],
            rel,
            schema=None if alias else rel.schema,
            select_on_read=True,
        )
        level.entries.append(entry)
        return entry

    def returning(self, s: Node, target: Entry, level: Level, sink: Sink) -> None:
        """RETURNING: a bare column is a result column of ``sink``, like a select list."""
        clause = s.get("returningClause") or {}
        exprs = clause.get("exprs") if "exprs" in clause else s.get("returningList")
        if not exprs:
            return
        for name in ("old", "new"):
            level.entries.append(Entry(name, target.relation, select_on_read=True))
        self.targets({"targetList": exprs}, level, sink)

    def insert(self, s: Node, parent: Level | None) -> None:
        sink, self.sink = self.sink, None
        level = Level(parent)
        self.with_clause(s.get("withClause"), level)
        scope = Level(parent, level.ctes)  # the SELECT part does not see the target
        target = self.target(s["relation"], "insert", level)
        rel = target.relation
        assert rel is not None
        self.write(rel, [unwrap(c, "ResTarget")["name"] for c in s.get("cols", [])])
        if "selectStmt" in s:
            self.query(s["selectStmt"], scope)
        occ = s.get("onConflictClause")
        if occ:
            infer = occ.get("infer") or {}
            quiet = Level(parent, level.ctes)
            arbiter = Entry(target.visible, rel, schema=target.schema)
            quiet.entries.append(arbiter)
            for elem in infer.get("indexElems", []):
                column = unwrap(elem, "IndexElem").get("name")
                if column:
                    self.read(arbiter, column, True)
            self.expr(infer, quiet)
            if occ.get("action") == "ONCONFLICT_UPDATE":
                self.access(rel, "update")
                level.entries.append(Entry("excluded", rel, select_on_read=True))
                self.set_list(occ.get("targetList", []), rel, level)
                self.expr(occ.get("whereClause"), level)
        self.returning(s, target, level, sink)

    def set_list(self, targets: list[Node], rel: RelationName, level: Level) -> None:
        """UPDATE-style SET: the named columns are written, the expressions read."""
        cols = []
        for t in targets:
            rt = unwrap(t, "ResTarget")
            cols.append(rt["name"])
            self.expr(rt.get("indirection"), level)
            self.expr(rt.get("val"), level)
        self.write(rel, cols)

    def update(self, s: Node, parent: Level | None) -> None:
        sink, self.sink = self.sink, None
        level = Level(parent)
        self.with_clause(s.get("withClause"), level)
        target = self.target(s["relation"], "update", level)
        for item in s.get("fromClause", []):
            self.from_item(item, level)
        assert target.relation is not None
        self.set_list(s.get("targetList", []), target.relation, level)
        self.expr(s.get("whereClause"), level)
        self.returning(s, target, level, sink)

    def delete(self, s: Node, parent: Level | None) -> None:
        sink, self.sink = self.sink, None
        level = Level(parent)
        self.with_clause(s.get("withClause"), level)
        target = self.target(s["relation"], "delete", level)
        for item in s.get("usingClause", []):
            self.from_item(item, level)
        self.expr(s.get("whereClause"), level)
        self.returning(s, target, level, sink)

    def merge(self, s: Node, parent: Level | None) -> None:
        sink, self.sink = self.sink, None
        level = Level(parent)
        self.with_clause(s.get("withClause"), level)
        rv = unwrap(s["relation"], "RangeVar")
        rel = range_var_name(rv)
        alias = rv.get("alias")
        target = Entry(
            alias["aliasname"] if alias else rv["relname"],
            rel,
            schema=None if alias else rel.schema,
            select_on_read=True,
        )
        level.entries.append(target)
        self.from_item(s["sourceRelation"], level)
        self.expr(s.get("joinCondition"), level)
        for wc in s.get("mergeWhenClauses", []):
            w = unwrap(wc, "MergeWhenClause")
            self.expr(w.get("condition"), level)
            command = w.get("commandType")
            if command == "CMD_UPDATE":
                self.access(rel, "update")
                self.set_list(w.get("targetList", []), rel, level)
            elif command == "CMD_INSERT":
                self.access(rel, "insert")
                self.write(rel, [unwrap(t, "ResTarget")["name"] for t in w.get("targetList", [])])
                self.expr(w.get("values"), level)
            elif command == "CMD_DELETE":
                self.access(rel, "delete")
        self.returning(s, target, level, sink)


def _alias(item: Node) -> str | None:
    alias = item.get("alias")
    return alias["aliasname"] if alias else None


def range_var_name(rv: Node) -> RelationName:
    return RelationName(rv.get("schemaname"), rv["relname"], rv.get("catalogname"))


def _config_call(args: list[Any]) -> ConfigCall:
    """Classify set_config(name, value, is_local) from constant arguments only."""
    name = const_text(args[0]) if args else None
    if name is None:
        return ConfigCall(None, None, None)
    param = name.lower()
    value = const_text(args[1]) if len(args) > 1 else None
    is_local = const_bool(args[2]) if len(args) > 2 else None
    values: tuple[str, ...] | None = None
    if value is not None:
        if param == "search_path":
            try:
                values = parse_search_path(value)
            except IdentifierError:
                values = None
        else:
            values = (value,)
    return ConfigCall(param, values, is_local)


def _sublink_select(c: Collector, node: Node, level: Level) -> None:
    c.select(node, level)


_EXPR_HANDLERS = {
    "ColumnRef": Collector.column_ref,
    "A_Indirection": Collector.indirection,
    "FuncCall": Collector.func_call,
    "A_Expr": Collector.a_expr,
    "NullTest": Collector.null_test,
    "SubLink": Collector.sub_link,
    "ParamRef": Collector.param_ref,
    "Constraint": Collector.constraint,
    "SelectStmt": _sublink_select,
    "InsertStmt": Collector.insert,
    "UpdateStmt": Collector.update,
    "DeleteStmt": Collector.delete,
    "MergeStmt": Collector.merge,
}

_QUERY_HANDLERS = {
    "SelectStmt": Collector.select,
    "InsertStmt": Collector.insert,
    "UpdateStmt": Collector.update,
    "DeleteStmt": Collector.delete,
    "MergeStmt": Collector.merge,
}

__all__ = [
    "DML_READ_NEEDS_SELECT",
    "EQUALITY",
    "OUTPUT",
    "TOP",
    "USE",
    "Collector",
    "Level",
    "const_bool",
    "const_text",
    "range_var_name",
    "unwrap",
]
