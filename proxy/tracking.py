"""The outstanding-request queue: which reply belongs to which request.

Sessions whose database has protected columns run in *tracking* mode: every frontend
message that expects a reply is queued (forward or skip, like PgBouncer's
`add_outstanding_request`), and every backend message is matched to the head of the
queue. That tells the rewriter which RowDescription governs which DataRows (also for
a prepared statement executed long after it was described), lets the proxy inject
Describe messages whose replies it swallows, and keeps pipelines ordered when a
statement is substituted. An error in the extended protocol discards queued requests up
to the next Sync, exactly as the server discards them.

The module is pure: messages in, bytes out. The session does the I/O.
"""

from __future__ import annotations

import re
import secrets
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from proxy.protocol import messages as m
from proxy.protocol import rows
from proxy.protocol.messages import ProtocolViolation
from proxy.sql.positions import original_position

BYTEA_OID = 17


class ClientRefusal(Exception):
    """A statement the proxy will not forward. Carries a SQLSTATE and a value-free text."""

    def __init__(self, sqlstate: str, text: str, hint: str | None = None) -> None:
        super().__init__(text)
        self.sqlstate = sqlstate
        self.text = text
        self.hint = hint


class AuditRefused(Exception):
    """The audit record of a reveal could not be written and `audit.on_failure` is
    `refuse`: no row of the statement may be sent."""


AUDIT_REFUSED = ("the audit record of this statement could not be written; it was refused "
                 "before any protected value was sent (audit.on_failure: refuse)")


STALE_PORTAL = ("the configuration was reloaded since this portal was bound and before it "
                "ran; bind it again (it would run under the rules replaced)")
STALE_PORTAL_EXECUTE = m.message(b"E", STALE_PORTAL.encode() + b"\0" + b"\0\0\0\0")
"""A reload reaches a session at its next statement, and a portal that has not run is
one: its Execute becomes one of a portal that cannot exist, named with the reason (the
server answers 34000 in order, and the rest of the request is skipped to Sync). A portal
that already returned rows (suspended by a row limit) finishes under the rules it began
with."""


class ValueError_(Exception):
    """A value could not be converted (bad input syntax, failed decryption)."""

    def __init__(self, sqlstate: str, text: str) -> None:
        super().__init__(text)
        self.sqlstate = sqlstate
        self.text = text


class ColumnCrypto(Protocol):
    """What the tracker needs of one protected column, as this session's role sees it."""

    logical_oid: int
    typlen: int
    view: str  # plaintext | masked | ciphertext

    def encrypt_param(self, value: bytes, fmt: int, oid: int = 0) -> bytes: ...
    def blind_index_param(self, value: bytes, fmt: int, oid: int = 0) -> bytes: ...
    def reveal(self, envelope: bytes, fmt: int) -> bytes | None: ...
    def equality_key(self, value: bytes, fmt: int, oid: int = 0) -> bytes: ...
    def opened_key(self, envelope: bytes) -> bytes: ...


@dataclass(frozen=True, slots=True)
class RecheckSpec:
    """One hidden recheck column of a statement (see rewrite_plan.Recheck): the column,
    the equality keys of the literals it was searched for, and the 1-based parameters
    whose values it was searched for (their keys are taken per Bind)."""

    crypto: ColumnCrypto
    keys: frozenset[bytes | None]
    params: tuple[int, ...] = ()


class Protector(Protocol):
    """The session-side view of catalog + keys + rewriter + policy, per statement."""

    def column_at(self, table_oid: int, attnum: int) -> ColumnCrypto | None: ...
    def plan_query(self, sql: str) -> Any: ...  # StatementPlan
    def copy_plan(self, plan: Any) -> Any: ...


@dataclass(slots=True)
class StatementPlan:
    """What the rewriter decided for one statement text, for one session's role."""

    sql: bytes | None  # text to send (splices applied; fresh ciphertexts); None: as sent
    params: dict[int, tuple[str, ColumnCrypto]] = field(default_factory=dict)  # 0-based
    touches_protected: bool = False
    refusal: ClientRefusal | None = None
    # Per COPY to or from the client in the text, in order: ("in" | "out", factory of
    # its stream transformer, None when its data passes as is). Each execution of one
    # gets a transformer of its own (`CopyRun`).
    copies: tuple[tuple[str, Callable[[], Any] | None], ...] = ()
    # Parameters the proxy appends to Bind (blind-index siblings of written values):
    # (0-based number, 0-based source parameter, action, column)
    derived: list[tuple[int, int, str, ColumnCrypto]] = field(default_factory=list)
    # Per statement in the text, per result column: the protected column the parse tree
    # proves it is a plain reference to (None: not one; a None list: unknown). Used when
    # RowDescription carries no table OID for it (a scalar subquery, a view column).
    outputs: list[list[ColumnCrypto | None] | None] = field(default_factory=list)
    # For the audit log: the client's statement text (never logged: fingerprinted) and
    # the protected tables it references, `schema.table`.
    source: str = ""
    tables: tuple[str, ...] = ()
    literals: tuple[ColumnCrypto, ...] = ()  # columns whose literals the proxy sealed
    # Per statement in the text: its blind-index lookups to recheck, one hidden result
    # column each, appended after the client's columns.
    rechecks: dict[int, list[RecheckSpec]] = field(default_factory=dict)
    # Where `sql` differs from the client's text: (start, end, new length) in bytes, so an
    # error position can be mapped back (proxy.sql.positions).
    shifts: tuple[tuple[int, int, int], ...] = ()


AS_SENT = StatementPlan(sql=None)
"""The shared plan of every statement that touches nothing protected: forwarded as the
client sent it (one object, not one per statement: the common case costs no allocation).
Never mutated."""


@dataclass(slots=True)
class Statement:
    plan: StatementPlan
    fields: list[rows.Field] | None = None
    # Parameter type OIDs as the client declared them in Parse (0: unspecified). The
    # server is told 0 for protected parameters (it infers bytea); the proxy reads a
    # binary value with the declared type and reports that type back, as PG would.
    declared: list[int] = field(default_factory=list)
    # What the fields were learnt for: (client's query text, catalog snapshot object,
    # search_path, DDL count); a Parse of the same text under the same view reuses them.
    learnt: tuple[Any, ...] | None = None
    # Session effects (SET, set_config, PREPARE, DECLARE, FETCH...) that happen when a
    # portal of it is executed, and the role it was decided for at Parse.
    effects: Any = None
    role: str | None = None
    path: Any = None  # the search_path it was planned under
    sql: str | None = None  # the client's text, to decide again for another role
    # The rules (protector's Encryption) it was planned under: a Bind after a reload
    # decides and plans it again (`SessionProtector.recheck_role`).
    rules: object = None


@dataclass(slots=True)
class Portal:
    statement: Statement | None
    result_formats: list[int]
    # Its statement's COPY (`StatementPlan.copies`, at most one: Parse takes one
    # statement), kept here so that an Execute of anything else costs one check.
    copies: tuple[tuple[str, Callable[[], Any] | None], ...] = ()
    fields: list[rows.Field] | None = None
    # (the fields list it was computed from, the plan): a portal's rows all share it
    cached_plan: tuple[object, RowPlan | None, object] | None = None
    # Blind-index recheck: per hidden column, the accepted equality keys (this Bind's)
    checks: list[tuple[ColumnCrypto, frozenset[bytes | None]]] | None = None
    cached_filter: tuple[object, RecheckFilter] | None = None
    # The audited reveal of its rows, from its first revealed row until it completes,
    # fails or is closed (a row-limited portal spans several Executes).
    reveal: Reveal | None = None
    # The rules (protector's Encryption) it was bound under, and whether an Execute ran
    # it: one not run yet when a reload replaced them is refused (`Tracker._stale_portal`)
    rules: object = None
    started: bool = False


@dataclass(slots=True, eq=False)
class Reveal:
    """A statement revealing protected values: its `statement` record was written before
    its first revealed row (`token`: what the audit hook returned), one `statement_end`
    record ends it with the rows sent and the outcome."""

    token: Any
    rows: int = 0


# Queue entry kinds.
PARSE, BIND, DESCRIBE, EXECUTE, CLOSE, SYNC, QUERY, FUNC, INJECTED_QUERY = range(9)


@dataclass(slots=True)
class Entry:
    kind: int
    skip: bool = False
    forward_ready: bool = False  # INJECTED_QUERY: its ReadyForQuery goes to the client
    target: Statement | Portal | None = None
    describe_statement: bool = False
    on_done: Callable[[list[list[bytes | None]]], None] | None = None
    collected: list[list[bytes | None]] | None = None
    plan: StatementPlan | None = None  # QUERY: the plan of its text
    result: int = 0  # QUERY: index of the statement whose replies are coming
    # QUERY / EXECUTE: the roles its rows are revealed as, when not the session's usual
    # one (SET ROLE, a cursor declared by another role): see SessionProtector.viewer.
    viewer: tuple[str, ...] | None = None
    # QUERY / EXECUTE: one run per COPY to or from the client it executes, in order;
    # `run_next`: the next one the server's CopyIn/OutResponse starts.
    runs: list[CopyRun] | None = None
    run_next: int = 0

    hidden_formats: int = 0  # BIND: result-format codes the proxy added (recheck columns)
    # SYNC sent before the client's stream of this copy-in run started: the server
    # ignores it if it starts the run (it is then in copy-in mode), answers it if not.
    copy_run: CopyRun | None = None

