"""Error positions in rewritten text map back to the client's text."""

from __future__ import annotations

from proxy.protocol import messages as m
from proxy.sql.positions import original_position
from proxy.tracking import StatementPlan, _error_at_source


def _rewrite(original: str, splices: list[tuple[str, str]]) -> tuple[bytes, tuple]:
    """Replace each (old, new) once, left to right, recording the shifts."""
    raw = original.encode()
    out, shifts, pos = b"", [], 0
    for old, new in splices:
        start = raw.index(old.encode(), pos)
        out += raw[pos:start] + new.encode()
        shifts.append((start, start + len(old.encode()), len(new.encode())))
        pos = start + len(old.encode())
    return out + raw[pos:], tuple(shifts)


def test_positions_before_between_inside_and_after_splices() -> None:
    original = "SELECT id FROM cards WHERE pan = '4111' AND é = 1 AND nonexist = 2"
    rewritten, shifts = _rewrite(original, [
        ("id", "id , pan AS strongroom_recheck_1"),
        ("pan = '4111'", "pan_bidx = '\\x00112233445566778899'::bytea"),
    ])
    text = rewritten.decode()
    for token in ("SELECT", "FROM", "nonexist", "é", "= 2"):
        assert original_position(rewritten, original.encode(), shifts,
                                 text.index(token) + 1) == original.index(token) + 1
    # inside a spliced-in piece: where the replaced text starts
    inside = text.index("bytea") + 1
    assert original_position(rewritten, original.encode(), shifts, inside) == \
        original.index("pan = ") + 1
    assert original_position(rewritten, original.encode(), (), 5) == 5
    assert original_position(rewritten, original.encode(), shifts, 0) == 0


def test_error_response_rewritten_field_by_field() -> None:
    original = "SELECT 1 FROM t WHERE pan = 'x' AND nope = 1"
    rewritten, shifts = _rewrite(original, [("'x'", "'\\xdeadbeefdeadbeef'::bytea")])
    plan = StatementPlan(sql=rewritten, source=original, shifts=shifts)
    pos = rewritten.decode().index("nope") + 1
    body = (b"SERROR\0VERROR\0C42703\0Mcolumn \"nope\" does not exist\0P"
            + str(pos).encode() + b"\0Fparse_relation.c\0L3656\0\0")
    out = _error_at_source(m.message(b"E", body), plan)
    assert out is not None
    want = body.replace(b"P" + str(pos).encode(), b"P" + str(original.index("nope") + 1).encode())
    assert out == m.message(b"E", want)
    # no position, or one before every change: the message as it came (None)
    assert _error_at_source(m.message(b"E", b"SERROR\0C42601\0Mx\0\0"), plan) is None
    early = b"SERROR\0C42601\0Mx\0P3\0\0"
    assert _error_at_source(m.message(b"E", early), plan) is None
