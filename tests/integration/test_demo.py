"""The demo is the compose topology from local binaries: test it as a newcomer uses it.

`strongroom demo` must start its own PostgreSQL with the sample fintech schema, create
keys, run the proxy with the example policy and print working psql lines; then the three
example roles must see plaintext, masks and envelopes, PostgreSQL only ciphertext, and
the metrics endpoint must answer.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

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


class _Output:
    """The demo's stdout read by a thread, so that every wait has a timeout: a read that
    blocks for ever (a grandchild keeping the pipe open) must not hang the suite."""

    def __init__(self, stream: IO[str]) -> None:
        self.text = ""
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()
        self.closed = False

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self._lines.put(line)
        self._lines.put(None)

    def wait_for(self, marker: str, timeout: float) -> bool:
        """True once `marker` was printed; False at EOF or after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while marker not in self.text and not self.closed:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return False
            if line is None:
                self.closed = True
            else:
                self.text += line
        return marker in self.text

    def rest(self, timeout: float) -> str:
        """Everything printed until EOF (at most `timeout` seconds)."""
        self.wait_for("\0never printed\0", timeout)
        return self.text


class _Demo:
    """`strongroom demo` in its own process group: on failure the whole group goes (the
    proxy it started included), whatever the demo's own signal handling does."""

    def __init__(self, *extra: str, ignore_sigint: bool = False) -> None:
        self.port = devcluster.free_port()
        argv = [sys.executable, "-m", "proxy.cli", "demo", "--port", str(self.port),
                "--seconds", "120", *extra]
        if ignore_sigint:
            # What a non-interactive shell does for `demo &`, and what `trap "" INT` does.
            argv = ["bash", "-c", 'trap "" INT; exec "$@"', "demo", *argv]
        self.proc = subprocess.Popen(argv, cwd=str(ROOT), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        assert self.proc.stdout is not None
        self.out = _Output(self.proc.stdout)

    def wait_for(self, marker: str, timeout: float = 90) -> str:
        if not self.out.wait_for(marker, timeout):
            self.kill()
            pytest.fail(f"the demo did not print {marker!r}:\n{self.out.text}")
        return self.out.text

    def stop(self, sig: signal.Signals, timeout: float = 60) -> str:
        """Send `sig`; everything it printed once it exited (fails if it does not)."""
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the demo ignored {sig.name}:\n{self.out.text}")
        return self.out.rest(30)

    def kill(self) -> None:
        """SIGTERM (its own clean-up stops PostgreSQL), then SIGKILL to the whole process
        group (the proxy it started included); then reap."""
        if self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def workdir(self) -> Path:
        found = re.search(r"demo directory \(config, KEK, keyring, audit log\): (\S+)",
                          self.out.text)
        assert found, self.out.text
        return Path(found.group(1))

    def printed(self, pattern: str) -> str:
        found = re.search(pattern, self.out.text)
        assert found, self.out.text
        return found.group(1)

    def pg_base(self) -> Path:
        found = re.search(r"starting a throwaway PostgreSQL in (\S+) \.\.\.", self.out.text)
        assert found, self.out.text
        return Path(found.group(1))


@pytest.fixture
def demo_factory() -> Iterator[Callable[..., _Demo]]:
    """Start demos; any still running at the end is stopped (SIGTERM, then the group)."""
    started: list[_Demo] = []

    def start(*extra: str, ignore_sigint: bool = False) -> _Demo:
        started.append(_Demo(*extra, ignore_sigint=ignore_sigint))
        return started[-1]

    yield start
    for demo in started:
        demo.kill()


def _assert_cleaned_up(demo: _Demo, out: str) -> None:
    """Exit 0, nothing left: the KEK and keyring directory, PostgreSQL and its directory."""
    assert demo.proc.returncode == 0 and "demo stopped" in out, out
    assert not demo.workdir().exists(), f"{demo.workdir()} (KEK, keyring) is left behind"
    assert not demo.pg_base().exists(), "the demo's PostgreSQL directory is left"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", demo.port), timeout=2).close()


def test_demo_runs_the_example_topology(demo_factory: Callable[..., _Demo]) -> None:
    demo = demo_factory()
    port = demo.port
    out = demo.wait_for("stops both")
    assert f"psql -h 127.0.0.1 -p {port} -U app app" in out
    direct = re.search(r"psql -h (\S+) -p (\d+) -U postgres app", out)
    assert direct, out
    # the compose topology: metrics and the audit log are on, and it says where
    metrics_url = demo.printed(r"metrics: (http://127\.0\.0\.1:\d+/metrics)")
    audit_file = Path(demo.printed(r"audit log: (\S+)"))
    assert audit_file.parent.parent == demo.workdir()
    key_file = demo.printed(r"--key-file (\S+)")

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
    assert envelope.stdout.strip().startswith("\\x02"), envelope.stdout
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

    with urllib.request.urlopen(metrics_url, timeout=10) as r:
        text = r.read().decode()
    assert "strongroom_client_connections_total" in text
    assert PAN not in text

    records = [json.loads(line) for line in audit_file.read_text().splitlines()]
    statements = [r for r in records if r.get("event") == "statement"]
    assert any(r.get("role") == "app" for r in statements), records
    assert any(r.get("decision") == "deny" and r.get("role") == "support_agent"
               for r in records), records
    assert PAN not in audit_file.read_text() and "DE123456789" not in audit_file.read_text()
    verified = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "audit", "verify", str(audit_file),
         "--key-file", key_file], capture_output=True, text=True, timeout=60, cwd=str(ROOT))
    assert verified.returncode == 0, verified.stdout + verified.stderr

    _assert_cleaned_up(demo, demo.stop(signal.SIGINT))
    assert not audit_file.exists()


