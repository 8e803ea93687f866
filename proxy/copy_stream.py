"""COPY data streams through the proxy: decrypt on the way out, encrypt on the way in.

Protected columns are `bytea` in PostgreSQL. In `COPY ... TO STDOUT` the server sends
their envelopes (bytea output) and the client must see plaintext of the logical type; in
`COPY ... FROM STDIN` the client sends plaintext and the server must only ever see
envelopes. `CopyOut` and `CopyIn` rewrite the CopyData payloads in text, csv and binary
format. They are pure (bytes in, bytes out); the session does the I/O.

Why the parsing mirrors PostgreSQL byte for byte (copyfromparse.c / copyto.c): if the
proxy drew a row or field boundary where the server does not, the server would read the
proxy's output shifted, and an unprotected plaintext field could land in a protected
column. So rows and fields are split exactly as the server splits them (escaped
newlines in text format, quoted newlines in csv, CR / LF / CRLF line endings, the `\\.`
end-of-data marker), and input the server would reject is rejected here too (22P04)
instead of being "repaired" into something the server accepts.

Speed: a million-row COPY must be feasible, so the fast path never loops over bytes in
Python: rows are found with `bytes.find`, fields with `bytes.split`, and only protected
fields are unescaped. Rare constructs (backslash before a delimiter or line end, quotes
in csv) fall back to possessive regular expressions, still in C. Unprotected fields are
passed through as slices of the input, byte-identical.

Plaintext only exists in local variables on its way into or out of a `ColumnCrypto`;
error messages never include a value.
"""

from __future__ import annotations

import binascii
import json
import re
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from proxy.protocol.messages import message
from proxy.protocol.rows import bytea_from_text
from proxy.sql.encoding import UTF8_NAMES, clean_encoding_name
from proxy.tracking import ColumnCrypto, ValueError_

BAD_COPY_FILE_FORMAT = "22P04"
FEATURE_NOT_SUPPORTED = "0A000"
INVALID_PARAMETER_VALUE = "22023"
DECODE_FAILED = "XX001"  # same class as a failed decryption (see proxy.encryption)

SIGNATURE = b"PGCOPY\n\xff\r\n\x00"
_BINARY_HEADER = len(SIGNATURE) + 8  # signature, flags, header extension length
_H = struct.Struct("!h")
_I = struct.Struct("!i")
_NULL32 = _I.pack(-1)

LF, CR, CRLF = b"\n", b"\r", b"\r\n"
_EOD = b"\\."  # end-of-data marker


# --------------------------------------------------------------------------- options


@dataclass(frozen=True, slots=True)
class CopyFormat:
    """The options of one COPY that matter for reading and writing its data stream."""

    kind: str  # text | csv | binary
    delimiter: bytes = b"\t"
    null: bytes = b"\\N"
    header: bool = False
    header_match: bool = False
    quote: bytes = b'"'
    escape: bytes = b'"'
    default: bytes | None = None
    force_null: frozenset[str] = frozenset()
    force_null_all: bool = False
    force_not_null: frozenset[str] = frozenset()
    force_not_null_all: bool = False


_TRUE = ("true", "on", "yes", "1")
_FALSE = ("false", "off", "no", "0")


def _bool_option(name: str, value: Any) -> bool | str:
    """PostgreSQL's defGetBoolean (plus 'match' for HEADER), over whatever shape the
    rewriter produced: a string, a bool, or the JSON of a pglast `Boolean` node."""
    if value is None or isinstance(value, bool):
        return True if value is None else value
    if isinstance(value, int):
        return value != 0
    text = str(value).strip().lower()
    if text.startswith("{"):
        try:
            return bool(json.loads(text).get("boolval", False))
        except (ValueError, AttributeError):
            pass
    if text == "match" and name == "header":
        return "match"
    # parse_bool accepts unique prefixes ("t", "of" ...), hence the prefix test
    if text and any(w.startswith(text) for w in _TRUE) and text not in ("o",):
        return True
    if text and any(w.startswith(text) for w in _FALSE) and text not in ("o",):
        return False
    raise ValueError_(INVALID_PARAMETER_VALUE, f"{name} requires a Boolean value")


def _one_byte(name: str, value: Any) -> bytes:
    raw = str(value).encode()
    if len(raw) != 1:
        raise ValueError_(
            INVALID_PARAMETER_VALUE, f"COPY {name} must be a single one-byte character"
        )
    return raw


def _column_list(value: Any) -> tuple[frozenset[str], bool]:
    if value is None:
        return frozenset(), False
    if isinstance(value, str):
        if value.strip() == "*":
            return frozenset(), True
        return frozenset(v for v in value.split(",") if v), False
    names = [str(v) for v in value]
    return frozenset(n for n in names if n != "*"), "*" in names


