"""A READY session without sockets, for the in-process micro-benchmarks
(`session_hotpath.py`, `reveal_bench.py`).

`proxy` is imported only when a session is built, so a caller can first put another
checkout on `sys.path` (`reveal_bench.py --root`) or pass a `session` module loaded from
another revision (`session_hotpath.py --baseline`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import ModuleType
from typing import Any


class NullTransport:
    """Counts what the session writes and drops it."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0

    def write(self, data: bytes) -> None:
        self.n += len(data)

    def is_closing(self) -> bool:
        return False


class _Server:
    """What a Session needs of proxy.server.Server: default settings, gate, metrics."""

    def __init__(self) -> None:
        from proxy import observability
        from proxy.gate import Gate
        from proxy.settings import Settings

        self.settings = Settings()
        self.gate = Gate(self.settings)
        self.metrics, self.audit, self.audit_facts = observability.build(self.settings, self.gate)
        self.query_kinds = observability.QueryKinds(self.metrics, self.gate)

    def next_session_id(self) -> int:
        return 1


def ready_session(session_module: ModuleType) -> Any:
    """A `session_module.Session` in state READY with null transports on both sides."""
    s = session_module.Session(_Server())
    s.transport = NullTransport()
    up = session_module.Upstream(s)
    up.transport = NullTransport()
    s.upstream = up
    s.state = session_module.State.READY
    return s


def best_of(once: Callable[[], None], rounds: int, warmup: int = 3) -> float:
    """Seconds of the fastest of `rounds` calls after `warmup` (the minimum: other load
    on the machine only ever adds time)."""
    for _ in range(warmup):
        once()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        once()
        best = min(best, time.perf_counter() - t0)
    return best
