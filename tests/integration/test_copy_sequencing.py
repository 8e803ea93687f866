"""Issue 11, route 2: every COPY execution gets its own transformer, in order.

Only the first COPY the proxy planned used to be sealed: a second COPY FROM STDIN in one
Query, a named COPY executed twice, two named COPYs pipelined stored their rows as sent,
and a second COPY TO STDOUT returned raw envelopes to a role whose view is `masked`.
CopyData that no planned COPY waited for (behind a refused COPY) crossed the wire as
sent. These tests drive the exact message sequences with raw protocol messages through
the real proxy, read what got stored directly from PostgreSQL, and record every byte
the proxy sends to the server (a relay between the two) to prove a protected plaintext
never crossed that wire.
"""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import (
    FLUSH,
    PW_PASSWORD,
    PW_USER,
    SYNC,
    RawPG,
    bind_msg,
    cstr,
    describe_msg,
    error_fields,
    execute_msg,
    msg,
    parse_msg,
    query_msg,
)
from tests.integration.encryption_env import direct, leaks, setup_sql, start_encrypted

PROTECT = {"public.q_cards.pan": {"type": "text", "search": "blind_index", "mask": "last4"},
           "public.q_notes.note": {"type": "text"}}
SCHEMA = """
CREATE TABLE q_cards (customer_id int, pan bytea, pan_bidx bytea);
CREATE TABLE q_plain (customer_id int, pan text);
CREATE TABLE q_secret (customer_id int, pan text);
CREATE TABLE q_notes (customer_id int, note bytea);
GRANT ALL ON q_cards, q_plain, q_secret, q_notes TO PUBLIC;
"""
POLICY = {
    "roles": {
        # The raw client (cleartext password, so RawPG can log in): may copy both ways,
        # sees pan masked.
        PW_USER: {
            "tables": {"public.q_cards": ["select", "insert", "copy_in", "copy_out"],
                       "public.q_plain": ["select", "insert", "copy_in", "copy_out"],
                       "public.q_notes": ["select", "insert", "copy_in"]},
            "columns": {"public.q_cards.pan": "masked"},
        },
        "app": {"tables": {"public.*": ["select", "insert", "copy_in", "copy_out",
                                        "truncate"]}},
    },
    "default": "deny",
}
COPY_IN = "COPY q_cards (customer_id, pan) FROM STDIN"
COPY_IN_CSV = "COPY q_cards (pan, customer_id) FROM STDIN WITH (FORMAT csv)"
COPY_OUT = "COPY q_cards (customer_id, pan) TO STDOUT"
MASKED = re.compile(rb"\*{12}\d{4}")


