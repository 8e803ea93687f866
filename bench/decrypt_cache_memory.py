"""What the decrypt cache really takes: fill one slot and print the RSS it added.

    .venv/bin/python bench/decrypt_cache_memory.py [--values 65536] [--value-bytes 400]
                                                   [--fmt 0|1] [--budget BYTES]

One protected text column, one slot (plaintext view, one result format): `--values`
distinct sealed values of `--value-bytes` bytes each go through the column's cell
revealer, as rows of a result set do; the process's RSS (from /proc/self/statm, after
a collection) is printed before and after, with what the cache accounts (`nbytes`) and
how many entries it kept. `--budget` is `keys.decrypt_cache_bytes` (default: the
default; 0 for no byte bound, only `decrypt_cache_size` entries, as before it existed).
The envelopes are made before the first measurement and handed over as memoryviews
(the cache stores a copy, as of a slice of a read buffer), so only the cache is counted.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.crypto import ColumnCipher, ColumnKeys, Purpose
from proxy.encryption import (
    DEFAULT_DECRYPT_CACHE_BYTES,
    ColumnRuntime,
    RoleColumn,
)
from proxy.protocol.rows import bytea_to_text
from proxy.sql.protected import ProtectedColumn
from proxy.types import get_codec


def rss() -> int:
    gc.collect()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--values", type=int, default=65_536)
    ap.add_argument("--value-bytes", type=int, default=400)
    ap.add_argument("--fmt", type=int, choices=(0, 1), default=1)
    ap.add_argument("--budget", type=int, default=DEFAULT_DECRYPT_CACHE_BYTES)
    a = ap.parse_args()
    codec = get_codec("text")
    keys = ColumnKeys("public.t.doc", Purpose.ENCRYPT, 1, {1: os.urandom(32)})
    cipher = ColumnCipher("public.t.doc", codec.name, "randomized", keys)
    spec = ProtectedColumn("public", "t", "doc", "text", "randomized", False, None)
    rt = ColumnRuntime(spec, cipher, None, codec, codec.oid, -1, cache_size=a.values,
                       cache_bytes=a.budget or 1 << 62)
    reveal = RoleColumn(rt, "plaintext", None, tz=lambda: None).cell_revealer(a.fmt)
    pad = b"v" * max(0, a.value_bytes - 8)
    cells = [cipher.encrypt(b"%08d" % i + pad) for i in range(a.values)]
    if a.fmt == 0:
        cells = [bytea_to_text(c) for c in cells]
    before = rss()
    for c in cells:
        reveal(memoryview(c))  # stored as a new bytes, as a slice of a read is
    after = rss()
    slot = next(iter(rt.caches.values()))
    print(f"values={a.values} value_bytes={a.value_bytes} cell_bytes={len(cells[0])} "
          f"fmt={a.fmt} budget={a.budget or 'none'}")
    print(f"entries kept={len(slot)} accounted={slot.nbytes / 2**20:.1f} MiB "
          f"rss_delta={(after - before) / 2**20:.1f} MiB "
          f"per_entry={(after - before) / max(1, len(slot)):.0f} B")


if __name__ == "__main__":
    main()
