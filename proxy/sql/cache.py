"""Bounded LRUs of analyses: a repeated statement costs one dict lookup.

Two levels. The first is keyed by the exact text (errors are cached too, so a client
hammering a broken statement does not re-parse it). The second is keyed by the text with
its constants replaced by `$n` (pglast `normalize`, the same normalisation as
pg_stat_statements): a workload that sends the same query with different literals (ORMs
without prepared statements, `pgbench -M simple`) then costs one normalise and a lookup,
not a parse and a tree walk. Only analyses that cannot depend on a constant go to the
second level: plain DML with no `set_config` calls. `SET`, `set_config('role', ...)`,
PREPARE/EXECUTE and friends are cached by exact text only.

A text answered by the second level is also remembered with its template key, so that the
same text again (a health check's `SELECT 1`, an app's fixed query in the simple protocol)
costs two lookups rather than a normalise each time. And the last few templates keep
the shape of the text they were built from (`proxy.sql.shapes`): a new text that differs
from it only in integer literals, as `pgbench -M simple` sends, is answered by a string
comparison instead of a normalise.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from pglast import parser

from proxy.sql.analyzer import AnalysisError, analyze
from proxy.sql.info import Analysis
from proxy.sql.shapes import Shape, shape_of

_TEMPLATE_KINDS = frozenset({"select", "insert", "update", "delete"})
MAX_SHAPES = 8  # tried in order on every miss of the exact-text levels: keep it short


def template_safe(analysis: Analysis) -> bool:
    """Whether any text with the same normalised form has the same analysis."""
    return all(
        s.kind in _TEMPLATE_KINDS
        and not s.config_calls
        and s.setting is None
        and not s.by_position  # ORDER BY 1 and ORDER BY 2 use different columns
        for s in analysis.statements
    )


class AnalysisCache:
    """``analyze`` with memory: returns the cached Analysis or re-raises the cached error."""

    __slots__ = ("_data", "_memo", "_seen", "_shapes", "_templates", "hits", "last_key",
                 "maxsize", "misses", "on_parse")

    def __init__(self, maxsize: int = 10_000) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        self.maxsize = maxsize
        self._data: OrderedDict[str, Analysis | AnalysisError] = OrderedDict()
        self._templates: OrderedDict[str, Analysis] = OrderedDict()
        # exact text -> its template key, for texts the template level answered
        self._seen: OrderedDict[str, str] = OrderedDict()
        # (shape, template key), most recently built or matched first
        self._shapes: list[tuple[Shape, str]] = []
        self.hits = 0
        self.misses = 0
        self.last_key = ""  # the cache key of the last analysis: exact text or template
        # (text object, key, result) of the last call: the gate and then the protector
        # ask about the same text object in a row, and for a new literal each lookup
        # would otherwise normalise it again.
        self._memo: tuple[str, str, Analysis | AnalysisError] | None = None
        self.on_parse: Callable[[float], None] | None = None
        """Called with the seconds of each real analysis (a miss of both levels), failed
        ones included; hits are not timed."""

    def key_for(self, sql: str) -> str:
        """Key under which a decision about `sql` may be cached: its template when the
        analysis cannot depend on constants, else the exact text. Analyses it on a miss."""
        self.analyze(sql)
        return self.last_key

    def analyze(self, sql: str) -> Analysis:
        """Like proxy.sql.analyze, cached by exact text; raises AnalysisError only."""
        memo = self._memo
        if memo is not None and memo[0] is sql:
            self.hits += 1
            self.last_key = memo[1]
            found = memo[2]
        else:
            try:
                found = self._analyze(sql)
            except AnalysisError as exc:
                found = exc
            self._memo = (sql, self.last_key, found)
        if found.__class__ is Analysis:
            return found  # type: ignore[return-value]
        raise AnalysisError(*found.args)

    def _analyze(self, sql: str) -> Analysis:
        data = self._data
        found = data.get(sql)
        if found.__class__ is Analysis:  # the hot path: one lookup, one reorder
            self.hits += 1
            data.move_to_end(sql)
            self.last_key = sql
            return found  # type: ignore[return-value]
        if found is None:
            key = self._seen.get(sql)
            if key is not None:
                cached = self._templates.get(key)
                if cached is not None:
                    self.hits += 1
                    self.last_key = key
                    return cached
            for i, (shape, key) in enumerate(self._shapes):
                if shape.matches(sql):
                    cached = self._templates.get(key)
                    if cached is None:
                        del self._shapes[i]  # its template was evicted
                        break
                    if i:
                        self._shapes.insert(0, self._shapes.pop(i))
                    self.hits += 1
                    self.last_key = key
                    return cached
            try:
                template = parser.normalize(sql)
            except Exception:
                template = None
            if template is not None and template != sql:
                key = "\0" + template  # NUL prefix: no real statement text collides
                cached = self._templates.get(key)
                if cached is not None:
                    self.hits += 1
                    self.last_key = key
                    self._remember(sql, key)
                    return cached
            self.misses += 1
            on_parse = self.on_parse
            started = time.perf_counter() if on_parse is not None else 0.0
            try:
                found = analyze(sql)
            except AnalysisError as exc:
                found = exc
            if on_parse is not None:
                on_parse(time.perf_counter() - started)
            if self._store(sql, template, found):
                return found  # type: ignore[return-value]
        else:
            self.hits += 1
            data.move_to_end(sql)
        self.last_key = sql
        if isinstance(found, AnalysisError):
            raise AnalysisError(*found.args)
        return found

    def _store(self, sql: str, template: str | None,
               found: Analysis | AnalysisError) -> bool:
        """Keep a fresh analysis; True when it went to the template level (`last_key`
        is then set), False when it went to the exact-text level."""
        if template is not None and template != sql and isinstance(found, Analysis) \
                and template_safe(found):
            # Keyed with a NUL prefix: no real statement text can collide with it.
            self._templates["\0" + template] = found
            if len(self._templates) > self.maxsize:
                self._templates.popitem(last=False)
            self.last_key = "\0" + template
            self._remember(sql, self.last_key)
            shape = shape_of(sql)
            if shape is not None:
                self._shapes.insert(0, (shape, self.last_key))
                del self._shapes[MAX_SHAPES:]
            return True
        data = self._data
        data[sql] = found
        if len(data) > self.maxsize:
            data.popitem(last=False)
        return False

    def cached(self, sql: str) -> bool:
        """Whether `sql` is answered by the exact-text levels (no parse, no normalise)."""
        return sql in self._data or self._seen.get(sql) in self._templates

    def install(self, sql: str, template: str | None,
                found: Analysis | AnalysisError) -> None:
        """Keep an analysis made elsewhere (`prepare`, on a worker thread)."""
        self._memo = None
        self._store(sql, template, found)

    @staticmethod
    def prepare(sql: str) -> tuple[str | None, Analysis | AnalysisError]:
        """What a miss computes, as a pure function of the text: safe on a worker thread
        (pglast's parser releases the GIL), its result handed to `install`."""
        try:
            template: str | None = parser.normalize(sql)
        except Exception:
            template = None
        try:
            return template, analyze(sql)
        except AnalysisError as exc:
            return template, exc

    def _remember(self, sql: str, key: str) -> None:
        seen = self._seen
        seen[sql] = key
        if len(seen) > self.maxsize:
            seen.popitem(last=False)

    def peek(self, key: str) -> Analysis | AnalysisError | None:
        """The cached entry under a key `last_key` returned, without counting a lookup."""
        if key.startswith("\0"):
            return self._templates.get(key)
        return self._data.get(key)

    def __len__(self) -> int:
        return len(self._data)

    def clear(self) -> None:
        self._memo = None
        self._data.clear()
        self._templates.clear()
        self._seen.clear()
        self._shapes.clear()
