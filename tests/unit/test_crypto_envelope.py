"""Envelope and ColumnCipher: round trips, tamper, AD binding, key states."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.crypto import ColumnCipher, ColumnKeys, DecryptError, Mode, Purpose
from proxy.crypto.envelope import HEADER_LEN, NONCE_LEN, TAG_LEN, Algorithm
from proxy.types import get_codec

COL = "public.cards.pan"


def keys(column: str = COL, primary: int = 1, ids: tuple[int, ...] = (1,), seed: int = 0):
    material = {i: bytes([(i + seed) % 256]) * 32 for i in ids}
    return ColumnKeys(column, Purpose.ENCRYPT, primary, material)


@pytest.fixture(params=[Mode.RANDOMIZED, Mode.DETERMINISTIC])
def mode(request: pytest.FixtureRequest) -> Mode:
    return request.param


def test_layout(mode: Mode) -> None:
    c = ColumnCipher(COL, "text", mode, keys(primary=0x01020304, ids=(0x01020304,)),
                     database="appdb")
    blob = c.encrypt(b"4111111111111111")
    assert blob[0] == 2  # bound to a database
    assert blob[1] == (Algorithm.AES_256_GCM if mode is Mode.RANDOMIZED else Algorithm.AES_SIV)
    assert blob[2:6] == bytes([1, 2, 3, 4])
    overhead = HEADER_LEN + TAG_LEN + (NONCE_LEN if mode is Mode.RANDOMIZED else 0)
    assert len(blob) == overhead + 16
    assert c.key_id_of(blob) == 0x01020304


@pytest.mark.parametrize("plain", [b"", b"x", "héllo \U0001f600".encode(), os.urandom(5000)])
def test_round_trip(mode: Mode, plain: bytes) -> None:
    c = ColumnCipher(COL, "text", mode, keys(), database="appdb")
    assert c.decrypt(c.encrypt(plain)) == plain
    assert c.decrypt(memoryview(c.encrypt(plain))) == plain
    assert c.decrypt(bytearray(c.encrypt(plain))) == plain


def test_every_logical_type_round_trips(mode: Mode) -> None:
    samples = {
        "text": b"abc",
        "varchar": b"",
        "numeric": b"1.50",
        "int4": b"-2147483648",
        "int8": b"9223372036854775807",
        "date": b"infinity",
        "timestamptz": b"2024-01-02 03:04:05.5+00",
        "bool": b"t",
        "uuid": b"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        "jsonb": b'{"a": [1, "\xc3\xa9"]}',
    }
    for typ, text in samples.items():
        codec = get_codec(typ)
        c = ColumnCipher(COL, typ, mode, keys(), database="appdb")
        canonical = codec.from_text(text)
        plain = c.decrypt(c.encrypt(canonical))
        if mode is Mode.RANDOMIZED:
            assert plain == canonical
        else:
            assert plain == codec.equality_key(canonical)


def test_deterministic_equal_and_normalized() -> None:
    c = ColumnCipher(COL, "numeric", Mode.DETERMINISTIC, keys(), database="appdb")
    assert c.encrypt(b"1.50") == c.encrypt(b"1.5") == c.encrypt(b"1.5000")
    assert c.encrypt(b"1.5") != c.encrypt(b"1.05")
    assert c.decrypt(c.encrypt(b"1.50")) == b"1.5"
    # same keys, another proxy instance: same ciphertext
    assert ColumnCipher(COL, "numeric", "deterministic", keys(),
                        database="appdb").encrypt(b"7") == c.encrypt(b"7")


def test_randomized_differs_and_keeps_display_scale() -> None:
    c = ColumnCipher(COL, "numeric", Mode.RANDOMIZED, keys(), database="appdb")
    blobs = {c.encrypt(b"1.50") for _ in range(50)}
    assert len(blobs) == 50
    assert {c.decrypt(b) for b in blobs} == {b"1.50"}


def test_tamper_any_byte(mode: Mode) -> None:
    c = ColumnCipher(COL, "text", mode, keys(), database="appdb")
    blob = c.encrypt(b"secret value")
    for i in range(len(blob)):
        for flip in (0x01, 0x80):
            bad = bytearray(blob)
            bad[i] ^= flip
            with pytest.raises(DecryptError) as info:
                c.decrypt(bytes(bad))
            err = info.value
            assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)
    for cut in range(len(blob)):
        with pytest.raises(DecryptError):
            c.decrypt(blob[:cut])
    with pytest.raises(DecryptError):
        c.decrypt(blob + b"\x00")


def test_column_and_type_swap_fail(mode: Mode) -> None:
    a = ColumnCipher(COL, "text", mode, keys(), database="appdb")
    blob = a.encrypt(b"4111111111111111")
    other_column = ColumnCipher("public.cards.cvv", "text", mode, keys("public.cards.cvv"),
                                database="appdb")
    other_type = ColumnCipher(COL, "varchar", mode, keys(), database="appdb")
    for c in (other_column, other_type):
        with pytest.raises(DecryptError):
            c.decrypt(blob)


def test_wrong_key_fails(mode: Mode) -> None:
    blob = ColumnCipher(COL, "text", mode, keys(seed=0), database="appdb").encrypt(b"x")
    with pytest.raises(DecryptError):
        ColumnCipher(COL, "text", mode, keys(seed=7), database="appdb").decrypt(blob)


def test_mode_mismatch_fails() -> None:
    blob = ColumnCipher(COL, "text", Mode.RANDOMIZED, keys(), database="appdb").encrypt(b"x")
    with pytest.raises(DecryptError):
        ColumnCipher(COL, "text", Mode.DETERMINISTIC, keys(), database="appdb").decrypt(blob)


def test_rotation_and_retired_key(mode: Mode) -> None:
    old = ColumnCipher(COL, "text", mode, keys(primary=1, ids=(1,)), database="appdb")
    blob_old = old.encrypt(b"v")
    during = ColumnCipher(COL, "text", mode, keys(primary=2, ids=(1, 2)), database="appdb")
    blob_new = during.encrypt(b"v")
    assert during.key_id_of(blob_new) == 2
    assert during.decrypt(blob_old) == during.decrypt(blob_new) == b"v"
    rotated = during.rotate(blob_old)
    assert during.key_id_of(rotated) == 2
    # key 1 retired: it is no longer among the live keys of the view
    after = ColumnCipher(COL, "text", mode, keys(primary=2, ids=(2,)), database="appdb")
    assert after.decrypt(rotated) == b"v"
    with pytest.raises(DecryptError):
        after.decrypt(blob_old)


def test_error_and_repr_leak_nothing() -> None:
    k = keys()
    c = ColumnCipher(COL, "text", Mode.RANDOMIZED, k, database="appdb")
    blob = c.encrypt(b"TOPSECRET")
    with pytest.raises(DecryptError) as info:
        c.decrypt(blob[:-1] + bytes([blob[-1] ^ 1]))
    assert str(info.value) == "decryption failed"
    for text in (repr(c), repr(k), str(info.value)):
        assert k.material(1).hex() not in text and "TOPSECRET" not in text
        assert "\\x01\\x01" not in text


def test_construction_checks() -> None:
    with pytest.raises(KeyError):
        ColumnCipher(COL, "money", Mode.RANDOMIZED, keys(), database="appdb")
    with pytest.raises(ValueError):
        ColumnCipher("public.x.y", "text", Mode.RANDOMIZED, keys(), database="appdb")
    with pytest.raises(ValueError):
        ColumnCipher(COL, "text", "fast", keys(), database="appdb")
    with pytest.raises(ValueError):
        ColumnKeys(COL, Purpose.ENCRYPT, 9, {1: b"\x00" * 32})
    with pytest.raises(ValueError):
        ColumnKeys(COL, Purpose.ENCRYPT, 1, {1: b"\x00" * 16})
    with pytest.raises(ValueError):
        ColumnKeys(COL, Purpose.ENCRYPT, 2**32, {2**32: b"\x00" * 32})
    bidx = ColumnKeys(COL, Purpose.BLIND_INDEX, 1, {1: b"\x00" * 32})
    with pytest.raises(ValueError):
        ColumnCipher(COL, "text", Mode.RANDOMIZED, bidx, database="appdb")


@given(st.binary(max_size=300), st.sampled_from(list(Mode)))
def test_encrypt_decrypt_property(plain: bytes, mode: Mode) -> None:
    c = ColumnCipher(COL, "text", mode, keys(primary=3, ids=(1, 3)), database="appdb")
    assert c.decrypt(c.encrypt(plain)) == plain


@given(st.binary(max_size=80))
def test_random_blobs_never_decrypt(blob: bytes) -> None:
    c = ColumnCipher(COL, "text", Mode.RANDOMIZED, keys(), database="appdb")
    with pytest.raises(DecryptError):
        c.decrypt(blob)


# ------------------------------------------------------------------ database binding

def _v1_envelope(mode: Mode, plain: bytes, key_id: int = 1, column: str = COL) -> bytes:
    """An envelope as written before database binding (version 1), sealed here
    independently of ColumnCipher with the old associated data."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV

    from proxy.crypto.envelope import HEADER, associated_data, siv_associated_data
    from proxy.crypto.kdf import LABEL_GCM, LABEL_SIV, derive

    dek = keys(column).material(key_id)
    if mode is Mode.RANDOMIZED:
        header = HEADER.pack(1, Algorithm.AES_256_GCM, key_id)
        nonce = os.urandom(NONCE_LEN)
        aead = AESGCM(derive(dek, LABEL_GCM, column, 32))
        return header + nonce + aead.encrypt(nonce, plain,
                                             associated_data(header, column, "text"))
    header = HEADER.pack(1, Algorithm.AES_SIV, key_id)
    siv = AESSIV(derive(dek, LABEL_SIV, column, 64))
    return header + siv.encrypt(plain, siv_associated_data(header, column, "text"))


