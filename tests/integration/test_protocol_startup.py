"""Startup, authentication relay and TLS through the proxy, with real drivers.

Each test compares with what PostgreSQL itself does (direct connection) where the
answer is not obvious, because "transparent" means "the same as direct", not "works".
"""

from __future__ import annotations

import ssl
import struct
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psycopg
import pytest

from proxy import devcluster
from tests.conftest import (
    APP_DB,
    APP_PASSWORD,
    APP_USER,
    MD5_PASSWORD,
    MD5_USER,
    PW_PASSWORD,
    PW_USER,
    TRUST_USER,
    ProxyProcess,
    RawPG,
    error_fields,
    startup_packet,
)

GSSENC_REQUEST = struct.pack("!II", 8, 80877104)
SSL_REQUEST = struct.pack("!II", 8, 80877103)


# ---------------------------------------------------------------------- identity


def test_backend_pid_psycopg(proxy: ProxyProcess) -> None:
    """BackendKeyData is the server's own: the pid the driver holds is the real backend."""
    with psycopg.connect(proxy.conninfo()) as conn:
        assert conn.execute("select pg_backend_pid()").fetchone()[0] == conn.info.backend_pid


async def test_backend_pid_asyncpg(proxy: ProxyProcess) -> None:
    conn = await asyncpg.connect(proxy.dsn())
    try:
        assert await conn.fetchval("select pg_backend_pid()") == conn.get_server_pid()
    finally:
        await conn.close()


async def test_psycopg_async_connection(proxy: ProxyProcess) -> None:
    """psycopg's async flavour goes through the same relay (its own nonblocking paths)."""
    async with await psycopg.AsyncConnection.connect(proxy.conninfo()) as conn:
        cur = await conn.execute("select %s::int + 1, pg_backend_pid()", (41,))
        value, pid = await cur.fetchone()
        assert value == 42
        assert pid == conn.info.backend_pid


# ---------------------------------------------------------------------- startup parameters


def test_unknown_startup_parameters_reach_server(proxy: ProxyProcess) -> None:
    """options, application_name and custom GUCs are forwarded exactly as sent."""
    info = proxy.conninfo(
        application_name="strongroom-test",
        options="'-c search_path=myschema,public -c myapp.foo=bar'",
    )
    with psycopg.connect(info) as conn:
        row = conn.execute(
            "select current_setting('application_name'), current_setting('search_path'),"
            " current_setting('myapp.foo')"
        ).fetchone()
    assert row == ("strongroom-test", "myschema,public", "bar")


async def test_server_settings_asyncpg(proxy: ProxyProcess) -> None:
    """asyncpg sends server_settings as top-level startup parameters (not via options)."""
    conn = await asyncpg.connect(
        proxy.dsn(),
        server_settings={"myapp.tenant": "t42", "application_name": "apg", "work_mem": "7MB"},
    )
    try:
        row = await conn.fetchrow(
            "select current_setting('myapp.tenant') t, current_setting('application_name') a,"
            " current_setting('work_mem') w"
        )
        assert tuple(row) == ("t42", "apg", "7MB")
    finally:
        await conn.close()


def test_parameter_status_identical(pg: devcluster.Cluster, proxy: ProxyProcess) -> None:
    """ParameterStatus values a driver sees through the proxy match a direct session."""
    direct = pg.dsn(APP_USER, APP_PASSWORD, APP_DB) + "?sslmode=disable&application_name=ps"
    seen = []
    for dsn in (direct, proxy.dsn(application_name="ps")):
        with psycopg.connect(dsn) as conn:
            names = ("server_version", "server_encoding", "client_encoding", "DateStyle",
                     "TimeZone", "integer_datetimes", "standard_conforming_strings",
                     "application_name", "is_superuser", "session_authorization")
            seen.append({n: conn.info.parameter_status(n) for n in names})
            conn.execute("set application_name = 'changed'")
            seen[-1]["after_set"] = conn.info.parameter_status("application_name")
    assert seen[0] == seen[1]
    assert seen[1]["after_set"] == "changed"


