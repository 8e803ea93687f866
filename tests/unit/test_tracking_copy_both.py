"""A replication stream (CopyBothResponse) has no plan in tracking mode: fail closed."""

from __future__ import annotations

import struct

import pytest

from proxy.protocol import messages as m
from proxy.tracking import ProtocolViolation, Tracker


def test_copy_both_response_ends_the_session() -> None:
    tracker = Tracker(object())  # type: ignore[arg-type]
    body = struct.pack("!bh", 0, 0)  # text format, no columns (as for START_REPLICATION)
    with pytest.raises(ProtocolViolation, match="replication"):
        tracker._server(0x57, m.message(b"W", body))
