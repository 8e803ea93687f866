"""The session relay's inline framing (Session.data_received / Session.server_data).

The relay walks message headers itself instead of asking the Framer for a list of frames.
These tests pin what that walk must preserve, with in-memory transports and the real
Gate and Metrics: the bytes forwarded are exactly the whole messages received, in order,
however the stream is cut into reads; a message is never forwarded before it is whole;
ReadyForQuery / ParameterStatus / ErrorResponse bookkeeping is the same for every cut;
an invalid length after whole messages forwards those first and then refuses.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from proxy import observability
from proxy.gate import Gate
from proxy.session import Session, State, Upstream
from proxy.settings import Settings


def msg(kind: bytes, body: bytes) -> bytes:
    return kind + (len(body) + 4).to_bytes(4, "big") + body


class FakeTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        assert isinstance(data, bytes) and data
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    @property
    def data(self) -> bytes:
        return b"".join(self.writes)


class FakeServer:
    def __init__(self) -> None:
        self.settings = Settings()
        self.gate = Gate(self.settings)
        self.metrics, self.audit, self.audit_facts = observability.build(self.settings, self.gate)
        self.query_kinds = observability.QueryKinds(self.metrics, self.gate)
        self.protocol_errors: list[str] = []

    def next_session_id(self) -> int:
        return 1

    def on_protocol_error(self, sqlstate: str) -> None:
        self.protocol_errors.append(sqlstate)


def ready_session() -> tuple[Session, FakeTransport, FakeTransport]:
    server = FakeServer()
    s = Session(server)  # type: ignore[arg-type]
    client, upstream = FakeTransport(), FakeTransport()
    s.transport = client  # type: ignore[assignment]
    up = Upstream(s)
    up.transport = upstream  # type: ignore[assignment]
    s.upstream = up
    s.state = State.READY
    return s, client, upstream


CLIENT_STREAM = b"".join([
    msg(b"Q", b"SELECT abalance FROM pgbench_accounts WHERE aid = 42;\0"),
    msg(b"P", b"\0SELECT $1::int\0\0\0"),
    msg(b"B", b"\0\0\0\0\0\1\0\0\0\0011\0\0"),
    msg(b"D", b"P\0"),
    msg(b"E", b"\0\0\0\0\0"),
    msg(b"S", b""),
    msg(b"P", b"s1\0SELECT 2\0\0\0"),
    msg(b"H", b""),
    msg(b"Q", b"SELECT " + b"x" * 3000 + b"\0"),
])

SERVER_STREAM = b"".join([
    msg(b"T", b"\0\1abalance\0" + b"\0" * 6 + (23).to_bytes(4, "big")
        + b"\0\4\xff\xff\xff\xff\0\0"),
    msg(b"D", b"\0\1\0\0\0\0010"),
    msg(b"C", b"SELECT 1\0"),
    msg(b"Z", b"T"),
    msg(b"S", b"application_name\0relay-test\0"),
    msg(b"1", b""),
    msg(b"2", b""),
    msg(b"D", b"\0\1\0\0\x10\0" + b"y" * 4096),
    msg(b"E", b"SERROR\0VERROR\0C42P01\0Mno such table\0\0"),
    msg(b"Z", b"E"),
    msg(b"N", b"SNOTICE\0VNOTICE\0C00000\0Mhello\0\0"),
    msg(b"1", b""),
    msg(b"Z", b"I"),
])


def cuts(data: bytes, rng: random.Random, n: int) -> list[list[bytes]]:
    """The stream whole, byte by byte, and n random cuttings."""
    out = [[data], [data[i : i + 1] for i in range(len(data))]]
    for _ in range(n):
        points = sorted(rng.sample(range(1, len(data)), rng.randint(1, 12)))
        out.append([data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)])
    return out


def whole_prefix(data: bytes) -> int:
    """Length of the longest prefix of data made of whole messages."""
    pos = 0
    while len(data) - pos >= 5:
        stop = pos + 1 + int.from_bytes(data[pos + 1 : pos + 5], "big")
        if stop > len(data):
            break
        pos = stop
    return pos


def test_client_relay_forwards_whole_messages_for_every_cut() -> None:
    rng = random.Random(3)
    for reads in cuts(CLIENT_STREAM, rng, 60):
        s, _client, upstream = ready_session()
        seen = b""
        for chunk in reads:
            s.data_received(chunk)
            seen += chunk
            # Never a partial message forwarded: exactly the whole-message prefix so far.
            assert upstream.data == seen[: whole_prefix(seen)]
        assert upstream.data == CLIENT_STREAM
        assert s.state is State.READY
        assert s.outstanding == 3  # two Queries and a Sync
        assert s._cframer.pending == 0


def test_server_relay_bookkeeping_is_the_same_for_every_cut() -> None:
    rng = random.Random(4)
    for reads in cuts(SERVER_STREAM, rng, 60):
        s, client, _upstream = ready_session()
        s.outstanding = 3
        seen = b""
        for chunk in reads:
            s.server_data(chunk)
            seen += chunk
            assert client.data == seen[: whole_prefix(seen)]
        assert client.data == SERVER_STREAM
        assert s.outstanding == 0
        assert s.txn_status == b"I"
        assert s.server_params["application_name"] == "relay-test"
        assert not s.server_fatal
        assert s._sframer.pending == 0


def test_ready_for_query_timing_and_idle_stamp() -> None:
    s, _client, _upstream = ready_session()
    hist = s._m_hist
    before = sum(hist.counts)
    s.data_received(msg(b"Q", b"SELECT 1\0"))
    assert s.outstanding == 1
    stamp = s.last_active
    s.server_data(msg(b"C", b"SELECT 1\0") + msg(b"Z", b"I"))
    assert s.outstanding == 0
    assert sum(hist.counts) == before + 1 and hist.sum >= 0
    assert s.last_active >= stamp  # idle from the ReadyForQuery on


def test_fatal_from_server_is_noticed() -> None:
    s, client, _upstream = ready_session()
    fatal = msg(b"E", b"SFATAL\0VFATAL\0C57P01\0Mterminating\0\0")
    s.server_data(fatal)
    assert s.server_fatal
    assert client.data == fatal


@pytest.mark.parametrize("split", [False, True])
def test_bad_length_after_whole_messages(split: bool) -> None:
    """The whole messages before an invalid length are forwarded, then 08P01."""
    s, client, upstream = ready_session()
    good = msg(b"Q", b"SELECT 1\0") + msg(b"H", b"")
    bad = b"Q\0\0\0\1"
    if split:
        s.data_received(good + bad[:3])
        s.data_received(bad[3:])
    else:
        s.data_received(good + bad)
    assert upstream.data == good
    assert s.state is State.CLOSED
    assert client.closed
    assert b"08P01" in client.data and b"invalid message length 1" in client.data


def test_bad_length_first_forwards_nothing() -> None:
    s, client, upstream = ready_session()
    s.data_received(b"Q\xff\xff\xff\xff")
    assert upstream.writes == []
    assert s.state is State.CLOSED and b"08P01" in client.data


def test_invalid_type_forwards_nothing() -> None:
    s, client, upstream = ready_session()
    s.data_received(msg(b"H", b"") + msg(b"!", b""))
    assert upstream.writes == []
    assert b"invalid frontend message type 33" in client.data


def test_server_bad_length_ends_the_session() -> None:
    """Garbage from the server costs this session, with 58000 to the client."""
    s, client, _upstream = ready_session()
    good = msg(b"C", b"SELECT 1\0")
    s.server_data(good + b"D\0\0\0\2")
    assert client.data == good  # the whole message before it goes through
    s.server_data(b"more")  # as with the Framer: the next read raises
    assert s.state is State.CLOSED
    assert b"58000" in client.data


class ReplacingGate:
    """Stands in for a policy gate that replaces every Query."""

    def __init__(self, real: Any) -> None:
        self.real = real

    def query(self, session: Session, body: bytes) -> bytes:
        return msg(b"Q", b"SELECT 'replaced'\0")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_replaced_query_and_terminate_in_one_read() -> None:
    """A Terminate after a replaced Query forwards the replacement, not the original."""
    s, _client, upstream = ready_session()
    s.gate = ReplacingGate(s.gate)  # type: ignore[assignment]
    sync = msg(b"S", b"")
    s.data_received(sync + msg(b"Q", b"SELECT secret\0") + sync + msg(b"X", b""))
    assert upstream.data == sync + msg(b"Q", b"SELECT 'replaced'\0") + sync + msg(b"X", b"")
    assert s.terminating


def test_replacement_keeps_order_around_untouched_messages() -> None:
    s, _client, upstream = ready_session()
    s.gate = ReplacingGate(s.gate)  # type: ignore[assignment]
    h = msg(b"H", b"")
    s.data_received(h + msg(b"Q", b"SELECT a\0") + h + h + msg(b"Q", b"SELECT b\0") + h[:2])
    r = msg(b"Q", b"SELECT 'replaced'\0")
    assert upstream.data == h + r + h + h + r
    s.data_received(h[2:])
    assert upstream.data == h + r + h + h + r + h
