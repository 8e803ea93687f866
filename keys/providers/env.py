"""`env` KEK provider: a base64-encoded 32-byte KEK in an environment variable.

For containers whose orchestrator injects secrets as environment variables. The variable
is read once and then removed from the process environment (`take_secret`); the value
never appears in errors or reprs.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Mapping

from keys.providers.aesgcm_kek import KEK_LEN, AesGcmKek
from keys.providers.base import ProviderError
from keys.providers.secret_env import take_secret

DEFAULT_VAR = "STRONGROOM_KEK"


class EnvKekError(ProviderError):
    """The variable is missing or does not hold a base64 32-byte key."""


def generate_env_value() -> str:
    """A fresh KEK, base64-encoded, to put into the variable."""
    return base64.b64encode(os.urandom(KEK_LEN)).decode()


class EnvKekProvider(AesGcmKek):
    kind = "env"

    def __init__(self, var: str = DEFAULT_VAR, environ: Mapping[str, str] | None = None) -> None:
        self.var = var
        value = take_secret(var) if environ is None else environ.get(var)
        if not value:
            raise EnvKekError(f"environment variable {var} is not set")
        try:
            kek = base64.b64decode(value.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise EnvKekError(f"environment variable {var} is not valid base64") from None
        if len(kek) != KEK_LEN:
            raise EnvKekError(f"environment variable {var} must decode to {KEK_LEN} bytes")
        super().__init__(kek)

    @property
    def description(self) -> str:
        return f"env KEK {self.key_id} from ${self.var}"
