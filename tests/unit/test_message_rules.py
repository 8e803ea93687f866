"""Every frontend message type byte (all 256) has one rule, and both session paths
follow the one table (`messages.FRONTEND_RULES`): the relay's action table and the
tracking loop's accepted set are built from it. A type added to the protocol without a
rule, or a CHECKED type without a gate action, fails here (the integration side is
tests/integration/test_protocol_function_call.py, through real sessions)."""

from __future__ import annotations

from proxy import session as s
from proxy.protocol import messages as m
from proxy.tracking import CLIENT_HANDLERS, Tracker

# PostgreSQL v3 frontend messages (protocol.sgml), with the rule each must have once the
# session is READY.
V3_FRONTEND = {
    "B": m.CHECKED,  # Bind
    "C": m.HARMLESS,  # Close
    "d": m.HARMLESS,  # CopyData
    "c": m.HARMLESS,  # CopyDone
    "f": m.HARMLESS,  # CopyFail
    "D": m.HARMLESS,  # Describe
    "E": m.HARMLESS,  # Execute
    "H": m.HARMLESS,  # Flush
    "F": m.CHECKED,  # FunctionCall
    "P": m.CHECKED,  # Parse
    "Q": m.CHECKED,  # Query
    "S": m.HARMLESS,  # Sync
    "X": m.HARMLESS,  # Terminate
    "p": m.REFUSED,  # PasswordMessage / SASLInitialResponse / SASLResponse: auth only
}
_GATE_ACTIONS = {s._A_QUERY, s._A_PARSE, s._A_BIND, s._A_FUNC}


def test_the_table_is_the_protocol() -> None:
    assert {chr(t): r for t, r in m.FRONTEND_RULES.items()} == V3_FRONTEND
    assert set(m.FRONTEND_TYPES) == set(m.FRONTEND_RULES)


def test_every_type_byte_has_one_rule_in_both_paths() -> None:
    for kind in range(256):
        rule = m.frontend_rule(kind)
        expected = V3_FRONTEND.get(chr(kind), m.REFUSED)
        assert rule == expected, kind
        act = s._CLIENT_ACTS[kind]
        if rule == m.CHECKED:
            assert act in _GATE_ACTIONS, kind  # the relay asks the gate
            assert kind in s._ACCEPTED, kind  # tracking: the tracker (and the gate)
        elif rule == m.HARMLESS:
            # forwarded as is (Execute: after applying its portal's session effects)
            assert act in (0, s._A_SYNC, s._A_TERMINATE, s._A_EXECUTE), kind
            assert kind in s._ACCEPTED, kind
        else:
            assert act == s._A_INVALID, kind  # the relay refuses it (08P01)
            assert kind not in s._ACCEPTED, kind  # so does the tracking loop


def test_checked_types_reach_their_checker_in_tracking_mode() -> None:
    """Query and Parse are planned (policy through `plan_query`), Bind binds the
    statement the plan refused; FunctionCall is queued and the session asks the gate."""
    assert CLIENT_HANDLERS[ord("Q")] is Tracker._client_query
    assert CLIENT_HANDLERS[ord("P")] is Tracker._client_parse
    assert CLIENT_HANDLERS[ord("B")] is Tracker._client_bind
    assert CLIENT_HANDLERS[ord("F")] is Tracker._client_func
