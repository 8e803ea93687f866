#!/usr/bin/env python3
"""The floor of any asyncio proxy: a TCP byte pump that looks at nothing (bench only).

    python bench/pump.py LISTEN_PORT UPSTREAM_HOST UPSTREAM_PORT

Each accepted connection gets its own upstream connection and every read is written
to the other side unchanged: no framing, no analysis, no state. It is what a Python
proxy on asyncio + uvloop costs before it does any work of its own, so `bench/run.py`
runs pgbench through it in the same run as PgBouncer and Strongroom. If this pump is
already slower than PgBouncer, no proxy built on the same loop can be faster.

Writes are not flow-controlled (pgbench -S never fills a socket buffer); reading from a
side stops when the other side's transport is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys


class _Half(asyncio.Protocol):
    """One side of a relayed connection; `peer` is the other side's transport."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: asyncio.Transport | None = None
        self.pending: list[bytes] = []  # client bytes that came before upstream connected

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None:
            self.pending.append(data)
        else:
            peer.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None:
            self.peer.close()


async def _serve(listen_port: int, host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    connecting: set[asyncio.Task[None]] = set()  # strong references until each is done

    def client_side() -> _Half:
        client = _Half()

        async def connect() -> None:
            try:
                _, upstream = await loop.create_connection(_Half, host, port)
            except OSError:
                if client.transport is not None:
                    client.transport.close()
                return
            assert client.transport is not None and upstream.transport is not None
            upstream.peer = client.transport
            for chunk in client.pending:
                upstream.transport.write(chunk)
            client.pending.clear()
            client.peer = upstream.transport
            if client.transport.is_closing():
                upstream.transport.close()

        task = loop.create_task(connect())
        connecting.add(task)
        task.add_done_callback(connecting.discard)
        return client

    server = await loop.create_server(client_side, "127.0.0.1", listen_port, backlog=2048)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    listen_port, host, port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(_serve(listen_port, host, port))


if __name__ == "__main__":
    main()
