"""The demo is the compose topology from local binaries: test it as a newcomer uses it.

`strongroom demo` must start its own PostgreSQL with the sample fintech schema, create
keys, run the proxy with the example policy and print working psql lines; then the three
example roles must see plaintext, masks and envelopes, PostgreSQL only ciphertext, and
the metrics endpoint must answer.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from proxy import devcluster

ROOT = Path(__file__).resolve().parent.parent.parent
PAN = "4111111111111111"


def _psql(port: int, user: str, password: str, sql: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["psql", "-XAtq", "-h", "127.0.0.1", "-p", str(port), "-U", user, "-d", "app",
         "-v", "ON_ERROR_STOP=1", "-c", sql],
        capture_output=True, text=True, env={**os.environ, "PGPASSWORD": password},
        timeout=30,
    )


def _start_demo(port: int, metrics: int) -> tuple[subprocess.Popen[str], str]:
    """`strongroom demo` running, and what it printed up to its connection lines."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "demo", "--port", str(port),
         "--metrics-port", str(metrics), "--seconds", "120"],
        cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    out = ""
    assert proc.stdout is not None
    deadline = time.monotonic() + 90
    try:
        while "stops both" not in out:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, f"demo exited early:\n{out}"
            out += line
            assert time.monotonic() < deadline, f"demo did not come up:\n{out}"
    except BaseException:
        proc.send_signal(signal.SIGINT)  # its own clean-up stops the cluster
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    return proc, out


def test_demo_runs_the_example_topology() -> None:
    port = devcluster.free_port()
    metrics = devcluster.free_port()
    proc, out = _start_demo(port, metrics)
    try:
        assert f"psql -h 127.0.0.1 -p {port} -U app app" in out
        direct = re.search(r"psql -h (\S+) -p (\d+) -U postgres app", out)
        assert direct, out

        app = _psql(port, "app", "app-secret",
                    "INSERT INTO customers (name, tax_id) VALUES ('Ann', 'DE123456789') "
                    "RETURNING id")
        assert app.returncode == 0, app.stderr
        cid = app.stdout.strip()
        ins = _psql(port, "app", "app-secret",
                    f"INSERT INTO cards (customer_id, pan, expiry) VALUES ({cid}, '{PAN}', "
                    "'2030-01-31')")
        assert ins.returncode == 0, ins.stderr
        read = _psql(port, "app", "app-secret",
                     f"SELECT pan, expiry FROM cards WHERE pan = '{PAN}'")
        assert read.stdout.strip() == f"{PAN}|2030-01-31", read.stderr

        masked = _psql(port, "support_agent", "support-secret", "SELECT pan FROM cards")
        assert masked.stdout.strip() == "************1111", masked.stderr
        denied = _psql(port, "support_agent", "support-secret", "SELECT tax_id FROM customers")
        assert denied.returncode != 0 and denied.stdout == ""
        assert "permission denied by strongroom" in denied.stderr
        # issue 11 route 6: the masked view is no equality oracle (no lookup in the example)
        for oracle in (f"SELECT id FROM cards WHERE pan IN ('4111111111111129', '{PAN}')",
                       f"SELECT pan = '{PAN}' FROM cards"):
            asked = _psql(port, "support_agent", "support-secret", oracle)
            assert asked.returncode != 0 and asked.stdout == "", asked.stdout
            assert "masked column public.cards.pan" in asked.stderr, asked.stderr
            assert "without lookup" in asked.stderr and PAN not in asked.stderr
        envelope = _psql(port, "etl_backup", "etl-secret", "SELECT pan FROM cards")
        assert envelope.stdout.strip().startswith("\\x01"), envelope.stdout
        # psql's own catalog queries (\d mixes qualified and unqualified functions)
        described = _psql(port, "app", "app-secret", "\\d cards")
        assert described.returncode == 0 and "pan_bidx" in described.stdout, described.stderr

        at_rest = subprocess.run(
            ["psql", "-XAtq", "-h", direct.group(1), "-p", direct.group(2), "-U", "postgres",
             "-d", "app", "-c", "SELECT pan::text, tax_id::text FROM cards, customers"],
            capture_output=True, text=True, timeout=30,
            **({"user": "postgres"} if os.geteuid() == 0 else {}),
        )
        assert at_rest.returncode == 0, at_rest.stderr
        assert PAN not in at_rest.stdout and PAN.encode().hex() not in at_rest.stdout
        assert "DE123456789" not in at_rest.stdout

        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as r:
            text = r.read().decode()
        assert "strongroom_client_connections_total" in text
        assert PAN not in text
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert "demo stopped" in out + (proc.stdout.read() if proc.stdout else "")


