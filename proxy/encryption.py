"""Glue between the wire (tracking), the SQL rewriter, the catalog and the ciphers.

`ColumnRuntime` is one protected column *in one database* with its cipher, blind index and
codec, built once per keyring load and database (`Encryption.columns_for`): its cipher
binds that database into every envelope (see `DatabaseBinding`). `RoleColumn` is that
column as one role sees it (plaintext, masked or ciphertext). `SessionProtector` answers
the tracker's questions for one session: which result column is protected, and what to
send instead of a statement.

Plaintext only ever exists here in local variables on its way into a cipher or out to
the client; it is never logged, counted or put into an exception message.
"""

from __future__ import annotations

import datetime
import logging
from binascii import a2b_hex
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

from proxy.catalog import MAX_AGE as CATALOG_MAX_AGE
from proxy.catalog import DatabaseCatalog, Snapshot, build_snapshot, catalog_query
from proxy.crypto.blind_index import BlindIndex
from proxy.crypto.envelope import ColumnCipher, DecryptError
from proxy.crypto.masking import MaskConfigError, make_masker
from proxy.protocol.rows import NULL_CELL, bytea_from_text, bytea_to_text, cell_length
from proxy.settings import ConfigError, join_group_problem
from proxy.sql.cache import ByteLRU, text_key
from proxy.sql.encoding import clean_encoding_name
from proxy.sql.positions import Shift
from proxy.sql.protected import FunctionResult, ProtectedColumn, ProtectedSchema, TableKey
from proxy.sql.rewrite import plan_statement
from proxy.tracking import (
    AS_SENT,
    ClientRefusal,
    RecheckSpec,
    StatementPlan,
    Tracker,
    ValueError_,
)
from proxy.types import CodecError, get_codec

log = logging.getLogger("strongroom.encryption")

TYPLEN = {
    "text": -1, "varchar": -1, "numeric": -1, "int4": 4, "int8": 8, "date": 4,
    "timestamptz": 8, "bool": 1, "uuid": 16, "jsonb": -1,
}

DECRYPT_FAILED = "XX001"  # data_corrupted: documented in README


DEFAULT_DECRYPT_CACHE_SIZE = 65_536  # `keys.decrypt_cache_size`: entries per column slot
# `keys.decrypt_cache_bytes`: bytes per column slot, counted as the cell's and the
# value's lengths plus DECRYPT_ENTRY_OVERHEAD (two bytes objects and an OrderedDict
# entry; bench/decrypt_cache_memory.py measures what an entry really takes).
DEFAULT_DECRYPT_CACHE_BYTES = 16 * 1024 * 1024
DECRYPT_ENTRY_OVERHEAD = 200
DECRYPT_CACHE_MAX_CELL = 1024  # cells longer than this (as received) are never cached
DEFAULT_MAX_CELL_SIZE = 64 * 1024 * 1024  # `limits.max_cell_size` (see settings.py)
CELL_TOO_LARGE = "54000"  # program_limit_exceeded
_MISS = object()
Reveal = Callable[[bytes], "bytes | None"]


class DecryptSlot(OrderedDict[bytes, Any]):
    """One slot of a column's decrypt cache, with the bytes it holds (`nbytes`)."""

    def __init__(self) -> None:
        super().__init__()
        self.nbytes = 0


def too_large(qualified: str, limit: int) -> ValueError_:
    """The refusal of a protected value above `limits.max_cell_size` (never the value)."""
    return ValueError_(
        CELL_TOO_LARGE, f"a value of protected column {qualified} is larger than "
        f"limits.max_cell_size ({limit} bytes); it is not converted")


@dataclass(slots=True)
class ColumnRuntime:
    """A protected column with everything needed to seal and open its values.

    It also holds the column's *decrypt cache*, shared by every session of the process:
    per slot (role view and mask, result format, see `RoleColumn.cell_revealer`) a
    bounded map from a cell exactly as the server sent it to what that cell opened to.
    Sound because one envelope under one set of keys always opens to the same value, and
    the associated data binds it to this column and this database: the map only ever
    answers for bytes that already authenticated here, and a cell that fails is never
    stored. There is one runtime, so one cache, per database: a cell copied from another
    database is never answered from what it opened to there. The cache
    lives and dies with the keys (a reload builds a new Encryption, so a retired key
    stops opening anything at once). It holds plaintext in process memory, as the keys
    already are; nothing of it is logged, counted or put into a message.
    """

    spec: ProtectedColumn
    cipher: ColumnCipher
    blind_index: BlindIndex | None
    codec: Any
    logical_oid: int
    typlen: int
    cache_size: int = DEFAULT_DECRYPT_CACHE_SIZE  # entries per slot; 0: no cache
    cache_bytes: int = DEFAULT_DECRYPT_CACHE_BYTES  # bytes per slot (estimated)
    max_cell: int = DEFAULT_MAX_CELL_SIZE  # bytes of one envelope or plaintext value
    database: str = ""  # the database (as the server names it) the cipher is bound for
    unbound_logged: bool = False  # a version 1 envelope was reported in the log
    # (never in repr or ==: it holds plaintext, and a repr may end up in a log)
    caches: dict[Any, DecryptSlot] = field(default_factory=dict, repr=False,
                                           compare=False)

    @property
    def qualified(self) -> str:
        return f"{self.spec.schema}.{self.spec.table}.{self.spec.column}"

    def cached(self, slot: Any, reveal: Reveal, limit: int = 0) -> Reveal:
        """`reveal` (cell -> value, raising on failure) behind the slot's cache.

        FIFO-bounded at `cache_size` entries and `cache_bytes` (estimated) bytes per
        slot; a hit is one dict lookup and returns the very object the miss computed.
        Cells longer than DECRYPT_CACHE_MAX_CELL are revealed every time (their
        plaintext is not kept), and a cell longer than `limit` (as received; 0: none)
        is refused with 54000 before anything is converted."""
        size = self.cache_size
        if size <= 0 or self.cache_bytes <= 0:
            if not limit:
                return reveal
            qualified = self.qualified

            def bounded(cell: bytes) -> bytes | None:
                if len(cell) > limit:
                    raise too_large(qualified, self.max_cell)
                return reveal(cell)

            return bounded
        cache = self.caches.get(slot)
        if cache is None:
            cache = self.caches[slot] = DecryptSlot()
        get, popitem = cache.get, cache.popitem
        budget = self.cache_bytes
        over = DECRYPT_ENTRY_OVERHEAD

        def cached_reveal(cell: bytes) -> bytes | None:
            value = get(cell, _MISS)
            if value is not _MISS:
                return value  # type: ignore[return-value]
            n = len(cell)
            if limit and n > limit:
                raise too_large(self.qualified, self.max_cell)
            value = reveal(cell)  # raises on failure: nothing is stored
            if n <= DECRYPT_CACHE_MAX_CELL:
                # (a memoryview key would pin the whole read buffer: store bytes)
                cache[cell if type(cell) is bytes else bytes(cell)] = value
                cache.nbytes += n + len(value or b"") + over
                while len(cache) > size or cache.nbytes > budget:
                    k, v = popitem(last=False)
                    cache.nbytes -= len(k) + len(v or b"") + over
            return value

        # Marks a revealer whose result depends on the cell's bytes alone, and names its
        # slot: the DataRow path (tracking.RowRevealer) looks a cell up there itself,
        # without a call, and calls the revealer only on a miss.
        cached_reveal.slot = cache  # type: ignore[attr-defined]
        return cached_reveal


