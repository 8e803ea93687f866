"""Issue 11 route 4: FunctionCall ('F') messages are checked like a call in SQL, and every
frontend message type has one explicit rule (checked, harmless, refused).

A FunctionCall names its function by OID only. The proxy resolves the OID through
pg_proc as loaded from this server and decides it as ``SELECT schema.name()``; an OID it
does not know, and ``set_config`` (whose effect the proxy could not follow), are denied.
A denial replaces the message with a statement that makes the server raise the 42501
itself, so the client gets ErrorResponse + ReadyForQuery with the server's own
transaction state. Each test runs through the plain relay and through tracking mode
(``protect:`` configured), with raw protocol messages: no driver sends 'F' on request.
"""

from __future__ import annotations

import copy
import json
import os
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from proxy import devcluster
from proxy.devcluster import free_port
from proxy.protocol import messages as m
from tests.conftest import (
    APP_DB,
    APP_PASSWORD,
    APP_USER,
    FLUSH,
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
    msg,
    parse_msg,
    query_msg,
)
from tests.integration.encryption_env import setup_sql, start_encrypted
from tests.integration.observability_env import scrape, wait_metrics
from tests.integration.policy_env import POLICY, ensure_schema, password

# payments_service may use large objects; support_agent, as in the example policy, may
# not, nor notify, nor admin functions.
FC_POLICY: dict[str, Any] = copy.deepcopy(POLICY)
FC_POLICY["roles"]["payments_service"]["allow"].append("large_objects")
PROTECT = {"public.fc_secrets.secret": {"type": "text"}}


@pytest.fixture(scope="module", params=["relay", "tracking"])
def fc_proxy(request: pytest.FixtureRequest, pg: devcluster.Cluster) -> Iterator[ProxyProcess]:
    ensure_schema(pg)
    extra = {
        **FC_POLICY,
        "metrics": {"host": "127.0.0.1", "port": free_port()},
        "audit": {"path": "audit.jsonl", "key_file": "audit.key"},
    }
    if request.param == "relay":
        p = ProxyProcess(pg, extra)
        key = p.dir / "audit.key"
        key.write_text(os.urandom(32).hex())
        key.chmod(0o600)
        p.start()
    else:
        setup_sql(pg, "CREATE TABLE IF NOT EXISTS fc_secrets (id int PRIMARY KEY, "
                      "secret bytea)")
        p = start_encrypted(pg, PROTECT, extra)
    p.mode = request.param  # type: ignore[attr-defined]
    wait_metrics(p)
    yield p
    p.stop()


def oid_of(pg: devcluster.Cluster, signature: str) -> int:
    """A function's OID as the server knows it (never assumed)."""
    return int(pg.psql(f"SELECT '{signature}'::pg_catalog.regprocedure::oid", db=APP_DB))


def fcall(oid: int, args: tuple[bytes | None, ...], formats: tuple[int, ...] = (),
          result_format: int = 0) -> bytes:
    """A FunctionCall message, as libpq's PQfn builds it."""
    body = struct.pack("!IH", oid, len(formats)) + b"".join(struct.pack("!H", f)
                                                             for f in formats)
    body += struct.pack("!H", len(args))
    for a in args:
        body += struct.pack("!i", -1) if a is None else struct.pack("!i", len(a)) + a
    return msg(b"F", body + struct.pack("!H", result_format))


def login(p: ProxyProcess | int, role: str, pw: str | None = None) -> RawPG:
    raw = RawPG(p if isinstance(p, int) else p.port)
    raw.login(role, pw if pw is not None else password(role), database=APP_DB)
    return raw


def call(raw: RawPG, oid: int, *args: bytes, formats: tuple[int, ...] = ()
         ) -> list[tuple[bytes, bytes]]:
    raw.send(fcall(oid, args, formats))
    return raw.read_until(b"Z")


def denied(replies: list[tuple[bytes, bytes]], *needles: str) -> bool:
    """ErrorResponse 42501 by strongroom, then ReadyForQuery; no function result."""
    kinds = [k for k, _ in replies]
    if kinds[-2:] != [b"E", b"Z"] or b"V" in kinds:
        return False
    fields = error_fields(replies[-2][1])
    return (fields.get("C") == "42501" and "strongroom" in fields.get("M", "")
            and all(n in fields.get("M", "") for n in needles))


