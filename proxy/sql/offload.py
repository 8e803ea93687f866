"""Analysis and planning of very large statements in a worker process.

A 2.7 MB `IN` list takes about two seconds to analyse, most of it in `json.loads` of
pglast's 22 MB parse tree: one C call that holds the GIL throughout, so a worker *thread*
would stall the event loop just the same. A worker process does not. The results come
back pickled (an Analysis, a RewritePlan: small, whatever the size of the text) and are
installed in the caches on the event loop (`AnalysisCache.install`, the plan cache), so
the session then handles the statement exactly as if it had been analysed inline.

The worker is started with `spawn` (a fresh interpreter that imports only what it
needs), once per proxy process, on first use: most deployments never send a statement
over the threshold.
"""

from __future__ import annotations

import copyreg
import multiprocessing
import types
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from proxy.sql.analyzer import AnalysisError
from proxy.sql.cache import AnalysisCache
from proxy.sql.info import Analysis


def _mapping(d: dict[Any, Any]) -> types.MappingProxyType[Any, Any]:
    return types.MappingProxyType(d)


def _reduce_mapping(mp: types.MappingProxyType[Any, Any]) -> tuple[Any, ...]:
    return _mapping, (dict(mp),)


# Analyses hold read-only mappings; pickle them as the dicts they wrap.
copyreg.pickle(types.MappingProxyType, _reduce_mapping)

_POOL: ProcessPoolExecutor | None = None


def _pool() -> ProcessPoolExecutor:
    """The worker process; started again when it died (an OOM kill, a crash), so one
    lost worker costs the statements it had, not every later one."""
    global _POOL
    if _POOL is None or getattr(_POOL, "_broken", False):
        _POOL = ProcessPoolExecutor(max_workers=1,
                                    mp_context=multiprocessing.get_context("spawn"))
    return _POOL


def _analyse(sql: str) -> tuple[str | None, Analysis | AnalysisError]:
    return AnalysisCache.prepare(sql)


def _plan(sql: str, schema: Any, path: tuple[str, ...],
          orders: dict[tuple[str, str], tuple[str, ...]]) -> Any:
    from proxy.sql.rewrite import plan_statement

    return plan_statement(sql, schema, path, column_order=lambda s, t: orders.get((s, t)))


def _submit(fn: Any, *args: Any) -> Future[Any]:
    global _POOL
    try:
        return _pool().submit(fn, *args)
    except BrokenProcessPool:  # it died since the last job and nobody noticed yet
        _POOL = None
        return _pool().submit(fn, *args)


def analyse(sql: str) -> Future[tuple[str | None, Analysis | AnalysisError]]:
    """`AnalysisCache.prepare(sql)`, in the worker process."""
    return _submit(_analyse, sql)


def plan(sql: str, schema: Any, path: tuple[str, ...],
         orders: dict[tuple[str, str], tuple[str, ...]]) -> Future[Any]:
    """`plan_statement`, in the worker process; ``orders`` is each table's columns."""
    return _submit(_plan, sql, schema, path, orders)