def _check_encoding(value: Any) -> None:
    """COPY's ENCODING option makes the server decode (or encode) that COPY's data in
    another encoding than the session's. The data stream is split into fields byte by
    byte as UTF-8, which is the server's reading only when the data is UTF-8: in GBK,
    BIG5 or SJIS the byte 0x5C can end a character, so the two would disagree on which
    tab is a delimiter and a protected value could reach the server unsealed. Anything
    but UTF8 is refused, before the statement is sent (observe or force, never guess)."""
    if value is None or clean_encoding_name(str(value)) in UTF8_NAMES:
        return
    raise ValueError_(
        "0A000", "COPY with ENCODING other than UTF8 over encrypted columns is not "
        "supported: the proxy reads the data as UTF-8; convert the data to UTF-8 and "
        "leave ENCODING out")


def copy_format(fmt: str | None, options: Mapping[str, Any]) -> CopyFormat:
    """Normalize a CopyPlan's format and options (PostgreSQL's defaults applied)."""
    opts = {str(k).lower(): v for k, v in options.items()}
    _check_encoding(opts.get("encoding"))
    kind = str(fmt or opts.get("format") or "text").lower()
    if kind not in ("text", "csv", "binary"):
        raise ValueError_(INVALID_PARAMETER_VALUE, f"COPY format {kind!r} not recognized")
    if kind == "binary":
        return CopyFormat("binary")
    csv = kind == "csv"
    delimiter = _one_byte("delimiter", opts.get("delimiter", "," if csv else "\t"))
    null = str(opts.get("null", "" if csv else "\\N")).encode()
    header = _bool_option("header", opts["header"]) if "header" in opts else False
    quote = _one_byte("quote", opts.get("quote", '"')) if csv else b'"'
    escape = _one_byte("escape", opts["escape"]) if csv and "escape" in opts else quote
    default = str(opts["default"]).encode() if opts.get("default") is not None else None
    fn, fn_all = _column_list(opts.get("force_null"))
    fnn, fnn_all = _column_list(opts.get("force_not_null"))
    return CopyFormat(
        kind,
        delimiter=delimiter,
        null=null,
        header=bool(header),
        header_match=header == "match",
        quote=quote,
        escape=escape,
        default=default,
        force_null=fn,
        force_null_all=fn_all,
        force_not_null=fnn,
        force_not_null_all=fnn_all,
    )


# --------------------------------------------------------------------------- text codec

_TEXT_ESCAPE = re.compile(rb"\\(?:([0-7]{1,3})|x([0-9A-Fa-f]{1,2})|(.)|\Z)", re.S)
_TEXT_SIMPLE = {b"b": b"\b", b"f": b"\f", b"n": b"\n", b"r": b"\r", b"t": b"\t", b"v": b"\v"}
_UNESCAPED_EOD = re.compile(rb"(?<!\\)(?:\\\\)*+\\\.")
_UNESCAPED = {
    CR: re.compile(rb"(?<!\\)(?:\\\\)*+\r"),
    LF: re.compile(rb"(?<!\\)(?:\\\\)*+\n"),
}


def _unescape_repl(m: re.Match[bytes]) -> bytes:
    octal, hexa, other = m.group(1, 2, 3)
    if octal:
        return bytes((int(octal, 8) & 0xFF,))
    if hexa:
        return bytes((int(hexa, 16),))
    if other is not None:
        return _TEXT_SIMPLE.get(other, other)
    return b""  # a backslash at the very end of the field is dropped, as PostgreSQL does


def unescape_text(field: bytes) -> bytes:
    """De-escape one COPY text-format field (CopyReadAttributesText)."""
    if b"\\" not in field:
        return field
    return _TEXT_ESCAPE.sub(_unescape_repl, field)


def text_escaper(delimiter: bytes) -> Callable[[bytes], bytes]:
    """Escape a value for COPY text format (CopyAttributeOutText)."""
    table = {b"\\": b"\\\\", b"\b": b"\\b", b"\f": b"\\f", b"\n": b"\\n", b"\r": b"\\r",
             b"\t": b"\\t", b"\v": b"\\v"}
    table.setdefault(delimiter, b"\\" + delimiter)
    pattern = re.compile(b"[" + b"".join(re.escape(k) for k in table) + b"]")
    sub = pattern.sub

    def repl(m: re.Match[bytes]) -> bytes:
        return table[m.group()]

    def escape(value: bytes) -> bytes:
        return sub(repl, value)

    return escape


# --------------------------------------------------------------------------- csv codec