def test_replication_startup_refused(proxy: ProxyProcess) -> None:
    """A replication connection would bypass every check the proxy makes: refused, 08P01."""
    with RawPG(proxy.port) as raw:
        raw.send(startup_packet({"user": APP_USER, "database": APP_DB,
                                 "replication": "database"}))
        msgs = raw.read_to_close()
    assert [k for k, _ in msgs] == [b"E"]
    fields = error_fields(msgs[0][1])
    assert (fields["S"], fields["C"]) == ("FATAL", "08P01")
    assert "replication" in fields["M"]
    with pytest.raises(psycopg.OperationalError, match="replication"):
        psycopg.connect(proxy.conninfo(replication="database"))


def test_gssenc_request_answered_n_then_plain_startup(proxy_aux: ProxyProcess) -> None:
    """GSSENCRequest gets 'N'; the client may go on with a plain startup on the same socket."""
    p = proxy_aux
    with RawPG(p.port) as raw:
        raw.send(GSSENC_REQUEST)
        assert raw.read_byte() == b"N"
        raw.login(PW_USER, PW_PASSWORD)
        raw.send(b"Q" + struct.pack("!I", 4 + 9) + b"select 1\0")
        kinds = [k for k, _ in raw.read_until(b"Z")]
    assert kinds == [b"T", b"D", b"C", b"Z"]
    # libpq's gssencmode=prefer path, where it is compiled in, ends the same way.
    with psycopg.connect(p.conninfo(gssencmode="prefer")) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def test_ssl_request_without_tls_answered_n(proxy: ProxyProcess) -> None:
    with RawPG(proxy.port) as raw:
        raw.send(SSL_REQUEST)
        assert raw.read_byte() == b"N"
    with pytest.raises(psycopg.OperationalError, match=r"(?i)ssl"):
        psycopg.connect(proxy.conninfo(sslmode="require"))
    with psycopg.connect(proxy.conninfo(sslmode="prefer")) as conn:
        assert conn.info.pgconn.ssl_in_use is False


# ---------------------------------------------------------------------- authentication


def test_wrong_password_is_servers_28p01(pg: devcluster.Cluster, proxy: ProxyProcess) -> None:
    """The server's FATAL reaches the client unchanged (same SQLSTATE, same text)."""
    direct = pg.dsn(APP_USER, "wrong", APP_DB) + "?sslmode=disable"
    texts = []
    for dsn in (direct, proxy.dsn(password="wrong")):
        with pytest.raises(psycopg.OperationalError) as info:
            psycopg.connect(dsn)
        texts.append(str(info.value).split("FATAL:", 1)[1].strip())
    assert texts[0] == texts[1]
    assert 'password authentication failed for user "app"' in texts[1]


async def test_wrong_password_asyncpg(proxy: ProxyProcess) -> None:
    with pytest.raises(asyncpg.InvalidPasswordError) as info:
        await asyncpg.connect(proxy.dsn(password="wrong"))
    assert info.value.sqlstate == "28P01"


@pytest.mark.parametrize(
    ("user", "password"),
    [(PW_USER, PW_PASSWORD), (MD5_USER, MD5_PASSWORD), (TRUST_USER, "unused"),
     (APP_USER, APP_PASSWORD)],
    ids=["password", "md5", "trust", "scram"],
)
async def test_auth_methods_relayed(proxy_aux: ProxyProcess, user: str,
                                    password: str) -> None:
    """Every method the server asks for is relayed; both drivers log in, wrong fails."""
    p = proxy_aux
    with psycopg.connect(p.conninfo(user=user, password=password)) as conn:
        assert conn.execute("select current_user").fetchone()[0] == user
    conn2 = await asyncpg.connect(p.dsn(user=user, password=password))
    try:
        assert await conn2.fetchval("select current_user") == user
    finally:
        await conn2.close()
    if user != TRUST_USER:
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(p.conninfo(user=user, password="nope"))


