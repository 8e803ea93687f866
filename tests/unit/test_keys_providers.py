"""KEK providers: local file, environment variable, and PKCS#11 against a real SoftHSM2.

The SoftHSM2 test does not skip: a missing softhsm2-util, module or python-pkcs11 is a
failure, because the HSM path is what production deployments rely on.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from keys.providers.base import KekProvider, UnwrapError
from keys.providers.env import EnvKekError, EnvKekProvider, generate_env_value
from keys.providers.local import KekFileError, LocalKekProvider, init_kek_file

SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
DEK = bytes(range(32))


def check_provider(p: KekProvider) -> None:
    blob = p.wrap(DEK, b"entry-1")
    assert DEK not in blob
    assert p.unwrap(blob, b"entry-1") == DEK
    assert p.wrap(DEK, b"entry-1") != blob  # random nonce
    with pytest.raises(UnwrapError):
        p.unwrap(blob, b"entry-2")
    for i in range(len(blob)):
        bad = bytearray(blob)
        bad[i] ^= 1
        with pytest.raises(UnwrapError):
            p.unwrap(bytes(bad), b"entry-1")
    with pytest.raises(UnwrapError):
        p.unwrap(blob[:10], b"entry-1")
    assert p.key_id and p.key_id in p.description
    assert DEK.hex() not in repr(p)


def test_local(tmp_path: Path) -> None:
    path = tmp_path / "dev.kek"
    os.umask(0o022)
    init_kek_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.stat().st_size == 32
    with pytest.raises(FileExistsError):
        init_kek_file(path)
    p = LocalKekProvider(path)
    check_provider(p)
    assert path.read_bytes().hex() not in repr(p) + p.key_id
    assert LocalKekProvider(path).key_id == p.key_id  # stable
    blob = p.wrap(DEK)
    init_kek_file(tmp_path / "other.kek")
    with pytest.raises(UnwrapError):
        LocalKekProvider(tmp_path / "other.kek").unwrap(blob)


def test_local_refuses_bad_files(tmp_path: Path) -> None:
    with pytest.raises(KekFileError):
        LocalKekProvider(tmp_path / "missing")
    path = tmp_path / "open.kek"
    init_kek_file(path)
    path.chmod(0o644)
    with pytest.raises(KekFileError, match="chmod"):
        LocalKekProvider(path)
    short = tmp_path / "short.kek"
    short.write_bytes(b"x" * 31)
    short.chmod(0o600)
    with pytest.raises(KekFileError):
        LocalKekProvider(short)


def test_env() -> None:
    value = generate_env_value()
    p = EnvKekProvider(environ={"STRONGROOM_KEK": value})
    check_provider(p)
    assert value not in repr(p) + p.description
    for env in ({}, {"STRONGROOM_KEK": "***"}, {"STRONGROOM_KEK": "AAAA"}):
        with pytest.raises(EnvKekError) as info:
            EnvKekProvider(environ=env)
        assert "***" not in str(info.value)


def test_wrap_self_check_catches_broken_provider() -> None:
    class Broken(KekProvider):
        kind = "broken"
        key_id = "broken:1"  # type: ignore[assignment]

        def _wrap(self, dek: bytes, associated_data: bytes) -> bytes:
            return b"\x00" * 40

        def _unwrap(self, blob: bytes, associated_data: bytes) -> bytes:
            return b"\x01" * 32

    with pytest.raises(UnwrapError, match="broken"):
        Broken().wrap(DEK)


@pytest.fixture(scope="module")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    util = shutil.which("softhsm2-util")
    assert util, "softhsm2-util not installed (apt-get install softhsm2): test cannot run"
    assert Path(SOFTHSM_MODULE).exists(), f"{SOFTHSM_MODULE} missing"
    base = tmp_path_factory.mktemp("softhsm")
    (base / "tokens").mkdir()
    conf = base / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {base / 'tokens'}\nobjectstore.backend = file\n"
        "log.level = ERROR\nslots.removable = false\n"
    )
    os.environ["SOFTHSM2_CONF"] = str(conf)  # read by the module at C_Initialize
    subprocess.run(
        [
            util,
            "--init-token",
            "--free",
            "--label",
            "strongroom-test",
            "--pin",
            "1234",
            "--so-pin",
            "5678",
        ],
        check=True,
        capture_output=True,
    )
    return {"token_label": "strongroom-test", "pin": "1234", "module": SOFTHSM_MODULE}


def test_pkcs11_softhsm_round_trip(softhsm: dict[str, str]) -> None:
    from keys.providers.pkcs11 import Pkcs11KekError, Pkcs11KekProvider, create_kek

    create_kek(softhsm["module"], softhsm["token_label"], softhsm["pin"], "kek-1")
    with pytest.raises(Pkcs11KekError, match="already exists"):
        create_kek(softhsm["module"], softhsm["token_label"], softhsm["pin"], "kek-1")
    p = Pkcs11KekProvider(softhsm["token_label"], softhsm["pin"], "kek-1", softhsm["module"])
    try:
        check_provider(p)
        assert p.key_id == "pkcs11:strongroom-test/kek-1"
        assert softhsm["pin"] not in repr(p)
        # a second key on the same token cannot unwrap what the first wrapped
        create_kek(softhsm["module"], softhsm["token_label"], softhsm["pin"], "kek-2")
        other = Pkcs11KekProvider(softhsm["token_label"], softhsm["pin"], "kek-2")
        with pytest.raises(UnwrapError):
            other.unwrap(p.wrap(DEK))
        other.close()
    finally:
        p.close()
    with pytest.raises(Pkcs11KekError):
        Pkcs11KekProvider(softhsm["token_label"], softhsm["pin"], "no-such-key")
    with pytest.raises(Pkcs11KekError) as info:
        Pkcs11KekProvider(softhsm["token_label"], "9999", "kek-1")
    assert "9999" not in str(info.value)


def test_pkcs11_keyring_end_to_end(softhsm: dict[str, str], tmp_path: Path) -> None:
    from keys import cli_ops
    from keys import keyring as kr
    from keys.providers.pkcs11 import Pkcs11KekProvider, create_kek
    from proxy.crypto import ColumnCipher

    create_kek(softhsm["module"], softhsm["token_label"], softhsm["pin"], "kek-ring")
    p = Pkcs11KekProvider(softhsm["token_label"], softhsm["pin"], "kek-ring")
    try:
        ring_path = tmp_path / "keyring.json"
        cli_ops.init(None, ring_path, ["public.t.c"], provider=p)
        keys = kr.load(ring_path, p).column_keys("public.t.c", "encrypt", p)
        c = ColumnCipher("public.t.c", "text", "randomized", keys, database="appdb")
        assert c.decrypt(c.encrypt(b"hsm")) == b"hsm"
    finally:
        p.close()


def test_rewrap_moves_a_keyring_to_the_hsm_and_back(softhsm: dict[str, str],
                                                    tmp_path: Path) -> None:
    """KEK rotation / provider move: same DEKs, new wrapping, old ciphertexts still open."""
    from keys import cli_ops
    from keys import keyring as kr
    from keys.providers.pkcs11 import Pkcs11KekProvider, create_kek
    from proxy.crypto import ColumnCipher

    local = LocalKekProvider(init_kek_file(tmp_path / "kek"))
    ring_path = tmp_path / "keyring.json"
    cli_ops.init(None, ring_path, {"public.t.c": {"search": "blind_index"}}, provider=local)
    ring = kr.load(ring_path, local)
    ring, spare = ring.add("public.t.c", "encrypt", local)
    ring = ring.retire(spare)  # retired entries move too
    kr.save(ring, ring_path, local)
    before = ColumnCipher("public.t.c", "text", "randomized",
                          ring.column_keys("public.t.c", "encrypt", local), database="appdb")
    sealed = before.encrypt(b"4111111111111111")

    create_kek(softhsm["module"], softhsm["token_label"], softhsm["pin"], "kek-move")
    hsm = Pkcs11KekProvider(softhsm["token_label"], softhsm["pin"], "kek-move")
    try:
        hsm_path = tmp_path / "keyring-hsm.json"
        assert cli_ops.rewrap(ring_path, local, hsm, hsm_path) == hsm.key_id
        moved = kr.load(hsm_path, hsm)
        assert moved.kek_id == hsm.key_id
        assert moved.describe() == ring.describe()
        assert all(moved.get(e.id).wrapped != e.wrapped for e in ring.entries)
        after = ColumnCipher("public.t.c", "text", "randomized",
                             moved.column_keys("public.t.c", "encrypt", hsm), database="appdb")
        assert after.decrypt(sealed) == b"4111111111111111"
        with pytest.raises(kr.KeyringError, match="wrapped by KEK"):
            moved.column_keys("public.t.c", "encrypt", local)  # the old KEK is out
        with pytest.raises(kr.KeyringError, match="exists"):
            cli_ops.rewrap(ring_path, local, hsm, hsm_path)  # never overwrites another file
        with pytest.raises(kr.KeyringError, match="current one"):
            cli_ops.rewrap(hsm_path, hsm, hsm)
        with pytest.raises(kr.KeyringError, match="wrapped by KEK"):
            cli_ops.rewrap(hsm_path, local, hsm)  # the wrong "current" KEK
        # and back, in place
        cli_ops.rewrap(hsm_path, hsm, local)
        back = kr.load(hsm_path, local)
        assert back.kek_id == local.key_id
        again = ColumnCipher("public.t.c", "text", "randomized",
                             back.column_keys("public.t.c", "encrypt", local), database="appdb")
        assert again.decrypt(sealed) == b"4111111111111111"
    finally:
        hsm.close()


# ---------------------------------------------------------------- aws_kms (moto's KMS)


@pytest.fixture
def kms(monkeypatch: pytest.MonkeyPatch) -> Any:
    """boto3 against moto's in-process KMS (real request/response handling, AES-GCM
    ciphertext blobs bound to the encryption context), with throwaway credentials."""
    import boto3
    from moto import mock_aws

    for var, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                       ("AWS_DEFAULT_REGION", "eu-central-1")):
        monkeypatch.setenv(var, value)
    with mock_aws():
        yield boto3.client("kms", region_name="eu-central-1")


def test_aws_kms_round_trip_and_refusals(kms: Any) -> None:
    from keys.providers.aws_kms import AwsKmsError, AwsKmsKekProvider

    key = kms.create_key(Description="strongroom KEK")["KeyMetadata"]
    kms.create_alias(AliasName="alias/strongroom", TargetKeyId=key["KeyId"])
    p = AwsKmsKekProvider("alias/strongroom", region="eu-central-1")
    check_provider(p)
    assert p.key_id == f"aws-kms:{key['Arn']}"  # the alias is resolved: aliases move
    other = AwsKmsKekProvider(kms.create_key()["KeyMetadata"]["KeyId"])
    with pytest.raises(UnwrapError):  # another key cannot open it
        other.unwrap(p.wrap(DEK, b"entry"), b"entry")
    with pytest.raises(UnwrapError):  # another entry's context
        p.unwrap(p.wrap(DEK, b"entry"), b"entry2")
    kms.disable_key(KeyId=key["KeyId"])
    with pytest.raises(AwsKmsError, match="Disabled"):
        AwsKmsKekProvider(key["KeyId"])
    signing = kms.create_key(KeyUsage="SIGN_VERIFY", KeySpec="RSA_2048")["KeyMetadata"]
    with pytest.raises(AwsKmsError, match="symmetric"):
        AwsKmsKekProvider(signing["KeyId"])
    with pytest.raises(AwsKmsError, match="NotFound"):
        AwsKmsKekProvider("alias/nope")


def test_aws_kms_keyring_end_to_end(kms: Any, tmp_path: Path) -> None:
    from keys import cli_ops
    from keys import keyring as kr
    from keys.providers.aws_kms import AwsKmsKekProvider
    from proxy.crypto import ColumnCipher

    local = LocalKekProvider(init_kek_file(tmp_path / "kek"))
    ring_path = tmp_path / "keyring.json"
    cli_ops.init(None, ring_path, ["public.t.c"], provider=local)
    sealed = ColumnCipher("public.t.c", "text", "randomized", kr.load(
        ring_path, local).column_keys("public.t.c", "encrypt", local),
        database="appdb").encrypt(b"DE89370400440532013000")
    p = AwsKmsKekProvider(kms.create_key()["KeyMetadata"]["KeyId"])
    cli_ops.rewrap(ring_path, local, p)  # local file -> KMS, in place
    ring = kr.load(ring_path, p)
    assert ring.kek_id == p.key_id
    cipher = ColumnCipher("public.t.c", "text", "randomized",
                          ring.column_keys("public.t.c", "encrypt", p), database="appdb")
    assert cipher.decrypt(sealed) == b"DE89370400440532013000"
    # KMS binds each wrapped DEK to its entry through the encryption context
    e = ring.entries[0]
    with pytest.raises(UnwrapError):
        p.unwrap(e.wrapped, kr.dek_associated_data(e.id + 1, e.column, e.purpose))


def test_pkcs11_pin_leaves_the_environment(softhsm: dict[str, str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The PIN variable is read once and removed: children do not inherit it, and a
    second provider (a reload) still finds the PIN."""
    from keys.providers.pkcs11 import create_kek
    from proxy.encryption import make_provider

    create_kek(softhsm["module"], softhsm["token_label"], softhsm["pin"], "kek-pin-env")
    monkeypatch.setenv("STRONGROOM_TEST_HSM_PIN", softhsm["pin"])
    cfg = {"provider": "pkcs11", "token_label": softhsm["token_label"],
           "key_label": "kek-pin-env", "module": softhsm["module"],
           "pin_env": "STRONGROOM_TEST_HSM_PIN"}
    first = make_provider(cfg, ".")
    try:
        assert "STRONGROOM_TEST_HSM_PIN" not in os.environ
        child = subprocess.run(["env"], capture_output=True, text=True, check=True).stdout
        assert "STRONGROOM_TEST_HSM_PIN" not in child
        again = make_provider(cfg, ".")
        assert again.unwrap(first.wrap(DEK)) == DEK
        again.close()
    finally:
        first.close()
