"""The keyring: wrapped per-column DEKs with ids, states and creation times.

A keyring is an immutable value; every operation returns a new one, and rotation is a
sequence of separate steps (Tink's KeysetManager), each saved and given time to spread to
every proxy before the next:

    add (decrypt_only)  ->  all proxies reload  ->  promote (new writes use it)
    ->  re-encrypt old values  ->  retire the old key

A fresh key does not write at once because proxies that have not loaded it yet could not
read what it wrote. Exactly one key per (column, purpose) is `active` (the primary); the
primary cannot be retired.

Retiring never strands data. A retired key stays wrapped in the file and still *opens*
envelopes that name it (a restored backup, a proxy that wrote under it before it
reloaded), but it never writes and takes no part in blind-index lookups. `strongroom keys
retire` also refuses a key that stored values or blind indexes still use (keys.usage),
and `unretire` takes back a retire made by mistake.

DEKs are stored only wrapped by the KEK provider, with associated data naming the entry
(id, column, purpose): a wrapped DEK moved to another entry does not unwrap.
The file is JSON, written atomically (temp file + fsync + rename) with mode 0600.

The keyring is authenticated as a whole, as Tink keysets are: the per-entry associated
data stops a wrapped DEK from moving, but not an edit of a key's *state* (a retired key
made decrypt-only again, the active and a retired key swapped). So the file carries an
HMAC-SHA256 over its canonical form (every entry with id, column, purpose, state, time
and wrapped DEK, plus the KEK id), under a 32-byte MAC key that is itself stored wrapped
by the KEK with its own associated data. Any provider that can unwrap a DEK can therefore
check the MAC, and the KEK itself is never exposed. `load` verifies it and refuses a
keyring that fails; `save` recomputes it, so only code holding the KEK (`strongroom keys
...`) can change a key's state. A keyring from before the MAC (format 1) is refused
until `strongroom keys seal` has checked the KEK and added one. Whoever holds the KEK can
still forge a keyring: the MAC protects against those who can write the file only.
Keyring files and their directories that group or others may write are refused too.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from keys.providers.base import KekProvider, UnwrapError
from proxy.crypto.keyview import DEK_LEN, UINT32_MAX, ColumnKeys, Purpose

FORMAT_VERSION = 2  # 2: authenticated (mac_key + mac); 1: no MAC, refused until sealed
UNSEALED_FORMAT = 1
MAC_KEY_LEN = 32
_DEK_AD_LABEL = b"strongroom/v1/dek\x00"
_MAC_KEY_AD_LABEL = b"strongroom/v2/keyring-mac-key\x00"
_MAC_LABEL = b"strongroom/v2/keyring-mac\x00"


class KeyState(StrEnum):
    ACTIVE = "active"  # the primary: encrypts and decrypts
    DECRYPT_ONLY = "decrypt_only"  # decrypts; new keys start here, old primaries end here
    RETIRED = "retired"  # no writes, no blind-index lookups; still opens old envelopes


class KeyringError(Exception):
    """An illegal keyring operation or a malformed keyring file. Never includes key bytes."""


class KeyringAuthError(KeyringError):
    """The keyring's MAC does not verify under the KEK: the file was edited outside
    `strongroom keys` (or corrupted, or belongs to another KEK). Never trusted."""


class KeyringUnsealedError(KeyringAuthError):
    """A keyring written before keyrings were authenticated (no MAC): refused until
    `strongroom keys seal` adds one."""


def _unsealed_message(where: str) -> str:
    return (f"keyring {where} is not authenticated (written before keyrings carried a MAC); "
            "check its key states with `strongroom keys show --unverified --config FILE`, then run "
            "`strongroom keys seal --config FILE` once to authenticate it with the KEK")


def _part(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def dek_associated_data(key_id: int, column: str, purpose: Purpose) -> bytes:
    """What a wrapped DEK is bound to."""
    return (
        _DEK_AD_LABEL
        + key_id.to_bytes(4, "big")
        + _part(column.encode())
        + _part(purpose.value.encode())
    )


def mac_key_associated_data(kek_id: str) -> bytes:
    """What the wrapped keyring MAC key is bound to: never equal to a DEK's associated
    data (another label), so a wrapped DEK cannot stand in for the MAC key."""
    return _MAC_KEY_AD_LABEL + _part(kek_id.encode())


def new_mac_key(provider: KekProvider) -> bytes:
    """A fresh MAC key, wrapped by `provider` (its only form outside memory)."""
    return provider.wrap(secrets.token_bytes(MAC_KEY_LEN), mac_key_associated_data(provider.key_id))


def validate_column(column: str) -> str:
    """`schema.table.column`, three non-empty parts, as in the `protect:` configuration."""
    parts = column.split(".") if isinstance(column, str) else []
    if len(parts) != 3 or not all(parts):
        raise KeyringError(f"column must be schema.table.column, got {column!r}")
    return column


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class KeyEntry:
    """One DEK. `wrapped` is the KEK provider's output, never the DEK itself."""

    id: int
    column: str
    purpose: Purpose
    state: KeyState
    created_at: str
    wrapped: bytes = field(repr=False)

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "column": self.column,
            "purpose": self.purpose.value,
            "state": self.state.value,
            "created_at": self.created_at,
        }

    def to_json(self) -> dict[str, Any]:
        return self.describe() | {"wrapped": base64.b64encode(self.wrapped).decode()}


