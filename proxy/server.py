"""Listeners, the session registry, cancel routing, the janitor, signals and workers.

One process serves many sessions on one event loop. With `workers: N` the main process
forks N children that each bind the same port with SO_REUSEPORT; the kernel spreads new
connections across them. A CancelRequest can land on any worker, so a worker that does
not own the key forwards it to the upstream server, which checks the key itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import os
import signal
import socket
import ssl
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

from proxy import audit_anchor, observability, reload_guard
from proxy.gate import Gate
from proxy.metrics import stop_http, worker_port
from proxy.protocol import messages as m
from proxy.session import Session, State
from proxy.settings import ConfigError, Settings, load

log = logging.getLogger("strongroom.server")


class Server:
    """Owns the listening socket(s) and every session of this process."""

    def __init__(self, settings: Settings, *, worker_count: int = 1, worker_index: int = 0,
                 ) -> None:
        self.settings = settings
        self.worker_count = worker_count
        self.worker_index = worker_index
        self.gate = Gate(settings)
        # Metrics always exist (the session's counters are plain adds); the HTTP endpoint
        # and the audit log only when configured. See proxy/observability.py.
        self.metrics, self.audit, self.audit_facts = observability.build(
            settings, self.gate, worker_index
        )
        self.query_kinds = observability.QueryKinds(self.metrics, self.gate)
        self.anchor = audit_anchor.build(settings, self.audit, self.metrics)
        self._metrics_http: Any = None
        self.metrics_port = 0
        self.sessions: set[Session] = set()
        # Sessions between accept and AuthenticationOk, in total and per client address
        # (limits.max_startups, limits.max_startups_per_ip).
        self.starting = 0
        self.starting_by_host: dict[str, int] = {}
        self.keys: dict[tuple[int, int], Session] = {}
        self.client_ssl = settings.client_ssl_context()
        self.upstream_ssl = settings.upstream_ssl_context()
        self._ids = itertools.count(1)
        self._servers: list[asyncio.AbstractServer] = []
        self._janitor: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self.counters: dict[str, int] = {
            "accepted": 0,
            "rejected": 0,
            "closed": 0,
            "protocol_errors": 0,
            "auth_failures": 0,
            "upstream_connect_failures": 0,
        }
        self.on_reload: list[Callable[[Settings], None]] = []
        self._reloads = 0  # SIGHUPs so far: a checked reload applies only if still the last

    # ------------------------------------------------------------------ lifecycle

    async def start(self, sock: socket.socket | None = None) -> None:
        loop = asyncio.get_running_loop()
        if sock is None:
            sock = make_listen_socket(
                self.settings.listen.host, self.settings.listen.port, self.worker_count > 1
            )
        if self.anchor is not None:
            await self.anchor.start()
        srv = await loop.create_server(lambda: Session(self), sock=sock, backlog=4096)
        self._servers.append(srv)
        self._janitor = loop.create_task(self._janitor_loop())
        mcfg = self.settings.metrics
        if mcfg.port:
            self._metrics_http, self.metrics_port = self.metrics.start_http(
                mcfg.host, worker_port(mcfg.port, self.worker_index),
                healthy=lambda: not self._stopping,
            )
            log.info("metrics on http://%s:%s/metrics, health on /healthz", mcfg.host,
                     self.metrics_port)

    @property
    def port(self) -> int:
        return self._servers[0].sockets[0].getsockname()[1]

    async def shutdown(self, grace: float | None = None) -> None:
        """Stop accepting, let sessions finish for `grace` seconds, then close the rest."""
        if self._stopping:
            return
        self._stopping = True
        for srv in self._servers:
            srv.close()
        grace = self.settings.limits.shutdown_grace if grace is None else grace
        deadline = time.monotonic() + grace
        while self.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for session in list(self.sessions):
            session.close_reason = "shutdown"
            session.expire("57P01", "terminating connection due to administrator command")
        if self._janitor:
            self._janitor.cancel()
        await asyncio.sleep(0)
        # Let the closed sessions' connection_lost run, so their disconnects are audited.
        deadline = time.monotonic() + 2.0
        while self.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self.audit is not None:
            self.audit.close()
        if self.anchor is not None:
            await self.anchor.stop()  # the head now is the stop record
        if self._metrics_http is not None:
            stop_http(self._metrics_http)
            self._metrics_http = None

    def reload(self, path: str) -> bool:
        """Swap in a new Settings; a broken file leaves the running one in force.

        A file that would take protection off a column (`reload_guard`) is applied only
        after the database said that column holds no envelope: then this returns False
        at once and the check finishes in the background (`_reload_checked`)."""
        self._reloads += 1
        try:
            new = load(path)
        except ConfigError as exc:
            return self._reload_failed(f"\n{exc}")
        dropped = reload_guard.dropped_protection(
            self.settings.raw.get("protect") or {}, new.raw.get("protect") or {})
        if dropped:
            self.spawn(self._reload_checked(path, new, dropped, self._reloads))
            return False
        return self._apply(path, new)

    def _reload_failed(self, why: str) -> bool:
        log.error("reload rejected, keeping the running configuration:%s",
                  why if why.startswith("\n") else f" {why}")
        self.count("reload_failed")
        self.metrics.config_reloaded(False)
        return False

    async def _reload_checked(self, path: str, new: Settings,
                              dropped: list[tuple[str, str]], seq: int) -> None:
        """Apply `new` if none of the `dropped` columns holds a value in any database
        this proxy serves; refuse it otherwise, and when that cannot be found out."""
        databases = set(self.gate.encryption.catalogs) if self.gate.encryption else set()
        if self.settings.upstream.database:
            databases.add(self.settings.upstream.database)
        names = [name for name, _how in dropped]
        if not databases:
            self._reload_failed(
                f"it takes protection off {', '.join(names)} and no database is known to "
                "check for stored values in (set upstream.database)")
            return
        try:
            found = await reload_guard.columns_with_values(self.settings, databases, names)
        except Exception as exc:  # the message names no value; it may name a role
            self._reload_failed(
                f"it takes protection off {', '.join(names)} and the database could not "
                f"be asked whether they hold values ({type(exc).__name__}: {exc}); the "
                "proxy connects to upstream with $PGUSER / $PGPASSWORD / ~/.pgpass")
            return
        if found:
            self._reload_failed(reload_guard.refusal(found, dropped))
            return
        if seq != self._reloads:
            return  # a later SIGHUP read the file again and decides instead
        self._apply(path, new)

    def _apply(self, path: str, new: Settings) -> bool:
        old = self.settings
        if (new.listen, new.workers) != (old.listen, old.workers):
            log.warning("listen address or worker count changed: takes effect after a restart")
        try:
            # (builds everything first: on failure nothing of the running one changed)
            self.gate.configure(new)
        except Exception as exc:  # a policy that cannot be built, keys that do not load
            if getattr(exc, "keyring_auth_failed", False):
                self.metrics.keyring_auth_failed()
            return self._reload_failed(f"(running keys kept) {exc}")
        self.settings = new
        self.client_ssl = new.client_ssl_context()
        self.upstream_ssl = new.upstream_ssl_context()
        for hook in self.on_reload:
            hook(new)
        self.count("reload_ok")
        observability.configure_metrics(self.metrics, new, self.gate)
        self.metrics.config_reloaded(True)
        if observability.audit_settings(new) != observability.audit_settings(old):
            log.warning("audit settings changed: take effect after a restart")
        log.info("configuration reloaded from %s", path)
        return True

    # ------------------------------------------------------------------ sessions

    def next_session_id(self) -> int:
        return next(self._ids) * 1000 + os.getpid() % 1000

    def admit(self, session: Session) -> bool:
        if self._stopping or len(self.sessions) >= self.settings.limits.max_clients:
            self.count("rejected")
            self.metrics.client_rejected()
            return False
        self.sessions.add(session)
        self.count("accepted")
        self.metrics.client_accepted()
        return True

    def startup_begin(self, session: Session) -> str | None:
        """Count an admitted session as starting, or say which limit it is over
        ("total" / "per_ip"); such a session gets 53300 at its startup packet, before
        an upstream connection is opened. Unauthenticated clients that never finish
        would otherwise each hold a server backend for startup_timeout."""
        limits = self.settings.limits
        host = session.peer_host
        if self.starting >= limits.max_startups:
            reason = "total"
        elif self.starting_by_host.get(host, 0) >= limits.max_startups_per_ip:
            reason = "per_ip"
        else:
            self.starting += 1
            self.starting_by_host[host] = self.starting_by_host.get(host, 0) + 1
            session.starting = True
            self.metrics.startup_began()
            return None
        self.count(f"startups_rejected_{reason}")
        self.metrics.startup_rejected(reason)
        return reason

    def startup_end(self, session: Session) -> None:
        """The session authenticated, or ended: it no longer counts as starting."""
        if not session.starting:
            return
        session.starting = False
        self.starting -= 1
        host = session.peer_host
        left = self.starting_by_host.get(host, 0) - 1
        if left > 0:
            self.starting_by_host[host] = left
        else:
            self.starting_by_host.pop(host, None)
        self.metrics.startup_ended()

    def release(self, session: Session, was: State) -> None:
        self.startup_end(session)
        if session in self.sessions:
            self.sessions.discard(session)
            self.count("closed")
            self.metrics.client_closed(session.close_reason)
        if session.tracker is not None:
            observability.flush_crypto(session.tracker, self.metrics.crypto_done)
            # Reveals cut short by the end of the session (a portal never finished, a
            # client gone after some rows): their end records, before the disconnect.
            session.tracker.end_reveals("disconnect")
        if session.ready_once and self.audit is not None:
            try:
                self.audit.disconnect(
                    session.id, observability.session_role(session), session.peer,
                    observability.application_name(session), session.close_reason,
                )
            except OSError as exc:  # counted; the next record written follows a gap
                log.error("audit: cannot write a disconnect record: %s", exc.strerror)
        if session.backend_key is not None and self.keys.get(session.backend_key) is session:
            del self.keys[session.backend_key]

    def register_key(self, key: tuple[int, int], session: Session) -> None:
        self.keys[key] = session

    def on_session_ready(self, session: Session) -> None:
        session.ready_once = True
        if self.audit is not None:
            try:
                self.audit.connect(session.id, session.user, session.peer,
                                   observability.application_name(session))
            except OSError as exc:  # counted; reveals are what audit.on_failure guards
                log.error("audit: cannot write a connect record: %s", exc.strerror)
            if session.tracker is not None:
                session.tracker.on_statement = observability.StatementAuditor(
                    self.audit, self.audit_facts, session,
                    observability.audit_on_failure(self.settings),
                )

    def count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    def on_protocol_error(self, sqlstate: str) -> None:
        self.count("protocol_errors")
        self.metrics.protocol_error(sqlstate)

    def on_auth_failure(self, sqlstate: str, session: Session | None = None) -> None:
        """The server refused the client at startup (FATAL during authentication)."""
        self.count("auth_failures")
        self.metrics.auth_failed(sqlstate)
        if session is not None:
            session.close_reason = "auth_failure"
            if self.audit is not None:
                try:
                    self.audit.auth_failure(session.id, session.user, session.peer,
                                            observability.application_name(session), sqlstate)
                except OSError as exc:
                    log.error("audit: cannot write an auth_failure record: %s", exc.strerror)

    def on_upstream_connect_failed(self, exc: BaseException) -> None:
        self.count("upstream_connect_failures")
        self.metrics.upstream_connect_failed()

    def on_upstream_connected(self, seconds: float) -> None:
        self.metrics.upstream_connected(seconds)

    def on_upstream_closed(self) -> None:
        self.metrics.upstream_closed()

    # ------------------------------------------------------------------ cancel

    def forward_cancel(self, pid: int, secret: int) -> None:
        """Route a client's CancelRequest to the upstream that owns the key.

        The key is the server's own, so the server is the authority on it. A key this
        process does not know is dropped silently (as PostgreSQL does), except with
        several workers, where another worker may own it: then the server decides.
        """
        if (pid, secret) in self.keys or self.worker_count > 1:
            self.send_cancel(pid, secret)

    def send_cancel(self, pid: int, secret: int) -> None:
        self.spawn(self._send_cancel(pid, secret))

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a background task and keep a reference to it until it ends: the event loop
        holds only weak references, so an unreferenced task can vanish mid-flight."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_cancel(self, pid: int, secret: int) -> None:
        up = self.settings.upstream
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(up.host, up.port), up.connect_timeout
            )
            if self.upstream_ssl is not None:
                writer.write(m.encode_ssl_request())
                answer = await asyncio.wait_for(reader.readexactly(1), up.connect_timeout)
                if answer != b"S":
                    writer.close()
                    return
                await writer.start_tls(
                    self.upstream_ssl, server_hostname=up.tls_server_name or up.host
                )
            writer.write(m.encode_cancel(pid, secret))
            await writer.drain()
            # The server closes after reading the request; wait for that so the cancel
            # has been delivered before we return.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(reader.read(1), up.connect_timeout)
            writer.close()
        except (TimeoutError, OSError, ssl.SSLError, asyncio.IncompleteReadError) as exc:
            log.warning("could not forward cancel request: %s", exc.__class__.__name__)

    # ------------------------------------------------------------------ janitor

    async def _janitor_loop(self) -> None:
        """Once a second: idle limits. One periodic task, not a timer per session."""
        while True:
            await asyncio.sleep(1.0)
            limits = self.settings.limits
            if not (limits.idle_timeout or limits.idle_in_transaction_timeout):
                continue
            # Session.last_active is a perf_counter stamp: taken when the session last
            # had nothing outstanding (its last ReadyForQuery, or a client read that
            # started no request). Sessions with requests outstanding are never idle.
            now = time.perf_counter()
            for s in list(self.sessions):
                if s.state is not State.READY or s.outstanding > 0:
                    continue
                idle = now - s.last_active
                if s.txn_status == b"I":
                    if limits.idle_timeout and idle > limits.idle_timeout:
                        s.expire("57P05", "terminating connection due to idle-session timeout")
                elif limits.idle_in_transaction_timeout and idle > (
                    limits.idle_in_transaction_timeout
                ):
                    s.expire(
                        "25P03",
                        "terminating connection due to idle-in-transaction timeout",
                    )


def make_listen_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, type_, proto, _, addr = infos[0]
    sock = socket.socket(family, type_, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(addr)
    sock.listen(4096)
    sock.setblocking(False)
    return sock


# ---------------------------------------------------------------------- process entry


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def serve(settings: Settings, config_path: str | None) -> int:
    """Run the proxy until SIGTERM/SIGINT. Returns the process exit code."""
    if settings.workers > 1:
        return _serve_workers(settings, config_path)
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(_serve_one(settings, config_path, None, 1))
    finally:
        loop.close()


async def _serve_one(
    settings: Settings, config_path: str | None, sock: socket.socket | None, workers: int,
    worker_index: int = 0,
) -> int:
    server = Server(settings, worker_count=workers, worker_index=worker_index)
    # Everything loaded so far (modules, pglast, keys, policy) lives for the whole run:
    # move it out of the collector's sight, and collect young objects less often, so the
    # relay does not pay for rescanning them (~2% of CPU under pgbench). Done before
    # listening: once the port is open, signals must find their handlers installed.
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    if config_path:
        loop.add_signal_handler(signal.SIGHUP, server.reload, config_path)
    await server.start(sock)
    log.info(
        "strongroom listening on %s:%s, upstream %s:%s (pid %s)",
        settings.listen.host,
        server.port,
        settings.upstream.host,
        settings.upstream.port,
        os.getpid(),
    )
    await stop.wait()
    log.info("shutting down: no new connections, %d sessions draining", len(server.sessions))
    await server.shutdown()
    return 0


def _serve_workers(settings: Settings, config_path: str | None) -> int:
    """Fork workers that each bind the port with SO_REUSEPORT; relay signals; reap them.

    Each worker has its own listening socket so the kernel balances connections across
    them by hash; one inherited socket would let whichever worker wakes first take most.
    """
    children: list[int] = []
    for index in range(settings.workers):
        pid = os.fork()
        if pid == 0:  # child
            code = 1
            try:
                sock = make_listen_socket(settings.listen.host, settings.listen.port, True)
                loop = new_event_loop()
                asyncio.set_event_loop(loop)
                code = loop.run_until_complete(
                    _serve_one(settings, config_path, sock, settings.workers, index)
                )
            finally:
                os._exit(code)
        children.append(pid)

    def relay(signum: int, _frame: object) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, relay)
    status = 0
    for child in children:
        while True:
            try:
                _, st = os.waitpid(child, 0)
                break
            except InterruptedError:
                continue
            except ChildProcessError:
                st = 0
                break
        status = status or os.waitstatus_to_exitcode(st)
    sys.stdout.flush()
    return 0 if status in (0, -signal.SIGTERM, -signal.SIGINT) else 1
