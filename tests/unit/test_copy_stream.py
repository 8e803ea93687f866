"""COPY stream rewriting (proxy.copy_stream): pure, no sockets, no database.

Most tests use `Fake`, a reversible stand-in for a ColumnCrypto ("ENC" + format byte +
plaintext), so the expected bytes can be written down; a few use the real RoleColumn
(AES-GCM envelopes, type codecs, blind index) to check the wiring end to end. The
chunking tests matter most: the proxy sees CopyData messages cut anywhere, and the
output must not depend on where.
"""

from __future__ import annotations

import binascii
import csv
import datetime
import hashlib
import io
import itertools
import os
import struct
import time
from collections.abc import Iterable, Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.copy_stream import (
    SIGNATURE,
    CopyIn,
    CopyOut,
    copy_format,
    text_escaper,
    unescape_text,
)
from proxy.crypto import BlindIndex, ColumnCipher, ColumnKeys, Mode, Purpose
from proxy.encryption import TYPLEN, ColumnRuntime, RoleColumn
from proxy.sql.protected import ProtectedColumn
from proxy.tracking import ValueError_
from proxy.types import get_codec

# --------------------------------------------------------------------------- helpers


class Fake:
    """Reversible fake crypto: envelope = b"ENC" + fmt + plaintext; index = sha256[:4]."""

    logical_oid = 25
    typlen = -1

    def __init__(self, view: str = "plaintext", mask_to_null: bytes | None = None) -> None:
        self.view = view
        self.mask_to_null = mask_to_null
        self.calls: list[tuple[str, bytes, int]] = []

    def encrypt_param(self, value: bytes, fmt: int) -> bytes:
        self.calls.append(("encrypt", value, fmt))
        if value == b"REJECT":
            raise ValueError_("22P02", "invalid input syntax for type integer")
        return b"ENC" + bytes([fmt]) + value

    def blind_index_param(self, value: bytes, fmt: int) -> bytes:
        self.calls.append(("index", value, fmt))
        return hashlib.sha256(value).digest()[:4]

    def reveal(self, envelope: bytes, fmt: int) -> bytes | None:
        self.calls.append(("reveal", envelope, fmt))
        if envelope[:3] != b"ENC":
            raise ValueError_("XX001", "stored value failed authentication")
        value = envelope[4:]
        if self.mask_to_null is not None and value == self.mask_to_null:
            return None
        return value


F = Fake()


def env(value: bytes, fmt: int = 0) -> bytes:
    return b"ENC" + bytes([fmt]) + value


def text_bytea(value: bytes, fmt: int = 0) -> bytes:
    """A bytea as COPY text format writes it: hex output with the backslash doubled."""
    return b"\\\\x" + binascii.hexlify(env(value, fmt))


def csv_bytea(value: bytes, fmt: int = 0) -> bytes:
    return b"\\x" + binascii.hexlify(env(value, fmt))


def bidx_text(value: bytes) -> bytes:
    return b"\\\\x" + hashlib.sha256(value).digest()[:4].hex().encode()


def bidx_csv(value: bytes) -> bytes:
    return b"\\x" + hashlib.sha256(value).digest()[:4].hex().encode()


def bodies(stream: bytes) -> bytes:
    """Concatenated bodies of the CopyData messages in stream (and check the framing)."""
    out = []
    pos = 0
    while pos < len(stream):
        assert stream[pos : pos + 1] == b"d"
        (n,) = struct.unpack_from("!I", stream, pos + 1)
        out.append(stream[pos + 5 : pos + 1 + n])
        pos += 1 + n
    assert pos == len(stream)
    return b"".join(out)


def feed_in(ci: CopyIn, chunks: Iterable[bytes]) -> bytes:
    out = b"".join(ci.client_data(c) for c in chunks)
    return bodies(out + ci.client_done())


def feed_out(co: CopyOut, chunks: Iterable[bytes]) -> bytes:
    out = b"".join(co.server_data(c) for c in chunks)
    return bodies(out + co.server_done())


def run_in(fmt: str, data: bytes, columns: Sequence[Fake | None], options=None, index=(),
           **kw) -> bytes:
    return feed_in(CopyIn(fmt, options or {}, columns, index, **kw), [data])


def run_out(fmt: str, data: bytes, columns: Sequence[Fake | None], options=None) -> bytes:
    return feed_out(CopyOut(fmt, options or {}, columns), [data])


def splits(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(data)})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


def binary_stream(rows: Iterable[Sequence[bytes | None]], trailer: bool = True,
                  extension: bytes = b"") -> bytes:
    parts = [SIGNATURE, struct.pack("!ii", 0, len(extension)), extension]
    for row in rows:
        parts.append(struct.pack("!h", len(row)))
        for v in row:
            parts.append(struct.pack("!i", -1) if v is None else struct.pack("!i", len(v)) + v)
    if trailer:
        parts.append(struct.pack("!h", -1))
    return b"".join(parts)


def parse_binary(data: bytes) -> list[list[bytes | None]]:
    assert data.startswith(SIGNATURE)
    (ext,) = struct.unpack_from("!i", data, 15)
    pos = 19 + ext
    rows = []
    while pos < len(data):
        (count,) = struct.unpack_from("!h", data, pos)
        pos += 2
        if count == -1:
            assert pos == len(data)
            break
        row: list[bytes | None] = []
        for _ in range(count):
            (n,) = struct.unpack_from("!i", data, pos)
            pos += 4
            if n < 0:
                row.append(None)
            else:
                row.append(data[pos : pos + n])
                pos += n
        rows.append(row)
    return rows


