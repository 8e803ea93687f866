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

No statement text is kept (encryption.py's rule: plaintext exists only on its way into a
cipher). The exact-text levels are keyed by `text_key`, a keyed digest of the text under
a random key of this process, not by the text: a literal of a protected column (a PAN in
an INSERT) would otherwise stay in memory as long as the entry, and an unkeyed hash of
a low-entropy value can be brute-forced from a memory dump. The template level is keyed
by the normalised text, which has no constants; shapes are only kept of texts whose
constants are all integers (the holes), so they hold no string or numeric literal.

Every level is bounded in bytes as well as in entries (`ByteLRU`, the budget is
`limits.statement_cache_bytes`): sizes are estimates (the text a key stands for, plus a
fixed overhead per entry), and an entry above a quarter of the budget is not cached
(except in a one-entry slot for the statement just analysed in the worker process, which
the session then reads back).
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Callable
from hashlib import blake2b
from typing import Any

from pglast import parser

from proxy.sql.analyzer import AnalysisError, analyze
from proxy.sql.info import Analysis
from proxy.sql.shapes import Shape, shape_of

DEFAULT_CACHE_BYTES = 32 * 1024 * 1024  # `limits.statement_cache_bytes`, per cache
ENTRY_OVERHEAD = 256  # bytes counted per entry besides its text: dict slot, key, value
_TEXT_KEY = os.urandom(32)  # per process: digests are comparable only within it
_last_key: tuple[str, bytes] = ("", b"")


def text_key(sql: str) -> bytes:
    """A keyed digest (BLAKE2b-128 under a per-process random key) standing for `sql` in
    a cache: equal texts get equal keys, and nothing of the text can be recovered or
    guessed from the key without the process's key. The last text's key is memoised by
    identity: the gate, the policy cache and the protector ask about one text object in
    a row."""
    last = _last_key
    if last[0] is sql:
        return last[1]
    key = blake2b(sql.encode("utf-8", "surrogateescape"), key=_TEXT_KEY,
                  digest_size=16).digest()
    globals()["_last_key"] = (sql, key)
    return key


