"""Progress of long work when the output is not a terminal (issue 12, "The CLI").

`encrypt-column`, `keys rotate` and `decrypt-column` run here with stderr redirected to a
pipe, as under nohup, systemd or CI: tqdm's bar would hide itself there, so the commands
log a line when they start, at most every `--progress-every` seconds, and when they end,
with rows done / total, percent and rate. No value appears in those lines.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from keys import cli_ops
from tests.integration.test_migrate import MARK, Setup, _name, app_conn, make_cards

LINE = re.compile(r"strongroom\.progress: (?P<desc>[^:]+): (?P<what>started|progress|finished) "
                  r"(?P<done>\d+)/(?P<total>\d+) rows \((?P<pct>[\d.]+)%\), (?P<rate>\d+) rows/s")


def _progress(stderr: str) -> list[re.Match[str]]:
    return [m for m in map(LINE.search, stderr.splitlines()) if m is not None]


def _check(stderr: str, desc: str, total: int) -> None:
    found = [m for m in _progress(stderr) if m["desc"] == desc]
    assert found, stderr
    assert found[0]["what"] == "started" and found[-1]["what"] == "finished", stderr
    assert int(found[-1]["done"]) == int(found[-1]["total"]) == total, stderr
    middle = [m for m in found if m["what"] == "progress"]
    assert len(middle) >= 2, stderr  # --progress-every 0: a line per batch
    dones = [int(m["done"]) for m in found]
    assert dones == sorted(dones)
    assert MARK not in stderr


async def test_progress_lines_when_redirected(pg: Any, tmp_path: Path) -> None:
    table = _name("prog")
    await make_cards(pg, table, n=120)
    s = Setup(pg, tmp_path, table, {"pan": {"type": "text"}})
    column = f"public.{table}.pan"
    rows = 120 - 120 // 7  # pan_value() leaves every 7th row NULL
    fast = ("--batch", "25", "--progress-every", "0")

    res = s.cli("encrypt-column", column, *fast)
    assert res.returncode == 0, res.stderr
    _check(res.stderr, f"encrypt {column}", 120)

    new = cli_ops.add(s.keyring, s.provider(), column)
    cli_ops.promote(s.keyring, new, s.provider())
    res = s.cli("keys", "rotate", "--column", column, *fast)
    assert res.returncode == 0, res.stderr
    _check(res.stderr, f"rotate {column}", rows)

    res = s.cli("decrypt-column", column, *fast)
    assert res.returncode == 0, res.stderr
    _check(res.stderr, f"decrypt {column}", 120)

    # the default (every 5 s) on a quick run: just the first and the last line
    conn = await app_conn(pg)
    try:
        await conn.execute(f"DROP TABLE {table}")
    finally:
        await conn.close()
    await make_cards(pg, table, n=60)
    res = s.cli("encrypt-column", column, "--batch", "25")
    assert res.returncode == 0, res.stderr
    assert [m["what"] for m in _progress(res.stderr)] == ["started", "finished"], res.stderr