@dataclass(slots=True, eq=False)
class CopyRun:
    """One execution of a COPY to or from the client: each COPY of a Query, each Execute
    of a portal holding one, gets its own (never a plan left over from another).

    COPY FROM STDIN: the client's copy streams (each ended by CopyDone or CopyFail) map,
    in the client's message order, to the copy-in runs it requested, in the order it
    requested them (`Tracker.copy_expect`). A stream starts at its first CopyData,
    CopyDone or CopyFail, which may come before the server's CopyInResponse (asyncpg
    does not wait). A run the server completed its request without starting (an error,
    an earlier statement failed, the rest skipped to Sync) is dropped then, so its plan
    never applies to another COPY's data. COPY TO STDOUT: the server's CopyOutResponse
    takes the next run of the request it answers."""

    direction: str  # "in" | "out"
    factory: Callable[[], Any] | None  # None: nothing protected, the data passes as is
    owner: Entry
    stream: Any = None  # in: the transformer of the client's stream, once started
    state: int = 0  # in: 0 not started, 1 the client's stream is on, 2 it ended
    done: bool = False  # its request is complete on the server
    started: bool = False  # in: the server's CopyInResponse for it arrived
    failed: ClientRefusal | None = None  # in: a value could not be sealed (CopyFail sent)


# The entries of requests that carry nothing of their own (no target, no plan, not
# skipped): nothing ever writes to a PARSE, BIND, CLOSE, SYNC or FUNC entry once queued
# (only QUERY and INJECTED_QUERY entries are updated in place), and entries of one kind
# with the same fields were already interchangeable (`Entry` compares by value), so one
# shared object per kind stands for all of them: the common case allocates nothing.
_PARSE_ENTRY = Entry(PARSE)
_BIND_ENTRY = Entry(BIND)
_CLOSE_ENTRY = Entry(CLOSE)
_SYNC_ENTRY = Entry(SYNC)
_FUNC_ENTRY = Entry(FUNC)


class RowPlan(list[tuple[int, "ColumnCrypto", int]]):
    """(column index, crypto, format) per revealed result column, in column order. The
    list is what the audit hook sees; `revealer` is the DataRow path compiled from it."""

    __slots__ = ("_revealer",)

    @property
    def revealer(self) -> RowRevealer:
        try:
            return self._revealer
        except AttributeError:
            self._revealer = RowRevealer(self)
            return self._revealer


_I_unpack_from = struct.Struct("!i").unpack_from
_I_pack_into = struct.Struct("!i").pack_into
# A DataRow's type byte, length, cell count and first cell's length word.
_ROW_unpack_from = struct.Struct("!Bihi").unpack_from


class RowRevealer:
    """The DataRows of one result set, revealed without decoding every cell.

    `reveal(buf, pos, end, out)` walks a run of whole DataRows of a read buffer in one
    call: per-row dispatch (a call, a slice and a join per row) was most of the cost of
    a cached read. Per row it walks the length-prefixed cells once (up to the last
    protected one), replaces the protected cells and fixes the message length;
    everything else is copied in slices. That is the same message `_reveal_row` builds
    by decoding and re-encoding the whole row, for any DataRow PostgreSQL sends.

    A protected cell is looked up in its column's decrypt cache slot right here (a hit
    is one dict lookup, no call; the slot holds cells ready for the row, length word
    included); a miss, or a column without a cache, goes through the column's
    `cell_revealer`, which also fills the slot. Anything unusual (a failure to decrypt
    or convert, a crypto object without `cell_revealer`, a short or malformed row) ends
    the run *before* that row, and the caller redoes the row with `_reveal_row`, which
    counts and reports as it always has.

    Revealed cells are counted per row (`rows` minus each column's NULL or missing cells)
    and added to the columns' `n_decrypt` by `flush`, called whenever the tracker leaves
    the result set and before the session drains the counters.
    """

    __slots__ = ("counted", "nulls", "plan", "rows", "steps", "width")

    def __init__(self, plan: RowPlan) -> None:
        self.plan = plan
        self.rows = 0
        self.nulls = [0] * len(plan)
        self.counted: list[Any] = []
        self.width = plan[-1][0] + 1 if plan else 0  # cells a row must have for `reveal`
        # Per revealed column, in column order: (cells to skip before it, its cache
        # slot's `get` (without a cache: the revealer itself, which never returns None),
        # its cell revealer, its counter slot).
        steps: list[tuple[int, Callable[[bytes], bytes | None],
                          Callable[[bytes], bytes], int]] | None = []
        prev = -1
        for j, (i, crypto, fmt) in enumerate(plan):
            make = getattr(crypto, "cell_revealer", None)
            if make is None or i <= prev:
                steps = None  # counted by crypto.reveal itself: every row goes slow
                break
            revealer = make(fmt)
            slot = getattr(revealer, "slot", None)  # see ColumnRuntime.cached
            steps.append((i - prev - 1, revealer if slot is None else slot.get,
                          revealer, j))
            self.counted.append(crypto)
            prev = i
        self.steps = steps

    def reveal(self, buf: bytes, pos: int, end: int, out: bytearray) -> int:
        """Reveal the DataRows of `buf[pos:end]` into `out`, as far as they go: returns
        where it stopped, at `end` or at the first message that is not a whole DataRow
        for the fast path (another type, one cut off by `end`, a short or malformed row,
        a cell that fails). Nothing of the message it stopped at is written or counted.
        """
        steps = self.steps
        if steps is None:
            return pos
        width = self.width
        row_head = _ROW_unpack_from
        unpack = _I_unpack_from
        done = 0
        mark = len(out)
        missing: list[int] | None = None  # NULL cells of this row: not revealed, counted
        try:
            while end - pos >= 11:
                kind, n, ncols, size = row_head(buf, pos)
                stop = pos + 1 + n
                if kind != 0x44 or n < 10 or stop > end or ncols < width:
                    break  # (short rows: never from PG; `width` is at least 1)
                mark = len(out)
                cell = pos + 7  # at the length word of a cell; `size`: that length
                last = pos  # buf[last:cell] is not copied yet (the header: patched below)
                for skip, get, reveal, j in steps:
                    while skip:
                        cell += 4 + size if size > 0 else 4
                        (size,) = unpack(buf, cell)
                        skip -= 1
                    if size < 0:
                        if missing is None:
                            missing = []
                        missing.append(j)
                        cell += 4
                    else:
                        after = cell + 4 + size
                        if after > stop:
                            raise IndexError("DataRow cell overruns the message")
                        raw = buf[cell + 4 : after]
                        value = get(raw)
                        if value is None:
                            value = reveal(raw)
                        if last != cell:
                            out += buf[last:cell]
                        out += value
                        cell = last = after
                    if cell < stop:  # the next cell's length (a row's last cell: none)
                        (size,) = unpack(buf, cell)
                if cell > stop:
                    raise IndexError("DataRow cell overruns the message")
                if last != stop:
                    out += buf[last:stop]
                _I_pack_into(out, mark + 1, len(out) - mark - 1)
                if missing is not None:
                    nulls = self.nulls
                    for j in missing:
                        nulls[j] += 1
                    missing = None
                done += 1
                pos = stop
        except Exception:
            # Whatever it was, the caller does this row again the one reference way.
            del out[mark:]
        self.rows += done
        return pos

    def flush(self) -> None:
        """Add the cells revealed since the last flush to each column's `n_decrypt`."""
        rows = self.rows
        if not rows:
            return
        nulls = self.nulls
        for j, crypto in enumerate(self.counted):
            crypto.n_decrypt += rows - nulls[j]
            nulls[j] = 0
        self.rows = 0


class RecheckFilter:
    """The DataRows of a result set with hidden recheck columns (blind-index lookups).

    Each row's hidden cells are decrypted and compared with the searched values (as
    equality keys); a row failing any is dropped and counted, so that CommandComplete's
    row count can be corrected. Kept rows lose the hidden cells and are revealed the
    reference way (`Tracker._reveal_values`): lookups return few rows.
    """

    __slots__ = ("checks", "dropped", "plan", "visible")

    def __init__(self, plan: RowPlan | None, visible: int,
                 checks: list[tuple[ColumnCrypto, int, frozenset[bytes | None]]]) -> None:
        self.plan = plan
        self.visible = visible
        self.checks = checks  # (column, result format of its hidden cell, accepted keys)
        self.dropped = 0


_COLLECT = object()  # data_plan marker: rows belong to an injected query


REFUSAL_MARK = secrets.token_hex(16).encode()
"""Carried in the schema-name (`s`) field of the error a substituted refusal raises, so
that the relay recognises that error as the proxy's (and takes out the `W` line that
describes the proxy's DO block, not the client's statement) without a request queue.
Random per process: a client that learnt it (from pg_prepared_statements, say) could
only have the context of its own errors dropped."""
_MARK_FIELD = b"s" + REFUSAL_MARK + b"\0"


def refusal_sql(refusal: ClientRefusal) -> bytes:
    """A statement that makes the server raise the refusal itself, so that transaction
    state and reply order are exactly those of a real error of that kind."""
    text = refusal.text.replace("'", "''")
    hint = f", HINT = '{refusal.hint.replace(chr(39), chr(39) * 2)}'" if refusal.hint else ""
    body = (
        f"BEGIN RAISE EXCEPTION USING ERRCODE = '{refusal.sqlstate}', "
        f"MESSAGE = '{text}'{hint}, SCHEMA = '{REFUSAL_MARK.decode()}'; END"
    )
    tag = "$strongroom$"
    while tag in body:
        tag = tag[:-1] + "x$"
    return f"DO {tag}{body}{tag}".encode()


