"""The tracking mode's fast paths against the reference they stand in for.

* `rows.bind_head` (the Bind of a statement with nothing protected: only its head is
  decoded) accepts and refuses exactly the messages `rows.decode_bind` does, with the
  same portal, statement name and result formats, and the same ProtocolViolation text;
* the tracker's Bind takes the head-only path only for a statement with nothing to do to
  its parameters: protected, derived or rechecked parameters and refusals still go the
  full way (a parameter's plaintext is never forwarded);
* the session's inline header walk in tracking mode sends the server what the tracker
  makes of each message, in order, however the client's stream is cut into reads, and
  refuses bad lengths, bad types and malformed messages as the Framer-based loop did.
"""

from __future__ import annotations

import random
import struct
from typing import Any

import pytest

from proxy.protocol import rows
from proxy.protocol.messages import ProtocolViolation
from proxy.session import State
from proxy.tracking import AS_SENT, ClientRefusal, RecheckSpec, StatementPlan, Tracker
from tests.unit.test_session_relay import cuts, msg, ready_session


def _bind(portal: bytes, stmt: bytes, pformats: list[int], params: list[bytes | None],
          rformats: list[int]) -> bytes:
    return rows.encode_bind(rows.Bind(portal, stmt, pformats, params, rformats))


def _outcome(fn: Any, arg: bytes) -> Any:
    try:
        return ("ok", fn(arg))
    except ProtocolViolation as exc:
        return ("violation", str(exc))


def _reference(message: bytes) -> Any:
    b = rows.decode_bind(message[5:])
    return b.portal, b.statement, b.result_formats


def test_bind_head_matches_decode_bind_on_valid_and_malformed_messages() -> None:
    rng = random.Random(7)
    samples = [
        _bind(b"", b"", [], [], []),
        _bind(b"", b"P0_1", [], [b"12345"], []),
        _bind(b"p", b"s", [1], [b"\0\0\0\1", None, b""], [1]),
        _bind(b"", b"s", [0, 1, 0], [b"a", b"bb", None], [0, 1, 1, 0]),
    ]
    for _ in range(200):
        n = rng.randint(0, 5)
        params = [None if rng.random() < 0.2 else rng.randbytes(rng.randint(0, 9))
                  for _ in range(n)]
        samples.append(_bind(rng.randbytes(rng.randint(0, 3)).replace(b"\0", b"x"),
                             rng.choice([b"", b"s1"]),
                             [rng.randint(0, 1) for _ in range(rng.choice([0, 1, n]))],
                             params, [rng.randint(0, 1) for _ in range(rng.randint(0, 4))]))
    cases: list[bytes] = []
    for good in samples:
        cases.append(good)
        # cut short anywhere (the length word fixed up: a whole, malformed message)
        for cut in range(5, len(good)):
            body = good[5:cut]
            cases.append(b"B" + struct.pack("!i", len(body) + 4) + body)
        # counts and lengths gone wrong
        for _ in range(20):
            raw = bytearray(good)
            i = rng.randrange(5, len(raw))
            raw[i] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)])
            cases.append(bytes(raw))
        cases.append(good + b"trailing")
    violations = 0
    for case in cases:
        want = _outcome(_reference, case)
        assert _outcome(rows.bind_head, case) == want, case
        violations += want[0] == "violation"
    assert violations > 100  # the malformed cases really are exercised
    # The parameter walk is not skipped: a value overrunning the message is refused.
    over = b"B" + struct.pack("!i", 4 + 13) + b"\0\0\0\0\0\1\0\0\0\x10ab\0\0"
    assert _outcome(rows.bind_head, over) == (
        "violation", "invalid Bind message: parameter overruns message")


class Sealing:
    """A protected column that 'seals' a value visibly (never returns it as sent)."""

    logical_oid = 25
    typlen = -1
    view = "plaintext"

    def encrypt_param(self, value: bytes, fmt: int, oid: int = 0) -> bytes:
        return b"SEALED(" + value + b")"

    def blind_index_param(self, value: bytes, fmt: int, oid: int = 0) -> bytes:
        return b"BIDX(" + value + b")"

    def equality_key(self, value: bytes, fmt: int, oid: int = 0) -> bytes:
        return b"KEY(" + value + b")"

    def reveal(self, envelope: bytes, fmt: int) -> bytes | None:
        return envelope

    def opened_key(self, envelope: bytes) -> bytes:
        return envelope


class Protector:
    """Plans by statement text: the texts in `plans`, else `AS_SENT`."""

    def __init__(self, plans: dict[str, StatementPlan] | None = None) -> None:
        self.plans = plans or {}
        self.gen = (object(), ("public",), 0)

    def plan_query(self, sql: str) -> StatementPlan:
        return self.plans.get(sql, AS_SENT)

    def column_at(self, table_oid: int, attnum: int) -> None:
        return None

    def generation(self) -> tuple[object, tuple[str, ...], int]:
        return self.gen

    def after_statement(self) -> bytes:
        return b""


