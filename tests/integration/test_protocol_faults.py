"""Faults: the upstream restarting, malformed client input, and a hypothesis fuzz.

The property throughout: a bad peer (client or server) costs only its own session. A
well-behaved client connected in parallel keeps working, the proxy process stays up,
and its log shows one-line summaries, never a Traceback.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator

import asyncpg
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy import devcluster
from tests.conftest import (
    APP_DB,
    FLUSH,
    PW_PASSWORD,
    PW_USER,
    SYNC,
    TERMINATE,
    ProxyProcess,
    RawPG,
    bind_msg,
    close_msg,
    cstr,
    describe_msg,
    error_fields,
    execute_msg,
    function_call_msg,
    msg,
    parse_msg,
    query_msg,
    startup_packet,
)


def assert_clean_log(p: ProxyProcess) -> None:
    log = p.log()
    assert "Traceback" not in log, log[-3000:]
    assert " ERROR " not in log, log[-3000:]


# ---------------------------------------------------------------------- upstream restart


def test_postgres_restart_under_proxy(pg: devcluster.Cluster, pg_aux: devcluster.Cluster,
                                      proxy: ProxyProcess, make_proxy) -> None:
    """Existing sessions get an error and are closed; while the server is down new clients
    get 08006 from the proxy; as soon as it is back new clients work. A session through
    another proxy process (other upstream) never notices."""
    p = make_proxy(cluster=pg_aux)
    bystander = psycopg.connect(proxy.conninfo(), autocommit=True)
    idle = psycopg.connect(p.conninfo(user=PW_USER, password=PW_PASSWORD), autocommit=True)
    busy = psycopg.connect(p.conninfo(user=PW_USER, password=PW_PASSWORD), autocommit=True)
    import threading
    busy_err: list[BaseException] = []

    def run_busy() -> None:
        try:
            busy.execute("select pg_sleep(30)")
        except psycopg.Error as exc:
            busy_err.append(exc)

    t = threading.Thread(target=run_busy)
    t.start()
    time.sleep(0.3)
    pg_aux.stop("fast")
    try:
        t.join(10)
        assert busy_err and busy_err[0].sqlstate in ("57P01", "08006"), busy_err
        with pytest.raises(psycopg.OperationalError) as info:
            idle.execute("select 1")
        assert info.value.sqlstate in ("57P01", "08006", None)
        assert "terminating connection" in str(info.value) or "closed" in str(info.value)
        with RawPG(p.port) as raw:
            raw.send(startup_packet({"user": PW_USER, "database": APP_DB}))
            replies = raw.read_to_close()
        assert [k for k, _ in replies] == [b"E"]
        assert error_fields(replies[0][1])["C"] == "08006"
        assert bystander.execute("select 1").fetchone() == (1,)
    finally:
        pg_aux.start()
    with psycopg.connect(p.conninfo(user=PW_USER, password=PW_PASSWORD)) as fresh:
        assert fresh.execute("select current_user").fetchone() == (PW_USER,)
    assert bystander.execute("select 2").fetchone() == (2,)
    assert p.alive()
    bystander.close()
    idle.close()
    busy.close()
    assert "Traceback" not in p.log()


async def test_restart_with_pg_ctl_restart_asyncpg(pg_aux: devcluster.Cluster,
                                                   make_proxy) -> None:
    """pg_ctl restart (the brief's scenario) with asyncpg: old connection errors, new works."""
    p = make_proxy(cluster=pg_aux)
    old = await asyncpg.connect(p.dsn(user=PW_USER, password=PW_PASSWORD))
    pg_aux.restart()
    with pytest.raises((asyncpg.PostgresError, asyncpg.exceptions.ConnectionDoesNotExistError,
                        ConnectionError)):
        await old.fetchval("select 1")
    new = await asyncpg.connect(p.dsn(user=PW_USER, password=PW_PASSWORD))
    try:
        assert await new.fetchval("select 7") == 7
    finally:
        await new.close()
        old.terminate()


# ---------------------------------------------------------------------- malformed input


@pytest.fixture(scope="module")
def strict_proxy(pg_aux: devcluster.Cluster) -> Iterator[ProxyProcess]:
    p = ProxyProcess(pg_aux, {"limits": {"max_message_size": 8192, "startup_timeout": 1}})
    p.start()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def bystander(strict_proxy: ProxyProcess) -> Iterator[psycopg.Connection]:
    """A well-behaved session that must keep working through every abuse in this module."""
    # Another role than the raw clients' (PW_USER), so leak checks can tell them apart.
    conn = psycopg.connect(strict_proxy.conninfo(), autocommit=True)
    yield conn
    conn.close()


def _refused(port: int, payload: bytes, login: bool = False) -> list[tuple[bytes, bytes]]:
    with RawPG(port) as raw:
        if login:
            raw.login(PW_USER, PW_PASSWORD)
        raw.send(payload)
        return raw.read_to_close()


def _assert_08p01(replies: list[tuple[bytes, bytes]], text: str | None = None) -> None:
    assert [k for k, _ in replies] == [b"E"], replies
    fields = error_fields(replies[0][1])
    assert (fields["S"], fields["C"]) == ("FATAL", "08P01"), fields
    if text is not None:
        assert text in fields["M"], fields


MALFORMED_STARTUP = {
    "length-too-small": struct.pack("!I", 4) + b"\0\0\0\0",
    "length-too-large": struct.pack("!I", 1_000_000) + b"\0\3\0\0",
    "query-before-startup": query_msg("select 1"),
    "bad-layout": struct.pack("!II", 12, 196608) + b"user",  # no terminator
    "odd-params": startup_packet({"user": PW_USER})[:-1] + b"x\0\0",
}


@pytest.mark.parametrize("name", list(MALFORMED_STARTUP))
def test_malformed_startup(strict_proxy: ProxyProcess, bystander: psycopg.Connection,
                           name: str) -> None:
    _assert_08p01(_refused(strict_proxy.port, MALFORMED_STARTUP[name]))
    assert bystander.execute("select 1").fetchone() == (1,)


def test_unsupported_protocol_version_like_postgres(pg_aux: devcluster.Cluster,
                                                    strict_proxy: ProxyProcess) -> None:
    """Protocol 4.0 is refused with the same SQLSTATE and text as PostgreSQL's."""
    payload = struct.pack("!II", 8 + 5 + 7, 4 << 16) + cstr("user") + cstr(PW_USER) + b"\0"
    direct = error_fields(_refused(pg_aux.port, payload)[0][1])
    proxied = error_fields(_refused(strict_proxy.port, payload)[0][1])
    assert (proxied["S"], proxied["C"], proxied["M"]) == (direct["S"], direct["C"], direct["M"])


def test_negotiate_protocol_version_passes(pg_aux: devcluster.Cluster,
                                           strict_proxy: ProxyProcess) -> None:
    """3.99 with an unknown _pq_ option: the server's NegotiateProtocolVersion, unchanged."""
    params = {"user": PW_USER, "database": APP_DB, "_pq_.frobnicate": "on"}

    def first(port: int) -> tuple[bytes, bytes]:
        with RawPG(port) as raw:
            raw.send(startup_packet(params, version=(3 << 16) | 99))
            return raw.read_msg()

    direct, proxied = first(pg_aux.port), first(strict_proxy.port)
    assert proxied == direct
    assert proxied[0] == b"v" and b"_pq_.frobnicate" in proxied[1]


def test_bad_length_after_login(strict_proxy: ProxyProcess, bystander: psycopg.Connection,
                                pg_aux: devcluster.Cluster) -> None:
    _assert_08p01(_refused(strict_proxy.port, b"Q\0\0\0\2", login=True))
    assert bystander.execute("select 1").fetchone() == (1,)
    wait_no_pw_backends_except(pg_aux, bystander)


def test_unknown_message_type_like_postgres(pg_aux: devcluster.Cluster,
                                            strict_proxy: ProxyProcess,
                                            bystander: psycopg.Connection) -> None:
    payload = msg(b"@", b"junk")
    direct = _refused(pg_aux.port, payload, login=True)
    proxied = _refused(strict_proxy.port, payload, login=True)
    _assert_08p01(proxied)
    d, p = error_fields(direct[0][1]), error_fields(proxied[0][1])
    assert (p["S"], p["C"], p["M"]) == (d["S"], d["C"], d["M"])
    assert bystander.execute("select 1").fetchone() == (1,)


def test_oversized_message(strict_proxy: ProxyProcess, bystander: psycopg.Connection,
                           pg_aux: devcluster.Cluster) -> None:
    """limits.max_message_size: refused from the header alone, before the body arrives."""
    ok = _refused(strict_proxy.port, query_msg("select '" + "x" * 7000 + "'") + TERMINATE,
                  login=True)
    assert [k for k, _ in ok] == [b"T", b"D", b"C", b"Z"]
    with RawPG(strict_proxy.port) as raw:
        raw.login(PW_USER, PW_PASSWORD)
        raw.send(b"Q" + struct.pack("!I", 50_000_000) + b"select ")  # body never sent
        _assert_08p01(raw.read_to_close(), "invalid message length")
    assert bystander.execute("select 1").fetchone() == (1,)
    wait_no_pw_backends_except(pg_aux, bystander)


def test_garbage_after_terminate(strict_proxy: ProxyProcess, bystander: psycopg.Connection,
                                 pg_aux: devcluster.Cluster) -> None:
    """After Terminate nothing is read: the connection just closes, no error, no backend."""
    replies = _refused(strict_proxy.port, TERMINATE + b"\xde\xad\xbe\xef" * 1000, login=True)
    assert replies == []
    assert bystander.execute("select 1").fetchone() == (1,)
    wait_no_pw_backends_except(pg_aux, bystander)


def test_slow_loris_startup(strict_proxy: ProxyProcess, bystander: psycopg.Connection) -> None:
    """A client that dribbles its startup packet is cut off after limits.startup_timeout."""
    with RawPG(strict_proxy.port) as raw:
        packet = startup_packet({"user": PW_USER, "database": APP_DB})
        start = time.monotonic()
        raw.send(packet[:3])
        time.sleep(0.4)
        raw.send(packet[3:6])
        replies = raw.read_to_close(timeout=5)
        took = time.monotonic() - start
    _assert_08p01(replies, "timeout expired during connection startup")
    assert 0.9 < took < 3.0
    assert bystander.execute("select 1").fetchone() == (1,)


def test_slow_loris_authentication(strict_proxy: ProxyProcess, pg_aux: devcluster.Cluster,
                                   bystander: psycopg.Connection) -> None:
    """Startup sent, password never answered: cut off by the same timeout, upstream closed."""
    with RawPG(strict_proxy.port) as raw:
        raw.send(startup_packet({"user": PW_USER, "database": APP_DB}))
        kind, _ = raw.read_msg()
        assert kind == b"R"
        _assert_08p01(raw.read_to_close(timeout=5), "timeout")
    assert bystander.execute("select 1").fetchone() == (1,)
    wait_no_pw_backends_except(pg_aux, bystander)


def test_malformed_input_logs_no_errors(strict_proxy: ProxyProcess,
                                        bystander: psycopg.Connection) -> None:
    """Client mistakes are a one-line INFO summary each, never ERROR or a Traceback."""
    assert bystander.execute("select 1").fetchone() == (1,)
    assert_clean_log(strict_proxy)
    assert "protocol violation" in strict_proxy.log()


def wait_no_pw_backends_except(pg: devcluster.Cluster, keep: psycopg.Connection,
                               timeout: float = 5.0) -> None:
    """No PW_USER backend may remain (bystanders log in as another role)."""
    assert keep.info.user != PW_USER
    q = f"select count(*) from pg_stat_activity where usename = '{PW_USER}'"
    deadline = time.monotonic() + timeout
    while int(pg.psql(q)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert int(pg.psql(q)) == 0, "a refused session's upstream connection was left open:\n" + (
        pg.psql("select pid, state, backend_type, wait_event, left(query, 60), now() - "
                f"backend_start from pg_stat_activity where usename = '{PW_USER}'"))


# ---------------------------------------------------------------------- fuzz


@pytest.fixture(scope="module")
def fuzz_proxy(pg_aux: devcluster.Cluster) -> Iterator[ProxyProcess]:
    p = ProxyProcess(pg_aux, {"limits": {"max_message_size": 65536, "startup_timeout": 2}})
    p.start()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def fuzz_bystander(fuzz_proxy: ProxyProcess) -> Iterator[psycopg.Connection]:
    conn = psycopg.connect(fuzz_proxy.conninfo(), autocommit=True)
    yield conn
    conn.close()


VALID_MESSAGES = [
    query_msg("select 1"),
    query_msg("select 'a'; select 2"),
    query_msg("begin"),
    query_msg("rollback"),
    query_msg(""),
    parse_msg("select $1::int", "s"),
    parse_msg("select 2"),
    bind_msg((b"1",), "", "s"),
    bind_msg(),
    describe_msg(b"S", "s"),
    describe_msg(b"P"),
    execute_msg("", 1),
    execute_msg(),
    close_msg(b"S", "s"),
    close_msg(b"P"),
    SYNC,
    FLUSH,
    msg(b"d", b"1\n"),
    msg(b"c"),
    msg(b"f", cstr("nope")),
    function_call_msg(177, (b"1", b"2")),
    msg(b"p", cstr("x")),
]

message_st = st.one_of(
    st.sampled_from(VALID_MESSAGES),
    st.builds(lambda t, body: bytes([t]) + struct.pack("!I", len(body) + 4) + body,
              st.integers(0, 255), st.binary(max_size=64)),
    st.binary(min_size=1, max_size=32),  # unframed garbage
)


@st.composite
def mutated_stream(draw: st.DrawFn) -> bytes:
    stream = bytearray(b"".join(draw(st.lists(message_st, min_size=1, max_size=12))))
    for _ in range(draw(st.integers(0, 3))):
        if not stream:
            break
        i = draw(st.integers(0, len(stream) - 1))
        op = draw(st.sampled_from(["flip", "truncate", "insert"]))
        if op == "flip":
            stream[i] ^= draw(st.integers(1, 255))
        elif op == "truncate":
            del stream[i:]
        else:
            stream[i:i] = draw(st.binary(min_size=1, max_size=8))
    return bytes(stream)


def _send_and_hang_up(port: int, payload: bytes, login: bool) -> None:
    """Send the payload, half-close, read until the proxy closes (bounded)."""
    with RawPG(port, timeout=5) as raw:
        if login:
            raw.login(PW_USER, PW_PASSWORD)
        try:
            raw.send(payload)
            raw.sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            return
        deadline = time.monotonic() + 5
        raw.sock.settimeout(5)
        try:
            while time.monotonic() < deadline and raw.sock.recv(65536):
                pass
        except (TimeoutError, ConnectionResetError):
            pass


FUZZ_SETTINGS = settings(max_examples=120, deadline=None, derandomize=True,
                         suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                HealthCheck.too_slow])


@FUZZ_SETTINGS
@given(payload=mutated_stream())
def test_fuzz_after_login(fuzz_proxy: ProxyProcess, fuzz_bystander: psycopg.Connection,
                          payload: bytes) -> None:
    _send_and_hang_up(fuzz_proxy.port, payload, login=True)
    assert fuzz_proxy.alive()
    assert fuzz_bystander.execute("select 1").fetchone() == (1,)


@FUZZ_SETTINGS
@given(payload=st.one_of(
    st.binary(max_size=64),
    st.builds(lambda b, rest: startup_packet({"user": PW_USER, "database": APP_DB})[:b] + rest,
              st.integers(0, 40), st.binary(max_size=40)),
    st.builds(lambda code, rest: struct.pack("!II", 8 + len(rest), code) + rest,
              st.sampled_from([80877103, 80877104, 80877102, 196608, 196609, 131072]),
              st.binary(max_size=24)),
))
def test_fuzz_before_startup(fuzz_proxy: ProxyProcess, fuzz_bystander: psycopg.Connection,
                             payload: bytes) -> None:
    _send_and_hang_up(fuzz_proxy.port, payload, login=False)
    assert fuzz_proxy.alive()
    assert fuzz_bystander.execute("select 1").fetchone() == (1,)


def test_fuzz_left_nothing_behind(fuzz_proxy: ProxyProcess, pg_aux: devcluster.Cluster,
                                  fuzz_bystander: psycopg.Connection) -> None:
    """After all the fuzzing: no leaked upstream connections and a clean log."""
    wait_no_pw_backends_except(pg_aux, fuzz_bystander)
    assert_clean_log(fuzz_proxy)