def assert_error(exc: pytest.ExceptionInfo[ValueError_], sqlstate: str, *secret: bytes) -> None:
    assert exc.value.sqlstate == sqlstate
    for s in secret:
        assert s.decode(errors="replace") not in exc.value.text


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("fmt", "options", "expected"),
    [
        ("text", {}, dict(delimiter=b"\t", null=b"\\N", header=False)),
        ("csv", {}, dict(delimiter=b",", null=b"", quote=b'"', escape=b'"')),
        ("csv", {"quote": "'"}, dict(quote=b"'", escape=b"'")),
        ("csv", {"escape": "\\"}, dict(quote=b'"', escape=b"\\")),
        ("csv", {"header": "true"}, dict(header=True, header_match=False)),
        ("csv", {"header": '{"boolval": true}'}, dict(header=True)),
        ("csv", {"header": "{}"}, dict(header=False)),
        ("csv", {"header": "off"}, dict(header=False)),
        ("csv", {"header": "1"}, dict(header=True)),
        ("csv", {"header": True}, dict(header=True)),
        ("csv", {"header": "match"}, dict(header=True, header_match=True)),
        ("text", {"delimiter": "|", "null": ""}, dict(delimiter=b"|", null=b"")),
        ("CSV", {"force_null": "a,b"}, dict(force_null=frozenset({"a", "b"}))),
        ("csv", {"force_not_null": "*"}, dict(force_not_null_all=True)),
        ("csv", {"default": "\\D"}, dict(default=b"\\D")),
        (None, {"format": "binary"}, dict(kind="binary")),
    ],
)
def test_copy_format(fmt: str | None, options: dict, expected: dict) -> None:
    f = copy_format(fmt, options)
    for key, value in expected.items():
        assert getattr(f, key) == value, key


@pytest.mark.parametrize(
    "options", [{"delimiter": "ab"}, {"delimiter": "é"}, {"format": "xml"}, {"header": "maybe"}]
)
def test_copy_format_rejects(options: dict) -> None:
    with pytest.raises(ValueError_) as exc:
        copy_format(options.get("format"), options)
    assert exc.value.sqlstate == "22023"


# --------------------------------------------------------------------------- text codec


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        (b"plain", b"plain"),
        (b"a\\tb\\nc\\rd\\\\e", b"a\tb\nc\rd\\e"),
        (b"\\b\\f\\v", b"\b\f\v"),
        (b"\\101\\0\\7\\777", b"A\x00\x07\xff"),
        (b"\\x41\\x4g\\xz", b"A\x04gxz"),
        (b"\\.\\,\\N", b".,N"),
        (b"end\\", b"end"),
        ("é\\té".encode(), "é\té".encode()),
    ],
)
def test_unescape_text(raw: bytes, value: bytes) -> None:
    assert unescape_text(raw) == value


@given(st.binary(max_size=40), st.sampled_from([b"\t", b",", b"|", b"\x01"]))
def test_text_escape_round_trip(value: bytes, delimiter: bytes) -> None:
    escaped = text_escaper(delimiter)(value)
    assert b"\n" not in escaped and b"\r" not in escaped
    assert unescape_text(escaped) == value
    # a raw delimiter never appears unescaped
    assert escaped.replace(b"\\\\", b"").replace(b"\\" + delimiter, b"").count(delimiter) == 0


# --------------------------------------------------------------------------- text in


TEXT_IN = [
    # (name, data, columns, options, index, expected)
    ("basic", b"1\tabc\n", [None, F], {}, (), b"1\t" + text_bytea(b"abc") + b"\n"),
    ("null", b"1\t\\N\n", [None, F], {}, (), b"1\t\\N\n"),
    ("empty", b"1\t\n", [None, F], {}, (), b"1\t" + text_bytea(b"") + b"\n"),
    ("escapes", b"x\\ty\ta\\tb\\\\c\\nd\\101\n", [None, F], {}, (),
     b"x\\ty\t" + text_bytea(b"a\tb\\c\ndA") + b"\n"),
    ("escaped N is data", b"\\\\N\n", [F], {}, (), text_bytea(b"\\N") + b"\n"),
    ("unprotected untouched", b"\\x41\\\\.x\\\n\t\\N\tv\n", [None, None, F], {}, (),
     b"\\x41\\\\.x\\\n\t\\N\t" + text_bytea(b"v") + b"\n"),
    ("custom null", b"NULL\tNULL\t\\N\n", [None, F, F], {"null": "NULL"}, (),
     b"NULL\tNULL\t" + text_bytea(b"N") + b"\n"),
    ("empty null", b"\tx\n", [F, F], {"null": ""}, (), b"\t" + text_bytea(b"x") + b"\n"),
    ("pipe delimiter escaped", b"a\\|b|c\\|d|e\n", [None, F, F], {"delimiter": "|"}, (),
     b"a\\|b|" + text_bytea(b"c|d") + b"|" + text_bytea(b"e") + b"\n"),
    ("escaped backslash before delimiter", b"a\\\\|b\n", [F, F], {"delimiter": "|"}, (),
     text_bytea(b"a\\") + b"|" + text_bytea(b"b") + b"\n"),
    ("escaped tab is data", b"a\\\tb\tc\n", [F, None], {}, (),
     text_bytea(b"a\tb") + b"\tc\n"),
    ("escaped newline continues the row", b"a\\\nb\tc\nd\te\n", [F, None], {}, (),
     text_bytea(b"a\nb") + b"\tc\n" + text_bytea(b"d") + b"\te\n"),
    ("escaped newline at row start", b"\\\n\tx\n", [F, None], {}, (),
     text_bytea(b"\n") + b"\tx\n"),
    ("crlf", b"a\tb\r\nc\td\r\n", [F, None], {}, (),
     text_bytea(b"a") + b"\tb\r\n" + text_bytea(b"c") + b"\td\r\n"),
    ("cr", b"a\tb\rc\td\r", [F, None], {}, (),
     text_bytea(b"a") + b"\tb\r" + text_bytea(b"c") + b"\td\r"),
    ("escaped CR in LF mode", b"a\\\rb\n", [F], {}, (), text_bytea(b"a\rb") + b"\n"),
    ("no final newline", b"1\ta\n2\tb", [None, F], {}, (),
     b"1\t" + text_bytea(b"a") + b"\n2\t" + text_bytea(b"b")),
    ("end marker", b"1\ta\n\\.\n2\tplaintext\n", [None, F], {}, (),
     b"1\t" + text_bytea(b"a") + b"\n\\.\n"),
    ("end marker after data", b"1\ta\\.\n2\tsecret\n", [None, F], {}, (),
     b"1\t" + text_bytea(b"a") + b"\n\\.\n"),
    ("end marker crlf", b"1\ta\r\n\\.\r\n", [None, F], {}, (),
     b"1\t" + text_bytea(b"a") + b"\r\n\\.\r\n"),
    ("escaped end marker is data", b"\\\\.\n", [F], {}, (), text_bytea(b"\\.") + b"\n"),
    ("header", b"id\tname\n1\ta\n", [None, F], {"header": "true"}, (),
     b"id\tname\n1\t" + text_bytea(b"a") + b"\n"),
    ("unicode", "1\tñ€😀\n".encode(), [None, F], {}, (),
     b"1\t" + text_bytea("ñ€😀".encode()) + b"\n"),
    ("index", b"1\tabc\n2\t\\N\n", [None, F], {}, ((1, F),),
     b"1\t" + text_bytea(b"abc") + b"\t" + bidx_text(b"abc") + b"\n2\t\\N\t\\N\n"),
    ("index of unescaped value", b"a\\tb\n", [F], {}, ((0, F),),
     text_bytea(b"a\tb") + b"\t" + bidx_text(b"a\tb") + b"\n"),
    ("default marker forwarded", b"\\D\tx\n", [F, None], {"default": "\\D"}, (),
     b"\\D\tx\n"),
    ("no protected columns", b"any\tthing\\\n", [None, None], {}, (), b"any\tthing\\\n"),
]