def test_raw_client_sees_method_requests(proxy_aux: ProxyProcess) -> None:
    """The authentication request codes are the server's (3 cleartext, 5 md5, 0 ok)."""
    p = proxy_aux
    for user, password, code in ((PW_USER, PW_PASSWORD, 3), (MD5_USER, MD5_PASSWORD, 5),
                                 (TRUST_USER, None, 0)):
        with RawPG(p.port) as raw:
            msgs = raw.login(user, password)
            first = msgs[0]
            assert first[0] == b"R"
            assert struct.unpack("!I", first[1][:4])[0] == code
            assert raw.backend_key is not None


# ---------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def proxy_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return devcluster.make_self_signed(tmp_path_factory.mktemp("proxycert"))


def _tls_config(cert: tuple[Path, Path], mode: str, ca: Path | None = None) -> dict:
    upstream_tls: dict = {"mode": mode}
    if ca is not None:
        upstream_tls["ca_file"] = str(ca)
    return {
        "listen": {"tls": {"cert_file": str(cert[0]), "key_file": str(cert[1])}},
        "upstream": {"tls": upstream_tls},
    }


@pytest.fixture(scope="module", params=["require", "verify-full"])
def tls_proxy(request: pytest.FixtureRequest, pg: devcluster.Cluster,
              proxy_cert: tuple[Path, Path]) -> Iterator[ProxyProcess]:
    ca = pg.cert if request.param == "verify-full" else None
    p = ProxyProcess(pg, _tls_config(proxy_cert, request.param, ca)).start()
    yield p
    p.stop()


def _upstream_ssl(pg: devcluster.Cluster, pid: int) -> bool:
    out = pg.psql(f"select ssl from pg_stat_ssl where pid = {pid}")
    return out.strip() == "t"


def test_tls_both_legs_psycopg(pg: devcluster.Cluster, tls_proxy: ProxyProcess,
                               proxy_cert: tuple[Path, Path]) -> None:
    """Client→proxy verified against the proxy cert; proxy→server encrypted (pg_stat_ssl).

    libpq must use channel_binding=disable here: over TLS it announces channel-binding
    support ('y' GS2 flag) and a TLS-using server rejects that when only plain SCRAM was
    offered. The proxy cannot rewrite the flag (it is covered by the client proof).
    """
    info = tls_proxy.conninfo(sslmode="verify-full", sslrootcert=str(proxy_cert[0]),
                              channel_binding="disable")
    info = info.replace("host=127.0.0.1", "host=localhost")
    with psycopg.connect(info) as conn:
        assert conn.info.pgconn.ssl_in_use
        pid = conn.execute("select pg_backend_pid()").fetchone()[0]
        assert _upstream_ssl(pg, pid)
        assert conn.execute("select current_user").fetchone()[0] == APP_USER


def test_tls_libpq_channel_binding_prefer_fails_documented(
    tls_proxy: ProxyProcess, proxy_cert: tuple[Path, Path]
) -> None:
    """The documented limitation, pinned: libpq's default (prefer) over TLS on both legs
    fails with the server's channel-binding negotiation error, not a proxy crash."""
    info = tls_proxy.conninfo(sslmode="require")
    with pytest.raises(psycopg.OperationalError, match="channel binding"):
        psycopg.connect(info)
    with pytest.raises(psycopg.OperationalError, match="channel binding"):
        psycopg.connect(tls_proxy.conninfo(sslmode="require", channel_binding="require"))


async def test_tls_both_legs_asyncpg(pg: devcluster.Cluster, tls_proxy: ProxyProcess,
                                     proxy_cert: tuple[Path, Path]) -> None:
    """asyncpg's SCRAM never claims channel-binding support, so it works as is."""
    ctx = ssl.create_default_context(cafile=str(proxy_cert[0]))
    conn = await asyncpg.connect(tls_proxy.dsn().replace("?sslmode=disable", ""), ssl=ctx)
    try:
        pid = await conn.fetchval("select pg_backend_pid()")
        assert pid == conn.get_server_pid()
        assert _upstream_ssl(pg, pid)
    finally:
        await conn.close()