def refusal_error(data: bytes, start: int = 0, stop: int | None = None) -> bytes | None:
    """The ErrorResponse at data[start:stop] as the client must see it when a
    substituted refusal raised it: without its `W` (the PL/pgSQL context of the proxy's
    DO block: "PL/pgSQL function inline_code_block line 1 at RAISE") and without the
    mark. None for every other error, which passes byte for byte."""
    stop = len(data) if stop is None else stop
    if data.find(_MARK_FIELD, start + 5, stop) < 0:
        return None
    kept = [field for field in bytes(data[start + 5 : stop - 1]).split(b"\0")
            if field and field[:1] != b"W" and field != _MARK_FIELD[:-1]]
    return m.message(b"E", b"\0".join(kept) + b"\0\0")


class Tracker:
    """Per-session request/reply bookkeeping for tracking mode."""

    def __init__(self, protector: Protector) -> None:
        self.protector = protector
        # The session's policy state (gate.SessionPolicy), when a policy is configured:
        # the role in effect now, read on Bind and Execute of a statement parsed as
        # another role.
        self._state: Any = getattr(getattr(protector, "session", None), "policy_state", None)
        self._login_role: Any = self._state.role if self._state is not None else None
        self.queue: deque[Entry] = deque()
        self.statements: dict[bytes, Statement] = {}
        self.portals: dict[bytes, Portal] = {}
        self.discarding = False  # server is skipping to Sync after an error
        self.row_plan: RowPlan | None = None  # for the current simple Query result set
        self.row_filter: RecheckFilter | None = None  # ... when it has recheck columns
        self.data_plan: RowRevealer | object | None = None  # what the next DataRow needs
        # Seconds spent sealing parameters and opening rows since the metrics last took
        # them (one clock pair per Bind or DataRow, not per cell).
        self.encrypt_seconds = 0.0
        self.decrypt_seconds = 0.0
        self.consume_to_ready = False  # after a proxy-made error: drop until ReadyForQuery
        # Bytes the proxy must send to the server on its own (the session writes them
        # after handling a chunk of server messages): see `_abort_transaction`.
        self.to_server = b""
        self.copy_out: Any = None  # the transformer of the COPY TO STDOUT being read
        self.copy_expect: deque[CopyRun] = deque()  # copy-in runs with no stream yet
        self.copy_in_run: CopyRun | None = None  # the run of the client's current stream
        # This session's `CLIENT_HANDLERS` (the session indexes it per message): while a
        # COPY FROM STDIN may be waiting for the client's data, the types the server
        # does not accept in copy-in mode refuse the session instead (`_copy_mode`);
        # otherwise nothing of COPY costs anything per message.
        self.handlers: list[Callable[[Tracker, int, bytes], bytes | None]] = list(
            CLIENT_HANDLERS)
        self._guarding = False
        # Audit hook: called as on_statement(plan, CommandComplete message, row plan) for
        # each completed statement whose plan touches a protected column and revealed no
        # row; `on_statement.begin(plan, row plan)` before the first revealed row of a
        # result set (raises AuditRefused to refuse it), `on_statement.end(token, rows,
        # outcome, sqlstate)` when that reveal ends (see `Reveal`).
        self.on_statement: Any = None
        self.unaudited = False  # the current rows reveal and their record is not written
        self.reveal: Reveal | None = None  # the audited reveal the current rows belong to
        self.open_portals: list[Portal] = []  # portals whose reveal has not ended
        # The protector's rules in force, switched to a reload's at each statement
        # boundary (Query, Parse, Bind); None for a protector without reloads.
        self._follow: Callable[[], object] | None = getattr(protector, "follow_reload", None)

    # ------------------------------------------------------------------ client side

    def _push(self, entry: Entry) -> None:
        if self.discarding and entry.kind != SYNC:
            return
        if entry.kind == SYNC:
            self.discarding = False
        self.queue.append(entry)
        if len(self.queue) == 1:
            # A new head: its DataRows may come before any other reply (Execute of a
            # portal bound earlier), so the row plan must be known now.
            self._set_data_plan(self._current_plan(entry))

    def client(self, kind: int, msg: bytes) -> bytes | None:
        """One frontend message. Returns the bytes to send instead (None: as is).

        Dispatched through a table by type byte (`CLIENT_HANDLERS`): one index instead
        of a chain of comparisons, on every message of every request. The session's
        tracking loop indexes the table itself and saves this call too."""
        return self.handlers[kind](self, kind, msg)

    def _client_query(self, kind: int, msg: bytes) -> bytes | None:
        entry = Entry(QUERY)
        pushed = not self.discarding
        self._push(entry)
        self.row_plan = self.row_filter = None
        sql = m.query_text(msg[5:])
        if self._follow is not None:
            self._follow()
        plan = self.protector.plan_query(sql)
        entry.plan = plan
        viewer_now = getattr(self.protector, "viewer_now", None)
        if viewer_now is not None:
            entry.viewer = viewer_now()
        if plan.refusal is not None:
            return m.message(b"Q", refusal_sql(plan.refusal) + b"\0") + self._refresh()
        if plan.copies and pushed:
            self._plan_runs(entry, plan.copies)
        if plan.sql is not None and plan.sql != msg[5:-1]:
            return m.message(b"Q", plan.sql + b"\0") + self._refresh()
        extra = self._refresh()
        return msg + extra if extra else None

    def _client_parse(self, kind: int, msg: bytes) -> bytes | None:
        name, query, oids = rows.decode_parse(msg[5:])
        sql = query.decode(errors="surrogateescape")
        rules = self._follow() if self._follow is not None else None
        plan_parsed = getattr(self.protector, "plan_parsed", None)
        if plan_parsed is None:
            plan = self.protector.plan_query(sql)
            stmt = Statement(plan, declared=list(oids))
        else:
            # Decided now, but its session effects wait for an Execute (`_client_execute`):
            # a Parse or Bind alone runs nothing on the server.
            plan, effects, role = plan_parsed(sql)
            stmt = Statement(plan, declared=list(oids), effects=effects, role=role, sql=sql,
                             path=self._state.path if self._state is not None else None,
                             rules=rules)
        prev = self.statements.get(name)
        self.statements[name] = stmt
        if not self.discarding:  # (`_push`, inline)
            queue = self.queue
            # A rewritten text keeps its statement at hand: the server's error positions
            # refer to what it was sent (`_server_error`).
            entry = Entry(PARSE, target=stmt) if plan.shifts else _PARSE_ENTRY
            queue.append(entry)
            if len(queue) == 1:
                self._set_data_plan(self._current_plan(entry))
        if plan.refusal is not None:
            return rows.encode_parse(name, refusal_sql(plan.refusal), [])
        out = None
        if plan.sql is not None and (plan.params or plan.sql != query):
            for i in plan.params:
                if i < len(oids):
                    oids[i] = 0  # let the server infer bytea from the column
            out = rows.encode_parse(name, plan.sql, oids)
        if plan.touches_protected:
            # Learn the statement's result columns now, whether or not the client
            # asks: a later Bind/Execute carries no RowDescription. A driver that
            # re-sends the same unnamed Parse for every execution (pgbench -M
            # extended, many ORMs) has them learnt already under the same catalog
            # view and search_path: no second Describe.
            gen = getattr(self.protector, "generation", None)
            learnt = (query, *gen()) if gen is not None else None
            was = prev.learnt if prev is not None else None
            if (learnt is not None and was is not None and prev is not None
                    and prev.fields is not None and was[1] is learnt[1]
                    and was[0] == query and was[2:] == learnt[2:]
                    and prev.declared == stmt.declared):
                stmt.fields = prev.fields
                stmt.learnt = learnt
            else:
                stmt.learnt = learnt
                self._push(Entry(DESCRIBE, skip=True, target=stmt,
                                 describe_statement=True))
                out = (out or msg) + m.message(b"D", b"S" + name + b"\0")
        return out

    def _client_bind(self, kind: int, msg: bytes) -> bytes | None:
        """Bind. A statement with nothing to do to its parameters (no protected one, no
        proxy-made parameter, no recheck, no refusal: every statement that touches
        nothing protected) needs only the portal's name and result formats, so only the
        message's head is decoded (`rows.bind_head`, which still validates the whole
        message as `decode_bind` does). Anything else goes the full way."""
        portal, name, result_formats = rows.bind_head(msg)
        stmt = self.statements.get(name)
        rules = self._follow() if self._follow is not None else None
        if stmt is not None:
            plan = stmt.plan
            if (plan.refusal is not None or plan.params or plan.derived
                    or plan.rechecks or stmt.rules is not rules
                    or (stmt.role is not None and self._state is not None
                        and (stmt.role is not self._state.role
                             or stmt.path is not self._state.path))):
                return self._client_bind_full(msg)
            self.portals[portal] = Portal(stmt, result_formats, plan.copies, rules=rules)
        else:
            if (self._state is not None and self._state.sql_prepared and name.decode(
                    errors="surrogateescape") in self._state.sql_prepared):
                # Made by SQL PREPARE: decided at EXECUTE, never bound with the protocol
                # (PostgreSQL would re-analyse it for this Bind unseen by the proxy).
                from proxy.gate import SQL_PREPARED_BIND

                self._push(_BIND_ENTRY)
                return self._failing_bind(rows.decode_bind(msg[5:]),
                                          ClientRefusal("26000", SQL_PREPARED_BIND))
            self.portals[portal] = Portal(None, result_formats)
        if not self.discarding:  # (`_push`, inline)
            queue = self.queue
            queue.append(_BIND_ENTRY)
            if len(queue) == 1:
                self._set_data_plan(self._current_plan(_BIND_ENTRY))
        return None

    def _client_bind_full(self, msg: bytes) -> bytes | None:
        """Bind of a statement whose parameters the proxy seals, derives or rechecks, or
        that was refused."""
        bind = rows.decode_bind(msg[5:])
        stmt = self.statements.get(bind.statement)
        refused = stmt is None or stmt.plan.refusal is not None
        self.portals[bind.portal] = Portal(
            stmt, bind.result_formats, () if refused else stmt.plan.copies,
            rules=self._follow() if self._follow is not None else None)
        specs = (stmt.plan.rechecks.get(0)
                 if stmt is not None and stmt.plan.refusal is None and stmt.plan.rechecks
                 else None)
        # One code per column: the hidden ones get theirs too. The server then checks
        # the client's count against the visible columns exactly (N + hidden against
        # visible + hidden); the BIND entry remembers how many to take off its error.
        widened = len(specs) if specs and len(bind.result_formats) > 1 else 0
        self._push(Entry(BIND, hidden_formats=widened) if widened else _BIND_ENTRY)
        if stmt is None:
            return None
        reloaded = self._follow is not None and stmt.rules is not self._follow()
        if stmt.plan.refusal is None and (reloaded or (
                stmt.role is not None and self._state is not None
                and (stmt.role != self._state.role or stmt.path != self._state.path))):
            # PostgreSQL re-analyses a prepared statement under the search_path of each
            # execution (since 9.3), and checks rights as the role of the moment.
            refusal = self.protector.recheck_role(stmt)  # type: ignore[attr-defined]
            if refusal is not None:
                # Parsed as another role (SET ROLE since): refused for the role it would
                # run as now. The portal is bound to a statement raising the error.
                return self._failing_bind(bind, refusal)
        if stmt.plan.refusal is not None:
            bind.params = []
            bind.param_formats = []
            return rows.encode_bind(bind)
        if specs:
            portal = self.portals[bind.portal]
            try:
                portal.checks = self._expected(bind, stmt, specs)
            except ValueError_ as exc:
                return self._failing_bind(bind, ClientRefusal(exc.sqlstate, exc.text))
            if widened:
                bind.result_formats = [*bind.result_formats, *([1] * widened)]
                portal.result_formats = bind.result_formats
        if stmt.plan.params or stmt.plan.derived:
            try:
                started = time.perf_counter()
                sealed = rows.encode_bind(self._encrypt_bind(bind, stmt))
                self.encrypt_seconds += time.perf_counter() - started
                return sealed
            except ValueError_ as exc:
                return self._failing_bind(bind, ClientRefusal(exc.sqlstate, exc.text))
        return rows.encode_bind(bind) if widened else None

    def _client_describe(self, kind: int, msg: bytes) -> bytes | None:
        which = msg[5:6]
        name = msg[6:-1]
        if which == b"S":
            self._push(Entry(DESCRIBE, target=self.statements.get(name),
                             describe_statement=True))
        else:
            self._push(Entry(DESCRIBE, target=self.portals.get(name)))
        return None

    def _client_execute(self, kind: int, msg: bytes) -> bytes | None:
        name = msg[5 : msg.index(b"\0", 5)]
        portal = self.portals.get(name)
        if self.discarding:  # (`_push`, inline: once per request)
            return None
        queue = self.queue
        entry = Entry(EXECUTE, target=portal)
        if self._state is not None and self._state.cursors:
            from proxy.gate import cursor_execute

            refused = cursor_execute(self._state, name)
            if refused is not None:
                entry.target = None
                queue.append(entry)
                if len(queue) == 1:
                    self._set_data_plan(self._current_plan(entry))
                return refused
        if portal is not None and not portal.started:
            if (portal.rules is not None and self._follow is not None
                    and portal.rules is not self._follow()):
                entry.target = None
                queue.append(entry)
                if len(queue) == 1:
                    self._set_data_plan(self._current_plan(entry))
                return STALE_PORTAL_EXECUTE
            portal.started = True
        if portal is not None and portal.statement is not None:
            stmt = portal.statement
            if stmt.effects is not None:
                # The server applies them now, so the proxy does (SessionPolicy).
                self.protector.apply_effects(stmt.effects)  # type: ignore[attr-defined]
                entry.viewer = self.protector.viewer_now()  # type: ignore[attr-defined]
            elif self._state is not None and self._state.role is not self._login_role:
                entry.viewer = (self._state.role,)
        queue.append(entry)
        if len(queue) == 1:
            self._set_data_plan(self._current_plan(entry))
        if portal is not None and portal.copies:
            self._plan_runs(entry, portal.copies)
        return None

    def _client_close(self, kind: int, msg: bytes) -> bytes | None:
        which = msg[5:6]
        name = msg[6:-1]
        closed = (self.statements if which == b"S" else self.portals).pop(name, None)
        if type(closed) is Portal and closed.reveal is not None:
            self._end_reveal(closed.reveal, "portal_closed")
        self._push(_CLOSE_ENTRY)
        return None

    def _client_sync(self, kind: int, msg: bytes) -> bytes | None:
        if self._guarding:
            return self._sync_during_copy(msg)
        self.discarding = False  # (`_push`, inline: once per request)
        queue = self.queue
        queue.append(_SYNC_ENTRY)
        if len(queue) == 1:
            self._set_data_plan(self._current_plan(_SYNC_ENTRY))
        extra = self._refresh()
        return msg + extra if extra else None

    def _sync_during_copy(self, msg: bytes) -> bytes | None:
        """Sync while a COPY FROM STDIN may be waiting for the client's data. PostgreSQL
        ignores Sync (and Flush) in copy-in mode, for libpq's sake, which sends one right
        behind the Execute of any statement, COPY included, and another after CopyDone:
        one ReadyForQuery then answers both. Outside copy-in mode (the COPY failed
        before starting) it is an ordinary Sync. So a Sync before the run's stream
        started is queued tied to the run, and taken off the queue when the server
        starts the run (`_server_copy_response`); one the server is known to be in
        copy-in mode for is not queued at all. Inside the client's stream the answer
        would depend on whether the server failed on an earlier row before reading it,
        which the proxy cannot see: it refuses the session rather than guess. Never
        followed by an injected catalog reload: the server may be in copy-in mode."""
        run = self.copy_in_run
        if run is None:
            expect = self.copy_expect
            while expect and expect[0].done:
                expect.popleft()
            run = expect[0] if expect else None
        if run is None:  # (the guard lifts on the next `_copy_mode`)
            self._copy_mode()
            return self._client_sync(0x53, msg)
        if run.state != 0:
            raise ProtocolViolation(
                "a Sync was sent inside the data of a COPY FROM STDIN; send it after "
                "CopyDone or CopyFail")
        if not run.started:
            self.queue.append(Entry(SYNC, copy_run=run))
        return None

    def _client_func(self, kind: int, msg: bytes) -> bytes | None:
        self._push(_FUNC_ENTRY)
        return None

    def _client_other(self, kind: int, msg: bytes) -> bytes | None:
        """Flush, and every type without a rule of its own: forwarded as is."""
        return None

    def _client_copy(self, kind: int, msg: bytes) -> bytes | None:
        """CopyData, CopyDone, CopyFail: part of the client's stream for the COPY FROM
        STDIN it belongs to (`CopyRun`), or, when no planned COPY is waiting for it
        (none was requested, the proxy refused it, the server already finished it),
        dropped: the server would ignore it outside copy-in mode, and plaintext meant
        for a protected column must never cross the wire on the strength of a guess."""
        run = self.copy_in_run
        if run is None:
            expect = self.copy_expect
            while expect and expect[0].done:
                expect.popleft()
            if not expect:
                return b""
            run = self.copy_in_run = expect.popleft()
            run.state = 1
            if run.factory is not None:
                try:
                    run.stream = run.factory()
                except ValueError_ as exc:
                    run.failed = ClientRefusal(exc.sqlstate, exc.text)
        if kind == 0x64:  # CopyData
            if run.failed is not None:
                return b""
            stream = run.stream
            if stream is None:
                return None
            try:
                return stream.client_data(msg[5:])  # type: ignore[no-any-return]
            except ValueError_ as exc:
                return self._fail_copy(run, exc)
        # CopyDone / CopyFail: the stream ends.
        run.state = 2
        self.copy_in_run = None
        self._copy_mode()
        stream, run.stream = run.stream, None
        if run.failed is not None:
            # Again in place of the client's end: a CopyFail sent before the server's
            # CopyInResponse (rows sent without waiting) was ignored, and the server
            # would otherwise wait for data the proxy dropped.
            return _copy_fail(run.failed)
        if kind == 0x63 and stream is not None:
            try:
                tail = stream.client_done()
            except ValueError_ as exc:
                return _copy_fail(ClientRefusal(exc.sqlstate, exc.text))
            return tail + msg if tail else None
        return None

    def _client_during_copy(self, kind: int, msg: bytes) -> bytes | None:
        """A message that is not COPY data while a COPY FROM STDIN the proxy forwarded
        may be waiting for its data. In copy-in mode the server takes it as a protocol
        violation (and ends the session); outside it (the COPY failed first) it runs it.
        The proxy cannot know which, and its picture of which request each reply
        answers would be a guess, so it refuses the session (a client must send the
        data, CopyDone or CopyFail of each COPY the server started before anything
        else; the guard lifts as soon as the server has finished the request)."""
        raise ProtocolViolation(
            "a message other than COPY data was sent while a COPY FROM STDIN may be "
            "waiting for its data; send CopyDone or CopyFail first")

    def _plan_runs(self, entry: Entry,
                   copies: tuple[tuple[str, Callable[[], Any] | None], ...]) -> None:
        """The COPY executions a forwarded Query or Execute requests, in order."""
        runs = [CopyRun(direction, factory, entry) for direction, factory in copies]
        entry.runs = runs
        expect = self.copy_expect
        for run in runs:
            if run.direction == "in":
                expect.append(run)
        self._copy_mode()

    def _copy_mode(self) -> None:
        """Guard the message types the server refuses in copy-in mode while a
        copy-in run may be waiting for the client's data (`_client_during_copy`)."""
        guard = bool(self.copy_expect) or self.copy_in_run is not None
        if guard is self._guarding:
            return
        self._guarding = guard
        table = self.handlers
        for t in _GUARDED:
            table[t] = Tracker._client_during_copy if guard else CLIENT_HANDLERS[t]

    def _end_runs(self, entry: Entry) -> None:
        """The server completed a request: a COPY of it the client has not started a
        stream for never will be (dropped), and a stream still on is over for the
        server (its remaining data is not forwarded)."""
        runs = entry.runs
        if not runs:
            return
        for run in runs:
            run.done = True
        current = self.copy_in_run
        if current is not None and current.done:
            current.stream = None
            self.copy_in_run = None
        expect = self.copy_expect
        while expect and expect[0].done:
            expect.popleft()
        self._copy_mode()

    def _abort_transaction(self) -> bytes:
        """The proxy ended a statement with its own error (a value failed to decrypt)
        inside a transaction block, where the server saw nothing wrong. PostgreSQL would
        have aborted the transaction, so the proxy makes it so: it holds this
        ReadyForQuery back, has the server raise an error (swallowed), and passes on the
        server's own ReadyForQuery ('E'), so a later COMMIT rolls back as it would.
        Only when nothing else is queued: a later request's replies must not overtake."""
        self.queue.append(Entry(INJECTED_QUERY, skip=True, forward_ready=True, collected=[]))
        self._set_data_plan(_COLLECT)
        self.to_server += m.message(b"Q", refusal_sql(ClientRefusal(
            "XX001", "transaction aborted by strongroom after a protected value failed "
            "to decrypt")) + b"\0")
        return b""

    @staticmethod
    def _fail_copy(run: CopyRun, exc: ValueError_) -> bytes:
        """A value in COPY data cannot be sealed: abort the COPY on the server (CopyFail)
        rather than ever passing it on; the client's remaining data is dropped."""
        run.stream = None
        run.failed = ClientRefusal(exc.sqlstate, exc.text)
        return _copy_fail(run.failed)

    def _refresh(self) -> bytes:
        """An injected catalog reload, when the last statement may have changed tables."""
        after = getattr(self.protector, "after_statement", None)
        return after() if after is not None else b""

    def _failing_bind(self, bind: rows.Bind, refusal: ClientRefusal) -> bytes:
        """A parameter cannot be sealed (bad input for its type): bind the portal to a
        statement that raises the error on the server, so the server aborts and orders
        the reply exactly as for its own error. The helper statement's replies are
        swallowed."""
        name = b"strongroom_refusal"
        self._push(Entry(CLOSE, skip=True))
        self._push(Entry(PARSE, skip=True))
        # The BIND entry for the client's Bind was pushed by the caller, after these
        # would be wrong: move it to the end.
        bind_entry = None
        for e in reversed(self.queue):
            if e.kind == BIND and not e.skip:
                bind_entry = e
                break
        if bind_entry is not None:
            self.queue.remove(bind_entry)
            self.queue.append(bind_entry)
        self.portals[bind.portal] = Portal(None, bind.result_formats)
        return (
            m.message(b"C", b"S" + name + b"\0")
            + rows.encode_parse(name, refusal_sql(refusal), [])
            + rows.encode_bind(rows.Bind(bind.portal, name, [], [], bind.result_formats))
        )

    def inject_query(self, sql: str, on_done: Callable[[list[list[bytes | None]]], None]) -> bytes:
        """A Query the proxy sends for itself; its whole reply is swallowed."""
        self.queue.append(Entry(INJECTED_QUERY, skip=True, on_done=on_done, collected=[]))
        if len(self.queue) == 1:
            self._set_data_plan(_COLLECT)
        return m.message(b"Q", sql.encode() + b"\0")

    @staticmethod
    def _expected(bind: rows.Bind, stmt: Statement, specs: list[RecheckSpec],
                  ) -> list[tuple[ColumnCrypto, frozenset[bytes | None]]]:
        """The equality keys each hidden recheck column must match, for this Bind's
        parameter values (read before they are sealed)."""
        out = []
        n = len(bind.params)
        declared = stmt.declared
        for spec in specs:
            keys = set(spec.keys)
            for p in spec.params:
                value = bind.params[p - 1] if p - 1 < n else None
                if value is None:
                    keys.add(None)
                else:
                    oid = declared[p - 1] if p - 1 < len(declared) else 0
                    keys.add(spec.crypto.equality_key(value, bind.param_format(p - 1), oid))
            out.append((spec.crypto, frozenset(keys)))
        return out

    def _encrypt_bind(self, bind: rows.Bind, stmt: Statement) -> rows.Bind:
        plan = stmt.plan
        n = len(bind.params)
        formats = [bind.param_format(i) for i in range(n)]
        declared = stmt.declared

        def oid(i: int) -> int:
            return declared[i] if i < len(declared) else 0

        params = list(bind.params)
        extra: list[bytes | None] = []
        for number, source, action, crypto in sorted(plan.derived, key=lambda d: d[0]):
            value = params[source] if source < n else None
            if value is None:
                extra.append(None)
            elif action == "blind_index":
                extra.append(crypto.blind_index_param(value, formats[source], oid(source)))
            else:
                extra.append(crypto.encrypt_param(value, formats[source], oid(source)))
            del number
        for i, (action, crypto) in plan.params.items():
            if i >= n or params[i] is None:
                continue
            value = params[i]
            assert value is not None
            if action == "blind_index":
                params[i] = crypto.blind_index_param(value, formats[i], oid(i))
            else:
                params[i] = crypto.encrypt_param(value, formats[i], oid(i))
            formats[i] = 1  # bytea in binary format: the envelope itself
        bind.params = params + extra
        bind.param_formats = formats + [1] * len(extra)
        return bind

    # ------------------------------------------------------------------ server side

    def server(self, kind: int, msg: bytes) -> bytes | None:
        """One backend message. Returns None (forward), b"" (swallow) or replacement.

        `data_plan` is kept current after every other message, so that the DataRows
        between them (the bulk of the traffic) cost one attribute check when they carry
        nothing protected: `None` means forward them untouched (a session may skip the
        call for them: see `data_row`). A session hands runs of protected ones to
        `reveal_rows`, one call per run.
        """
        if kind == 0x44 and not self.consume_to_ready:
            plan = self.data_plan
            if plan is None:
                return None
            if plan is _COLLECT:
                self.queue[0].collected.append(rows.decode_data_row(msg[5:]))  # type: ignore[union-attr]
                return b""
            if self.unaudited:
                refused = self._begin_reveal()
                if refused is not None:
                    return refused
            if type(plan) is RecheckFilter:
                return self._sent(self._filter_row(msg, plan))
            out = bytearray()
            end = len(msg)
            if plan.reveal(msg, 0, end, out) == end:  # type: ignore[attr-defined]
                return self._sent(bytes(out))
            # Not for the fast path: the row is done again the one reference way.
            return self._sent(self._reveal_row(msg, plan.plan))  # type: ignore[attr-defined]
        queue = self.queue
        if self.consume_to_ready and kind != 0x5A:  # (`_server`, inline)
            # Only asynchronous messages still reach the client after a proxy-made error.
            out = None if kind in (0x4E, 0x41, 0x53) else b""
        else:
            out = _SERVER_HANDLERS[kind](self, kind, queue[0] if queue else None, msg)
        # `_set_data_plan(_current_plan(head))` (or _COLLECT), inline: this runs after
        # every message that is not a DataRow, and mostly finds nothing to reveal.
        if queue:
            head = queue[0]
            k = head.kind
            if k == INJECTED_QUERY:
                plan: RowPlan | RecheckFilter | object | None = _COLLECT
            elif k == EXECUTE:
                plan = self._current_plan(head)
            else:
                plan = self.row_filter if self.row_filter is not None else self.row_plan
        else:
            plan = None
        if plan is not None or self.data_plan is not None:
            self._set_data_plan(plan)
        return out

    def data_row(self, buf: bytes, start: int, stop: int) -> bytes | None:
        """`server(0x44, buf[start:stop])` for the DataRow at those offsets, without
        slicing it out first. A session may skip the call (and forward the row) while
        `data_plan is None and not consume_to_ready`: then it returns None."""
        plan = self.data_plan
        if type(plan) is RowRevealer and not self.consume_to_ready:
            if self.unaudited:
                refused = self._begin_reveal()
                if refused is not None:
                    return refused
            started = time.perf_counter()
            out = bytearray()
            done = plan.reveal(buf, start, stop, out) == stop
            self.decrypt_seconds += time.perf_counter() - started
            if done:
                return self._sent(bytes(out))
            return self._sent(self._reveal_row(buf[start:stop], plan.plan))
        return self.server(0x44, buf[start:stop])

    def reveal_rows(self, buf: bytes, start: int, end: int,
                    out: list[bytes | bytearray]) -> int:
        """The run of whole DataRows at `buf[start:end]`, as far as the fast path takes
        it (`RowRevealer.reveal`): appends what to send for them to `out` and returns
        where it stopped. The message there, if any, goes to `data_row` or `server`, one
        at a time (a row the fast path left, or another type). Returns `start` at once
        while the current rows are not for the fast path at all."""
        plan = self.data_plan
        if type(plan) is not RowRevealer or self.consume_to_ready or self.unaudited:
            return start  # (unaudited: `data_row` writes the record before the first row)
        started = time.perf_counter()
        revealed = bytearray()
        before = plan.rows
        stop = plan.reveal(buf, start, end, revealed)
        if revealed:
            out.append(revealed)
            if self.reveal is not None:
                self.reveal.rows += plan.rows - before
        self.decrypt_seconds += time.perf_counter() - started
        return stop

    def _sent(self, out: bytes) -> bytes:
        """Count a revealed row sent to the client (not a dropped row or an error)."""
        if out and self.reveal is not None and not self.consume_to_ready:
            self.reveal.rows += 1
        return out

    def _begin_reveal(self) -> bytes | None:
        """Before the first row of a result set that reveals protected values: write its
        audit record and flush it (the hook does), or go on with the reveal of a portal
        an earlier Execute suspended. Returns the ErrorResponse to send instead of the
        row when the record cannot be written and the policy refuses (nothing of the
        result set is sent; the session stays usable)."""
        self.unaudited = False
        self.reveal = None
        plan = self.data_plan
        rowplan = getattr(plan, "plan", None)
        if not rowplan or self.on_statement is None:
            return None  # nothing protected in these rows is shown
        head = self.queue[0] if self.queue else None
        portal = (head.target if head is not None and head.kind == EXECUTE
                  and type(head.target) is Portal else None)
        if portal is not None and portal.reveal is not None:
            self.reveal = portal.reveal
            return None
        splan, _ = self._head_plan(head)
        try:
            token = self.on_statement.begin(splan, rowplan)
        except AuditRefused:
            return self._row_error("58030", AUDIT_REFUSED)
        self.reveal = Reveal(token)
        if portal is not None:
            portal.reveal = self.reveal
            self.open_portals.append(portal)
        return None

    def _end_reveal(self, reveal: Reveal, outcome: str, sqlstate: str | None = None,
                    rows: int | None = None) -> None:
        """Write the `statement_end` record of `reveal` (once)."""
        if self.reveal is reveal:
            self.reveal = None
        for portal in self.open_portals:
            if portal.reveal is reveal:
                portal.reveal = None
                self.open_portals.remove(portal)
                break
        if self.on_statement is not None:
            self.on_statement.end(reveal.token, max(reveal.rows, rows or 0), outcome,
                                  sqlstate)

    def end_reveals(self, outcome: str) -> None:
        """End every reveal still open: the session ends ("disconnect"), or the
        transaction that held suspended portals did ("portal_closed")."""
        if self.reveal is not None:
            self._end_reveal(self.reveal, outcome)
        while self.open_portals:
            portal = self.open_portals[0]
            if portal.reveal is None:
                self.open_portals.pop(0)
            else:
                self._end_reveal(portal.reveal, outcome)

    def _filter_row(self, msg: bytes, f: RecheckFilter) -> bytes:
        """A DataRow of a blind-index lookup: b"" (dropped) when a hidden cell does not
        hold a searched value, else the row without its hidden cells, revealed."""
        values = rows.decode_data_row(msg[5:])
        vis = f.visible
        try:
            for j, (crypto, fmt, keys) in enumerate(f.checks):
                cell = values[vis + j] if vis + j < len(values) else None
                if cell is None:
                    key = None
                else:
                    key = crypto.opened_key(cell if fmt == 1 else rows.bytea_from_text(cell))
                if key not in keys:
                    f.dropped += 1
                    return b""
        except ValueError_ as exc:
            return self._row_error(exc.sqlstate, exc.text)
        except (ValueError, UnicodeDecodeError):
            return self._row_error("XX001", "a protected value could not be decoded")
        del values[vis:]
        return self._reveal_values(values, f.plan)

    def _row_error(self, sqlstate: str, text: str) -> bytes:
        """An ErrorResponse in place of a row; the rest of the reply is dropped."""
        if self.reveal is not None:
            self._end_reveal(self.reveal, "error", sqlstate)
        self.consume_to_ready = True
        self.row_plan = self.row_filter = None
        return m.error_response(sqlstate, text)

    def _set_data_plan(self, plan: RowPlan | object | None) -> None:
        old = self.data_plan
        if isinstance(old, RowRevealer):
            old.flush()
        new = self.data_plan = plan.revealer if isinstance(plan, RowPlan) else plan
        if new is not old:
            # New rows to reveal: their audit record comes before the first of them.
            self.unaudited = (self.on_statement is not None and new is not None
                              and new is not _COLLECT)

    def flush_counts(self) -> None:
        """Move revealed-cell counts of the current result set into the columns'
        counters (before they are drained into metrics)."""
        if isinstance(self.data_plan, RowRevealer):
            self.data_plan.flush()

    def _server(self, kind: int, msg: bytes) -> bytes | None:
        if self.consume_to_ready and kind != 0x5A:
            # Only asynchronous messages still reach the client after a proxy-made error.
            return None if kind in (0x4E, 0x41, 0x53) else b""
        queue = self.queue
        return _SERVER_HANDLERS[kind](self, kind, queue[0] if queue else None, msg)

    # One handler per backend type (`_SERVER_HANDLERS`), called as
    # `handler(tracker, kind, queue head, msg)`: one index instead of a chain of
    # comparisons, for every message of every reply. Types with no handler: forwarded.

    def _server_data_row(self, kind: int, head: Entry | None, msg: bytes) -> bytes | None:
        plan = self._current_plan(head)
        if head is not None and head.kind == INJECTED_QUERY:
            head.collected.append(rows.decode_data_row(msg[5:]))  # type: ignore[union-attr]
            return b""
        if plan and self.unaudited:
            refused = self._begin_reveal()
            if refused is not None:
                return refused
        return self._sent(self._reveal_row(msg, plan)) if plan else None  # (reference path)

    def _server_ready(self, kind: int, head: Entry | None, msg: bytes) -> bytes | None:
        proxy_error = self.consume_to_ready
        self.consume_to_ready = False
        self.row_plan = self.row_filter = None
        self.copy_out = None
        if self.reveal is not None or (self.open_portals and msg[5:6] != b"T"):
            # Out of a transaction no portal survives: a suspended one never finished.
            self.end_reveals("portal_closed")
        # Pop through the request this ReadyForQuery answers; replies to anything
        # before it (dropped after an error) are not coming.
        while self.queue:
            entry = self.queue.popleft()
            if entry.runs:
                self._end_runs(entry)
            if entry.kind == INJECTED_QUERY:
                if entry.on_done:
                    entry.on_done(entry.collected or [])
                return None if entry.forward_ready else b""
            if entry.kind in (SYNC, QUERY, FUNC):
                break
        if proxy_error and msg[5:6] == b"T" and not self.queue:
            return self._abort_transaction()
        return None

    def _server_row_description(self, kind: int, head: Entry | None,
                                msg: bytes) -> bytes | None:
        fields = rows.decode_row_description(msg[5:])
        self._view_as(head)
        # The plan's hidden recheck columns and the parse tree's protected result
        # columns for this statement of it (one `_head_plan` for both).
        splan, index = self._head_plan(head)
        specs = splan.rechecks.get(index) if splan is not None and splan.rechecks else None
        hidden = len(specs) if specs and len(fields) > len(specs) else 0
        if hidden:
            del fields[-hidden:]  # the proxy's own columns: never seen by the client
        outputs = (splan.outputs[index]
                   if splan is not None and index < len(splan.outputs) else None)
        plan, changed = self._plan_fields(fields, outputs)
        changed = changed or bool(hidden)
        if head is not None and head.kind == DESCRIBE:
            self.queue.popleft()
            target = head.target
            if target is not None:
                target.fields = fields
            if head.skip:
                return b""
        elif head is not None and head.kind in (QUERY, FUNC, EXECUTE):
            self.row_plan = plan
            if hidden and head.kind == QUERY and specs is not None:
                self.row_filter = RecheckFilter(
                    plan, len(fields), [(s.crypto, 0, s.keys) for s in specs]
                )
        elif head is not None and head.kind == INJECTED_QUERY:
            return b""
        return rows.encode_row_description(fields) if changed else None

    def _server_parameter_description(self, kind: int, head: Entry | None,
                                      msg: bytes) -> bytes | None:
        skip = head is not None and head.skip
        if head is not None and head.kind == DESCRIBE and isinstance(head.target, Statement):
            stmt = head.target
            if stmt.plan.params or stmt.plan.derived:
                oids = rows.decode_parameter_description(msg[5:])
                for i, (_action, crypto) in stmt.plan.params.items():
                    if i < len(oids) and oids[i] == BYTEA_OID:
                        declared = stmt.declared[i] if i < len(stmt.declared) else 0
                        oids[i] = declared or crypto.logical_oid
                if stmt.plan.derived:  # the client never sees the proxy's own params
                    oids = oids[: min(d[0] for d in stmt.plan.derived)]
                return b"" if skip else rows.encode_parameter_description(oids)
        return b"" if skip else None

    def _server_no_data(self, kind: int, head: Entry | None, msg: bytes) -> bytes | None:
        if head is not None and head.kind == DESCRIBE:
            self.queue.popleft()
            if head.target is not None:
                head.target.fields = []
            return b"" if head.skip else None
        return None

    def _server_complete(self, kind: int, head: Entry | None, msg: bytes) -> bytes | None:
        """ParseComplete, BindComplete, CloseComplete."""
        if head is not None and head.kind in (PARSE, BIND, CLOSE):
            self.queue.popleft()
            return b"" if head.skip else None
        return None

    def _server_command_complete(self, kind: int, head: Entry | None,
                                 msg: bytes) -> bytes | None:
        """CommandComplete, PortalSuspended, EmptyQueryResponse."""
        out: bytes | None = None
        f = self.data_plan
        if type(f) is RecheckFilter and f.dropped:
            if kind == 0x43:
                out = msg = _fewer_rows(msg, f.dropped)
            f.dropped = 0
        reveal = self.reveal
        if reveal is not None:
            self.reveal = None
            if kind == 0x43:  # CommandComplete
                self._end_reveal(reveal, "complete", rows=rows_in_tag(msg))
            else:  # PortalSuspended: the portal keeps it; its next rows go on with it
                self.unaudited = True
        elif kind == 0x43 and self.on_statement is not None and head is not None:
            self._completed(head, msg)
        if head is not None and head.kind == EXECUTE:
            self.queue.popleft()
            if head.runs:
                self._end_runs(head)
        elif head is not None and head.kind == INJECTED_QUERY:
            return b""
        elif head is not None and head.kind == QUERY:
            head.result += 1
        self.row_plan = self.row_filter = None
        self.copy_out = None
        return out

    def _server_error(self, kind: int, head: Entry | None, msg: bytes) -> bytes | None:
        if head is not None and head.kind == INJECTED_QUERY:
            return b""
        if self.reveal is not None:  # e.g. division by zero after some rows were sent
            self._end_reveal(self.reveal, "error", m.parse_fields(msg[5:]).get("C"))
        self.row_plan = self.row_filter = None
        self.copy_out = None
        out = None
        if head is not None:
            plan = head.plan if head.kind == QUERY else (
                head.target.plan if head.kind == PARSE and type(head.target) is Statement
                else None)
            if plan is not None and plan.shifts and plan.sql is not None:
                out = _error_at_source(msg, plan)
            elif head.hidden_formats:
                out = _error_without_hidden_formats(msg, head.hidden_formats)
            if head.kind not in (QUERY, FUNC):
                self._discard_to_sync()
        if out is None:
            return refusal_error(msg)
        stripped = refusal_error(out)
        return out if stripped is None else stripped

    def _server_copy_response(self, kind: int, head: Entry | None,
                              msg: bytes) -> bytes | None:
        """CopyOutResponse / CopyInResponse: the next COPY run of the request at the
        head of the queue. A COPY the proxy did not plan (its picture of the session is
        not the server's) ends the session: nothing of it may pass unexamined."""
        runs = head.runs if head is not None else None
        i = head.run_next if head is not None else 0
        direction = "out" if kind == 0x48 else "in"
        if runs is None or i >= len(runs) or runs[i].direction != direction:
            raise ProtocolViolation(f"the server started a COPY ({direction}) that the "
                                    "proxy did not plan")
        assert head is not None
        head.run_next = i + 1
        run = runs[i]
        if direction == "out":
            try:
                self.copy_out = run.factory() if run.factory is not None else None
            except ValueError_ as exc:  # the rows would pass unrevealed: never
                self.consume_to_ready = True
                return m.error_response(exc.sqlstate, exc.text)
            protected = getattr(self.copy_out, "protected", None)
            if protected and self.on_statement is not None:
                # It reveals: its record before its first CopyData, as for rows.
                splan, _ = self._head_plan(head)
                try:
                    token = self.on_statement.begin(splan, [(i, c, 0) for i, c in protected])
                except AuditRefused:
                    self.copy_out = None
                    self.consume_to_ready = True
                    return m.error_response("58030", AUDIT_REFUSED)
                self.reveal = Reveal(token)
            return None
        # Its client stream is the one on, or the next to start, or it ended already
        # (sent without waiting): anything else means the two pictures differ.
        current = self.copy_in_run
        if run.state == 0:
            expect = self.copy_expect
            while expect and expect[0].done:
                expect.popleft()
            ok = current is None and bool(expect) and expect[0] is run
        else:
            ok = run.state == 2 or current is run
        if not ok:
            raise ProtocolViolation("the server started a COPY FROM STDIN out of the "
                                    "order the proxy planned")
        run.started = True
        self._drop_ignored_syncs(run)
        return None

    def _drop_ignored_syncs(self, run: CopyRun) -> None:
        """The server started `run`: the Syncs the client sent before its stream were
        read in copy-in mode and ignored (`_sync_during_copy`), no ReadyForQuery comes
        for them. They are behind the run's own request in the queue."""
        queue = self.queue
        i = 0
        while i < len(queue):
            if queue[i].copy_run is run:
                del queue[i]
            else:
                i += 1

    def _server_copy_data(self, kind: int, head: Entry | None, msg: bytes) -> bytes | None:
        if self.copy_out is not None:
            try:
                return self.copy_out.server_data(msg[5:])
            except ValueError_ as exc:
                if self.reveal is not None:
                    self._end_reveal(self.reveal, "error", exc.sqlstate)
                self.copy_out = None
                self.consume_to_ready = True
                return m.error_response(exc.sqlstate, exc.text)
        return None

    def _server_copy_done(self, kind: int, head: Entry | None, msg: bytes) -> bytes | None:
        if self.copy_out is not None:  # CopyDone from server
            copy_out, self.copy_out = self.copy_out, None
            try:
                tail = copy_out.server_done()
            except ValueError_ as exc:
                if self.reveal is not None:
                    self._end_reveal(self.reveal, "error", exc.sqlstate)
                self.consume_to_ready = True
                return m.error_response(exc.sqlstate, exc.text)
            return tail + msg if tail else None
        return None

    def _server_other(self, kind: int, head: Entry | None, msg: bytes) -> bytes | None:
        return None

    def _server_copy_both(self, kind: int, head: Entry | None, msg: bytes) -> bytes | None:
        """CopyBothResponse (START_REPLICATION): the stream that follows is WAL or
        logical changes the tracker has no plan for, and the client's side of it would
        pass unexamined. Tracking mode never relays one (even with allow_replication,
        which only the plain relay honours): the session ends."""
        raise ProtocolViolation("the server started a replication stream "
                                "(CopyBothResponse), which is not relayed when "
                                "protected columns are configured")

    def _completed(self, head: Entry, msg: bytes) -> None:
        """A statement finished: hand a protected one to the audit hook."""
        plan: StatementPlan | None = None
        if head.kind == QUERY:
            plan = head.plan
        elif head.kind == EXECUTE and isinstance(head.target, Portal):
            stmt = head.target.statement
            plan = stmt.plan if stmt is not None else None
        if plan is not None and plan.touches_protected and self.on_statement is not None:
            self.on_statement(plan, msg, self.row_plan)

    def _discard_to_sync(self) -> None:
        q = self.queue
        while q and q[0].kind != SYNC:
            entry = q.popleft()
            if entry.runs:
                self._end_runs(entry)
        if not q:
            self.discarding = True

    def _view_as(self, head: Entry | None) -> None:
        """Reveal the head request's rows as the roles it ran as (Entry.viewer)."""
        use = getattr(self.protector, "use_viewer", None)
        if use is not None:
            use(head.viewer if head is not None else None)

    def _current_plan(self, head: Entry | None) -> RowPlan | None:
        if head is None:
            return None
        self._view_as(head)
        if head.kind == EXECUTE:
            portal = head.target
            if not isinstance(portal, Portal):
                return None
            if portal.checks is not None:
                return self._portal_filter(portal)
            return self._portal_plan(portal)
        return self.row_filter if self.row_filter is not None else self.row_plan

    def _portal_filter(self, portal: Portal) -> RecheckFilter | None:
        fields = _portal_fields(portal)
        if fields is None or portal.checks is None:
            return None
        cached = portal.cached_filter
        if cached is not None and cached[0] is fields:
            return cached[1]
        visible = len(fields)
        checks = [(crypto, _result_format(portal.result_formats, visible + j), keys)
                  for j, (crypto, keys) in enumerate(portal.checks)]
        f = RecheckFilter(self._portal_plan(portal), visible, checks)
        portal.cached_filter = (fields, f)
        return f

    @staticmethod
    def _head_plan(head: Entry | None) -> tuple[StatementPlan | None, int]:
        """The plan whose reply is at the queue head, and which of its statements."""
        if head is None:
            return None, 0
        if head.kind == QUERY:
            return head.plan, head.result
        if isinstance(head.target, Statement):
            return head.target.plan, 0
        if isinstance(head.target, Portal) and head.target.statement is not None:
            return head.target.statement.plan, 0
        return None, 0

    def _crypto_for(self, i: int, f: rows.Field,
                    outputs: list[ColumnCrypto | None] | None,
                    nfields: int) -> ColumnCrypto | None:
        """Which protected column result field ``i`` carries, if any.

        RowDescription's table OID / attnum is the primary source: PostgreSQL fills it
        for every plain column reference, through aliases, joins, subqueries and CTEs.
        Where it is 0 (a scalar subquery) the parse tree's answer is used, and only for a
        bytea field, so an expression the planner mis-traced is never "decrypted".
        """
        if f.table_oid:
            crypto = self.protector.column_at(f.table_oid, f.attnum)
            if crypto is not None:
                return crypto
        elif f.type_oid == BYTEA_OID:  # from no table: a storage column by its name?
            storage_named = getattr(self.protector, "storage_named", None)
            cell = storage_named(f.name) if storage_named is not None else None
            if cell is not None:
                return cell
        if outputs is not None and len(outputs) == nfields:
            crypto = outputs[i]
            viewed = getattr(self.protector, "viewed", None)
            if crypto is not None and viewed is not None:
                crypto = viewed(crypto)  # as the roles the rows are revealed to
            # (fields kept for a later Execute already carry the logical type)
            if crypto is not None and f.type_oid in (BYTEA_OID, crypto.logical_oid):
                return crypto
        return None

    def _portal_plan(self, portal: Portal) -> RowPlan | None:
        fields = _portal_fields(portal)
        if not fields:
            return None
        cached = portal.cached_plan
        viewer = getattr(self.protector, "viewer", None)
        if cached is not None and cached[0] is fields and cached[2] is viewer:
            return cached[1]
        plan = self._compute_portal_plan(portal, fields)
        portal.cached_plan = (fields, plan, viewer)
        return plan

    def _compute_portal_plan(self, portal: Portal, fields: list[rows.Field]) -> RowPlan | None:
        stmt = portal.statement
        outputs = stmt.plan.outputs[0] if stmt is not None and stmt.plan.outputs else None
        plan = RowPlan()
        for i, f in enumerate(fields):
            crypto = self._crypto_for(i, f, outputs, len(fields))
            if crypto is not None and crypto.view != "ciphertext":
                fmt = _result_format(portal.result_formats, i)
                plan.append((i, crypto, fmt))
        return plan or None

    def _plan_fields(self, fields: list[rows.Field],
                     outputs: list[ColumnCrypto | None] | None = None,
                     ) -> tuple[RowPlan | None, bool]:
        plan = RowPlan()
        changed = False
        for i, f in enumerate(fields):
            crypto = self._crypto_for(i, f, outputs, len(fields))
            if crypto is None or crypto.view == "ciphertext":
                continue
            if crypto.logical_oid:  # 0: an untraceable view column, refused per value
                f.type_oid = crypto.logical_oid
                f.typlen = crypto.typlen
                f.typmod = -1
                changed = True
            plan.append((i, crypto, f.format))
        return (plan or None), changed

    def _reveal_row(self, msg: bytes, plan: RowPlan) -> bytes:
        return self._reveal_values(rows.decode_data_row(msg[5:]), plan)

    def _reveal_values(self, values: list[bytes | None], plan: RowPlan | None) -> bytes:
        for i, crypto, fmt in plan or ():
            if i >= len(values):
                continue
            raw = values[i]
            if raw is None:
                continue
            limit = getattr(crypto, "max_cell", 0)
            if limit and len(raw) > (limit if fmt == 1 else 2 * limit + 2):
                # (limits.max_cell_size: refused before a copy of it is made)
                return self._row_error("54000", "a value of a protected column is larger "
                                       f"than limits.max_cell_size ({limit} bytes); it "
                                       "is not converted")
            try:
                envelope = raw if fmt == 1 else rows.bytea_from_text(raw)
                values[i] = crypto.reveal(envelope, fmt)
            except ValueError_ as exc:
                return self._row_error(exc.sqlstate, exc.text)
            except (ValueError, UnicodeDecodeError):
                return self._row_error("XX001", "a protected value could not be decoded")
        return rows.encode_data_row(values)