@pytest.mark.parametrize(
    ("data", "columns", "options", "index", "expected"),
    [case[1:] for case in TEXT_IN],
    ids=[case[0] for case in TEXT_IN],
)
def test_text_in(data: bytes, columns: list, options: dict, index: tuple,
                 expected: bytes) -> None:
    assert run_in("text", data, columns, options, index) == expected
    # every split into two messages gives the same bytes
    for cut in range(1, len(data)):
        ci = CopyIn("text", options, columns, index)
        assert feed_in(ci, [data[:cut], data[cut:]]) == expected, cut


TEXT_IN_ERRORS = [
    ("too few fields", b"1\n", [None, F], {}, "22P04"),
    ("too many fields", b"1\ta\tb\n", [None, F], {}, "22P04"),
    ("literal CR in LF data", b"a\tb\nc\rd\te\n", [F, None], {}, "22P04"),
    ("literal LF in CRLF data", b"a\tb\r\nc\nd\te\r\n", [F, None], {}, "22P04"),
    ("escaped CR before LF in CRLF data", b"a\tb\r\nc\\\r\n", [F, None], {}, "22P04"),
    ("corrupt end marker", b"a\\.b\n", [F], {}, "22P04"),
    ("codec rejects", b"REJECT\n", [F], {}, "22P02"),
    ("default on blind-indexed column", b"\\D\n", [F], {"default": "\\D"}, "0A000"),
]


@pytest.mark.parametrize(
    ("data", "columns", "options", "sqlstate"),
    [case[1:] for case in TEXT_IN_ERRORS],
    ids=[case[0] for case in TEXT_IN_ERRORS],
)
def test_text_in_errors(data: bytes, columns: list, options: dict, sqlstate: str) -> None:
    index = ((0, F),) if "default" in options else ()
    ci = CopyIn("text", options, columns, index)
    with pytest.raises(ValueError_) as exc:
        feed_in(ci, [data])
    assert_error(exc, sqlstate, b"REJECT")
    # the failure latches: nothing more is forwarded, CopyDone is not let through
    with pytest.raises(ValueError_):
        ci.client_data(b"more\n")
    with pytest.raises(ValueError_):
        ci.client_done()


def test_text_in_data_after_end_marker_is_never_forwarded() -> None:
    ci = CopyIn("text", {}, [F])
    out = bodies(ci.client_data(b"a\n\\.\n") + ci.client_data(b"secret\n") + ci.client_done())
    assert out == text_bytea(b"a") + b"\n\\.\n"
    assert b"secret" not in out


def test_text_in_batches_many_rows_in_one_message() -> None:
    ci = CopyIn("text", {}, [None, F])
    msg = ci.client_data(b"1\ta\n2\tb\n3\tc")
    assert msg[:1] == b"d" and bodies(msg).count(b"\n") == 2
    assert bodies(ci.client_done()) == b"3\t" + text_bytea(b"c")


def test_text_in_buffers_partial_row() -> None:
    ci = CopyIn("text", {}, [None, F])
    assert ci.client_data(b"1\tab") == b""
    assert bodies(ci.client_data(b"c\n")) == b"1\t" + text_bytea(b"abc") + b"\n"


# --------------------------------------------------------------------------- text out