def result(replies: list[tuple[bytes, bytes]]) -> bytes | None:
    """The value of a FunctionCallResponse (asserted to be one)."""
    assert [k for k, _ in replies] == [b"V", b"Z"], replies
    body = replies[0][1]
    n = struct.unpack("!i", body[:4])[0]
    return None if n < 0 else body[4 : 4 + n]


def still_usable(raw: RawPG) -> None:
    raw.send(query_msg("SELECT 41 + 1"))
    replies = raw.read_until(b"Z")
    assert [k for k, _ in replies] == [b"T", b"D", b"C", b"Z"], replies
    assert replies[1][1].endswith(b"42")


# ------------------------------------------------------------------ the routes of issue 11


def test_query_to_xml_is_denied_for_support_agent(pg, fc_proxy) -> None:
    """Route 4: query_to_xml runs SQL text the proxy never sees (here over a table the
    role may not read): admin, as in SQL."""
    oid = oid_of(pg, "query_to_xml(text,boolean,boolean,text)")
    with login(fc_proxy, "support_agent") as raw:
        replies = call(raw, oid, b"select * from accounts", b"false", b"false", b"")
        assert denied(replies, "query_to_xml", "admin"), replies
        assert replies[-1] == (b"Z", b"I")
        still_usable(raw)


def test_unlisted_role_gets_no_function_call(pg, fc_proxy) -> None:
    """Route 4: the superuser `postgres` is not in the policy (default: deny); through
    the proxy it could read a server file with query_to_xml over pg_read_file."""
    oid = oid_of(pg, "query_to_xml(text,boolean,boolean,text)")
    with login(fc_proxy, "postgres", pg.password) as raw:
        replies = call(raw, oid, b"select pg_read_file('PG_VERSION')", b"false", b"false",
                       b"")
        assert denied(replies, 'role "postgres" is not in the policy'), replies
        # Even a harmless built-in: an unlisted role gets nothing.
        assert denied(call(raw, oid_of(pg, "abs(integer)"), b"-3"))


def test_pg_notify_is_denied_without_notify(pg, fc_proxy) -> None:
    oid = oid_of(pg, "pg_notify(text,text)")
    with login(fc_proxy, "support_agent") as raw:
        assert denied(call(raw, oid, b"chan", b"payload"), "pg_notify", "notify")
    with login(fc_proxy, "payments_service") as raw:  # allow: notify
        assert result(call(raw, oid, b"chan", b"payload")) == b""


def test_lo_creat_needs_large_objects(pg, fc_proxy) -> None:
    oid = oid_of(pg, "lo_creat(integer)")
    with login(fc_proxy, "support_agent") as raw:
        replies = call(raw, oid, b"-1")
        assert denied(replies, "lo_creat", "large_objects"), replies
    with login(fc_proxy, "payments_service") as raw:
        raw.send(query_msg("BEGIN"))
        raw.read_until(b"Z")
        created = result(call(raw, oid, b"-1"))
        assert created is not None and int(created) > 0
        raw.send(query_msg("ROLLBACK"))
        raw.read_until(b"Z")


def test_set_config_by_function_call_is_denied(pg, fc_proxy) -> None:
    """Route 3 through 'F': the proxy would never see search_path change."""
    oid = oid_of(pg, "set_config(text,text,boolean)")
    for role in ("support_agent", "ops_admin"):
        with login(fc_proxy, role) as raw:
            replies = call(raw, oid, b"search_path", b"information_schema", b"false")
            assert denied(replies, "set_config"), replies
            raw.send(query_msg("SHOW search_path"))
            assert b"information_schema" not in b"".join(b for _, b in raw.read_until(b"Z"))


def test_unknown_oid_is_denied(fc_proxy) -> None:
    """The server would say 42883; the proxy does not forward what it cannot name."""
    with login(fc_proxy, "payments_service") as raw:
        replies = call(raw, 4_000_000_000, b"1")
        assert denied(replies, "OID 4000000000", "not known"), replies
        still_usable(raw)