def _parse(name: bytes, sql: bytes) -> bytes:
    return rows.encode_parse(name, sql, [])


COL = Sealing()


@pytest.mark.parametrize("plan", [
    StatementPlan(sql=b"INSERT x", params={0: ("encrypt", COL)}, touches_protected=True),
    StatementPlan(sql=b"INSERT x", derived=[(1, 0, "blind_index", COL)],
                  touches_protected=True),
], ids=["params", "derived"])
def test_bind_with_protected_parameters_is_sealed(plan: StatementPlan) -> None:
    tracker = Tracker(Protector({"INSERT x": plan}))
    tracker.client(0x50, _parse(b"s", b"INSERT x"))
    out = tracker.client(0x42, _bind(b"", b"s", [], [b"4111"], []))
    assert out is not None
    sent = rows.decode_bind(out[5:])
    if plan.params:
        assert sent.params == [b"SEALED(4111)"]
    else:  # the proxy's own blind-index parameter appended
        assert sent.params == [b"4111", b"BIDX(4111)"]


def test_bind_of_a_refused_statement_drops_its_values() -> None:
    plan = StatementPlan(sql=b"SELECT x", touches_protected=True,
                         refusal=ClientRefusal("42501", "no"))
    tracker = Tracker(Protector({"SELECT x": plan}))
    tracker.client(0x50, _parse(b"s", b"SELECT x"))
    out = tracker.client(0x42, _bind(b"", b"s", [], [b"4111"], []))
    assert out is not None and b"4111" not in out


def test_bind_with_rechecks_takes_the_keys_of_its_values() -> None:
    plan = StatementPlan(sql=b"SELECT y", touches_protected=True,
                         rechecks={0: [RecheckSpec(COL, frozenset(), (1,))]})
    tracker = Tracker(Protector({"SELECT y": plan}))
    tracker.client(0x50, _parse(b"s", b"SELECT y"))
    out = tracker.client(0x42, _bind(b"p", b"s", [], [b"4111"], [0, 0]))
    portal = tracker.portals[b"p"]
    assert portal.checks == [(COL, frozenset({b"KEY(4111)"}))]
    assert out is not None and portal.result_formats == [0, 0, 1]  # hidden column too


def test_bind_of_a_plain_statement_is_forwarded_with_its_portal_known() -> None:
    tracker = Tracker(Protector())
    tracker.client(0x50, _parse(b"s", b"SELECT 1"))
    assert tracker.client(0x42, _bind(b"p", b"s", [1], [b"x"], [1, 0])) is None
    portal = tracker.portals[b"p"]
    assert portal.statement is tracker.statements[b"s"]
    assert portal.result_formats == [1, 0]
    assert tracker.client(0x42, _bind(b"q", b"unknown", [], [], [])) is None
    assert tracker.portals[b"q"].statement is None
    with pytest.raises(ProtocolViolation, match="parameter overruns"):
        tracker.client(0x42, b"B" + struct.pack("!i", 17) + b"\0s\0\0\0\0\1\0\0\0\x10ab\0\0")


# ---------------------------------------------------------------- the session's walk

SECRET_PLAN = StatementPlan(sql=b"SELECT sealed", touches_protected=True)
SEALED_INSERT = StatementPlan(sql=b"INSERT y", params={0: ("encrypt", COL)},
                              touches_protected=True)
PLANS = {"SELECT secret": SECRET_PLAN, "INSERT y": SEALED_INSERT}

CLIENT = b"".join([
    msg(b"Q", b"SELECT 1\0"),
    msg(b"Q", b"SELECT secret\0"),  # rewritten
    _parse(b"", b"SELECT $1::int"),
    _bind(b"", b"", [], [b"1"], []),
    msg(b"D", b"P\0"),
    msg(b"E", b"\0\0\0\0\0"),
    msg(b"S", b""),
    _parse(b"ins", b"INSERT y"),  # Describe appended
    _bind(b"", b"ins", [], [b"4111"], []),  # sealed
    msg(b"E", b"\0\0\0\0\0"),
    msg(b"H", b""),
    msg(b"C", b"Sins\0"),
    msg(b"S", b""),
    msg(b"Q", b"SELECT " + b"x" * 3000 + b"\0"),
])


