"""Bounded LRU of analyses keyed by the exact query text: a repeat costs one dict lookup.

Errors are cached too, so a client hammering a broken statement does not re-parse it.
Keyed by text rather than fingerprint because the fingerprint ignores constants, and the
analysis (set_config arguments, SET values) depends on them.
"""

from __future__ import annotations

from collections import OrderedDict

from proxy.sql.analyzer import AnalysisError, analyze
from proxy.sql.info import Analysis


class AnalysisCache:
    """``analyze`` with memory: returns the cached Analysis or re-raises the cached error."""

    __slots__ = ("_data", "hits", "maxsize", "misses")

    def __init__(self, maxsize: int = 10_000) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        self.maxsize = maxsize
        self._data: OrderedDict[str, Analysis | AnalysisError] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def analyze(self, sql: str) -> Analysis:
        """Like proxy.sql.analyze, cached by exact text; raises AnalysisError only."""
        data = self._data
        found = data.get(sql)
        if found.__class__ is Analysis:  # the hot path: one lookup, one reorder
            self.hits += 1
            data.move_to_end(sql)
            return found  # type: ignore[return-value]
        if found is None:
            self.misses += 1
            try:
                found = analyze(sql)
            except AnalysisError as exc:
                found = exc
            data[sql] = found
            if len(data) > self.maxsize:
                data.popitem(last=False)
        else:
            self.hits += 1
            data.move_to_end(sql)
        if isinstance(found, AnalysisError):
            raise AnalysisError(*found.args)
        return found

    def __len__(self) -> int:
        return len(self._data)

    def clear(self) -> None:
        self._data.clear()
