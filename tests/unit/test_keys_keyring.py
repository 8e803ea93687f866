"""Keyring: state machine, persistence, permissions, unwrapping, CLI operations."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from keys import cli_ops
from keys import keyring as kr
from keys.keyring import KeyringError, KeyState
from keys.providers.env import EnvKekProvider, generate_env_value
from keys.providers.local import LocalKekProvider, init_kek_file
from proxy.crypto import BlindIndex, ColumnCipher, DecryptError, Mode, Purpose

COL = "public.cards.pan"


@pytest.fixture
def provider(tmp_path: Path) -> LocalKekProvider:
    init_kek_file(tmp_path / "dev.kek")
    return LocalKekProvider(tmp_path / "dev.kek")


def fresh(provider: LocalKekProvider) -> tuple[kr.Keyring, int]:
    ring, k1 = kr.new_keyring(provider).add(COL, "encrypt", provider)
    return ring.promote(k1), k1


def test_add_starts_decrypt_only_and_promote_swaps(provider: LocalKekProvider) -> None:
    ring, k1 = kr.new_keyring(provider).add(COL, Purpose.ENCRYPT, provider)
    assert ring.get(k1).state is KeyState.DECRYPT_ONLY
    assert ring.primary(COL, "encrypt") is None
    with pytest.raises(KeyringError):
        ring.column_keys(COL, "encrypt", provider)  # no active key yet
    ring = ring.promote(k1)
    ring, k2 = ring.add(COL, "encrypt", provider)
    assert ring.primary(COL, "encrypt").id == k1  # type: ignore[union-attr]
    ring = ring.promote(k2)
    assert ring.get(k2).state is KeyState.ACTIVE
    assert ring.get(k1).state is KeyState.DECRYPT_ONLY
    ring = ring.retire(k1)
    assert ring.get(k1).state is KeyState.RETIRED


def test_illegal_transitions(provider: LocalKekProvider) -> None:
    ring, k1 = fresh(provider)
    with pytest.raises(KeyringError, match="primary"):
        ring.retire(k1)
    with pytest.raises(KeyringError):
        ring.promote(k1)  # already active
    ring, k2 = ring.add(COL, "encrypt", provider)
    ring = ring.promote(k2).retire(k1)
    with pytest.raises(KeyringError):
        ring.promote(k1)  # retired keys never come back as primary
    with pytest.raises(KeyringError):
        ring.retire(k1)
    with pytest.raises(KeyringError):
        ring.promote(12345)
    with pytest.raises(KeyringError):
        ring.add("cards.pan", "encrypt", provider)
    with pytest.raises(ValueError):
        ring.add(COL, "signing", provider)


def test_purposes_are_independent(provider: LocalKekProvider) -> None:
    ring, _ = fresh(provider)
    ring, b1 = ring.add(COL, "blind_index", provider)
    ring = ring.promote(b1)
    ring, b2 = ring.add(COL, "blind_index", provider)
    ring = ring.promote(b2)
    assert ring.primary(COL, "encrypt").state is KeyState.ACTIVE  # type: ignore[union-attr]
    assert ring.get(b1).state is KeyState.DECRYPT_ONLY


def test_rotation_end_to_end(provider: LocalKekProvider) -> None:
    ring, k1 = fresh(provider)
    c1 = ColumnCipher(COL, "text", Mode.RANDOMIZED, ring.column_keys(COL, "encrypt", provider),
                      database="appdb")
    old = c1.encrypt(b"4111111111111111")
    ring, k2 = ring.add(COL, "encrypt", provider)
    c_added = ColumnCipher(COL, "text", "randomized", ring.column_keys(COL, "encrypt", provider),
                           database="appdb")
    assert c_added.key_id_of(c_added.encrypt(b"x")) == k1  # added keys do not write yet
    ring = ring.promote(k2)
    c2 = ColumnCipher(COL, "text", "randomized", ring.column_keys(COL, "encrypt", provider),
                      database="appdb")
    new = c2.rotate(old)
    assert c2.key_id_of(new) == k2 and c2.decrypt(old) == b"4111111111111111"
    ring = ring.retire(k1)
    c3 = ColumnCipher(COL, "text", "randomized", ring.column_keys(COL, "encrypt", provider),
                      database="appdb")
    assert c3.decrypt(new) == b"4111111111111111"
    # a retired key never writes, but still opens what it wrote (a restored backup)
    assert c3.decrypt(old) == b"4111111111111111"
    assert c3.key_id_of(c3.encrypt(b"x")) == k2
    with pytest.raises(KeyringError, match="unretire"):
        ring.promote(k1)
    ring = ring.unretire(k1)
    assert ring.get(k1).state is KeyState.DECRYPT_ONLY
    with pytest.raises(KeyringError, match="not retired"):
        ring.unretire(k1)
    with pytest.raises(DecryptError):  # a key that is not in the keyring opens nothing
        ColumnCipher(COL, "text", "randomized",
                     fresh(provider)[0].column_keys(COL, "encrypt", provider),
                     database="appdb").decrypt(old)


def test_a_retired_blind_index_key_takes_no_part_in_lookups(provider: LocalKekProvider,
                                                            ) -> None:
    ring, b1 = kr.new_keyring(provider).add(COL, "blind_index", provider)
    ring, b2 = ring.promote(b1).add(COL, "blind_index", provider)
    ring = ring.promote(b2)
    assert len(BlindIndex(COL, "text", ring.column_keys(COL, "blind_index", provider)
                          ).lookup_values(b"v")) == 2
    ring = ring.retire(b1)
    assert BlindIndex(COL, "text", ring.column_keys(COL, "blind_index", provider)
                      ).lookup_values(b"v") == [
        BlindIndex(COL, "text", ring.column_keys(COL, "blind_index", provider)).compute(b"v")]


def test_blind_index_dual_lookup_from_keyring(provider: LocalKekProvider) -> None:
    ring, b1 = kr.new_keyring(provider).add(COL, "blind_index", provider)
    ring = ring.promote(b1)
    before = BlindIndex(COL, "text", ring.column_keys(COL, "blind_index", provider))
    ring, b2 = ring.add(COL, "blind_index", provider)
    ring = ring.promote(b2)
    during = BlindIndex(COL, "text", ring.column_keys(COL, "blind_index", provider))
    assert before.compute(b"v") in during.lookup_values(b"v")
    assert len(during.lookup_values(b"v")) == 2


def test_save_load_atomic_and_private(provider: LocalKekProvider, tmp_path: Path) -> None:
    ring, k1 = fresh(provider)
    path = tmp_path / "keyring.json"
    os.umask(0o022)
    kr.save(ring, path, provider)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert kr.load(path, provider) == ring
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    keys = ring.column_keys(COL, "encrypt", provider)
    text = path.read_text()
    assert keys.material(k1).hex() not in text
    loaded = kr.load(path, provider)
    assert loaded.column_keys(COL, "encrypt", provider).material(k1) == keys.material(k1)


def test_load_rejects_malformed(tmp_path: Path, provider: LocalKekProvider) -> None:
    path = tmp_path / "k.json"
    ring, k1 = fresh(provider)
    doc = json.loads(ring.to_json(provider))
    bad_docs = [
        "not json",
        json.dumps({**doc, "format": 3}),
        json.dumps({**doc, "keys": doc["keys"] * 2}),  # duplicate ids
        json.dumps({**doc, "keys": [{**doc["keys"][0], "state": "dormant"}]}),
        json.dumps({**doc, "keys": [{**doc["keys"][0], "id": -1}]}),
        json.dumps({**doc, "keys": [{**doc["keys"][0], "wrapped": "!!"}]}),
        json.dumps({**doc, "keys": [doc["keys"][0], {**doc["keys"][0], "id": k1 + 1}]}),
    ]
    for text in bad_docs:
        path.write_text(text)
        with pytest.raises(KeyringError):
            kr.load(path, provider)


def test_wrapped_dek_bound_to_its_entry(provider: LocalKekProvider) -> None:
    ring, k1 = fresh(provider)
    ring, k2 = ring.add("public.cards.cvv", "encrypt", provider)
    ring = ring.promote(k2)
    doc = json.loads(ring.to_json(provider))
    by_id = {e["id"]: e for e in doc["keys"]}
    by_id[k1]["wrapped"], by_id[k2]["wrapped"] = by_id[k2]["wrapped"], by_id[k1]["wrapped"]
    # (the keyring MAC refuses this file as a whole; here: the per-entry AD alone)
    swapped, _ = kr.parse_unverified(json.dumps(doc))
    with pytest.raises(KeyringError, match="unwrap"):
        swapped.column_keys(COL, "encrypt", provider)


def test_other_kek_refused(provider: LocalKekProvider) -> None:
    ring, _ = fresh(provider)
    other = EnvKekProvider(environ={"STRONGROOM_KEK": generate_env_value()})
    with pytest.raises(KeyringError, match="KEK"):
        ring.column_keys(COL, "encrypt", other)
    with pytest.raises(KeyringError, match="KEK"):
        ring.add(COL, "encrypt", other)


def test_describe_has_no_key_material(provider: LocalKekProvider) -> None:
    ring, k1 = fresh(provider)
    (row,) = ring.describe()
    assert set(row) == {"id", "column", "purpose", "state", "created_at"}
    assert row["id"] == k1 and row["state"] == "active" and row["created_at"].endswith("Z")
    assert "wrapped" not in repr(ring.entries[0]) or "b'" not in repr(ring.entries[0])


def test_cli_ops(tmp_path: Path) -> None:
    kek, ring_path = tmp_path / "dev.kek", tmp_path / "keyring.json"
    protect = {
        COL: {"type": "text", "mode": "randomized", "search": "blind_index"},
        "public.accounts.iban": {"type": "text", "mode": "deterministic"},
    }
    rows = cli_ops.init(kek, ring_path, protect)
    assert stat.S_IMODE(kek.stat().st_mode) == 0o600
    assert stat.S_IMODE(ring_path.stat().st_mode) == 0o600
    assert sorted((r["column"], r["purpose"], r["state"]) for r in rows) == [
        ("public.accounts.iban", "encrypt", "active"),
        (COL, "blind_index", "active"),
        (COL, "encrypt", "active"),
    ]
    again = cli_ops.init(kek, ring_path, [COL, "public.accounts.iban"])  # idempotent
    assert again == cli_ops.show(ring_path) == rows
    provider = LocalKekProvider(kek)
    new = cli_ops.add(ring_path, provider, COL)
    assert {r["id"]: r["state"] for r in cli_ops.show(ring_path)}[new] == "decrypt_only"
    old = next(r["id"] for r in rows if r["column"] == COL and r["purpose"] == "encrypt")
    with pytest.raises(KeyringError):
        cli_ops.retire(ring_path, old, provider)
    cli_ops.promote(ring_path, new, provider)
    cli_ops.retire(ring_path, old, provider)
    states = {r["id"]: r["state"] for r in cli_ops.show(ring_path, provider)}
    assert states[new] == "active" and states[old] == "retired"
    with pytest.raises(TypeError):
        cli_ops.init(kek, ring_path, COL)


# ------------------------------------------------------------- authentication (issue 17)


def _saved(provider: LocalKekProvider, tmp_path: Path) -> tuple[Path, int, int]:
    """A saved keyring with a retired old key and an active new one: (path, old, new)."""
    ring, old = fresh(provider)
    ring, new = ring.add(COL, "encrypt", provider)
    ring = ring.promote(new).retire(old)
    path = tmp_path / "keyring.json"
    kr.save(ring, path, provider)
    return path, old, new


def _edited(path: Path, change: object) -> None:
    doc = json.loads(path.read_text())
    change(doc)  # type: ignore[operator]
    path.write_text(json.dumps(doc))


def _by_id(doc: dict, key_id: int) -> dict:
    return next(k for k in doc["keys"] if k["id"] == key_id)


def test_every_field_of_the_keyring_is_authenticated(
    provider: LocalKekProvider, tmp_path: Path
) -> None:
    """Each edit a writer of the file could make is refused by `load`, including those
    the per-entry associated data cannot see (states, times, the KEK id)."""
    path, old, new = _saved(provider, tmp_path)
    pristine = path.read_text()
    edits = {
        "retired -> decrypt_only": lambda d: _by_id(d, old).update(state="decrypt_only"),
        "active/retired swapped": lambda d: (_by_id(d, old).update(state="active"),
                                             _by_id(d, new).update(state="retired")),
        "created_at": lambda d: _by_id(d, new).update(created_at="2001-01-01T00:00:00Z"),
        "entry removed": lambda d: d.update(keys=[_by_id(d, new)]),
        "mac replaced": lambda d: d.update(mac=d["mac"][:-4] + "AAA="),
        "mac_key replaced": lambda d: d.update(mac_key=_by_id(d, old)["wrapped"]),
        "wrapped changed": lambda d: _by_id(d, old).update(wrapped=_by_id(d, new)["wrapped"]),
    }
    for name, change in edits.items():
        path.write_text(pristine)
        _edited(path, change)
        with pytest.raises(kr.KeyringAuthError):
            kr.load(path, provider)
            pytest.fail(f"accepted an edit: {name}")
    path.write_text(pristine)
    assert kr.load(path, provider).get(old).state is KeyState.RETIRED


def test_the_mac_does_not_verify_under_another_kek(
    provider: LocalKekProvider, tmp_path: Path
) -> None:
    """A keyring forged under the attacker's own KEK (kek_id rewritten) is refused."""
    path, _, _ = _saved(provider, tmp_path)
    other = EnvKekProvider(environ={"STRONGROOM_KEK": generate_env_value()})
    forged = kr.parse_unverified(path.read_text())[0]
    forged = kr.Keyring(other.key_id, forged.entries, kr.new_mac_key(other))
    (tmp_path / "forged.json").write_text(forged.to_json(other))
    _edited(tmp_path / "forged.json", lambda d: d.update(kek_id=provider.key_id))
    with pytest.raises(kr.KeyringAuthError):
        kr.load(tmp_path / "forged.json", provider)


