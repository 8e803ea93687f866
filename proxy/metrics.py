"""Prometheus metrics for one proxy process, with label sets a client cannot grow.

Why this shape:

* Each `Metrics` owns its own `CollectorRegistry`, never prometheus_client's global one, so
  tests (and a reload that rebuilds metrics) can create as many as they like.
* Every label value comes from a bounded set the proxy owns: fixed enums in this module,
  PostgreSQL's own SQLSTATE list, or names from the configuration (roles, protected
  columns, key ids). Anything else - and in particular anything a client typed (a role
  name in a startup packet, a custom SQLSTATE in `RAISE ... USING ERRCODE`, a statement
  kind we do not know) - is folded into `"unlisted"` / `"other"`. A hostile client can
  therefore not explode the number of series, and no label ever carries a value or SQL.
* The hot path is a dict lookup and an add on a cell bound once at start (or when the
  configuration changes), never a `.labels(...)` call per event. Counters and histograms
  are plain Python cells exported by custom collectors at scrape time, not
  prometheus_client's locked values: those cost 1.3 us per counter `inc` and 2.8 us per
  histogram `observe` on this kind of machine, against 0.1 / 0.2 us here - real money
  when a statement's whole budget through the proxy is ~20-30 us. The price is a
  single-writer rule: only the event-loop thread of the process may call the event
  methods (the HTTP thread only reads; CPython makes each read consistent per cell, and a
  scrape can at worst see a histogram's `_sum` one observation ahead of its buckets).
* The analyzer cache counter is read from the plan cache at scrape time (a custom
  collector), so the cache itself needs no metrics code at all.

Several workers (`workers: N`): every worker process has its own registry and serves it on
its own port, `metrics.port + worker_index` (see `worker_port`), and Prometheus scrapes all
N targets. That was chosen over prometheus_client's multiprocess mode because it needs no
shared mmap directory, no special gauge modes, no cleanup of dead workers' files, and a
per-worker `up` series shows a dead worker directly. Sum across workers in PromQL with
`sum without (instance) (...)`.
"""

from __future__ import annotations

import bisect
import platform
import re
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Gauge,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
    make_wsgi_app,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

# --------------------------------------------------------------------------- label enums

#: Statement kinds counted by `strongroom_queries_total{kind}`. The policy kinds of the
#: access-control issue plus the protocol-level and utility kinds the session can see.
QUERY_KINDS: frozenset[str] = frozenset(
    {
        "select", "insert", "update", "delete", "merge", "truncate", "copy_in", "copy_out",
        "references", "ddl", "do", "call", "set_role", "listen", "notify", "admin",
        "prepare_transaction", "transaction", "set", "show", "explain", "prepare", "execute",
        "cursor", "lock", "grant", "function_call", "empty", "unparsed", "other",
    }
)  # fmt: skip

#: pglast statement node names (what `proxy.gate.Plan.kinds` holds) -> query kind, so the
#: session can pass either a policy kind or a raw node name.
NODE_KINDS: dict[str, str] = {
    "SelectStmt": "select",
    "InsertStmt": "insert",
    "UpdateStmt": "update",
    "DeleteStmt": "delete",
    "MergeStmt": "merge",
    "TruncateStmt": "truncate",
    "CopyStmt": "copy_in",  # refined by the analyzer (copy_in / copy_out) when it knows
    "DoStmt": "do",
    "CallStmt": "call",
    "ListenStmt": "listen",
    "UnlistenStmt": "listen",
    "NotifyStmt": "notify",
    "TransactionStmt": "transaction",
    "VariableSetStmt": "set",
    "VariableShowStmt": "show",
    "ExplainStmt": "explain",
    "PrepareStmt": "prepare",
    "ExecuteStmt": "execute",
    "DeallocateStmt": "prepare",
    "DeclareCursorStmt": "cursor",
    "FetchStmt": "cursor",
    "ClosePortalStmt": "cursor",
    "LockStmt": "lock",
    "GrantStmt": "grant",
    "GrantRoleStmt": "grant",
    "CreateStmt": "ddl",
    "CreateTableAsStmt": "ddl",
    "AlterTableStmt": "ddl",
    "DropStmt": "ddl",
    "IndexStmt": "ddl",
    "ViewStmt": "ddl",
    "CreateFunctionStmt": "ddl",
    "RenameStmt": "ddl",
    "CommentStmt": "ddl",
    "CreateSchemaStmt": "ddl",
    "CreateSeqStmt": "ddl",
    "AlterSeqStmt": "ddl",
    "CreateRoleStmt": "admin",
    "AlterRoleStmt": "admin",
    "DropRoleStmt": "admin",
    "VacuumStmt": "admin",
    "CheckPointStmt": "admin",
    "ReindexStmt": "admin",
    "ClusterStmt": "admin",
    "AlterSystemStmt": "admin",
}