class ByteLRU(OrderedDict[Any, Any]):
    """An LRU bounded by entries and by (estimated) bytes.

    Reads are plain OrderedDict reads (`get`, `move_to_end`: no overhead on a hit);
    every write goes through `put`, which accounts the entry's size and evicts the
    least recently used entries until both bounds hold. An entry larger than
    `max_entry` is not kept, except in `big`, one slot for the statement the worker
    process just analysed (read back with `lookup`), so a large statement is never
    analysed again on the event loop right after it was analysed off it."""

    def __init__(self, max_entries: int, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        super().__init__()
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.sizes: dict[Any, int] = {}
        self.big: tuple[Any, Any] | None = None

    @property
    def max_entry(self) -> int:
        return self.max_bytes // 4

    def put(self, key: Any, value: Any, size: int, keep_big: bool = False) -> bool:
        """Keep `value` under `key`, counted as `size` + ENTRY_OVERHEAD bytes; False
        when it is too large to keep (then only `keep_big` keeps it, in `big`)."""
        size += ENTRY_OVERHEAD
        old = self.sizes.pop(key, None)
        if old is not None:
            self.nbytes -= old
            super().pop(key, None)
        if size > self.max_entry:
            if keep_big:
                self.big = (key, value)
            return False
        self[key] = value
        self.sizes[key] = size
        self.nbytes += size
        while len(self) > self.max_entries or self.nbytes > self.max_bytes:
            k, _ = self.popitem(last=False)
            self.nbytes -= self.sizes.pop(k, 0)
        return True

    def lookup(self, key: Any) -> Any:
        """The entry under `key` (None if none), the `big` slot included; no reorder."""
        found = self.get(key)
        if found is None and self.big is not None and self.big[0] == key:
            return self.big[1]
        return found

    def resize(self, max_bytes: int) -> None:
        """A new byte budget (a reload); entries beyond it are evicted now."""
        self.max_bytes = max_bytes
        while self and self.nbytes > max_bytes:
            k, _ = self.popitem(last=False)
            self.nbytes -= self.sizes.pop(k, 0)

    def clear(self) -> None:
        super().clear()
        self.sizes.clear()
        self.nbytes = 0
        self.big = None


def analysis_size(found: Any) -> int:
    """Estimated bytes of an Analysis (or AnalysisError) beyond ENTRY_OVERHEAD: its size
    follows its statements and the relations and columns they name, not the text."""
    stmts = getattr(found, "statements", None)
    if stmts is None:
        return sum(len(str(a)) for a in getattr(found, "args", ()))
    return 512 * len(stmts) + sum(
        64 * (len(s.accesses) + len(s.columns_used) + len(s.columns_read)
              + len(s.columns_written) + len(s.functions)) for s in stmts)


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

    def __init__(self, maxsize: int = 10_000, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        self.maxsize = maxsize
        # text_key(text) -> analysis or error
        self._data = ByteLRU(maxsize, max_bytes)
        # "\0" + normalised text -> analysis
        self._templates = ByteLRU(maxsize, max_bytes)
        # text_key(text) -> its template key, for texts the template level answered
        self._seen = ByteLRU(maxsize, max_bytes)
        # (shape, template key), most recently built or matched first
        self._shapes: list[tuple[Shape, str]] = []
        self.hits = 0
        self.misses = 0
        # The cache key of the last analysis: its template ("\0" + normalised text) or
        # the text's `text_key`.
        self.last_key: str | bytes = ""
        # (text object, key, result) of the last call: the gate and then the protector
        # ask about the same text object in a row, and for a new literal each lookup
        # would otherwise normalise it again. (It holds the last text until the next.)
        self._memo: tuple[str, str | bytes, Analysis | AnalysisError] | None = None
        self.on_parse: Callable[[float], None] | None = None
        """Called with the seconds of each real analysis (a miss of both levels), failed
        ones included; hits are not timed."""

    def resize(self, max_bytes: int) -> None:
        """The byte budget of each level (`limits.statement_cache_bytes`)."""
        for level in (self._data, self._templates, self._seen):
            level.resize(max_bytes)

    def levels(self) -> dict[str, ByteLRU]:
        """The levels by name, for their byte accounting (tests, metrics)."""
        return {"exact": self._data, "templates": self._templates, "seen": self._seen}

    def key_for(self, sql: str) -> str | bytes:
        """Key under which a decision about `sql` may be cached: its template when the
        analysis cannot depend on constants, else the text's `text_key`. Analyses it on
        a miss."""
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
        tkey = text_key(sql)
        found = data.get(tkey)
        if found.__class__ is Analysis:  # the hot path: one lookup, one reorder
            self.hits += 1
            data.move_to_end(tkey)
            self.last_key = tkey
            return found  # type: ignore[return-value]
        if found is None:
            found = data.lookup(tkey)  # the worker process's last large statement
        if found is None:
            key = self._seen.lookup(tkey)
            if key is not None:
                cached = self._templates.lookup(key)
                if cached is not None:
                    self.hits += 1
                    self.last_key = key
                    return cached  # type: ignore[no-any-return]
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
                    return cached  # type: ignore[no-any-return]
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
                    self._remember(tkey, key)
                    return cached  # type: ignore[no-any-return]
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
            if tkey in data:
                data.move_to_end(tkey)
        self.last_key = tkey
        if isinstance(found, AnalysisError):
            raise AnalysisError(*found.args)
        return found  # type: ignore[return-value]

    def _store(self, sql: str, template: str | None,
               found: Analysis | AnalysisError, keep_big: bool = False) -> bool:
        """Keep a fresh analysis; True when it went to the template level (`last_key`
        is then set), False when it went to the exact-text level."""
        if template is not None and template != sql and isinstance(found, Analysis) \
                and template_safe(found):
            # Keyed with a NUL prefix: no real statement text can collide with it.
            key = "\0" + template
            self._templates.put(key, found, len(key) + analysis_size(found), keep_big)
            self.last_key = key
            self._remember(text_key(sql), key, keep_big)
            shape = shape_of(sql)
            if shape is not None:
                self._shapes.insert(0, (shape, key))
                del self._shapes[MAX_SHAPES:]
            return True
        self._data.put(text_key(sql), found, 16 + analysis_size(found), keep_big)
        return False

    def cached(self, sql: str) -> bool:
        """Whether `sql` is answered by the exact-text levels (no parse, no normalise)."""
        tkey = text_key(sql)
        if self._data.lookup(tkey) is not None:
            return True
        key = self._seen.lookup(tkey)
        return key is not None and self._templates.lookup(key) is not None

    def install(self, sql: str, template: str | None,
                found: Analysis | AnalysisError) -> None:
        """Keep an analysis made elsewhere (`prepare`, on a worker thread): one too large
        for the budget is kept in the levels' one-entry `big` slot, for the session that
        waits for it."""
        self._memo = None
        self._store(sql, template, found, keep_big=True)

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

    def _remember(self, tkey: bytes, key: str, keep_big: bool = False) -> None:
        # Counted as the template it points to: a key no longer in the template level
        # keeps that string alive.
        self._seen.put(tkey, key, 16 + len(key), keep_big)

    def peek(self, key: str | bytes) -> Analysis | AnalysisError | None:
        """The cached entry under a key `last_key` returned, without counting a lookup."""
        if isinstance(key, str):
            return self._templates.lookup(key)  # type: ignore[no-any-return]
        return self._data.lookup(key)  # type: ignore[no-any-return]

    def __len__(self) -> int:
        return len(self._data)

    def clear(self) -> None:
        self._memo = None
        self._data.clear()
        self._templates.clear()
        self._seen.clear()
        self._shapes.clear()