class RoleColumn:
    """One protected column as one role sees it; implements tracking.ColumnCrypto."""

    __slots__ = ("_mask", "_tz", "logical_oid", "n_bidx", "n_decrypt", "n_encrypt", "n_failed",
                 "runtime", "typlen", "view")

    def __init__(self, runtime: ColumnRuntime, view: str, mask: Any, tz: Any) -> None:
        self.runtime = runtime
        self.view = view
        self._mask = mask
        self._tz = tz
        self.logical_oid = runtime.logical_oid
        self.typlen = runtime.typlen
        # Operation counts since the session last drained them into metrics (one add per
        # cell here, one metrics call per column and request there).
        self.n_encrypt = self.n_decrypt = self.n_bidx = self.n_failed = 0

    def _canonical(self, value: bytes, fmt: int, oid: int = 0) -> bytes:
        codec = self.runtime.codec
        try:
            if fmt == 1 and oid and oid != self.logical_oid:
                # The client declared another type in Parse (psycopg sends a small int as
                # int2): read its binary value as that type, then as the column's type.
                value = declared_binary_as_text(value, oid, codec.name, self._tz())
                fmt = 0
            return codec.from_binary(value) if fmt == 1 else codec.from_text(value, self._tz())
        except CodecError as exc:
            raise ValueError_(
                exc.sqlstate, f"{exc} (column {self.runtime.qualified})"
            ) from None

    def _check_size(self, n: int) -> None:
        """Refuse a value (plaintext on the way in, envelope on the way out) above
        `limits.max_cell_size` before any conversion copies it."""
        limit = self.runtime.max_cell
        if limit and n > limit:
            raise too_large(self.runtime.qualified, limit)

    def encrypt_param(self, value: bytes, fmt: int, oid: int = 0) -> bytes:
        self._check_size(len(value))
        self.n_encrypt += 1
        return self.runtime.cipher.encrypt(self._canonical(value, fmt, oid))

    def blind_index_param(self, value: bytes, fmt: int, oid: int = 0) -> bytes:
        self._check_size(len(value))
        bidx = self.runtime.blind_index
        if bidx is None:
            raise ValueError_("0A000", f"column {self.runtime.qualified} has no blind index")
        self.n_bidx += 1
        return bidx.compute(self._canonical(value, fmt, oid))

    def equality_key(self, value: bytes, fmt: int, oid: int = 0) -> bytes:
        """What a searched value is compared as when a blind-index match is rechecked:
        the type's equality key (the blind index's own input), so values PostgreSQL
        calls equal (numeric 1.50 and 1.5) match."""
        return self.runtime.codec.equality_key(self._canonical(value, fmt, oid))

    def opened_key(self, envelope: bytes) -> bytes:
        """The equality key of a stored value, whatever this role's view: the recheck
        compares true values, also for a role that sees the column masked."""
        return self.runtime.codec.equality_key(self._open(envelope))

    def _open(self, envelope: bytes) -> bytes:
        """Decrypt one stored value, counted; XX001 (never the value) when it fails."""
        self.n_decrypt += 1
        try:
            return self.runtime.cipher.decrypt(envelope)
        except DecryptError:
            self.n_decrypt -= 1
            self.n_failed += 1
            raise ValueError_(
                DECRYPT_FAILED,
                f"stored value of protected column {self.runtime.qualified} failed "
                "authentication (wrong key, tampered, or copied from another column)",
            ) from None

    @property
    def max_cell(self) -> int:
        """`limits.max_cell_size`: the tracker refuses a larger cell before decoding it."""
        return self.runtime.max_cell

    def reveal(self, envelope: bytes, fmt: int) -> bytes | None:
        self._check_size(len(envelope))
        if self.view == "deny":
            raise ValueError_("42501", f"permission denied by strongroom: column "
                              f"{self.runtime.qualified} is denied to a role this request "
                              "ran as")
        return self._convert(self._open(envelope), fmt)

    def _convert(self, canonical: bytes, fmt: int) -> bytes | None:
        """A decrypted canonical value as the client's format and this role's view."""
        codec = self.runtime.codec
        if self.view == "masked":
            text = codec.to_text(canonical, self._tz()).decode()
            masked = self._mask(text)
            if masked is None:
                return None
            if fmt == 1:
                return codec.to_binary(codec.from_text(masked.encode(), self._tz()))
            return masked.encode()
        return codec.to_binary(canonical) if fmt == 1 else codec.to_text(canonical, self._tz())

    def cell_revealer(self, fmt: int) -> Callable[[bytes], bytes]:
        """`reveal` for one result column, specialised once per result set: takes the
        cell as the server sent it (the bytea envelope in `fmt`), returns the cell the
        client gets, ready for the DataRow: its length word and bytes, or the NULL word
        for a value masked to NULL (so a cached cell is copied into the row as it is,
        with no length to compute). It neither counts (the caller counts revealed cells
        per row batch and adds them to `n_decrypt`) nor maps errors: on any exception
        the caller redoes the row with `reveal`, which counts and reports exactly as it
        always does. Whenever this returns, it returns what `reveal` would, as a cell.

        Repeated cells are answered from the column's decrypt cache
        (`ColumnRuntime.cached`), in a slot per (view, mask, format): masked and
        plaintext sessions never share entries. Where the output depends on the session
        TimeZone (timestamptz as text, or masked), the slot holds the decrypted canonical
        value and the conversion runs on every cell, with the TimeZone of the moment."""
        rt = self.runtime
        if self.view == "deny":
            def refuse(cell: bytes) -> bytes:
                raise ValueError_("42501", "denied column")  # the row path says which

            return refuse
        codec = rt.codec
        decrypt = rt.cipher.opener()
        if fmt == 1:
            opened: Reveal = decrypt
        else:
            def opened(cell: bytes) -> bytes:
                if cell[:2] == b"\\x":
                    return decrypt(a2b_hex(cell[2:]))  # stricter than fromhex: else below
                return decrypt(bytea_from_text(cell))
        masked = self.view == "masked"
        per_cell = getattr(codec, "tz_dependent", False) and (masked or fmt == 0)
        # The longest cell as received that holds an envelope of at most max_cell bytes
        # (text: `\x` and two hex digits a byte).
        limit = rt.max_cell if fmt == 1 or not rt.max_cell else 2 * rt.max_cell + 2
        if per_cell:
            opened = rt.cached(("canonical", fmt), opened, limit)
        length = cell_length
        # One function per case, each returning the cell itself: one Python call per
        # cell above the decryption (a cache miss, or every cell with the cache off).
        convert: Callable[[bytes], bytes]
        if masked:
            to_view = self._convert

            def convert(cell: bytes) -> bytes:
                value = to_view(opened(cell), fmt)
                return NULL_CELL if value is None else length(len(value)) + value
        elif fmt == 1 and not getattr(codec, "binary_is_canonical", False):
            to_binary = codec.to_binary

            def convert(cell: bytes) -> bytes:
                value = to_binary(opened(cell))
                return length(len(value)) + value
        elif fmt == 0 and not getattr(codec, "text_is_canonical", False):
            to_text, tz = codec.to_text, self._tz

            def convert(cell: bytes) -> bytes:
                value = to_text(opened(cell), tz())
                return length(len(value)) + value
        elif fmt == 0 and not per_cell:  # the canonical text itself; `opened`, inline

            def convert(cell: bytes) -> bytes:
                value = decrypt(a2b_hex(cell[2:]) if cell[:2] == b"\\x"
                                else bytea_from_text(cell))
                return length(len(value)) + value
        else:  # the canonical form itself

            def convert(cell: bytes) -> bytes:
                value = opened(cell)
                return length(len(value)) + value
        if per_cell:
            return convert
        return rt.cached((self.view, self._mask if masked else None, fmt), convert, limit)


class RefusedCell:
    """A result field whose values are refused, never passed on: every value raises
    `sqlstate` with `text`. Implements tracking.ColumnCrypto."""

    __slots__ = ("text",)
    logical_oid = 0  # keep the field's own type
    typlen = -1
    view = "plaintext"
    sqlstate = "0A000"
    text: str

    def encrypt_param(self, value: bytes, fmt: int, oid: int = 0) -> bytes:
        raise ValueError_(self.sqlstate, self.text)

    blind_index_param = encrypt_param

    def reveal(self, envelope: bytes, fmt: int) -> bytes | None:
        raise ValueError_(self.sqlstate, self.text)