def test_scram_offered_without_plus_over_tls(pg: devcluster.Cluster,
                                             tls_proxy: ProxyProcess) -> None:
    """Direct over TLS the server offers SCRAM-SHA-256-PLUS; through the proxy only plain."""

    def mechanisms(port: int) -> list[bytes]:
        with RawPG(port) as raw:
            raw.send(SSL_REQUEST)
            assert raw.read_byte() == b"S"
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            raw.sock = ctx.wrap_socket(raw.sock)
            raw.send(startup_packet({"user": APP_USER, "database": APP_DB}))
            kind, body = raw.read_msg()
            assert kind == b"R"
            assert struct.unpack("!I", body[:4])[0] == 10
            return [x for x in body[4:].split(b"\0") if x]

    assert b"SCRAM-SHA-256-PLUS" in mechanisms(pg.port)
    assert mechanisms(tls_proxy.port) == [b"SCRAM-SHA-256"]


def test_upstream_verify_full_rejects_wrong_ca(pg: devcluster.Cluster, make_proxy,
                                               proxy_cert: tuple[Path, Path]) -> None:
    """verify-full really verifies: a CA that did not sign the server cert → 08006."""
    p = make_proxy({"upstream": {"tls": {"mode": "verify-full",
                                         "ca_file": str(proxy_cert[0])}}})
    with RawPG(p.port) as raw:
        raw.send(startup_packet({"user": APP_USER, "database": APP_DB}))
        msgs = raw.read_to_close()
    assert [k for k, _ in msgs] == [b"E"]
    assert error_fields(msgs[0][1])["C"] == "08006"
    assert "Traceback" not in p.log()


@pytest.mark.parametrize("mode", ["require", "verify-ca"])
def test_upstream_ca_file_is_verified_not_ignored(pg: devcluster.Cluster, make_proxy,
                                                  proxy_cert: tuple[Path, Path],
                                                  mode: str) -> None:
    """`require` (or `verify-ca`) with a `ca_file` verifies the server's chain against it,
    as libpq's sslmode=require does with a root certificate: a CA that did not sign the
    server's certificate -> 08006 saying so (and the log names the reason); the right CA
    -> an encrypted, working connection. Before, `require` ignored the CA silently."""
    p = make_proxy({"upstream": {"tls": {"mode": mode, "ca_file": str(proxy_cert[0])}}})
    with RawPG(p.port) as raw:
        raw.send(startup_packet({"user": APP_USER, "database": APP_DB}))
        msgs = raw.read_to_close()
    assert [k for k, _ in msgs] == [b"E"]
    fields = error_fields(msgs[0][1])
    assert fields["C"] == "08006" and "certificate did not verify" in fields["M"], fields
    assert "TLS certificate verification failed" in p.log() and "Traceback" not in p.log()
    good = make_proxy({"upstream": {"tls": {"mode": mode, "ca_file": str(pg.cert)}}})
    with psycopg.connect(good.conninfo(), autocommit=True) as conn:
        pid = conn.execute("select pg_backend_pid()").fetchone()[0]
        assert _upstream_ssl(pg, pid)


def test_tls_required_refuses_plaintext_clients(pg: devcluster.Cluster,
                                                proxy_cert: tuple[Path, Path]) -> None:
    """`listen.tls.required`: a startup packet that did not come over TLS gets FATAL 28000
    (like pg_hba's hostssl) before anything reaches the server; TLS clients get in."""
    config = _tls_config(proxy_cert, "disable")
    config["listen"]["tls"]["required"] = True
    p = ProxyProcess(pg, config).start()
    try:
        with pytest.raises(psycopg.OperationalError, match="requires TLS"):
            psycopg.connect(p.conninfo(sslmode="disable"))
        with RawPG(p.port) as raw:
            raw.send(startup_packet({"user": APP_USER, "database": APP_DB}))
            kind, body = raw.read_msg()
            assert kind == b"E" and error_fields(body)["C"] == "28000"
        for mode in ("require", "prefer"):
            with psycopg.connect(p.conninfo(sslmode=mode)) as conn:
                assert conn.info.pgconn.ssl_in_use
                assert conn.execute("select current_user").fetchone()[0] == APP_USER
    finally:
        p.stop()
