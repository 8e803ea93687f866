#!/usr/bin/env python3
"""Access-policy benchmark (issue #5): pgbench -S through Strongroom, policy on vs off.

"Policy on" is a generated, realistic-sized policy: 50 roles (6 of them groups that
others inherit from) over 200 tables in 4 schemas, with wildcards, column denials,
`allow:` extras and function lists; the pgbench login role `bench` is one of the 50,
allowed to select the pgbench tables. "Policy off" is the same proxy configuration
without `roles:`/`default:`. The target is TPS(on) / TPS(off) >= 0.95.

Why it is built this way:

* The two proxies run side by side against one throwaway cluster, and the runs
  alternate off/on, on/off (`--rounds`, default 2) per protocol mode so a slow minute on
  this shared 2-core box hits both configurations; the report gives medians and every
  single run, and the proxy's CPU per transaction (the figure load disturbs least).
* Before measuring, the script proves the policy is really enforced (a table outside
  `bench`'s grants and a DELETE are refused with 42501 through the "on" proxy and
  allowed through the "off" one), so a silently ignored policy cannot pass as fast.
* The 200 tables exist (empty, created in one DO block): a policy naming absent tables
  would be legal, but real tables keep the schema list the proxy reads at session start
  as large as it would be in production.

Usage (from the repo root):

    .venv/bin/python bench/policy.py             # 10 s per run, 3 modes x 2 configs x 2
    .venv/bin/python bench/policy.py --quick     # 3 s runs, scale 1

Markdown report on stdout, progress on stderr. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for _p in (str(ROOT), str(BENCH)):  # run as a plain script: `proxy`, `run`, `encryption`
    if _p not in sys.path:
        sys.path.insert(0, _p)

import encryption  # noqa: E402  (start_proxy, precise cpu_seconds)
import run as harness  # noqa: E402  (bench/run.py: cluster, pgbench -S, process helpers)

from proxy import devcluster  # noqa: E402

USER, PASSWORD, DB, HOST = harness.USER, harness.PASSWORD, harness.DB, harness.HOST
log, loadavg = harness.log, harness.loadavg

SCHEMAS = ("crm", "ledger", "risk", "ops")
TABLES_PER_SCHEMA = 50
N_ROLES = 50
N_GROUPS = 6
KINDS = ("select", "insert", "update", "delete", "truncate", "copy_in", "copy_out",
         "references")
ALLOW = ("listen", "notify", "ddl", "call", "do")
PGBENCH_TABLES = ("pgbench_accounts", "pgbench_branches", "pgbench_tellers",
                  "pgbench_history")


def dummy_tables() -> list[str]:
    """The 200 generated `schema.tNNN` names (numbered across schemas)."""
    return [f"{s}.t{i * TABLES_PER_SCHEMA + j:03d}"
            for i, s in enumerate(SCHEMAS) for j in range(TABLES_PER_SCHEMA)]


def generate_policy(seed: int = 5) -> tuple[dict[str, Any], str]:
    """A 50-role, 200-table policy, and one dummy table `bench` may *not* read.

    Deterministic (seeded) so runs are comparable. Shapes mix what real files contain:
    per-table kind lists, `schema.*` wildcards, `inherits` from group roles, `deny`
    column views, `allow` extras and function lists. `bench` sits in the middle of the
    role map, inherits a group and has its own grants, so its lookups walk the same
    structures any other role's would.
    """
    rng = random.Random(seed)
    tables = dummy_tables()

    def grants(n: int) -> dict[str, list[str]]:
        return {t: sorted(rng.sample(KINDS, rng.randint(1, 4)))
                for t in rng.sample(tables, n)}

    roles: dict[str, Any] = {}
    groups = [f"grp_{i}" for i in range(N_GROUPS)]
    for g in groups:
        roles[g] = {"tables": grants(rng.randint(15, 30))}
    users = [f"user_{i:02d}" for i in range(N_ROLES - N_GROUPS - 1)]
    users.insert(len(users) // 2, USER)
    for name in users:
        role: dict[str, Any] = {"tables": grants(rng.randint(5, 25))}
        if rng.random() < 0.6:
            role["inherits"] = rng.sample(groups, rng.randint(1, 2))
        if rng.random() < 0.3:
            role["tables"][f"{rng.choice(SCHEMAS)}.*"] = ["select"]
        if rng.random() < 0.4:
            cols = rng.sample(tables, rng.randint(1, 3))
            role["columns"] = {f"{t}.note": "deny" for t in cols}
        if rng.random() < 0.3:
            role["allow"] = rng.sample(ALLOW, rng.randint(1, 2))
        if rng.random() < 0.2:
            role["functions"] = [f"{rng.choice(SCHEMAS)}.score"]
        roles[name] = role
    # pgbench -S reads pgbench_accounts; pgbench itself also runs
    # `select count(*) from pgbench_branches` at start-up to learn the scale.
    bench = roles[USER]
    bench["inherits"] = [groups[0]]
    bench.pop("functions", None)
    bench["tables"].update({f"public.{t}": ["select"] for t in PGBENCH_TABLES})
    for t in list(bench["tables"]):  # no wildcard: we need a table it cannot read
        if t.endswith(".*"):
            del bench["tables"][t]
    readable = set(bench["tables"]) | set(roles[groups[0]]["tables"])
    forbidden = next(t for t in tables if t not in readable)
    assert len(roles) == N_ROLES
    return {"roles": roles, "default": "deny"}, forbidden


def create_dummy_tables(cluster: devcluster.Cluster) -> None:
    """4 schemas x 50 empty tables owned by `bench`, in one round trip."""
    sql = [f"CREATE SCHEMA {s} AUTHORIZATION {USER};" for s in SCHEMAS]
    sql.append(f"SET ROLE {USER};")
    sql.append("DO $$ DECLARE t text; BEGIN FOREACH t IN ARRAY ARRAY["
               + ", ".join(f"'{t}'" for t in dummy_tables())
               + "] LOOP EXECUTE format('CREATE TABLE %s (id int PRIMARY KEY, note text)', t);"
               " END LOOP; END $$;")
    cluster.psql("\n".join(sql), db=DB)


def check_enforced(on: harness.Service, off: harness.Service, forbidden: str) -> None:
    """The policy must be live on `on` and absent on `off`; fail loudly otherwise."""
    import psycopg

    def outcome(port: int, sql: str) -> str:
        dsn = f"postgresql://{USER}:{PASSWORD}@{HOST}:{port}/{DB}?sslmode=disable"
        with psycopg.connect(dsn, autocommit=True) as conn:
            try:
                with conn.transaction(force_rollback=True):
                    conn.execute(sql)  # type: ignore[arg-type]  (bench-built SQL)
                return "ok"
            except psycopg.Error as exc:
                return exc.sqlstate or "error"

    probes = {
        "SELECT aid FROM pgbench_accounts WHERE aid = 1": ("ok", "ok"),
        f"SELECT * FROM {forbidden}": ("42501", "ok"),
        "DELETE FROM pgbench_history": ("42501", "ok"),
    }
    for sql, (want_on, want_off) in probes.items():
        got = (outcome(on.port, sql), outcome(off.port, sql))
        if got != (want_on, want_off):
            raise RuntimeError(f"policy not enforced as expected for {sql!r}: "
                               f"(on, off) = {got}, want {(want_on, want_off)}")


@dataclass
class Env:
    """The running pieces of one policy benchmark."""

    cluster: devcluster.Cluster
    on: harness.Service
    off: harness.Service
    forbidden: str
    roles_yaml_bytes: int = 0


@contextlib.contextmanager
def environment(args: argparse.Namespace) -> Iterator[Env]:
    """Cluster (pgbench -i), dummy tables and both proxies; torn down whatever happens."""
    with contextlib.ExitStack() as stack:
        workdir = Path(tempfile.mkdtemp(prefix="strongroom-bench-policy-"))
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        log(f"initdb + pgbench -i -s {args.scale} + 200 tables (load {loadavg()})")
        cluster = harness.prepare_cluster(args.scale, 300)
        stack.callback(cluster.destroy)
        create_dummy_tables(cluster)
        policy, forbidden = generate_policy()
        on = encryption.start_proxy(cluster, workdir, "policy on", None, policy)
        stack.callback(harness.stop_process, on.proc)
        off = encryption.start_proxy(cluster, workdir, "policy off", None)
        stack.callback(harness.stop_process, off.proc)
        check_enforced(on, off, forbidden)
        size = (workdir / "policy on" / "strongroom.yaml").stat().st_size
        yield Env(cluster, on, off, forbidden, size)


def measure(env: Env, args: argparse.Namespace) -> dict[tuple[str, str], list[tuple[float, float]]]:
    """(mode, config) -> [(TPS, proxy CPU us/txn)] over the rounds, alternating order."""
    out: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for mode in args.mode_list:
        for rnd in range(args.rounds):
            order = (env.off, env.on) if rnd % 2 == 0 else (env.on, env.off)
            for svc in order:
                if not svc.alive():
                    raise RuntimeError(f"{svc.name} died; log: {svc.logfile}")
                pids = svc.pids()
                cpu0 = encryption.cpu_seconds(pids)
                tps, txns = harness.pgbench(svc.port, mode, args.seconds, args.clients,
                                            args.threads)
                cpu = (encryption.cpu_seconds(pids) - cpu0) * 1e6 / max(txns, 1)
                out.setdefault((mode, svc.name), []).append((tps, cpu))
                log(f"{mode:9} round {rnd + 1} {svc.name:10} {tps:9,.0f} tps "
                    f"{cpu:6.1f} us/txn (load {loadavg()})")
    return out


def report(res: dict[tuple[str, str], list[tuple[float, float]]], modes: list[str]) -> str:
    """Markdown: medians per mode and configuration, the ratio, and every run."""
    rows = ["| mode | TPS policy off (median) | TPS policy on (median) | **on / off** | "
            "runs off | runs on | proxy CPU us/txn off | on |",
            "|---|---:|---:|---:|---|---|---:|---:|"]
    for mode in modes:
        off, on = res[(mode, "policy off")], res[(mode, "policy on")]
        t_off = statistics.median(t for t, _ in off)
        t_on = statistics.median(t for t, _ in on)
        c_off = statistics.median(c for _, c in off)
        c_on = statistics.median(c for _, c in on)
        rows.append(
            f"| {mode} | {t_off:,.0f} | {t_on:,.0f} | **{t_on / t_off:.2f}** | "
            f"{', '.join(f'{t:,.0f}' for t, _ in off)} | {', '.join(f'{t:,.0f}' for t, _ in on)} "
            f"| {c_off:.1f} | {c_on:.1f} |")
    return "\n".join(rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 3 s runs, scale 1")
    p.add_argument("--seconds", type=int, default=None, help="pgbench -T per run (default 10)")
    p.add_argument("--clients", type=int, default=8, help="pgbench -c (default 8)")
    p.add_argument("--threads", type=int, default=2, help="pgbench -j (default 2)")
    p.add_argument("--scale", type=int, default=None, help="pgbench -i -s (default 10)")
    p.add_argument("--rounds", type=int, default=2,
                   help="runs per configuration and mode, alternating order (default 2)")
    p.add_argument("--modes", default=",".join(harness.MODES), help="pgbench -M modes")
    args = p.parse_args(argv)
    args.seconds = args.seconds or (3 if args.quick else 10)
    args.scale = args.scale or (1 if args.quick else 10)
    args.mode_list = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = set(args.mode_list) - set(harness.MODES)
    if bad:
        p.error(f"unknown mode(s): {', '.join(sorted(bad))}")
    return args


def run(args: argparse.Namespace) -> int:
    started = time.time()
    load_start = loadavg()
    with environment(args) as env:
        log("warm-up (2 s direct, 2 s through each proxy)")
        harness.pgbench(env.cluster.port, "simple", 2, args.clients, args.threads)
        for svc in (env.off, env.on):
            harness.pgbench(svc.port, "simple", 2, args.clients, args.threads)
        res = measure(env, args)
        load_end = loadavg()
    print(f"## Strongroom policy benchmark "
          f"({time.strftime('%Y-%m-%d %H:%M', time.localtime(started))})")
    print()
    print(f"pgbench -S -c {args.clients} -j {args.threads} -T {args.seconds}, scale "
          f"{args.scale}, {os.cpu_count()} CPUs; policy: {N_ROLES} roles "
          f"({N_GROUPS} groups), {len(dummy_tables())} tables in {len(SCHEMAS)} schemas "
          f"+ the pgbench tables, config {env.roles_yaml_bytes:,} bytes; enforcement checked "
          f"(`{env.forbidden}` and DELETE refused with 42501). {args.rounds} rounds per mode, "
          f"order alternating. Load average at start {load_start}, at end {load_end}. "
          "One run; compare only within it.")
    print()
    print(report(res, args.mode_list))
    print()
    print("Target: on / off >= 0.95.")
    return 0


def main(argv: list[str] | None = None) -> int:
    return harness.run_cleanly(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
