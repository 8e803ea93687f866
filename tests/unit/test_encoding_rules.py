"""The pure rules of proxy.sql.encoding: names as PostgreSQL compares them, parse_bool,
and which statements change how the server reads text."""

from __future__ import annotations

import pytest

from proxy.sql import analyze
from proxy.sql.encoding import (
    analysis_refusal,
    bool_on,
    clean_encoding_name,
    encoding_handled,
    session_refusal,
)


def test_names_are_compared_as_postgresql_does() -> None:
    assert {clean_encoding_name(n) for n in ("UTF-8", "utf_8", "Utf8", " utf8 ")} == {"utf8"}
    assert encoding_handled("Unicode", "LATIN1")
    assert encoding_handled("sql-ascii", "UTF8") and not encoding_handled("SQL_ASCII", "LATIN1")
    assert not encoding_handled("GBK", "UTF8") and not encoding_handled("", "UTF8")


def test_parse_bool() -> None:
    assert all(bool_on(v) for v in ("on", "ON", "t", "tru", "true", "y", "yes", "1"))
    assert not any(bool_on(v) for v in ("off", "of", "o", "0", "false", "no", "", " on"))


def test_session_needs_every_setting_reported() -> None:
    ok = {"client_encoding": "UTF8", "server_encoding": "UTF8",
          "standard_conforming_strings": "on"}
    assert session_refusal(ok) is None
    assert session_refusal({**ok, "standard_conforming_strings": "off"})
    assert session_refusal({k: v for k, v in ok.items() if k != "client_encoding"})
    assert session_refusal({k: v for k, v in ok.items() if k != "standard_conforming_strings"})
    reason = session_refusal({**ok, "client_encoding": "x' OR secret"})
    assert reason is not None and "secret" not in reason


@pytest.mark.parametrize("sql", [
    "SET NAMES 'gbk'", "SELECT set_config('client_encoding', $1, false)",
    "SELECT set_config($1, 'UTF8', false)", "DECLARE c CURSOR FOR SELECT "
    "set_config('client_encoding', 'SJIS', false)", "SET standard_conforming_strings = of",
    "SELECT 1; SET client_encoding = 'SQL_ASCII'",
])
def test_refused(sql: str) -> None:
    assert analysis_refusal(analyze(sql), {"server_encoding": "LATIN1"}) is not None


@pytest.mark.parametrize("sql", [
    "SET client_encoding = 'utf-8'", "RESET client_encoding", "SET NAMES DEFAULT", "RESET ALL",
    "SET standard_conforming_strings = yes", "SELECT set_config('work_mem', $1, false)",
    "SET client_encoding = 'SQL_ASCII'",
])
def test_allowed(sql: str) -> None:
    assert analysis_refusal(analyze(sql), {"server_encoding": "UTF8"}) is None
