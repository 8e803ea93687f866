"""``analyze(sql)``: classify every statement of a query string for the policy and session.

Parsing uses ``parse_sql_json`` (a few µs) and walks plain dicts; the result is a frozen
Analysis meant to be cached by exact text (proxy.sql.cache).  Unparseable text raises
AnalysisError; anything parseable but unrecognised becomes kind ``unknown``, which the
policy denies.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from types import MappingProxyType
from typing import Any

from pglast import parser as _pg

from proxy.sql.info import Analysis, SetInfo, StatementInfo
from proxy.sql.names import RelationName
from proxy.sql.query import (
    TOP,
    Collector,
    Level,
    const_bool,
    const_text,
    range_var_name,
    unwrap,
)

Node = dict[str, Any]


class SqlError(Exception):
    """Base of errors raised by proxy.sql."""


class AnalysisError(SqlError):
    """The text does not parse; the message is pglast's, safe to show (no values added)."""


def fingerprint(sql: str) -> str:
    """pglast's statement fingerprint (constants ignored), for audit and metrics."""
    try:
        return _pg.fingerprint(sql)
    except Exception as exc:  # pglast raises ParseError, odd input may raise others
        raise AnalysisError(str(exc)) from None


def analyze(sql: str) -> Analysis:
    """Parse ``sql`` and describe each statement; raises AnalysisError only."""
    if "\x00" in sql:  # the C parser would stop there and hide the rest
        raise AnalysisError("query text contains a NUL character")
    try:
        tree = json.loads(_pg.parse_sql_json(sql))
    except Exception as exc:
        raise AnalysisError(str(exc) or type(exc).__name__) from None
    stmts = tree.get("stmts") or []
    if not stmts:
        return Analysis((StatementInfo("empty"),))
    return Analysis(tuple(describe(raw.get("stmt") or {}) for raw in stmts))


def describe(stmt: Node) -> StatementInfo:
    """One statement node (wrapped); failures inside become ``unknown`` (fail closed)."""
    if len(stmt) != 1:
        return StatementInfo("unknown", detail="empty statement node")
    ((node_type, body),) = stmt.items()
    try:
        return _describe(node_type, body)
    except RecursionError:
        return StatementInfo("unknown", detail=f"{node_type}: nested too deeply")
    except Exception as exc:  # an unexpected tree shape must not let a statement through
        return StatementInfo("unknown", detail=f"{node_type}: {type(exc).__name__}")


def _describe(node_type: str, body: Node) -> StatementInfo:
    simple = _SIMPLE.get(node_type)
    if simple is not None:
        return simple(body)
    if node_type in _QUERY_KINDS:
        c = Collector()
        # Its bare result columns go to the client; SELECT INTO stores them in a new table
        # instead, which is a use (the copy would not carry the column's view).
        c.sink = None if body.get("intoClause") else TOP
        c.query({node_type: body}, None)
        kind = _QUERY_KINDS[node_type]
        if node_type == "SelectStmt" and body.get("intoClause"):
            kind = "ddl"
        if node_type == "SelectStmt" and len(c.config_calls) == 1 and _sole_call(body):
            c.config_calls[0] = replace(c.config_calls[0], exact=True)
        return _info(kind, c, detail=node_type)
    if node_type in _ADMIN:
        return _info("admin", _walked(body), detail=node_type)
    if node_type in _DDL or node_type.startswith(_DDL_PREFIXES):
        return _info("ddl", _walked(body), detail=node_type)
    return StatementInfo("unknown", detail=node_type)


_SOLE_SELECT_KEYS = frozenset({"targetList", "limitOption", "op"})


def _sole_call(body: Node) -> bool:
    """``SELECT [pg_catalog.]set_config(a, b, c) [AS x]`` and nothing else: the one form in
    which the call runs exactly when the statement does (see ConfigCall.exact)."""
    if not set(body) <= _SOLE_SELECT_KEYS or body.get("op", "SETOP_NONE") != "SETOP_NONE":
        return False
    if body.get("limitOption", "LIMIT_OPTION_DEFAULT") != "LIMIT_OPTION_DEFAULT":
        return False
    targets = body.get("targetList") or []
    if len(targets) != 1:
        return False
    call = (targets[0].get("ResTarget") or {}).get("val", {}).get("FuncCall")
    if not call or not set(call) <= {"funcname", "args", "funcformat", "location"}:
        return False
    names = [n.get("String", {}).get("sval") for n in call.get("funcname", [])]
    args = call.get("args") or []
    return names in (["set_config"], ["pg_catalog", "set_config"]) and len(args) == 3 and all(
        set(a) == {"A_Const"} for a in args
    )


