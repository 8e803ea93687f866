"""One client connection and the upstream connection it owns (session mode).

The session is an asyncio Protocol, not a coroutine: every read is handled in one
callback that frames the chunk, lets the statement gate look at Query/Parse messages,
and writes the (usually untouched) bytes on in one call. There is no await and no
per-message object on the hot path; that is what keeps a Python proxy near PgBouncer.

States (explicit, like PgBouncer's): STARTUP (SSL/GSS negotiation, startup packet) →
CONNECTING (opening the upstream) → AUTH (relaying authentication) → READY (relay) →
CLOSED. Authentication is relayed, never performed: the server proves the user.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import ssl
import struct
import time
from bisect import bisect_left
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from proxy.encryption import DatabaseNotBindable
from proxy.observability import flush_crypto
from proxy.protocol import messages as m
from proxy.protocol.framing import Framer, unpack_head
from proxy.protocol.messages import ProtocolViolation
from proxy.protocol.rows import decode_data_row
from proxy.sql import encoding
from proxy.tracking import Tracker, refusal_error

if TYPE_CHECKING:
    from proxy.server import Server

log = logging.getLogger("strongroom.session")

_U32 = struct.Struct("!I")
_U32_unpack_from = _U32.unpack_from

# Type bytes as ints (framing yields ints).
_Q, _P, _S, _X, _F, _H, _B = (ord(c) for c in "QPSXFHB")
_T, _D, _C = (ord(c) for c in "TDC")
_Z, _R, _K, _E, _PS = (ord(c) for c in "ZRKES")
_ACCEPTED = frozenset(
    t for t, rule in m.FRONTEND_RULES.items() if rule in (m.CHECKED, m.HARMLESS)
)  # tracking mode: types that reach the tracker (the rest end the session, 08P01)
_now = time.perf_counter
_STATEMENT_TYPES = frozenset((_Q, _P, _B, ord("E"), _F))  # run or prepare a statement
# A Query or Parse longer than this is analysed (and, with `protect:`, planned) in a
# worker process before the session handles it: the parse of a 2.7 MB IN list holds the
# event loop for about two seconds, which would stall every other session.
OFFLOAD_BYTES = 64 * 1024
OFFLOAD_TIMEOUT = 30.0  # then the session ends with 53400: never analysed on the loop
# Big statements being analysed at once, in this process: beyond it a new one ends its
# session with 53400 rather than queue (one worker; a queue would only grow).
MAX_OFFLOAD_INFLIGHT = 4
# Seconds a request may still run after its client vanished before it is cancelled
# (`Session._orphaned`): short requests end as they would direct.
ORPHAN_GRACE = 0.5
_offload_inflight = 0


async def _bounded(waiting: list[asyncio.Future[Any]]) -> list[Any]:
    """The worker's results, or a TimeoutError for each when it takes too long (a queue
    of other sessions' huge statements ahead, a worker that stopped answering)."""
    try:
        return await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True),
                                      OFFLOAD_TIMEOUT)
    except TimeoutError:
        return [TimeoutError()] * len(waiting)
_SERVER_MAX = 1 << 30  # longest backend message accepted (the server is trusted)

# What the relay does with each frontend message type (index: the type byte), from the
# rule table `messages.FRONTEND_RULES`; 0 is "forward untouched", the common case.
# (Execute is harmless, but applies the session effects of a portal bound to a statement
# with effects: `Gate.execute`.)
_A_QUERY, _A_PARSE, _A_SYNC, _A_BIND, _A_TERMINATE, _A_INVALID, _A_FUNC, _A_EXECUTE = (
    range(1, 9))
_CHECKED_ACTS = {_Q: _A_QUERY, _P: _A_PARSE, _B: _A_BIND, _F: _A_FUNC}
_HARMLESS_ACTS = {_S: _A_SYNC, _X: _A_TERMINATE, ord("E"): _A_EXECUTE}


def _client_actions() -> tuple[int, ...]:
    """The relay's action per type byte. A CHECKED type must have a gate action here:
    a new one without it fails loudly at import, never forwarded unchecked."""
    acts = [_A_INVALID] * 256
    for t, rule in m.FRONTEND_RULES.items():
        if rule == m.CHECKED:
            acts[t] = _CHECKED_ACTS[t]
        elif rule == m.HARMLESS:
            acts[t] = _HARMLESS_ACTS.get(t, 0)
    return tuple(acts)


_CLIENT_ACTS = _client_actions()
# Backend types the relay must look at: ReadyForQuery, ParameterStatus, ErrorResponse.
_SERVER_WATCH = tuple(t in (_Z, _PS, _E) for t in range(256))
_TEXT_RULES = encoding.WATCHED  # ParameterStatus names that decide how text is parsed


# Why a session ended, by the SQLSTATE of the FATAL the proxy sent (metrics label).
_FATAL_REASONS = {
    "57P05": "idle_timeout", "25P03": "idle_in_transaction_timeout", "57P01": "shutdown",
    "08006": "upstream_connect_failed", "08P01": "protocol_error", "53300": "other",
}


class State(enum.Enum):
    STARTUP = 1
    CONNECTING = 2
    AUTH = 3
    PRELUDE = 4  # the proxy's own start-of-session query; the client waits for it
    READY = 5
    CLOSED = 6
    OBSERVE = 7  # relay: reading the answer to the proxy's observation query (see below)


# Module constants: `State.READY` is an attribute lookup on the enum class, which costs
# more (~0.2 us on CPython 3.11) than the whole per-message loop body of the relay.
_STARTUP, _AUTH, _PRELUDE, _READY, _CLOSED, _OBSERVE = (
    State.STARTUP, State.AUTH, State.PRELUDE, State.READY, State.CLOSED, State.OBSERVE
)