class _Csv:
    """Regexes for one (delimiter, quote, escape) triple, compiled once per COPY."""

    def __init__(self, f: CopyFormat) -> None:
        d, q, e = (re.escape(x) for x in (f.delimiter, f.quote, f.escape))
        self.quote = f.quote
        self.escape = f.escape
        if f.quote == f.escape:
            inner = b"(?:[^" + q + b"]++|" + q + q + b")*+"
        else:
            inner = b"(?:[^" + q + e + b"]++|" + e + b"[" + q + e + b"]|" + e + b")*+"
        quoted = q + inner + q
        # One record: unquoted bytes other than CR/LF, or whole quoted sections (which may
        # hold CR/LF). Possessive, so a match never backtracks into a different parse.
        self.record = re.compile(b"(?:[^" + q + b"\r\n]++|" + quoted + b")*+")
        self.field = re.compile(b"(?:[^" + q + d + b"]++|" + quoted + b")*+")
        self.section = re.compile(q + b"(" + inner + b")" + q)
        self.pair = re.compile(e + b"([" + q + e + b"])")
        self.needs_quote = re.compile(b"[" + d + q + b"\r\n]")
        self.escapable = re.compile(b"[" + q + e + b"]")

    def split(self, rec: bytes, delimiter: bytes) -> list[bytes]:
        if self.quote not in rec:
            return rec.split(delimiter)
        fields = []
        pos, n, match = 0, len(rec), self.field.match
        while True:
            m = match(rec, pos)
            assert m is not None  # the pattern matches the empty string
            end = m.end()
            fields.append(rec[pos:end])
            if end >= n:
                return fields
            if rec[end : end + 1] != delimiter:  # an opening quote that never closes
                raise ValueError_(BAD_COPY_FILE_FORMAT, "unterminated CSV quoted field")
            pos = end + 1

    def dequote(self, field: bytes) -> bytes:
        """The value of a field with quotes (CopyReadAttributesCSV)."""
        if self.quote == self.escape:
            q, qq = self.quote, self.quote * 2
            return self.section.sub(lambda m: m.group(1).replace(qq, q), field)
        pair = self.pair
        return self.section.sub(lambda m: pair.sub(rb"\1", m.group(1)), field)

    def quote_value(self, value: bytes, null: bytes, force: bool, single: bool) -> bytes:
        """CopyAttributeOutCSV: quote when needed (or forced), escaping quote/escape."""
        if not (force or value == null or (single and value == _EOD)
                or self.needs_quote.search(value)):
            return value
        e = self.escape
        return self.quote + self.escapable.sub(lambda m: e + m.group(), value) + self.quote


# --------------------------------------------------------------------------- line streams


def _bad(text: str) -> ValueError_:
    return ValueError_(BAD_COPY_FILE_FORMAT, text)