class Untraceable(RefusedCell):
    """A column of a view whose definition the proxy cannot map to protected base
    columns (it computes on one, or could not be analysed): its values are refused,
    never passed on as ciphertext."""

    __slots__ = ()

    def __init__(self, view: str) -> None:
        self.text = (
            f"view {view} reads encrypted columns in a way the proxy cannot trace (an "
            "expression, function, set operation or unknown shape in its definition), so "
            "its result cannot be decrypted; select the encrypted columns plainly in the view"
        )


class StorageCell(RefusedCell):
    """A result field that is a storage column of the proxy (a blind-index sibling, or a
    view column that is one). The rewriter keeps these out of every result (``*`` is
    written out without them, naming one is refused); should one reach a RowDescription
    all the same (a view or function the rewriter could not see into), its values are
    refused, never passed on."""

    __slots__ = ()
    sqlstate = "42501"

    def __init__(self, owner: ProtectedColumn) -> None:
        self.text = (
            f"permission denied by strongroom: a result column is a storage column of the "
            f"proxy (the blind index of {owner.qualified}); name the columns to select"
        )


@dataclass(frozen=True, slots=True)
class ViewStorage:
    """A view column that is a storage column: the protected column it indexes."""

    owner: ProtectedColumn


class SchemaWithViews(ProtectedSchema):
    """The configured protected columns plus views over them: a view column that is a
    plain reference to a protected column is that column for the rewriter (so literals
    compared with it are sealed with the base column's key, and expressions over it are
    refused like over the base column)."""

    __slots__ = ("_view_storage",)

    def __init__(self, base: ProtectedSchema,
                 views: dict[TableKey, dict[str, ProtectedColumn]],
                 storage: dict[TableKey, dict[str, ProtectedColumn]] | None = None) -> None:
        import json

        super().__init__([pc for cols in base.values() for pc in cols.values()])
        self._view_storage = dict(storage or {})
        for key, cols in views.items():
            self._tables[key] = dict(cols)
        names = set(self._names) | {t for _, t in views}
        self._names = frozenset(names)
        self._lower_names = tuple(sorted({n.lower() for n in names}))
        self._needles = tuple(sorted(
            {f'"relname":{json.dumps(n, ensure_ascii=a)}' for n in names for a in (True, False)}
        ))

    def storage(self, key: TableKey) -> Mapping[str, ProtectedColumn]:
        """A view's storage columns (plain references to a sibling), else the table's."""
        return self._view_storage.get(key) or super().storage(key)


# (oid, attnum) -> protected column | storage column | name of an untraceable view
ViewMap = dict[tuple[int, int], "ProtectedColumn | ViewStorage | str"]


def analyse_views(base: ProtectedSchema, snap: Snapshot) -> tuple[ProtectedSchema, ViewMap]:
    """Map the columns of views over protected tables to their protected base columns.

    Each definition (pg_get_viewdef, printed in the snapshot's search_path) is planned
    with the rewriter, views on views in dependency order. A view is *traceable* when
    the plan is not a refusal, its output columns are known and match the view's, and
    the protected relations it resolved are exactly those pg_depend says it reads (so a
    name resolved differently than by PostgreSQL is caught). Every column of a view that
    is not traceable maps to the view's name: reading it is refused.
    """
    view_cols: dict[TableKey, dict[str, ProtectedColumn]] = {}
    view_storage: dict[TableKey, dict[str, ProtectedColumn]] = {}
    attrs: ViewMap = {}
    schema: ProtectedSchema = base

    def order(s: str, t: str) -> tuple[str, ...] | None:
        info = snap.table(s, t)
        return info.columns if info is not None else None

    for v in snap.views():
        sql = (v.definition or "").strip().rstrip(";")
        rplan = plan_statement(sql, schema, snap.search_path, column_order=order,
                               storage_ok=True)
        cols = rplan.columns_selected[0] if len(rplan.columns_selected) == 1 else None
        deps = {(snap.by_oid[o].schema, snap.by_oid[o].name) for o in v.depends
                if o in snap.by_oid}
        ok = (
            not rplan.refusal and cols is not None and len(cols) == len(v.columns)
            and set(rplan.tables_referenced) == {k for k in deps if k in schema}
        )
        key = (v.schema, v.name)
        if not ok:
            for name in v.columns:
                attrs[(v.oid, v.attnums[name])] = f"{v.schema}.{v.name}"
            continue
        assert cols is not None
        mapped = {name: pc for name, pc in zip(v.columns, cols, strict=True) if pc is not None}
        for name, pc in mapped.items():
            attrs[(v.oid, v.attnums[name])] = pc
        positions = rplan.storage_selected[0] if rplan.storage_selected else {}
        storage = {v.columns[i]: owner for i, owner in positions.items()}
        for name, owner in storage.items():
            attrs[(v.oid, v.attnums[name])] = ViewStorage(owner)
        if mapped or storage:
            view_cols[key] = mapped
            if storage:
                view_storage[key] = storage
            schema = SchemaWithViews(base, view_cols, view_storage)
    return schema, attrs


def function_results(schema: ProtectedSchema, snap: Snapshot) -> dict[TableKey, FunctionResult]:
    """The user functions whose result holds a storage column of the proxy: those
    returning the row type of a protected table or of a view with one (its columns, the
    sibling among them), and those with an OUT / TABLE column named like a sibling.
    All overloads of a name count together, failing closed: their storage columns add
    up, and the column order is known only when they all agree."""
    siblings = {pc.bidx_column: pc for cols in schema.values() for pc in cols.values()
                if pc.blind_index and pc.bidx_column is not None}
    out: dict[TableKey, FunctionResult] = {}
    for key, overloads in snap.functions.items():
        orders: set[tuple[str, ...]] = set()
        storage: dict[str, ProtectedColumn] = {}
        for fn in overloads:
            rel = snap.by_oid.get(fn.rowtype) if fn.rowtype else None
            if rel is not None:
                orders.add(rel.columns)
                storage.update(schema.storage((rel.schema, rel.name)))
            else:
                orders.add(fn.outputs)
                storage.update({n: siblings[n] for n in fn.outputs if n in siblings})
        if storage:
            out[key] = FunctionResult(next(iter(orders)) if len(orders) == 1 else None,
                                      storage)
    return out


# Binary parameters of a declared type other than the column's logical type: the ones
# PostgreSQL itself would accept for the column (implicit or assignment casts), plus
# text-like types, which are read with the column type's input function.
_TEXTLIKE = {25, 1043, 1042, 19, 705, 114}  # text, varchar, bpchar, name, unknown, json
_INT2, _TIMESTAMP = 21, 1114
_CONVERTIBLE: dict[int, frozenset[str]] = {
    _INT2: frozenset({"int4", "int8", "numeric"}),
    23: frozenset({"int8", "numeric"}),
    20: frozenset({"int4", "numeric"}),
    1700: frozenset({"int4", "int8"}),
    1082: frozenset({"timestamptz"}),
    _TIMESTAMP: frozenset({"timestamptz"}),
    3802: frozenset({"text", "varchar"}),
}
_PG_EPOCH = datetime.datetime(2000, 1, 1)


def declared_binary_as_text(value: bytes, oid: int, logical: str,
                            tz: datetime.tzinfo) -> bytes:
    """Text form of a binary parameter the client typed as ``oid`` (not the column's
    logical type), for the logical type's text input; CodecError 42804 if PostgreSQL
    would not accept that type for the column either."""
    import struct

    from proxy.types.base import INVALID_BINARY_REPRESENTATION

    if oid in _TEXTLIKE:
        return value
    if logical not in _CONVERTIBLE.get(oid, ()):
        raise CodecError(
            f"a protected column of type {logical} cannot take a binary parameter of "
            f"type oid {oid}", "42804")
    try:
        if oid == _INT2:
            return str(struct.unpack("!h", value)[0]).encode()
        if oid == _TIMESTAMP:
            (us,) = struct.unpack("!q", value)
            if us in (0x7FFFFFFFFFFFFFFF, -0x8000000000000000):
                return b"infinity" if us > 0 else b"-infinity"
            return (_PG_EPOCH + datetime.timedelta(microseconds=us)).isoformat(" ").encode()
    except (struct.error, OverflowError):
        raise CodecError("incorrect binary data format", INVALID_BINARY_REPRESENTATION) from None
    codec = get_codec(oid)
    return codec.to_text(codec.from_binary(value), tz)


