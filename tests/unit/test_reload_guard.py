"""Which `protect:` changes of a reload would strand stored envelopes (proxy.reload_guard)."""

from __future__ import annotations

from proxy.reload_guard import dropped_protection

OLD = {"public.t.a": {"type": "text"}, "public.t.b": {"mode": "deterministic"},
       "public.t.c": {"type": "text", "join_group": "g"}}


def test_nothing_dropped_when_entries_stay_or_are_added() -> None:
    assert dropped_protection(OLD, OLD) == []
    assert dropped_protection(OLD, {**OLD, "public.t.d": {}}) == []
    assert dropped_protection({}, OLD) == []
    # `type` defaults to text: spelling the default out changes nothing
    assert dropped_protection(OLD, {**OLD, "public.t.b": {"mode": "deterministic",
                                                          "type": "text"}}) == []


def test_removed_entries_and_changes_of_what_envelopes_bind_to() -> None:
    new = {"public.t.a": {"type": "date"}, "public.t.c": {"type": "text"}}
    assert dropped_protection(OLD, new) == [
        ("public.t.a", "its type changed: text -> date"),
        ("public.t.b", "removed from protect:"),
        ("public.t.c", "its join_group changed: g -> None"),
    ]
    assert [n for n, _ in dropped_protection(OLD, {})] == sorted(OLD)
