"""`pkcs11` KEK provider: an AES-256 key inside an HSM token; it never leaves the token.

DEKs are wrapped with CKM_AES_GCM computed by the token, with associated data binding the
keyring entry (plain C_Encrypt/C_Decrypt, since CKM_AES_KEY_WRAP has no associated data and
works on key objects we would then have to extract). Blob: `0x01 | nonce (12) | ct ‖ tag`.
The nonce comes from the host's CSPRNG; HSMs that insist on generating GCM IVs themselves
(some FIPS modes) are not supported yet.

Tested against SoftHSM2 (`/usr/lib/softhsm/libsofthsm2.so`). The PIN is passed in by the
caller (from an env var or a file, never the config file) and is not kept after login.
"""

from __future__ import annotations

import os
import threading

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.exceptions import PKCS11Error
from pkcs11.mechanisms import GCMParams

from keys.providers.base import KekProvider, ProviderError, UnwrapError

DEFAULT_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
WRAP_VERSION = 1
_AD_LABEL = b"strongroom/v1/kek-wrap\x00"
_libs: dict[str, pkcs11.lib] = {}
_libs_lock = threading.Lock()


class Pkcs11KekError(ProviderError):
    """Token, PIN or key not usable. Messages name labels, never the PIN."""


def _lib(module: str) -> pkcs11.lib:
    # A PKCS#11 module may be initialized once per process; share it.
    with _libs_lock:
        if module not in _libs:
            _libs[module] = pkcs11.lib(module)
        return _libs[module]


def _open(token: pkcs11.Token, pin: str, rw: bool = False) -> pkcs11.Session:
    """Open a logged-in session. Login is per token and process in PKCS#11: if another
    session of ours is logged in already, a new session shares that login."""
    try:
        return token.open(rw=rw, user_pin=pin)
    except pkcs11.exceptions.UserAlreadyLoggedIn:
        return token.open(rw=rw)


def create_kek(module: str, token_label: str, pin: str, key_label: str) -> None:
    """Generate a non-extractable, sensitive AES-256 key on the token (`keys init`)."""
    try:
        token = _lib(module).get_token(token_label=token_label)
        with _open(token, pin, rw=True) as session:
            try:
                session.get_key(ObjectClass.SECRET_KEY, KeyType.AES, label=key_label)
            except pkcs11.NoSuchKey:
                pass
            else:
                raise Pkcs11KekError(f"key {key_label!r} already exists on token {token_label!r}")
            session.generate_key(
                KeyType.AES,
                256,
                label=key_label,
                store=True,
                template={
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False,
                    Attribute.ENCRYPT: True,
                    Attribute.DECRYPT: True,
                    Attribute.WRAP: False,
                    Attribute.UNWRAP: False,
                    Attribute.SIGN: False,
                    Attribute.VERIFY: False,
                },
            )
    except PKCS11Error as exc:
        raise Pkcs11KekError(
            f"cannot create key on token {token_label!r}: {type(exc).__name__}"
        ) from None


class Pkcs11KekProvider(KekProvider):
    """KEK = the AES key labelled `key_label` on the token labelled `token_label`."""

    kind = "pkcs11"

    def __init__(
        self, token_label: str, pin: str, key_label: str, module: str = DEFAULT_MODULE
    ) -> None:
        self.module = module
        self.token_label = token_label
        self.key_label = key_label
        self._lock = threading.Lock()  # a PKCS#11 session is not for concurrent use
        try:
            token = _lib(module).get_token(token_label=token_label)
            self._session = _open(token, pin)
            self._key = self._session.get_key(ObjectClass.SECRET_KEY, KeyType.AES, label=key_label)
        except pkcs11.NoSuchKey:
            self.close()
            raise Pkcs11KekError(f"no AES key {key_label!r} on token {token_label!r}") from None
        except PKCS11Error as exc:
            self.close()
            raise Pkcs11KekError(
                f"cannot use token {token_label!r} via {module}: {type(exc).__name__}"
            ) from None

    @property
    def key_id(self) -> str:
        return f"pkcs11:{self.token_label}/{self.key_label}"

    def _wrap(self, dek: bytes, associated_data: bytes) -> bytes:
        nonce = os.urandom(12)
        params = GCMParams(nonce, _AD_LABEL + associated_data, 128)
        with self._lock:
            sealed = self._key.encrypt(dek, mechanism=Mechanism.AES_GCM, mechanism_param=params)
        return bytes((WRAP_VERSION,)) + nonce + bytes(sealed)

    def _unwrap(self, blob: bytes, associated_data: bytes) -> bytes:
        if len(blob) < 1 + 12 + 16 or blob[0] != WRAP_VERSION:
            raise UnwrapError
        params = GCMParams(blob[1:13], _AD_LABEL + associated_data, 128)
        try:
            with self._lock:
                plain = self._key.decrypt(
                    blob[13:], mechanism=Mechanism.AES_GCM, mechanism_param=params
                )
        except PKCS11Error:
            raise UnwrapError from None
        return bytes(plain)

    def close(self) -> None:
        session = getattr(self, "_session", None)
        if session is not None:
            try:
                session.close()
            except PKCS11Error:
                pass
            self._session = None