def _is_ddl(gate: Any, sql: str) -> bool:
    """Whether a statement may change tables (then the catalog is reloaded after it)."""
    try:
        analysis = gate.analyses.analyze(sql)
    except Exception:
        return False
    return any(s.kind == "ddl" for s in analysis.statements)


def snapshot_key(snap: Snapshot | None) -> int:
    """A catalog snapshot's part of a plan-cache key (0: none loaded yet)."""
    return snap.serial if snap is not None else 0


def holds_literals(rplan: Any) -> bool:
    """Whether a rewrite plan holds the text of a protected column's literal (to seal,
    index or recheck): such a plan is made again for every statement, never cached, so
    the literal's plaintext leaves memory with the statement (this module's rule)."""
    return any(sp.literal is not None for sp in getattr(rplan, "splices", ())) or any(
        r.literals for r in getattr(rplan, "recheck", ()))


def keep_plan(cache: ByteLRU, key: Any, rplan: Any, text_len: int,
              keep_big: bool = False) -> None:
    """Cache a rewrite plan, counted as the length of its text (a plan holds
    replacements and positions that grow with it), unless it holds literals. A large
    statement's plan made in the worker process (`keep_big`) is kept in the cache's
    one-entry `big` slot even then: `plan_query` takes it out when its statement comes
    back, so it is not planned again on the event loop."""
    if not holds_literals(rplan):
        cache.put(key, rplan, text_len, keep_big)
    elif keep_big:
        cache.big = (key, rplan)


def literal_bytea(envelope: bytes) -> bytes:
    return b"'" + bytea_to_text(envelope) + b"'::bytea"


def _sealing(plan: StatementPlan) -> tuple[Any, ...]:
    """What a plan does to protected values, without its fresh ciphertexts. Columns are
    named by their spec, not by object, so plans made before and after a reload (a new
    Encryption) compare equal when they seal the same columns the same way."""
    return (plan.touches_protected, plan.tables,
            sorted((i, a, repr(c.runtime.spec)) for i, (a, c) in plan.params.items()),
            sorted((n, src, a, repr(c.runtime.spec)) for n, src, a, c in plan.derived),
            tuple(d for d, _ in plan.copies), bool(plan.rechecks))


_READ_KINDS = frozenset({"select", "copy_out"})  # grants that let a role read a relation

# Column views from most to least revealing: combining views keeps the strictest.
_STRICTNESS = {"plaintext": 0, "masked": 1, "ciphertext": 2, "deny": 3}


_STALE = object()
"""`SessionProtector.follow_reload` when no rules apply any more: matches no statement."""