def _unsealed(path: Path) -> None:
    """The file as a release before keyring MACs wrote it (format 1, no mac_key/mac)."""
    def change(d: dict) -> None:
        d["format"] = 1
        del d["mac"], d["mac_key"]
    _edited(path, change)


def test_an_unsealed_keyring_is_refused_until_sealed(
    provider: LocalKekProvider, tmp_path: Path
) -> None:
    path, old, _ = _saved(provider, tmp_path)
    _unsealed(path)
    with pytest.raises(kr.KeyringUnsealedError, match="keys seal"):
        kr.load(path, provider)
    with pytest.raises(kr.KeyringUnsealedError):
        cli_ops.promote(path, old, provider)
    other = EnvKekProvider(environ={"STRONGROOM_KEK": generate_env_value()})
    with pytest.raises(KeyringError, match="KEK"):
        cli_ops.seal(path, other)  # only the keyring's own KEK seals it
    assert cli_ops.seal(path, provider) is True
    assert kr.load(path, provider).get(old).state is KeyState.RETIRED
    assert cli_ops.seal(path, provider) is False  # sealed already: verified, unchanged
    _edited(path, lambda d: _by_id(d, old).update(state="decrypt_only"))
    with pytest.raises(kr.KeyringAuthError):
        cli_ops.seal(path, provider)  # no re-sealing over an edit


