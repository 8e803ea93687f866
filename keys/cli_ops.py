"""Plain functions behind `strongroom keys ...`; the CLI parses arguments and prints.

Each mutating operation holds an exclusive lock (`<keyring>.lock`, flock) around
load-modify-save, so two operators cannot lose each other's changes, and saves atomically.
Every one of them needs the KEK provider: the load authenticates the keyring (a tampered
or unsealed one is refused before anything changes) and the save MACs the result.
Return values are plain data (ids, dicts) with no key bytes, ready to print as a table or
JSON.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from keys import keyring as kr
from keys.providers.base import KekProvider
from keys.providers.local import LocalKekProvider, init_kek_file
from proxy.crypto.keyview import Purpose

Columns = Mapping[str, Mapping[str, Any]] | Iterable[str]


@contextlib.contextmanager
def _locked(path_keyring: str | os.PathLike[str]) -> Iterator[None]:
    lock = Path(f"{os.fspath(path_keyring)}.lock")
    fd = os.open(lock, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _specs(columns: Columns) -> list[tuple[str, Purpose]]:
    """(column, purpose) pairs: an encrypt key per column, plus a blind_index key for
    columns whose config says `search: blind_index` (when given the `protect:` mapping)."""
    out: list[tuple[str, Purpose]] = []
    if isinstance(columns, Mapping):
        for column, spec in columns.items():
            out.append((column, Purpose.ENCRYPT))
            if isinstance(spec, Mapping) and spec.get("search") == "blind_index":
                out.append((column, Purpose.BLIND_INDEX))
    else:
        if isinstance(columns, str):
            raise TypeError("columns must be an iterable of names, not one string")
        out = [(c, Purpose.ENCRYPT) for c in columns]
    for column, _ in out:
        kr.validate_column(column)
    return out


def init(
    path_kek: str | os.PathLike[str] | None,
    path_keyring: str | os.PathLike[str],
    columns: Columns,
    provider: KekProvider | None = None,
) -> list[dict[str, Any]]:
    """`strongroom keys init`: create the KEK file (local provider) if absent, then a
    keyring with one active key per column (and per blind index).

    `columns` is either the `protect:` mapping (column -> {type, mode, search}) or a list
    of column names. With `provider` given (env, pkcs11) `path_kek` is ignored. An existing
    keyring is extended with keys for columns that have none; nothing is replaced.
    Returns `show()` of the result.
    """
    if provider is None:
        if path_kek is None:
            raise ValueError("path_kek is required for the local provider")
        if Path(path_keyring).exists() and not Path(path_kek).exists():
            # A new KEK could not open the keys already in the keyring: making one would
            # only hide that the KEK is lost (and wrap new keys under another KEK).
            raise kr.KeyringError(
                f"keyring {path_keyring} exists but its KEK {path_kek} is missing: restore "
                "the KEK file (a new KEK cannot open this keyring)")
        provider, _ = local_provider(path_kek)
    specs = _specs(columns)
    for path in (path_keyring, path_kek):
        if path is not None:  # a fresh checkout has no keys/ directory yet
            Path(path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with _locked(path_keyring):
        if Path(path_keyring).exists():
            ring = kr.load(path_keyring, provider)
        else:
            ring = kr.new_keyring(provider)
        ring = kr.add_columns(ring, provider, specs)
        kr.save(ring, path_keyring, provider)
    return ring.describe()


def local_provider(path_kek: str | os.PathLike[str]) -> tuple[LocalKekProvider, bool]:
    """The local KEK in `path_kek`, created (0600) when the file does not exist yet;
    (provider, whether it was created)."""
    created = not Path(path_kek).exists()
    if created:
        init_kek_file(path_kek)
    return LocalKekProvider(path_kek), created


def show(
    path_keyring: str | os.PathLike[str], provider: KekProvider | None = None
) -> list[dict[str, Any]]:
    """`strongroom keys show`: id, column, purpose, state, created_at per key.

    With `provider` (what the CLI passes) the keyring is authenticated first, so what is
    shown is what a proxy would use; without, the file is read as it is (unverified)."""
    if provider is None:
        return kr.load_unverified(path_keyring)[0].describe()
    return kr.load(path_keyring, provider).describe()


def add(
    path_keyring: str | os.PathLike[str],
    provider: KekProvider,
    column: str,
    purpose: str = Purpose.ENCRYPT.value,
) -> int:
    """`strongroom keys add`: new decrypt-only key for a column; returns its id."""
    with _locked(path_keyring):
        ring, key_id = kr.load(path_keyring, provider).add(column, purpose, provider)
        kr.save(ring, path_keyring, provider)
    return key_id


def promote(path_keyring: str | os.PathLike[str], key_id: int, provider: KekProvider) -> None:
    """`strongroom keys promote`: decrypt-only key becomes the column's primary."""
    with _locked(path_keyring):
        kr.save(kr.load(path_keyring, provider).promote(key_id), path_keyring, provider)


def retire(path_keyring: str | os.PathLike[str], key_id: int, provider: KekProvider) -> None:
    """Mark a decrypt-only key retired (no writes, no lookups; it still opens old values).

    The file operation only: `strongroom keys retire` first counts, in the database, the
    values and blind indexes that still use the key (keys.usage) and refuses while any do.
    """
    with _locked(path_keyring):
        kr.save(kr.load(path_keyring, provider).retire(key_id), path_keyring, provider)


def unretire(path_keyring: str | os.PathLike[str], key_id: int, provider: KekProvider) -> None:
    """`strongroom keys unretire`: a retired key back to decrypt-only (a mistaken retire)."""
    with _locked(path_keyring):
        kr.save(kr.load(path_keyring, provider).unretire(key_id), path_keyring, provider)


def seal(path_keyring: str | os.PathLike[str], provider: KekProvider) -> bool:
    """`strongroom keys seal`: authenticate a keyring written before keyrings carried a
    MAC (one time, after checking its states with `keys show`). Every key must unwrap
    with the KEK first. Returns False when it was sealed already (and verifies)."""
    with _locked(path_keyring):
        ring, mac = kr.load_unverified(path_keyring)
        if mac is not None:
            ring.verify(mac, provider, os.fspath(path_keyring))
            return False
        kr.save(kr.seal(ring, provider), path_keyring, provider)
    return True


def rewrap(
    path_keyring: str | os.PathLike[str],
    old: KekProvider,
    new: KekProvider,
    path_out: str | os.PathLike[str] | None = None,
) -> str:
    """`strongroom keys rewrap`: every DEK re-wrapped by the `new` KEK, written to
    `path_out` (default: in place). Returns the new KEK id. Writing to a new file lets
    proxies still on the old configuration keep reloading until each is switched over."""
    out = Path(path_out) if path_out is not None else Path(path_keyring)
    same = out.resolve() == Path(path_keyring).resolve()
    with _locked(path_keyring):
        ring = kr.load(path_keyring, old).rewrap(old, new)
        if not same and out.exists():
            raise kr.KeyringError(f"{out} exists; not overwritten")
        kr.save(ring, out, new)
    return ring.kek_id
