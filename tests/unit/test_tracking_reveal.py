"""The DataRow fast path (RowRevealer + RoleColumn.cell_revealer) against the reference
path (`Tracker._reveal_row`: decode every cell, `RoleColumn.reveal`, re-encode): same
bytes out, same error, same per-column counters, for every type, view and format, with
NULLs, escape-format bytea, cells that fail to decrypt and rows of odd shapes."""

from __future__ import annotations

import datetime
import os
import random
import struct
from typing import Any

import pytest

from proxy.crypto import ColumnCipher, ColumnKeys, Purpose
from proxy.crypto.masking import make_masker
from proxy.encryption import ColumnRuntime, RoleColumn, SessionProtector
from proxy.protocol import rows
from proxy.protocol.messages import message
from proxy.sql.protected import ProtectedColumn
from proxy.tracking import RowPlan, RowRevealer, StatementPlan, Tracker
from proxy.types import get_codec

VALUES: dict[str, list[bytes]] = {
    "text": [b"4111111111111111", b"", "héllo wörld".encode(), b"x" * 300],
    "varchar": [b"abc", b"alice@example.com"],
    "numeric": [b"12345.67", b"0", b"-0.0001", b"NaN", b"Infinity", b"-Infinity", b"1.50",
                b"100000000", b"9" * 70 + b".5", b"0.000000010"],
    "int4": [b"0", b"-2147483648", b"42"],
    "int8": [b"9223372036854775807", b"-1"],
    "date": [b"2024-02-29", b"infinity", b"1999-12-31"],
    "timestamptz": [b"2024-02-29 12:34:56.789+00", b"-infinity", b"2000-01-01 00:00:00+05"],
    "bool": [b"t", b"f"],
    "uuid": [b"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"],
    "jsonb": [b'{"a": [1, 2.50, "x"]}', b"null"],
}
MASKS = {"text": "last4", "varchar": {"keep_prefix": 1, "keep_suffix": 1, "char": "*"},
         "numeric": "null", "int4": {"fixed": "0"}}


def _column(logical: str, view: str, mask: Any = None) -> RoleColumn:
    codec = get_codec(logical)
    name = f"public.t.{logical}_{view}"
    keys = ColumnKeys(name, Purpose.ENCRYPT, 1, {1: os.urandom(32)})
    cipher = ColumnCipher(name, codec.name, "randomized", keys, database="appdb")
    spec = ProtectedColumn("public", "t", f"{logical}_{view}", logical, "randomized", False, None)
    masker = make_masker(mask, codec.name) if view == "masked" else None
    rt = ColumnRuntime(spec, cipher, None, codec, codec.oid, -1)
    return RoleColumn(rt, view, masker, tz=lambda: datetime.timezone(datetime.timedelta(hours=2)))


class _Protector:
    def column_at(self, table_oid: int, attnum: int) -> Any:
        return None

    def plan_query(self, sql: str) -> StatementPlan:
        return StatementPlan(sql=sql.encode())

    def copy_plan(self, plan: Any) -> Any:
        return None


def _cell(crypto: RoleColumn, other: RoleColumn, value: bytes | None, fmt: int,
          rnd: random.Random) -> bytes | None:
    if value is None:
        return None
    codec = crypto.runtime.codec
    canonical = codec.from_text(value)
    cipher = crypto.runtime.cipher
    roll = rnd.random()
    if roll < 0.04:
        env = other.runtime.cipher.encrypt(b"7")  # another column's key: fails
    elif roll < 0.06:
        env = cipher.encrypt(canonical)[:-1]  # truncated tag: fails
    else:
        env = cipher.encrypt(canonical)
    if fmt == 1:
        return env
    if rnd.random() < 0.15:  # bytea_output = escape
        return b"".join(b"\\\\" if c == 0x5C else bytes([c]) if 32 <= c < 127
                        else b"\\%03o" % c for c in env)
    return b"\\x" + env.hex().encode()


def _row(cells: list[bytes | None]) -> bytes:
    return rows.encode_data_row(cells)


def _counts(cols: list[RoleColumn]) -> list[tuple[int, int]]:
    return [(c.n_decrypt, c.n_failed) for c in cols]


