"""Process hygiene for `serve`: keep keys and plaintext out of core files and debuggers.

The proxy holds every column key and the plaintext of every protected value it relays in
memory. A crash that writes a core file puts them on disk, where backups and crash
reporters pick them up; a process that is "dumpable" can also be read by any other
process of the same user through ptrace or /proc/<pid>/mem. Both are switched off at
the start of `serve`, before any key is loaded; forked workers inherit both settings.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import resource
import sys

log = logging.getLogger("strongroom.hardening")

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name or "libc.so.6", use_errno=True) if sys.platform == "linux" else None


def set_dumpable(flag: bool) -> None:
    """prctl(PR_SET_DUMPABLE): 0 forbids core dumps and ptrace/proc-mem access by the same
    user (root keeps CAP_SYS_PTRACE). Raises OSError when the kernel refuses."""
    libc = _libc()
    if libc is None:
        return
    if libc.prctl(PR_SET_DUMPABLE, int(flag), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, "prctl(PR_SET_DUMPABLE) failed")


def is_dumpable() -> bool | None:
    """prctl(PR_GET_DUMPABLE) of this process; None where there is no prctl."""
    libc = _libc()
    if libc is None:
        return None
    return bool(libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0))


def harden_process() -> None:
    """Core-file limit 0 (soft and hard, so nothing later can raise it) and not dumpable.

    A failure is logged, not fatal: a platform without prctl is still better off with the
    core limit, and refusing to start there would only push people to patch this out."""
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (OSError, ValueError) as exc:
        log.warning("cannot set the core-file limit to 0: %s", exc)
    try:
        set_dumpable(False)
    except OSError as exc:
        log.warning("cannot make the process non-dumpable: %s", exc)
