"""Micro benchmark of the session relay per transaction, in process (prints numbers only).

    .venv/bin/python bench/session_hotpath.py [--n 200000] [--baseline REV]

One "transaction" is what a simple-protocol client does per statement: a Query message in
(`SELECT 1`), the server's RowDescription + DataRow + CommandComplete + ReadyForQuery
out, each as one read, through `Session.data_received` / `Session.server_data` with
in-memory transports and the real Gate (analysis cache hit) and Metrics. With
`--baseline REV` the same loop also runs against `proxy/session.py` as of git revision
REV (e.g. HEAD before the observability wiring) and the difference is printed.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy import observability  # noqa: E402
from proxy.gate import Gate  # noqa: E402
from proxy.settings import Settings  # noqa: E402


class _Transport:
    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0

    def write(self, data: bytes) -> None:
        self.n += len(data)

    def is_closing(self) -> bool:
        return False


class _Server:
    def __init__(self) -> None:
        self.settings = Settings()
        self.gate = Gate(self.settings)
        self.metrics, self.audit, self.audit_facts = observability.build(self.settings, self.gate)
        self.query_kinds = observability.QueryKinds(self.metrics, self.gate)

    def next_session_id(self) -> int:
        return 1


def _msg(kind: bytes, body: bytes) -> bytes:
    return kind + (len(body) + 4).to_bytes(4, "big") + body


QUERY = _msg(b"Q", b"SELECT 1\0")
REPLY = (
    _msg(b"T", b"\0\1?column?\0" + b"\0" * 6 + (23).to_bytes(4, "big")
         + b"\0\4\xff\xff\xff\xff\0\0")
    + _msg(b"D", b"\0\1\0\0\0\1" + b"1")
    + _msg(b"C", b"SELECT 1\0")
    + _msg(b"Z", b"I")
)


def _session(mod: ModuleType) -> Any:
    server = _Server()
    s = mod.Session(server)
    s.transport = _Transport()
    up = mod.Upstream(s)
    up.transport = _Transport()
    s.upstream = up
    s.state = mod.State.READY
    return s


def run(mod: ModuleType, n: int, rounds: int = 5) -> float:
    """Best-of-`rounds` microseconds per transaction (the minimum: other load on the
    machine only ever adds time)."""
    s = _session(mod)
    client, server = s.data_received, s.server_data
    for _ in range(1000):
        client(QUERY)
        server(REPLY)
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            client(QUERY)
            server(REPLY)
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best


def load_revision(rev: str) -> ModuleType:
    text = subprocess.run(["git", "show", f"{rev}:proxy/session.py"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "session_baseline.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("session_baseline", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--baseline", help="git revision of proxy/session.py to compare with")
    args = ap.parse_args()
    from proxy import session

    if not args.baseline:
        print(f"session.py (working tree): {run(session, args.n):.3f} us/transaction")
        return
    baseline = load_revision(args.baseline)
    now = base = float("inf")
    for _ in range(20):  # interleaved short runs: load and frequency drift hit both alike
        base = min(base, run(baseline, args.n // 20, 3))
        now = min(now, run(session, args.n // 20, 3))
    print(f"session.py (working tree): {now:.3f} us/transaction")
    if True:
        print(f"session.py ({args.baseline}):      {base:.3f} us/transaction")
        print(f"added: {now - base:+.3f} us/transaction ({(now / base - 1) * 100:+.1f}%)")


if __name__ == "__main__":
    main()
