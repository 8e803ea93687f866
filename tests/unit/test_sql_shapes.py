"""Statement shapes: a match must mean the same template, and only then."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pglast import parser

from proxy.sql.cache import AnalysisCache, text_key
from proxy.sql.shapes import shape_of

PGBENCH = "SELECT abalance FROM pgbench_accounts WHERE aid = 48213;"


def test_pgbench_texts_share_a_shape() -> None:
    shape = shape_of(PGBENCH)
    assert shape is not None
    for aid in ("1", "7", "99999999", "000", "123456789012345678901234567890"):
        assert shape.matches(f"SELECT abalance FROM pgbench_accounts WHERE aid = {aid};")


@pytest.mark.parametrize("other", [
    "SELECT abalance FROM pgbench_accounts WHERE aid = -5;",  # a sign is not the same bytes
    "SELECT abalance FROM pgbench_accounts WHERE aid = 5.5;",
    "SELECT abalance FROM pgbench_accounts WHERE aid = 5e3;",
    "SELECT abalance FROM pgbench_accounts WHERE aid = '5';",
    "SELECT abalance FROM pgbench_accounts WHERE aid = ;",
    "SELECT abalance FROM pgbench_accounts WHERE aid = 5; DROP TABLE x;",
    "SELECT abalance FROM pgbench_accounts WHERE aid = 5 OR true;",
    "SELECT abalance FROM pgbench_accounts WHERE aid = \u0661\u0662;",  # Arabic-Indic digits
    "SELECT abalance FROM pgbench_accounts WHERE aid = 5",  # no ;
    "SELECT bbalance FROM pgbench_accounts WHERE aid = 5;",
    "SELECT abalance FROM pgbench_accounts WHERE aid = 5;;",
    "SELECT abalance FROM pgbench_accounts WHERE aid = 0x10;",
])
def test_anything_else_does_not_match(other: str) -> None:
    shape = shape_of(PGBENCH)
    assert shape is not None and not shape.matches(other)


def test_several_constants() -> None:
    text = "UPDATE t SET a = a + 3, b = c WHERE id = 10 AND k IN (1,2)"
    shape = shape_of(text)
    assert shape is not None
    assert shape.matches("UPDATE t SET a = a + 44, b = c WHERE id = 7 AND k IN (9,100)")
    assert not shape.matches("UPDATE t SET a = a + 44, b = d WHERE id = 7 AND k IN (9,100)")
    assert not shape.matches("UPDATE t SET a = a + 44, b = c WHERE id = 7 AND k IN (9,1,0)")


@pytest.mark.parametrize("literal", ["'5105105105105100'", "E'x'", "U&'x'", "B'01'",
                                     "X'1F'", "1.5", "$$x$$"])
def test_texts_with_other_literals_get_no_shape(literal: str) -> None:
    """A shape keeps the text around its integers: a string or numeric literal (a
    protected column's plaintext) would stay in memory with it (proxy.sql.cache)."""
    assert shape_of(f"UPDATE t SET a = {literal} WHERE id = 10") is None


@pytest.mark.parametrize("text", [
    "SELECT 'no integers here'",
    "SELECT 0x1F",  # not a plain digit run
    "SELECT 1_000",
    "SELECT a FROM t WHERE b = 1.5",
    "SELECT 'é', 1",  # not ASCII
    "SELECT (",  # does not scan into anything useful: still no shape, no exception
    "SELECT 1'x'",  # followed by a character not known to end a number
])
def test_no_shape(text: str) -> None:
    assert shape_of(text) is None


_FILL = st.text(alphabet="0123456789eE._x-+ a$'();,", min_size=0, max_size=6)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from([
    PGBENCH,
    "SELECT 1",
    "SELECT a, 2 FROM t WHERE b = 3 AND c < 4",
    "INSERT INTO t (a, b) VALUES (1, 2), (3,4)",
    "SELECT x FROM t LIMIT 10 OFFSET 20",
    "SELECT a-1 FROM t WHERE b=-2",
]), st.lists(_FILL, min_size=4, max_size=4))
def test_a_match_always_has_the_same_template(text: str, fills: list[str]) -> None:
    """Soundness, fuzzed: put arbitrary strings (digits, letters, dots, signs, quotes)
    into the holes; whenever the shape matches, normalisation agrees with the original."""
    shape = shape_of(text)
    assert shape is not None
    pieces = [shape.head, *shape.middle, shape.tail]
    candidate = pieces[0]
    for i, piece in enumerate(pieces[1:]):
        candidate += fills[i % len(fills)] + piece
    if shape.matches(candidate):
        assert parser.normalize(candidate) == parser.normalize(text)


def test_cache_answers_new_integers_without_normalising(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from proxy.sql import cache as cache_mod

    calls: list[str] = []
    real = cache_mod.parser.normalize
    monkeypatch.setattr(cache_mod.parser, "normalize", lambda sql: calls.append(sql) or real(sql))
    cache = AnalysisCache()
    first = cache.analyze(PGBENCH)
    key = cache.last_key
    assert calls == [PGBENCH] and key.startswith("\0")
    for aid in range(1, 50):
        sql = f"SELECT abalance FROM pgbench_accounts WHERE aid = {aid};"
        assert cache.analyze(sql) is first and cache.last_key == key
    assert calls == [PGBENCH] and cache.misses == 1
    # Other bytes than integers: normalised and analysed as before.
    other = cache.analyze("SELECT abalance FROM pgbench_accounts WHERE aid = '5';")
    assert len(calls) == 2 and cache.last_key == key and other is first
    # set_config is never template-level, so never gets a shape either.
    cache.analyze("SELECT set_config('search_path', 'a', false), 1")
    calls.clear()
    cache.analyze("SELECT set_config('search_path', 'a', false), 2")
    assert calls and cache.last_key == text_key("SELECT set_config('search_path', 'a', false), 2")


def test_long_texts_get_no_shape() -> None:
    """Scanning a 2.7 MB IN list for a shape held the event loop for most of a second."""
    from proxy.sql.shapes import MAX_SHAPE_TEXT

    short = "SELECT * FROM t WHERE id IN (1, 2, 3)"
    assert shape_of(short) is not None
    long = "SELECT * FROM t WHERE id IN (" + ", ".join("7" for _ in range(MAX_SHAPE_TEXT)) + ")"
    assert shape_of(long) is None


def test_an_analysis_made_elsewhere_is_installed() -> None:
    """What the worker process computes for a big statement answers the session later."""
    from proxy.sql.cache import AnalysisCache

    cache = AnalysisCache(10)
    for sql in ("SELECT a FROM t WHERE id = 5", "SET search_path = x", "SELEC broken"):
        assert not cache.cached(sql)
        cache.install(sql, *AnalysisCache.prepare(sql))
        assert cache.cached(sql)
        misses = cache.misses
        try:
            cache.analyze(sql)
        except Exception as exc:
            assert type(exc).__name__ == "AnalysisError"
        assert cache.misses == misses  # no parse on the loop