def rows_in_tag(msg: bytes) -> int | None:
    """Rows of a CommandComplete message (`SELECT 5`, `INSERT 0 2`, `UPDATE 3`)."""
    tag = msg[5:-1]
    head, _, last = tag.rpartition(b" ")
    return int(last) if head and last.isdigit() else None


def _copy_fail(refusal: ClientRefusal) -> bytes:
    """CopyFail with a value-free text: the server answers 57014 quoting it."""
    return m.message(b"f", f"{refusal.sqlstate}: {refusal.text}".encode() + b"\0")


# The frontend types the server refuses in copy-in mode (all but
# CopyData, CopyDone, CopyFail, Flush and Sync; Terminate ends the session anyway).
_GUARDED = tuple(t for t in range(256) if t not in (0x64, 0x63, 0x66, 0x48, 0x53, 0x58))


def _client_handlers() -> tuple[Callable[[Tracker, int, bytes], bytes | None], ...]:
    table: list[Callable[[Tracker, int, bytes], bytes | None]] = [Tracker._client_other] * 256
    for t in (0x64, 0x63, 0x66):  # d, c, f
        table[t] = Tracker._client_copy
    table[0x51] = Tracker._client_query  # Q
    table[0x50] = Tracker._client_parse  # P
    table[0x42] = Tracker._client_bind  # B
    table[0x44] = Tracker._client_describe  # D
    table[0x45] = Tracker._client_execute  # E
    table[0x43] = Tracker._client_close  # C
    table[0x53] = Tracker._client_sync  # S
    table[0x46] = Tracker._client_func  # F
    return tuple(table)