class _Lines:
    """Splits a text or csv COPY stream into records exactly as CopyReadLine does and
    hands each data record to `row`; the end-of-data line passes through, and so does
    the header line unless `header_row` rewrites it (HEADER MATCH with added columns)."""

    def __init__(self, f: CopyFormat, row: Callable[[bytes], bytes], csv: _Csv | None,
                 header_row: Callable[[bytes], bytes] | None = None) -> None:
        self.row = row
        self.csv = csv
        self.header = f.header
        self.header_row = header_row
        self.eol: bytes | None = None
        self.stray: tuple[bytes, ...] = ()
        self.buf = b""
        self.ended = False  # saw \. : the server ignores the rest, so do we (no forwarding)
        self._first = csv.record if csv is not None else re.compile(
            rb"(?:[^\\\r\n]++|\\.)*+", re.S
        )

    # -- line terminators

    def _detect(self, buf: bytes, final: bool) -> bytes | None:
        """The first unescaped / unquoted CR or LF fixes the newline style (as in PG)."""
        m = self._first.match(buf)
        assert m is not None
        e = m.end()
        if e >= len(buf):
            return None
        c = buf[e : e + 1]
        if c == LF:
            return LF
        if c == CR:
            if e + 1 < len(buf):
                return CRLF if buf[e + 1 : e + 2] == LF else CR
            return CR if final else None
        return None  # trailing backslash, or a quote still open: need more data

    def _set_eol(self, eol: bytes) -> None:
        self.eol = eol
        self.stray = {LF: (CR,), CR: (LF,), CRLF: (CR, LF)}[eol]

    def _stray_error(self, ch: bytes) -> ValueError_:
        csv = self.csv is not None
        what = "carriage return" if ch == CR else "newline"
        return _bad(f"{'unquoted' if csv else 'literal'} {what} found in data")

    def _text_end(self, buf: bytes, pos: int) -> int:
        eol = self.eol
        assert eol is not None
        find = buf.find
        nl = find(eol, pos)
        while nl > pos and buf[nl - 1] == 0x5C:
            j = nl - 1
            while j > pos and buf[j - 1] == 0x5C:
                j -= 1
            if (nl - j) % 2 == 0:
                break
            # An odd run of backslashes escapes the terminator: the record goes on.
            if eol == CRLF:
                raise self._stray_error(LF)
            nl = find(eol, nl + 1)
        if nl >= 0:
            for ch in self.stray:
                if find(ch, pos, nl) >= 0 and _UNESCAPED[ch].search(buf[pos:nl]):
                    raise self._stray_error(ch)
        return nl

    def _csv_end(self, buf: bytes, pos: int) -> int:
        eol, csv = self.eol, self.csv
        assert eol is not None and csv is not None
        nl = buf.find(eol, pos)
        if nl < 0:
            return -1
        if buf.find(csv.quote, pos, nl) < 0:  # fast path: no quote, the line is the record
            for ch in self.stray:
                if buf.find(ch, pos, nl) >= 0:
                    raise self._stray_error(ch)
            return nl
        m = csv.record.match(buf, pos)
        assert m is not None
        e = m.end()
        if e >= len(buf) or buf[e : e + 1] == csv.quote:
            return -1  # a quoted field goes on past the data we have
        if buf.startswith(eol, e):
            return e
        if eol == CRLF and e + 1 == len(buf) and buf[e : e + 1] == CR:
            return -1
        raise self._stray_error(buf[e : e + 1])

    def _check_last(self, rec: bytes) -> None:
        """A final record without terminator: same checks the terminator search makes."""
        if self.csv is not None:
            m = self.csv.record.match(rec)
            assert m is not None
            if m.end() < len(rec):
                if rec[m.end() : m.end() + 1] == self.csv.quote:
                    raise _bad("unterminated CSV quoted field")
                raise self._stray_error(rec[m.end() : m.end() + 1])
            return
        for ch in self.stray:
            if ch in rec and _UNESCAPED[ch].search(rec):
                raise self._stray_error(ch)

    # -- records

    def _emit(self, rec: bytes, term: bytes, out: list[bytes]) -> None:
        if self.csv is None:
            if b"\\." in rec:
                m = _UNESCAPED_EOD.search(rec)
                if m is not None:
                    if m.end() != len(rec):
                        raise _bad("end-of-copy marker corrupt")
                    data = rec[: m.end() - 2]
                    if data:
                        self._emit(data, term or self.eol or LF, out)
                    out += (_EOD, term or self.eol or LF)
                    self.ended = True
                    return
        elif rec == _EOD and term:
            out += (rec, term)
            self.ended = True
            return
        if self.header:
            self.header = False
            out += (self.header_row(rec) if self.header_row is not None else rec, term)
            return
        out += (self.row(rec), term)

    def feed(self, data: bytes, final: bool = False) -> bytes:
        if self.ended:
            return b""
        buf = self.buf + data if self.buf else bytes(data)
        out: list[bytes] = []
        if self.eol is None:
            eol = self._detect(buf, final)
            if eol is None:
                if final and buf:
                    self.stray = (CR, LF)
                    self._check_last(buf)
                    self._emit(buf, b"", out)
                self.buf = b"" if final else buf
                return b"".join(out)
            self._set_eol(eol)
        eol = self.eol
        assert eol is not None
        k = len(eol)
        find, row, emit = buf.find, self.row, self._emit
        # What could need the careful path, decided once per chunk so that the common
        # row costs one find, one slice and the row transform.
        stray = False
        for ch in self.stray:
            stray = stray or ch in buf
        text = self.csv is None
        if text:
            end_of = self._text_end
            quote = None
            marker = b"\\." in buf
        else:
            end_of = self._csv_end
            quote = self.csv.quote if self.csv.quote in buf else None
            marker = _EOD in buf
        pos = 0
        while not self.ended:
            end = find(eol, pos)
            if end < 0:
                break
            if (
                stray
                or (text and end > pos and buf[end - 1] == 0x5C)
                or (quote is not None and find(quote, pos, end) >= 0)
            ):
                end = end_of(buf, pos)
                if end < 0:
                    break
            if marker or self.header:
                emit(buf[pos:end], eol, out)
            else:
                out += (row(buf[pos:end]), eol)
            pos = end + k
        if self.ended:
            self.buf = b""
        elif final:
            rest = buf[pos:]
            if rest:
                self._check_last(rest)
                emit(rest, b"", out)
            self.buf = b""
        else:
            self.buf = buf[pos:]
        return b"".join(out)


# --------------------------------------------------------------------------- binary stream