def test_denial_in_a_transaction_block_aborts_it(pg, fc_proxy) -> None:
    """The server raises the refusal itself: the block is failed ('E'), as after a real
    failed call, and ROLLBACK brings the session back."""
    oid = oid_of(pg, "lo_creat(integer)")
    with login(fc_proxy, "support_agent") as raw:
        raw.send(query_msg("BEGIN"))
        raw.read_until(b"Z")
        replies = call(raw, oid, b"-1")
        assert denied(replies) and replies[-1] == (b"Z", b"E"), replies
        raw.send(query_msg("SELECT 1"))
        assert error_fields(raw.read_until(b"Z")[0][1])["C"] == "25P02"
        raw.send(query_msg("ROLLBACK"))
        assert raw.read_until(b"Z")[-1] == (b"Z", b"I")
        still_usable(raw)


def test_allowed_function_calls_still_work(pg, fc_proxy) -> None:
    """A harmless built-in, pipelined with a Query, in text and binary; a user function
    the role's `functions:` lists."""
    with login(fc_proxy, "support_agent") as raw:
        raw.send(fcall(oid_of(pg, "int4pl(integer,integer)"), (b"2", b"40"))
                 + query_msg("SELECT 1")
                 + fcall(oid_of(pg, "abs(integer)"), (struct.pack("!i", -7),), (1,), 1))
        first = raw.read_until(b"Z")
        assert result(first) == b"42"
        raw.read_until(b"Z")
        assert result(raw.read_until(b"Z")) == struct.pack("!i", 7)
    with login(fc_proxy, "ops_admin") as raw:
        assert result(call(raw, oid_of(pg, "public.exfiltrate(text)"), b"x")) == b"x"
    with login(fc_proxy, "payments_service") as raw:  # not listed for this role
        assert denied(call(raw, oid_of(pg, "public.exfiltrate(text)"), b"x"),
                      "exfiltrate")


def test_large_objects_through_function_calls(pg, fc_proxy) -> None:
    """What libpq's lo_* client functions send (binary FunctionCalls in a transaction),
    for a role with `large_objects`."""
    blob = os.urandom(5000)
    fn = {name: oid_of(pg, sig) for name, sig in (
        ("creat", "lo_creat(integer)"), ("open", "lo_open(oid,integer)"),
        ("write", "lowrite(integer,bytea)"), ("lseek", "lo_lseek(integer,integer,integer)"),
        ("read", "loread(integer,integer)"), ("close", "lo_close(integer)"),
        ("unlink", "lo_unlink(oid)"))}

    def i32(v: int) -> bytes:
        return struct.pack("!i", v)

    def bcall(raw: RawPG, name: str, *args: bytes) -> bytes:
        raw.send(fcall(fn[name], args, (1,), 1))
        value = result(raw.read_until(b"Z"))
        assert value is not None
        return value

    with login(fc_proxy, "payments_service") as raw:
        raw.send(query_msg("BEGIN"))
        raw.read_until(b"Z")
        lo = bcall(raw, "creat", i32(-1))
        fd = bcall(raw, "open", lo, i32(0x20000 | 0x40000))
        assert bcall(raw, "write", fd, blob) == i32(len(blob))
        assert bcall(raw, "lseek", fd, i32(0), i32(0)) == i32(0)
        assert bcall(raw, "read", fd, i32(len(blob) + 10)) == blob
        assert bcall(raw, "close", fd) == i32(0)
        assert bcall(raw, "unlink", lo) == i32(1)
        raw.send(query_msg("COMMIT"))
        assert raw.read_until(b"Z")[-1] == (b"Z", b"I")


def test_psql_large_objects(pg, fc_proxy, tmp_path: Path) -> None:
    """libpq itself: psql's \\lo_import / \\lo_export / \\lo_unlink (FunctionCalls)."""
    src, back = tmp_path / "in.bin", tmp_path / "out.bin"
    src.write_bytes(os.urandom(70_000))

    def psql(role: str, command: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PGPASSWORD": password(role), "PGSSLMODE": "disable"}
        return subprocess.run(
            ["psql", "-h", "127.0.0.1", "-p", str(fc_proxy.port), "-U", role, "-d", APP_DB,
             "-X", "-v", "ON_ERROR_STOP=1", "-c", command],
            env=env, capture_output=True, text=True, timeout=30,
        )

    out = psql("payments_service", f"\\lo_import {src}")
    assert out.returncode == 0, out.stderr
    lo = int(out.stdout.split()[-1])
    out = psql("payments_service", f"\\lo_export {lo} {back}")
    assert out.returncode == 0, out.stderr
    assert back.read_bytes() == src.read_bytes()
    refused = psql("support_agent", f"\\lo_export {lo} {tmp_path / 'no.bin'}")
    assert refused.returncode != 0 and "strongroom" in refused.stderr
    assert psql("payments_service", f"\\lo_unlink {lo}").returncode == 0


def test_large_objects_in_sql_need_the_right(fc_proxy) -> None:
    """The same right governs lo_* written in SQL (they were admin-only before)."""
    with psycopg.connect(fc_proxy.conninfo(user="payments_service",
                                           password=password("payments_service"))) as conn:
        lo = conn.execute("SELECT lo_from_bytea(0, 'abc')").fetchone()[0]
        assert conn.execute("SELECT lo_get(%s)", (lo,)).fetchone()[0] == b"abc"
        conn.rollback()
    with psycopg.connect(fc_proxy.conninfo(user="support_agent",
                                           password=password("support_agent"))) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="large_objects"):
            conn.execute("SELECT lo_from_bytea(0, 'abc')")


