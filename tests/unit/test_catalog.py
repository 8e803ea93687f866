"""When the catalog snapshot asks for a reload."""

from __future__ import annotations

import time

from proxy.catalog import DatabaseCatalog, Snapshot


def test_due_once_per_max_age_and_not_after_a_reload(monkeypatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    cat = DatabaseCatalog()
    cat.update(Snapshot())
    assert not cat.due(30)  # fresh
    now[0] += 31
    assert cat.due(30)  # old: the first statement asks ...
    assert not cat.due(30)  # ... and the others wait for its answer
    now[0] += 5
    cat.update(Snapshot())
    now[0] += 29
    assert not cat.due(30)
    now[0] += 2
    assert cat.due(30)
    now[0] += 31  # that reload never came (its session went away): ask again
    assert cat.due(30)
    assert cat.due(0) and cat.due(0)  # 0: after every statement
