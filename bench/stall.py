#!/usr/bin/env python3
"""How long one huge statement stalls *other* sessions of the same proxy process.

A client sends `SELECT count(*) FROM t WHERE id IN (<N integers>)` (400,000 by default,
about 2.7 MB); meanwhile another client runs `SELECT 1` in a loop. The report is the
longest and the median `SELECT 1` latency during the huge statement, through the proxy,
against the same loop with no huge statement, in one run (a throwaway cluster and proxy
are started and stopped here). Before statements over 64 KiB were analysed on a worker
thread, the longest wait was the whole parse (about 2 s).

    .venv/bin/python bench/stall.py [--items 400000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy import devcluster
from tests.conftest import APP_DB, APP_PASSWORD, APP_USER, ProxyProcess


def small_loop(dsn: str, stop: threading.Event, out: list[float]) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        while not stop.is_set():
            started = time.perf_counter()
            conn.execute("SELECT 1").fetchone()
            out.append(time.perf_counter() - started)


def measure(dsn: str, big: str | None, seconds: float) -> list[float]:
    stop = threading.Event()
    lat: list[float] = []
    t = threading.Thread(target=small_loop, args=(dsn, stop, lat))
    t.start()
    time.sleep(0.3)
    lat.clear()
    if big is None:
        time.sleep(seconds)
    else:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(big).fetchone()
    stop.set()
    t.join()
    return lat


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=400_000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    cluster = devcluster.create()
    proxy = None
    try:
        cluster.psql(f"CREATE ROLE {APP_USER} LOGIN PASSWORD '{APP_PASSWORD}'")
        cluster.psql(f"CREATE DATABASE {APP_DB} OWNER {APP_USER}")
        cluster.psql(f"SET ROLE {APP_USER}; CREATE TABLE t (id int); "
                     "INSERT INTO t SELECT generate_series(1, 1000)", db=APP_DB)
        proxy = ProxyProcess(cluster, {"roles": {APP_USER: {"tables": {"public.t": ["select"]}}},
                                       "default": "deny"}).start()
        dsn = proxy.conninfo()
        print("| round | huge statement | SELECT 1 during it: max ms | median ms | "
              "quiet loop: max ms | median ms |\n|---|---:|---:|---:|---:|---:|")
        for r in range(args.rounds):
            # A distinct text each round: the analysis cache must not answer it.
            big = (f"SELECT count(*) FROM t WHERE id IN ({r}, "
                   + ",".join(str(i) for i in range(args.items)) + ")")
            t0 = time.perf_counter()
            during = measure(dsn, big, 0)
            took = time.perf_counter() - t0
            quiet = measure(dsn, None, took)
            print(f"| {r + 1} | {took * 1000:.0f} ms | {max(during) * 1000:.1f} | "
                  f"{statistics.median(during) * 1000:.2f} | {max(quiet) * 1000:.1f} | "
                  f"{statistics.median(quiet) * 1000:.2f} |")
    finally:
        if proxy is not None:
            proxy.stop()
        cluster.destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