TEXT_OUT = [
    ("basic", b"1\t" + text_bytea(b"abc") + b"\n", [None, F], {}, b"1\tabc\n"),
    ("null", b"1\t\\N\n", [None, F], {}, b"1\t\\N\n"),
    ("empty", b"1\t" + text_bytea(b"") + b"\n", [None, F], {}, b"1\t\n"),
    ("special chars escaped", text_bytea(b"a\tb\nc\rd\\e\bf\x0bg\x0c") + b"\tx\\ty\n",
     [F, None], {}, b"a\\tb\\nc\\rd\\\\e\\bf\\vg\\f\tx\\ty\n"),
    ("delimiter escaped", text_bytea(b"a,b") + b",x\n", [F, None], {"delimiter": ","},
     b"a\\,b,x\n"),
    ("backslash-looking plaintext", text_bytea(b"\\N") + b"\n", [F], {}, b"\\\\N\n"),
    ("escape-format bytea",
     b"\\\\105NC\\\\000abc\n", [F], {}, b"abc\n"),
    ("masked to NULL", text_bytea(b"hide") + b"\t" + text_bytea(b"show") + b"\n",
     [Fake(mask_to_null=b"hide"), F], {}, b"\\N\tshow\n"),
    ("masked NULL uses NULL string", text_bytea(b"hide") + b"\n",
     [Fake(mask_to_null=b"hide")], {"null": "<null>"}, b"<null>\n"),
    ("ciphertext view untouched", text_bytea(b"abc") + b"\n", [Fake(view="ciphertext")], {},
     text_bytea(b"abc") + b"\n"),
    ("header", b"id\tpan\n1\t" + text_bytea(b"x") + b"\n", [None, F], {"header": "true"},
     b"id\tpan\n1\tx\n"),
    ("unicode", text_bytea("ñ😀".encode()) + b"\n", [F], {}, "ñ😀".encode() + b"\n"),
]


@pytest.mark.parametrize(
    ("data", "columns", "options", "expected"),
    [case[1:] for case in TEXT_OUT],
    ids=[case[0] for case in TEXT_OUT],
)
def test_text_out(data: bytes, columns: list, options: dict, expected: bytes) -> None:
    assert run_out("text", data, columns, options) == expected
    for cut in range(1, len(data)):
        co = CopyOut("text", options, columns)
        assert feed_out(co, [data[:cut], data[cut:]]) == expected, cut


def test_text_out_one_message_per_row() -> None:
    co = CopyOut("text", {}, [None, F])
    msg = co.server_data(b"1\t" + text_bytea(b"a") + b"\n")
    assert msg == b"d" + struct.pack("!I", 4 + 4) + b"1\ta\n"


@pytest.mark.parametrize(
    ("data", "sqlstate"),
    [
        (text_bytea(b"x")[:-1] + b"Z\n", "XX001"),  # not hex
        (b"\\\\x" + binascii.hexlify(b"tampered") + b"\n", "XX001"),  # reveal refuses
        (b"a\tb\n", "22P04"),  # field count
    ],
)
def test_text_out_errors(data: bytes, sqlstate: str) -> None:
    with pytest.raises(ValueError_) as exc:
        run_out("text", data, [F])
    assert_error(exc, sqlstate, b"tampered")


# --------------------------------------------------------------------------- csv in


CSV_IN = [
    ("basic", b"1,abc\n", [None, F], {}, (), b"1," + csv_bytea(b"abc") + b"\n"),
    ("unquoted empty is NULL", b"1,\n", [None, F], {}, (), b"1,\n"),
    ("quoted empty is not NULL", b'1,""\n', [None, F], {}, (), b"1," + csv_bytea(b"") + b"\n"),
    ("quoted delimiter", b'1,"a,b"\n', [None, F], {}, (), b"1," + csv_bytea(b"a,b") + b"\n"),
    ("doubled quote", b'"x""y",q\n', [F, None], {}, (), csv_bytea(b'x"y') + b",q\n"),
    ("quoted newline spans lines", b'1,"line1\nline2\r\n"\n2,z\n', [None, F], {}, (),
     b"1," + csv_bytea(b"line1\nline2\r\n") + b"\n2," + csv_bytea(b"z") + b"\n"),
    ("quote in the middle of a field", b'ab"c,d"e,x\n', [F, None], {}, (),
     csv_bytea(b"abc,de") + b",x\n"),
    ("unprotected quoted untouched", b'"a,""b",c\n', [None, F], {}, (),
     b'"a,""b",' + csv_bytea(b"c") + b"\n"),
    ("backslashes are data", b"\\N,a\\tb\n", [F, F], {}, (),
     csv_bytea(b"\\N") + b"," + csv_bytea(b"a\\tb") + b"\n"),
    ("null string", b"NULL,\"NULL\"\n", [F, F], {"null": "NULL"}, (),
     b"NULL," + csv_bytea(b"NULL") + b"\n"),
    ("header", b'id,"na\nme"\n1,a\n', [None, F], {"header": "true"}, (),
     b'id,"na\nme"\n1,' + csv_bytea(b"a") + b"\n"),
    ("custom quote and escape", b"'a\\'b''c',x\n", [F, None], {"quote": "'", "escape": "\\"},
     (), csv_bytea(b"a'bc") + b",x\n"),
    ("escaped quote keeps the field open across lines", b'"a\\"\nb",x\n', [F, None],
     {"escape": "\\"}, (), csv_bytea(b'a"\nb') + b",x\n"),
    ("escape escapes itself", b'"a\\\\b\\c",x\n', [F, None], {"escape": "\\"}, (),
     csv_bytea(b"a\\b\\c") + b",x\n"),
    ("semicolon", b"a;b\n", [F, F], {"delimiter": ";"}, (),
     csv_bytea(b"a") + b";" + csv_bytea(b"b") + b"\n"),
    ("crlf", b'1,a\r\n2,"b\r\nc"\r\n', [None, F], {}, (),
     b"1," + csv_bytea(b"a") + b"\r\n2," + csv_bytea(b"b\r\nc") + b"\r\n"),
    ("no final newline", b'1,"a\nb"', [None, F], {}, (), b"1," + csv_bytea(b"a\nb")),
    ("end marker", b"1,a\n\\.\n2,secret\n", [None, F], {}, (),
     b"1," + csv_bytea(b"a") + b"\n\\.\n"),
    ("end marker lookalike is data", b'"\\."\n\\.x\n', [F], {}, (),
     csv_bytea(b"\\.") + b"\n" + csv_bytea(b"\\.x") + b"\n"),
    ("index", b'1,abc\n2,\n3,""\n', [None, F], {}, ((1, F),),
     b"1," + csv_bytea(b"abc") + b"," + bidx_csv(b"abc") + b"\n2,,\n3,"
     + csv_bytea(b"") + b"," + bidx_csv(b"") + b"\n"),
    ("hex quoted when delimiter is a hex letter", b"xyz\n", [F], {"delimiter": "a"}, (),
     b'"' + csv_bytea(b"xyz") + b'"\n'),
    ("force_not_null", b"a,\n", [None, F], {"force_not_null": "p"}, (),
     b"a," + csv_bytea(b"") + b"\n"),
    ("force_null forwards the quoted marker", b'a,""\n', [None, F], {"force_null": "p"}, (),
     b'a,""\n'),
    ("force_null on another column", b'a,""\n', [None, F], {"force_null": "i"}, (),
     b"a," + csv_bytea(b"") + b"\n"),
    ("force both", b'"",\n', [F, F], {"force_null": "*", "force_not_null": "*"}, (),
     b'"",' + csv_bytea(b"") + b"\n"),
    ("index NULL under force_not_null *", b'""\n', [F],
     {"force_null": "*", "force_not_null": "*"}, ((0, F),), b'"",""\n'),
    ("default marker forwarded", b"\\D,x\n", [F, None], {"default": "\\D"}, (),
     b"\\D,x\n"),
]


