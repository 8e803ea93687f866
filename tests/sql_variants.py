"""Spelling variations of a SQL template, shared by the unit and the live policy tests.

Templates mark ``«expr»`` (may gain redundant parentheses) and ``@`` before a relation
(may become ``public.``/``PUBLIC.`` or stay unqualified); everything else varies per token
through pglast's scanner: quoting of lower-case identifiers, keyword case, whitespace and
comments between tokens. Every variant must be decided like ``canonical(template)``.
"""

from __future__ import annotations

from hypothesis import strategies as st
from pglast.parser import scan

SEPARATORS = [" ", "  ", "\n", "\t", " /* c */ ", " /* x /* nested */ y */ ", " -- c\n"]
QUALIFIERS = ["", "public.", "PUBLIC."]


def canonical(template: str) -> str:
    return template.replace("«", "").replace("»", "").replace("@", "")


def _expand(template: str, draw: st.DrawFn) -> str:
    out: list[str] = []
    i = 0
    while i < len(template):
        ch = template[i]
        if ch == "«":
            end = template.index("»", i)
            depth = draw(st.integers(0, 2))
            out.append("(" * depth + template[i + 1 : end] + ")" * depth)
            i = end + 1
        elif ch == "@":
            out.append(draw(st.sampled_from(QUALIFIERS)))
            i += 1
        else:
            out.append(ch)
            i += 1
    return "".join(out)


@st.composite
def variant(draw: st.DrawFn, template: str) -> str:
    sql = _expand(template, draw)
    pieces: list[str] = []
    for n, tok in enumerate(scan(sql)):
        text = sql[tok.start : tok.end + 1]
        if n:
            pieces.append(draw(st.sampled_from(SEPARATORS)))
        if tok.name == "IDENT" and text.isascii() and text == text.lower() and draw(st.booleans()):
            text = f'"{text}"'
        elif tok.kind != "NO_KEYWORD":
            text = "".join(c.upper() if draw(st.booleans()) else c for c in text)
        pieces.append(text)
    return "".join(pieces)