_KIND_LABEL: dict[str, str] = {k: k for k in QUERY_KINDS} | NODE_KINDS

#: Why a client connection ended (`strongroom_client_disconnections_total{reason}`).
DISCONNECT_REASONS: frozenset[str] = frozenset(
    {
        "client_terminate", "client_eof", "server_closed", "server_fatal", "protocol_error",
        "auth_failure", "startup_timeout", "idle_timeout", "idle_in_transaction_timeout",
        "shutdown", "tls_error", "upstream_connect_failed", "replication_refused",
        "unsupported_encoding", "other",
    }
)  # fmt: skip

POLICY_DECISIONS: frozenset[str] = frozenset({"allow", "deny", "other"})

#: Reasons a policy decision can carry. The policy module maps its own reasons onto these.
POLICY_REASONS: frozenset[str] = frozenset(
    {
        "allowed", "default_deny", "table_not_allowed", "kind_not_allowed", "column_denied",
        "function_not_allowed", "role_change", "procedural", "unparsable", "unclassified",
        "unsafe_rewrite", "unsupported", "other",
    }
)  # fmt: skip

CRYPTO_OPS: tuple[str, ...] = ("encrypt", "decrypt", "blind_index", "decrypt_unbound")
DIRECTIONS: tuple[str, ...] = ("client_to_server", "server_to_client")

#: Every SQLSTATE PostgreSQL 15 defines (src/backend/utils/errcodes.txt). Codes outside
#: this list (e.g. a client's `RAISE ... USING ERRCODE = 'AB123'`) are counted as "other".
PG_SQLSTATES: frozenset[str] = frozenset(
    """
    01000 01003 01004 01006 01007 01008 0100C 01P01 02000 02001 03000 08000 08001 08003 08004
    08006 08007 08P01 09000 0A000 0B000 0F000 0F001 0L000 0LP01 0P000 0Z000 0Z002 10608 20000
    21000 22000 22001 22002 22003 22004 22005 22007 22008 22009 2200B 2200C 2200D 2200F 2200G
    2200H 2200L 2200M 2200N 2200S 2200T 22010 22011 22012 22013 22014 22015 22016 22018 22019
    2201B 2201E 2201F 2201G 2201W 2201X 22021 22022 22023 22024 22025 22026 22027 2202E 2202G
    2202H 22030 22031 22032 22033 22034 22035 22036 22037 22038 22039 2203A 2203B 2203C 2203D
    2203E 2203F 2203G 22P01 22P02 22P03 22P04 22P05 22P06 23000 23001 23502 23503 23505 23514
    23P01 24000 25000 25001 25002 25003 25004 25005 25006 25007 25008 25P01 25P02 25P03 25P04
    26000 27000 28000 28P01 2B000 2BP01 2D000 2F000 2F002 2F003 2F004 2F005 34000 38000 38001
    38002 38003 38004 39000 39001 39004 39P01 39P02 39P03 3B000 3B001 3D000 3F000 40000 40001
    40002 40003 40P01 42000 42501 42601 42602 42611 42622 42701 42702 42703 42704 42710 42712
    42723 42725 42803 42804 42809 42830 42846 42883 428C9 42939 42P01 42P02 42P03 42P04 42P05
    42P06 42P07 42P08 42P09 42P10 42P11 42P12 42P13 42P14 42P15 42P16 42P17 42P18 42P19 42P20
    42P21 42P22 44000 53000 53100 53200 53300 53400 54000 54001 54011 54023 55000 55006 55P02
    55P03 55P04 57000 57014 57P01 57P02 57P03 57P04 57P05 58000 58030 58P01 58P02 58P03 72000
    F0000 F0001 HV000 HV001 HV002 HV004 HV005 HV006 HV007 HV008 HV009 HV00A HV00B HV00C HV00D
    HV00J HV00K HV00L HV00M HV00N HV00P HV00Q HV00R HV010 HV014 HV021 HV024 HV090 HV091 P0000
    P0001 P0002 P0003 P0004 XX000 XX001 XX002
    """.split()
)

