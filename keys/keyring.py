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
"""

from __future__ import annotations

import base64
import binascii
import datetime
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

FORMAT_VERSION = 1
_DEK_AD_LABEL = b"strongroom/v1/dek\x00"


class KeyState(StrEnum):
    ACTIVE = "active"  # the primary: encrypts and decrypts
    DECRYPT_ONLY = "decrypt_only"  # decrypts; new keys start here, old primaries end here
    RETIRED = "retired"  # no writes, no blind-index lookups; still opens old envelopes


class KeyringError(Exception):
    """An illegal keyring operation or a malformed keyring file. Never includes key bytes."""


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
    """All wrapped DEKs, and the id of the KEK that wrapped them."""

    kek_id: str
    entries: tuple[KeyEntry, ...] = ()

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
        return Keyring(new.key_id, tuple(entries))

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
    def to_json(self) -> str:
        doc = {
            "format": FORMAT_VERSION,
            "kek_id": self.kek_id,
            "keys": [e.to_json() for e in sorted(self.entries, key=lambda e: (e.column, e.id))],
        }
        return json.dumps(doc, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Keyring:
        try:
            doc = json.loads(text)
            if doc.get("format") != FORMAT_VERSION:
                raise KeyringError(f"unsupported keyring format {doc.get('format')!r}")
            kek_id = doc["kek_id"]
            if not isinstance(kek_id, str) or not kek_id:
                raise KeyringError("kek_id must be a non-empty string")
            entries = tuple(_entry_from_json(item) for item in doc["keys"])
        except KeyringError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, binascii.Error):
            raise KeyringError("malformed keyring file") from None
        ring = cls(kek_id, entries)
        _validate(ring)
        return ring


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


def load(path: str | os.PathLike[str]) -> Keyring:
    """Read and validate a keyring file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KeyringError(f"keyring {path} does not exist; create it with "
                           "`strongroom keys init --config FILE`") from None
    return Keyring.from_json(text)


def save(ring: Keyring, path: str | os.PathLike[str]) -> None:
    """Write atomically: temp file (0600) in the same directory, fsync, rename, fsync dir."""
    _validate(ring)
    p = Path(path)
    tmp = p.with_name(f".{p.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, ring.to_json().encode())
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
    return Keyring(provider.key_id)


def add_columns(
    ring: Keyring, provider: KekProvider, specs: Iterable[tuple[str, Purpose]]
) -> Keyring:
    """Add and promote a first key for each (column, purpose) that has none (`keys init`)."""
    for column, purpose in specs:
        if ring.primary(column, purpose) is None:
            ring, key_id = ring.add(column, purpose, provider)
            ring = ring.promote(key_id)
    return ring
