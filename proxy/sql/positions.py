"""Error positions in a rewritten statement, mapped back to the text the client sent.

PostgreSQL's ErrorResponse `P` field is a 1-based *character* index into the statement
text it was given. When the proxy rewrote the text (a literal replaced by its ciphertext,
a blind-index column or a recheck column added), a position after the change points
elsewhere in the client's text, and psql's `LINE 1: ... ^` marks the wrong token or none.
The rewriter's changes are splices of the original bytes, so the map is exact outside
them; a position inside a spliced-in piece maps to the start of what it replaced.
"""

from __future__ import annotations

Shift = tuple[int, int, int]
"""(start, end) bytes of the original replaced by `length` bytes, in text order."""


def original_position(rewritten: bytes, original: bytes, shifts: tuple[Shift, ...],
                      position: int) -> int:
    """The 1-based character position in `original` of `position` in `rewritten`."""
    if position < 1:
        return position
    rtext = rewritten.decode("utf-8", errors="surrogateescape")
    at = len(rtext[: position - 1].encode("utf-8", errors="surrogateescape"))  # bytes
    delta = 0  # rewritten offset minus original offset, before the current splice
    for start, end, length in shifts:
        new_start = start + delta
        if at < new_start:
            break
        if at < new_start + length:  # inside a spliced-in piece: what it replaced
            at = start + delta
            break
        delta += length - (end - start)
    orig = at - delta
    orig = max(0, min(orig, len(original)))
    prefix = original[:orig].decode("utf-8", errors="surrogateescape")
    return len(prefix) + 1