class SessionProtector:
    """Per-session answers for the tracker: column views and statement plans."""

    def __init__(self, enc: Encryption, catalog: DatabaseCatalog, session: Any,
                 database: str) -> None:
        self.enc = enc
        self.catalog = catalog
        self.session = session
        # The database the server says this session is connected to (current_database()
        # in the session's prelude; a session cannot change it): its ciphers bind it.
        self.database = database
        # Column views follow the role in effect when rows are revealed (SET ROLE), and
        # the strictest of several when a request ran under more than one (a cursor
        # declared by another role, SET ROLE inside a string): one set of columns per
        # such tuple of roles, `viewer` the one the tracker reveals with now.
        self._viewers: dict[tuple[str, ...], dict[tuple[str, str, str], RoleColumn]] = {}
        self.viewer: tuple[str, ...] = (self._current_role(),)
        self.base_viewer = self.viewer
        self._role = self._columns_for(self.viewer)
        self._by_attr: dict[tuple[int, int], RoleColumn | Untraceable] = {}
        self._attr_snapshot: object = None
        self._attr_viewer: tuple[str, ...] = self.viewer
        self._deny_cols: dict[int, RoleColumn] = {}
        self._tz_name: str | None = None
        self._tz: datetime.tzinfo = datetime.UTC
        self.wants_refresh = False
        self.ddl_sent = 0
        # DDL was planned since the last reload was asked for / the reload asked for
        # after it is on its way: the session holds the client's next request until the
        # answer is in (`Session._client_tracking`), so a `*` the rewriter writes out
        # from the catalog lists the table's columns as they are after that DDL.
        self.ddl_pending = False
        self.hold_after = False
        # The columns of the rules this session followed before the last reload: rows of
        # a statement already running are still revealed with them, and counted.
        self._previous: list[dict[tuple[str, str, str], RoleColumn]] = []
        self.stale: str | None = None  # why no statement can be planned any more

    def follow_reload(self) -> object:
        """The rules in force (an Encryption), switched to the gate's current ones when a
        reload built new ones. Called at statement boundaries only (a Query, a Parse, a
        Bind): row plans made before keep their columns, so a result stream never changes
        rules midway, and from the next statement on every view, right and key is the
        reloaded one. Plans are cached per Encryption, so none made under the old rules is
        used again."""
        enc = self.session.gate.encryption
        if enc is self.enc:
            return enc
        if enc is None:
            # Protection removed by a reload (only ever with no envelope stored): this
            # session's statements were planned to seal; it must start again.
            self.stale = ("the configuration was reloaded and no longer protects columns "
                          "this session was started with; reconnect")
            return _STALE
        self._previous = [*self._viewers.values()][-8:]
        self.enc = enc
        self.catalog = enc.catalog_for(self.session.database)
        self._viewers = {}
        self._role = self._columns_for(self.base_viewer)
        self._by_attr = {}
        self._attr_snapshot = None
        self._deny_cols = {}
        return enc

    def _current_role(self) -> str:
        st = self.session.policy_state
        return st.role if st is not None else self.session.user

    def request_viewer(self) -> tuple[str, ...]:
        """The roles the request just planned runs under (see SessionPolicy.request_roles)."""
        st = self.session.policy_state
        if st is None:
            return self.viewer
        roles = st.request_roles or (st.role,)
        return roles if roles == self.viewer else tuple(roles)

    def _columns_for(self, roles: tuple[str, ...]) -> dict[tuple[str, str, str], RoleColumn]:
        cols = self._viewers.get(roles)
        if cols is None:
            views = self.enc.views_for_roles(roles)
            cols = {key: RoleColumn(rt, *views.get(key, ("plaintext", None)), tz=self.timezone)
                    for key, rt in self.enc.columns_for(self.database).items()}
            if len(self._viewers) >= 64:
                self._viewers.pop(next(iter(self._viewers)))
            self._viewers[roles] = cols
        return cols

    def _readable(self, schema: str, table: str) -> bool:
        """Whether every role the rows are revealed to may read the relation. A second
        line behind the policy: if some statement ever got rows of a table the role has
        no read right on to the client, its protected cells are not opened for it."""
        policy = self.enc.gate.policy
        if policy is None:
            return True
        for role in self.viewer:
            rp = policy.role(role)
            if rp is None or not rp.kinds_for(schema, table) & _READ_KINDS:
                return False
        return True

    def _denied(self, rc: RoleColumn) -> RoleColumn:
        """`rc`'s column with the `deny` view: a cell of it is an error, never a value."""
        denied = self._deny_cols.get(id(rc.runtime))
        if denied is None or denied.runtime is not rc.runtime:
            denied = RoleColumn(rc.runtime, "deny", None, tz=self.timezone)
            self._deny_cols[id(rc.runtime)] = denied
        return denied

    def viewed(self, crypto: Any) -> Any:
        """The same protected column as the current viewer sees it."""
        if not isinstance(crypto, RoleColumn):
            return crypto
        cols = self._columns_for(self.viewer)
        spec = crypto.runtime.spec
        return cols.get((spec.schema, spec.table, spec.column), crypto)

    def timezone(self) -> datetime.tzinfo:
        name = self.session.server_params.get("TimeZone", "UTC")
        if name != self._tz_name:
            self._tz_name = name
            try:
                from zoneinfo import ZoneInfo

                self._tz = ZoneInfo(name)
            except Exception:
                self._tz = datetime.UTC
        return self._tz

    def drain_crypto_counts(self) -> list[tuple[str, str, int, int]]:
        """(column, op, ok, failed) counted since the last call; resets the counters."""
        tracker = getattr(self.session, "tracker", None)
        if tracker is not None:  # cells revealed in a result set still being read
            tracker.flush_counts()
        out: list[tuple[str, str, int, int]] = []
        runtimes = {id(rc.runtime): rc.runtime
                    for cols in (*self._viewers.values(), *self._previous)
                    for rc in cols.values()}
        for rt in runtimes.values():
            unbound = getattr(rt.cipher, "unbound_opened", 0)
            if unbound:  # process-wide per column and database: whoever drains reports it
                rt.cipher.unbound_opened = 0
                out.append((rt.qualified, "decrypt_unbound", unbound, 0))
                if not rt.unbound_logged:
                    rt.unbound_logged = True
                    log.warning(
                        "column %s in database %s: read envelopes written before database "
                        "binding (version 1); run `strongroom keys rotate --column %s` "
                        "against that database, then set keys.database_binding.require",
                        rt.qualified, rt.database, rt.qualified)
        for rc in (rc for cols in (*self._viewers.values(), *self._previous)
                   for rc in cols.values()):
            if rc.n_encrypt or rc.n_decrypt or rc.n_bidx or rc.n_failed:
                col = rc.runtime.qualified
                if rc.n_decrypt or rc.n_failed:
                    out.append((col, "decrypt", rc.n_decrypt, rc.n_failed))
                if rc.n_encrypt:
                    out.append((col, "encrypt", rc.n_encrypt, 0))
                if rc.n_bidx:
                    out.append((col, "blind_index", rc.n_bidx, 0))
                rc.n_encrypt = rc.n_decrypt = rc.n_bidx = rc.n_failed = 0
        return out

    def storage_named(self, name: bytes) -> StorageCell | None:
        """Backstop for a bytea result field that comes from no table (a function's
        output, an expression) and is named like a blind-index sibling: its values are
        refused. The rewriter already writes ``*`` over the functions it knows out
        without their storage columns and refuses naming one; this catches one it could
        not know (made after the catalog snapshot, by another process)."""
        text = name.decode("utf-8", "replace")
        for cols in self.enc.schema.values():
            for pc in cols.values():
                if pc.blind_index and pc.bidx_column == text:
                    return StorageCell(pc)
        return None

    def column_at(self, table_oid: int, attnum: int) -> RoleColumn | Untraceable | None:
        snap = self.catalog.snapshot
        if snap is not self._attr_snapshot or self.viewer is not self._attr_viewer:
            self._by_attr = {}
            self._attr_viewer = self.viewer
            cols = self._columns_for(self.viewer)
            if snap is not None:
                for (schema, table, column), rc in cols.items():
                    info = snap.table(schema, table)
                    if info is not None and column in info.attnums:
                        self._by_attr[(info.oid, info.attnums[column])] = (
                            rc if self._readable(schema, table) else self._denied(rc))
                for pcs in self.enc.schema.values():
                    for pc in pcs.values():
                        info = snap.table(pc.schema, pc.table)
                        if (pc.blind_index and info is not None
                                and pc.bidx_column in info.attnums):
                            self._by_attr[(info.oid, info.attnums[pc.bidx_column])] = (
                                StorageCell(pc))
                _schema, views = self.enc.views_of(snap)
                for attr, target in views.items():
                    if isinstance(target, str):
                        self._by_attr[attr] = Untraceable(target)
                        continue
                    if isinstance(target, ViewStorage):
                        self._by_attr[attr] = StorageCell(target.owner)
                        continue
                    rc = cols[(target.schema, target.table, target.column)]
                    view = snap.by_oid.get(attr[0])
                    self._by_attr[attr] = (
                        rc if view is not None and self._readable(view.schema, view.name)
                        else self._denied(rc))
            self._attr_snapshot = snap
        return self._by_attr.get((table_oid, attnum))

    def generation(self) -> tuple[object, tuple[str, ...], int]:
        """What a statement's result columns depend on besides its text: the catalog
        snapshot object (replaced after DDL; compared by identity), the search_path that
        resolves its names, and the DDL this session sent (its catalog reload may still
        be on the way when the next statement arrives)."""
        return (self.catalog.snapshot, self.search_path(), self.ddl_sent)

    def search_path(self) -> tuple[str, ...]:
        st = self.session.policy_state
        path = tuple(st.path) if st is not None else ("$user", "public")
        user = self.session.user
        return tuple(user if p == "$user" else p for p in path)

    def _column_order(self, schema: str, table: str) -> tuple[str, ...] | None:
        snap = self.catalog.snapshot
        info = snap.table(schema, table) if snap is not None else None
        return info.columns if info is not None else None

    def viewer_now(self) -> tuple[str, ...] | None:
        """The roles the request decided last runs as, None when just the usual one."""
        st = self.session.policy_state
        if st is None:
            return None
        roles = st.request_roles or (st.role,)
        return None if roles == self.base_viewer else roles

    def use_viewer(self, roles: tuple[str, ...] | None) -> None:
        """Reveal as ``roles`` (None: the session's usual role) from now on."""
        want = roles or self.base_viewer
        if want != self.viewer:
            self._columns_for(want)
            self.viewer = next(k for k in self._viewers if k == want)  # one object each

    def plan_parsed(self, sql: str) -> tuple[StatementPlan, Any, str | None]:
        """A Parse: decided and planned now, its session effects staged for Execute."""
        plan = self.plan_query(sql, apply=False)
        st = self.session.policy_state
        if st is None or plan.refusal is not None:
            return plan, None, None
        return plan, self.session.gate.staged_effects(sql), st.role

    def apply_effects(self, effects: Any) -> None:
        self.session.gate.apply_staged(self.session, effects)

    def recheck_role(self, stmt: Any) -> ClientRefusal | None:
        """A statement parsed under one role and search_path, bound under others (SET
        ROLE or SET search_path since), or under rules a reload has replaced since. The
        server re-analyses it under the path of this execution, so it must pass the
        policy again, and it must seal exactly what it was rewritten to seal at Parse, or
        it is refused (prepare it again). After a reload it is sealed, and its rows are
        revealed, with the new rules' columns (views, keys) from now on."""
        if stmt.sql is None:
            return None
        reloaded = stmt.rules is not self.enc
        plan = self.plan_query(stmt.sql, apply=False)
        if plan.refusal is not None:
            return plan.refusal
        old = stmt.plan
        if _sealing(plan) != _sealing(old) or (reloaded and (
                old.literals or plan.sql != old.sql)):
            why = ("the configuration was reloaded" if reloaded
                   else "search_path or role changed")
            return ClientRefusal(
                "0A000", "prepared statement would now resolve to other protected columns "
                f"({why} since it was prepared); prepare it again")
        if reloaded:
            # The server holds the text rewritten at Parse (the same text: no literal was
            # sealed in it): only the columns it seals and reveals change.
            stmt.plan = replace(old, params=plan.params, derived=plan.derived,
                                outputs=plan.outputs, rechecks=plan.rechecks,
                                copies=plan.copies)
            stmt.rules = self.enc
        st = self.session.policy_state
        if st is not None:
            stmt.role, stmt.path = st.role, st.path
        return None

    def heavy_plan(self, sql: str) -> tuple[Future[Any], Callable[[Any], None]] | None:
        """The rewrite plan `plan_query` would make now, started in the worker process
        (`proxy.sql.offload`), and the function that puts it in the plan cache. None
        when it is cached already."""
        from proxy.sql import offload

        path = self.search_path()
        snap = self.catalog.snapshot
        key = (text_key(sql), path, snapshot_key(snap))
        cache = self.enc.plan_cache
        if cache.lookup(key) is not None:
            return None
        schema = self.enc.views_of(snap)[0]
        orders = {k: t.columns for k, t in snap.tables.items()} if snap is not None else {}

        def install(rplan: Any) -> None:
            if self.catalog.snapshot is snap:  # else the key names another snapshot
                keep_plan(cache, key, rplan, len(sql), keep_big=True)

        return offload.plan(sql, schema, path, orders), install

    def plan_query(self, sql: str, apply: bool = True) -> StatementPlan:
        raw = sql.encode(errors="surrogateescape")
        if self.stale is not None:
            return StatementPlan(sql=raw, touches_protected=True,
                                 refusal=ClientRefusal("0A000", self.stale))
        refusal = self.session.gate.decide(self.session, sql, apply=apply)
        if refusal is not None:
            return StatementPlan(sql=raw, touches_protected=True, refusal=refusal)
        path = self.search_path()
        key = (text_key(sql), path, snapshot_key(self.catalog.snapshot))
        cache = self.enc.plan_cache
        rplan = cache.get(key)
        if rplan is None and cache.big is not None and cache.big[0] == key:
            rplan = cache.big[1]  # planned in the worker process (`heavy_plan`)
            if holds_literals(rplan):
                cache.big = None  # kept only until its statement came back for it
        if rplan is None:
            schema = self.enc.views_of(self.catalog.snapshot)[0]
            rplan = plan_statement(sql, schema, path, column_order=self._column_order)
            keep_plan(cache, key, rplan, len(sql))
        if _is_ddl(self.session.gate, sql):
            # Tables may have appeared, vanished or changed: learn their oids/attnums.
            self.wants_refresh = True
            self.ddl_pending = True
            self.ddl_sent += 1
            self.session.gate.functions_changed(self.session.database)  # also without policy
        if not rplan.touches_protected:
            if rplan.copies:  # COPYs of unprotected data: passed as is, but in order
                return StatementPlan(sql=None, copies=tuple((d, None) for d, _ in rplan.copies))
            return AS_SENT
        tables = tuple(sorted(f"{s}.{t}" for s, t in getattr(rplan, "tables_referenced", ())))
        if rplan.refusal:
            auditor = self.session.tracker.on_statement if self.session.tracker else None
            if auditor is not None:
                auditor.refused(sql, tables, rplan.refusal)
            return StatementPlan(sql=raw, touches_protected=True,
                                 refusal=self._plan_refusal(rplan))
        snap = self.catalog.snapshot
        for schema, table in getattr(rplan, "tables_referenced", ()):
            if snap is None or snap.table(schema, table) is None:
                self.wants_refresh = True
        if self.catalog.due(self.enc.catalog_max_age):  # DDL done elsewhere shows up
            self.wants_refresh = True
        try:
            text, shifts = self._apply_splices(raw, rplan)
        except ValueError_ as exc:
            return StatementPlan(sql=raw, touches_protected=True,
                                 refusal=ClientRefusal(exc.sqlstate, exc.text))
        params = {n - 1: (a.action, self._role_of(a.column)) for n, a in rplan.params.items()}
        derived = [
            (d.number - 1, d.source - 1, d.action, self._role_of(d.column))
            for d in getattr(rplan, "derived_params", ())
        ]
        try:
            copies = tuple((d, None) if cp is None else self._copy(cp)
                           for d, cp in rplan.copies)
        except ValueError_ as exc:
            return StatementPlan(sql=raw, touches_protected=True,
                                 refusal=ClientRefusal(exc.sqlstate, exc.text))
        outputs = [
            None if cols is None else [self._role_of(pc) if pc else None for pc in cols]
            for cols in rplan.columns_selected
        ]
        literals = tuple({id(rc): rc for rc in (self._role_of(sp.column) for sp in rplan.splices
                                                if sp.action != "rename")}.values())
        try:
            rechecks = self._rechecks(rplan)
        except ValueError_ as exc:
            return StatementPlan(sql=raw, touches_protected=True,
                                 refusal=ClientRefusal(exc.sqlstate, exc.text))
        return StatementPlan(sql=text, params=params, touches_protected=True, copies=copies,
                             derived=derived, outputs=outputs, source=sql, tables=tables,
                             literals=literals, rechecks=rechecks, shifts=shifts)

    def _plan_refusal(self, rplan: Any) -> ClientRefusal:
        """The rewriter's refusal as the client gets it: a storage column named (42501)
        is a permission denial, worded like the policy's, naming the role in effect."""
        state = getattr(rplan, "refusal_sqlstate", "0A000")
        if state != "42501":
            return ClientRefusal(state, rplan.refusal)
        st = self.session.policy_state
        role = st.role if st is not None else self.session.user
        return ClientRefusal(
            state, f'permission denied by strongroom: role "{role}": {rplan.refusal}')

    def _rechecks(self, rplan: Any) -> dict[int, list[RecheckSpec]]:
        """Per statement, its hidden recheck columns: the column and the equality keys of
        the searched literals (parameters are added per Bind)."""
        out: dict[int, list[RecheckSpec]] = {}
        for r in rplan.recheck:
            rc = self._role_of(r.column)
            keys = frozenset(rc.equality_key(lit.encode(), 0) for lit in r.literals)
            out.setdefault(r.statement, []).append(RecheckSpec(rc, keys, r.params))
        return out

    def after_statement(self) -> bytes:
        """Called after each Query/Sync is queued: reload the catalog if it may be stale."""
        if not self.wants_refresh:
            return b""
        self.wants_refresh = False
        self.hold_after, self.ddl_pending = self.ddl_pending, False
        return self.enc.refresh(self.session)

    def _copy(self, cp: Any) -> Any:
        """("in" | "out", factory of a COPY stream transformer) for `COPY t ... FROM
        STDIN / TO STDOUT`. One transformer is made now and dropped: options it cannot
        handle (ValueError_) refuse the statement here, before anything is sent, and
        not at the first row (each execution of the COPY makes its own)."""
        direction, factory = self._copy_factory(cp)
        factory()
        return direction, factory

    def _copy_factory(self, cp: Any) -> Any:
        from proxy import copy_stream

        if cp.table is None:  # COPY (query) TO STDOUT: the parse tree maps its columns
            if cp.query_columns is None:
                raise ValueError_("0A000", "COPY (query) TO STDOUT over encrypted columns: "
                                  "the query's columns cannot be traced (select them by "
                                  "name instead of *)")
            qcols = [self._role_of(pc) if pc is not None else None for pc in cp.query_columns]
            return ("out", lambda: copy_stream.CopyOut(cp.format, cp.options, qcols))
        schema, table = cp.table
        names = cp.columns or self._column_order(schema, table)
        if names is None:
            raise ValueError_("0A000", f"COPY of protected table {schema}.{table}: "
                              "its columns are not known yet; name them")
        viewer = self.viewer_now() or self.base_viewer
        cols = [self._columns_for(viewer).get((schema, table, n)) for n in names]
        if cp.direction == "out":
            return ("out", lambda: copy_stream.CopyOut(cp.format, cp.options, cols))
        # index_columns: (blind-index column appended by the rewriter, its source column)
        index = [(names.index(pc.column), self._role_of(pc))
                 for _bidx, pc in getattr(cp, "index_columns", ())]
        index_names = [bidx for bidx, _pc in getattr(cp, "index_columns", ())]
        return ("in", lambda: copy_stream.CopyIn(cp.format, cp.options, cols, index,
                                                 names=list(names), index_names=index_names))

    def _role_of(self, col: ProtectedColumn) -> RoleColumn:
        return self._role[(col.schema, col.table, col.column)]

    def _apply_splices(self, raw: bytes, rplan: Any) -> tuple[bytes, tuple[Shift, ...]]:
        """The text to send, and where it differs from `raw` (for error positions)."""
        out = []
        shifts: list[Shift] = []
        pos = 0
        for sp in sorted(rplan.splices, key=lambda s: (s.start, s.end)):
            out.append(raw[pos : sp.start])
            piece = sp.prefix.encode()
            if sp.action == "rename":
                piece += (sp.replacement or "").encode()
            else:
                rc = self._role_of(sp.column)
                value = (sp.literal or "").encode()
                if sp.action == "blind_index":
                    piece += literal_bytea(rc.blind_index_param(value, 0))
                else:
                    piece += literal_bytea(rc.encrypt_param(value, 0))
            out.append(piece)
            shifts.append((sp.start, sp.end, len(piece)))
            pos = sp.end
        out.append(raw[pos:])
        return b"".join(out), tuple(shifts)


