#!/usr/bin/env python3
"""Strongroom benchmark: pgbench -S against PostgreSQL, PgBouncer and Strongroom in one run.

Why one script that builds everything itself: on a 2-core machine TPS drifts by ±10 %
from one minute to the next (ARCHITECTURE.md §8), so the only honest comparison is
direct vs PgBouncer vs Strongroom measured back to back against the *same* throwaway
cluster, with ratios computed inside that one run. Nothing here touches a system
PostgreSQL or PgBouncer: every process is started from a temp dir and stopped on exit,
Ctrl-C and SIGTERM included.

Usage (from the repo root):

    .venv/bin/python bench/run.py [--seconds 10] [--clients 8] [--workers 1,2]
    .venv/bin/python bench/run.py --quick              # 3 s runs, smoke test
    .venv/bin/python bench/run.py --profile /tmp/prof  # also py-spy the proxy

See bench/README.md for what the numbers mean.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a plain script: make `proxy` importable
    sys.path.insert(0, str(ROOT))

from proxy import devcluster  # noqa: E402

USER = "bench"
PASSWORD = "bench-secret"
DB = "bench"
MODES = ("simple", "extended", "prepared")
HOST = "127.0.0.1"


def log(msg: str) -> None:
    """Progress goes to stderr so stdout holds only the markdown report."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def loadavg() -> str:
    """The machine is shared with other jobs; the report says how busy it was."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


# --------------------------------------------------------------------------- processes


def children_of(pid: int) -> list[int]:
    """All descendants of pid, found via /proc/<pid>/task/*/children.

    With `workers: N` Strongroom's main process only forks and reaps: the sessions live
    in the children, so memory has to be summed over the whole tree.
    """
    out: list[int] = []
    stack = [pid]
    while stack:
        p = stack.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = (task / "children").read_text().split()
            except OSError:
                continue
            for k in kids:
                out.append(int(k))
                stack.append(int(k))
    return out


def rss_kib(pids: list[int]) -> int:
    """Sum of VmRSS (KiB) over pids; processes that vanished count as 0."""
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
        except OSError:
            pass
    return total


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time consumed so far by pids (from /proc/<pid>/stat).

    CPU per transaction is the number that survives a busy machine: TPS drops when other
    jobs steal the cores, but what the proxy spends on each transaction barely moves.
    """
    return sum(cpu_split(pids))


def cpu_split(pids: list[int]) -> tuple[float, float]:
    """(user, system) CPU seconds consumed so far by pids. User time is the proxy's own
    Python and event-loop work; system time is mostly the socket reads and writes, which
    PgBouncer pays alike, so a change to the relay shows in the first."""
    tick = os.sysconf("SC_CLK_TCK")
    user = system = 0
    for p in pids:
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        user += int(fields[11])  # utime (field 14)
        system += int(fields[12])  # stime (field 15)
    return user / tick, system / tick


def stop_process(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM the process and its descendants, SIGKILL whatever outlives the grace.

    Descendants are collected *before* signalling: once the parent exits, its orphaned
    workers are reparented and could no longer be found from its pid.
    """
    if proc.poll() is not None:
        return
    tree = children_of(proc.pid)
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def wait_listening(proc: subprocess.Popen[bytes], port: int, logfile: Path, what: str) -> None:
    """Wait for the port, failing fast (with the log) if the process died instead."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited early:\n{logfile.read_text(errors='replace')}")
        try:
            devcluster.wait_port(HOST, port, timeout=0.2)
            return
        except devcluster.ClusterError:
            continue
    raise RuntimeError(f"{what} did not listen on {port}:\n{logfile.read_text(errors='replace')}")


@dataclass
class Service:
    """Something pgbench can connect to: a name, a port and (for proxies) a process."""

    name: str
    port: int
    proc: subprocess.Popen[bytes] | None = None
    logfile: Path | None = None
    notes: list[str] = field(default_factory=list)

    def pids(self) -> list[int]:
        if self.proc is None:
            return []
        return [self.proc.pid, *children_of(self.proc.pid)]

    def alive(self) -> bool:
        return self.proc is None or self.proc.poll() is None


def start_pgbouncer(cluster: devcluster.Cluster, workdir: Path, pool_size: int) -> Service:
    """PgBouncer in session mode, SCRAM to clients and to the server.

    The userlist holds the plaintext password: that is the one auth_file form with which
    PgBouncer 1.18 can both verify client SCRAM and answer the server's SCRAM challenge.
    PgBouncer refuses to run as root, so it runs as `postgres` (Popen user=), and its
    directory is chowned to that user. pool_size covers the 1,000 idle clients too:
    session mode needs one server connection per client.
    """
    d = workdir / "pgbouncer"
    d.mkdir()
    port = devcluster.free_port()
    (d / "userlist.txt").write_text(f'"{USER}" "{PASSWORD}"\n')
    (d / "pgbouncer.ini").write_text(
        f"""[databases]
{DB} = host={HOST} port={cluster.port} dbname={DB}

[pgbouncer]
listen_addr = {HOST}
listen_port = {port}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {d}/userlist.txt
pool_mode = session
max_client_conn = {pool_size + 500}
default_pool_size = {pool_size}
max_db_connections = 0
client_tls_sslmode = disable
server_tls_sslmode = disable
ignore_startup_parameters = extra_float_digits,options
logfile = {d}/pgbouncer.log
pidfile = {d}/pgbouncer.pid
log_connections = 0
log_disconnections = 0
"""
    )
    for p in (d, *d.iterdir()):
        shutil.chown(p, "postgres", "postgres")
    exe = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    logfile = d / "stderr.log"
    as_postgres: dict[str, Any] = (
        {"user": "postgres", "group": "postgres", "extra_groups": []} if os.geteuid() == 0 else {}
    )
    with open(logfile, "wb") as out:
        proc = subprocess.Popen(
            [exe, str(d / "pgbouncer.ini")],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches only us; we stop it in order
            **as_postgres,
        )
    svc = Service("PgBouncer", port, proc, logfile)
    try:
        wait_listening(proc, port, logfile, "pgbouncer")
    except BaseException:
        stop_process(proc)
        raise
    ver = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    svc.notes.append(ver.strip())
    return svc


def start_strongroom(cluster: devcluster.Cluster, workdir: Path, workers: int,
                     source: Path = ROOT, label: str = "") -> Service:
    """Strongroom exactly as ops run it: `python -m proxy.cli serve --config FILE`.

    log_level warning keeps per-connection info lines out of the hot path (and the log
    small with 1,000 idle clients); the metrics endpoint is off so two proxies (and
    other jobs on this machine) do not fight over its port. `source` is the tree the
    `proxy` package is imported from (the working tree, or a `--baseline` export).
    """
    d = workdir / f"strongroom-w{workers}{label.replace(' ', '-').replace('@', '')}"
    d.mkdir()
    port = devcluster.free_port()
    cfg = {
        "listen": {"host": HOST, "port": port},
        "upstream": {"host": HOST, "port": cluster.port},
        "limits": {"shutdown_grace": 2},
        "metrics": {"port": 0},
        "log_level": "warning",
        "workers": workers,
    }
    (d / "strongroom.yaml").write_text(yaml.safe_dump(cfg))
    logfile = d / "proxy.log"
    with open(logfile, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "serve", "--config", str(d / "strongroom.yaml")],
            cwd=str(source),  # `-m` puts the cwd first on sys.path
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    svc = Service(f"Strongroom w{workers}{label}", port, proc, logfile)
    try:
        wait_listening(proc, port, logfile, svc.name)
        if workers > 1:
            # Each worker binds its own SO_REUSEPORT socket; give them all time to do
            # so, or the first one would get every pgbench connection.
            deadline = time.monotonic() + 10
            while len(children_of(proc.pid)) < workers and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)
    except BaseException:
        stop_process(proc)
        raise
    return svc


PUMP = "Python pump (floor)"


def start_pump(cluster: devcluster.Cluster, workdir: Path) -> Service:
    """bench/pump.py: asyncio + uvloop forwarding bytes and nothing else. Its row is the
    floor under any proxy on the same event loop, measured in the same minutes."""
    port = devcluster.free_port()
    logfile = workdir / "pump.log"
    with open(logfile, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "pump.py"), str(port), HOST,
             str(cluster.port)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    svc = Service(PUMP, port, proc, logfile)
    try:
        wait_listening(proc, port, logfile, PUMP)
    except BaseException:
        stop_process(proc)
        raise
    return svc


# --------------------------------------------------------------------------- pgbench


def pg_env() -> dict[str, str]:
    return os.environ | {"PGPASSWORD": PASSWORD, "PGSSLMODE": "disable"}


def pgbench(port: int, mode: str, seconds: int, clients: int, threads: int
            ) -> tuple[float, int]:
    """One `pgbench -S` run; returns (TPS excluding connection time, transactions).

    Excluding connection time is deliberate: the comparison is per-statement relay cost,
    and session-mode proxies pay their connect/auth cost once per client.
    """
    cmd = [
        "pgbench", "-n", "-S", "-M", mode, "-c", str(clients), "-j", str(threads),
        "-T", str(seconds), "-h", HOST, "-p", str(port), "-U", USER, DB,
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, env=pg_env(), timeout=seconds + 120)
    found = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", res.stdout)
    if res.returncode != 0 or not found:
        raise RuntimeError(f"pgbench failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    failed = re.search(r"number of failed transactions: (\d+)", res.stdout)
    if failed and int(failed.group(1)):
        raise RuntimeError(f"pgbench reported failed transactions:\n{res.stdout}")
    done = re.search(r"number of transactions actually processed: (\d+)", res.stdout)
    return float(found.group(1)), int(done.group(1)) if done else 0


def prepare_cluster(scale: int, max_connections: int) -> devcluster.Cluster:
    """Throwaway cluster + a non-superuser role owning a pgbench database.

    A separate role (not the superuser) is what an application would use, and SCRAM on
    TCP is what every path (direct, PgBouncer, Strongroom) authenticates with.
    """
    cluster = devcluster.create(extra_conf={"max_connections": str(max_connections)})
    try:
        cluster.psql(f"CREATE ROLE {USER} LOGIN PASSWORD '{PASSWORD}'")
        cluster.psql(f"CREATE DATABASE {DB} OWNER {USER}")
        res = subprocess.run(
            ["pgbench", "-i", "-q", "-s", str(scale), "-h", HOST, "-p", str(cluster.port),
             "-U", USER, DB],
            capture_output=True, text=True, env=pg_env(),
        )
        if res.returncode != 0:
            raise RuntimeError(f"pgbench -i failed:\n{res.stderr}")
        cluster.psql("VACUUM ANALYZE", db=DB)
    except BaseException:
        cluster.destroy()
        raise
    return cluster


# --------------------------------------------------------------------------- idle clients


async def _hold_idle(port: int, n: int, measure: Callable[[], None]) -> None:
    """Open n authenticated connections, call measure() while they sit idle, close them.

    asyncpg in one event loop keeps the client side cheap (no thread or process per
    connection), so the load generator does not distort the machine it measures.
    """
    import asyncpg

    sem = asyncio.Semaphore(50)  # bounded so the proxy's startup timeout is never hit

    async def one() -> asyncpg.Connection:
        async with sem:
            return await asyncpg.connect(
                host=HOST, port=port, user=USER, password=PASSWORD, database=DB,
                ssl=False, timeout=60,
            )

    results = await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
    conns = [r for r in results if isinstance(r, asyncpg.Connection)]
    try:
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise RuntimeError(f"{len(errors)} of {n} idle connections failed: {errors[0]!r}")
        # Prove the sessions are live end to end, not just accepted.
        for c in (conns[0], conns[-1]):
            if await c.fetchval("SELECT 1") != 1:
                raise RuntimeError("idle session did not answer")
        await asyncio.sleep(1.0)  # let buffers settle before sampling
        measure()
    finally:
        await asyncio.gather(*(c.close(timeout=10) for c in conns), return_exceptions=True)


def wait_backends(cluster: devcluster.Cluster, at_most: int, timeout: float = 30.0) -> None:
    """Backends exit asynchronously after their client leaves; wait so the next idle test
    does not trip max_connections."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = int(cluster.psql("SELECT count(*) FROM pg_stat_activity WHERE backend_type = "
                             "'client backend'").strip() or 0)
        if n <= at_most:
            return
        time.sleep(0.2)


def idle_rss(svc: Service, n: int) -> tuple[int, int, float]:
    """(RSS before KiB, RSS with n idle clients KiB, KiB per idle client) for svc's tree."""
    before = rss_kib(svc.pids())
    after = 0

    def measure() -> None:
        nonlocal after
        after = rss_kib(svc.pids())

    asyncio.run(_hold_idle(svc.port, n, measure))
    return before, after, (after - before) / n


# --------------------------------------------------------------------------- profiling


def profile(svc: Service, mode: str, seconds: int, clients: int, threads: int,
            outdir: Path) -> tuple[float, Path]:
    """py-spy the serving process while pgbench runs; returns (TPS under profiling, raw file).

    --native adds C frames (uvloop, libuv, the kernel write path as seen from user space)
    so the cost of transport.write is visible, not just Python lines. The TPS under the
    profiler is lower than in the table and is reported only to show the load was real.
    """
    pyspy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    if pyspy is None:
        raise RuntimeError("py-spy not found: .venv/bin/pip install py-spy")
    target = svc.pids()[-1] if len(svc.pids()) > 1 else svc.pids()[0]
    raw = outdir / f"{svc.name.replace(' ', '-')}-{mode}.txt"
    spy = subprocess.Popen(
        [pyspy, "record", "--native", "-r", "100", "-f", "raw",
         "-d", str(seconds + 1), "-p", str(target), "-o", str(raw)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )
    try:
        time.sleep(0.5)
        tps, _ = pgbench(svc.port, mode, seconds, clients, threads)
        _, err = spy.communicate(timeout=60)
    finally:
        if spy.poll() is None:
            spy.kill()
            spy.wait()
    if not raw.exists():
        raise RuntimeError(f"py-spy wrote nothing: {err.decode(errors='replace')}")
    return tps, raw


_LINE_NO = re.compile(r":\d+\)$")


def summarize_profile(raw: Path, top: int) -> str:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks.

    Line numbers are stripped so one function's samples add up; inclusive time counts a
    function once per stack so recursion does not inflate it. Idle samples (the loop
    waiting in epoll) are kept: their share is the headroom the process had.
    """
    self_n: collections.Counter[str] = collections.Counter()
    incl_n: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_LINE_NO.sub(")", f) for f in stack.split(";")]
        frames = [f.replace(str(ROOT) + "/", "") for f in frames]
        self_n[frames[-1]] += n
        for f in set(frames):
            incl_n[f] += n
    if not total:
        return "(no samples)\n"
    rows = ["| self % | incl % | function |", "|---:|---:|---|"]
    names = [f for f, _ in self_n.most_common(top)]
    for f in names:
        rows.append(f"| {100 * self_n[f] / total:.1f} | {100 * incl_n[f] / total:.1f} | `{f}` |")
    rows.append("")
    rows.append("Top inclusive (Python frames under the proxy):")
    rows.append("")
    rows.append("| incl % | function |")
    rows.append("|---:|---|")
    shown = 0
    for f, n in incl_n.most_common():
        if "proxy/" in f or "uvloop" in f or "asyncio" in f:
            rows.append(f"| {100 * n / total:.1f} | `{f}` |")
            shown += 1
            if shown >= top:
                break
    return "\n".join(rows) + f"\n\n({total} samples)\n"


# --------------------------------------------------------------------------- report


def table(results: dict[tuple[str, str], float],
          cpu_us: dict[tuple[str, str], tuple[float, float]],
          targets: list[str], modes: list[str]) -> str:
    """Markdown: one row per (mode, target), ratios against direct and PgBouncer, and the
    proxy's own CPU time per transaction (all its processes, user + system, and split)."""
    rows = [
        "| mode | target | TPS | vs direct | vs PgBouncer | proxy CPU us/txn | user / sys |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for mode in modes:
        direct = results.get((mode, "direct"))
        bouncer = results.get((mode, "PgBouncer"))
        for t in targets:
            tps = results.get((mode, t))
            if tps is None:
                continue
            vd = f"{tps / direct:.2f}" if direct else "-"
            vb = f"{tps / bouncer:.2f}" if bouncer else "-"
            cpu = cpu_us.get((mode, t))
            cu = f"{sum(cpu):.1f}" if cpu is not None else "-"
            split = f"{cpu[0]:.1f} / {cpu[1]:.1f}" if cpu is not None else "-"
            rows.append(f"| {mode} | {t} | {tps:,.0f} | {vd} | {vb} | {cu} | {split} |")
    return "\n".join(rows)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--seconds", type=int, default=None, help="pgbench -T per run (default 10)")
    p.add_argument("--clients", type=int, default=8, help="pgbench -c (default 8)")
    p.add_argument("--threads", type=int, default=2, help="pgbench -j (default 2)")
    p.add_argument("--workers", default="1,2", help="Strongroom worker counts, one row each")
    p.add_argument("--modes", default=",".join(MODES), help="pgbench -M modes")
    p.add_argument("--scale", type=int, default=None, help="pgbench -i -s (default 10)")
    p.add_argument("--idle-clients", type=int, default=None,
                   help="idle connections for the RSS test (default 1000; 0 = skip)")
    p.add_argument("--no-pgbouncer", action="store_true", help="skip PgBouncer")
    p.add_argument("--no-pump", action="store_true",
                   help="skip the Python byte pump (bench/pump.py), the floor row")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 3 s per pgbench, scale 1, 200 idle clients")
    p.add_argument("--profile", type=Path, default=None, metavar="DIR",
                   help="also py-spy Strongroom (first --workers value) under simple and "
                        "prepared, writing raw stacks to DIR")
    p.add_argument("--baseline", metavar="REV", default=None,
                   help="add a Strongroom row (first --workers value) running the code of "
                        "git revision REV, e.g. HEAD: before/after in one run")
    args = p.parse_args(argv)
    args.seconds = args.seconds or (3 if args.quick else 10)
    args.scale = args.scale or (1 if args.quick else 10)
    if args.idle_clients is None:
        args.idle_clients = 200 if args.quick else 1000
    args.worker_counts = [int(w) for w in args.workers.split(",") if w.strip()]
    args.mode_list = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = set(args.mode_list) - set(MODES)
    if bad:
        p.error(f"unknown mode(s): {', '.join(sorted(bad))}")
    return args


def _raise_interrupt(signum: int, _frame: FrameType | None) -> None:
    """SIGTERM/SIGHUP take the same clean-up path as Ctrl-C."""
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def environment(args: argparse.Namespace) -> Iterator[tuple[devcluster.Cluster, list[Service]]]:
    """Cluster, PgBouncer and Strongrooms, torn down in reverse order whatever happens."""
    with contextlib.ExitStack() as stack:
        workdir = Path(tempfile.mkdtemp(prefix="strongroom-bench-"))
        os.chmod(workdir, 0o755)  # pgbouncer (as postgres) must reach its subdirectory
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        log(f"initdb + pgbench -i -s {args.scale} (load {loadavg()})")
        max_conn = max(300, args.idle_clients + 200)
        cluster = prepare_cluster(args.scale, max_conn)
        stack.callback(cluster.destroy)
        services = [devcluster_service(cluster)]
        if not args.no_pgbouncer:
            bouncer = start_pgbouncer(cluster, workdir, max(args.clients, args.idle_clients) + 20)
            stack.callback(stop_process, bouncer.proc)
            services.append(bouncer)
        if not args.no_pump:
            pump = start_pump(cluster, workdir)
            stack.callback(stop_process, pump.proc)
            services.append(pump)
        for w in args.worker_counts:
            sr = start_strongroom(cluster, workdir, w)
            stack.callback(stop_process, sr.proc)
            services.append(sr)
        if args.baseline:
            tree = export_revision(args.baseline, workdir / "baseline")
            sr = start_strongroom(cluster, workdir, args.worker_counts[0], tree,
                                  f" @{args.baseline}")
            stack.callback(stop_process, sr.proc)
            services.append(sr)
        yield cluster, services


def export_revision(rev: str, dest: Path) -> Path:
    """`git archive REV` into dest: the baseline Strongroom imports its `proxy` from there."""
    dest.mkdir()
    archive = subprocess.run(["git", "archive", "--format=tar", rev], cwd=ROOT, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def devcluster_service(cluster: devcluster.Cluster) -> Service:
    """The baseline row: pgbench straight to PostgreSQL, no process of ours to measure."""
    return Service("direct", cluster.port)


def run(args: argparse.Namespace) -> int:
    started = time.time()
    load_start = loadavg()
    with environment(args) as (cluster, services):
        names = [s.name for s in services]
        # Warm the OS page cache and PostgreSQL's buffers so the first row is not cold.
        log("warm-up (2 s direct)")
        pgbench(cluster.port, "simple", 2, args.clients, args.threads)
        results: dict[tuple[str, str], float] = {}
        cpu_us: dict[tuple[str, str], tuple[float, float]] = {}
        for mode in args.mode_list:
            for svc in services:
                if not svc.alive():
                    raise RuntimeError(f"{svc.name} died; log: {svc.logfile}")
                pids = svc.pids()
                u0, s0 = cpu_split(pids)
                tps, txns = pgbench(svc.port, mode, args.seconds, args.clients, args.threads)
                results[(mode, svc.name)] = tps
                if pids and txns:
                    u1, s1 = cpu_split(pids)
                    cpu_us[(mode, svc.name)] = ((u1 - u0) * 1e6 / txns, (s1 - s0) * 1e6 / txns)
                log(f"{mode:9} {svc.name:22} {tps:10,.0f} tps  (load {loadavg()})")
        load_end = loadavg()

        idle_rows: list[str] = []
        if args.idle_clients:
            # Strongrooms first: PgBouncer keeps its server connections pooled after the
            # clients leave, which would eat into max_connections for a later test.
            order = [s for s in services
                     if s.proc is not None and s.name not in ("PgBouncer", PUMP)]
            order += [s for s in services if s.name == "PgBouncer"]
            for svc in order:
                wait_backends(cluster, args.clients + 5)
                log(f"{args.idle_clients} idle clients on {svc.name}")
                before, after, per = idle_rss(svc, args.idle_clients)
                idle_rows.append(
                    f"| {svc.name} | {len(svc.pids())} | {before:,} | {after:,} | {per:.1f} |"
                )

        prof_text = ""
        if args.profile is not None:
            args.profile.mkdir(parents=True, exist_ok=True)
            svc = next(s for s in services if s.name.startswith("Strongroom"))
            for mode in ("simple", "prepared"):
                wait_backends(cluster, args.clients + 5)
                log(f"profiling {svc.name} under -M {mode}")
                tps, raw = profile(svc, mode, args.seconds, args.clients, args.threads,
                                   args.profile)
                prof_text += (f"\n### py-spy: {svc.name}, pgbench -S -M {mode} "
                              f"({tps:,.0f} tps under the profiler; raw: {raw})\n\n")
                prof_text += summarize_profile(raw, 25)

    cpu = os.cpu_count()
    notes = "".join(f" {n}." for s in services for n in s.notes)
    print(f"## Strongroom benchmark ({time.strftime('%Y-%m-%d %H:%M', time.localtime(started))})")
    print()
    print(f"pgbench -S -c {args.clients} -j {args.threads} -T {args.seconds}, scale "
          f"{args.scale}, {cpu} CPUs, load average at start {load_start}, after the TPS "
          f"runs {load_end}.{notes} One run; compare only within it.")
    print()
    print(table(results, cpu_us, names, args.mode_list))
    if idle_rows:
        print()
        print(f"### RSS with {args.idle_clients} idle authenticated clients "
              "(VmRSS summed over the process tree)")
        print()
        print("| target | processes | RSS before KiB | RSS idle KiB | KiB per idle client |")
        print("|---|---:|---:|---:|---:|")
        print("\n".join(idle_rows))
    if prof_text:
        print(prof_text)
    return 0


def run_cleanly(body: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a benchmark so that Ctrl-C, SIGTERM and SIGHUP all stop what it started.

    A shell starts background jobs with SIGINT ignored; restore Ctrl-C semantics so
    `kill -INT` cleans up the same way from scripts and CI. Shared by every bench script.
    """
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)
    try:
        return body(args)
    except KeyboardInterrupt:
        log("interrupted; everything started was stopped")
        return 130


def main(argv: list[str] | None = None) -> int:
    return run_cleanly(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
