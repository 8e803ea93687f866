"""No process-wide cache keeps a protected column's plaintext, and every statement cache
is bounded in bytes (issue 17, section 6).

The statements run through the real Gate (policy decisions, analysis cache, effects
memo), the real SessionProtector (rewrite plans, sealing with the column's real keys)
and the audit's statement facts, in process; then every object reachable from those
caches is walked and no string or bytes in it may contain the literal. The session's
own state (its protector, its policy state) is not a process cache and is left out.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from keys import cli_ops
from proxy import audit
from proxy.encryption import SessionProtector, protect_columns_for_keys
from proxy.gate import Gate, SessionPolicy
from proxy.observability import StatementFacts
from proxy.settings import parse_text
from proxy.sql import cache as cache_mod

PAN = "5105105105105100"
PROTECT = {"public.hy_cards.pan": {"type": "text", "search": "blind_index"},
           "public.hy_cards.amount": {"type": "numeric"}}
CONFIG = """\
keys:
  provider: local
  path: dev.kek
  keyring: keyring.json
protect:
  public.hy_cards.pan: {type: text, search: blind_index}
  public.hy_cards.amount: {type: numeric}
roles:
  app:
    tables:
      public.*: [select, insert, update, delete]
default: deny
limits:
  statement_cache_bytes: %d
"""


class FakeSession:
    """What Gate.decide and SessionProtector read of a session."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self.user = "app"
        self.database = "app"
        self.tracker = None
        self.server_params: dict[str, str] = {}
        self.id = 1
        self.policy_state = SessionPolicy(login_role="app", role="app", session_role="app",
                                          path=("public",), reset_path=("public",))


def _setup(tmp_path: Path, cache_bytes: int = 32 * 1024 * 1024,
           ) -> tuple[Gate, SessionProtector, StatementFacts]:
    cli_ops.init(tmp_path / "dev.kek", tmp_path / "keyring.json",
                 protect_columns_for_keys(PROTECT))
    path = tmp_path / "strongroom.yaml"
    path.write_text(CONFIG % cache_bytes)
    gate = Gate(parse_text(path.read_text(), source=str(path)))
    session = FakeSession(gate)
    enc = gate.encryption
    protector = SessionProtector(enc, enc.catalog_for("app"), session, "app")
    return gate, protector, StatementFacts(gate)


def _run(protector: SessionProtector, facts: StatementFacts, sql: str) -> Any:
    plan = protector.plan_query(sql)
    assert plan.refusal is None, plan.refusal
    facts.get(sql)
    audit.statement_fingerprint(sql)
    return plan


def _holders(roots: dict[str, Any], needle: str, skip: set[int]) -> list[str]:
    """Paths from `roots` to every str/bytes that contains `needle`."""
    want_b = needle.encode()
    found: list[str] = []
    seen: set[int] = set(skip)
    stack: list[tuple[str, Any]] = list(roots.items())
    atoms = (int, float, bool, type(None), complex)
    while stack:
        path, obj = stack.pop()
        if id(obj) in seen or isinstance(obj, atoms):
            continue
        seen.add(id(obj))
        if isinstance(obj, str):
            if needle in obj:
                found.append(path)
            continue
        if isinstance(obj, bytes | bytearray | memoryview):
            if want_b in bytes(obj):
                found.append(path)
            continue
        if isinstance(obj, type) or (callable(obj) and not hasattr(obj, "__dict__")):
            continue
        if type(obj).__name__ in ("module", "function", "builtin_function_or_method",
                                  "method", "weakref", "ReferenceType", "Lock", "RLock"):
            continue
        if isinstance(obj, dict):
            for k, v in list(obj.items()):
                stack.append((f"{path}[key]", k))
                stack.append((f"{path}[{str(k)[:40]!r}]", v))
            continue
        if isinstance(obj, list | tuple | set | frozenset):
            for i, v in enumerate(list(obj)):
                stack.append((f"{path}[{i}]", v))
            continue
        attrs: dict[str, Any] = {}
        if hasattr(obj, "__dict__"):
            attrs.update(vars(obj))
        for klass in type(obj).__mro__:
            for name in getattr(klass, "__slots__", ()):
                if hasattr(obj, name):
                    attrs[name] = getattr(obj, name)
        for name, v in attrs.items():
            stack.append((f"{path}.{name}", v))
    return found


@pytest.mark.parametrize("statement", [
    f"INSERT INTO hy_cards (id, pan) VALUES (1, '{PAN}')",
    f"INSERT INTO hy_cards (id, pan, amount) VALUES (2, E'{PAN}', {PAN}.5)",
    f"SELECT id FROM hy_cards WHERE pan = '{PAN}'",
    f"UPDATE hy_cards SET pan = '{PAN}' WHERE id = 7",
])
def test_no_cache_keeps_a_protected_literal(tmp_path: Path, statement: str) -> None:
    gate, protector, facts = _setup(tmp_path)
    for _ in range(2):  # the second time, from the caches
        plan = _run(protector, facts, statement)
        assert plan.touches_protected and PAN.encode() not in (plan.sql or b"")
    # The memos of the last text (one statement object, kept for the lookups of that
    # statement) are replaced by the next statement, as in any session.
    _run(protector, facts, "SELECT 1")
    roots = {"gate": gate, "facts": facts, "audit._FP_CACHE": audit._FP_CACHE,
             "cache module": vars(cache_mod),
             "metrics module": vars(sys.modules["proxy.metrics"])}
    skip = {id(protector), id(protector.session)}
    assert _holders(roots, PAN, skip) == []