# ---------------------------------------------------------------------------- service


class EncryptionConfigError(ConfigError):
    """The `protect:` / `keys:` configuration cannot be put into service (wrong KEK,
    missing keyring, unknown column keys). A ConfigError, so callers that report bad
    configuration (serve, reload, check-config) report this the same way.
    `keyring_auth_failed`: the keyring failed authentication (counted and alerted on)."""

    keyring_auth_failed = False


class Encryption:
    """Column keys and specs of a configuration; one per process, rebuilt on reload."""

    def __init__(self, protect: dict[str, Any], keys_cfg: dict[str, Any], base: str,
                 gate: Any) -> None:
        from keys import keyring as kr
        from keys.providers.base import ProviderError

        try:
            self._load(protect, keys_cfg, base, gate, kr)
        except kr.KeyringAuthError as exc:
            # A keyring changed outside `strongroom keys`: never used (see keys.keyring).
            err = EncryptionConfigError([f"keys: keyring refused: {exc}"])
            err.keyring_auth_failed = True
            raise err from None
        except (kr.KeyringError, ProviderError, OSError, ValueError) as exc:
            # No traceback and no key bytes: the keyring's messages name KEK fingerprints
            # and column names only.
            raise EncryptionConfigError(
                [f"keys: cannot load the column keys: {exc} (check keys.path / the KEK "
                 "provider against the keyring, and `strongroom keys show`)"]
            ) from None

    def _load(self, protect: dict[str, Any], keys_cfg: dict[str, Any], base: str,
              gate: Any, kr: Any) -> None:
        self.gate = gate
        self.catalog_max_age = CATALOG_MAX_AGE  # `catalog_max_age`, set by the gate
        self.specs: dict[tuple[str, str, str], ProtectedColumn] = {}
        self.options: dict[tuple[str, str, str], dict[str, Any]] = {}
        for name, spec in protect.items():
            schema, table, column = name.split(".")
            why = join_group_problem(spec)
            if why:  # settings refuse it with a line; this covers configs built in code
                raise EncryptionConfigError([f"protect.{name}.join_group: {why}"])
            search = spec.get("search")
            self.specs[(schema, table, column)] = ProtectedColumn(
                schema, table, column, spec.get("type", "text"),
                spec.get("mode", "randomized"), search == "blind_index",
                spec.get("bidx_column") if search == "blind_index" else None,
                int(spec.get("index_length", 16)),
            )
            self.options[(schema, table, column)] = dict(spec)
        self.schema = ProtectedSchema(self.specs.values())
        self.provider = make_provider(keys_cfg, base)
        # Authenticated under the KEK (MAC) and refused if others may write it.
        ring = kr.load(resolve(base, keys_cfg["keyring"]), self.provider)
        self.ring = ring
        # Decrypt cache entries and bytes per column and slot (see ColumnRuntime); 0
        # turns it off.
        self.cache_size = int(keys_cfg.get("decrypt_cache_size", DEFAULT_DECRYPT_CACHE_SIZE))
        self.cache_bytes = int(keys_cfg.get("decrypt_cache_bytes", DEFAULT_DECRYPT_CACHE_BYTES))
        self.max_cell = DEFAULT_MAX_CELL_SIZE  # limits.max_cell_size (set_max_cell_size)
        self.binding = DatabaseBinding.from_config(keys_cfg.get("database_binding"))
        # Unwrapped once per load; ciphers are made from them per database (columns_for).
        # The blind index is the same in every database (see DatabaseBinding): one each.
        self._sources: dict[tuple[str, str, str], tuple[str, Any, Any, BlindIndex | None]] = {}
        for key, pc in self.specs.items():
            opts = self.options[key]
            codec = get_codec(pc.logical_type)
            ident = key_name(key, opts)
            enc_keys = ring.column_keys(ident, "encrypt", self.provider)
            bidx = None
            if pc.blind_index:
                bidx = BlindIndex(ident, codec.name,
                                  ring.column_keys(ident, "blind_index", self.provider),
                                  int(opts.get("index_length", 16)))
            self._sources[key] = (ident, codec, enc_keys, bidx)
        self._by_database: dict[tuple[str, bool], dict[tuple[str, str, str], ColumnRuntime]] = {}
        try:  # built once: masks depend on the configuration only, not on the session
            self.masks: dict[tuple[str, str, str], Any] = {
                key: make_masker(self.options[key].get("mask"), src[1].name)
                for key, src in self._sources.items()
            }
        except MaskConfigError as exc:
            raise EncryptionConfigError([f"protect: {exc}"]) from None
        self.catalogs: dict[str, DatabaseCatalog] = {}
        # (text_key(text), search_path, snapshot serial) -> rewrite plan: never the text,
        # and never a plan that holds a literal (`keep_plan`).
        self.plan_cache = ByteLRU(10_000)
        self._views: OrderedDict[int, tuple[Snapshot, ProtectedSchema, ViewMap]] = OrderedDict()

    def set_max_cell_size(self, limit: int) -> None:
        """`limits.max_cell_size` for every protected column (0: no limit), in every
        database's columns built so far and those built later."""
        self.max_cell = limit
        for cols in self._by_database.values():
            for rt in cols.values():
                rt.max_cell = limit

    def columns_for(self, database: str, *, upgrading: bool = False,
                    ) -> dict[tuple[str, str, str], ColumnRuntime]:
        """The protected columns as they are sealed and opened in `database` (its name as
        the server reports it, `current_database()`), built on first use and kept until
        the next reload. Each has its own cipher bound to the database's identifier and
        its own decrypt cache.

        `upgrading`: for the offline tools (`keys rotate`, `decrypt-column`), which run
        with the operator's own rights on the database and must open version 1 envelopes
        to rewrite them even once `keys.database_binding.require` refuses them to
        sessions."""
        accept = upgrading or not self.binding.require
        cols = self._by_database.get((database, accept))
        if cols is None:
            bound_as = self.binding.identifier(database)  # ValueError for an empty name
            cols = {}
            for key, (ident, codec, enc_keys, bidx) in self._sources.items():
                pc = self.specs[key]
                cipher = ColumnCipher(ident, codec.name, pc.mode, enc_keys, database=bound_as,
                                      accept_unbound=accept)
                cols[key] = ColumnRuntime(pc, cipher, bidx, codec, codec.oid,
                                          TYPLEN.get(codec.name, -1),
                                          cache_size=self.cache_size,
                                          cache_bytes=self.cache_bytes, max_cell=self.max_cell,
                                          database=database)
            self._by_database[(database, accept)] = cols
        return cols

    def views_of(self, snap: Snapshot | None) -> tuple[ProtectedSchema, ViewMap]:
        """The rewriter's schema (protected tables + traceable views) and the view column
        map for one catalog snapshot; computed once per snapshot."""
        if snap is None:
            return self.schema, {}
        hit = self._views.get(snap.serial)
        if hit is not None and hit[0] is snap:
            return hit[1], hit[2]
        schema, attrs = analyse_views(self.schema, snap) if snap.views() else (self.schema, {})
        schema = schema.with_functions(function_results(schema, snap))
        self._views[snap.serial] = (snap, schema, attrs)
        while len(self._views) > 16:
            self._views.popitem(last=False)
        return schema, attrs

    def views_for_roles(self, roles: tuple[str, ...],
                        ) -> dict[tuple[str, str, str], tuple[str, Any]]:
        """Column view per protected column: the strictest of ``roles``' views
        (plaintext without a policy). A role the policy does not know sees ciphertext;
        `deny` normally never reaches decryption (the policy refuses the statement), and
        where it does (rows of a cursor fetched after SET ROLE) no value is revealed."""
        policy = self.gate.policy
        masks = self.masks
        if policy is None:
            return {k: ("plaintext", None) for k in self.specs}
        out = {}
        for key in self.specs:
            schema, table, column = key
            view = "plaintext"
            for role in roles:
                rp = policy.role(role)
                seen = ("ciphertext" if rp is None
                        else rp.columns.get((schema, table), {}).get(column, "plaintext"))
                if _STRICTNESS.get(seen, 3) > _STRICTNESS[view]:
                    view = seen
            out[key] = (view, masks[key])
        return out

    def inherit(self, old: Encryption) -> None:
        """After a reload: start from the catalog snapshots of the rules replaced, so the
        sessions that switch to these rules at their next statement need not wait for a
        catalog query. Reloaded at the first chance when the protected tables changed
        (then the snapshot may lack some of them)."""
        same = old.catalog_sql() == self.catalog_sql()
        for database, cat in old.catalogs.items():
            if cat.snapshot is None:
                continue
            mine = self.catalog_for(database)
            mine.update(cat.snapshot)
            if not same:
                mine.loaded_at = 0.0

    def catalog_sql(self) -> str:
        return catalog_query(sorted({(s, t) for s, t, _ in self.specs}))

    def catalog_for(self, database: str) -> DatabaseCatalog:
        cat = self.catalogs.get(database)
        if cat is None:
            cat = self.catalogs[database] = DatabaseCatalog()
        return cat

    def attach(self, session: Any, rows: list[list[bytes | None]], database: str) -> None:
        """Start tracking a session. `database` is what the server answered to
        `current_database()` in the session's prelude: the identity its values are
        bound to, observed, never taken from the client's startup packet."""
        cat = self.catalog_for(session.database)
        protector = SessionProtector(self, cat, session, database)
        cat.update(build_snapshot(rows, protector.search_path()))
        session.tracker = Tracker(protector)

    def refresh(self, session: Any) -> bytes:
        """An injected catalog query whose answer replaces the database's snapshot."""
        cat = self.catalog_for(session.database)
        path = session.tracker.protector.search_path()

        def done(rows: list[list[bytes | None]]) -> None:
            cat.update(build_snapshot(rows, path))

        return session.tracker.inject_query(self.catalog_sql(), done)