def test_demo_stops_cleanly_on_sigterm() -> None:
    """`timeout`, `docker stop` and a closed terminal send SIGTERM/SIGHUP, not Ctrl-C: the
    throwaway PostgreSQL must not outlive the demo."""
    port = devcluster.free_port()
    proc, out = _start_demo(port, devcluster.free_port())
    try:
        direct = re.search(r"psql -h (\S+) -p (\d+) -U postgres app", out)
        assert direct, out
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "demo stopped" in rest
    assert not os.path.exists(direct.group(1)), "the demo's PostgreSQL directory is left"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", int(direct.group(2))), timeout=2).close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def _fake_checkout(tmp: Path) -> Path:
    """scripts/demo.sh and scripts/setup.sh with the real pyproject.toml, in a copy whose
    .venv holds stand-ins that log their arguments: the scripts' own logic, run as is,
    without installing anything."""
    (tmp / "scripts").mkdir()
    for name in ("demo.sh", "setup.sh"):
        (tmp / "scripts" / name).write_bytes((ROOT / "scripts" / name).read_bytes())
        (tmp / "scripts" / name).chmod(0o755)
    (tmp / "pyproject.toml").write_bytes((ROOT / "pyproject.toml").read_bytes())
    bindir = tmp / ".venv" / "bin"
    bindir.mkdir(parents=True)
    for name in ("python", "pip", "strongroom"):
        (bindir / name).write_text(f'#!/bin/sh\necho "{name} $*" >>"{tmp}/calls.log"\n')
        (bindir / name).chmod(0o755)
    return tmp


def _run_demo_sh(checkout: Path) -> list[str]:
    """Run scripts/demo.sh once; the stand-in commands it called, in order."""
    log = checkout / "calls.log"
    log.unlink(missing_ok=True)
    done = subprocess.run(["bash", str(checkout / "scripts" / "demo.sh"), "--keep"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return log.read_text().splitlines()


def test_demo_sh_installs_only_when_pyproject_changes(tmp_path: Path) -> None:
    """pip runs on the first start and after pyproject.toml changes, not on every start."""
    checkout = _fake_checkout(tmp_path)
    first = _run_demo_sh(checkout)
    assert any(c.startswith("pip install -q -e") for c in first), first
    assert first[-1] == "strongroom demo --keep"
    assert _run_demo_sh(checkout) == ["strongroom demo --keep"]
    with open(checkout / "pyproject.toml", "a", encoding="utf-8") as fh:
        fh.write("\n# changed\n")
    again = _run_demo_sh(checkout)
    assert any(c.startswith("pip install -q -e") for c in again), again
    assert _run_demo_sh(checkout) == ["strongroom demo --keep"]


def test_pyproject_license_is_an_spdx_string() -> None:
    """The table form makes setuptools print deprecation warnings on every install; the
    SPDX string needs setuptools 77, which the build requirements must then ask for."""
    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["license"] == "Apache-2.0"
    (req,) = [r for r in meta["build-system"]["requires"] if r.startswith("setuptools")]
    assert re.fullmatch(r"setuptools>=(\d+)", req) and int(req.split(">=")[1]) >= 77, req