@dataclass(frozen=True, slots=True)
class Keyring:
    """All wrapped DEKs, the id of the KEK that wrapped them, and the wrapped key that
    authenticates the whole keyring (empty only for an unsealed, format-1 keyring)."""

    kek_id: str
    entries: tuple[KeyEntry, ...] = ()
    mac_key: bytes = field(default=b"", repr=False)

    # ---- queries -------------------------------------------------------------------
    def get(self, key_id: int) -> KeyEntry:
        for e in self.entries:
            if e.id == key_id:
                return e
        raise KeyringError(f"no key with id {key_id} (`strongroom keys show` lists them)")

    def entries_for(self, column: str, purpose: Purpose | str) -> tuple[KeyEntry, ...]:
        p = Purpose(purpose)
        return tuple(e for e in self.entries if e.column == column and e.purpose is p)

    def primary(self, column: str, purpose: Purpose | str) -> KeyEntry | None:
        for e in self.entries_for(column, purpose):
            if e.state is KeyState.ACTIVE:
                return e
        return None

    def columns(self) -> list[tuple[str, Purpose]]:
        return sorted({(e.column, e.purpose) for e in self.entries})

    def describe(self) -> list[dict[str, Any]]:
        """For `strongroom keys show`: ids, columns, purposes, states, times; no key bytes."""
        return [e.describe() for e in sorted(self.entries, key=lambda e: (e.column, e.id))]

    # ---- steps ---------------------------------------------------------------------
    def _check_provider(self, provider: KekProvider) -> None:
        if provider.key_id != self.kek_id:
            raise KeyringError(
                f"keyring was wrapped by KEK {self.kek_id}, provider has {provider.key_id}"
            )

    def _new_id(self) -> int:
        used = {e.id for e in self.entries}
        while True:  # random ids, like Tink, so keyrings merged by hand rarely collide
            key_id = secrets.randbelow(UINT32_MAX) + 1
            if key_id not in used:
                return key_id

    def add(
        self, column: str, purpose: Purpose | str, provider: KekProvider, *, created_at: str = ""
    ) -> tuple[Keyring, int]:
        """New random DEK for a column, wrapped, in state decrypt_only. Returns (ring, id)."""
        self._check_provider(provider)
        validate_column(column)
        p = Purpose(purpose)
        key_id = self._new_id()
        dek = secrets.token_bytes(DEK_LEN)
        wrapped = provider.wrap(dek, dek_associated_data(key_id, column, p))
        entry = KeyEntry(key_id, column, p, KeyState.DECRYPT_ONLY, created_at or _now(), wrapped)
        return replace(self, entries=(*self.entries, entry)), key_id

    def promote(self, key_id: int) -> Keyring:
        """Make a decrypt-only key the primary; the old primary becomes decrypt-only."""
        entry = self.get(key_id)
        if entry.state is KeyState.RETIRED:
            raise KeyringError(
                f"key {key_id} is retired; `strongroom keys unretire {key_id}`, reload every "
                "proxy, then promote it"
            )
        if entry.state is not KeyState.DECRYPT_ONLY:
            raise KeyringError(f"key {key_id} is already the primary of {entry.column}")
        old = self.primary(entry.column, entry.purpose)
        changes = {key_id: KeyState.ACTIVE}
        if old is not None:
            changes[old.id] = KeyState.DECRYPT_ONLY
        return self._with_states(changes)

    def retire(self, key_id: int) -> Keyring:
        """Mark a decrypt-only key as no longer in use. The primary cannot be retired.

        This only changes the state; whether stored data still uses the key is for the
        caller to establish first (the CLI counts it in the database, keys.usage)."""
        entry = self.get(key_id)
        if entry.state is KeyState.ACTIVE:
            raise KeyringError(
                f"key {key_id} is the primary of {entry.column} ({entry.purpose.value}); "
                "add and promote another key, rotate, then retire this one"
            )
        if entry.state is KeyState.RETIRED:
            raise KeyringError(f"key {key_id} is already retired")
        return self._with_states({key_id: KeyState.RETIRED})

    def unretire(self, key_id: int) -> Keyring:
        """A retired key back to decrypt-only (a retire made by mistake); promote it
        afterwards if it should write again."""
        entry = self.get(key_id)
        if entry.state is not KeyState.RETIRED:
            raise KeyringError(f"key {key_id} is not retired (it is {entry.state.value})")
        return self._with_states({key_id: KeyState.DECRYPT_ONLY})

    def _with_states(self, changes: dict[int, KeyState]) -> Keyring:
        entries = tuple(
            replace(e, state=changes[e.id]) if e.id in changes else e for e in self.entries
        )
        return replace(self, entries=entries)

    def rewrap(self, old: KekProvider, new: KekProvider) -> Keyring:
        """The same DEKs (ids, states, times) wrapped by another KEK: KEK rotation, or a
        move to another provider (local file -> HSM). Stored values stay as they are, since
        only the wrapping changes. Retired entries are re-wrapped too, so a retire stays
        reversible by hand; their DEKs exist only transiently here, never in a cipher."""
        self._check_provider(old)
        if new.key_id == old.key_id:
            raise KeyringError(f"the new KEK is the current one ({old.key_id})")
        entries = []
        for e in self.entries:
            ad = dek_associated_data(e.id, e.column, e.purpose)
            try:
                dek = old.unwrap(e.wrapped, ad)
            except UnwrapError:
                raise KeyringError(
                    f"key {e.id} of {e.column}: unwrap failed with the current KEK"
                ) from None
            entries.append(replace(e, wrapped=new.wrap(dek, ad)))
        return Keyring(new.key_id, tuple(entries), new_mac_key(new))

    # ---- authentication --------------------------------------------------------------
    def canonical(self) -> bytes:
        """What the MAC covers: everything that decides which key encrypts, decrypts or
        indexes what (KEK id, the wrapped MAC key, and every entry with all its fields),
        as compact sorted-key ASCII JSON with entries in id order, behind a label."""
        doc = {
            "format": FORMAT_VERSION,
            "kek_id": self.kek_id,
            "mac_key": base64.b64encode(self.mac_key).decode(),
            "keys": [e.to_json() for e in sorted(self.entries, key=lambda e: e.id)],
        }
        text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return _MAC_LABEL + text.encode()

    def mac(self, provider: KekProvider) -> bytes:
        """HMAC-SHA256 of `canonical()` under the unwrapped MAC key (kept in memory only
        for this call)."""
        self._check_provider(provider)
        if not self.mac_key:
            raise KeyringUnsealedError(_unsealed_message("(in memory)"))
        try:
            key = provider.unwrap(self.mac_key, mac_key_associated_data(self.kek_id))
        except UnwrapError:
            raise KeyringAuthError(
                "keyring MAC key does not unwrap with this KEK: the keyring was edited or "
                "belongs to another KEK; restore it from a backup") from None
        return hmac.new(key, self.canonical(), hashlib.sha256).digest()

    def verify(self, mac: bytes, provider: KekProvider, where: str = "") -> None:
        """Raise KeyringAuthError unless `mac` authenticates this keyring under the KEK."""
        if not hmac.compare_digest(self.mac(provider), mac):
            raise KeyringAuthError(
                f"keyring {where or '(in memory)'} fails authentication under KEK "
                f"{self.kek_id}: it was changed outside `strongroom keys` (a key state, id or "
                "wrapped key edited) or corrupted; refusing it (restore it from a backup)")

    # ---- unwrapping ----------------------------------------------------------------
    def column_keys(self, column: str, purpose: Purpose | str, provider: KekProvider) -> ColumnKeys:
        """Unwrap the keys of one column for one purpose (what ciphers are built from).

        Encrypt keys: every key, retired ones included, so an envelope under a retired key
        (restored from a backup, or written by a proxy that had not reloaded yet) still
        opens; only the primary writes. Blind-index keys: the active and decrypt-only ones,
        since each live key costs every lookup one more HMAC; indexes under a retired key
        come back with `keys rotate --reindex`."""
        self._check_provider(provider)
        p = Purpose(purpose)
        live = [e for e in self.entries_for(column, p)
                if p is Purpose.ENCRYPT or e.state is not KeyState.RETIRED]
        primary = [e for e in live if e.state is KeyState.ACTIVE]
        if len(primary) != 1:
            raise KeyringError(f"{column} ({p.value}) has no active key")
        material: dict[int, bytes] = {}
        for e in live:
            try:
                material[e.id] = provider.unwrap(e.wrapped, dek_associated_data(e.id, column, p))
            except UnwrapError:
                raise KeyringError(f"key {e.id} of {column}: unwrap failed with this KEK") from None
        return ColumnKeys(column, p, primary[0].id, material)

    # ---- serialization -------------------------------------------------------------
    def to_json(self, provider: KekProvider) -> str:
        """The file's text, with the MAC computed under `provider`'s KEK."""
        doc = {
            "format": FORMAT_VERSION,
            "kek_id": self.kek_id,
            "mac_key": base64.b64encode(self.mac_key).decode(),
            "keys": [e.to_json() for e in sorted(self.entries, key=lambda e: (e.column, e.id))],
            "mac": base64.b64encode(self.mac(provider)).decode(),
        }
        return json.dumps(doc, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, provider: KekProvider, where: str = "") -> Keyring:
        """Parse and authenticate: a keyring whose MAC fails, or that has none, is refused."""
        ring, mac = parse_unverified(text)
        if mac is None:
            raise KeyringUnsealedError(_unsealed_message(where or "(text)"))
        ring.verify(mac, provider, where)
        return ring


