"""`limits.max_cell_size` against a real PostgreSQL (issue 17, section 6).

One 100 MB stored cell read in text format took the proxy to about 1 GB: a protected
value whose envelope is larger than the limit is refused with 54000
(program_limit_exceeded) before it is converted, in text and in binary results, and the
session goes on. A value larger than the limit is refused the same way on its way in:
a Bind parameter, a literal in the statement text, a COPY row.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from tests.integration.encryption_env import direct, setup_sql, start_encrypted

PROTECT = {"public.cl_docs.body": {"type": "text"}}
SCHEMA = "CREATE TABLE cl_docs (id int PRIMARY KEY, body bytea);"
LIMIT = 4096
BIG = "d" * (LIMIT + 100)


@pytest.fixture(scope="module")
def proxy(pg: Any) -> Iterator[Any]:
    setup_sql(pg, SCHEMA)
    # A big value is stored under a generous limit, then the limit is lowered (reload).
    p = start_encrypted(pg, PROTECT, {"limits": {"max_cell_size": 1024 * 1024}})
    try:
        with psycopg.connect(p.conninfo(), autocommit=True) as c:
            c.execute("INSERT INTO cl_docs VALUES (1, %s), (2, 'small')", (BIG,))
        p.config["limits"]["max_cell_size"] = LIMIT
        p.write_config()
        p.reload()
        yield p
    finally:
        p.stop()


def _refused(exc: pytest.ExceptionInfo[psycopg.Error]) -> None:
    assert exc.value.sqlstate == "54000", exc.value
    assert "max_cell_size" in str(exc.value) and BIG not in str(exc.value)


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_a_stored_cell_above_the_limit_is_refused_and_the_session_goes_on(
        proxy: Any, binary: bool) -> None:
    with psycopg.connect(proxy.conninfo(), autocommit=True) as c:
        with pytest.raises(psycopg.Error) as exc:
            c.cursor(binary=binary).execute("SELECT body FROM cl_docs WHERE id = 1").fetchall()
        _refused(exc)
        cur = c.cursor(binary=binary)
        assert cur.execute("SELECT body FROM cl_docs WHERE id = 2").fetchall() == [("small",)]
        assert c.execute("SELECT 1").fetchone() == (1,)


def test_values_above_the_limit_are_refused_on_the_way_in(proxy: Any, pg: Any) -> None:
    with psycopg.connect(proxy.conninfo(), autocommit=True) as c:
        with pytest.raises(psycopg.Error) as exc:  # a Bind parameter
            c.execute("INSERT INTO cl_docs VALUES (10, %s)", (BIG,))
        _refused(exc)
        with pytest.raises(psycopg.Error) as exc:  # a literal in the text
            c.execute(f"INSERT INTO cl_docs VALUES (11, '{BIG}')".encode())
        _refused(exc)
        with pytest.raises(psycopg.Error) as exc:  # a COPY row
            with c.cursor().copy("COPY cl_docs (id, body) FROM STDIN") as cp:
                cp.write_row((12, BIG))
        assert "54000" in str(exc.value) and "max_cell_size" in str(exc.value)
        assert BIG not in str(exc.value)
        c.execute("INSERT INTO cl_docs VALUES (13, %s)", ("d" * 100,))  # still usable
    with direct(pg) as d:
        assert [r[0] for r in d.execute("SELECT id FROM cl_docs ORDER BY id")] == [1, 2, 13]
