"""Qualified names and PostgreSQL's identifier rules outside SQL statements.

Statement text is always parsed by pglast, which already folds unquoted identifiers,
decodes ``U&"..."`` and truncates to 63 bytes.  Two places still need the same rules
without a statement around them: policy keys (``public."Cards".pan``) and the
search_path *string* (``set_config('search_path', 'a, "B"', false)``, startup
``options``), which PostgreSQL splits with ``SplitIdentifierString``.  Both go
through the one splitter here so they cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

NAMEDATALEN_BYTES = 63
"""PostgreSQL truncates identifiers to NAMEDATALEN - 1 bytes; so must we, or names differ."""

_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


class IdentifierError(ValueError):
    """A qualified name or identifier list that PostgreSQL would reject."""


@dataclass(frozen=True, slots=True, order=True)
class RelationName:
    """A relation as written: schema is None when unqualified; catalog only for db.s.t."""

    schema: str | None
    name: str
    catalog: str | None = None

    def __str__(self) -> str:
        parts = [p for p in (self.catalog, self.schema, self.name) if p is not None]
        return ".".join(quote_ident(p) for p in parts)


@dataclass(frozen=True, slots=True, order=True)
class FunctionName:
    """A called function as written: schema None when unqualified."""

    schema: str | None
    name: str
    catalog: str | None = None

    def __str__(self) -> str:
        parts = [p for p in (self.catalog, self.schema, self.name) if p is not None]
        return ".".join(quote_ident(p) for p in parts)


def fold(ident: str) -> str:
    """Fold an unquoted identifier like the server does for UTF-8 (ASCII only) and truncate."""
    return truncate(ident.translate(_ASCII_LOWER))


def truncate(ident: str) -> str:
    """Cut to 63 bytes on a character boundary, as the scanner does."""
    raw = ident.encode()
    if len(raw) <= NAMEDATALEN_BYTES:
        return ident
    return raw[:NAMEDATALEN_BYTES].decode(errors="ignore")


def quote_ident(ident: str) -> str:
    """Quote when folding would change the name, so messages show the exact object."""
    plain = (
        ident
        and (ident[0].isalpha() or ident[0] == "_")
        and all(c.isalnum() or c in "_$" for c in ident)
    )
    if plain and ident == ident.translate(_ASCII_LOWER) and ident.isascii():
        return ident
    return '"' + ident.replace('"', '""') + '"'


def split_identifiers(text: str, sep: str) -> tuple[str, ...]:
    """Split like PostgreSQL's SplitIdentifierString: quoted parts exact, others folded.

    Raises IdentifierError for an empty element or an unterminated quote, as the server does.
    """
    out: list[str] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i].isspace():
            i += 1
        if i < n and text[i] == '"':
            j, buf = i + 1, []
            while True:
                k = text.find('"', j)
                if k < 0:
                    raise IdentifierError(f"unterminated quoted identifier in {text!r}")
                buf.append(text[j:k])
                if k + 1 < n and text[k + 1] == '"':
                    buf.append('"')
                    j = k + 2
                    continue
                i = k + 1
                break
            ident = "".join(buf)
            if not ident:
                raise IdentifierError(f"zero-length quoted identifier in {text!r}")
            out.append(truncate(ident))
        else:
            j = i
            while i < n and text[i] != sep and not text[i].isspace():
                i += 1
            if i == j:
                raise IdentifierError(f"empty identifier in {text!r}")
            out.append(fold(text[j:i]))
        while i < n and text[i].isspace():
            i += 1
        if i >= n:
            return tuple(out)
        if text[i] != sep:
            raise IdentifierError(f"expected {sep!r} in {text!r}")
        i += 1


def parse_search_path(value: str) -> tuple[str, ...]:
    """A search_path setting string (startup option, set_config value) as schema names.

    ``$user`` (quoted or not) stays ``$user``; the policy expands it.  An empty string
    is an empty path, which PostgreSQL allows.
    """
    if not value.strip():
        return ()
    return split_identifiers(value, ",")


def parse_qualified(text: str) -> tuple[str, ...]:
    """A dotted policy key such as ``public."Cards".pan`` as its folded parts."""
    return split_identifiers(text, ".")