def parse_unverified(text: str) -> tuple[Keyring, bytes | None]:
    """The keyring and its MAC (None for an unsealed format-1 file), NOT authenticated:
    for `seal` and for displays that say so; everything that uses keys goes through
    `Keyring.from_json` / `load`."""
    try:
        doc = json.loads(text)
        fmt = doc.get("format")
        if fmt not in (FORMAT_VERSION, UNSEALED_FORMAT):
            raise KeyringError(f"unsupported keyring format {fmt!r}")
        kek_id = doc["kek_id"]
        if not isinstance(kek_id, str) or not kek_id:
            raise KeyringError("kek_id must be a non-empty string")
        entries = tuple(_entry_from_json(item) for item in doc["keys"])
        mac_key, mac = b"", None
        if fmt == FORMAT_VERSION:
            mac_key = base64.b64decode(doc["mac_key"], validate=True)
            mac = base64.b64decode(doc["mac"], validate=True)
            if not mac_key:
                raise KeyringError("keyring has an empty mac_key")
    except KeyringError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error):
        raise KeyringError("malformed keyring file") from None
    ring = Keyring(kek_id, entries, mac_key)
    _validate(ring)
    return ring, mac


def _entry_from_json(item: dict[str, Any]) -> KeyEntry:
    key_id = item["id"]
    if not isinstance(key_id, int) or isinstance(key_id, bool) or not 0 <= key_id <= UINT32_MAX:
        raise KeyringError("key id must be a uint32")
    created = item["created_at"]
    if not isinstance(created, str):
        raise KeyringError(f"key {key_id}: created_at must be a string")
    return KeyEntry(
        id=key_id,
        column=validate_column(item["column"]),
        purpose=Purpose(item["purpose"]),
        state=KeyState(item["state"]),
        created_at=created,
        wrapped=base64.b64decode(item["wrapped"], validate=True),
    )