_DB_NAMES = st.text(min_size=1, max_size=63).filter(lambda s: "\0" not in s)


@pytest.mark.parametrize("mode", [Mode.RANDOMIZED, Mode.DETERMINISTIC])
@given(home=_DB_NAMES, other=_DB_NAMES, plain=st.binary(max_size=64))
def test_bound_envelope_opens_only_in_its_database(mode: Mode, home: str, other: str,
                                                   plain: bytes) -> None:
    """An envelope copied into another database (same column, same keys) fails there."""
    blob = ColumnCipher(COL, "text", mode, keys(), database=home).encrypt(plain)
    assert ColumnCipher(COL, "text", mode, keys(), database=home).decrypt(blob) == plain
    if other != home:
        elsewhere = ColumnCipher(COL, "text", mode, keys(), database=other)
        with pytest.raises(DecryptError):
            elsewhere.decrypt(blob)
        with pytest.raises(DecryptError):
            elsewhere.opener()(blob)


@pytest.mark.parametrize("during_rotation", [False, True])
def test_bound_envelope_relabelled_unbound_fails(mode: Mode, during_rotation: bool) -> None:
    """Setting the version byte to 1 does not strip the binding: the header is AD."""
    ids = (1, 2) if during_rotation else (1,)
    c = ColumnCipher(COL, "text", mode, keys(ids=ids), database="a")
    blob = c.encrypt(b"4111")
    with pytest.raises(DecryptError):
        ColumnCipher(COL, "text", mode, keys(ids=ids), database="b").decrypt(b"\x01" + blob[1:])
    with pytest.raises(DecryptError):
        c.decrypt(b"\x01" + blob[1:])


