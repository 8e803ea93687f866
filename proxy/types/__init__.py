"""Logical types of protected columns: wire formats <-> canonical plaintext.

See `proxy.types.base` for what a canonical form and an equality key are.
"""

from proxy.types.base import Codec, CodecError
from proxy.types.registry import BY_NAME, BY_OID, get_codec

__all__ = ["BY_NAME", "BY_OID", "Codec", "CodecError", "get_codec"]