@dataclass(frozen=True, slots=True)
class DatabaseBinding:
    """Which identifier a database's envelopes are bound to (`keys.database_binding`).

    Why the database is bound at all: one proxy (and one keyring) often fronts several
    databases of one server: production, a scratch copy, a reporting replica loaded by
    ETL. Without the binding an envelope copied from one into the same table and column
    of another opened there, so anyone who can write to (or restore into) the second
    database could read the first one's values through the proxy, past its grants and
    row-level security. Version 2 envelopes carry the database identifier in their
    associated data (`proxy.crypto.envelope`).

    The identifier is the database's name as the *server* reports it
    (`current_database()`, asked in every session's prelude and by every offline tool
    on its own connection), never anything a client sends and can change mid-session;
    not an oid or system identifier, which a legitimate dump and restore changes.
    `bind_as` maps a database name to the identifier its envelopes were bound to, for a
    database restored or renamed on purpose (`bind_as: {app_restored: app}` lets the
    restored copy read `app`'s envelopes, and it writes them as `app`'s); every database
    not named binds to its own name.

    `require` refuses version 1 envelopes (written before the binding, which open in any
    database) with the XX001 of any other undecryptable value: set it once `strongroom
    keys rotate` has rewritten every column in every database. Until then they open,
    counted as `strongroom_crypto_operations{op="decrypt_unbound"}` and logged once per
    column and database.

    Blind indexes are not bound: a copied row's index still matches a lookup in the
    other database, but the lookup returns the envelope, which fails there (XX001), and
    binding them would make every index stored today miss its lookups until reindexed.
    What remains is an equality oracle on copied rows through lookups the proxy does not
    recheck (`count(*)`, `UPDATE ... WHERE`): it says whether a guessed value is among the
    copied rows, never which value a row holds.
    """

    bind_as: Mapping[str, str] = field(default_factory=dict)
    require: bool = False

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> DatabaseBinding:
        cfg = cfg or {}
        bind_as = {str(k): str(v) for k, v in (cfg.get("bind_as") or {}).items()}
        if any(not k or not v for k, v in bind_as.items()):
            raise ValueError("keys.database_binding.bind_as: database names must not be empty")
        return cls(bind_as, bool(cfg.get("require", False)))

    def identifier(self, database: str) -> str:
        """The identifier bound into `database`'s envelopes."""
        if not database:
            raise ValueError("the server reported no database name")
        return self.bind_as.get(database, database)


