"""`local` KEK provider: 32 random bytes in a file readable only by its owner.

For development and single-host deployments. `init_kek_file` creates the file atomically
with mode 0600 and refuses to overwrite one (losing a KEK loses every column it wraps).
Loading refuses files that group or others can read, like ssh does for private keys.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from keys.providers.aesgcm_kek import KEK_LEN, AesGcmKek
from keys.providers.base import ProviderError


class KekFileError(ProviderError):
    """The KEK file is missing, malformed or too widely readable."""


def init_kek_file(path: str | os.PathLike[str]) -> Path:
    """Create a new KEK file (O_EXCL, 0600). Raises FileExistsError if it exists."""
    p = Path(path)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # in case the umask was stricter than needed or odd
        os.write(fd, os.urandom(KEK_LEN))
        os.fsync(fd)
    finally:
        os.close(fd)
    return p


def _read_kek(p: Path) -> bytes:
    try:
        fd = os.open(p, os.O_RDONLY)
    except FileNotFoundError:
        raise KekFileError(f"KEK file {p} does not exist; run `strongroom keys init`") from None
    try:
        st = os.fstat(fd)
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KekFileError(
                f"KEK file {p} is accessible by group or others"
                f" (mode {stat.S_IMODE(st.st_mode):o}); chmod 600 it"
            )
        data = os.read(fd, KEK_LEN + 1)
    finally:
        os.close(fd)
    if len(data) != KEK_LEN:
        raise KekFileError(f"KEK file {p} must hold exactly {KEK_LEN} bytes")
    return data


class LocalKekProvider(AesGcmKek):
    """KEK read from a file made by `init_kek_file`."""

    kind = "local"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        super().__init__(_read_kek(self.path))

    @property
    def description(self) -> str:
        return f"local KEK {self.key_id} from {self.path}"