def test_function_created_later_is_known_to_the_next_session(pg, fc_proxy) -> None:
    """The OID map is the server's: a function created through the proxy is unknown to
    sessions already running (denied, fail closed) and resolved by the next one."""
    with login(fc_proxy, "ops_admin") as admin:
        admin.send(query_msg("DROP FUNCTION IF EXISTS public.fc_later(int); "
                             "CREATE FUNCTION public.fc_later(int) RETURNS int "
                             "LANGUAGE sql AS 'SELECT $1'"))
        assert [k for k, _ in admin.read_until(b"Z")][-1] == b"Z"
        oid = oid_of(pg, "public.fc_later(integer)")
        assert denied(call(admin, oid, b"1"), "not known")
    try:
        with login(fc_proxy, "ops_admin") as admin:
            # Known now, and checked: not in ops_admin's `functions:`.
            assert denied(call(admin, oid, b"1"), "fc_later", "is not allowed")
    finally:
        pg.psql("DROP FUNCTION IF EXISTS public.fc_later(int)", db=APP_DB)


def test_denials_are_counted_and_audited(pg, fc_proxy) -> None:
    oid = oid_of(pg, "pg_notify(text,text)")
    with login(fc_proxy, "support_agent") as raw:
        assert denied(call(raw, oid, b"audited_chan", b"x"))
    text = scrape(fc_proxy)
    line = next(x for x in text.splitlines() if x.startswith("strongroom_policy_decisions")
                and 'role="support_agent"' in x and 'decision="deny"' in x
                and 'reason="function_not_allowed"' in x)
    assert float(line.rsplit(" ", 1)[1]) >= 1
    records = [json.loads(x) for x in (fc_proxy.dir / "audit.jsonl").read_text().splitlines()]
    assert any(r.get("decision") == "deny" and "pg_notify" in (r.get("reason") or "")
               and r.get("role") == "support_agent" for r in records), records[-3:]


# ------------------------------------------------------------------ the message-type table

_DENIED_SQL = "SELECT tax_id FROM customers WHERE id = $1"

# What each frontend message type, sent as the first message of a request, must get:
# "denied" (the gate checked it: 42501 by strongroom), "same" (harmless: the server's own
# reply, byte for byte as without the proxy), "closed" (Terminate: no reply), or
# "refused" (FATAL 08P01, the session ends, as PostgreSQL ends it).
_TYPE_SCRIPTS: dict[int, tuple[str, bytes]] = {
    ord("Q"): ("denied", query_msg(_DENIED_SQL.replace("$1", "1"))),
    ord("P"): ("denied", parse_msg(_DENIED_SQL, "", (23,)) + bind_msg((b"1",))
               + execute_msg() + SYNC),
    ord("B"): ("denied", parse_msg(_DENIED_SQL, "s", (23,)) + SYNC
               + bind_msg((b"1",), "", "s") + execute_msg() + SYNC),
    ord("F"): ("denied", b""),  # filled in with a live OID
    ord("D"): ("same", describe_msg(b"S", "nope") + SYNC),
    ord("E"): ("same", execute_msg("nope") + SYNC),
    ord("C"): ("same", close_msg(b"S", "nope") + SYNC),
    ord("S"): ("same", SYNC),
    ord("H"): ("same", FLUSH + SYNC),
    ord("d"): ("same", msg(b"d", b"1\tx\n") + SYNC),
    ord("c"): ("same", msg(b"c") + SYNC),
    ord("f"): ("same", msg(b"f", cstr("no copy")) + SYNC),
    ord("X"): ("closed", TERMINATE),
    ord("p"): ("refused", msg(b"p", cstr("again"))),
}
_EXPECTED = {"denied": "checked", "same": "harmless", "closed": "harmless",
             "refused": "refused"}