def test_seal_refuses_entries_that_do_not_unwrap(
    provider: LocalKekProvider, tmp_path: Path
) -> None:
    path, old, new = _saved(provider, tmp_path)
    _unsealed(path)
    _edited(path, lambda d: _by_id(d, old).update(wrapped=_by_id(d, new)["wrapped"]))
    with pytest.raises(KeyringError, match="unwrap failed"):
        cli_ops.seal(path, provider)


@pytest.mark.parametrize("mode", [0o620, 0o602, 0o666])
def test_group_or_world_writable_keyring_file_is_refused(
    provider: LocalKekProvider, tmp_path: Path, mode: int
) -> None:
    path, old, _ = _saved(provider, tmp_path)
    os.chmod(path, mode)
    for call in (lambda: kr.load(path, provider), lambda: cli_ops.show(path),
                 lambda: cli_ops.unretire(path, old, provider)):
        with pytest.raises(KeyringError, match="group- or world-writable"):
            call()
    os.chmod(path, 0o640)  # readable by the group is fine: it holds wrapped keys only
    kr.load(path, provider)


def test_group_or_world_writable_keyring_directory_is_refused(
    provider: LocalKekProvider, tmp_path: Path
) -> None:
    d = tmp_path / "keys"
    d.mkdir(mode=0o700)
    ring, _ = fresh(provider)
    kr.save(ring, d / "keyring.json", provider)
    os.chmod(d, 0o777)
    try:
        with pytest.raises(KeyringError, match="directory of the keyring"):
            kr.load(d / "keyring.json", provider)
        with pytest.raises(KeyringError, match="directory of the keyring"):
            kr.save(ring, d / "keyring.json", provider)
    finally:
        os.chmod(d, 0o700)