class Upstream(asyncio.Protocol):
    """The server side of a session: hands every chunk to the session.

    `data_received` is an instance attribute: without upstream TLS it is the session's
    own `server_data`, so the event loop calls the relay directly (one Python frame less
    per read; uvloop looks the method up once, when the connection is made). With TLS
    the first read is the server's one-byte answer to SSLRequest: `_tls_data`.
    """

    __slots__ = ("_ssl_answer", "closed", "counted", "data_received", "session", "transport")

    def __init__(self, session: Session, tls: bool = False) -> None:
        self.session = session
        self.transport: asyncio.Transport | None = None
        self._ssl_answer: asyncio.Future[bytes] | None = None
        self.closed = False
        self.counted = False  # counted as an open upstream connection in metrics
        self.data_received: Callable[[bytes], None] = (
            self._tls_data if tls else session.server_data
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def _tls_data(self, data: bytes) -> None:
        if self._ssl_answer is not None:
            fut, self._ssl_answer = self._ssl_answer, None
            if not fut.done():
                fut.set_result(data)
            return
        self.session.server_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.counted:
            self.counted = False
            self.session.server.on_upstream_closed()
        if self._ssl_answer is not None and not self._ssl_answer.done():
            self._ssl_answer.set_exception(ConnectionError("upstream closed during TLS setup"))
        self.session.server_lost()

    def pause_writing(self) -> None:
        self.session.pause_client_reading("upstream")

    def resume_writing(self) -> None:
        self.session.resume_client_reading("upstream")

    def expect_ssl_answer(self) -> asyncio.Future[bytes]:
        self._ssl_answer = asyncio.get_running_loop().create_future()
        return self._ssl_answer


_Edited = tuple[list[bytes], int]
"""Server bytes the relay forwards with some messages replaced: the pieces so far, and
the offset in the chunk where the unreplaced bytes resume."""


def _edit(edited: _Edited | None, data: bytes, start: int, stop: int,
          replacement: bytes) -> _Edited:
    """`edited` with data[start:stop] replaced by `replacement`."""
    pieces, resume = edited if edited is not None else ([], 0)
    pieces += [data[resume:start], replacement]
    return pieces, stop


def _spliced(edited: _Edited | None, data: bytes, upto: int) -> bytes:
    """data[:upto] with the replacements recorded in `edited`."""
    if edited is None:
        return data[:upto]
    pieces, resume = edited
    return b"".join([*pieces, data[resume:upto]])


def _fatal(buf: bytes, start: int, stop: int) -> bool:
    """Whether the ErrorResponse at buf[start:stop] ends the server's session: its
    non-localised severity field (V, always after S) is FATAL or PANIC, in any
    lc_messages. A field value cannot hold a NUL, so the match is exact."""
    return (buf.find(b"\0VFATAL\0", start + 5, stop) >= 0
            or buf.find(b"\0VPANIC\0", start + 5, stop) >= 0)


class Session(asyncio.Protocol):
    """A client connection: startup, auth relay, then the message relay."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.settings = server.settings
        self.id = server.next_session_id()
        self.state = State.STARTUP
        self.transport: asyncio.Transport | None = None
        self.upstream: Upstream | None = None
        self.peer = "?"
        self.tls = False
        self.startup: m.StartupPacket | None = None
        self.user = ""
        self.database = ""
        self.backend_key: tuple[int, int] | None = None
        self.server_params: dict[str, str] = {}
        self.txn_status = b"I"
        self.outstanding = 0  # Query/Sync/FunctionCall sent without a ReadyForQuery yet
        self.last_active = _now()  # perf_counter: what the janitor compares it with
        self.server_fatal = False
        self.terminating = False  # Terminate relayed; waiting for the server to hang up
        self.rejected = False  # over max_clients: refused once the startup packet arrives
        self.startup_refused: str | None = None  # over max_startups(_per_ip): likewise
        self.starting = False  # counted in the server's starting sessions (until auth)
        self.peer_host = "?"
        self._startup_buf = bytearray()
        self._cframer = Framer(self.settings.limits.max_message_size)
        self._sframer = Framer(1 << 30)
        self._paused: set[str] = set()
        self._timer: asyncio.TimerHandle | None = None
        self.gate = server.gate
        # Set by the gate when policy or encryption applies to this session.
        self.tracker: Tracker | None = None  # tracking mode (encryption): see tracking.py
        self.denied: set[bytes] = set()  # statement names substituted by a refusal
        # Client bytes held while a big statement is analysed on a worker thread
        # (`_defer_heavy`); the text that was, so it is not sent there twice.
        self._held: bytearray | None = None
        self.heavy_done: str | None = None
        # The observation barrier (`_observe_barrier`): ReadyForQuery messages still to
        # pass before the reply to the proxy's observation query (relay mode), and
        # whether an Execute since the last Sync ran user code.
        self._observing = 0
        self._observed_row: list[bytes | None] | None = None
        self._batch_user_code = False
        # Portals bound to a statement with session effects: applied at their Execute.
        self.effect_portals: dict[bytes, object] = {}
        # A reload happened while portals bound before it may exist: the gate sees every
        # Bind and Execute until the transaction ends (`SessionPolicy.portals_bound`).
        self.watch_portals = False
        self.last_parse: bytes | None = None  # Parse body the gate last analysed (no policy)
        self.watch_ready = False  # gate.ready() wants every ReadyForQuery status
        self.policy_state: object | None = None
        self._prelude: tuple[bytes, list[list[list[bytes | None]]]] | None = None
        # Observability (proxy/observability.py): bound methods, so an event on the hot
        # path is one call and an add.
        metrics = server.metrics
        self._m_in, self._m_out = metrics.byte_cells()  # `cell[0] += n`: no call at all
        self._m_hist = metrics.query_seconds.child()
        self._count_kind = server.query_kinds.count
        self._t0 = 0.0  # when the current request (first Query/Sync after idle) was sent
        self.close_reason = "client_eof"  # metrics label when the session ends
        self.ready_once = False  # reached READY (a connect was audited)

    # ------------------------------------------------------------------ client side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "unix")
        self.peer_host = str(peer[0]) if isinstance(peer, tuple) else self.peer
        # Over the limit, PostgreSQL still negotiates SSL and serves CancelRequests, and
        # says "too many clients" only in answer to the startup packet (libpq discards an
        # error sent in reply to SSLRequest). Do the same; the startup timeout bounds it.
        self.rejected = not self.server.admit(self)
        if not self.rejected:
            self.startup_refused = self.server.startup_begin(self)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.settings.limits.startup_timeout, self._startup_expired)

    def data_received(self, data: bytes) -> None:
        """Client bytes. READY without tracking is the relay, right here (see below);
        everything else goes through `_client_other`."""
        self._m_in[0] += len(data)
        if self._held is not None:  # a big statement is being analysed off the loop
            self._held += data
            return
        if self.state is not _READY or self.tracker is not None:
            self._client_other(data)
            return
        # The relay. Frames the chunk and lets the gate see Query/Parse in one loop, then
        # forwards the whole messages in one write: the chunk itself when nothing was
        # replaced (no copy). This and `server_data` run once per read and are most of
        # the proxy's own Python time per transaction, so they are written for that: the
        # header walk is inline (no list of frames, no tuple per message, no call per
        # message, no helper frame), and the clock is read only where a request starts
        # or ends (`last_active` is stamped when nothing is outstanding; while something
        # is, the janitor leaves the session alone).
        try:
            framer = self._cframer
            if framer._tail:
                joined = framer.join(data)  # raises once an invalid length was seen
                if joined is None:
                    if not self.outstanding:
                        self.last_active = _now()
                    return
                data = joined
            end = len(data)
            pos = run = 0  # data[run:pos]: whole messages to forward as they are
            out: list[bytes] | None = None  # set once a message is replaced
            bad: str | None = None
            max_len = framer.max_len
            acts = _CLIENT_ACTS
            deferred = False
            while end - pos >= 5:
                kind, n = unpack_head(data, pos)
                if n < 4 or n > max_len:
                    bad = f"invalid message length {n}"
                    if not pos:
                        raise ProtocolViolation(bad)
                    # The whole messages before it go first (a Terminate among them wins).
                    framer.fail(data, pos, bad)
                    break
                stop = pos + 1 + n
                if stop > end:
                    framer.hold(data, pos, stop - pos)
                    break
                act = acts[kind]
                if act:
                    if ((act == _A_QUERY or act == _A_PARSE) and n > OFFLOAD_BYTES
                            and self._defer_heavy(kind, data[pos + 5 : stop])):
                        deferred = True
                        break
                    replacement = None
                    if self._batch_user_code and act != _A_SYNC and act != _A_TERMINATE:
                        replacement = self._after_user_code(kind)
                        if out is None:
                            out = []
                        if run < pos:
                            out.append(data[run:pos])
                        out.append(replacement)
                        run = pos = stop
                        continue
                    if act == _A_SYNC:
                        if not self.outstanding:
                            self._t0 = _now()
                        self.outstanding += 1
                    elif act == _A_BIND:
                        if self.denied or self.effect_portals or self.watch_portals:
                            replacement = self.gate.bind(self, data[pos + 5 : stop])
                    elif act == _A_EXECUTE:
                        st = self.policy_state
                        if self.effect_portals or self.watch_portals or (
                                st is not None and st.cursors):  # type: ignore[attr-defined]
                            replacement = self.gate.execute(
                                self, m.execute_portal(data[pos + 5 : stop]))
                            if st is not None and st.user_code:  # type: ignore[attr-defined]
                                self._batch_user_code = True
                    elif act == _A_QUERY:
                        if not self.outstanding:
                            self._t0 = _now()
                        self.outstanding += 1
                        replacement = self.gate.query(self, data[pos + 5 : stop])
                        self._count_kind()
                    elif act == _A_PARSE:
                        replacement = self.gate.parse(self, data[pos + 5 : stop])
                        self._count_kind()
                    elif act == _A_FUNC:
                        if not self.outstanding:
                            self._t0 = _now()
                        self.outstanding += 1
                        replacement = self.gate.function_call(self, data[pos + 5 : stop])
                    elif act == _A_TERMINATE:
                        if out is None:
                            self._terminate(data[:stop])
                        else:
                            out.append(data[run:stop])
                            self._terminate(b"".join(out))
                        return
                    else:
                        raise ProtocolViolation(f"invalid frontend message type {kind}")
                    if replacement is not None:
                        if out is None:
                            out = []
                        if run < pos:
                            out.append(data[run:pos])
                        out.append(replacement)
                        run = stop
                    if ((self._batch_user_code or act == _A_QUERY or act == _A_FUNC)
                            and self._request_ran_user_code(kind)):
                        # The request is complete: ask the server what it now has, and
                        # hold everything after it until the answer (`_observe_barrier`).
                        if out is None:
                            out = []
                        if run < stop:
                            out.append(data[run:stop])
                        out.append(self._observe_barrier())
                        run = pos = stop
                        deferred = True
                        break
                pos = stop
            else:
                if pos < end:
                    framer.hold(data, pos, 5)
            if pos:
                up = self.upstream.transport  # type: ignore[union-attr]
                if out is not None:
                    if run < pos:
                        out.append(data[run:pos])
                    up.write(b"".join(out))
                elif pos == end:
                    up.write(data)
                else:
                    up.write(data[:pos])
            if deferred:
                self._held += data[pos:]  # type: ignore[operator]
            if not self.outstanding:
                self.last_active = _now()
            if bad is not None and self.state is _READY:
                self._violation(bad)
        except Exception as exc:
            self._client_failed(exc)

    def _defer_heavy(self, kind: int, body: bytes) -> bool:
        """A statement big enough to stall every session while it is analysed: have it
        analysed (and planned) in the worker process first (`proxy.sql.offload`),
        holding this client's bytes from it on; they are handled again, from the
        caches, when the work is done (`_heavy_done`). Other sessions are served
        meanwhile."""
        if self._held is not None or self._cframer.error is not None:
            return False
        global _offload_inflight
        if _offload_inflight >= MAX_OFFLOAD_INFLIGHT:
            # Fail this session, not every session: analysing it inline would stall all.
            self._held = bytearray()
            self.expire("53400", "too many large statements are being analysed at once; "
                        "retry later")
            return True
        jobs = self.gate.heavy_work(self, kind, body)
        if not jobs:
            return False
        _offload_inflight += 1
        self._held = bytearray()
        metrics = getattr(self.server, "metrics", None)
        if metrics is not None:
            metrics.statement_offloaded()
        self.pause_client_reading("held")
        loop = asyncio.get_running_loop()
        waiting = [asyncio.wrap_future(future, loop=loop) for future, _ in jobs]
        done = loop.create_task(_bounded(waiting))
        done.add_done_callback(lambda f: self._heavy_done(f, [i for _, i in jobs]))
        return True

    def _heavy_done(self, results: asyncio.Future[list[Any]],
                    installs: list[Callable[[Any], None]]) -> None:
        global _offload_inflight
        _offload_inflight -= 1
        for result, install in zip(results.result(), installs, strict=True):
            if isinstance(result, BaseException):
                # (never the text: only the kind of failure) Analysing it here instead
                # would hold every session of the process: this one ends instead.
                log.warning("session %s: a large statement could not be analysed in the "
                            "worker process (%s)", self.id, type(result).__name__)
                self._held = None
                if self.state is not _CLOSED:
                    self.expire("53400", "a large statement could not be analysed in time; "
                                "retry later")
                return
            try:
                install(result)
            except Exception:
                log.exception("session %s: installing a large statement's analysis failed",
                              self.id)
        self._release_held()

    # ------------------------------------------------------------------ observation

    def _request_ran_user_code(self, kind: int) -> bool:
        """A Query or FunctionCall (message type `kind`) that ran user code, or the Sync
        ending a batch in which an Execute did: the request is complete once the server
        answers it."""
        if kind == _S:
            if self._batch_user_code:
                self._batch_user_code = False
                return True
            return False
        if kind != _Q and kind != _F:
            return False
        st = self.policy_state
        return st is not None and st.user_code  # type: ignore[attr-defined]

    @staticmethod
    def _catalog_reloading(tracker: Any) -> bool:
        """The request had DDL and the catalog reload after it was injected: the next
        request is planned from the reloaded catalog (its `*` written out from the
        table's columns as the DDL left them), so the observation barrier, injected
        behind the reload, holds this client until both answers are in."""
        protector = tracker.protector
        if not getattr(protector, "hold_after", False):
            return False
        protector.hold_after = False
        return True

    def _after_user_code(self, kind: int) -> bytes:
        """A statement sent after an Execute of user code, before the Sync: it would run
        in a session the code may have changed before the proxy could observe it. It
        becomes a Bind of a statement that cannot exist, named with the reason: the
        server fails it and skips the rest of the batch to the Sync, as for any error."""
        if kind == _Q or kind == _F:
            raise ProtocolViolation("a Query or FunctionCall inside an extended-protocol "
                                    "batch after a call of user code; send Sync first")
        from proxy.protocol import rows

        reason = ("permission denied by strongroom: a statement after a call of user code "
                  "(DO, CALL or a function outside pg_catalog) in the same pipeline batch; "
                  "send Sync first")
        return rows.encode_bind(rows.Bind(b"", reason.encode(), [], [], []))

    def _observe_barrier(self) -> bytes:
        """User code ran (DO, CALL, a function outside pg_catalog): it may have changed
        search_path, the role or client_encoding where no analysis can see it. The
        proxy asks the server (observe, never simulate) right behind the request and
        handles nothing more of this client until the answer is in (`_observed`). Its
        reply is not the client's: the relay swallows it (State.OBSERVE), the tracker
        as an injected query. Returns the Query to send."""
        from proxy.gate import OBSERVE_SQL

        self._held = bytearray()
        self.pause_client_reading("held")
        if self.tracker is not None:
            return self.tracker.inject_query(OBSERVE_SQL, self._observed_rows)
        self._observing = self.outstanding  # the ReadyForQuery messages before its reply
        self._observed_row = None
        return m.message(b"Q", OBSERVE_SQL.encode() + b"\0")

    def _observed_rows(self, rows: list[list[bytes | None]]) -> None:
        self._observed(rows[0] if rows else None)

    def _observed(self, row: list[bytes | None] | None) -> None:
        st = self.policy_state
        if st is not None:
            st.user_code = False  # type: ignore[attr-defined]
        if row is not None:
            self.gate.observed(self, row)
        else:
            # (an aborted transaction block refuses the query: the code's changes die
            # with it at ROLLBACK, whose end is observed in turn)
            log.info("session %s: the session state could not be observed now", self.id)
        # Handled after this server chunk, not inside it.
        asyncio.get_running_loop().call_soon(self._release_held)

    def _release_held(self) -> None:
        """The held bytes are handled, then the client is read again, unless something
        else still holds it: the server not reading ("upstream", whose high-water mark
        was crossed meanwhile, maybe by these very bytes) or a new barrier among them.
        (Resuming here unconditionally let a client push its whole batch into the
        server leg's write buffer while the server read nothing.)"""
        held, self._held = self._held, None
        if self.state is _CLOSED or held is None:
            return
        if held:
            self._m_in[0] -= len(held)
            self.data_received(bytes(held))
        if self._held is None:
            self.resume_client_reading("held")

    def _server_observe(self, data: bytes) -> None:
        """Relay: the reply to the observation query. Its row is kept, the rest of it
        swallowed; what the server sends on its own meanwhile (notices, notifications,
        parameter changes) is passed on."""
        buf, frames = self._sframer.feed(data)
        out: list[bytes] = []
        for kind, start, stop in frames:
            if kind == _D:
                self._observed_row = decode_data_row(buf[start + 5 : stop])
            elif kind == _Z:
                self.state = _READY
                if out:
                    self.transport.write(b"".join(out))  # type: ignore[union-attr]
                self._observed(self._observed_row)
                if stop < len(buf):
                    self.server_data(buf[stop:])
                return
            elif kind == _PS or kind == ord("N") or kind == ord("A"):
                out.append(buf[start:stop])
            elif kind == _E and _fatal(buf, start, stop):
                out.append(buf[start:stop])
        if out:
            self.transport.write(b"".join(out))  # type: ignore[union-attr]

    def _client_other(self, data: bytes) -> None:
        try:
            state = self.state
            if state is _READY:
                self._client_tracked(data)
            elif state is _STARTUP:
                self._client_startup(data)
            elif state is _AUTH:
                self._client_auth(data)
                if self._cframer.error is not None and self.state is _AUTH:
                    self._violation(self._cframer.error)
            # CONNECTING: reading is paused; CLOSED: drop.
        except Exception as exc:
            self._client_failed(exc)

    def _client_failed(self, exc: Exception) -> None:
        if isinstance(exc, ProtocolViolation):
            # Raised by a decoder deeper down (gate, tracker): the client's mistake.
            self._violation(str(exc))
            return
        # A proxy bug must cost this session only, with a clear error to its client,
        # and never leave the upstream connection behind.
        log.exception("session %s: internal error handling client data", self.id,
                      exc_info=exc)
        self._fatal("58000", "internal error in the proxy; the session was closed")

    def connection_lost(self, exc: Exception | None) -> None:
        was = self.state
        self.state = State.CLOSED
        if self._timer:
            self._timer.cancel()
        up = self.upstream
        if up is not None and not up.closed and up.transport is not None:
            try:
                if was is not _AUTH:
                    # During authentication the server reads a password or SASL
                    # response, and takes a Terminate for a malformed one (a FATAL in
                    # its log); a client that leaves there is an EOF to it, as direct.
                    up.transport.write(m.message(b"X"))
            finally:
                if self.outstanding > 0 and self.backend_key is not None:
                    self._orphaned(up)
                else:
                    up.transport.close()
        self.server.release(self, was)

    def _orphaned(self, up: Upstream) -> None:
        """The client vanished with a request running. Direct, PostgreSQL finishes that
        request (a NOTIFY in it is delivered, a COMMIT commits) and ends the session at
        the Terminate the proxy queued behind it; so does the proxy: the upstream stays
        open, its replies read and dropped (State.CLOSED), until the server hangs up.
        Cancelling at once (as before) aborted such a request. A request still running
        after ORPHAN_GRACE seconds is cancelled and the upstream closed, so a killed
        client's long query does not hold a backend."""
        assert up.transport is not None
        up.transport.resume_reading()  # the replies must drain, or the server blocks
        key = self.backend_key
        assert key is not None

        def expired() -> None:
            if not up.closed and up.transport is not None:
                self.server.send_cancel(*key)
                up.transport.close()

        asyncio.get_running_loop().call_later(ORPHAN_GRACE, expired)

    def pause_writing(self) -> None:
        up = self.upstream
        if up is not None and up.transport is not None:
            up.transport.pause_reading()

    def resume_writing(self) -> None:
        up = self.upstream
        if up is not None and up.transport is not None and not up.closed:
            up.transport.resume_reading()

    def pause_client_reading(self, reason: str) -> None:
        """Stop reading the client for `reason`; it is read again once every reason is
        gone. Every pause of the client goes through here: a direct
        `transport.resume_reading()` would undo the others (backpressure included)."""
        if not self._paused and self.transport is not None:
            self.transport.pause_reading()
        self._paused.add(reason)

    def resume_client_reading(self, reason: str) -> None:
        self._paused.discard(reason)
        if not self._paused and self.transport is not None and self.state is not State.CLOSED:
            self.transport.resume_reading()

    # ------------------------------------------------------------------ startup

    def _client_startup(self, data: bytes) -> None:
        buf = self._startup_buf
        buf += data
        while self.state is State.STARTUP and len(buf) >= 4:
            n = _U32.unpack_from(buf)[0]
            if n < 8 or n > m.MAX_STARTUP_PACKET:
                self._violation("invalid length of startup packet")
                return
            if len(buf) < n:
                return
            body = bytes(buf[4:n])
            del buf[:n]
            self._startup_packet(body)

    def _startup_packet(self, body: bytes) -> None:
        code = _U32.unpack_from(body)[0]
        if code == m.SSL_REQUEST_CODE:
            ctx = self.server.client_ssl
            if ctx is None or self.tls:
                self.transport.write(b"N")  # type: ignore[union-attr]
                return
            if self._startup_buf:
                # Bytes sent after SSLRequest but before the handshake would be read as
                # if they had been encrypted (CVE-2021-23214): refuse them.
                self._violation("received unencrypted data after SSL request")
                return
            self.pause_client_reading("tls")
            self.transport.write(b"S")  # type: ignore[union-attr]
            self.server.spawn(self._start_tls(ctx))
        elif code == m.GSSENC_REQUEST_CODE:
            self.transport.write(b"N")  # type: ignore[union-attr]
        elif code == m.CANCEL_REQUEST_CODE:
            try:
                pid, secret = m.decode_cancel(body)
            except ProtocolViolation:
                self._close()
                return
            self.server.forward_cancel(pid, secret)
            self._close()
        elif code >> 16 == 3:
            try:
                packet = m.parse_startup(body)
            except ProtocolViolation as exc:
                self._violation(str(exc))
                return
            if not self.tls and self.server.settings.listen.tls_required:
                # Checked before anything reaches the server: a plaintext client would
                # otherwise send its password and every value in the clear.
                log.info("session %s %s: refused, no TLS (listen.tls.required)",
                         self.id, self.peer)
                self._fatal("28000", "this proxy requires TLS: connect with sslmode=require "
                            "or stronger (listen.tls.required)")
                return
            self._begin_session(packet)
        else:
            # PostgreSQL's own answer (SQLSTATE 0A000, same text); a 3.x minor version
            # is the server's to negotiate (NegotiateProtocolVersion), so it goes through.
            log.info("session %s %s: unsupported protocol %s", self.id, self.peer, code)
            self._fatal(
                "0A000",
                f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}: "
                "server supports 3.0 to 3.0",
            )

    async def _start_tls(self, ctx: ssl.SSLContext) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport = await loop.start_tls(
                self.transport,  # type: ignore[arg-type]
                self,
                ctx,
                server_side=True,
                ssl_handshake_timeout=self.settings.limits.startup_timeout,
            )
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError) as exc:
            log.info("session %s %s: TLS handshake failed: %s", self.id, self.peer, exc)
            self._close()
            return
        if transport is None or self.state is State.CLOSED:
            self._close()
            return
        self.transport = transport
        self.tls = True
        self.resume_client_reading("tls")

    def _begin_session(self, packet: m.StartupPacket) -> None:
        if self.rejected:
            self._fatal("53300", "sorry, too many clients already")
            return
        if self.startup_refused is not None:
            where = " from this address" if self.startup_refused == "per_ip" else ""
            self._fatal("53300", f"sorry, too many connections are authenticating{where}; "
                        "retry shortly")
            return
        repl = (packet.get("replication") or "").lower()
        if repl and repl not in ("false", "off", "no", "0") and not self.settings.allow_replication:
            self._violation("replication connections are not supported by this proxy")
            return
        if packet.get("user") is None:
            self._fatal("28000", "no PostgreSQL user name specified in startup packet")
            return
        if self.settings.upstream.database:
            packet = packet.replace("database", self.settings.upstream.database)
        self.startup = packet
        self.user = packet.get("user") or ""
        self.database = packet.get("database") or self.user
        self.state = State.CONNECTING
        self.pause_client_reading("connect")
        self.server.spawn(self._connect_upstream(packet))

    async def _connect_upstream(self, packet: m.StartupPacket) -> None:
        up = self.settings.upstream
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        ctx = self.server.upstream_ssl
        try:
            transport, proto = await asyncio.wait_for(
                loop.create_connection(
                    lambda: Upstream(self, tls=ctx is not None), up.host, up.port
                ),
                up.connect_timeout,
            )
            if ctx is not None:
                answer = proto.expect_ssl_answer()
                transport.write(m.encode_ssl_request())
                reply = await asyncio.wait_for(answer, up.connect_timeout)
                if reply[:1] != b"S":
                    raise ConnectionError("upstream server does not support TLS")
                transport = await loop.start_tls(
                    transport,
                    proto,
                    ctx,
                    server_hostname=up.tls_server_name or up.host,
                    ssl_handshake_timeout=up.connect_timeout,
                )
                proto.transport = transport
        except ssl.SSLCertVerificationError as exc:
            # Not an outage: the server is up but is not who upstream.tls says it must be.
            self.server.on_upstream_connect_failed(exc)
            log.error("session %s: upstream %s:%s: TLS certificate verification failed: %s "
                      "(check upstream.tls.ca_file / mode)", self.id, up.host, up.port,
                      exc.verify_message)
            if self.state is not State.CLOSED:
                self._fatal(
                    "08006",
                    "could not connect to the upstream server: its TLS certificate did not "
                    "verify",
                    hint="The server's certificate does not chain to upstream.tls.ca_file "
                    "(or does not name the host); see the proxy's log.",
                )
            return
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError) as exc:
            self.server.on_upstream_connect_failed(exc)
            log.warning("session %s: cannot reach upstream %s:%s: %s", self.id, up.host, up.port,
                        exc.__class__.__name__)
            if self.state is not State.CLOSED:
                self._fatal(
                    "08006",
                    "could not connect to the upstream server",
                    hint="The proxy is up but PostgreSQL is not reachable; retry shortly.",
                )
            return
        self.server.on_upstream_connected(time.perf_counter() - started)
        proto.counted = True
        self.upstream = proto
        if self.state is State.CLOSED:
            transport.close()
            return
        transport.write(m.encode_startup(packet))
        self.state = State.AUTH
        self.resume_client_reading("connect")

    def _client_auth(self, data: bytes) -> None:
        """Relay password / SASL responses. Whatever else the client sends is the server's
        to reject, as it would be without the proxy."""
        try:
            buf, frames = self._cframer.feed(data)
        except ProtocolViolation as exc:
            self._violation(str(exc))
            return
        if frames:
            self.upstream.transport.write(buf[frames[0][1] : frames[-1][2]])  # type: ignore[union-attr]

    def _server_auth(self, data: bytes) -> None:
        buf, frames = self._sframer.feed(data)
        out: list[bytes] = []
        for kind, start, stop in frames:
            chunk = buf[start:stop]
            if kind == _R:
                code = m.auth_code(chunk[5:])
                if code == m.AUTH_OK:
                    self.server.startup_end(self)
                elif code == m.AUTH_SASL:
                    # Channel binding cannot cross a TLS-terminating proxy: the client's
                    # TLS session is not the server's. Offer only plain SCRAM.
                    mechs = [x for x in m.sasl_mechanisms(chunk[5:]) if not x.endswith(b"-PLUS")]
                    chunk = m.encode_sasl_mechanisms(mechs)
            elif kind == _K:
                self.backend_key = m.backend_key(chunk[5:])
                self.server.register_key(self.backend_key, self)
            elif kind == _PS:
                name, value = m.parameter_status(chunk[5:])
                self.server_params[name] = value
            elif kind == _E:
                fields = m.parse_fields(chunk[5:])
                if fields.get("S") in ("FATAL", "PANIC"):
                    self.server_fatal = True
                    log.info("session %s user=%s: upstream refused: %s", self.id,
                             self.user, fields.get("C"))
                    self.server.on_auth_failure(fields.get("C", ""), self)
            elif kind == _Z:
                self.txn_status = chunk[5:6]
                if self._timer:
                    self._timer.cancel()
                    self._timer = None
                reason = encoding.session_refusal(self.server_params)
                if reason is not None:
                    # Authenticated, but the session reads statement text in a way the
                    # proxy cannot parse: it ends before any statement is forwarded.
                    if out:
                        self.transport.write(b"".join(out))  # type: ignore[union-attr]
                    self._refuse_text_rules(reason)
                    return
                prelude = self.gate.session_started(self)
                if prelude is not None:
                    # Hold the client's ReadyForQuery until the proxy's own query is
                    # answered (schemas, search_path, protected-column catalog).
                    self.state = State.PRELUDE
                    self._prelude = (chunk, [])
                    self.upstream.transport.write(  # type: ignore[union-attr]
                        m.message(b"Q", prelude.encode() + b"\0")
                    )
                    break
                self.state = State.READY
                self.server.on_session_ready(self)
            out.append(chunk)
        if out:
            self.transport.write(b"".join(out))  # type: ignore[union-attr]

    # ------------------------------------------------------------------ text rules

    def _text_rules_broken(self, before: bytes, reason: str) -> None:
        """The server reported (ParameterStatus) that the session now reads statement
        text in a way the proxy does not parse: a function changed client_encoding or
        standard_conforming_strings (the gate refuses every statement that would). The
        server's replies before the report (`before`) go on, then a FATAL ends the
        session: no further client statement is forwarded."""
        if before:
            self.transport.write(before)  # type: ignore[union-attr]
        log.warning("session %s user=%s: the server reported settings the proxy cannot "
                    "parse with; ending the session", self.id, self.user)
        self._refuse_text_rules(reason)

    def _refuse_text_rules(self, reason: str) -> None:
        log.info("session %s user=%s: refused: %s", self.id, self.user, reason)
        self.close_reason = "unsupported_encoding"
        self._fatal(encoding.SQLSTATE, reason, hint=encoding.HINT)

    # ------------------------------------------------------------------ relay

    def _client_tracked(self, data: bytes) -> None:
        """READY in tracking mode: every message goes through the outstanding-request
        queue (`Tracker.client`, through its per-type table).

        The header walk is inline, as in the relay (`data_received`): no list of frames,
        and the chunk itself is written when the tracker replaced nothing. What the
        client sees is what the Framer-based loop gave, message for message: a bad
        length after whole messages is found before any of them is handled (they are
        handled, then the session refuses), and a bad type or a message the tracker
        calls malformed refuses the session with nothing of the chunk forwarded."""
        framer = self._cframer
        if framer._tail:
            try:
                joined = framer.join(data)  # raises once an invalid length was seen
            except ProtocolViolation as exc:
                self._violation(str(exc))
                return
            if joined is None:
                if not self.outstanding:
                    self.last_active = _now()
                return
            data = joined
        end = len(data)
        max_len = framer.max_len
        # Find where the whole messages end (and a bad length, if any) before handling
        # any: a Terminate or a refusal among them must not hide a bad length after it.
        last = 0
        bad: str | None = None
        while end - last >= 5:
            n = _U32_unpack_from(data, last + 1)[0]
            if n < 4 or n > max_len:
                bad = f"invalid message length {n}"
                if not last:
                    self._violation(bad)
                    return
                framer.fail(data, last, bad)
                break
            stop = last + 1 + n
            if stop > end:
                framer.hold(data, last, stop - last)
                break
            last = stop
        else:
            if last < end:
                framer.hold(data, last, 5)
        if last:
            self._client_tracking(data, last)
        if not self.outstanding:
            self.last_active = _now()
        if bad is not None and self.state is _READY:
            # Whole messages before the bad one were handled; now refuse.
            self._violation(bad)

    def _client_tracking(self, data: bytes, end: int) -> None:
        """Tracking mode: the whole messages of `data[:end]`, each through the tracker;
        one write of what they became."""
        tracker = self.tracker
        assert tracker is not None
        handlers = tracker.handlers  # (its COPY guard may change it between messages)
        pos = run = 0  # data[run:pos]: messages forwarded as they are, not yet copied
        out: list[bytes] | None = None
        while pos < end:
            kind = data[pos]
            stop = pos + 1 + _U32_unpack_from(data, pos + 1)[0]
            msg = data[pos:stop]
            if ((kind == _Q or kind == _P) and stop - pos > OFFLOAD_BYTES
                    and self._defer_heavy(kind, msg[5:])):
                # What came before goes now; the rest (and the framer's incomplete
                # tail after it) waits for the analysis (`_heavy_done`).
                self._held += data[pos:end] + self._cframer.take_tail()  # type: ignore[operator]
                if out is not None:
                    out.append(data[run:pos])
                    before = b"".join(out)
                else:
                    before = data[:pos]
                if before:
                    self.upstream.transport.write(before)  # type: ignore[union-attr]
                return
            if kind == _Q or kind == _S or kind == _F:
                if not self.outstanding:
                    self._t0 = _now()
                self.outstanding += 1
            elif kind == _X:
                if out is None:
                    before = data[:pos]
                else:
                    out.append(data[run:pos])
                    before = b"".join(out)
                if before:
                    self.upstream.transport.write(before)  # type: ignore[union-attr]
                self._terminate(msg)
                return
            elif kind not in _ACCEPTED:
                self._violation(f"invalid frontend message type {kind}")
                return
            try:
                after_user_code = self._batch_user_code and kind in _STATEMENT_TYPES
                if after_user_code and (kind == _Q or kind == _F):
                    self._after_user_code(kind)  # raises: refuses the session
                replacement = handlers[kind](tracker, kind, msg)
                if kind == _F:
                    # Queued as a FunctionCall either way: a refusal's ErrorResponse and
                    # ReadyForQuery answer it as the call's own would.
                    replacement = self.gate.function_call(self, msg[5:])
                if after_user_code:
                    replacement = self._after_user_code(kind)
                elif kind == _E:
                    st = self.policy_state
                    if st is not None and st.user_code:  # type: ignore[attr-defined]
                        self._batch_user_code = True
            except ProtocolViolation as exc:
                self._violation(str(exc))
                return
            if kind == _Q or kind == _P:
                self._count_kind()
            if replacement is not None:
                if out is None:
                    out = []
                if run < pos:
                    out.append(data[run:pos])
                out.append(replacement)
                run = stop
            if (kind == _Q or kind == _F or kind == _S) and (
                    ((kind != _S or self._batch_user_code)
                     and self._request_ran_user_code(kind))
                    or self._catalog_reloading(tracker)):
                if out is None:
                    out = []
                if run < stop:
                    out.append(data[run:stop])
                out.append(self._observe_barrier())
                self._held += data[stop:end] + self._cframer.take_tail()  # type: ignore[operator]
                self.upstream.transport.write(b"".join(out))  # type: ignore[union-attr]
                return
            pos = stop
        up = self.upstream.transport  # type: ignore[union-attr]
        if out is None:
            up.write(data if end == len(data) else data[:end])
        else:
            if run < end:
                out.append(data[run:end])
            up.write(b"".join(out))

    def _server_tracking(self, data: bytes) -> None:
        """Tracking mode: every server message goes through the tracker, except the
        DataRows of a result set with nothing protected (forwarded within the run).

        The header walk is inline, as in `server_data` (the Framer only keeps the
        incomplete tail between reads), and a run of DataRows of a protected result set
        goes to the tracker in one call (`Tracker.reveal_rows`), which walks those rows
        itself: per-row dispatch was most of the cost of a cached read. A row it leaves
        (not for the fast path) goes alone through `data_row`, then the walk goes on."""
        framer = self._sframer
        if framer._tail:
            joined = framer.join(data)  # raises once an invalid length was seen
            if joined is None:
                return
            data = joined
        tracker = self.tracker
        assert tracker is not None
        out: list[bytes | bytearray] = []
        reveal_rows = tracker.reveal_rows
        end = len(data)
        pos = run = 0  # data[run:pos]: messages forwarded as they are, not yet copied
        while end - pos >= 5:
            kind, n = unpack_head(data, pos)
            if n < 4 or n > _SERVER_MAX:
                if not pos:
                    raise ProtocolViolation(f"invalid message length {n}")
                framer.fail(data, pos, f"invalid message length {n}")
                break
            stop = pos + 1 + n
            if stop > end:
                framer.hold(data, pos, stop - pos)
                break
            if kind == _D:
                if tracker.data_plan is None and not tracker.consume_to_ready:
                    pos = stop
                    continue  # nothing to reveal: forwarded untouched, within the run
                if run < pos:
                    out.append(data[run:pos])
                    run = pos
                upto = reveal_rows(data, pos, end, out)
                if upto != pos:
                    pos = run = upto
                    continue
                replacement = tracker.data_row(data, pos, stop)
                if replacement is not None:
                    if replacement:
                        out.append(replacement)
                    run = stop
                pos = stop
                continue
            msg = data[pos:stop]
            if kind == _PS:
                name, value = m.parameter_status(msg[5:])
                self.server_params[name] = value
                if name in _TEXT_RULES:
                    reason = encoding.session_refusal(self.server_params)
                    if reason is not None:
                        if run < pos:
                            out.append(data[run:pos])
                        self._text_rules_broken(b"".join(out), reason)
                        return
            replacement = tracker.server(kind, msg)
            if replacement is not None:
                if run < pos:
                    out.append(data[run:pos])
                if replacement:
                    out.append(replacement)
                run = stop
            if kind == _Z and replacement is None:  # not the reply to an injected query
                self.txn_status = msg[5:6]
                self.outstanding -= 1
                if not self.outstanding:
                    now = self.last_active = _now()
                    # _Hist.observe, inline (as in `server_data`).
                    hist = self._m_hist
                    spent = now - self._t0
                    hist.counts[bisect_left(hist.bounds, spent)] += 1
                    hist.sum += spent
                    flush_crypto(tracker, self.server.metrics.crypto_done)
                if self.watch_ready:
                    self.gate.ready(self, self.txn_status)
            elif kind == _E:
                self._count_error(msg, 0, len(msg))
                if _fatal(msg, 0, len(msg)) and (replacement is None or replacement == msg):
                    self.server_fatal = True  # passed on: no proxy-made FATAL after it
                if self.watch_ready:  # the failed transaction takes its SETs with it
                    self.gate.server_error(self)
            pos = stop
        else:
            if pos < end:
                framer.hold(data, pos, 5)
        if run < pos:
            out.append(data[run:pos])
        if out:
            self.transport.write(b"".join(out))  # type: ignore[union-attr]
        if tracker.to_server:  # the tracker's own request (e.g. aborting a transaction)
            pending, tracker.to_server = tracker.to_server, b""
            self.upstream.transport.write(pending)  # type: ignore[union-attr]

    def server_data(self, data: bytes) -> None:
        """Everything the server sends (the upstream transport calls this directly).

        READY without tracking: the reply is forwarded as read; only ReadyForQuery,
        ParameterStatus and ErrorResponse are looked at, with the same inline header
        walk as the client side (`data_received`).
        """
        self._m_out[0] += len(data)
        try:
            if self.state is not _READY or self.tracker is not None:
                self._server_other(data)
                return
            framer = self._sframer
            if framer._tail:
                joined = framer.join(data)  # raises once an invalid length was seen
                if joined is None:
                    return
                data = joined
            end = len(data)
            pos = 0
            watch = _SERVER_WATCH
            edited: _Edited | None = None  # set once a refusal's error is rewritten
            while end - pos >= 5:
                kind, n = unpack_head(data, pos)
                if n < 4 or n > _SERVER_MAX:
                    if not pos:
                        raise ProtocolViolation(f"invalid message length {n}")
                    framer.fail(data, pos, f"invalid message length {n}")
                    break
                stop = pos + 1 + n
                if stop > end:
                    framer.hold(data, pos, stop - pos)
                    break
                if watch[kind]:
                    if kind == _Z:
                        self.txn_status = data[pos + 5 : pos + 6]
                        self.outstanding -= 1
                        if not self.outstanding:
                            now = self.last_active = _now()
                            # _Hist.observe, inline (one Python call less per request).
                            hist = self._m_hist
                            spent = now - self._t0
                            hist.counts[bisect_left(hist.bounds, spent)] += 1
                            hist.sum += spent
                        if self.watch_ready:
                            self.gate.ready(self, self.txn_status)
                        if self._observing:
                            self._observing -= 1
                            if not self._observing:
                                # What follows is the reply to the observation query.
                                self.transport.write(  # type: ignore[union-attr]
                                    _spliced(edited, data, stop))
                                self.state = _OBSERVE
                                if stop < end:
                                    self._server_observe(data[stop:])
                                return
                    elif kind == _PS:
                        name, value = m.parameter_status(data[pos + 5 : stop])
                        self.server_params[name] = value
                        if name in _TEXT_RULES:
                            reason = encoding.session_refusal(self.server_params)
                            if reason is not None:
                                self._text_rules_broken(_spliced(edited, data, pos), reason)
                                return
                    else:  # ErrorResponse
                        self._count_error(data, pos, stop)
                        mine = refusal_error(data, pos, stop)
                        if mine is not None:
                            # The error of a substituted refusal: forwarded without
                            # the context of the proxy's DO block.
                            edited = _edit(edited, data, pos, stop, mine)
                        if _fatal(data, pos, stop):
                            self.server_fatal = True
                        if self.watch_ready:  # the failed transaction takes its SETs too
                            self.gate.server_error(self)
                pos = stop
            else:
                if pos < end:
                    framer.hold(data, pos, 5)
            if edited is not None:
                self.transport.write(_spliced(edited, data, pos))  # type: ignore[union-attr]
            elif pos:
                self.transport.write(data if pos == end else data[:pos])  # type: ignore[union-attr]
        except Exception:
            # Garbage from the server or a proxy bug: end this session only, visibly.
            log.exception("session %s: internal error handling server data", self.id)
            self.expire("58000", "internal error in the proxy; the session was closed")

    def _server_other(self, data: bytes) -> None:
        state = self.state
        if state is _READY:  # tracking mode
            self._server_tracking(data)
        elif state is _AUTH:
            self._server_auth(data)
            # Messages after ReadyForQuery in the same chunk were handled by _server_auth.
        elif state is _PRELUDE:
            self._server_prelude(data)
        elif state is _OBSERVE:
            self._server_observe(data)

    def _server_prelude(self, data: bytes) -> None:
        """Collect the rows of the proxy's start-of-session query, then open the gate."""
        buf, frames = self._sframer.feed(data)
        assert self._prelude is not None
        held, results = self._prelude
        for kind, start, stop in frames:
            if kind == _T:
                results.append([])
            elif kind == _D and results:
                results[-1].append(decode_data_row(buf[start + 5 : stop]))
            elif kind == _E:
                fields = m.parse_fields(buf[start + 5 : stop])
                log.warning("session %s: start-of-session query failed: %s", self.id,
                            fields.get("C"))
                self._fatal("08000", "strongroom could not prepare the session",
                            hint="The proxy's catalog query failed; see the proxy log.")
                return
            elif kind == _Z:
                self._prelude = None
                try:
                    self.gate.prelude_done(self, results)
                except DatabaseNotBindable as exc:
                    log.warning("session %s: %s", self.id, exc)
                    self._fatal("08000", "strongroom could not prepare the session",
                                hint=str(exc))
                    return
                except Exception:
                    log.exception("session %s: could not set up the session", self.id)
                    self._fatal("08000", "strongroom could not prepare the session")
                    return
                self.state = State.READY
                self.server.on_session_ready(self)
                # Anything after it can only be asynchronous (notices, parameters).
                self.transport.write(held + buf[stop : frames[-1][2]])  # type: ignore[union-attr]
                return

    def server_lost(self) -> None:
        if self.state is State.CLOSED:
            return
        if self.terminating:
            self._close()
            return
        if self.close_reason == "client_eof":
            self.close_reason = "server_fatal" if self.server_fatal else "server_closed"
        if not self.server_fatal and self.transport is not None:
            self.transport.write(
                m.fatal(
                    "08006",
                    "the upstream server closed the connection unexpectedly",
                    hint="PostgreSQL may have restarted; reconnect to get a new session.",
                )
            )
        log.info("session %s user=%s: upstream closed", self.id, self.user)
        self._close()

    # ------------------------------------------------------------------ observability

    def _count_error(self, buf: bytes, start: int, stop: int) -> None:
        """Count a server ErrorResponse by its SQLSTATE (the 'C' field; off the hot path)."""
        i = buf.find(b"\0C", start + 5, stop)
        if i < 0:
            code = buf[start + 6 : start + 11] if buf[start + 5 : start + 6] == b"C" else b""
        else:
            code = buf[i + 2 : i + 7]
        self.server.metrics.error_sent(bytes(code))

    # ------------------------------------------------------------------ endings

    def _terminate(self, forward: bytes) -> None:
        """Terminate: forward what came before it and the Terminate itself (`forward`),
        ignore the rest.

        Requests pipelined before the Terminate still get their replies, as from
        PostgreSQL itself: stop reading from the client, relay what the server sends,
        and close the client when the server, having read the Terminate, hangs up.
        """
        up = self.upstream.transport  # type: ignore[union-attr]
        up.write(forward)
        self.close_reason = "client_terminate"
        if self.outstanding > 0 and self.state is _READY:
            self.terminating = True
            self.pause_client_reading("terminate")
            return
        self.state = State.CLOSED
        up.close()
        self._close()

    def _violation(self, text: str) -> None:
        log.info("session %s %s: protocol violation: %s", self.id, self.peer, text)
        self.server.on_protocol_error("08P01")
        self.close_reason = "protocol_error"
        self._fatal("08P01", text)

    def _fatal(self, code: str, text: str, hint: str | None = None) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(m.fatal(code, text, hint=hint))
            self.server.metrics.error_sent(code)
        if self.close_reason == "client_eof":
            self.close_reason = _FATAL_REASONS.get(code, "other")
        self._close()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.state = State.CLOSED

    def _startup_expired(self) -> None:
        self._timer = None
        if self.state is not State.READY and self.state is not State.CLOSED:
            log.info("session %s %s: startup timeout", self.id, self.peer)
            self.close_reason = "startup_timeout"
            self.server.on_protocol_error("08P01")
            self._fatal("08P01", "timeout expired during connection startup")

    def expire(self, code: str, text: str) -> None:
        """Called by the janitor for idle limits and by shutdown."""
        log.info("session %s user=%s: %s", self.id, self.user, text)
        self._fatal(code, text)
