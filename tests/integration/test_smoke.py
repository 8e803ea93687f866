"""First proof that the relay is transparent: the same answers direct and through it."""

from __future__ import annotations

import psycopg
import pytest

from tests.conftest import APP_DB, APP_PASSWORD, APP_USER


def test_backend_pid_matches_key(proxy) -> None:
    with psycopg.connect(proxy.conninfo()) as conn:
        pid = conn.execute("select pg_backend_pid()").fetchone()[0]
        assert pid == conn.info.backend_pid
        assert conn.execute("select current_user").fetchone()[0] == APP_USER


def test_error_fields_identical(pg, proxy) -> None:
    direct = pg.dsn(APP_USER, APP_PASSWORD, APP_DB) + "?sslmode=disable"
    errs = []
    for dsn in (direct, proxy.dsn()):
        with psycopg.connect(dsn) as conn:
            with pytest.raises(psycopg.errors.DivisionByZero) as info:
                conn.execute("select 1/0")
            d = info.value.diag
            errs.append((d.sqlstate, d.message_primary, d.severity, d.severity_nonlocalized))
    assert errs[0] == errs[1]
