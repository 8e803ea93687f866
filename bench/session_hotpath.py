"""Micro benchmark of the session relay per transaction, in process (prints numbers only).

    .venv/bin/python bench/session_hotpath.py [--n 200000] [--baseline REV] [--tracking]
                                              [--shapes select1,simple,extended,prepared]
                                              [--root DIR]

One "transaction" is one client read in and one server read out, through
`Session.data_received` / `Session.server_data` with in-memory transports and the real
Gate and Metrics, in the shape of a `pgbench -S` transaction per protocol mode:

* `select1`: Query `SELECT 1` (same text every time) -> T, D, C, Z;
* `simple`: Query `SELECT abalance ... WHERE aid = N` with N different every time, as
  pgbench -M simple sends it (the analysis cache's exact-text level misses, the template
  level hits after a `pglast` normalise) -> T, D, C, Z;
* `extended`: Parse (unnamed) + Bind + Describe + Execute + Sync -> 1, 2, T, D, C, Z;
* `prepared`: Bind + Execute + Sync -> 2, D, C, Z.

With `--tracking` the session runs in tracking mode (as when `protect:` is configured):
a `Tracker` is attached whose protector plans every statement as `tracking.AS_SENT`
(touching nothing protected) and knows no protected column, like the real
`SessionProtector` for such statements (its real `drain_crypto_counts` runs over a few
idle protected columns). That is the floor every statement pays in tracking mode.
`--relay-too` prints the relay numbers next to them.

`--root DIR` imports `proxy` from another checkout (e.g. `git archive HEAD | tar -x -C
/tmp/base`): a before/after of several files under the same interpreter and load.

With `--baseline REV` the same loops also run against `proxy/session.py` as of git
revision REV (the rest of the tree is the working tree's) and the difference is printed.
In-process numbers are hot-cache numbers: under pgbench the same code costs 2-3x more per
transaction (bench/README.md); use them to compare versions, not as the proxy's cost.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from inprocess import ready_session  # noqa: E402


def _msg(kind: bytes, body: bytes) -> bytes:
    return kind + (len(body) + 4).to_bytes(4, "big") + body


QUERY = _msg(b"Q", b"SELECT 1\0")
_ROWDESC = _msg(b"T", b"\0\1?column?\0" + b"\0" * 6 + (23).to_bytes(4, "big")
                + b"\0\4\xff\xff\xff\xff\0\0")
_ROW = _msg(b"D", b"\0\1\0\0\0\1" + b"1")
_DONE = _msg(b"C", b"SELECT 1\0") + _msg(b"Z", b"I")
REPLY = _ROWDESC + _ROW + _DONE

_PGBENCH_SQL = b"SELECT abalance FROM pgbench_accounts WHERE aid = "
_BIND = _msg(b"B", b"\0\0\0\0\0\1\0\0\0\00512345\0\0")
_EXECUTE_SYNC = _msg(b"E", b"\0\0\0\0\0") + _msg(b"S", b"")
SHAPES: dict[str, tuple[list[bytes], bytes]] = {
    "select1": ([QUERY], REPLY),
    # 25,000 different literals, cycled: more than the analysis cache holds (10,000), so
    # the exact-text levels miss as under pgbench (aid is random in 1..100,000 x scale).
    "simple": ([_msg(b"Q", _PGBENCH_SQL + str(17 * i + 1).encode() + b";\0")
                for i in range(25_000)], REPLY),
    "extended": ([_msg(b"P", b"\0" + _PGBENCH_SQL + b"$1;\0\0\0") + _BIND
                  + _msg(b"D", b"P\0") + _EXECUTE_SYNC],
                 _msg(b"1", b"") + _msg(b"2", b"") + REPLY),
    "prepared": ([_msg(b"B", b"\0P0_1\0\0\0\0\1\0\0\0\00512345\0\0") + _EXECUTE_SYNC],
                 _msg(b"2", b"") + _ROW + _DONE),
}


def _tracking_protector(session: object) -> object:
    """A `SessionProtector` for a database whose protected columns this workload never
    touches: every statement is planned `AS_SENT`, no result column is protected, the
    catalog never changes. Only the crypto counter drain is the real one (over four idle
    columns), so that its per-request cost is measured too."""
    from proxy.encryption import RoleColumn, SessionProtector
    from proxy.tracking import AS_SENT

    class Protector(SessionProtector):
        def __init__(self) -> None:  # (none of the real setup: no catalog, no keys)
            self.session = session
            self._role = {}
            for i in range(4):
                rc = object.__new__(RoleColumn)
                rc.n_encrypt = rc.n_decrypt = rc.n_bidx = rc.n_failed = 0
                self._role[("public", "t", f"c{i}")] = rc
            self._generation = (object(), ("$user", "public"), 0)

        def plan_query(self, sql: str) -> object:
            return AS_SENT

        def column_at(self, table_oid: int, attnum: int) -> None:
            return None

        def generation(self) -> tuple[object, tuple[str, ...], int]:
            return self._generation

        def after_statement(self) -> bytes:
            return b""

    return Protector()


def run(mod: ModuleType, n: int, rounds: int = 5, shape: str = "select1",
        tracking: bool = False) -> float:
    """Best-of-`rounds` microseconds per transaction (the minimum: other load on the
    machine only ever adds time)."""
    s = ready_session(mod)
    if tracking:
        from proxy.tracking import Tracker

        s.tracker = Tracker(_tracking_protector(s))
    client, server = s.data_received, s.server_data
    requests, reply = SHAPES[shape]
    feed = itertools.cycle(requests)
    for _ in range(1000):
        client(next(feed))
        server(reply)
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            client(next(feed))
            server(reply)
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    assert s.outstanding == 0, "every request got its ReadyForQuery"
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
    ap.add_argument("--tracking", action="store_true",
                    help="tracking mode (protect: configured), statements touching nothing "
                    "protected")
    ap.add_argument("--relay-too", action="store_true",
                    help="with --tracking: also print the relay-mode numbers")
    ap.add_argument("--root", help="import proxy from this checkout instead")
    ap.add_argument("--shapes", default=",".join(SHAPES),
                    help=f"transaction shapes, from {', '.join(SHAPES)}")
    args = ap.parse_args()
    if args.root:
        sys.path.insert(0, str(Path(args.root).resolve()))
    from proxy import session

    shapes = [x.strip() for x in args.shapes.split(",") if x.strip()]
    unknown = set(shapes) - set(SHAPES)
    if unknown:
        ap.error(f"unknown shape(s): {', '.join(sorted(unknown))}")
    mode = "tracking" if args.tracking else "relay"
    if not args.baseline:
        for shape in shapes:
            if args.tracking and args.relay_too:
                print(f"{shape:9} relay:    {run(session, args.n, shape=shape):.3f} "
                      "us/transaction")
            print(f"{shape:9} {mode + ':':9} "
                  f"{run(session, args.n, shape=shape, tracking=args.tracking):.3f} "
                  "us/transaction")
        return
    baseline = load_revision(args.baseline)
    for shape in shapes:
        now = base = float("inf")
        for _ in range(20):  # interleaved short runs: load and frequency drift hit both alike
            base = min(base, run(baseline, args.n // 20, 3, shape, args.tracking))
            now = min(now, run(session, args.n // 20, 3, shape, args.tracking))
        print(f"{shape:9} session.py (working tree): {now:.3f} us/transaction")
        print(f"{shape:9} session.py ({args.baseline}):      {base:.3f} us/transaction")
        print(f"{shape:9} added: {now - base:+.3f} us/transaction "
              f"({(now / base - 1) * 100:+.1f}%)")


if __name__ == "__main__":
    main()