@pytest.mark.parametrize(
    ("data", "columns", "options", "index", "expected"),
    [case[1:] for case in CSV_IN],
    ids=[case[0] for case in CSV_IN],
)
def test_csv_in(data: bytes, columns: list, options: dict, index: tuple,
                expected: bytes) -> None:
    names = ["i", "p"][: len(columns)] if len(columns) == 2 else ["p"]
    assert run_in("csv", data, columns, options, index, names=names) == expected
    for cut in range(1, len(data)):
        ci = CopyIn("csv", options, columns, index, names=names)
        assert feed_in(ci, [data[:cut], data[cut:]]) == expected, cut


CSV_IN_ERRORS = [
    ("unterminated quote at end", b'1,"abc\n', [None, F], {}, "22P04"),
    ("unquoted CR", b"1,a\rb\n", [None, F], {}, "22P04"),
    ("unquoted LF in CRLF data", b"1,a\r\n2,b\n3,c\r\n", [None, F], {}, "22P04"),
    ("field count", b"1,a,b\n", [None, F], {}, "22P04"),
    ("codec rejects", b"1,REJECT\n", [None, F], {}, "22P02"),
]


@pytest.mark.parametrize(
    ("data", "columns", "options", "sqlstate"),
    [case[1:] for case in CSV_IN_ERRORS],
    ids=[case[0] for case in CSV_IN_ERRORS],
)
def test_csv_in_errors(data: bytes, columns: list, options: dict, sqlstate: str) -> None:
    with pytest.raises(ValueError_) as exc:
        run_in("csv", data, columns, options)
    assert_error(exc, sqlstate, b"REJECT")


def test_csv_in_force_lists_need_names() -> None:
    with pytest.raises(ValueError_) as exc:
        CopyIn("csv", {"force_null": "p"}, [None, F])
    assert exc.value.sqlstate == "0A000"
    CopyIn("csv", {"force_null": "*"}, [None, F])  # "*" needs no names
    CopyIn("csv", {"force_null": "p"}, [None, None])  # nothing protected: nothing to do


def test_header_match_with_blind_index_names_the_index_columns() -> None:
    """HEADER MATCH: the server checks the header against the column list the proxy
    widened, so the index columns' names are appended to it as their values to rows."""
    with pytest.raises(ValueError_) as exc:  # names unknown: cannot be applied
        CopyIn("csv", {"header": "match"}, [F], [(0, F)])
    assert exc.value.sqlstate == "0A000"
    assert run_in("csv", b"p\nx\n", [F], {"header": "match"}) == b"p\n" + csv_bytea(b"x") + b"\n"
    assert run_in("csv", b"id,p\r\n1,x\r\n", [None, F], {"header": "match"}, [(1, F)],
                  index_names=["p_bidx"]) == (
        b'id,p,"p_bidx"\r\n1,' + csv_bytea(b"x") + b"," + bidx_csv(b"x") + b"\r\n")
    assert run_in("text", b"id\tp\n1\tx\n", [None, F], {"header": "match"}, [(1, F)],
                  index_names=["p\tbidx"]) == (
        b"id\tp\tp\\tbidx\n1\t" + text_bytea(b"x") + b"\t" + bidx_text(b"x") + b"\n")
    # HEADER true: the server skips the line whatever it says; it is passed as sent
    assert run_in("csv", b"whatever\nx\n", [F], {"header": "true"}, [(0, F)],
                  index_names=["p_bidx"]).startswith(b"whatever\n")


@pytest.mark.parametrize(("fmt", "header"), [("csv", b"a,b,c\n"), ("text", b"a\n")])
def test_header_match_counts_the_clients_columns(fmt: str, header: bytes) -> None:
    with pytest.raises(ValueError_) as exc:
        run_in(fmt, header + b"1,x\n", [None, F], {"header": "match"}, [(1, F)],
               index_names=["p_bidx"])
    assert exc.value.sqlstate == "22P04"
    assert "expected 2" in str(exc.value)


@pytest.mark.parametrize(("fmt", "header", "message"), [
    ("csv", b'id,"pa""n"\n', 'field 2: got "pa"n", expected "p"'),
    ("csv", b"id,\n", 'field 2: got null value (""), expected "p"'),
    ("text", b"id\t\\N\n", 'field 2: got null value ("\\N"), expected "p"'),
    ("text", b"i\\d\tp\n", 'field 1: got "id", expected "ID"'),
])
def test_header_match_names_the_clients_columns(fmt: str, header: bytes, message: str) -> None:
    with pytest.raises(ValueError_) as exc:
        run_in(fmt, header, [None, F], {"header": "match"}, [(1, F)],
               names=["ID" if b"i\\d" in header else "id", "p"], index_names=["p_bidx"])
    assert exc.value.sqlstate == "22P04"
    assert str(exc.value) == "column name mismatch in header line " + message