_SQLSTATE_RE = re.compile(r"[0-9A-Z]{5}")

UNLISTED_ROLE = "unlisted"
_POLICY_CACHE_MAX = 4096
OTHER = "other"

#: Buckets for latencies through a local proxy: 100 µs .. 10 s.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
#: Buckets for per-batch crypto and per-statement parse time: 1 µs .. 100 ms.
FAST_BUCKETS = (
    0.000001, 0.0000025, 0.000005, 0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.1,
)  # fmt: skip


def bounded_sqlstate(code: object) -> str:
    """A SQLSTATE fit for a label: a real PostgreSQL code, or "other"."""
    if isinstance(code, bytes):
        code = code.decode("ascii", "replace")
    if isinstance(code, str) and _SQLSTATE_RE.fullmatch(code) and code in PG_SQLSTATES:
        return code
    return OTHER


def query_kind(kind: str) -> str:
    """Map a policy kind or pglast node name onto the fixed kind enum."""
    return _KIND_LABEL.get(kind, OTHER)


def worker_port(base_port: int, worker_index: int) -> int:
    """The metrics port of worker `worker_index` (0-based): `base_port + worker_index`.

    Port 0 (metrics off, or "any free port" in tests) stays 0 for every worker.
    """
    return 0 if base_port == 0 else base_port + worker_index


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("strongroom")
    except Exception:  # not installed as a distribution (e.g. run from a source tree)
        return "unknown"


# --------------------------------------------------------------------------- lock-free cells


class _Counters(Collector):
    """A counter family whose children are one-element lists: `cell[0] += n` to count."""

    def __init__(self, registry: CollectorRegistry, name: str, doc: str, labels: Sequence[str]):
        self.name, self.doc, self.labels = name, doc, list(labels)
        self.cells: dict[tuple[str, ...], list[float]] = {}
        registry.register(self)

    def child(self, *values: str) -> list[float]:
        """The cell for one label set (created at 0 so the series exists from the start)."""
        assert len(values) == len(self.labels)
        cell = self.cells.get(values)
        if cell is None:
            cell = self.cells[values] = [0.0]
        return cell

    def collect(self) -> Iterator[CounterMetricFamily]:
        fam = CounterMetricFamily(self.name, self.doc, labels=self.labels)
        for values, cell in list(self.cells.items()):
            fam.add_metric(list(values), cell[0])
        yield fam

    def describe(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self.name, self.doc, labels=self.labels)