def _walked(body: Node) -> Collector:
    c = Collector()
    c.expr(body, Level(None))
    return c


def _info(kind: str, c: Collector, **extra: Any) -> StatementInfo:
    c.finish()
    return StatementInfo(
        kind,  # type: ignore[arg-type]
        accesses=frozenset(c.accesses),
        columns_read=MappingProxyType({r: frozenset(v) for r, v in c.reads.items()}),
        columns_compared=MappingProxyType({r: frozenset(v) for r, v in c.compared.items()}),
        columns_used=MappingProxyType({r: frozenset(v) for r, v in c.used.items()}),
        by_position=c.by_position,
        columns_written=MappingProxyType({r: frozenset(v) for r, v in c.writes.items()}),
        functions=frozenset(c.functions),
        config_calls=tuple(c.config_calls),
        param_count=c.max_param,
        **extra,
    )


# -- statements with their own shape ------------------------------------------------------


def _variable_set(s: Node) -> StatementInfo:
    kind = s.get("kind")
    if kind == "VAR_RESET_ALL":
        return StatementInfo("set", setting=SetInfo("all", "default", (), False), name="all")
    param = s.get("name", "").lower()
    action = {"VAR_SET_VALUE": "value", "VAR_SET_MULTI": "value", "VAR_SET_CURRENT": "current"}.get(
        kind or "", "default"
    )
    values = tuple(v for v in (const_text(a) for a in s.get("args", [])) if v is not None)
    setting = SetInfo(param, action, values, bool(s.get("is_local")))  # type: ignore[arg-type]
    return StatementInfo(
        "set_role" if param in ("role", "session_authorization") else "set",
        setting=setting,
        name=param,
    )


_TRANSACTION = {
    "TRANS_STMT_BEGIN": "begin",
    "TRANS_STMT_START": "begin",
    "TRANS_STMT_COMMIT": "commit",
    "TRANS_STMT_ROLLBACK": "rollback",
    "TRANS_STMT_SAVEPOINT": "savepoint",
    "TRANS_STMT_RELEASE": "release",
    "TRANS_STMT_ROLLBACK_TO": "rollback_to",
    "TRANS_STMT_PREPARE": "prepare_transaction",
    "TRANS_STMT_COMMIT_PREPARED": "commit_prepared",
    "TRANS_STMT_ROLLBACK_PREPARED": "rollback_prepared",
}


def _transaction(s: Node) -> StatementInfo:
    kind = _TRANSACTION.get(s.get("kind", ""))
    if kind is None:
        return StatementInfo("unknown", detail="TransactionStmt")
    return StatementInfo(kind, name=s.get("savepoint_name") or s.get("gid"))  # type: ignore[arg-type]


_LOCK_MODES = {
    1: ("ACCESS SHARE", "select"),
    2: ("ROW SHARE", "lock_strong"),
    3: ("ROW EXCLUSIVE", "lock_row_exclusive"),
    4: ("SHARE UPDATE EXCLUSIVE", "lock_strong"),
    5: ("SHARE", "lock_strong"),
    6: ("SHARE ROW EXCLUSIVE", "lock_strong"),
    7: ("EXCLUSIVE", "lock_strong"),
    8: ("ACCESS EXCLUSIVE", "lock_strong"),
}


def _lock(s: Node) -> StatementInfo:
    mode, kind = _LOCK_MODES.get(s.get("mode", 8), ("ACCESS EXCLUSIVE", "lock_strong"))
    c = Collector()
    for rv in s.get("relations", []):
        c.access(range_var_name(unwrap(rv, "RangeVar")), kind)
    return _info("lock", c, lock_mode=mode)


def _truncate(s: Node) -> StatementInfo:
    c = Collector()
    for rv in s.get("relations", []):
        c.access(range_var_name(unwrap(rv, "RangeVar")), "truncate")
    return _info("truncate", c, cascade=s.get("behavior") == "DROP_CASCADE")


def _copy(s: Node) -> StatementInfo:
    c = Collector()
    is_from = bool(s.get("is_from"))
    cols = [n["String"]["sval"] for n in s.get("attlist", [])]
    if "query" in s:
        c.sink = TOP
        c.query(s["query"], None)
        for rel in [r for r, k in c.accesses if k == "select"]:
            c.access(rel, "copy_out")
    if "relation" in s:
        rel: RelationName = range_var_name(unwrap(s["relation"], "RangeVar"))
        if is_from:
            c.access(rel, "copy_in")
            c.access(rel, "insert")
            c.write(rel, cols)
        else:
            c.access(rel, "copy_out")
            c.access(rel, "select")
            c.reads.setdefault(rel, set()).update(cols or ("*",))
        c.expr(s.get("whereClause"), Level(None))
    if s.get("is_program"):
        kind = "copy_program"
    elif s.get("filename") is not None:
        kind = "copy_file"
    else:
        kind = "copy_in" if is_from else "copy_out"
    return _info(kind, c)


