"""Column cryptography: envelope format, column ciphers, blind indexes, masks.

Everything here is pure (no I/O, no asyncio) so it is tested by feeding it bytes.
Keys arrive as a `ColumnKeys` view built by `keys.keyring`; nothing here reads files.
"""

from proxy.crypto.blind_index import BlindIndex
from proxy.crypto.envelope import ColumnCipher, DecryptError, Mode
from proxy.crypto.keyview import ColumnKeys, Purpose

__all__ = ["BlindIndex", "ColumnCipher", "ColumnKeys", "DecryptError", "Mode", "Purpose"]