CLIENT_HANDLERS = _client_handlers()
"""`Tracker.client` by frontend type byte: called as `handler(tracker, kind, msg)`."""


def _server_handlers() -> tuple[Callable[[Tracker, int, Entry | None, bytes], bytes | None],
                                ...]:
    table: list[Callable[[Tracker, int, Entry | None, bytes], bytes | None]] = (
        [Tracker._server_other] * 256
    )
    table[0x44] = Tracker._server_data_row  # D
    table[0x5A] = Tracker._server_ready  # Z
    table[0x54] = Tracker._server_row_description  # T
    table[0x74] = Tracker._server_parameter_description  # t
    table[0x6E] = Tracker._server_no_data  # n
    for t in (0x31, 0x32, 0x33):  # 1, 2, 3
        table[t] = Tracker._server_complete
    for t in (0x43, 0x73, 0x49):  # C, s, I
        table[t] = Tracker._server_command_complete
    table[0x45] = Tracker._server_error  # E
    table[0x48] = table[0x47] = Tracker._server_copy_response  # H, G
    table[0x64] = Tracker._server_copy_data  # d
    table[0x63] = Tracker._server_copy_done  # c
    table[0x57] = Tracker._server_copy_both  # W
    return tuple(table)


_SERVER_HANDLERS = _server_handlers()
"""`Tracker._server` by backend type byte (the queue head already looked up)."""


