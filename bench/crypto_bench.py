"""Micro benchmark of the crypto layer on one core (not a test; prints numbers only).

    .venv/bin/python bench/crypto_bench.py [--cells 200000]

Target from issue 4: decrypt >= 300,000 cells/s for 22-byte text values (randomized).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.crypto import BlindIndex, ColumnCipher, ColumnKeys, Mode, Purpose
from proxy.types import get_codec

COL = "public.cards.pan"


def rate(fn, items: list[bytes]) -> float:  # type: ignore[no-untyped-def]
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        for x in items:
            fn(x)
        best = max(best, len(items) / (time.perf_counter() - t0))
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", type=int, default=200_000)
    n = ap.parse_args().cells
    keys = ColumnKeys(COL, Purpose.ENCRYPT, 2, {1: os.urandom(32), 2: os.urandom(32)})
    values = [os.urandom(11).hex().encode() for _ in range(n)]  # 22-byte text values
    text = get_codec("text")
    for mode in Mode:
        c = ColumnCipher(COL, "text", mode, keys, database="appdb")
        blobs = [c.encrypt(v) for v in values]
        print(f"{mode.value:13s} encrypt          {rate(c.encrypt, values):>12,.0f} cells/s")
        print(f"{mode.value:13s} decrypt          {rate(c.decrypt, blobs):>12,.0f} cells/s")
        both = rate(lambda b, dec=c.decrypt, out=text.to_text: out(dec(b)), blobs)
        print(f"{mode.value:13s} decrypt+to_text  {both:>12,.0f} cells/s")
    bidx = BlindIndex(COL, "text", keys)
    print(f"blind index   compute          {rate(bidx.compute, values):>12,.0f} cells/s")
    print("target: randomized decrypt >= 300,000 cells/s on one core")


if __name__ == "__main__":
    main()