def _validate(ring: Keyring) -> None:
    ids = [e.id for e in ring.entries]
    if len(ids) != len(set(ids)):
        raise KeyringError("duplicate key ids in keyring")
    for column, purpose in ring.columns():
        active = [e for e in ring.entries_for(column, purpose) if e.state is KeyState.ACTIVE]
        if len(active) > 1:
            raise KeyringError(f"{column} ({purpose.value}) has more than one active key")


def check_permissions(path: str | os.PathLike[str]) -> None:
    """Refuse a keyring file, or its directory, that group or others may write: whoever
    can write it (or swap it in its directory) could roll it back to an older, still
    authentic version with a key that should no longer be used, or simply destroy it.
    Same rule, and message, as for configuration files."""
    from proxy.settings import writable_by_others

    problems = writable_by_others(path, "keyring")
    if problems:
        raise KeyringError("; ".join(problems))


def _read(path: str | os.PathLike[str]) -> str:
    check_permissions(path)
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KeyringError(f"keyring {path} does not exist; create it with "
                           "`strongroom keys init --config FILE`") from None


def load(path: str | os.PathLike[str], provider: KekProvider) -> Keyring:
    """Read, validate and authenticate a keyring file (see the module docstring)."""
    return Keyring.from_json(_read(path), provider, os.fspath(path))


