"""Which reported database names can identify a database for envelope binding."""

from __future__ import annotations

import pytest

from proxy.encryption import DatabaseNotBindable, bindable_database


@pytest.mark.parametrize(("name", "encoding"), [
    ("app", "UTF8"), ("app", "LATIN1"), ("app", "SQL_ASCII"),
    ("caf\u00e9", "UTF8"), ("caf\u00e9", "SQL_ASCII"),
])
def test_names_reported_as_stored_bind(name: str, encoding: str) -> None:
    assert bindable_database(name, encoding) == name


@pytest.mark.parametrize("encoding", ["LATIN1", "WIN1252", "EUC_JP", "latin-1"])
def test_non_ascii_name_converted_from_another_encoding_is_refused(encoding: str) -> None:
    """`db_Ã©` from a LATIN1 database may be the stored bytes of `db_é`, and then it is
    another database's name."""
    with pytest.raises(DatabaseNotBindable, match="non-ASCII"):
        bindable_database("db_\u00c3\u00a9", encoding)
