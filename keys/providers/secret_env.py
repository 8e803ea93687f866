"""Secrets passed in environment variables (the `env` KEK, the PKCS#11 PIN): read once,
then removed from the process environment.

Left there, the secret would be inherited by every child process and readable from
/proc/<pid>/environ (and in a core file). Reading removes the variable (unsetenv), and
where the value sits in the environment block the kernel handed to the process (which
/proc/<pid>/environ shows however the environment changes later), that copy is zeroed
too. The value is kept in this process so a reload, which builds its providers again,
still finds it: the environment of a running process cannot change anyway.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

_taken: dict[str, str] = {}


def take_secret(var: str) -> str | None:
    """The value of `var` (None when unset), removed from the environment on first read."""
    if var in _taken:
        return _taken[var]
    value = os.environ.get(var)
    if value is None:
        return None
    _taken[var] = value
    address = _initial_block_address(var)
    os.environ.pop(var, None)  # unsetenv: children no longer inherit it
    if address is not None:
        ctypes.memset(address[0], 0, address[1])
    return value


def _initial_block_address(var: str) -> tuple[int, int] | None:
    """(address, length) of `NAME=value` in the kernel-provided environment block, or None
    when it is not there (set later, or not Linux)."""
    if sys.platform != "linux":
        return None
    libc = ctypes.CDLL(None)
    libc.getenv.restype = ctypes.c_void_p
    libc.getenv.argtypes = [ctypes.c_char_p]
    libc.strlen.restype = ctypes.c_size_t
    libc.strlen.argtypes = [ctypes.c_void_p]
    name = os.fsencode(var)
    value_at = libc.getenv(name)
    if not value_at:
        return None
    try:
        # Fields 50 and 51 of /proc/self/stat (after the parenthesised command name,
        # which may contain spaces): env_start and env_end.
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        start, end = int(fields[50 - 3]), int(fields[51 - 3])
    except (OSError, IndexError, ValueError):
        return None
    entry_at = value_at - len(name) - 1
    length = len(name) + 1 + libc.strlen(value_at)
    if start <= entry_at and entry_at + length <= end:
        return entry_at, length
    return None