class _Binary:
    """Splits a binary COPY stream into header, tuples and trailer (CopyReadBinary*)."""

    def __init__(
        self, ncols: int, protected: Sequence[tuple[int, Callable[[bytes], bytes | None]]],
        index: Sequence[tuple[int, Callable[[bytes], bytes]]] = (),
    ) -> None:
        self.ncols = ncols
        self.protected = sorted(protected)
        self.index = list(index)
        self.count = _H.pack(ncols + len(self.index))
        self.header_done = False
        self.ended = False
        self.buf = b""

    def _header(self, buf: bytes, final: bool) -> int:
        """Length of the complete header at the start of buf, or -1 if incomplete."""
        if not SIGNATURE.startswith(buf[: len(SIGNATURE)]):
            raise _bad("COPY file signature not recognized")
        if len(buf) >= _BINARY_HEADER:
            (ext,) = _I.unpack_from(buf, len(SIGNATURE) + 4)
            if ext < 0:
                raise _bad("invalid COPY file header (wrong length)")
            if len(buf) >= _BINARY_HEADER + ext:
                return _BINARY_HEADER + ext
        if final:
            raise _bad("invalid COPY file header (missing data)")
        return -1

    def _tuple(self, buf: bytes, pos: int, out: list[bytes]) -> int:
        """Transform the tuple at pos into out; return its end, or -1 if incomplete."""
        n = len(buf)
        p = pos + 2
        offsets: list[tuple[int, int]] = []
        unpack = _I.unpack_from
        for _ in range(self.ncols):
            if p + 4 > n:
                return -1
            (size,) = unpack(buf, p)
            p += 4
            if size < 0:
                if size != -1:
                    raise _bad("invalid field size")
                offsets.append((p, -1))
                continue
            if p + size > n:
                return -1
            offsets.append((p, size))
            p += size
        index_parts: list[bytes] = []
        for src, fn in self.index:  # from the original plaintext, before encryption
            start, size = offsets[src]
            if size < 0:
                index_parts.append(_NULL32)
            else:
                value = fn(buf[start : start + size])
                index_parts += (_I.pack(len(value)), value)
        out.append(self.count if self.index else buf[pos : pos + 2])
        run = pos + 2
        for i, fn in self.protected:
            start, size = offsets[i]
            if size < 0:
                continue
            new = fn(buf[start : start + size])
            out.append(buf[run : start - 4])
            if new is None:
                out.append(_NULL32)
            else:
                out += (_I.pack(len(new)), new)
            run = start + size
        out.append(buf[run:p])
        out += index_parts
        return p

    def feed(self, data: bytes, final: bool = False) -> bytes:
        buf = self.buf + data if self.buf else bytes(data)
        out: list[bytes] = []
        pos, n = 0, len(buf)
        if not self.header_done:
            size = self._header(buf, final)
            if size < 0:
                self.buf = buf
                return b""
            out.append(buf[:size])
            pos = size
            self.header_done = True
        while pos < n:
            if self.ended:
                raise _bad("received copy data after EOF marker")
            if pos + 2 > n:
                break
            (count,) = _H.unpack_from(buf, pos)
            if count == -1:
                out.append(buf[pos : pos + 2])
                self.ended = True
                pos += 2
                continue
            if count != self.ncols:
                raise _bad(f"row field count is {count}, expected {self.ncols}")
            end = self._tuple(buf, pos, out)
            if end < 0:
                break
            pos = end
        self.buf = buf[pos:]
        if final and self.buf:
            raise _bad("unexpected EOF in COPY data")
        return b"".join(out)


# --------------------------------------------------------------------------- public API


def _decode_failed() -> ValueError_:
    return ValueError_(DECODE_FAILED, "a protected value in the COPY data could not be decoded")


def _envelope_from_text(text: bytes) -> bytes:
    """bytea text output (hex, or escape format if bytea_output says so) -> envelope."""
    try:
        if text[:2] == b"\\x":
            return binascii.unhexlify(text[2:])
        return bytea_from_text(text)
    except (ValueError, IndexError):
        raise _decode_failed() from None


def _reveal(crypto: ColumnCrypto, envelope: bytes, fmt: int) -> bytes | None:
    try:
        return crypto.reveal(envelope, fmt)
    except (ValueError, UnicodeDecodeError):  # ValueError_ (decryption failed) passes on
        raise _decode_failed() from None


def _guard(fn: Callable[[bytes, int], bytes], value: bytes, fmt: int) -> bytes:
    try:
        return fn(value, fmt)
    except (ValueError, UnicodeDecodeError):  # a codec that did not say ValueError_
        raise ValueError_(
            "22P02", "invalid input syntax for the logical type of a protected column"
        ) from None


class _Stream:
    """Error latch shared by both directions: after a failure every call fails the same
    way, so a session that keeps feeding cannot forward half-transformed data."""

    _failed: ValueError_ | None = None
    _engine: _Lines | _Binary | None = None

    def _run(self, data: bytes, final: bool) -> bytes:
        if self._failed is not None:
            raise self._failed
        try:
            assert self._engine is not None
            return self._engine.feed(data, final)
        except ValueError_ as exc:
            self._failed = exc
            raise
        except struct.error:
            self._failed = _bad("malformed binary COPY data")
            raise self._failed from None