class _Hist:
    """One histogram child: per-bucket counts (non-cumulative, last = +Inf) and a sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: the first bound >= value, i.e. Prometheus' `le` semantics.
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value


class _Histograms(Collector):
    """A histogram family of `_Hist` children, exported cumulatively at scrape time."""

    def __init__(
        self,
        registry: CollectorRegistry,
        name: str,
        doc: str,
        labels: Sequence[str],
        buckets: tuple[float, ...],
    ) -> None:
        self.name, self.doc, self.labels = name, doc, list(labels)
        self.buckets = tuple(sorted(buckets))
        self.children: dict[tuple[str, ...], _Hist] = {}
        registry.register(self)

    def child(self, *values: str) -> _Hist:
        assert len(values) == len(self.labels)
        h = self.children.get(values)
        if h is None:
            h = self.children[values] = _Hist(self.buckets)
        return h

    def collect(self) -> Iterator[HistogramMetricFamily]:
        fam = HistogramMetricFamily(self.name, self.doc, labels=self.labels)
        for values, h in list(self.children.items()):
            counts = list(h.counts)  # one consistent copy; `sum` may be one step ahead
            cumulative, total = [], 0
            for bound, n in zip((*self.buckets, float("inf")), counts, strict=True):
                total += n
                cumulative.append((_fmt_bound(bound), total))
            fam.add_metric(list(values), cumulative, sum_value=h.sum)
        yield fam

    def describe(self) -> Iterator[HistogramMetricFamily]:
        yield HistogramMetricFamily(self.name, self.doc, labels=self.labels)


def _fmt_bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


class _PlanCacheCollector(Collector):
    """Reads hit/miss totals from the analyzer's plan cache when Prometheus scrapes."""

    def __init__(self) -> None:
        self.source: Callable[[], tuple[int, int]] | None = None

    def collect(self) -> Iterator[CounterMetricFamily]:
        fam = CounterMetricFamily(
            "strongroom_analyzer_cache",
            "Statement analysis plan-cache lookups by result.",
            labels=["result"],
        )
        hits, misses = (0, 0)
        if self.source is not None:
            try:
                hits, misses = self.source()
            except Exception:  # a scrape must never fail because of a stale source
                hits, misses = (0, 0)
        fam.add_metric(["hit"], float(hits))
        fam.add_metric(["miss"], float(misses))
        yield fam

    def describe(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(
            "strongroom_analyzer_cache", "Statement analysis plan-cache lookups by result."
        )


# --------------------------------------------------------------------------- Metrics


class Metrics:
    """All Strongroom series of one process; the session and server call the event methods.

    Call `set_known_roles`, `set_protected_columns` and `set_key_ids` at start and after
    every successful reload; the label children are (re)bound there, off the hot path.
    Event methods must be called from the event-loop thread only (see the module doc).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # `*_created` series double the series count for no use in this proxy (Prometheus
        # detects counter resets itself). The switch is process-wide; the proxy owns its
        # process, so that is fine.
        disable_created_metrics()
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry

        # Gauges change per connection, not per statement: prometheus_client's are fine.
        self.client_active = Gauge(
            "strongroom_client_connections_active",
            "Client connections currently admitted.",
            registry=r,
        )
        self.client_total = _Counters(
            r, "strongroom_client_connections", "Client connections by admission result.",
            ["result"],
        )  # fmt: skip
        self._accepted = self.client_total.child("accepted")
        self._rejected = self.client_total.child("rejected")
        self.client_disconnects = _Counters(
            r, "strongroom_client_disconnections",
            "Admitted client connections that ended, by reason.", ["reason"],
        )  # fmt: skip
        self._disconnect = {x: self.client_disconnects.child(x) for x in sorted(DISCONNECT_REASONS)}

        self.client_starting = Gauge(
            "strongroom_client_connections_starting",
            "Client connections between accept and the server's AuthenticationOk "
            "(bounded by limits.max_startups and limits.max_startups_per_ip).",
            registry=r,
        )
        self.startups_rejected = _Counters(
            r, "strongroom_startups_rejected",
            "Client connections refused with 53300 because too many were starting, by "
            "the limit reached: total (max_startups) or per_ip (max_startups_per_ip).",
            ["reason"],
        )  # fmt: skip
        self._startup_rejected = {x: self.startups_rejected.child(x) for x in ("per_ip", "total")}
        self.offloaded = _Counters(
            r, "strongroom_statements_offloaded",
            "Statements long enough (over 64 KiB) to be analysed in a worker process, so "
            "that their parse does not stall other sessions.",
            [],
        )  # fmt: skip
        self._offloaded = self.offloaded.child()

        self.upstream_active = Gauge(
            "strongroom_upstream_connections_active",
            "Open connections to the upstream PostgreSQL server.",
            registry=r,
        )
        self.upstream_connect_seconds = _Histograms(
            r, "strongroom_upstream_connect_seconds",
            "Time to open (TCP + TLS) a connection to the upstream server.", [], LATENCY_BUCKETS,
        )  # fmt: skip
        self._upstream_connect = self.upstream_connect_seconds.child()
        self.upstream_connect_failures = _Counters(
            r, "strongroom_upstream_connect_failures",
            "Failed attempts to connect to the upstream server.", [],
        )  # fmt: skip
        self._upstream_failed = self.upstream_connect_failures.child()
        self.upstream_response_seconds = _Histograms(
            r, "strongroom_upstream_response_seconds",
            "Time from forwarding a statement upstream to the server's first reply byte.", [],
            LATENCY_BUCKETS,
        )  # fmt: skip
        self._upstream_response = self.upstream_response_seconds.child()

        self.queries = _Counters(
            r, "strongroom_queries", "Statements seen from clients, by statement kind.", ["kind"]
        )
        self._query_kind = {k: self.queries.child(k) for k in sorted(QUERY_KINDS)}
        self._query_by_name = {name: self._query_kind[k] for name, k in _KIND_LABEL.items()}
        self._query_other = self._query_kind[OTHER]
        self.query_seconds = _Histograms(
            r, "strongroom_query_duration_seconds",
            "Client Query/Sync to ReadyForQuery, measured through the proxy.", [],
            LATENCY_BUCKETS,
        )  # fmt: skip
        self._query_seconds = self.query_seconds.child()
        self.bytes = _Counters(r, "strongroom_bytes", "Bytes relayed, by direction.", ["direction"])
        self._bytes_c2s = self.bytes.child("client_to_server")
        self._bytes_s2c = self.bytes.child("server_to_client")

        self.policy = _Counters(
            r, "strongroom_policy_decisions",
            "Policy decisions by configured role (or 'unlisted'), decision and reason.",
            ["role", "decision", "reason"],
        )  # fmt: skip
        self._policy: dict[tuple[str, str, str], list[float]] = {}
        self._roles: frozenset[str] = frozenset()

        self.crypto_ops = _Counters(
            r, "strongroom_crypto_operations",
            "Cell-level crypto operations by protected column, operation and result.",
            ["column", "op", "result"],
        )  # fmt: skip
        self.crypto_seconds = _Histograms(
            r, "strongroom_crypto_seconds",
            "Crypto time per batch (one message or result chunk), by operation.", ["op"],
            FAST_BUCKETS,
        )  # fmt: skip
        self._crypto_seconds = {op: self.crypto_seconds.child(op) for op in CRYPTO_OPS}
        self._crypto: dict[tuple[str, str], tuple[list[float], list[float]]] = {}
        self._columns: frozenset[str] = frozenset()
        self.set_protected_columns(())

        self._cache_collector = _PlanCacheCollector()
        r.register(self._cache_collector)
        self.parse_seconds = _Histograms(
            r, "strongroom_analyzer_parse_seconds",
            "Time to analyse a statement the plan cache did not hold.", [], FAST_BUCKETS,
        )  # fmt: skip
        self._parse_seconds = self.parse_seconds.child()

        self.protocol_errors = _Counters(
            r, "strongroom_protocol_errors",
            "Protocol violations and startup failures detected by the proxy, by SQLSTATE.",
            ["sqlstate"],
        )  # fmt: skip
        self.errors = _Counters(
            r, "strongroom_errors",
            "ErrorResponses sent to clients (the proxy's and the server's), by SQLSTATE.",
            ["sqlstate"],
        )  # fmt: skip
        self.auth_failures = _Counters(
            r, "strongroom_auth_failures", "Client authentications the upstream server rejected.",
            [],
        )  # fmt: skip
        self._auth_failures = self.auth_failures.child()

        self.audit_write_failures = _Counters(
            r, "strongroom_audit_write_failures",
            "Audit records that could not be written (disk full, I/O error, file gone); "
            "audit.on_failure says whether their statements were refused or served.",
            [],
        )  # fmt: skip
        self._audit_write_failures = self.audit_write_failures.child()

        self.reloads = _Counters(
            r, "strongroom_config_reloads", "Configuration reloads by result.", ["result"]
        )
        self._reload_ok = self.reloads.child("ok")
        self._reload_failed = self.reloads.child("failed")
        self.keyring_auth_failures = _Counters(
            r, "strongroom_keyring_auth_failures",
            "Keyring loads refused because the keyring's MAC did not verify under the KEK "
            "(or it had none): edited outside `strongroom keys`.", [],
        )  # fmt: skip
        self._keyring_auth_failures = self.keyring_auth_failures.child()

        self.key_ids = Gauge(
            "strongroom_key_ids_in_use",
            "1 for each live (active or decrypt-only) key id of each protected column.",
            ["column", "key_id"],
            registry=r,
        )
        self.build_info = Gauge(
            "strongroom_build_info",
            "Always 1; labels carry the Strongroom and Python versions.",
            ["version", "python"],
            registry=r,
        )
        self.build_info.labels(_version(), platform.python_version()).set(1)
        register_standard_collectors(r)

    # ------------------------------------------------------------------ configuration

    def set_known_roles(self, roles: Iterable[str]) -> None:
        """Role names from the configuration; any other role is labelled "unlisted".

        Only the lookup cache is reset; series already exported keep their values (a
        counter must not go backwards because a role left the policy).
        """
        self._roles = frozenset(str(x) for x in roles)
        self._policy = {}

    def set_protected_columns(self, columns: Iterable[str]) -> None:
        """`schema.table.column` names from `protect:`; pre-binds their crypto cells."""
        self._columns = frozenset(str(c) for c in columns)
        crypto: dict[tuple[str, str], tuple[list[float], list[float]]] = {}
        for col in (*sorted(self._columns), OTHER):
            for op in CRYPTO_OPS:
                crypto[(col, op)] = (
                    self.crypto_ops.child(col, op, "ok"),
                    self.crypto_ops.child(col, op, "error"),
                )
        self._crypto = crypto

    def set_key_ids(self, key_ids: Mapping[str, Iterable[int | str]]) -> None:
        """Live key ids per protected column (from the keyring); replaces the previous set."""
        self.key_ids.clear()
        for column, ids in key_ids.items():
            col = column if column in self._columns else OTHER
            for kid in ids:
                self.key_ids.labels(col, str(int(kid))).set(1)

    def track_plan_cache(self, source: Callable[[], tuple[int, int]] | None) -> None:
        """Report analyzer cache (hits, misses) read from `source()` at scrape time.

        Typical wiring: `metrics.track_plan_cache(lambda: (gate.cache.hits,
        gate.cache.misses))`. The callable runs on the HTTP thread: it must only read.
        """
        self._cache_collector.source = source

    # ------------------------------------------------------------------ client events

    def client_accepted(self) -> None:
        """A client connection was admitted (counts it and raises the active gauge)."""
        self._accepted[0] += 1
        self.client_active.inc()

    def client_rejected(self) -> None:
        """A client connection was refused (connection limit, shutting down)."""
        self._rejected[0] += 1

    def startup_began(self) -> None:
        """A client connection counts as starting (until AuthenticationOk or its end)."""
        self.client_starting.inc()

    def startup_ended(self) -> None:
        """Call once per `startup_began`."""
        self.client_starting.dec()

    def statement_offloaded(self) -> None:
        self._offloaded[0] += 1

    def startup_rejected(self, reason: str) -> None:
        """A client connection was refused: too many starting ("total" or "per_ip")."""
        self._startup_rejected[reason][0] += 1

    def client_closed(self, reason: str = "client_eof") -> None:
        """An admitted client connection ended. Call once per `client_accepted`."""
        self.client_active.dec()
        self._disconnect.get(reason, self._disconnect[OTHER])[0] += 1

    def auth_failed(self, sqlstate: str = "28P01") -> None:
        """The server refused the client's credentials; also counted as an error sent."""
        self._auth_failures[0] += 1
        self.error_sent(sqlstate)

    # ------------------------------------------------------------------ upstream events

    def upstream_connected(self, seconds: float) -> None:
        self._upstream_connect.observe(seconds)
        self.upstream_active.inc()

    def upstream_connect_failed(self) -> None:
        self._upstream_failed[0] += 1

    def upstream_closed(self) -> None:
        """An upstream connection that `upstream_connected` counted has closed."""
        self.upstream_active.dec()

    def upstream_response(self, seconds: float) -> None:
        self._upstream_response.observe(seconds)

    # ------------------------------------------------------------------ statements

    def query(self, kind: str) -> None:
        """Count one statement by kind (policy kind or pglast node name; else "other")."""
        self._query_by_name.get(kind, self._query_other)[0] += 1

    def query_counter(self, kind: str) -> list[float]:
        """The counter cell of one kind (bounded like `query`), for callers that cache it
        per statement text and add to it directly: `cell[0] += 1`."""
        return self._query_by_name.get(kind, self._query_other)

    def query_done(self, kind: str | None, seconds: float) -> None:
        """A Query (or Sync) got its ReadyForQuery: count its kind (if given) and time it."""
        if kind is not None:
            self._query_by_name.get(kind, self._query_other)[0] += 1
        self._query_seconds.observe(seconds)

    def byte_cells(self) -> tuple[list[float], list[float]]:
        """The (client_to_server, server_to_client) byte counter cells, for a caller that
        adds to them directly per read (`cell[0] += n`): the cheapest possible event."""
        return self._bytes_c2s, self._bytes_s2c

    def bytes_in(self, n: int) -> None:
        """Bytes read from the client (and forwarded towards the server)."""
        self._bytes_c2s[0] += n

    def bytes_out(self, n: int) -> None:
        """Bytes read from the server (and forwarded towards the client)."""
        self._bytes_s2c[0] += n

    def policy_decision(self, role: str, decision: str, reason: str) -> None:
        """Count one decision. `role` is folded to "unlisted" unless it is configured."""
        cell = self._policy.get((role, decision, reason))
        if cell is None:
            cell = self._bind_policy(role, decision, reason)
        cell[0] += 1

    def _bind_policy(self, role: str, decision: str, reason: str) -> list[float]:
        cell = self.policy.child(
            role if role in self._roles else UNLISTED_ROLE,
            decision if decision in POLICY_DECISIONS else OTHER,
            reason if reason in POLICY_REASONS else OTHER,
        )
        # Cached under the raw key so an unlisted (but legitimate) role also pays one dict
        # lookup; the cap keeps a flood of made-up role names from growing the dict.
        if len(self._policy) >= _POLICY_CACHE_MAX:
            self._policy.clear()
        self._policy[(role, decision, reason)] = cell
        return cell

    def crypto_done(
        self, column: str, op: str, ok: int = 1, errors: int = 0, seconds: float | None = None
    ) -> None:
        """Count a batch of crypto operations on one column: `ok` good, `errors` failed.

        Call it per message or per result chunk, not per cell: at 300k cells/s even a
        0.1 us metric call per cell would be a few percent of the crypto.
        """
        pair = self._crypto.get((column, op)) or self._crypto.get((OTHER, op))
        if pair is None:  # `op` is chosen by code, never by a client: a bug, say so
            raise ValueError(f"unknown crypto op {op!r}; expected one of {CRYPTO_OPS}")
        if ok:
            pair[0][0] += ok
        if errors:
            pair[1][0] += errors
        if seconds is not None:
            self._crypto_seconds[op].observe(seconds)

    def analyzer_parsed(self, seconds: float) -> None:
        """A statement missed the plan cache and was analysed in `seconds`."""
        self._parse_seconds.observe(seconds)

    # ------------------------------------------------------------------ errors, reloads

    def protocol_error(self, sqlstate: str) -> None:
        """The proxy detected a protocol violation; SQLSTATE bounded to PostgreSQL's list."""
        self.protocol_errors.child(bounded_sqlstate(sqlstate))[0] += 1

    def error_sent(self, sqlstate: str) -> None:
        """An ErrorResponse went to a client; SQLSTATE bounded to PostgreSQL's list."""
        self.errors.child(bounded_sqlstate(sqlstate))[0] += 1

    def audit_write_failed(self) -> None:
        self._audit_write_failures[0] += 1

    def config_reloaded(self, ok: bool) -> None:
        (self._reload_ok if ok else self._reload_failed)[0] += 1

    def keyring_auth_failed(self) -> None:
        """A reload found a keyring that does not authenticate (and kept the running one)."""
        self._keyring_auth_failures[0] += 1

    # ------------------------------------------------------------------ exposition

    def render(self) -> bytes:
        """The text exposition format, as `/metrics` serves it."""
        return generate_latest(self.registry)

    def start_http(
        self, host: str, port: int, healthy: Callable[[], bool] | None = None
    ) -> tuple[Any, int]:
        """Serve `/metrics` and `/healthz` from a daemon thread; returns (server, port).

        A thread, not the event loop: a slow scraper can then never stall client traffic,
        and exposition of a few hundred series takes well under a millisecond of GIL.
        `healthy()` (default: always) decides `/healthz`. Stop it with `stop_http(server)`.
        """
        app = http_app(self.registry, healthy or (lambda: True))
        server = _make_http_server(host, port, app)
        threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
        return server, int(server.server_address[1])


# --------------------------------------------------------------------------- HTTP


def register_standard_collectors(registry: CollectorRegistry) -> None:
    """Add prometheus-client's `process_*` and `python_*` collectors to `registry`.

    They are what every Prometheus dashboard expects from a process (CPU, memory, open
    fds, start time, GC activity, Python version); the proxy's registry is its own, not the
    default one that carries them, so they are added here. Their labels are fixed by
    prometheus-client (generation, implementation, version), never by a client.
    """
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)


_WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def http_app(registry: CollectorRegistry, healthy: Callable[[], bool]) -> _WsgiApp:
    """The metrics endpoint's routes: `/metrics` (exposition), `/healthz`, 404 elsewhere.

    prometheus-client's own app answers every path with the metrics; a path that is not
    served must say so (a health probe pointed at the metrics would otherwise pass on a
    scrape, and a typo in a scrape config would go unnoticed). `/healthz` is 200 "ok"
    while `healthy()` holds (the process serves clients), 503 "stopping" after.
    """
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return metrics_app(environ, start_response)  # type: ignore[no-any-return]
        if path == "/healthz":
            ok = healthy()
            body = b"ok\n" if ok else b"stopping\n"
            status = "200 OK" if ok else "503 Service Unavailable"
        else:
            body, status = b"not found: the metrics are at /metrics\n", "404 Not Found"
        start_response(status, [("Content-Type", "text/plain; charset=utf-8"),
                                ("Content-Length", str(len(body)))])
        return [body] if environ.get("REQUEST_METHOD") != "HEAD" else [b""]

    return app


class _QuietHandler(WSGIRequestHandler):
    """No access log line per scrape or health probe on stderr."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a stuck scraper never blocks the process from exiting


def _make_http_server(host: str, port: int, app: _WsgiApp) -> WSGIServer:
    """A threading WSGI server on (host, port); IPv6 when `host` is an IPv6 address."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    server_cls = type("_MetricsServer", (_ThreadingWSGIServer,), {"address_family": family})
    return make_server(host, port, app, server_cls, handler_class=_QuietHandler)


def stop_http(server: Any) -> None:
    """Stop a server returned by `Metrics.start_http` and release its port."""
    server.shutdown()
    server.server_close()