def test_demo_stops_cleanly_on_sigterm(demo_factory: Callable[..., _Demo]) -> None:
    """`timeout`, `docker stop` and a closed terminal send SIGTERM/SIGHUP, not Ctrl-C: the
    throwaway PostgreSQL must not outlive the demo, nor its KEK and keyring the run."""
    demo = demo_factory()
    demo.wait_for("stops both")
    assert (demo.workdir() / "keys" / "dev.kek").exists()
    _assert_cleaned_up(demo, demo.stop(signal.SIGTERM))


def test_demo_stops_on_sigint_when_started_with_sigint_ignored(
        demo_factory: Callable[..., _Demo]) -> None:
    """`demo &` from a script, or nohup-style wrappers, start it with SIGINT ignored;
    `kill -INT` must still stop it and clean up."""
    demo = demo_factory(ignore_sigint=True)
    demo.wait_for("stops both")
    _assert_cleaned_up(demo, demo.stop(signal.SIGINT))


def test_demo_cleans_up_when_stopped_during_start_up(
        demo_factory: Callable[..., _Demo]) -> None:
    """A signal while PostgreSQL is still being created leaves nothing behind either."""
    demo = demo_factory()
    demo.wait_for("starting a throwaway PostgreSQL")
    _assert_cleaned_up(demo, demo.stop(signal.SIGTERM))


def test_demo_cleans_up_after_a_start_up_error(demo_factory: Callable[..., _Demo]) -> None:
    """An error once PostgreSQL and the keys exist (here: the proxy port is taken) is one
    line and exit status 1, and removes them too; the demo never takes another listener
    on its port for the proxy."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        busy = taken.getsockname()[1]
        demo = demo_factory("--port", str(busy))
        demo.port = busy
        out = demo.wait_for("demo stopped")
        demo.proc.wait(60)
    assert demo.proc.returncode == 1, out
    assert f"127.0.0.1:{busy} is not free" in out and "Traceback" not in out, out
    assert "Strongroom is up" not in out
    assert not demo.workdir().exists(), f"{demo.workdir()} (KEK, keyring) is left behind"
    assert not demo.pg_base().exists(), "the demo's PostgreSQL directory is left"


def test_demo_keep_keeps_its_directory(demo_factory: Callable[..., _Demo]) -> None:
    """--keep keeps the directory (and says where, and that the KEK is in it)."""
    demo = demo_factory("--keep")
    demo.wait_for("stops both")
    workdir = demo.workdir()
    try:
        out = demo.stop(signal.SIGTERM)
        assert demo.proc.returncode == 0 and f"kept {workdir}" in out, out
        assert (workdir / "keys" / "dev.kek").exists()
        assert (workdir / "keys" / "keyring.json").exists()
        assert (workdir / "strongroom.yaml").exists()
        assert not demo.pg_base().exists()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


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