#: The database a connection is on, and that database's encoding (see `bindable_database`).
DATABASE_SQL = "SELECT pg_catalog.current_database(), pg_catalog.getdatabaseencoding()"

class DatabaseNotBindable(ValueError):
    """The database's name as reported cannot identify it (`bindable_database`)."""


_NAME_AS_STORED = frozenset({"utf8", "sqlascii"})  # encodings that report a name unconverted


def bindable_database(name: str, encoding: str) -> str:
    """`name` (the server's `current_database()`, received as UTF-8) when it is the
    database's name as stored, the only form two databases never share.

    The server converts the stored name from the database's own encoding before sending
    it: a LATIN1 database whose stored name is the UTF-8 of `db_é` reports `db_Ã©`, the
    name of another, UTF8, database. Binding to the reported name would let whoever can
    create (or write into) the first read the second's copied envelopes through the
    proxy. UTF8 and SQL_ASCII databases report their name unconverted and every server
    encoding leaves ASCII as it is; a non-ASCII name of any other database is refused
    (DatabaseNotBindable), never guessed."""
    if name.isascii() or clean_encoding_name(encoding) in _NAME_AS_STORED:
        return name
    raise DatabaseNotBindable(
        f"database {name!r} has a non-ASCII name in a {encoding} database: its name as "
        "reported in UTF-8 may be another database's, so values cannot be bound to it; "
        "rename it to an ASCII name or use a UTF8 database")


async def observed_database(conn: Any) -> str:
    """The database an offline tool's connection is on, as sessions there bind it."""
    row = await conn.fetchrow(DATABASE_SQL)
    return bindable_database(str(row[0]), str(row[1]))


def key_name(key: tuple[str, str, str], opts: dict[str, Any]) -> str:
    """The keyring name of a column's keys (and its AD identity): its own name, or a
    shared `joingroup.<name>.deterministic` so equal values join across columns."""
    group = opts.get("join_group")
    if group:
        return f"joingroup.{group}.deterministic"
    return ".".join(key)


def resolve(base: str, path: str) -> str:
    import os

    p = os.path.expanduser(path)
    return p if os.path.isabs(p) else os.path.join(base, p)


def make_provider(cfg: dict[str, Any], base: str) -> Any:
    kind = cfg.get("provider", "local")
    if kind == "local":
        from keys.providers.local import LocalKekProvider

        return LocalKekProvider(resolve(base, cfg["path"]))
    if kind == "env":
        from keys.providers.env import EnvKekProvider

        return EnvKekProvider(cfg.get("env_var", "STRONGROOM_KEK"))
    if kind == "pkcs11":
        from keys.providers.pkcs11 import DEFAULT_MODULE, Pkcs11KekProvider
        from keys.providers.secret_env import take_secret

        pin = take_secret(cfg.get("pin_env", "STRONGROOM_HSM_PIN")) or ""
        return Pkcs11KekProvider(cfg["token_label"], pin, cfg["key_label"],
                                 module=cfg.get("module", DEFAULT_MODULE))
    if kind == "aws_kms":
        from keys.providers.aws_kms import AwsKmsKekProvider

        return AwsKmsKekProvider(cfg["kms_key_id"], region=cfg.get("region"),
                                 endpoint_url=cfg.get("endpoint_url"))
    raise ValueError(f"unknown key provider {kind!r}")


def protect_columns_for_keys(protect: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The `protect:` mapping as `keys init` needs it: one entry per key name."""
    out: dict[str, dict[str, Any]] = {}
    for name, spec in protect.items():
        ident = key_name(tuple(name.split(".")), spec)  # type: ignore[arg-type]
        entry = out.setdefault(ident, {})
        if spec.get("search") == "blind_index":
            entry["search"] = "blind_index"
    return out