# --------------------------------------------------------------------------- csv out


CSV_OUT = [
    ("basic", b"1," + csv_bytea(b"abc") + b"\n", [None, F], {}, b"1,abc\n"),
    ("null", b"1,\n", [None, F], {}, b"1,\n"),
    ("empty string quoted", b"1," + csv_bytea(b"") + b"\n", [None, F], {}, b'1,""\n'),
    ("delimiter", csv_bytea(b"a,b") + b"\n", [F], {}, b'"a,b"\n'),
    ("quote doubled", csv_bytea(b'say "hi"') + b"\n", [F], {}, b'"say ""hi"""\n'),
    ("newline", csv_bytea(b"a\nb") + b",x\n", [F, None], {}, b'"a\nb",x\n'),
    ("carriage return", csv_bytea(b"a\rb") + b"\n", [F], {}, b'"a\rb"\n'),
    ("spaces not quoted", csv_bytea(b" a ") + b"\n", [F], {}, b" a \n"),
    ("end marker lookalike single column", csv_bytea(b"\\.") + b"\n", [F], {}, b'"\\."\n'),
    ("end marker lookalike two columns", csv_bytea(b"\\.") + b",\n", [F, None], {},
     b"\\.,\n"),
    ("equals null string", csv_bytea(b"NULL") + b",NULL\n", [F, F], {"null": "NULL"},
     b'"NULL",NULL\n'),
    ("forced quote kept", b'"' + csv_bytea(b"abc") + b'",x\n', [F, None], {}, b'"abc",x\n'),
    ("custom escape", csv_bytea(b'a"b\\c') + b"\n", [F], {"escape": "\\"},
     b'"a\\"b\\\\c"\n'),
    ("custom quote", csv_bytea(b"it's") + b"\n", [F], {"quote": "'"}, b"'it''s'\n"),
    ("masked to NULL", csv_bytea(b"hide") + b"\n", [Fake(mask_to_null=b"hide")], {}, b"\n"),
    ("unprotected quoted untouched", b'"a\n""b",' + csv_bytea(b"c") + b"\n", [None, F], {},
     b'"a\n""b",c\n'),
    ("header", b"id,pan\n" + csv_bytea(b"q") + b",1\n", [F, None], {"header": "true"},
     b"id,pan\nq,1\n"),
]


@pytest.mark.parametrize(
    ("data", "columns", "options", "expected"),
    [case[1:] for case in CSV_OUT],
    ids=[case[0] for case in CSV_OUT],
)
def test_csv_out(data: bytes, columns: list, options: dict, expected: bytes) -> None:
    assert run_out("csv", data, columns, options) == expected
    for cut in range(1, len(data)):
        co = CopyOut("csv", options, columns)
        assert feed_out(co, [data[:cut], data[cut:]]) == expected, cut


# --------------------------------------------------------------------------- binary


def test_binary_in() -> None:
    data = binary_stream([[b"\x00\x01", b"abc", None], [b"\x00\x02", None, b""]],
                         extension=b"ext!")
    out = run_in("binary", data, [None, F, F], index=[(1, F)])
    assert out.startswith(SIGNATURE + struct.pack("!ii", 0, 4) + b"ext!")
    assert out.endswith(struct.pack("!h", -1))
    assert parse_binary(out) == [
        [b"\x00\x01", env(b"abc", 1), None, hashlib.sha256(b"abc").digest()[:4]],
        [b"\x00\x02", None, env(b"", 1), None],
    ]
    assert ("encrypt", b"abc", 1) in F.calls and ("index", b"abc", 1) in F.calls


def test_binary_in_without_trailer_is_accepted() -> None:
    data = binary_stream([[b"v"]], trailer=False)
    assert parse_binary(run_in("binary", data, [F])) == [[env(b"v", 1)]]


def test_binary_out() -> None:
    data = binary_stream([[b"\x00\x01", env(b"abc", 1), None],
                          [b"\x00\x02", env(b"hide", 1), env(b"", 1)]])
    out = run_out("binary", data, [None, Fake(mask_to_null=b"hide"), F])
    assert parse_binary(out) == [[b"\x00\x01", b"abc", None], [b"\x00\x02", None, b""]]


@pytest.mark.parametrize(
    ("data", "final_only"),
    [
        (b"PGCOPY\n\xff\r\n\x01" + bytes(8), False),  # bad signature
        (SIGNATURE + struct.pack("!ii", 0, -1), False),  # negative extension length
        (SIGNATURE + bytes(4), True),  # header cut short
        (binary_stream([[b"a", b"b"]]), False),  # field count 2, expected 1
        (binary_stream([[b"a"]], trailer=False) + b"\x00\x01\x00\x00", True),  # cut tuple
        (binary_stream([[b"a"]]) + b"\x00\x01", False),  # data after trailer
        (binary_stream([]) [:-2] + struct.pack("!hi", 1, -2), False),  # bad field size
    ],
)
def test_binary_in_errors(data: bytes, final_only: bool) -> None:
    ci = CopyIn("binary", {}, [F])
    if final_only:
        ci.client_data(data)
        with pytest.raises(ValueError_) as exc:
            ci.client_done()
    else:
        with pytest.raises(ValueError_) as exc:
            ci.client_data(data)
    assert exc.value.sqlstate == "22P04"


# --------------------------------------------------------------------------- chunking


SAMPLES_IN = {
    "text": (
        b"1\tabc\t\\N\n2\ta\\tb\\\\c\\n\tx\\\ny\n3\t\t\xc3\xa9\n4\tlast\tz",
        {},
    ),
    "csv": (b'h1,h2,h3\n1,"a,b",\n2,"multi\nline ""q""",""\n3,plain,"x"\n4,end,z', {
        "header": "true"}),
    "binary": (binary_stream([[b"\x01", b"abc", None], [b"\x02", b"", b"\xff" * 40],
                              [b"\x03", None, b"z"]]), {}),
}