# A sample of the type bytes PostgreSQL does not define (every one is covered by the unit
# table test; these run through real sessions too).
_UNDEFINED = (0, ord("A"), ord("Z"), ord("T"), ord("e"), 0x7F, 0xFF)


def test_every_defined_type_has_its_rule() -> None:
    rules = getattr(m, "FRONTEND_RULES", None)
    assert {t: _EXPECTED[how] for t, (how, _) in _TYPE_SCRIPTS.items()} == rules
    assert set(m.FRONTEND_TYPES) == set(rules)


def _replies(raw: RawPG, script: bytes, syncs: int) -> list[tuple[bytes, bytes]]:
    raw.send(script)
    out: list[tuple[bytes, bytes]] = []
    for _ in range(syncs):
        out += raw.read_until(b"Z")
    return out


@pytest.mark.parametrize("kind", [*_TYPE_SCRIPTS, *_UNDEFINED],
                         ids=lambda k: f"type_{k:02x}")
def test_message_type_rule(pg, fc_proxy, kind: int) -> None:
    how, script = _TYPE_SCRIPTS.get(kind, ("refused", msg(bytes([kind]), b"\0\0\0\0")))
    if kind == ord("F"):
        script = fcall(oid_of(pg, "query_to_xml(text,boolean,boolean,text)"),
                       (b"select 1", b"false", b"false", b""))
    syncs = script.count(SYNC) + (kind in (ord("Q"), ord("F")))
    with login(fc_proxy, "support_agent") as raw:
        if how == "denied":
            replies = _replies(raw, script, syncs)
            assert denied([r for r in replies if r[0] in (b"E", b"Z")][-2:]), replies
            still_usable(raw)
        elif how == "same":
            replies = _replies(raw, script, syncs)
            with login(pg.port, "support_agent") as direct:
                assert replies == _replies(direct, script, syncs)
            still_usable(raw)
        elif how == "closed":
            raw.send(script)
            assert raw.read_to_close() == []
        else:
            raw.send(script)
            replies = raw.read_to_close()
            assert [k for k, _ in replies] == [b"E"], replies
            fields = error_fields(replies[0][1])
            assert (fields["S"], fields["C"]) == ("FATAL", "08P01"), fields
            with login(pg.port, "support_agent") as direct:  # what PostgreSQL does
                direct.send(script)
                theirs = direct.read_to_close()
                assert [error_fields(b)["C"] for _, b in theirs] == ["08P01"]


def test_encryption_without_policy(pg) -> None:
    """Tracking mode with no policy: nothing decides on functions, but the proxy still
    follows search_path for its planner, so set_config by OID is refused; the OID map
    follows DDL sent through the proxy there too."""
    setup_sql(pg, "CREATE TABLE IF NOT EXISTS fc_secrets (id int PRIMARY KEY, secret bytea)")
    p = start_encrypted(pg, PROTECT)
    try:
        with login(p, APP_USER, APP_PASSWORD) as raw:
            assert denied(call(raw, oid_of(pg, "set_config(text,text,boolean)"),
                               b"search_path", b"information_schema", b"false"), "set_config")
            assert result(call(raw, oid_of(pg, "int4pl(integer,integer)"), b"2", b"40")) \
                == b"42"
            raw.send(query_msg("DROP FUNCTION IF EXISTS fc_plain(int); CREATE FUNCTION "
                               "fc_plain(int) RETURNS int LANGUAGE sql AS 'SELECT $1 + 1'"))
            raw.read_until(b"Z")
            assert denied(call(raw, oid_of(pg, "public.fc_plain(integer)"), b"1"),
                          "not known")
        with login(p, APP_USER, APP_PASSWORD) as raw:
            assert result(call(raw, oid_of(pg, "public.fc_plain(integer)"), b"1")) == b"2"
    finally:
        p.stop()
        pg.psql("DROP FUNCTION IF EXISTS public.fc_plain(int)", db=APP_DB)