def test_keyring_reached_through_a_directory_others_may_write_is_refused(
    provider: LocalKekProvider, tmp_path: Path
) -> None:
    """Checking the keyring's own directory is not enough: whoever may write any
    directory on the way to it can rename that directory (or the symlink the
    configuration names) and put another, still authentic, keyring in its place (an
    older one, with a retired key live again). So every directory from the keyring up to
    the root, on the path as named and as resolved, must be closed to group and others
    (a sticky directory such as /tmp is fine: others cannot rename what they do not own)."""
    ring, _ = fresh(provider)
    shared = tmp_path / "shared"
    keys = shared / "keys"
    keys.mkdir(parents=True, mode=0o700)
    kr.save(ring, keys / "keyring.json", provider)
    os.chmod(shared, 0o777)  # an ancestor others may write
    try:
        with pytest.raises(KeyringError, match="group- or world-writable"):
            kr.load(keys / "keyring.json", provider)
        os.chmod(shared, 0o1777)  # sticky: entries cannot be renamed by others
        kr.load(keys / "keyring.json", provider)
        os.chmod(shared, 0o700)
        # A symlink in a directory others may write, to a keyring in a closed one.
        drop = tmp_path / "drop"
        drop.mkdir(mode=0o700)
        (drop / "keyring.json").symlink_to(keys / "keyring.json")
        kr.load(drop / "keyring.json", provider)
        os.chmod(drop, 0o777)
        with pytest.raises(KeyringError, match="group- or world-writable"):
            kr.load(drop / "keyring.json", provider)
    finally:
        os.chmod(shared, 0o700)