class CopyOut(_Stream):
    """Decrypts protected fields of COPY TO STDOUT rows (server -> client).

    ``columns`` has one entry per field of the COPY output; None (or a column this role
    sees as ciphertext, like the tracker does for result sets) is passed through.
    """

    def __init__(
        self, fmt: str, options: Mapping[str, Any], columns: Sequence[ColumnCrypto | None]
    ) -> None:
        f = copy_format(fmt, options)
        self.format = f
        self.ncols = len(columns)
        self.protected = [
            (i, c) for i, c in enumerate(columns)
            if c is not None and getattr(c, "view", "plaintext") != "ciphertext"
        ]
        if not self.protected:
            self._engine = None
        elif f.kind == "binary":
            self._engine = _Binary(
                self.ncols, [(i, self._binary_reveal(c)) for i, c in self.protected]
            )
        elif f.kind == "csv":
            self._csv = _Csv(f)
            self._engine = _Lines(f, self._csv_row, self._csv)
        else:
            self._escape = text_escaper(f.delimiter)
            self._engine = _Lines(f, self._text_row, None)

    @staticmethod
    def _binary_reveal(crypto: ColumnCrypto) -> Callable[[bytes], bytes | None]:
        return lambda envelope: _reveal(crypto, envelope, 1)

    def _text_row(self, rec: bytes) -> bytes:
        f = self.format
        fields = _split_text(rec, f.delimiter)
        if len(fields) != self.ncols:
            raise _bad(f"COPY row has {len(fields)} fields, expected {self.ncols}")
        null, escape = f.null, self._escape
        for i, crypto in self.protected:
            raw = fields[i]
            if raw == null:
                continue
            if raw[:3] == b"\\\\x":  # bytea hex output, backslash doubled by COPY
                try:
                    envelope = binascii.unhexlify(raw[3:])
                except ValueError:
                    envelope = _envelope_from_text(unescape_text(raw))
            else:
                envelope = _envelope_from_text(unescape_text(raw))
            value = _reveal(crypto, envelope, 0)
            fields[i] = null if value is None else escape(value)
        return f.delimiter.join(fields)

    def _csv_row(self, rec: bytes) -> bytes:
        f, csv = self.format, self._csv
        fields = csv.split(rec, f.delimiter)
        if len(fields) != self.ncols:
            raise _bad(f"COPY row has {len(fields)} fields, expected {self.ncols}")
        null, single = f.null, self.ncols == 1
        for i, crypto in self.protected:
            raw = fields[i]
            quoted = f.quote in raw
            if not quoted and raw == null:
                continue
            value = _reveal(crypto, _envelope_from_text(csv.dequote(raw) if quoted else raw), 0)
            # The server quoted a bytea hex value only because of FORCE_QUOTE (or an
            # exotic delimiter): keep the value quoted then.
            fields[i] = null if value is None else csv.quote_value(value, null, quoted, single)
        return f.delimiter.join(fields)

    def server_data(self, payload: bytes) -> bytes:
        """One server CopyData body in; the CopyData message for the client out (b"" while
        a partial row is buffered)."""
        if self._engine is None:
            return message(b"d", bytes(payload))
        out = self._run(payload, False)
        return message(b"d", out) if out else b""

    def server_done(self) -> bytes:
        """At the server's CopyDone: a buffered partial row is flushed (text/csv) or is an
        error (binary). PostgreSQL never sends one; this keeps the proxy from silently
        dropping data if it ever does."""
        if self._engine is None:
            return b""
        out = self._run(b"", True)
        return message(b"d", out) if out else b""


