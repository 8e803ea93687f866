"""The decrypt cache behind `RoleColumn.cell_revealer` (ColumnRuntime.cached).

What it must never do: answer for bytes that did not authenticate in *this* column (a
tampered envelope, or one copied from another column, fails after a valid one was
cached), remember a failure, let a masked role see a plaintext entry (or the reverse),
freeze a timestamptz's text in one TimeZone, grow past its bound, or outlive the keys
it was filled under. And a hit returns exactly what `reveal` returns, without opening
the envelope again.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any

import pytest

from keys import cli_ops
from proxy.crypto import ColumnCipher, ColumnKeys, DecryptError, Purpose
from proxy.crypto.masking import make_masker
from proxy.encryption import (
    DECRYPT_CACHE_MAX_CELL,
    DECRYPT_ENTRY_OVERHEAD,
    DEFAULT_DECRYPT_CACHE_BYTES,
    DEFAULT_DECRYPT_CACHE_SIZE,
    ColumnRuntime,
    Encryption,
    RoleColumn,
    protect_columns_for_keys,
)
from proxy.protocol import rows
from proxy.settings import ConfigError, parse_text
from proxy.sql.protected import ProtectedColumn
from proxy.tracking import RowPlan, RowRevealer, ValueError_
from proxy.types import get_codec

UTC = datetime.UTC
PLUS5 = datetime.timezone(datetime.timedelta(hours=5))


class CountingCipher:
    """A ColumnCipher that counts how many envelopes were really opened."""

    def __init__(self, cipher: ColumnCipher) -> None:
        self.cipher = cipher
        self.opened = 0

    def decrypt(self, blob: bytes) -> bytes:
        self.opened += 1
        return self.cipher.decrypt(blob)

    def opener(self) -> Any:
        return self.decrypt

    def encrypt(self, plain: bytes) -> bytes:
        return self.cipher.encrypt(plain)


def runtime(logical: str, name: str = "c", size: int = DEFAULT_DECRYPT_CACHE_SIZE
            ) -> ColumnRuntime:
    codec = get_codec(logical)
    col = f"public.t.{name}"
    keys = ColumnKeys(col, Purpose.ENCRYPT, 1, {1: os.urandom(32)})
    cipher = ColumnCipher(col, codec.name, "randomized", keys, database="appdb")
    spec = ProtectedColumn("public", "t", name, logical, "randomized", False, None)
    rt = ColumnRuntime(spec, cipher, None, codec, codec.oid, -1, cache_size=size)
    rt.cipher = CountingCipher(cipher)  # type: ignore[assignment]
    return rt


def role(rt: ColumnRuntime, view: str = "plaintext", mask: Any = None,
         tz: Any = lambda: UTC) -> RoleColumn:
    masker = make_masker(mask, rt.codec.name) if view == "masked" else None
    return RoleColumn(rt, view, masker, tz=tz)


def cell(envelope: bytes, fmt: int) -> bytes:
    return envelope if fmt == 1 else b"\\x" + envelope.hex().encode()


def sent(value: bytes | None) -> bytes:
    """The DataRow cell the client gets for a value (what a cell revealer returns):
    length word and bytes, or the NULL word."""
    return b"\xff\xff\xff\xff" if value is None else len(value).to_bytes(4, "big") + value


def seal(rt: ColumnRuntime, text: bytes, tz: datetime.tzinfo = UTC) -> bytes:
    return rt.cipher.encrypt(rt.codec.from_text(text, tz))


def opened(rt: ColumnRuntime) -> int:
    return rt.cipher.opened  # type: ignore[attr-defined]


def expect_xx001(rc: RoleColumn, envelope: bytes, fmt: int) -> None:
    with pytest.raises(ValueError_) as info:
        rc.reveal(envelope, fmt)
    assert info.value.sqlstate == "XX001"


@pytest.mark.parametrize("fmt", [0, 1])
@pytest.mark.parametrize("logical,text", [("text", b"4111111111111111"),
                                          ("numeric", b"12345.67"), ("uuid",
                                          b"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
                                          ("date", b"2024-02-29"), ("int8", b"-42")])
def test_hit_is_what_reveal_returns_without_opening_again(logical: str, text: bytes,
                                                          fmt: int) -> None:
    rt = runtime(logical)
    rc = role(rt)
    env = seal(rt, text)
    fn = rc.cell_revealer(fmt)
    first = fn(cell(env, fmt))
    assert opened(rt) == 1
    again = fn(cell(env, fmt))
    assert again is first  # the stored object itself
    assert opened(rt) == 1  # not opened again
    # and a closure made later (another result set, another session) shares the entry
    assert role(rt).cell_revealer(fmt)(cell(env, fmt)) is first
    assert opened(rt) == 1
    assert first == sent(rc.reveal(env, fmt))


@pytest.mark.parametrize("fmt", [0, 1])
def test_tampered_or_foreign_envelope_fails_after_a_valid_one_was_cached(fmt: int) -> None:
    rt, other = runtime("text", "pan"), runtime("text", "cvv")
    rc, rc_other = role(rt), role(other)
    env = seal(rt, b"4111111111111111")
    fn = rc.cell_revealer(fmt)
    assert fn(cell(env, fmt)) == sent(b"4111111111111111")
    foreign = seal(other, b"123")
    assert rc_other.cell_revealer(fmt)(cell(foreign, fmt)) == sent(b"123")  # cached over there
    flipped_body = env[:25] + bytes([env[25] ^ 1]) + env[26:]
    flipped_key_id = env[:5] + bytes([env[5] ^ 1]) + env[6:]
    for bad in (flipped_body, flipped_key_id, env[:-1], env + b"\0", foreign):
        before = len(rt.caches[("plaintext", None, fmt)])
        for _ in range(2):  # a failure is not remembered: it fails again
            with pytest.raises(DecryptError):
                fn(cell(bad, fmt))
        assert len(rt.caches[("plaintext", None, fmt)]) == before
        expect_xx001(rc, bad, fmt)
    assert fn(cell(env, fmt)) == sent(b"4111111111111111")  # the good one still answers


@pytest.mark.parametrize("fmt", [0, 1])
def test_row_revealer_stops_at_a_bad_cell_among_cached_ones(fmt: int) -> None:
    """The DataRow fast path answers hits from the slot without opening anything, and
    stops before a row with a bad cell, even when the row's other cells are hits (the
    tracker then redoes the row with `reveal`, which reports XX001)."""
    rt = runtime("text", "pan")
    rc = role(rt)
    good = seal(rt, b"4111111111111111")
    bad = good[:-1] + bytes([good[-1] ^ 1])
    rev = RowRevealer(RowPlan([(1, rc, fmt), (2, rc, fmt)]))
    row = rows.encode_data_row([b"1", cell(good, fmt), cell(good, fmt)])
    want = rows.encode_data_row([b"1", b"4111111111111111", b"4111111111111111"])
    out = bytearray()
    assert rev.reveal(row, 0, len(row), out) == len(row)
    assert out == want
    assert opened(rt) == 1
    out.clear()
    assert rev.reveal(row * 3, 0, 3 * len(row), out) == 3 * len(row)
    assert out == want * 3
    assert opened(rt) == 1  # all hits
    bad_row = rows.encode_data_row([b"1", cell(good, fmt), cell(bad, fmt)])
    out.clear()
    assert rev.reveal(row + bad_row + row, 0, 2 * len(row) + len(bad_row), out) == len(row)
    assert out == want  # nothing of the bad row
    assert rev.rows == 5
    with pytest.raises(DecryptError):
        rc.cell_revealer(fmt)(cell(bad, fmt))


@pytest.mark.parametrize("fmt", [0, 1])
def test_masked_and_plaintext_roles_never_share_entries(fmt: int) -> None:
    rt = runtime("text", "pan")
    env = seal(rt, b"4111111111111111")
    plain, masked = role(rt), role(rt, "masked", "last4")
    for order in ((plain, masked), (masked, plain)):
        rt.caches.clear()
        got = {id(rc): rc.cell_revealer(fmt)(cell(env, fmt)) for rc in order}
        got2 = {id(rc): rc.cell_revealer(fmt)(cell(env, fmt)) for rc in order}
        assert got == got2
        assert got[id(plain)] == sent(b"4111111111111111")
        assert got[id(masked)] == sent(b"************1111")
        assert got[id(masked)] == sent(masked.reveal(env, fmt))
    # two masks of one column (two configurations in one test) keep apart too
    first4 = role(rt, "masked", {"keep_prefix": 4, "keep_suffix": 0, "char": "#"})
    assert first4.cell_revealer(fmt)(cell(env, fmt)) == sent(b"4111############")


def test_masked_null_is_cached_as_null() -> None:
    rt = runtime("numeric", "bal")
    rc = role(rt, "masked", "null")
    env = seal(rt, b"10.50")
    fn = rc.cell_revealer(1)
    assert fn(env) == sent(None) and fn(env) == sent(None)
    assert opened(rt) == 1


@pytest.mark.parametrize("view,mask", [("plaintext", None), ("masked", {"fixed": "2000-01-01"})])
def test_timestamptz_text_follows_the_session_timezone(view: str, mask: Any) -> None:
    rt = runtime("timestamptz", "at")
    zone = [UTC]
    rc = role(rt, view, mask, tz=lambda: zone[0])
    env = seal(rt, b"2024-02-29 12:34:56.789+00")
    want = {}
    for z in (UTC, PLUS5):
        zone[0] = z
        want[z] = sent(rc.reveal(env, 0))
    rt.cipher.opened = 0  # type: ignore[attr-defined]
    fn = rc.cell_revealer(0)
    zone[0] = UTC
    assert fn(cell(env, 0)) == want[UTC]
    zone[0] = PLUS5  # SET TimeZone: the same closure (a prepared statement's) reads on
    assert fn(cell(env, 0)) == want[PLUS5]
    if view == "plaintext":
        assert (want[UTC], want[PLUS5]) == (sent(b"2024-02-29 12:34:56.789+00"),
                                            sent(b"2024-02-29 17:34:56.789+05"))
    zone[0] = UTC
    assert fn(cell(env, 0)) == want[UTC]
    assert opened(rt) == 1  # still one decryption: the slot holds the instant, not text
    # binary output does not depend on the TimeZone: a plain cached slot
    assert rc.cell_revealer(1)(env) == sent(rc.reveal(env, 1))


def test_bounded_fifo_and_long_cells_not_kept() -> None:
    rt = runtime("text", "note", size=8)
    rc = role(rt)
    fn = rc.cell_revealer(1)
    envs = [seal(rt, b"value %d" % i) for i in range(100)]
    for i, env in enumerate(envs):
        assert fn(env) == sent(b"value %d" % i)
        assert len(rt.caches[("plaintext", None, 1)]) <= 8
    assert list(rt.caches[("plaintext", None, 1)]) == envs[-8:]  # first in, first out
    n = opened(rt)
    for env in envs[-8:]:
        fn(env)
    assert opened(rt) == n
    fn(envs[0])  # evicted: opened again
    assert opened(rt) == n + 1
    big = seal(rt, b"x" * DECRYPT_CACHE_MAX_CELL)
    assert fn(big) == sent(b"x" * DECRYPT_CACHE_MAX_CELL)
    assert big not in rt.caches[("plaintext", None, 1)]
    fn(big)
    assert opened(rt) == n + 3  # opened every time


@pytest.mark.parametrize("fmt", [0, 1])
def test_bounded_in_bytes(fmt: int) -> None:
    """65,536 entries of 470-byte cells took 75-100 MB a slot: `cache_bytes` bounds a
    slot by the bytes it counts (cell + value + DECRYPT_ENTRY_OVERHEAD), oldest out."""
    rt = runtime("text", "doc")
    rt.cache_bytes = 64 * 1024
    fn = role(rt).cell_revealer(fmt)
    slot = rt.caches[("plaintext", None, fmt)]
    for i in range(2000):
        fn(cell(seal(rt, b"%04d" % i + b"v" * 400), fmt))
        assert slot.nbytes <= rt.cache_bytes
    assert slot.nbytes == sum(len(k) + len(v) + DECRYPT_ENTRY_OVERHEAD
                              for k, v in slot.items())
    assert 0 < len(slot) < 2000 and slot.nbytes > rt.cache_bytes // 2


def test_config_bytes_reach_every_column_and_zero_turns_it_off(tmp_path: Path) -> None:
    assert {rt.cache_bytes for rt in _encryption(tmp_path).columns_for("app").values()} == \
        {DEFAULT_DECRYPT_CACHE_BYTES}
    enc = _encryption(tmp_path, decrypt_cache_bytes=0)
    rt = next(iter(enc.columns_for("app").values()))
    assert rt.cache_bytes == 0
    rt.cached("slot", lambda c: c)(b"x")
    assert rt.caches == {}


def test_size_zero_disables_the_cache() -> None:
    rt = runtime("numeric", "bal", size=0)
    rc = role(rt)
    env = seal(rt, b"1.5")
    for fmt in (0, 1):
        fn = rc.cell_revealer(fmt)
        assert fn(cell(env, fmt)) == fn(cell(env, fmt)) == sent(rc.reveal(env, fmt))
    assert opened(rt) == 6
    assert rt.caches == {}


def test_memoryview_cells_are_stored_as_bytes() -> None:
    rt = runtime("text", "pan")
    env = seal(rt, b"secret")
    buf = b"head" + env + b"tail"
    fn = role(rt).cell_revealer(1)
    assert fn(memoryview(buf)[4:-4]) == sent(b"secret")
    (key,) = rt.caches[("plaintext", None, 1)]
    assert type(key) is bytes and key == env  # not a view pinning the whole buffer
    assert fn(env) == sent(b"secret") and opened(rt) == 1


# ----------------------------------------------------------------- configuration


PROTECT = {"public.t.pan": {"type": "text"}, "public.t.bal": {"type": "numeric"}}


def _encryption(tmp_path: Path, **keys_extra: Any) -> Encryption:
    if not (tmp_path / "keyring.json").exists():
        cli_ops.init(tmp_path / "dev.kek", tmp_path / "keyring.json",
                     protect_columns_for_keys(PROTECT))
    keys_cfg = {"provider": "local", "path": "dev.kek", "keyring": "keyring.json",
                **keys_extra}
    return Encryption(PROTECT, keys_cfg, str(tmp_path), None)


def test_config_option_reaches_every_column(tmp_path: Path) -> None:
    assert {rt.cache_size for rt in _encryption(tmp_path).columns_for("app").values()} == \
        {DEFAULT_DECRYPT_CACHE_SIZE}
    assert {rt.cache_size for rt in
            _encryption(tmp_path, decrypt_cache_size=0).columns_for("app").values()} == {0}
    assert {rt.cache_size for rt in
            _encryption(tmp_path, decrypt_cache_size=10).columns_for("app").values()} == {10}


@pytest.mark.parametrize("value,ok", [(0, True), (65536, True), (-1, False), ("big", False),
                                      (1.5, False)])
def test_schema_validates_decrypt_cache_size(value: Any, ok: bool) -> None:
    text = f"keys:\n  path: dev.kek\n  keyring: keyring.json\n  decrypt_cache_size: {value}\n"
    if ok:
        parse_text(text)
        return
    with pytest.raises(ConfigError) as info:
        parse_text(text)
    assert "decrypt_cache_size" in str(info.value) and ":4:" in str(info.value)


def test_a_new_keyring_load_starts_empty_and_a_retired_key_still_opens(
        tmp_path: Path) -> None:
    """A reload builds a new Encryption: nothing cached under the old keys answers; a
    value under a retired key is opened afresh (retired keys still decrypt)."""
    enc = _encryption(tmp_path)
    rt = enc.columns_for("app")[("public", "t", "pan")]
    env = rt.cipher.encrypt(b"4111111111111111")
    rc = RoleColumn(rt, "plaintext", None, tz=lambda: UTC)
    assert rc.cell_revealer(1)(env) == sent(b"4111111111111111")
    ring = tmp_path / "keyring.json"
    old = next(k["id"] for k in cli_ops.show(ring)
               if k["column"] == "public.t.pan" and k["purpose"] == "encrypt")
    from keys.providers.local import LocalKekProvider

    new = cli_ops.add(ring, LocalKekProvider(tmp_path / "dev.kek"), "public.t.pan")
    cli_ops.promote(ring, new, LocalKekProvider(tmp_path / "dev.kek"))
    cli_ops.retire(ring, old, LocalKekProvider(tmp_path / "dev.kek"))
    enc2 = _encryption(tmp_path)
    rt2 = enc2.columns_for("app")[("public", "t", "pan")]
    assert rt2.caches == {}
    rc2 = RoleColumn(rt2, "plaintext", None, tz=lambda: UTC)
    assert rc2.cell_revealer(1)(env) == sent(b"4111111111111111")
    assert rt2.cipher.key_id_of(rt2.cipher.encrypt(b"x")) == new


def test_no_plaintext_in_reprs() -> None:
    rt = runtime("text", "pan")
    rc = role(rt)
    env = seal(rt, b"4111111111111111")
    fn = rc.cell_revealer(0)
    assert fn(cell(env, 0)) == sent(b"4111111111111111")
    for obj in (rt, rc, fn, rt.cipher.cipher):
        assert "4111111111111111" not in repr(obj)
        assert b"4111111111111111".hex() not in repr(obj)
    assert "caches" not in repr(rt)