def test_the_walk_finds_what_it_looks_for(tmp_path: Path) -> None:
    """The check above can fail: an unprotected literal in an exact-text analysis is found
    through the same walk when a cache keeps the text (here, the session's own memo)."""
    gate, protector, facts = _setup(tmp_path)
    _run(protector, facts, f"SELECT '{PAN}' AS x")
    assert _holders({"gate": gate}, PAN, set())  # the last-text memo holds it


def test_statement_caches_stay_within_their_byte_budget(tmp_path: Path) -> None:
    """100 distinct 1 MiB statements: each cache's accounted bytes stay under its budget
    (here 8 MiB), and the protector still plans every one."""
    budget = 8 * 1024 * 1024
    gate, protector, facts = _setup(tmp_path, cache_bytes=budget)
    filler = "x" * (1024 * 1024)
    for i in range(100):
        if i % 2:  # a literal: a small template, but the text is 1 MiB
            sql = f"SELECT id FROM hy_cards WHERE note = '{filler}' AND id = {i} /* {i} */"
        else:  # a comment: the template is 1 MiB too
            sql = f"SELECT id FROM hy_cards WHERE id = {i} /* {i} {filler} */"
        _run(protector, facts, sql)
    levels = dict(gate.analyses.levels())
    for (db, reset), pc in gate._caches.items():
        levels[f"policy {db} {reset}"] = pc._data
    levels["plans"] = gate.encryption.plan_cache
    levels["facts"] = facts._memo
    assert len(levels) >= 6
    for name, level in levels.items():
        assert level.max_bytes == budget, name
        assert 0 <= level.nbytes <= budget, (name, level.nbytes)
        assert level.nbytes == sum(level.sizes.values()), name
    assert levels["templates"].nbytes > budget // 2  # the big templates were counted
    assert sum(len(v or "") for v in audit._FP_CACHE.values()) <= \
        audit._FP_CACHE_SIZE * audit._FP_CACHE_MAX_TEXT


def test_a_large_statements_plan_with_literals_is_used_once_then_dropped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A plan made in the worker process for a large statement (`heavy_plan`) is used
    when the statement comes back, not made again on the event loop; if it holds a
    literal it is dropped then, not kept."""
    from proxy import encryption
    from proxy.sql.cache import text_key
    from proxy.sql.rewrite import plan_statement

    _gate, protector, facts = _setup(tmp_path)
    enc = protector.enc
    sql = f"INSERT INTO hy_cards (id, pan) VALUES (1, '{PAN}')"
    key = (text_key(sql), protector.search_path(),
           encryption.snapshot_key(protector.catalog.snapshot))
    rplan = plan_statement(sql, enc.views_of(None)[0], protector.search_path())
    encryption.keep_plan(enc.plan_cache, key, rplan, len(sql), keep_big=True)

    def no_planning(*a: Any, **k: Any) -> Any:
        raise AssertionError("planned again on the event loop")

    monkeypatch.setattr(encryption, "plan_statement", no_planning)
    plan = _run(protector, facts, sql)
    assert plan.touches_protected and PAN.encode() not in (plan.sql or b"")
    assert enc.plan_cache.big is None and len(enc.plan_cache) == 0


def test_a_plan_is_never_served_for_another_snapshot_at_a_reused_address(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Plans are cached per catalog snapshot. Keyed by `id(snapshot)`, a snapshot freed
    after the view cache let it go can have its address reused by the next one, which
    would then be served plans made for another catalog (one without a view the new one
    traces to a protected column: its values would go unsealed). Whether CPython reuses
    the address at once depends on the allocator, so the test makes every snapshot's
    `id()` the same, as a reused address would; the key must not depend on it."""
    import builtins

    from proxy import encryption
    from proxy.catalog import Snapshot

    monkeypatch.setattr(encryption, "id", lambda o: 1 if isinstance(o, Snapshot)
                        else builtins.id(o), raising=False)
    _gate, protector, _facts = _setup(tmp_path)
    cache = protector.enc.plan_cache
    sql = "SELECT id FROM hy_cards WHERE id = $1"
    protector.catalog.update(Snapshot())
    protector.plan_query(sql)
    entries = len(cache)
    protector.catalog.update(Snapshot())  # another catalog at "the same address"
    protector.plan_query(sql)
    assert len(cache) == entries + 1  # planned for the new snapshot, not served the old
