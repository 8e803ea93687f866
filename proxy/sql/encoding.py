"""Which session text rules the proxy parses exactly as the server does, and what changes them.

The proxy hands statement text to pglast as UTF-8, with backslashes in ``'...'`` literal
(``standard_conforming_strings = on``). The server decodes the same bytes in the session's
``client_encoding`` and reads backslashes as that setting says. Where the two differ, they
disagree on where a string literal ends: in GBK (also BIG5, SJIS, UHC, GB18030, JOHAB) the
byte 0x5C can be the second byte of a character, so ``E4 B8 AD 5C`` is one UTF-8 character
and a backslash to the proxy, but two characters and no backslash to the server. The
statement the server runs is then not the one the policy checked.

So the proxy never simulates a decoding: it learns the three settings from the server's own
ParameterStatus messages and accepts only sessions where its parse is the server's:

- ``client_encoding`` UTF8 (any server encoding: PostgreSQL converts valid UTF-8 character
  for character, and every server encoding is ASCII-safe), or SQL_ASCII on a UTF8 database
  (``pg_any_to_server`` then validates the input as UTF-8 and converts nothing);
- ``standard_conforming_strings`` on.

Everything else is refused, at startup and at every statement that would change it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from proxy.sql.info import Analysis, StatementInfo

#: The settings the proxy's parse depends on (reported by the server: GUC_REPORT).
WATCHED = frozenset({"client_encoding", "server_encoding", "standard_conforming_strings"})

SQLSTATE = "0A000"  # feature_not_supported: the session asks for what the proxy cannot parse

UTF8_NAMES = frozenset({"utf8", "unicode"})  # pg_encname_tbl's names of PG_UTF8, cleaned
_SQL_ASCII = "sqlascii"
_PRINTABLE = re.compile(r"[A-Za-z0-9_.-]{1,40}")
_RULE = "the proxy parses statements as UTF-8 with standard_conforming_strings on"
HINT = ("Connect with client_encoding UTF8 (SQL_ASCII only on a UTF8 database) and "
        "standard_conforming_strings on.")


def clean_encoding_name(name: str) -> str:
    """An encoding name as PostgreSQL compares it (``clean_encoding_name``): ASCII letters
    and digits only, lower-cased, so 'UTF-8', 'utf_8' and 'Utf8' are one name."""
    return "".join(ch for ch in name.lower() if ch.isascii() and ch.isalnum())


def encoding_handled(client: str, server: str) -> bool:
    """Whether the proxy's UTF-8 parse of statement text is the server's parse."""
    c = clean_encoding_name(client)
    return c in UTF8_NAMES or (c == _SQL_ASCII and clean_encoding_name(server) in UTF8_NAMES)


def bool_on(value: str) -> bool:
    """Whether PostgreSQL's ``parse_bool`` reads ``value`` as true (no trimming, as it)."""
    v = value.lower()
    return v == "on" or v == "1" or (v != "" and ("true".startswith(v) or "yes".startswith(v)))


def _shown(value: str) -> str:
    """A setting value fit for an error message (a name, never arbitrary client text)."""
    return f'"{value}"' if _PRINTABLE.fullmatch(value) else "(a value)"


def session_refusal(params: Mapping[str, str]) -> str | None:
    """Why a session with these server-reported settings cannot go on (None: it can).
    A setting the server did not report counts as unhandled: fail closed."""
    client = params.get("client_encoding")
    server = params.get("server_encoding", "")
    if client is None or not encoding_handled(client, server):
        return (f"strongroom: client_encoding {_shown(client or '')} is not supported: "
                f"{_RULE}")
    scs = params.get("standard_conforming_strings")
    if scs is None or not bool_on(scs):
        return f"strongroom: standard_conforming_strings must be on: {_RULE}"
    return None


def _value_refusal(param: str | None, values: tuple[str, ...] | None,
                   server_encoding: str) -> str | None:
    """Why setting ``param`` to ``values`` (None: not a constant) is refused, in a session
    whose database has ``server_encoding`` (as the server reported it)."""
    if param is None:
        return ("strongroom: set_config with a parameter name that is not a constant "
                f"(it could change client_encoding): {_RULE}")
    if param == "client_encoding":
        if values is None or len(values) != 1:
            return ("strongroom: client_encoding set to a value the proxy cannot read before "
                    f"the server runs it: {_RULE}")
        if not encoding_handled(values[0], server_encoding):
            return (f"strongroom: client_encoding {_shown(values[0])} is not supported: "
                    f"{_RULE}")
    elif param == "standard_conforming_strings":
        if values is None or len(values) != 1 or not bool_on(values[0]):
            return f"strongroom: standard_conforming_strings must stay on: {_RULE}"
    return None


def statement_refusal(info: StatementInfo, server_encoding: str) -> str | None:
    """Why a statement (or one it wraps: EXPLAIN, PREPARE, DECLARE) would change how the
    server reads statement text (None: it would not). SET/RESET to DEFAULT returns to the
    startup value, which was checked when the session started."""
    while info is not None:
        setting = info.setting
        if setting is not None and setting.action == "value":
            reason = _value_refusal(setting.param, setting.values, server_encoding)
            if reason is not None:
                return reason
        for call in info.config_calls:
            if call.param is None or call.param in WATCHED:
                reason = _value_refusal(call.param, call.values, server_encoding)
                if reason is not None:
                    return reason
        info = info.inner  # type: ignore[assignment]
    return None


def analysis_refusal(analysis: Analysis, params: Mapping[str, str]) -> str | None:
    """`statement_refusal` over a whole query string, in a session whose server-reported
    settings are `params`. Cheap for the common statement (three attribute reads when it
    sets nothing and wraps nothing): the relay runs it on every statement."""
    for info in analysis.statements:
        if info.setting is None and not info.config_calls and info.inner is None:
            continue
        reason = statement_refusal(info, params.get("server_encoding", ""))
        if reason is not None:
            return reason
    return None