@pytest.mark.parametrize("fmt", [0, 1])
@pytest.mark.parametrize("view", ["plaintext", "masked"])
def test_fast_path_matches_reference(fmt: int, view: str) -> None:
    rnd = random.Random(f"{fmt}{view}")
    types = [t for t in VALUES if view == "plaintext" or t in MASKS]
    fast_cols = [_column(t, view, MASKS.get(t)) for t in types]
    ref_cols = [_column(t, view, MASKS.get(t)) for t in types]
    for a, b in zip(fast_cols, ref_cols, strict=True):  # same keys on both sides
        b.runtime = a.runtime
    other = _column("text", "plaintext")
    for trial in range(60):
        # a random layout: protected columns at random places among plain ones
        width = rnd.randrange(len(types), len(types) + 4)
        where = sorted(rnd.sample(range(width), len(types)))
        order = list(range(len(types)))
        rnd.shuffle(order)
        fast_plan = RowPlan((where[k], fast_cols[order[k]], fmt) for k in range(len(types)))
        ref_plan = [(where[k], ref_cols[order[k]], fmt) for k in range(len(types))]
        fast, ref = Tracker(_Protector()), Tracker(_Protector())
        revealer = RowRevealer(fast_plan)
        assert revealer.steps is not None
        for _ in range(40):
            cells: list[bytes | None] = [b"p%d" % rnd.randrange(1000) if rnd.random() < 0.9
                                         else None for _ in range(width)]
            for k, pos in enumerate(where):
                col = fast_cols[order[k]]
                value = None if rnd.random() < 0.1 else rnd.choice(VALUES[col.runtime.codec.name])
                cells[pos] = _cell(col, other, value, fmt, rnd)
            if rnd.random() < 0.05:
                cells = cells[: rnd.randrange(width)]  # a short row (never from PG)
            msg = _row(cells)
            fast.consume_to_ready = ref.consume_to_ready = False
            fast.data_plan = revealer
            want = ref._reveal_row(msg, ref_plan)  # type: ignore[arg-type]
            got = fast.server(0x44, msg)
            # the session's offset variant, with other bytes around the message
            fast.consume_to_ready = False
            again = fast.data_row(b"junk" + msg + b"more", 4, 4 + len(msg))
            revealer.flush()
            assert (msg if got is None else got) == want, trial
            assert (msg if again is None else again) == want, trial
            assert fast.consume_to_ready == ref.consume_to_ready
        # the fast side saw every row twice
        for f, r in zip(fast_cols, ref_cols, strict=True):
            assert f.n_decrypt == 2 * r.n_decrypt and f.n_failed == 2 * r.n_failed
            f.n_decrypt = f.n_failed = r.n_decrypt = r.n_failed = 0


def test_counts_flushed_when_result_set_ends() -> None:
    col = _column("text", "plaintext")
    tracker = Tracker(_Protector())
    plan = RowPlan([(1, col, 1)])
    tracker.row_plan = plan
    tracker.data_plan = plan.revealer
    env = col.runtime.cipher.encrypt(b"secret")
    for cells in ([b"1", env], [b"2", None], [b"3", env]):
        msg = _row(cells)
        out = tracker.server(0x44, msg)
        assert (msg if out is None else out) == _row([cells[0], b"secret" if cells[1] else None])
    assert col.n_decrypt == 0  # counted per result set, not per cell
    session = type("S", (), {"tracker": tracker})()
    protector = type("P", (), {"session": session, "_previous": [],
                               "_viewers": {("r",): {("public", "t", "c"): col}}})()
    drained = SessionProtector.drain_crypto_counts(protector)  # type: ignore[arg-type]
    assert drained == [(col.runtime.qualified, "decrypt", 2, 0)]  # mid-result (disconnect)
    env2 = col.runtime.cipher.encrypt(b"more")
    tracker.server(0x44, _row([b"4", env2]))
    tracker.server(0x43, message(b"C", b"SELECT 4\0"))  # CommandComplete
    assert col.n_decrypt == 1
    assert tracker.data_plan is None


def test_numeric_binary_matches_digit_string_path() -> None:
    from proxy.types import numeric

    rnd = random.Random(4)
    samples = [b"0", b"00", b"-0", b"", b"-", b".", b"0.", b".5", b"1.", b"1.2_3", b" 12",
               b"+5", b"--5", b"9" * 64, b"9" * 65, b"0." + b"0" * 70 + b"1"]
    for _ in range(20000):
        ip = str(rnd.randrange(10 ** rnd.randrange(0, 25))).encode()
        fp = b"".join(rnd.choice(b"0159").to_bytes(1, "big") for _ in range(rnd.randrange(12)))
        samples.append((b"-" if rnd.random() < 0.3 else b"") + b"0" * rnd.randrange(3) + ip
                       + (b"." + fp if rnd.random() < 0.7 else b""))
    for s in samples:
        try:
            want: Any = numeric._to_binary_digits(s)
        except (ValueError, struct.error) as exc:
            want = type(exc)
        try:
            got: Any = numeric.to_binary(s)
        except (ValueError, struct.error) as exc:
            got = type(exc)
        assert got == want, s