def load_unverified(path: str | os.PathLike[str]) -> tuple[Keyring, bytes | None]:
    """The keyring file and its MAC without authenticating it (no KEK at hand): for
    `seal` and displays only. Permissions are checked all the same."""
    return parse_unverified(_read(path))


def save(ring: Keyring, path: str | os.PathLike[str], provider: KekProvider) -> None:
    """MAC under `provider`, then write atomically: temp file (0600) in the same
    directory, fsync, rename, fsync dir. A directory others may write is refused."""
    _validate(ring)
    text = ring.to_json(provider)
    p = Path(path)
    check_permissions(p)  # (a file not created yet: its directory only)
    tmp = p.with_name(f".{p.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, text.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dfd = os.open(p.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def new_keyring(provider: KekProvider) -> Keyring:
    return Keyring(provider.key_id, (), new_mac_key(provider))


def seal(ring: Keyring, provider: KekProvider) -> Keyring:
    """An unsealed (format-1) keyring made authenticated: every entry must unwrap with
    `provider` first (the operator holds this keyring's KEK), then a MAC key is added.
    The states are taken as they are: whoever seals vouches for them."""
    ring._check_provider(provider)
    for e in ring.entries:
        try:
            provider.unwrap(e.wrapped, dek_associated_data(e.id, e.column, e.purpose))
        except UnwrapError:
            raise KeyringError(
                f"key {e.id} of {e.column}: unwrap failed with this KEK; not sealed") from None
    return replace(ring, mac_key=new_mac_key(provider))


def add_columns(
    ring: Keyring, provider: KekProvider, specs: Iterable[tuple[str, Purpose]]
) -> Keyring:
    """Add and promote a first key for each (column, purpose) that has none (`keys init`)."""
    for column, purpose in specs:
        if ring.primary(column, purpose) is None:
            ring, key_id = ring.add(column, purpose, provider)
            ring = ring.promote(key_id)
    return ring