def _sample_out(fmt: str) -> bytes:
    if fmt == "binary":
        return binary_stream([[b"\x01", env(b"abc", 1), None], [b"\x02", env(b"", 1), None]])
    if fmt == "csv":
        return (b"id,pan,x\n1," + csv_bytea(b"a,b") + b",\n2," + csv_bytea(b'q"\n')
                + b',"' + csv_bytea(b"u\nv") + b'"\n3,,' + csv_bytea(b"") + b"\n")
    return (b"1\t" + text_bytea(b"a\tb") + b"\t\\N\n2\t\\N\t" + text_bytea(b"") + b"\n3\t"
            + text_bytea("é".encode()) + b"\t" + text_bytea(b"q\\") + b"\n")


@pytest.mark.parametrize("fmt", ["text", "csv", "binary"])
def test_in_every_byte_split_and_bytewise(fmt: str) -> None:
    data, options = SAMPLES_IN[fmt]
    cols = [None, F, F]
    expected = run_in(fmt, data, cols, options, [(1, F)])
    for cut in range(1, len(data)):
        assert feed_in(CopyIn(fmt, options, cols, [(1, F)]), [data[:cut], data[cut:]]) == \
            expected, cut
    one_byte = [data[i : i + 1] for i in range(len(data))]
    assert feed_in(CopyIn(fmt, options, cols, [(1, F)]), one_byte) == expected


@pytest.mark.parametrize("fmt", ["text", "csv", "binary"])
def test_out_every_byte_split_and_bytewise(fmt: str) -> None:
    data = _sample_out(fmt)
    options = {"header": "true"} if fmt == "csv" else {}
    cols = [None, F, F]
    expected = run_out(fmt, data, cols, options)
    for cut in range(1, len(data)):
        assert feed_out(CopyOut(fmt, options, cols), [data[:cut], data[cut:]]) == expected, cut
    one_byte = [data[i : i + 1] for i in range(len(data))]
    assert feed_out(CopyOut(fmt, options, cols), one_byte) == expected


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_arbitrary_chunking_is_invisible(data: st.DataObject) -> None:
    fmt = data.draw(st.sampled_from(["text", "csv", "binary"]))
    direction = data.draw(st.sampled_from(["in", "out"]))
    cols = [None, F, F]
    if direction == "in":
        stream, options = SAMPLES_IN[fmt]
        whole = run_in(fmt, stream, cols, options, [(1, F)])
    else:
        stream = _sample_out(fmt)
        options = {"header": "true"} if fmt == "csv" else {}
        whole = run_out(fmt, stream, cols, options)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12))
    chunks = splits(stream, cuts)
    if direction == "in":
        got = feed_in(CopyIn(fmt, options, cols, [(1, F)]), chunks)
    else:
        got = feed_out(CopyOut(fmt, options, cols), chunks)
    assert got == whole


# --------------------------------------------------------------------------- round trips


VALUES = st.binary(max_size=12) | st.text(
    alphabet=st.sampled_from(list('ab,"\t\n\r\\.|é NUL')), max_size=12
).map(str.encode)


def _pg_text_row(values: Sequence[bytes | None], delimiter: bytes) -> bytes:
    esc = text_escaper(delimiter)
    return delimiter.join(b"\\N" if v is None else esc(v) for v in values)


@given(st.lists(st.lists(st.none() | VALUES, min_size=2, max_size=2), min_size=1, max_size=6),
       st.sampled_from([b"\t", b",", b"|"]))
def test_text_round_trip(rows: list[list[bytes | None]], delimiter: bytes) -> None:
    """Client text -> CopyIn -> (server stores envelopes, prints them as bytea) ->
    CopyOut -> the client's values, whatever bytes they hold."""
    d = delimiter.decode()
    data = b"".join(_pg_text_row(r, delimiter) + b"\n" for r in rows)
    stored = run_in("text", data, [F, None], {"delimiter": d})
    out = run_out("text", stored, [F, None], {"delimiter": d})
    lines = out.split(b"\n")[:-1]
    assert len(lines) == len(rows)
    for line, row in zip(lines, rows, strict=True):
        fields = [None if f == b"\\N" else unescape_text(f) for f in _split(line, delimiter)]
        assert fields == row


def _split(line: bytes, delimiter: bytes) -> list[bytes]:
    """Independent (slow, obvious) text-format field splitter for the round trip."""
    fields, cur, i = [], bytearray(), 0
    while i < len(line):
        c = line[i : i + 1]
        if c == b"\\" and i + 1 < len(line):
            cur += line[i : i + 2]
            i += 2
            continue
        if c == delimiter:
            fields.append(bytes(cur))
            cur = bytearray()
        else:
            cur += c
        i += 1
    fields.append(bytes(cur))
    return fields


TEXTS = st.text(alphabet=st.sampled_from(list('ab,"\n\r;é \\x')), max_size=10)


@given(st.lists(st.lists(TEXTS, min_size=2, max_size=2), min_size=1, max_size=5))
def test_csv_round_trip_against_python_csv(rows: list[list[str]]) -> None:
    """Encode rows with Python's csv writer, push them through CopyIn and CopyOut, and
    read the result back with Python's csv reader."""
    buf = io.StringIO(newline="")
    csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_ALL).writerows(rows)
    data = buf.getvalue().encode()
    stored = run_in("csv", data, [F, F], {})
    assert b'"' not in stored  # envelopes need no quoting: nothing in plaintext survives
    out = run_out("csv", stored, [F, F], {})
    back = list(csv.reader(io.StringIO(out.decode(), newline="")))
    assert back == rows


# --------------------------------------------------------------------------- real crypto