class CopyIn(_Stream):
    """Encrypts protected fields of COPY FROM STDIN data (client -> server).

    ``columns``: one entry per column listed in the COPY (None = unprotected, as is).
    ``index_columns``: blind-index siblings the rewriter appended to the column list; for
    each, (index into ``columns`` of the source, its crypto). Their values are computed
    from the source plaintext and appended to every row (NULL when the source is NULL).
    ``names``: the COPY column names, needed only to apply FORCE_NULL / FORCE_NOT_NULL.
    ``index_names``: the names of the appended blind-index columns, in that order: with
    HEADER MATCH the server checks the header line against the whole column list, so the
    proxy appends them to the header as it appends their values to every row.
    """

    def __init__(
        self,
        fmt: str,
        options: Mapping[str, Any],
        columns: Sequence[ColumnCrypto | None],
        index_columns: Sequence[tuple[int, ColumnCrypto]] = (),
        *,
        names: Sequence[str] | None = None,
        index_names: Sequence[str] = (),
    ) -> None:
        f = copy_format(fmt, options)
        self.format = f
        self.ncols = len(columns)
        self.protected = [(i, c) for i, c in enumerate(columns) if c is not None]
        self.index = list(index_columns)
        self.index_names = [n.encode() for n in index_names]
        self.names = list(names) if names is not None and len(names) == self.ncols else None
        for src, _ in self.index:
            if not 0 <= src < self.ncols:
                raise ValueError_("XX000", "blind-index source column out of range")
        header_row = None
        if f.header_match and self.index:
            if len(self.index_names) != len(self.index):
                raise ValueError_(
                    FEATURE_NOT_SUPPORTED,
                    "COPY FROM ... HEADER MATCH cannot be used with blind-indexed columns "
                    "whose index column names are not known; use HEADER true",
                )
            header_row = self._csv_header if f.kind == "csv" else self._text_header
        self._force_null = self._positions(f.force_null, f.force_null_all, names, "FORCE_NULL")
        self._force_not_null = self._positions(
            f.force_not_null, f.force_not_null_all, names, "FORCE_NOT_NULL"
        )
        self._sources = frozenset(src for src, _ in self.index)
        if not self.protected and not self.index:
            self._engine = None
        elif f.kind == "binary":
            self._engine = _Binary(
                self.ncols,
                [(i, self._binary_encrypt(c)) for i, c in self.protected],
                [(src, self._binary_index(c)) for src, c in self.index],
            )
        elif f.kind == "csv":
            self._csv = _Csv(f)
            hex_alphabet = b"\\x0123456789abcdef"
            self._hex_may_need_quotes = bool(
                set(f.delimiter + f.quote) & set(hex_alphabet)
            ) or f.null.startswith(b"\\x")
            self._engine = _Lines(f, self._csv_row, self._csv, header_row)
        else:
            self._engine = _Lines(f, self._text_row, None, header_row)

    def _positions(
        self, listed: frozenset[str], every: bool, names: Sequence[str] | None, what: str
    ) -> frozenset[int]:
        if every:
            return frozenset(range(self.ncols + len(self.index)))
        if not listed or (not self.protected and not self.index):
            return frozenset()
        if names is None:
            raise ValueError_(
                FEATURE_NOT_SUPPORTED,
                f"COPY FROM with {what} on a table with protected columns needs the column "
                "list to be known to the proxy; name the columns in the COPY",
            )
        return frozenset(i for i, n in enumerate(names) if n in listed)

    @staticmethod
    def _binary_encrypt(crypto: ColumnCrypto) -> Callable[[bytes], bytes]:
        return lambda value: _guard(crypto.encrypt_param, value, 1)

    @staticmethod
    def _binary_index(crypto: ColumnCrypto) -> Callable[[bytes], bytes]:
        return lambda value: _guard(crypto.blind_index_param, value, 1)

    def _default_index_source(self, i: int) -> None:
        if i in self._sources:
            raise ValueError_(
                FEATURE_NOT_SUPPORTED,
                "the COPY DEFAULT marker cannot be used for a blind-indexed column: the "
                "proxy cannot compute the index of a default it does not see",
            )

    # -- header (HEADER MATCH)

    def _header_match(self, values: list[bytes | None]) -> None:
        """PostgreSQL's own checks (CopyReadHeader: count, then each name exactly), made
        for the columns the client listed: the server's would count the blind-index
        columns the client never named, and quote the widened line in its context. The
        server still checks the header the proxy sends on."""
        if len(values) != self.ncols:
            raise _bad(f"wrong number of fields in header line: got {len(values)}, "
                       f"expected {self.ncols}")
        if self.names is None:
            return
        for n, (got, want) in enumerate(zip(values, self.names, strict=True), 1):
            wanted = want.encode()
            if got is None:
                raise _bad(f"column name mismatch in header line field {n}: got null value "
                           f'("{self.format.null.decode(errors="replace")}"), '
                           f'expected "{want}"')
            if got[:63] != wanted[:63]:  # namestrcmp: NAMEDATALEN - 1
                raise _bad(f"column name mismatch in header line field {n}: got "
                           f'"{got.decode(errors="replace")}", expected "{want}"')

    def _text_header(self, rec: bytes) -> bytes:
        f = self.format
        self._header_match([None if v == f.null else unescape_text(v)
                            for v in _split_text(rec, f.delimiter)])
        escape = text_escaper(f.delimiter)
        return rec + b"".join(f.delimiter + escape(n) for n in self.index_names)

    def _csv_header(self, rec: bytes) -> bytes:
        f, csv = self.format, self._csv
        self._header_match([
            None if f.quote not in v and v == f.null
            else csv.dequote(v) if f.quote in v else v
            for v in csv.split(rec, f.delimiter)])
        return rec + b"".join(f.delimiter + csv.quote_value(n, f.null, True, False)
                              for n in self.index_names)

    # -- text

    def _text_plain(self, i: int, raw: bytes) -> bytes | None:
        f = self.format
        if raw == f.null:
            return None
        if f.default is not None and raw == f.default:
            self._default_index_source(i)
            return None
        return unescape_text(raw)

    def _text_row(self, rec: bytes) -> bytes:
        f = self.format
        fields = _split_text(rec, f.delimiter)
        if len(fields) != self.ncols:
            raise _bad(f"COPY row has {len(fields)} fields, expected {self.ncols}")
        extra: list[bytes] = []
        for src, crypto in self.index:
            plain = self._text_plain(src, fields[src])
            extra.append(
                f.null if plain is None
                else b"\\\\x" + binascii.hexlify(_guard(crypto.blind_index_param, plain, 0))
            )
        null, default = f.null, f.default
        for i, crypto in self.protected:
            raw = fields[i]
            if raw == null or (default is not None and raw == default):
                continue  # the server reads the marker itself
            envelope = _guard(crypto.encrypt_param, unescape_text(raw), 0)
            fields[i] = b"\\\\x" + binascii.hexlify(envelope)
        if extra:
            fields += extra
        return f.delimiter.join(fields)

    # -- csv

    def _csv_plain(self, i: int, raw: bytes) -> bytes | None:
        """The value of a field, or None where the server will store NULL or a default
        (then the raw field is forwarded and the server decides, with the same options)."""
        f = self.format
        quoted = f.quote in raw
        if not quoted and raw == f.null:
            return f.null if i in self._force_not_null else None
        if f.default is not None and raw == f.default:
            self._default_index_source(i)
            return None
        value = self._csv.dequote(raw) if quoted else raw
        if i in self._force_null and value == f.null:
            return None
        return value

    def _csv_bytea(self, envelope: bytes) -> bytes:
        text = b"\\x" + binascii.hexlify(envelope)
        if self._hex_may_need_quotes:
            f = self.format
            return self._csv.quote_value(text, f.null, False, self.ncols + len(self.index) == 1)
        return text

    def _csv_null(self, position: int) -> bytes:
        f = self.format
        if position not in self._force_not_null:
            return f.null
        if position in self._force_null:
            return self._csv.quote_value(f.null, f.null, True, False)
        raise ValueError_(
            FEATURE_NOT_SUPPORTED,
            "COPY FROM with FORCE_NOT_NULL on a blind-index column cannot store the NULL "
            "index of a NULL value",
        )

    def _csv_row(self, rec: bytes) -> bytes:
        f = self.format
        fields = self._csv.split(rec, f.delimiter)
        if len(fields) != self.ncols:
            raise _bad(f"COPY row has {len(fields)} fields, expected {self.ncols}")
        extra: list[bytes] = []
        for k, (src, crypto) in enumerate(self.index):
            plain = self._csv_plain(src, fields[src])
            extra.append(
                self._csv_null(self.ncols + k) if plain is None
                else self._csv_bytea(_guard(crypto.blind_index_param, plain, 0))
            )
        for i, crypto in self.protected:
            plain = self._csv_plain(i, fields[i])
            if plain is None:
                continue  # NULL or DEFAULT: forward the marker as the client wrote it
            fields[i] = self._csv_bytea(_guard(crypto.encrypt_param, plain, 0))
        if extra:
            fields += extra
        return f.delimiter.join(fields)

    # -- protocol

    def client_data(self, payload: bytes) -> bytes:
        """One client CopyData body in (any chunking); CopyData with the complete rows it
        finished, transformed, out (b"" while buffering)."""
        if self._engine is None:
            return message(b"d", bytes(payload))
        out = self._run(payload, False)
        return message(b"d", out) if out else b""

    def client_done(self) -> bytes:
        """At the client's CopyDone: flush a last row without newline (legal in text/csv);
        an incomplete binary tuple raises 22P04. Send the result before the CopyDone."""
        if self._engine is None:
            return b""
        out = self._run(b"", True)
        return message(b"d", out) if out else b""


_FIELD_RE: dict[bytes, re.Pattern[bytes]] = {}


def _split_text(rec: bytes, delimiter: bytes) -> list[bytes]:
    """Fields of a text-format record. A raw delimiter separates fields unless a
    backslash escapes it (PostgreSQL writes `\\,` for a comma in data when the delimiter
    is a comma), so the slow path only runs when a backslash precedes a delimiter."""
    if b"\\" + delimiter not in rec:
        return rec.split(delimiter)
    pattern = _FIELD_RE.get(delimiter)
    if pattern is None:
        d = re.escape(delimiter)
        pattern = re.compile(rb"(?:[^\\" + d + rb"]++|\\.)*+\\?", re.S)
        _FIELD_RE[delimiter] = pattern
    fields = []
    pos, n, match = 0, len(rec), pattern.match
    while True:
        m = match(rec, pos)
        assert m is not None
        end = m.end()
        fields.append(rec[pos:end])
        if end >= n:
            return fields
        pos = end + 1


__all__ = [
    "SIGNATURE",
    "CopyFormat",
    "CopyIn",
    "CopyOut",
    "copy_format",
    "text_escaper",
    "unescape_text",
]
