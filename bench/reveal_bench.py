"""Micro benchmark of the protected read path, in process (prints numbers only).

    .venv/bin/python bench/reveal_bench.py [--rows 1000] [--rounds 30] [--root DIR]

One result set of `--rows` DataRows shaped like bench/encryption.py's SELECT
(`id int4, pan text, balance numeric`; `pan` and `balance` protected, randomized
AES-GCM, real `RoleColumn`s over real `ColumnCipher`s and codecs) is fed through

* `Tracker.server`, one message at a time (the tracker's own cost), and
* `Session.server_data` in 64 KiB reads with in-memory transports (tracker + the
  session's tracking loop, as the proxy runs it),

in text format (simple Query) and binary format (Parse/Bind/Describe/Execute/Sync with
binary results), plus the same rows with nothing protected (the tracking-mode floor).
Protected cases run twice: with the decrypt cache off (every cell decrypted and converted:
the cost of rows never read before) and on (`--cache-size`, default the proxy's default;
every round after the first reads the same rows again, so this is the cost of a hot
result set). Reported: best-of-rounds microseconds per DataRow (the minimum: load only
adds time).

`--root DIR` imports `proxy` from another checkout (e.g. `git archive HEAD | tar -x -C
/tmp/base`) to compare a baseline under the same interpreter and load.
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
from pathlib import Path
from typing import Any

ap = argparse.ArgumentParser()
ap.add_argument("--rows", type=int, default=1000)
ap.add_argument("--rounds", type=int, default=30)
ap.add_argument("--root", default=str(Path(__file__).resolve().parent.parent))
ap.add_argument("--only", default="",
                help="cases to run: ';'-separated parts of their names (they hold commas)")
ap.add_argument("--cache-size", type=int, default=None,
                help="decrypt cache entries per column for the 'cache on' cases")
ARGS = ap.parse_args()
sys.path.insert(0, ARGS.root)

from inprocess import best_of, ready_session  # noqa: E402

from proxy import session as session_mod  # noqa: E402
from proxy.crypto import ColumnCipher, ColumnKeys, Purpose  # noqa: E402
from proxy.encryption import ColumnRuntime, RoleColumn, SessionProtector  # noqa: E402
from proxy.sql.protected import ProtectedColumn  # noqa: E402
from proxy.tracking import StatementPlan, Tracker  # noqa: E402
from proxy.types import get_codec  # noqa: E402

TABLE_OID = 16400
PLAIN_OID = 16500


def _msg(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


CACHING = "cache_size" in getattr(ColumnRuntime, "__dataclass_fields__", {})  # (--root)


def _role_column(name: str, logical: str, cache_size: int | None) -> RoleColumn:
    codec = get_codec(logical)
    keys = ColumnKeys(f"public.sel_enc.{name}", Purpose.ENCRYPT, 1, {1: KEYS[name]})
    cipher = ColumnCipher(f"public.sel_enc.{name}", codec.name, "randomized", keys,
                          database="appdb")
    spec = ProtectedColumn("public", "sel_enc", name, logical, "randomized", False, None)
    extra: dict[str, Any] = {}
    if CACHING:
        extra["cache_size"] = 0 if cache_size == 0 else (
            cache_size if cache_size is not None
            else ColumnRuntime.__dataclass_fields__["cache_size"].default)
    rt = ColumnRuntime(spec, cipher, None, codec, codec.oid, -1, **extra)
    import datetime

    return RoleColumn(rt, "plaintext", None, tz=lambda: datetime.UTC)


KEYS = {"pan": os.urandom(32), "balance": os.urandom(32)}  # one set: same rows, every case


class _Protector:
    def __init__(self, cache_size: int | None = 0) -> None:
        self.session = None
        self.pan = _role_column("pan", "text", cache_size)
        self.balance = _role_column("balance", "numeric", cache_size)
        self._role = {("public", "sel_enc", "pan"): self.pan,
                      ("public", "sel_enc", "balance"): self.balance}
        self._attr = {(TABLE_OID, 2): self.pan, (TABLE_OID, 3): self.balance}

    def column_at(self, table_oid: int, attnum: int) -> Any:
        return self._attr.get((table_oid, attnum))

    def plan_query(self, sql: str) -> StatementPlan:
        return StatementPlan(sql=sql.encode())

    def copy_plan(self, plan: Any) -> Any:
        return None

    def drain_crypto_counts(self) -> list[tuple[str, str, int, int]]:
        return SessionProtector.drain_crypto_counts(self)  # type: ignore[arg-type]


def _row_description(oid: int, fmt: int) -> bytes:
    body = struct.pack("!h", 3)
    for attnum, (name, typ) in enumerate(((b"id", 23), (b"pan", 17), (b"balance", 17)), 1):
        body += name + b"\0" + struct.pack("!IhIhih", oid, attnum, typ, -1 if typ == 17 else 4,
                                           -1, fmt)
    return _msg(b"T", body)


def _data_rows(p: _Protector, n: int, fmt: int) -> list[bytes]:
    out = []
    for i in range(n):
        pan = p.pan.runtime.cipher.encrypt(b"4%015d" % (i * 7919))
        bal = p.balance.runtime.cipher.encrypt(b"%d.%02d" % (i * 37 % 100000, i % 100))
        if fmt == 0:
            cells = [str(i).encode(), b"\\x" + pan.hex().encode(), b"\\x" + bal.hex().encode()]
        else:
            cells = [struct.pack("!i", i), pan, bal]
        body = struct.pack("!h", 3) + b"".join(struct.pack("!i", len(c)) + c for c in cells)
        out.append(_msg(b"D", body))
    return out


def _exchange(p: _Protector, n: int, fmt: int, protected: bool) -> tuple[bytes, list[bytes]]:
    """(client bytes, server messages) of one SELECT returning n rows."""
    oid = TABLE_OID if protected else PLAIN_OID
    rows = _data_rows(p, n, fmt)
    sql = b"SELECT id, pan, balance FROM sel_enc"
    if fmt == 0:
        client = _msg(b"Q", sql + b"\0")
        server = [_row_description(oid, 0), *rows, _msg(b"C", b"SELECT %d\0" % n),
                  _msg(b"Z", b"I")]
    else:
        client = (_msg(b"P", b"\0" + sql + b"\0\0\0")
                  + _msg(b"B", b"\0\0\0\0\0\0\0\1\0\1")
                  + _msg(b"D", b"P\0") + _msg(b"E", b"\0\0\0\0\0") + _msg(b"S", b""))
        server = [_msg(b"1", b""), _msg(b"2", b""), _row_description(oid, 1), *rows,
                  _msg(b"C", b"SELECT %d\0" % n), _msg(b"Z", b"I")]
    return client, server


def _kinds(server: list[bytes]) -> list[tuple[int, bytes]]:
    return [(msg[0], msg) for msg in server]


def bench_tracker(p: _Protector, client: bytes, server: list[bytes], n: int) -> float:
    tracker = Tracker(p)
    frames = []
    pos = 0
    while pos < len(client):
        (length,) = struct.unpack_from("!i", client, pos + 1)
        frames.append((client[pos], client[pos : pos + 1 + length]))
        pos += 1 + length
    msgs = _kinds(server)
    sink = []

    def once() -> None:
        for kind, msg in frames:
            tracker.client(kind, msg)
        srv = tracker.server
        append = sink.append
        for kind, msg in msgs:
            append(srv(kind, msg))
        sink.clear()

    return best_of(once, ARGS.rounds) / n * 1e6


def bench_session(p: _Protector, client: bytes, server: list[bytes], n: int) -> float:
    s = ready_session(session_mod)
    s.tracker = Tracker(p)
    blob = b"".join(server)
    reads = [blob[i : i + 65536] for i in range(0, len(blob), 65536)]

    def once() -> None:
        s.data_received(client)
        for r in reads:
            s.server_data(r)

    return best_of(once, ARGS.rounds) / n * 1e6


def main() -> None:
    n = ARGS.rows
    only = [part.strip() for part in ARGS.only.split(";") if part.strip()]
    cold = _Protector(0)
    print(f"proxy from {ARGS.root}; {n} rows (int4 id, text pan, numeric balance)")
    print(f"{'case':44s} {'tracker us/row':>15s} {'session us/row':>15s}")
    cases = [("text format, 2 protected, cache off", 0, True, 0),
             ("binary format, 2 protected, cache off", 1, True, 0)]
    if CACHING and ARGS.cache_size != 0:
        cases += [("text format, 2 protected, cache on", 0, True, ARGS.cache_size),
                  ("binary format, 2 protected, cache on", 1, True, ARGS.cache_size)]
    cases += [("text format, unprotected", 0, False, 0),
              ("binary format, unprotected", 1, False, 0)]
    for name, fmt, protected, size in cases:
        if only and not any(part in name for part in only):
            continue
        client, server = _exchange(cold, n, fmt, protected)
        # tracker and session each get fresh columns (and so a cold cache) over the same keys
        t = bench_tracker(_Protector(size), client, server, n)
        s = bench_session(_Protector(size), client, server, n)
        print(f"{name:44s} {t:15.3f} {s:15.3f}")


if __name__ == "__main__":
    main()