def _explain(s: Node) -> StatementInfo:
    analyze_flag = False
    for opt in s.get("options", []):
        d = unwrap(opt, "DefElem")
        if d.get("defname") == "analyze":
            arg = d.get("arg")
            analyze_flag = True if arg is None else _defelem_bool(arg) is not False
    return StatementInfo(
        "explain", inner=describe(s["query"]), explain_analyze=analyze_flag, detail="ExplainStmt"
    )


def _defelem_bool(arg: Node) -> bool | None:
    if "Boolean" in arg:
        return bool(arg["Boolean"].get("boolval"))
    if "Integer" in arg:
        return bool(arg["Integer"].get("ival"))
    if "String" in arg:
        return const_bool({"A_Const": {"sval": arg["String"]}})
    return None


def _prepare(s: Node) -> StatementInfo:
    inner = describe(s["query"])
    return StatementInfo("prepare", inner=inner, name=s.get("name"), param_count=inner.param_count)


def _execute(s: Node) -> StatementInfo:
    c = Collector()
    c.expr(s.get("params"), Level(None))
    return _info("execute", c, name=s.get("name"))


def _declare(s: Node) -> StatementInfo:
    inner = describe(s["query"])
    return StatementInfo(
        "declare", inner=inner, name=s.get("portalname"), param_count=inner.param_count
    )


def _call(s: Node) -> StatementInfo:
    c = Collector()
    c.expr({"FuncCall": s.get("funccall") or {}}, Level(None))
    return _info("call", c, detail="CallStmt")


def _named(kind: str, key: str | None = None) -> Callable[[Node], StatementInfo]:
    def build(s: Node) -> StatementInfo:
        return StatementInfo(kind, name=s.get(key) if key else None)  # type: ignore[arg-type]

    return build


def _fetch(s: Node) -> StatementInfo:
    return StatementInfo("move" if s.get("ismove") else "fetch", name=s.get("portalname"))


_SIMPLE: dict[str, Callable[[Node], StatementInfo]] = {
    "VariableSetStmt": _variable_set,
    "VariableShowStmt": _named("show", "name"),
    "TransactionStmt": _transaction,
    "LockStmt": _lock,
    "TruncateStmt": _truncate,
    "CopyStmt": _copy,
    "ExplainStmt": _explain,
    "PrepareStmt": _prepare,
    "ExecuteStmt": _execute,
    "DeclareCursorStmt": _declare,
    "DeallocateStmt": _named("deallocate", "name"),
    "FetchStmt": _fetch,
    "ClosePortalStmt": _named("close", "portalname"),
    "DiscardStmt": lambda s: StatementInfo(
        "discard", name=s.get("target", "DISCARD_ALL").removeprefix("DISCARD_").lower()
    ),
    "ListenStmt": _named("listen", "conditionname"),
    "UnlistenStmt": _named("unlisten", "conditionname"),
    "NotifyStmt": _named("notify", "conditionname"),
    "DoStmt": _named("do"),
    "CallStmt": _call,
    "ConstraintsSetStmt": lambda s: StatementInfo(
        "set", setting=SetInfo("constraints", "value", (), True), name="constraints"
    ),
}

_QUERY_KINDS = {
    "SelectStmt": "select",
    "InsertStmt": "insert",
    "UpdateStmt": "update",
    "DeleteStmt": "delete",
    "MergeStmt": "merge",
}

_ADMIN = frozenset(
    {
        "GrantStmt",
        "GrantRoleStmt",
        "AlterDefaultPrivilegesStmt",
        "AlterSystemStmt",
        "VacuumStmt",
        "ReindexStmt",
        "ClusterStmt",
        "CheckPointStmt",
        "LoadStmt",
    }
)

_DDL = frozenset(
    {
        "CommentStmt",
        "SecLabelStmt",
        "RenameStmt",
        "IndexStmt",
        "ViewStmt",
        "RuleStmt",
        "CompositeTypeStmt",
        "RefreshMatViewStmt",
        "ReassignOwnedStmt",
        "ImportForeignSchemaStmt",
        "DefineStmt",
    }
)
_DDL_PREFIXES = ("Create", "Alter", "Drop")

__all__ = ["AnalysisError", "SqlError", "analyze", "describe", "fingerprint"]
