"""The in-memory, unwrapped keys of one column for one purpose.

This is the only object that holds DEK bytes in the clear. `keys.keyring` builds it by
unwrapping the entries of a keyring; `ColumnCipher` and `BlindIndex` derive their working
keys from it once, at construction. Its repr names ids and states, never bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from types import MappingProxyType

DEK_LEN = 32
UINT32_MAX = 0xFFFF_FFFF


class Purpose(StrEnum):
    """What a DEK is for; one column may hold keys of both purposes."""

    ENCRYPT = "encrypt"
    BLIND_INDEX = "blind_index"


class ColumnKeys:
    """The DEKs of one column that may open values, keyed by uint32 id.

    `primary_id` is the key new values are written with; every other key only reads.
    The keyring decides which keys are here (`Keyring.column_keys`: retired encrypt keys
    still read, retired blind-index keys do not); an absent id fails like an unknown one.
    """

    __slots__ = ("_material", "column", "primary_id", "purpose")

    column: str
    purpose: Purpose
    primary_id: int

    def __init__(
        self, column: str, purpose: Purpose | str, primary_id: int, material: Mapping[int, bytes]
    ) -> None:
        if not column:
            raise ValueError("column name is empty")
        if primary_id not in material:
            raise ValueError(f"primary key id {primary_id} is not among the live keys")
        for key_id, dek in material.items():
            if not 0 <= key_id <= UINT32_MAX:
                raise ValueError(f"key id {key_id} is not a uint32")
            if not isinstance(dek, bytes) or len(dek) != DEK_LEN:
                raise ValueError(f"key {key_id}: a DEK must be {DEK_LEN} bytes")
        self.column = column
        self.purpose = Purpose(purpose)
        self.primary_id = primary_id
        self._material = MappingProxyType(dict(material))

    @property
    def ids(self) -> tuple[int, ...]:
        """Live key ids, primary first, then the others in ascending order."""
        rest = sorted(k for k in self._material if k != self.primary_id)
        return (self.primary_id, *rest)

    def material(self, key_id: int) -> bytes:
        """DEK bytes of a key of this view; KeyError for ids not in it."""
        return self._material[key_id]

    def __repr__(self) -> str:
        return (
            f"ColumnKeys(column={self.column!r}, purpose={self.purpose.value!r}, "
            f"primary_id={self.primary_id}, ids={list(self.ids)})"
        )
