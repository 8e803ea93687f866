"""What the statement caches take for large statements: RSS added by N distinct ones.

    .venv/bin/python bench/statement_cache_memory.py [--n 100] [--mib 1] [--budget BYTES]
                                                     [--root DIR]

In process, with the real Gate (policy decisions, analysis cache), SessionProtector
(rewrite plans) and audit statement facts of a config protecting one column: `--n`
distinct statements of `--mib` MiB each are decided and planned, half with a long
literal (a small template), half with a long comment (a template as long as the text).
Prints the RSS before and after (from /proc/self/statm, after a collection) and, where
the caches account bytes, what each holds. `--budget` sets `limits.statement_cache_bytes`
(leave it out for the default, or to run an older checkout: `--root` imports `proxy`
from there, e.g. `git archive main | tar -x -C /tmp/base`).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

CONFIG = """\
keys: {provider: local, path: dev.kek, keyring: keyring.json}
protect:
  public.cards.pan: {type: text}
roles:
  app:
    tables:
      public.*: [select, insert, update, delete]
default: deny
"""


def rss() -> int:
    gc.collect()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Session:
    def __init__(self, gate: Any, policy_state: Any) -> None:
        self.gate, self.id, self.user, self.database = gate, 1, "app", "app"
        self.tracker = None
        self.server_params: dict[str, str] = {}
        self.policy_state = policy_state


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--mib", type=float, default=1.0)
    ap.add_argument("--budget", type=int)
    ap.add_argument("--root", default=str(Path(__file__).resolve().parent.parent))
    ap.add_argument("--plan-timing", action="store_true",
                    help="instead: microseconds per decide+plan of an INSERT with a "
                         "protected literal, the same text again and again (its plan is "
                         "no longer cached) and a new literal every time")
    a = ap.parse_args()
    sys.path.insert(0, a.root)
    from keys import cli_ops
    from proxy.encryption import SessionProtector, protect_columns_for_keys
    from proxy.gate import Gate, SessionPolicy
    from proxy.observability import StatementFacts
    from proxy.settings import parse_text

    d = Path(tempfile.mkdtemp(prefix="stmt-cache-bench-"))
    cli_ops.init(d / "dev.kek", d / "keyring.json",
                 protect_columns_for_keys({"public.cards.pan": {"type": "text"}}))
    text = CONFIG + (f"limits: {{statement_cache_bytes: {a.budget}}}\n" if a.budget else "")
    (d / "strongroom.yaml").write_text(text)
    gate = Gate(parse_text(text, source=str(d / "strongroom.yaml")))
    st = SessionPolicy(login_role="app", role="app", session_role="app", path=("public",),
                       reset_path=("public",))
    session = _Session(gate, st)
    protector = SessionProtector(gate.encryption, gate.encryption.catalog_for("app"), session)
    facts = StatementFacts(gate)
    if a.plan_timing:
        import time

        for name, texts in (
            ("same text", ["INSERT INTO cards (id, pan) VALUES (1, '5105105105105100')"] * 20000),
            ("new literal", [f"INSERT INTO cards (id, pan) VALUES (1, '51051051{i:08d}')"
                             for i in range(20000)]),
        ):
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                for sql in texts:
                    protector.plan_query(sql)
                best = min(best, time.perf_counter() - t0)
            print(f"{name}: {best / len(texts) * 1e6:.1f} us per statement")
        return
    filler = "x" * int(a.mib * 1024 * 1024)
    before = rss()
    for i in range(a.n):
        if i % 2:
            sql = f"SELECT id FROM cards WHERE note = '{i}{filler}' AND id = {i}"
        else:
            sql = f"SELECT id FROM cards WHERE id = {i} /* {i} {filler} */"
        plan = protector.plan_query(sql)
        assert plan.refusal is None, plan.refusal
        facts.get(sql)
        del sql, plan
    protector.plan_query("SELECT 1")  # the last-text memos let go of the last one
    facts.get("SELECT 1")
    after = rss()
    print(f"root={a.root} n={a.n} mib={a.mib} budget={a.budget or 'default'}")
    print(f"rss_delta={(after - before) / 2**20:.1f} MiB")
    analyses = gate.analyses
    levels = dict(analyses.levels()) if hasattr(analyses, "levels") else {}
    for (db, _reset), pc in gate._caches.items():
        levels[f"policy[{db}]"] = pc._data
    levels["plans"] = gate.encryption.plan_cache
    levels["facts"] = facts._memo
    for name, level in levels.items():
        nbytes = getattr(level, "nbytes", None)
        acc = f"{nbytes / 2**20:.1f} MiB of {level.max_bytes / 2**20:.0f}" \
            if nbytes is not None else "not accounted"
        print(f"  {name}: {len(level)} entries, {acc}")


if __name__ == "__main__":
    main()