@pytest.mark.parametrize("during_rotation", [False, True])
def test_unbound_envelope_opens_counted_unless_required(mode: Mode,
                                                        during_rotation: bool) -> None:
    ids = (1, 2) if during_rotation else (1,)
    old = _v1_envelope(mode, b"4111")
    c = ColumnCipher(COL, "text", mode, keys(ids=ids), database="a")
    assert c.decrypt(old) == b"4111"
    assert c.opener()(old) == b"4111"
    assert c.unbound_opened == 2
    assert not c.is_bound(old)
    upgraded = c.rotate(old)
    assert c.is_bound(upgraded) and c.key_id_of(upgraded) == 1
    assert c.decrypt(upgraded) == b"4111"
    assert c.unbound_opened == 3  # the rotation opened it once more; the upgraded one is not
    strict = ColumnCipher(COL, "text", mode, keys(ids=ids), database="a", accept_unbound=False)
    for open_ in (strict.decrypt, strict.opener()):
        with pytest.raises(DecryptError):
            open_(old)
    assert strict.decrypt(upgraded) == b"4111"
    tampered = old[:-1] + bytes([old[-1] ^ 1])
    with pytest.raises(DecryptError):
        c.decrypt(tampered)
    assert c.unbound_opened == 3


def test_cipher_needs_a_database() -> None:
    with pytest.raises(ValueError):
        ColumnCipher(COL, "text", Mode.RANDOMIZED, keys(), database="")