def _messages(data: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        stop = pos + 1 + int.from_bytes(data[pos + 1 : pos + 5], "big")
        out.append(data[pos:stop])
        pos = stop
    return out


def _expected(stream: bytes) -> bytes:
    """One message at a time through a tracker of its own: the reference."""
    tracker = Tracker(Protector(PLANS))
    out = []
    for m in _messages(stream):
        r = tracker.client(m[0], m)
        out.append(m if r is None else r)
    return b"".join(out)


def test_tracking_walk_sends_what_the_tracker_makes_for_every_cut() -> None:
    want = _expected(CLIENT)
    assert b"SELECT sealed" in want and b"SEALED(4111)" in want and b"4111\0" not in want
    assert want != CLIENT
    for reads in cuts(CLIENT, random.Random(3), 40):
        s, client, upstream = ready_session()
        s.tracker = Tracker(Protector(PLANS))
        for chunk in reads:
            s.data_received(chunk)
        assert upstream.data == want
        assert s.outstanding == 5
        assert s._cframer.pending == 0
        assert s.state is State.READY and client.writes == []
        assert [e.kind for e in s.tracker.queue] == [
            e.kind for e in _queue_of(CLIENT)]


def _queue_of(stream: bytes) -> list[Any]:
    tracker = Tracker(Protector(PLANS))
    for m in _messages(stream):
        tracker.client(m[0], m)
    return list(tracker.queue)


def test_unreplaced_read_is_written_as_is() -> None:
    s, _client, upstream = ready_session()
    s.tracker = Tracker(Protector())
    chunk = _bind(b"", b"", [], [b"1"], []) + msg(b"E", b"\0\0\0\0\0") + msg(b"S", b"")
    s.data_received(chunk)
    assert upstream.writes[0] is chunk  # no copy
    s.data_received(chunk + b"Q\0")
    assert upstream.writes == [chunk, chunk]
    assert s._cframer.pending == 2


@pytest.mark.parametrize("split", [False, True])
def test_tracking_bad_length_after_whole_messages(split: bool) -> None:
    s, client, upstream = ready_session()
    s.tracker = Tracker(Protector(PLANS))
    good = msg(b"Q", b"SELECT secret\0") + msg(b"H", b"")
    bad = b"Q\0\0\0\1"
    if split:
        s.data_received(good + bad[:3])
        s.data_received(bad[3:])
    else:
        s.data_received(good + bad)
    assert upstream.data == _expected(good)
    assert s.state is State.CLOSED
    assert b"08P01" in client.data and b"invalid message length 1" in client.data


def test_tracking_terminate_does_not_hide_a_bad_length_after_it() -> None:
    """The Framer found a bad length before any message was handled: a Terminate
    before it (with a request outstanding) still ends in 08P01."""
    s, client, upstream = ready_session()
    s.tracker = Tracker(Protector())
    q, x = msg(b"Q", b"SELECT 1\0"), msg(b"X", b"")
    s.data_received(q + x + b"Q\0\0\0\1")
    assert upstream.data == q + x
    assert b"invalid message length 1" in client.data
    assert s.state is State.CLOSED


def test_tracking_terminate_forwards_what_came_before() -> None:
    s, _client, upstream = ready_session()
    s.tracker = Tracker(Protector(PLANS))
    q, x = msg(b"Q", b"SELECT secret\0"), msg(b"X", b"")
    s.data_received(msg(b"H", b"") + q + x + msg(b"Q", b"SELECT 2\0"))
    assert upstream.data == msg(b"H", b"") + _expected(q) + x
    assert s.terminating


@pytest.mark.parametrize("bad", [
    msg(b"!", b""),  # invalid type
    b"B" + struct.pack("!i", 6) + b"\0\0",  # malformed Bind
])
def test_tracking_refusal_mid_read_forwards_nothing_of_it(bad: bytes) -> None:
    s, client, upstream = ready_session()
    s.tracker = Tracker(Protector())
    s.data_received(msg(b"H", b"") + msg(b"Q", b"SELECT 1\0") + bad + msg(b"S", b""))
    assert upstream.writes == []
    assert s.state is State.CLOSED and b"08P01" in client.data


def test_tracking_bad_length_first_forwards_nothing() -> None:
    s, client, upstream = ready_session()
    s.tracker = Tracker(Protector())
    s.data_received(b"Q\xff\xff\xff\xff")
    assert upstream.writes == []
    assert s.state is State.CLOSED and b"08P01" in client.data


def test_tracking_request_end_is_timed_and_flushes_crypto_time() -> None:
    """At the ReadyForQuery that ends a request: one observation in the query-time
    histogram, and the crypto time of its statements handed to metrics."""
    s, client, _upstream = ready_session()
    s.tracker = Tracker(Protector(PLANS))
    flushed: list[tuple[Any, ...]] = []
    s.server.metrics.crypto_done = lambda *a: flushed.append(a)  # type: ignore[method-assign]
    s.data_received(_parse(b"ins", b"INSERT y") + _bind(b"", b"ins", [], [b"4111"], [])
                    + msg(b"E", b"\0\0\0\0\0") + msg(b"S", b""))
    assert s.tracker.encrypt_seconds > 0
    before = sum(s._m_hist.counts)
    reply = (msg(b"1", b"") + msg(b"n", b"") + msg(b"2", b"")
             + msg(b"C", b"INSERT 0 1\0") + msg(b"Z", b"I"))
    s.server_data(reply)
    assert client.data == msg(b"1", b"") + msg(b"2", b"") + msg(b"C", b"INSERT 0 1\0") \
        + msg(b"Z", b"I")  # the injected Describe's NoData swallowed
    assert s.outstanding == 0
    assert sum(s._m_hist.counts) == before + 1
    assert s.tracker.encrypt_seconds == 0.0
    assert [a[1] for a in flushed] == ["encrypt"]
