"""COPY's own ENCODING option: the data stream is read as the server reads it, or refused.

The session's client_encoding is checked (tests/integration/test_client_encoding.py), but
`COPY ... FROM STDIN (ENCODING 'GBK')` makes the server decode that one COPY's data in
GBK, where the byte 0x5C can be the second byte of a character. The proxy splits the
stream into fields byte by byte, so a name field ending in `81 5C 5C` (to the proxy: a
character and an escaped backslash) made the server read the proxy's own delimiter as
an escaped tab, and `81 5C 09` (to the proxy: an escaped tab) made it see a delimiter
where the proxy saw none: an unprotected field carried a protected column's value past
the sealing, and the server stored it as plaintext. The proxy now refuses a COPY whose
ENCODING is not UTF8 (0A000), before anything is sent.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from tests.integration.encryption_env import direct, setup_sql, start_encrypted

SECRET = b"SECRET-TAX-31337"
PROTECT = {"public.ce_customers.tax_id": {"type": "text", "mode": "randomized"}}
POLICY = {"roles": {"app": {"tables": {"public.ce_customers": [
    "select", "insert", "copy_in", "copy_out"]}}}, "default": "deny"}


@pytest.fixture(scope="module")
def cproxy(pg: Any) -> Iterator[Any]:
    setup_sql(pg, "CREATE TABLE ce_customers (id serial PRIMARY KEY, name text, tax_id bytea)")
    p = start_encrypted(pg, PROTECT, POLICY)
    try:
        yield p
    finally:
        p.stop()
        setup_sql(pg, "DROP TABLE ce_customers")


def _stored(pg: Any) -> list[bytes]:
    with direct(pg) as d:
        return [bytes(r[0]) for r in d.execute("SELECT tax_id FROM ce_customers")
                if r[0] is not None]


@pytest.mark.parametrize("option", [
    "(ENCODING 'GBK')", "(ENCODING 'SJIS')", "(ENCODING 'BIG5')", "(ENCODING 'LATIN1')",
    "(ENCODING 'sql_ascii')", "(FORMAT csv, ENCODING 'GBK')", "WITH ENCODING 'GBK'",
])
def test_copy_in_with_a_foreign_encoding_is_refused(cproxy: Any, option: str) -> None:
    # name: to the proxy one field (escaped tab, then an escaped backslash); to a GBK
    # server "M<c>" | "SECRET<c>" + the proxy's delimiter read as an escaped tab
    name = b"M\x81\x5c\t" + SECRET + b"\x81\x5c\x5c"
    with psycopg.connect(cproxy.conninfo(), autocommit=True) as c:
        with pytest.raises(psycopg.errors.FeatureNotSupported) as info:
            with c.cursor().copy(f"COPY ce_customers (name, tax_id) FROM STDIN {option}"
                                 ) as cp:
                cp.write(name + b"\t\\N\n")
        assert "ENCODING" in (info.value.diag.message_primary or "")
        assert c.execute("SELECT 1").fetchone() == (1,)
    assert not any(SECRET in v for v in _stored(cproxy.cluster))


def test_copy_out_with_a_foreign_encoding_is_refused(cproxy: Any) -> None:
    with psycopg.connect(cproxy.conninfo(), autocommit=True) as c:
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            with c.cursor().copy("COPY ce_customers (name, tax_id) TO STDOUT "
                                 "(ENCODING 'GBK')") as cp:
                for _chunk in cp:
                    pass


@pytest.mark.parametrize("encoding", ["UTF8", "utf-8", "Unicode"])
def test_copy_with_encoding_utf8_still_works(cproxy: Any, encoding: str) -> None:
    with psycopg.connect(cproxy.conninfo(), autocommit=True) as c:
        with c.cursor().copy("COPY ce_customers (name, tax_id) FROM STDIN "
                             f"(ENCODING '{encoding}')") as cp:
            cp.write("Zoë\t" + SECRET.decode() + "\n")
        got = c.execute("SELECT tax_id FROM ce_customers WHERE name = 'Zoë'").fetchall()
        assert got and all(r == (SECRET.decode(),) for r in got)
    assert not any(SECRET in v for v in _stored(cproxy.cluster))