def _error_at_source(msg: bytes, plan: StatementPlan) -> bytes | None:
    """The ErrorResponse with its position (`P`) mapped from the rewritten text the
    server saw back to the client's own; None when it has none or it did not move.
    Every other field is kept byte for byte, in its order."""
    body = msg[5:]
    if body.startswith(b"P"):
        at = 0
    else:
        at = body.find(b"\0P") + 1  # a field starts after each NUL: this is its type
        if not at:
            return None
    stop = body.find(b"\0", at)
    try:
        position = int(body[at + 1 : stop])
    except ValueError:
        return None
    assert plan.sql is not None
    mapped = original_position(plan.sql, plan.source.encode("utf-8", "surrogateescape"),
                               plan.shifts, position)
    if mapped == position:
        return None
    return m.message(b"E", body[: at + 1] + str(mapped).encode() + body[stop:])


_FORMAT_COUNT = re.compile(rb"bind message has (\d+) result formats but query has (\d+) columns")


def _error_without_hidden_formats(msg: bytes, hidden: int) -> bytes | None:
    """The server's complaint about a Bind's result-format count, told for the columns
    the client sees: the proxy added ``hidden`` codes for its hidden recheck columns,
    which the client must not learn of. PostgreSQL's own text with both counts less
    ``hidden`` is what the client would get from a server without the proxy; a text
    that is not recognised (another ``lc_messages``) but comes from the routine that
    checks the count is replaced by one without counts. Other errors (a bad format code,
    a bad parameter count) are the client's alone: kept."""
    fields = msg[5:].split(b"\0")
    if b"C08P01" not in fields:
        return None
    for i, f in enumerate(fields):
        if f.startswith(b"M"):
            found = _FORMAT_COUNT.fullmatch(f[1:])
            if found is not None:
                sent, columns = (int(g) - hidden for g in found.groups())
                text = f"bind message has {sent} result formats but query has {columns} columns"
            elif b"RPortalSetResultFormat" in fields:
                text = "bind message has a result-format count other than the query's columns"
            else:
                return None
            fields[i] = b"M" + text.encode()
            return m.message(b"E", b"\0".join(fields))
    return None


def _portal_fields(portal: Portal) -> list[rows.Field] | None:
    """The result columns of a portal: its own Describe's, else its statement's."""
    if portal.fields is None and portal.statement is not None:
        return portal.statement.fields
    return portal.fields


def _fewer_rows(msg: bytes, dropped: int) -> bytes:
    """CommandComplete ``SELECT n`` with the rows the recheck dropped taken off."""
    tag = msg[5:-1]
    verb, _, count = tag.rpartition(b" ")
    if not count.isdigit():
        return msg
    return m.message(b"C", verb + b" " + str(max(int(count) - dropped, 0)).encode() + b"\0")


def _result_format(formats: list[int], i: int) -> int:
    if not formats:
        return 0
    if len(formats) == 1:
        return formats[0]
    return formats[i] if i < len(formats) else 0


__all__ = [
    "CLIENT_HANDLERS",
    "ClientRefusal",
    "ColumnCrypto",
    "Protector",
    "ProtocolViolation",
    "RecheckSpec",
    "StatementPlan",
    "Tracker",
    "ValueError_",
    "refusal_error",
    "refusal_sql",
]