def _role(logical_type: str, mode: Mode = Mode.RANDOMIZED,
          blind_index: bool = False, view: str = "plaintext") -> RoleColumn:
    spec = ProtectedColumn("public", "cards", "pan", logical_type, mode.value,
                           blind_index=blind_index)
    col = spec.qualified
    cipher = ColumnCipher(col, logical_type, mode,
                          ColumnKeys(col, Purpose.ENCRYPT, 1, {1: os.urandom(32)}),
                          database="appdb")
    bidx = BlindIndex(col, logical_type,
                      ColumnKeys(col, Purpose.BLIND_INDEX, 1, {1: os.urandom(32)})) \
        if blind_index else None
    codec = get_codec(logical_type)
    runtime = ColumnRuntime(spec, cipher, bidx, codec, codec.oid, TYPLEN[logical_type])
    return RoleColumn(runtime, view, None, tz=lambda: datetime.UTC)


@pytest.mark.parametrize(
    ("logical_type", "values"),
    [
        ("text", [b"4111111111111111", b"", "ñ\t😀\\".encode()]),
        ("int4", [b"-2147483648", b"0", b"42"]),
        ("numeric", [b"1.50", b"NaN", b"-0.001"]),
        ("date", [b"2024-02-29", b"infinity"]),
    ],
)
def test_real_text_round_trip_and_no_plaintext(logical_type: str, values: list[bytes]) -> None:
    rc = _role(logical_type, blind_index=True)
    esc = text_escaper(b"\t")
    data = b"".join(b"%d\t%s\n" % (i, esc(v)) for i, v in enumerate(values)) + b"9\t\\N\n"
    stored = run_in("text", data, [None, rc], index=[(1, rc)])
    for v in values:
        if len(v) >= 4:
            assert v not in stored
            assert binascii.hexlify(v) not in stored
    rows = [line.split(b"\t") for line in stored.split(b"\n")[:-1]]
    assert all(len(r) == 3 for r in rows)
    assert rows[-1] == [b"9", b"\\N", b"\\N"]
    for row, v in zip(rows, values, strict=False):
        envelope = binascii.unhexlify(row[1][3:])
        canonical = rc.runtime.cipher.decrypt(envelope)
        assert canonical == rc.runtime.codec.from_text(v)
        assert binascii.unhexlify(row[2][3:]) == rc.runtime.blind_index.compute(canonical)
    # the server sends the stored bytea back in COPY TO: the client sees its values
    back = run_out("text", b"\n".join(b"\t".join(r[:2]) for r in rows) + b"\n", [None, rc])
    got = [unescape_text(line.split(b"\t")[1]) for line in back.split(b"\n")[:-1]]
    codec = rc.runtime.codec
    assert got[:-1] == [codec.to_text(codec.from_text(v)) for v in values]
    assert back.endswith(b"9\t\\N\n")


@pytest.mark.parametrize("fmt", ["csv", "binary"])
def test_real_int4_csv_and_binary(fmt: str) -> None:
    rc = _role("int4")
    if fmt == "csv":
        stored = run_in("csv", b"1,42\n2,\n", [None, rc])
        lines = stored.split(b"\n")
        envelope = binascii.unhexlify(lines[0].split(b",")[1][2:])
        assert lines[1] == b"2,"
        assert run_out("csv", stored, [None, rc]) == b"1,42\n2,\n"
    else:
        data = binary_stream([[b"\x01", struct.pack("!i", 42)], [b"\x02", None]])
        stored = run_in("binary", data, [None, rc])
        envelope = parse_binary(stored)[0][1]  # type: ignore[assignment]
        assert run_out("binary", stored, [None, rc]) == data
    assert rc.runtime.cipher.decrypt(envelope) == rc.runtime.codec.from_text(b"42")


def test_real_errors_name_no_value() -> None:
    rc = _role("int4")
    with pytest.raises(ValueError_) as exc:
        run_in("text", b"12abc34\n", [rc])
    assert exc.value.sqlstate.startswith("22") and "12abc34" not in exc.value.text
    stored = run_in("text", b"1234567\n", [rc])
    tampered = stored[:-3] + (b"0" if stored[-3:-2] != b"0" else b"1") + stored[-2:]
    with pytest.raises(ValueError_) as exc:
        run_out("text", tampered, [rc])
    assert exc.value.sqlstate == "XX001" and "1234567" not in exc.value.text
    other = _role("int4")  # another key: authentication fails, never garbage
    with pytest.raises(ValueError_) as exc:
        run_out("text", stored, [other])
    assert exc.value.sqlstate == "XX001"


# --------------------------------------------------------------------------- benchmark


def test_benchmark_text_rows_per_second(capsys: pytest.CaptureFixture[str]) -> None:
    """Not an assertion: prints rows/s for 100k text rows with 2 protected columns."""
    n = 100_000
    data = b"".join(b"%d\tname-%d\t4111%012d\tok\n" % (i, i, i) for i in range(n))
    chunks = [data[i : i + 65536] for i in range(0, len(data), 65536)]
    report = []
    class Quick(Fake):
        def encrypt_param(self, value: bytes, fmt: int) -> bytes:
            return b"ENC\x00" + value

        def reveal(self, envelope: bytes, fmt: int) -> bytes | None:
            return envelope[4:]

    for label, crypto in (("fake", Quick()), ("real", _role("text"))):
        cols = [None, crypto, crypto, None]
        t0 = time.perf_counter()
        stored = feed_in(CopyIn("text", {}, cols), chunks)
        t1 = time.perf_counter()
        out = feed_out(CopyOut("text", {}, cols), stored.splitlines(keepends=True))
        t2 = time.perf_counter()
        assert out == data
        report.append(f"{label}: in {n / (t1 - t0):,.0f} rows/s, out {n / (t2 - t1):,.0f} rows/s")
    with capsys.disabled():
        print("\nCOPY text, 2 protected columns, 100k rows: " + "; ".join(report))