class Recorder:
    """A TCP relay between the proxy and PostgreSQL that keeps every byte the proxy
    sends upstream: what the server was sent, not what the proxy meant to send."""

    def __init__(self, port: int) -> None:
        self.upstream = port
        self.sent = bytearray()
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self.upstream))
            threading.Thread(target=self._pipe, args=(down, up, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(up, down, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        try:
            while chunk := src.recv(65536):
                if record:
                    with self.lock:
                        self.sent += chunk
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def bytes_sent(self) -> bytes:
        with self.lock:
            return bytes(self.sent)

    def close(self) -> None:
        self.listener.close()


@dataclass
class Env:
    pg: object
    proxy: object
    recorder: Recorder


@pytest.fixture(scope="module")
def env(pg_aux) -> Iterator[Env]:
    setup_sql(pg_aux, SCHEMA)
    rec = Recorder(pg_aux.port)
    p = start_encrypted(pg_aux, PROTECT, {"upstream": {"port": rec.port}, **POLICY})
    yield Env(pg_aux, p, rec)
    p.stop()
    rec.close()
    setup_sql(pg_aux, "DROP TABLE q_cards, q_plain, q_secret, q_notes")


_ids = iter(range(1000, 10**6))


def pans(n: int) -> dict[int, str]:
    """n fresh (customer_id, PAN) pairs, each PAN unique to this test run."""
    out = {}
    for _ in range(n):
        i = next(_ids)
        out[i] = f"4{i:015d}"
    return out


def text_rows(rows: dict[int, str]) -> bytes:
    return b"".join(f"{i}\t{p}\n".encode() for i, p in rows.items())


def csv_rows(rows: dict[int, str]) -> bytes:
    return b"".join(f"{p},{i}\n".encode() for i, p in rows.items())


def login(env: Env) -> RawPG:
    raw = RawPG(env.proxy.port)  # type: ignore[attr-defined]
    raw.login(PW_USER, PW_PASSWORD)
    return raw


def kinds(replies: list[tuple[bytes, bytes]]) -> list[bytes]:
    return [k for k, _ in replies]


def errors(replies: list[tuple[bytes, bytes]]) -> list[dict[str, str]]:
    return [error_fields(b) for k, b in replies if k == b"E"]


def assert_sealed(env: Env, rows: dict[int, str]) -> None:
    """Read directly: each row is stored with an envelope in pan and its blind index,
    and no plaintext of them is anywhere in q_cards or on the wire to the server."""
    with direct(env.pg) as d:  # type: ignore[arg-type]
        got = {i: (bytes(p) if p is not None else None, b)
               for i, p, b in d.execute("SELECT customer_id, pan, pan_bidx FROM q_cards "
                                        "WHERE customer_id = ANY(%s)", (list(rows),))}
    assert set(got) == set(rows)
    for i, (pan, bidx) in got.items():
        assert pan is not None and pan[:1] == b"\x02" and len(pan) > 28, (i, pan)
        assert bidx is not None, i
    cells = [c for pan, bidx in got.values() for c in (pan, bytes(bidx))]
    assert leaks(cells, list(rows.values())) == []
    assert leaks([env.recorder.bytes_sent()], list(rows.values())) == []


def readable(env: Env, rows: dict[int, str]) -> None:
    """A plaintext-view role (app, through the proxy) reads back what was written."""
    with psycopg.connect(env.proxy.conninfo(), autocommit=True) as c:  # type: ignore[attr-defined]
        got = dict(c.execute("SELECT customer_id, pan FROM q_cards WHERE customer_id = "
                             "ANY(%s)", (list(rows),)).fetchall())
    assert got == rows


def copy_out_rows(replies: list[tuple[bytes, bytes]]) -> list[list[tuple[int, bytes]]]:
    """Per COPY TO STDOUT of a reply (H ... c), its rows as (customer_id, pan field)."""
    out: list[list[tuple[int, bytes]]] = []
    current: list[tuple[int, bytes]] | None = None
    for k, b in replies:
        if k == b"H":
            current = []
        elif k == b"d" and current is not None:
            for line in b.splitlines():
                cid, pan = line.split(b"\t")
                current.append((int(cid), pan))
        elif k == b"c" and current is not None:
            out.append(current)
            current = None
    return out


def assert_masked(copies: list[list[tuple[int, bytes]]], expect: dict[int, str]) -> None:
    """Every pan a masked-view role got is the mask of the right PAN, never an envelope."""
    seen = 0
    for rows in copies:
        for cid, pan in rows:
            if cid in expect:
                assert MASKED.fullmatch(pan), pan[:40]
                assert pan[-4:] == expect[cid][-4:].encode()
                seen += 1
    assert seen


# ---------------------------------------------------------------- COPY FROM STDIN


def test_two_copy_in_in_one_query_waiting(env: Env) -> None:
    first, second = pans(2), pans(2)
    with login(env) as raw:
        raw.send(query_msg(f"{COPY_IN}; {COPY_IN}"))
        assert kinds(raw.read_until(b"G")) == [b"G"]
        raw.send(msg(b"d", text_rows(first)) + msg(b"c"))
        assert kinds(raw.read_until(b"G")) == [b"C", b"G"]
        raw.send(msg(b"d", text_rows(second)) + msg(b"c"))
        assert kinds(raw.read_until(b"Z")) == [b"C", b"Z"]
    assert_sealed(env, first | second)
    readable(env, first | second)


def test_two_copy_in_in_one_query_sent_without_waiting(env: Env) -> None:
    first, third = pans(2), pans(2)
    with login(env) as raw:
        raw.send(query_msg(f"{COPY_IN}; COPY q_plain FROM STDIN; {COPY_IN_CSV}")
                 + msg(b"d", text_rows(first)) + msg(b"c")
                 + msg(b"d", b"7\tnot secret\n") + msg(b"c")
                 + msg(b"d", csv_rows(third)) + msg(b"c"))
        assert kinds(raw.read_until(b"Z")) == [b"G", b"C", b"G", b"C", b"G", b"C", b"Z"]
    assert_sealed(env, first | third)
    readable(env, first | third)


def test_second_copy_in_without_blind_index_is_sealed(env: Env) -> None:
    """Without a blind index (no column appended to the COPY's list, so the server
    takes any row as sent), the second COPY's rows were stored in plaintext."""
    rows = pans(2)
    first, second = dict(list(rows.items())[:1]), dict(list(rows.items())[1:])
    sql = "COPY q_notes (customer_id, note) FROM STDIN"
    with login(env) as raw:
        raw.send(query_msg(f"{sql}; {sql}"))
        assert kinds(raw.read_until(b"G")) == [b"G"]
        raw.send(msg(b"d", text_rows(first)) + msg(b"c"))
        assert kinds(raw.read_until(b"G")) == [b"C", b"G"]
        raw.send(msg(b"d", text_rows(second)) + msg(b"c"))
        assert kinds(raw.read_until(b"Z")) == [b"C", b"Z"]
    with direct(env.pg) as d:  # type: ignore[arg-type]
        notes = [bytes(v) for (v,) in d.execute(
            "SELECT note FROM q_notes WHERE customer_id = ANY(%s)", (list(rows),))]
    assert len(notes) == 2 and all(n[:1] == b"\x02" and len(n) > 28 for n in notes)
    assert leaks(notes, list(rows.values())) == []
    assert leaks([env.recorder.bytes_sent()], list(rows.values())) == []


def test_named_copy_in_executed_twice(env: Env) -> None:
    first, second = pans(2), pans(2)
    with login(env) as raw:
        raw.send(parse_msg(COPY_IN, "cin") + bind_msg(stmt="cin") + execute_msg())
        assert kinds(raw.read_until(b"G")) == [b"1", b"2", b"G"]
        raw.send(msg(b"d", text_rows(first)) + msg(b"c") + FLUSH)
        assert kinds(raw.read_until(b"C")) == [b"C"]
        raw.send(bind_msg(stmt="cin") + execute_msg())
        assert kinds(raw.read_until(b"G")) == [b"2", b"G"]
        raw.send(msg(b"d", text_rows(second)) + msg(b"c") + SYNC)
        assert kinds(raw.read_until(b"Z")) == [b"C", b"Z"]
    assert_sealed(env, first | second)
    readable(env, first | second)


def test_two_named_copies_pipelined(env: Env) -> None:
    first, second, third = pans(2), pans(2), pans(1)
    with login(env) as raw:
        raw.send(parse_msg(COPY_IN, "ca") + parse_msg(COPY_IN_CSV, "cb")
                 + bind_msg(stmt="ca") + execute_msg()
                 + msg(b"d", text_rows(first)) + msg(b"c")
                 + bind_msg(stmt="cb") + execute_msg()
                 + msg(b"d", csv_rows(second)) + msg(b"c")
                 + bind_msg(stmt="ca") + execute_msg()
                 + msg(b"d", text_rows(third)) + msg(b"c") + SYNC)
        replies = raw.read_until(b"Z")
        assert errors(replies) == []
        assert kinds(replies).count(b"G") == 3
    assert_sealed(env, first | second | third)
    readable(env, first | second | third)


# ---------------------------------------------------------------- COPY TO STDOUT


@pytest.fixture(scope="module")
def stored(env: Env) -> dict[int, str]:
    rows = pans(3)
    with psycopg.connect(env.proxy.conninfo(), autocommit=True) as c:  # type: ignore[attr-defined]
        with c.cursor().copy(COPY_IN) as cp:
            cp.write(text_rows(rows))
    return rows


def test_two_copy_out_in_one_query_are_masked(env: Env, stored: dict[int, str]) -> None:
    with login(env) as raw:
        raw.send(query_msg(f"{COPY_OUT}; COPY q_plain TO STDOUT; {COPY_OUT}"))
        replies = raw.read_until(b"Z")
    assert errors(replies) == [] and kinds(replies).count(b"H") == 3
    copies = copy_out_rows(replies)
    assert_masked([copies[0]], stored)
    assert_masked([copies[2]], stored)


def test_named_copy_out_executed_twice_is_masked(env: Env, stored: dict[int, str]) -> None:
    with login(env) as raw:
        raw.send(parse_msg(COPY_OUT, "cout") + bind_msg(stmt="cout") + execute_msg()
                 + bind_msg(stmt="cout") + execute_msg() + SYNC)
        replies = raw.read_until(b"Z")
    assert errors(replies) == [] and kinds(replies).count(b"H") == 2
    copies = copy_out_rows(replies)
    assert len(copies) == 2
    for rows in copies:
        assert_masked([rows], stored)


# ---------------------------------------------------------------- nothing waits for it


def test_data_behind_a_refused_copy_is_not_forwarded(env: Env) -> None:
    """A COPY the proxy refuses (policy: no right on q_secret; planner: no column list
    on a blind-indexed table) with rows sent right behind it: the rows never reach
    the server, and the session stays in step."""
    secret = pans(1)
    for refused in ("COPY q_secret FROM STDIN", "COPY q_cards FROM STDIN"):
        with login(env) as raw:
            raw.send(query_msg(refused) + msg(b"d", text_rows(secret)) + msg(b"c")
                     + query_msg("SELECT 41 + 1"))
            first = raw.read_until(b"Z")
            assert [e["C"] for e in errors(first)] in (["42501"], ["0A000"])
            second = raw.read_until(b"Z")
            assert (b"D", b"\x00\x01\x00\x00\x00\x0242") in second
            # extended protocol: Parse refused, then Bind/Execute and rows
            raw.send(parse_msg(refused, "r") + bind_msg(stmt="r") + execute_msg()
                     + msg(b"d", text_rows(secret)) + msg(b"c") + SYNC
                     + query_msg("SELECT 41 + 1"))
            assert errors(raw.read_until(b"Z"))
            assert (b"D", b"\x00\x01\x00\x00\x00\x0242") in raw.read_until(b"Z")
    assert leaks([env.recorder.bytes_sent()], list(secret.values())) == []
    with direct(env.pg) as d:  # type: ignore[arg-type]
        assert d.execute("SELECT count(*) FROM q_secret").fetchone() == (0,)


def test_stray_copy_data_is_not_forwarded(env: Env) -> None:
    """CopyData / CopyDone / CopyFail with no COPY at all: dropped, session in step."""
    secret = pans(1)
    with login(env) as raw:
        raw.send(msg(b"d", text_rows(secret)) + msg(b"c") + msg(b"f", cstr("x"))
                 + query_msg("SELECT 1"))
        assert kinds(raw.read_until(b"Z")) == [b"T", b"D", b"C", b"Z"]
    assert leaks([env.recorder.bytes_sent()], list(secret.values())) == []


def test_copy_failing_on_the_server_leaves_no_stale_plan(env: Env) -> None:
    """A COPY the server rejects before copy mode (its plan never starts): the next
    COPY, protected or not, gets its own plan, not the leftover."""
    sealed, plain, later = pans(2), pans(1), pans(1)
    with login(env) as raw:
        # protected COPY that fails (an earlier statement of the Query fails) ...
        raw.send(query_msg(f"SELECT 1/0; {COPY_IN}"))
        assert [e["C"] for e in errors(raw.read_until(b"Z"))] == ["22012"]
        # ... then an unprotected named COPY: its rows go as sent, not sealed
        raw.send(parse_msg("COPY q_plain (customer_id, pan) FROM STDIN", "cp")
                 + bind_msg(stmt="cp") + execute_msg()
                 + msg(b"d", text_rows(plain)) + msg(b"c") + SYNC)
        assert errors(raw.read_until(b"Z")) == []
        # an unprotected COPY that fails (no such column) ... then a protected one
        raw.send(query_msg("COPY q_plain (nonexistent) FROM STDIN"))
        assert [e["C"] for e in errors(raw.read_until(b"Z"))] == ["42703"]
        raw.send(query_msg(COPY_IN) + msg(b"d", text_rows(sealed)) + msg(b"c"))
        assert errors(raw.read_until(b"Z")) == []
        # extended: Execute of a protected COPY skipped (Bind fails), then a plain one
        raw.send(parse_msg(COPY_IN, "cz") + bind_msg((b"1",), stmt="cz") + execute_msg()
                 + SYNC)
        assert [e["C"] for e in errors(raw.read_until(b"Z"))] == ["08P01"]
        raw.send(query_msg("COPY q_plain (customer_id, pan) FROM STDIN")
                 + msg(b"d", text_rows(later)) + msg(b"c"))
        assert errors(raw.read_until(b"Z")) == []
    with direct(env.pg) as d:  # type: ignore[arg-type]
        got = dict(d.execute("SELECT customer_id, pan FROM q_plain WHERE customer_id = "
                             "ANY(%s)", (list(plain | later),)).fetchall())
    assert got == plain | later
    assert_sealed(env, sealed)


# ---------------------------------------------------------------- property


@dataclass(frozen=True)
class Op:
    kind: str  # in_text | in_csv | in_plain | out | out_plain
    n: int


OPS = st.builds(Op, st.sampled_from(["in_text", "in_csv", "in_plain", "out", "out_plain"]),
                st.integers(min_value=0, max_value=3))
SQL = {"in_text": COPY_IN, "in_csv": COPY_IN_CSV,
       "in_plain": "COPY q_plain (customer_id, pan) FROM STDIN",
       "out": COPY_OUT, "out_plain": "COPY q_plain (customer_id, pan) TO STDOUT"}


def _data(op: Op) -> tuple[dict[int, str], bytes]:
    rows = pans(op.n)
    return rows, csv_rows(rows) if op.kind == "in_csv" else text_rows(rows)


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(OPS, min_size=1, max_size=6), extended=st.booleans(),
       wait=st.booleans())
def test_interleaved_copies(env: Env, stored: dict[int, str], ops: list[Op],
                            extended: bool, wait: bool) -> None:
    """Random sequences of COPY IN / OUT on the protected and a plain table, in one
    Query (waiting for each CopyInResponse, or not) or as pipelined Executes: every
    protected value stored is an envelope with its blind index, every plain one as
    sent, and every protected value a masked-view role reads is masked."""
    sealed: dict[int, str] = {}
    plain: dict[int, str] = {}
    data: list[bytes] = []
    for op in ops:
        if op.kind.startswith("in"):
            rows, payload = _data(op)
            (plain if op.kind == "in_plain" else sealed).update(rows)
            data.append(msg(b"d", payload) + msg(b"c") if payload else msg(b"c"))
        else:
            data.append(b"")
    with login(env) as raw:
        if extended:
            out = b"".join(parse_msg(SQL[k], k) for k in {op.kind for op in ops})
            for op, d in zip(ops, data, strict=True):
                out += bind_msg(stmt=op.kind) + execute_msg() + d
            raw.send(out + SYNC)
            replies = raw.read_until(b"Z")
        elif wait:
            raw.send(query_msg("; ".join(SQL[op.kind] for op in ops)))
            replies = []
            for op, d in zip(ops, data, strict=True):
                if op.kind.startswith("in"):
                    replies += raw.read_until(b"G")
                    raw.send(d)
            replies += raw.read_until(b"Z")
        else:
            raw.send(query_msg("; ".join(SQL[op.kind] for op in ops)) + b"".join(data))
            replies = raw.read_until(b"Z")
    assert errors(replies) == []
    copies = copy_out_rows(replies)
    assert len(copies) == sum(op.kind.startswith("out") for op in ops)
    for rows in copies:
        for _cid, pan in rows:
            assert not pan.startswith(b"\\\\x"), pan[:40]  # never an envelope
    everything = {**stored, **sealed}
    protected = [rows for op, rows in zip([o for o in ops if o.kind.startswith("out")],
                                          copies, strict=True) if op.kind == "out"]
    for rows in protected:
        for cid, pan in rows:
            if cid in everything:
                assert MASKED.fullmatch(pan) and pan[-4:] == everything[cid][-4:].encode()
    if sealed:
        assert_sealed(env, sealed)
    if plain:
        with direct(env.pg) as d:  # type: ignore[arg-type]
            got = dict(d.execute("SELECT customer_id, pan FROM q_plain WHERE customer_id = "
                                 "ANY(%s)", (list(plain),)).fetchall())
        assert got == plain


def test_other_message_while_a_copy_may_wait_for_data_refuses_the_session(env: Env) -> None:
    """In copy-in mode the server refuses a Query (protocol violation); outside it
    (the COPY failed first) it runs it. The proxy cannot tell which, so a Query sent
    behind a COPY FROM STDIN before its data ends the session, with the proxy's own
    FATAL and before anything of it is forwarded (the guard lifts once the server
    finished the request, as the first exchange shows)."""
    rows = pans(1)
    with login(env) as raw:
        raw.send(query_msg(f"SELECT 1/0; {COPY_IN}"))  # finished by the server: no guard
        assert [e["C"] for e in errors(raw.read_until(b"Z"))] == ["22012"]
        raw.send(query_msg(COPY_IN) + query_msg(f"{COPY_IN_CSV}")
                 + msg(b"d", csv_rows(rows)) + msg(b"c"))
        replies = raw.read_to_close()
    fatal = [e for e in errors(replies) if e["S"] == "FATAL"]
    assert len(fatal) == 1 and fatal[0]["C"] == "08P01"
    assert "may be waiting for its data" in fatal[0]["M"]
    assert leaks([env.recorder.bytes_sent()], list(rows.values())) == []
    with direct(env.pg) as d:  # type: ignore[arg-type]
        assert d.execute("SELECT count(*) FROM q_cards WHERE customer_id = ANY(%s)",
                         (list(rows),)).fetchone() == (0,)


# ---------------------------------------------------------------- libpq's extended COPY


def test_sync_inside_copy_in_leaves_no_stale_request(env: Env) -> None:
    """libpq sends an extended-protocol COPY FROM STDIN as Parse/Bind/Describe/Execute
    and Sync at once, then the data, CopyDone and a second Sync (PQputCopyEnd). The
    first Sync arrives while the server is in copy-in mode, which ignores it: one
    ReadyForQuery answers both Syncs. The proxy used to expect two, so a second such
    COPY in the session (and anything after) met a stale entry and failed closed."""
    first, second = pans(2), pans(2)

    def extended_copy(rows: dict[int, str]) -> bytes:
        return (parse_msg(COPY_IN) + bind_msg() + describe_msg(b"P") + execute_msg() + SYNC
                + msg(b"d", text_rows(rows)) + msg(b"c") + SYNC)

    with login(env) as raw:
        for rows in (first, second):
            raw.send(extended_copy(rows))
            replies = raw.read_until(b"Z")
            assert errors(replies) == []
            assert kinds(replies) == [b"1", b"2", b"n", b"G", b"C", b"Z"]
        # a Flush inside the stream is ignored by the server as well
        third = pans(1)
        raw.send(parse_msg(COPY_IN) + bind_msg() + execute_msg() + FLUSH + SYNC
                 + msg(b"d", text_rows(third)) + FLUSH + msg(b"c") + SYNC
                 + query_msg("SELECT 41 + 1"))
        replies = raw.read_until(b"Z")
        assert errors(replies) == [] and kinds(replies) == [b"1", b"2", b"G", b"C", b"Z"]
        assert (b"D", b"\x00\x01\x00\x00\x00\x0242") in raw.read_until(b"Z")
    assert_sealed(env, first | second | third)
    readable(env, first | second | third)


def test_sync_behind_a_copy_the_server_refused_is_a_real_sync(env: Env) -> None:
    """The same libpq sequence for a COPY the server fails before copy mode (no such
    column): then the first Sync is a real one (ReadyForQuery), the data is dropped and
    the second Sync gets its own ReadyForQuery. The session stays in step."""
    rows = pans(1)
    with login(env) as raw:
        raw.send(parse_msg("COPY q_plain (nonexistent) FROM STDIN") + bind_msg()
                 + execute_msg() + SYNC + msg(b"d", b"7\tnot secret\n") + msg(b"c") + SYNC
                 + query_msg("SELECT 41 + 1"))
        assert [e["C"] for e in errors(raw.read_until(b"Z"))] == ["42703"]
        assert kinds(raw.read_until(b"Z")) == [b"Z"]
        assert (b"D", b"\x00\x01\x00\x00\x00\x0242") in raw.read_until(b"Z")
        # and a protected extended COPY right after works
        raw.send(parse_msg(COPY_IN) + bind_msg() + execute_msg() + SYNC
                 + msg(b"d", text_rows(rows)) + msg(b"c") + SYNC)
        assert errors(raw.read_until(b"Z")) == []
    assert_sealed(env, rows)


def test_sync_inside_copy_data_refuses_the_session(env: Env) -> None:
    """A Sync between rows of a COPY FROM STDIN: the server ignores it in copy-in mode,
    but answers it if an earlier row already failed, which the proxy cannot see. Its
    picture of the replies would be a guess: the session ends with the proxy's FATAL,
    and nothing behind the Sync is forwarded."""
    first, rest = pans(1), pans(1)
    with login(env) as raw:
        raw.send(parse_msg(COPY_IN) + bind_msg() + execute_msg() + SYNC
                 + msg(b"d", text_rows(first)) + SYNC + msg(b"d", text_rows(rest))
                 + msg(b"c") + SYNC)
        replies = raw.read_to_close()
    fatal = [e for e in errors(replies) if e["S"] == "FATAL"]
    assert len(fatal) == 1 and fatal[0]["C"] == "08P01" and "Sync" in fatal[0]["M"]
    assert leaks([env.recorder.bytes_sent()], list((first | rest).values())) == []
    with direct(env.pg) as d:  # type: ignore[arg-type]
        assert d.execute("SELECT count(*) FROM q_cards WHERE customer_id = ANY(%s)",
                         (list(first | rest),)).fetchone() == (0,)
