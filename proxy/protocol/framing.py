"""Split a byte stream into whole v3 protocol messages.

Whether a whole message is here is decided from its 5-byte header alone; the bodies are
never copied unless a handler asks. A chunk that holds only whole messages (the common
case: one read, one reply) is returned as is, so forwarding it costs no copy at all.
"""

from __future__ import annotations

import struct

from proxy.protocol.messages import ProtocolViolation

_HEAD = struct.Struct("!BI")
_unpack_head = _HEAD.unpack_from
unpack_head = _unpack_head
"""`unpack_head(buf, pos)` -> (type byte, length field) of the message at `pos`."""

# (type byte, offset of the type byte, offset one past the message's last byte)
Frame = tuple[int, int, int]


class Framer:
    """Accumulates chunks and yields the complete messages they contain.

    The incomplete tail is kept in a bytearray (amortised growth), so a message that
    arrives in many small reads costs linear, not quadratic, time.
    """

    __slots__ = ("_need", "_tail", "error", "max_len")

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len
        self._tail = bytearray()
        self._need = 0  # bytes the tail must reach before it is worth scanning again
        # A bad length after some good messages: the good ones are returned first (a
        # Terminate among them must win), then this is set and the next feed raises.
        self.error: str | None = None

    @property
    def pending(self) -> int:
        """Bytes of an incomplete message held back."""
        return len(self._tail)

    def feed(self, data: bytes) -> tuple[bytes, list[Frame]]:
        """Return (buffer, frames) for the whole messages now available.

        `buffer[frames[0][1]:frames[-1][2]]` is exactly the bytes of those messages.
        Raises ProtocolViolation on a length that cannot be valid, unless whole messages
        precede it in this chunk: then those are returned and `error` is set.
        """
        if self.error is not None:
            raise ProtocolViolation(self.error)
        if self._tail:
            self._tail += data
            if len(self._tail) < self._need:
                return b"", []
            buf: bytes = bytes(self._tail)
            self._tail = bytearray()
        else:
            buf = data
        frames: list[Frame] = []
        pos = 0
        end = len(buf)
        max_len = self.max_len
        while end - pos >= 5:
            kind, n = _unpack_head(buf, pos)
            if n < 4 or n > max_len:
                if not frames:
                    raise ProtocolViolation(f"invalid message length {n}")
                self.error = f"invalid message length {n}"
                self._need = 1 << 62  # hold everything from here on, never rescan
                break
            stop = pos + 1 + n
            if stop > end:
                self._need = stop - pos
                break
            frames.append((kind, pos, stop))
            pos = stop
        else:
            self._need = 5
        if pos < end:
            self._tail = bytearray(buf[pos:])
        return buf, frames

    # The relay's own header walk (Session) uses these three instead of `feed`: it frames
    # and dispatches in one loop, with no list of frames. `_tail` is empty on the fast
    # path, so one truth test is all it pays for the Framer.

    def join(self, data: bytes) -> bytes | None:
        """Called when `_tail` is non-empty: the held bytes followed by `data`, or None
        while they cannot hold a whole message yet. Raises ProtocolViolation once an
        invalid length has been seen (`error`)."""
        if self.error is not None:
            raise ProtocolViolation(self.error)
        self._tail += data
        if len(self._tail) < self._need:
            return None
        buf = bytes(self._tail)
        self._tail = bytearray()
        return buf

    def hold(self, buf: bytes, pos: int, need: int) -> None:
        """Keep `buf[pos:]`, an incomplete message of `need` bytes in all (at least 5:
        its header), until `join` has that many."""
        self._tail = bytearray(buf[pos:])
        self._need = need

    def fail(self, buf: bytes, pos: int, text: str) -> None:
        """An invalid length at `pos`, after whole messages: remember it (`error`) so the
        next `join` or `feed` raises, and hold everything from there on."""
        self.error = text
        self._tail = bytearray(buf[pos:]) or bytearray(b"\0")
        self._need = 1 << 62

    def take_tail(self) -> bytes:
        """Hand over the held incomplete message (the caller re-feeds it later)."""
        tail = bytes(self._tail)
        self._tail = bytearray()
        self._need = 0
        return tail
