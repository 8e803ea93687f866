"""Operations: limits, idle timeouts, SIGTERM drain, SIGHUP reload, check-config, workers.

These run the real `strongroom` process and poke it the way an operator or an init
system would (signals, files), then check what clients and the server observe.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest
import yaml

from proxy import devcluster
from tests.conftest import (
    APP_DB,
    APP_USER,
    ROOT,
    ProxyProcess,
    RawPG,
    error_fields,
    startup_packet,
)
from tests.integration.observability_env import scrape, wait_metrics
from tests.integration.test_protocol_async import backend_state, wait_active


def wait_log(p: ProxyProcess, text: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in p.log():
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not in proxy log:\n{p.log()[-2000:]}")
        time.sleep(0.05)


# ---------------------------------------------------------------------- limits


def _stall_in_scram(port: int, source: str) -> socket.socket:
    """A client from `source` that sends a startup packet and never answers SCRAM: it
    returns once the server's AuthenticationSASL arrived (the proxy has connected
    upstream), holding a server backend until the startup timeout."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
    s.sendall(startup_packet({"user": APP_USER, "database": APP_DB}))
    reply = s.recv(5)
    assert reply[:1] == b"R", reply
    return s


def _refused_at_startup(port: int, source: str) -> dict[str, str]:
    """The ErrorResponse fields a client from `source` gets for its startup packet."""
    with socket.create_connection(("127.0.0.1", port), timeout=5,
                                  source_address=(source, 0)) as s:
        s.sendall(startup_packet({"user": APP_USER, "database": APP_DB}))
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    assert data[:1] == b"E", data
    return error_fields(data[5:])


def _metric(p: ProxyProcess, series: str) -> float:
    for line in scrape(p).splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{series} not scraped")


def test_max_startups(make_proxy) -> None:
    """Issue 11: sessions that never finish authenticating are bounded in total and per
    client address; beyond them a client gets 53300 at its startup packet, before the
    proxy opens an upstream connection, so they cannot use up the server's
    max_connections. Released slots (closed, timed out) serve a normal client."""
    p = make_proxy({"limits": {"max_startups": 3, "max_startups_per_ip": 2,
                               "startup_timeout": 4},
                    "metrics": {"host": "127.0.0.1", "port": devcluster.free_port()}})
    wait_metrics(p)
    upstream = "strongroom_upstream_connections_active"
    stalled = [_stall_in_scram(p.port, "127.0.0.1"), _stall_in_scram(p.port, "127.0.0.1")]
    try:
        started = time.monotonic()
        fields = _refused_at_startup(p.port, "127.0.0.1")  # the address's third
        assert fields["C"] == "53300" and "from this address" in fields["M"], fields
        assert time.monotonic() - started < 2  # answered, not left to time out
        assert _metric(p, "strongroom_client_connections_starting") == 2
        stalled.append(_stall_in_scram(p.port, "127.0.0.2"))  # another address: room
        fields = _refused_at_startup(p.port, "127.0.0.3")  # but 3 in total
        assert fields["C"] == "53300" and "from this address" not in fields["M"], fields
        assert _metric(p, upstream) == 3  # the refused ones never reached the server
        assert _metric(p, 'strongroom_startups_rejected_total{reason="per_ip"}') == 1
        assert _metric(p, 'strongroom_startups_rejected_total{reason="total"}') == 1
        assert _metric(p, "strongroom_client_connections_starting") == 3
        stalled.pop(0).close()  # a slot of 127.0.0.1 freed by a client that leaves
        deadline = time.monotonic() + 3
        while _metric(p, "strongroom_client_connections_starting") != 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with psycopg.connect(p.conninfo()) as c:  # logs in while two still stall
            assert c.execute("select 1").fetchone() == (1,)
            # an authenticated session no longer counts as starting
            assert _metric(p, "strongroom_client_connections_starting") == 2
            # ... and once the stalled ones time out, the address has room again
            deadline = time.monotonic() + 10
            while _metric(p, "strongroom_client_connections_starting") != 0:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            with psycopg.connect(p.conninfo()) as c2, psycopg.connect(p.conninfo()) as c3:
                assert c2.execute("select 2").fetchone() == (2,)
                assert c3.execute("select 3").fetchone() == (3,)
    finally:
        for s in stalled:
            s.close()


def test_max_clients(make_proxy) -> None:
    """Beyond limits.max_clients: PostgreSQL's own 53300, after SSL negotiation as the
    server does it, so libpq's default sslmode=prefer reports it properly; a slot
    freed is reusable; a cancel request still gets through when full."""
    p = make_proxy({"limits": {"max_clients": 2}})
    a = psycopg.connect(p.conninfo())
    b = psycopg.connect(p.conninfo())
    try:
        for mode in ("disable", "prefer"):
            with pytest.raises(psycopg.OperationalError, match="too many clients") as info:
                psycopg.connect(p.conninfo(sslmode=mode))
            assert "sorry, too many clients already" in str(info.value)
        with RawPG(p.port) as raw:
            raw.send(startup_packet({"user": "app", "database": "app"}))
            replies = raw.read_to_close()
        assert [error_fields(body)["C"] for _, body in replies] == ["53300"]
        # Cancel while full: b's long query is cancelled through the full proxy.
        err: list[BaseException] = []

        def run() -> None:
            try:
                b.execute("select pg_sleep(20)")
            except psycopg.Error as exc:
                err.append(exc)

        t = threading.Thread(target=run)
        t.start()
        time.sleep(0.3)
        b.cancel()
        t.join(10)
        assert err and err[0].sqlstate == "57014"
        b.rollback()
    finally:
        a.close()
        b.close()
    deadline = time.monotonic() + 3
    while True:
        try:
            with psycopg.connect(p.conninfo()) as c:
                assert c.execute("select 1").fetchone() == (1,)
            break
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_idle_in_transaction_timeout(pg: devcluster.Cluster, make_proxy) -> None:
    """A session idle inside a transaction is ended with 25P03 and its backend is gone
    (the transaction rolled back); an idle session outside a transaction stays."""
    p = make_proxy({"limits": {"idle_in_transaction_timeout": 1}})
    with psycopg.connect(p.conninfo()) as idle_ok, psycopg.connect(p.conninfo()) as conn:
        idle_ok.autocommit = True
        conn.execute("select 1")  # opens the transaction
        pid = conn.info.backend_pid
        time.sleep(2.6)
        with pytest.raises(psycopg.errors.IdleInTransactionSessionTimeout) as info:
            conn.execute("select 2")
        assert info.value.sqlstate == "25P03"
        assert "idle-in-transaction timeout" in str(info.value)
        assert backend_state(pg, pid) == ""
        assert idle_ok.execute("select 3").fetchone() == (3,)


def test_idle_timeout(make_proxy) -> None:
    p = make_proxy({"limits": {"idle_timeout": 1}})
    conn = psycopg.connect(p.conninfo(), autocommit=True)
    time.sleep(2.6)
    with pytest.raises(psycopg.OperationalError) as info:
        conn.execute("select 1")
    assert info.value.sqlstate == "57P05"
    conn.close()


# ---------------------------------------------------------------------- signals


def test_sigterm_drains(make_proxy) -> None:
    """SIGTERM: the listener closes at once (new connections refused), a statement in
    progress finishes and its answer arrives, and the process exits once the last
    session ends, well within the grace period."""
    p = make_proxy({"limits": {"shutdown_grace": 10}})
    conn = psycopg.connect(p.conninfo(), autocommit=True)
    result: list[object] = []
    t = threading.Thread(target=lambda: result.append(
        conn.execute("select pg_sleep(1.5), 'finished'").fetchone()))
    t.start()
    time.sleep(0.3)
    p.signal(signal.SIGTERM)
    time.sleep(0.3)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(p.conninfo(), connect_timeout=2)
    t.join(10)
    assert result == [("", "finished")]
    assert conn.execute("select 'still served'").fetchone() == ("still served",)
    start = time.monotonic()
    conn.close()
    assert p.proc is not None
    assert p.proc.wait(5) == 0
    assert time.monotonic() - start < 2
    assert "shutting down" in p.log()


def test_sigterm_grace_expires(make_proxy) -> None:
    """Sessions still open after shutdown_grace are ended with 57P01 and the process exits."""
    p = make_proxy({"limits": {"shutdown_grace": 1}})
    conn = psycopg.connect(p.conninfo(), autocommit=True)
    start = time.monotonic()
    p.signal(signal.SIGTERM)
    assert p.proc is not None
    assert p.proc.wait(10) == 0
    assert 0.9 < time.monotonic() - start < 5
    with pytest.raises(psycopg.OperationalError) as info:
        conn.execute("select 1")
    assert info.value.sqlstate == "57P01"
    conn.close()


def test_sighup_reload(make_proxy) -> None:
    """A broken file keeps the running config (and says so); a good one takes effect."""
    p = make_proxy({"limits": {"max_clients": 10}})
    good = dict(p.config)
    p.config_path.write_text("listen: {port: [not, an, int]}\nbogus_key: 1\n")
    p.signal(signal.SIGHUP)
    wait_log(p, "reload rejected, keeping the running configuration")
    assert "bogus_key" in p.log()
    with psycopg.connect(p.conninfo()) as c1, psycopg.connect(p.conninfo()) as c2:
        assert c1.execute("select 1").fetchone() == c2.execute("select 1").fetchone()
    good["limits"] = {"max_clients": 1}
    p.write_config(good)
    p.signal(signal.SIGHUP)
    wait_log(p, "configuration reloaded")
    with psycopg.connect(p.conninfo()) as c1:
        with pytest.raises(psycopg.OperationalError, match="too many clients"):
            psycopg.connect(p.conninfo())
        assert c1.execute("select 1").fetchone() == (1,)
    assert p.alive()


# ---------------------------------------------------------------------- check-config


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy.cli", "check-config", str(path)],
                          cwd=str(ROOT), capture_output=True, text=True, timeout=60)


CONFIG_ERRORS = {
    # name: (yaml text, expected line, fragment of the message)
    "unknown-key": ("listen:\n  host: 127.0.0.1\n  prot: 6432\n", 3, "prot"),
    "unknown-top-level-key": ("log_level: info\n\nfrobnicate: yes\n", 3, "frobnicate"),
    "wrong-type": ("listen:\n  host: 127.0.0.1\n  port: '6432'\n", 3, "is not of type"),
    "port-out-of-range": ("upstream:\n  host: db\n  port: 70000\n", 3, "70000"),
    "missing-file": ("listen:\n  port: 6432\n  tls:\n    cert_file: /nonexistent/c.crt\n"
                     "    key_file: /nonexistent/c.key\n", 4, "no such file"),
    "bad-yaml": ("listen:\n  host: [1,\n", 3, "invalid YAML"),
}


@pytest.mark.parametrize("name", list(CONFIG_ERRORS))
def test_check_config_errors(tmp_path: Path, name: str) -> None:
    text, line, fragment = CONFIG_ERRORS[name]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    res = check_config(path)
    assert res.returncode == 1, res.stdout + res.stderr
    first = res.stdout.splitlines()[0]
    assert first.startswith(f"{path}:{line}: "), res.stdout
    assert fragment in res.stdout


def test_check_config_missing_config_file(tmp_path: Path) -> None:
    res = check_config(tmp_path / "nope.yaml")
    assert res.returncode == 1
    assert res.stdout.startswith(f"{tmp_path / 'nope.yaml'}:")
    assert "cannot read config" in res.stdout


def test_check_config_ok_example() -> None:
    res = check_config(ROOT / "config" / "strongroom.example.yaml")
    assert res.returncode == 0, res.stdout
    assert "OK" in res.stdout


def test_serve_refuses_broken_config(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("listen:\n  port: 99999\n")
    res = subprocess.run([sys.executable, "-m", "proxy.cli", "serve", "--config", str(path)],
                         cwd=str(ROOT), capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert f"{path}:2:" in res.stderr


@pytest.mark.parametrize("what", ["file", "directory"])
@pytest.mark.parametrize("mode", [0o020, 0o002])
def test_serve_refuses_config_others_can_write(tmp_path: Path, what: str, mode: int) -> None:
    """Whoever can write the config (or replace it in its directory) can grant themselves
    any access: a group- or world-writable one is refused at start, and by check-config,
    with a `file: message` naming the culprit."""
    conf = tmp_path / "conf"
    conf.mkdir(mode=0o700)
    path = conf / "strongroom.yaml"
    path.write_text("listen:\n  port: 0\n")
    target = path if what == "file" else conf
    target.chmod(target.stat().st_mode & 0o777 | mode)
    res = subprocess.run([sys.executable, "-m", "proxy.cli", "serve", "--config", str(path)],
                         cwd=str(ROOT), capture_output=True, text=True, timeout=60)
    assert res.returncode == 1, res.stderr
    assert res.stderr.startswith(f"{target}: "), res.stderr
    assert "group- or world-writable" in res.stderr
    checked = check_config(path)
    assert checked.returncode == 1 and checked.stdout.startswith(f"{target}: "), checked.stdout


def test_sighup_refuses_config_others_can_write(make_proxy) -> None:
    """A reload of a config others can write keeps the running one, counted as failed."""
    p = make_proxy({"limits": {"max_clients": 10},
                    "metrics": {"host": "127.0.0.1", "port": devcluster.free_port()}})
    wait_metrics(p)
    loosened = dict(p.config)
    loosened["limits"] = {"max_clients": 1}
    p.write_config(loosened)
    p.config_path.chmod(0o666)
    p.signal(signal.SIGHUP)
    wait_log(p, "reload rejected, keeping the running configuration")
    assert f"{p.config_path}: config file is group- or world-writable" in p.log()
    assert 'strongroom_config_reloads_total{result="failed"} 1.0' in scrape(p)
    with psycopg.connect(p.conninfo()) as c1, psycopg.connect(p.conninfo()) as c2:
        assert c1.execute("select 1").fetchone() == c2.execute("select 1").fetchone()
    p.config_path.chmod(0o600)
    p.signal(signal.SIGHUP)
    wait_log(p, "configuration reloaded")
    with psycopg.connect(p.conninfo()), pytest.raises(psycopg.OperationalError):
        psycopg.connect(p.conninfo())


def test_serve_warns_when_root(make_proxy) -> None:
    """Running as root is allowed (containers) but logged as a WARNING."""
    from proxy.cli import root_warning

    assert root_warning(1000) is None
    assert "running as root" in (root_warning(0) or "")
    p = make_proxy()
    assert ("WARNING strongroom: running as root" in p.log()) == (os.geteuid() == 0), p.log()


# ---------------------------------------------------------------------- workers


def _worker_pids(p: ProxyProcess) -> list[int]:
    assert p.proc is not None
    out = Path(f"/proc/{p.proc.pid}/task/{p.proc.pid}/children").read_text().split()
    return [int(x) for x in out]


def _socket_owner(worker_pids: list[int], local_port: int) -> int | None:
    """Which worker holds the proxy→server connection whose local port is local_port."""
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        # Skip TIME_WAIT leftovers of earlier connections on the same port (inode 0).
        if int(parts[1].split(":")[1], 16) == local_port and parts[3] == "01":
            inode = parts[9]
            break
    if inode is None:
        return None
    for pid in worker_pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if fd.readlink().name == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    return None


def test_workers_cancel_across_processes(pg: devcluster.Cluster, make_proxy) -> None:
    """workers: 2 — sessions land on both workers, and a cancel works whichever worker
    the CancelRequest's new connection lands on (it is routed by the server's key)."""
    p = make_proxy({"workers": 2})
    time.sleep(0.5)
    workers = _worker_pids(p)
    assert len(workers) == 2
    owners = set()
    cancels = 0
    # Until both workers own a session (2^-29 odds of never), and at least 6 cancels.
    while (owners != set(workers) or cancels < 6) and cancels < 30:
        cancels += 1
        with psycopg.connect(p.conninfo(), autocommit=True) as conn:
            pid = conn.info.backend_pid
            port = int(pg.psql(f"select client_port from pg_stat_activity where pid = {pid}"))
            owners.add(_socket_owner(workers, port))
            t = threading.Thread(target=lambda c=conn, q=pid: (wait_active(pg, q), c.cancel()))
            t.start()
            with pytest.raises(psycopg.errors.QueryCanceled):
                conn.execute("select pg_sleep(20)")
            t.join()
            assert conn.execute("select 1").fetchone() == (1,)
    assert owners == set(workers), "connections did not spread over both workers"
    p.signal(signal.SIGTERM)
    assert p.proc is not None and p.proc.wait(10) == 0


def test_workers_sighup_and_yaml_roundtrip(make_proxy) -> None:
    """The parent relays SIGHUP to every worker: each logs its own reload."""
    p = make_proxy({"workers": 2})
    time.sleep(0.5)
    p.write_config(yaml.safe_load(p.config_path.read_text()))
    p.signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while p.log().count("configuration reloaded") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert p.log().count("configuration reloaded") == 2


# ---------------------------------------------------------------------- process hygiene


def _core_limit(pid: int) -> list[str]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max core file size"):
            return line.split()[4:6]
    raise AssertionError(f"no core limit for {pid}")


def test_serve_has_no_core_file(make_proxy) -> None:
    """A crash must not write keys and plaintext to disk: the core-file limit of the
    proxy and of each forked worker is 0, soft and hard."""
    p = make_proxy({"workers": 2})
    assert p.proc is not None
    assert _core_limit(p.proc.pid) == ["0", "0"]
    workers = _worker_pids(p)
    assert len(workers) == 2
    for pid in workers:
        assert _core_limit(pid) == ["0", "0"]


SERVE_PROBE = """
import ctypes, resource, sys
from proxy import cli, server
libc = ctypes.CDLL(None)
PR_GET_DUMPABLE = 3
assert libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) == 1, "a fresh python is dumpable"
def probe(settings, config_path):
    print(libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0), resource.getrlimit(resource.RLIMIT_CORE))
    return 0
server.serve = probe
sys.exit(cli.main(["serve", "--config", sys.argv[1]]))
"""


def test_serve_is_not_dumpable(tmp_path: Path) -> None:
    """Not dumpable: no core file, and no ptrace or /proc/<pid>/mem by the same user.
    The flag is only readable by the process itself (prctl), so `serve` runs for real in
    a child python, with the listening loop replaced by a probe that reports it."""
    path = tmp_path / "strongroom.yaml"
    path.write_text("listen:\n  port: 0\n")
    res = subprocess.run([sys.executable, "-c", SERVE_PROBE, str(path)], cwd=str(ROOT),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\n")[0] == "0 (0, 0)", res.stdout + res.stderr


def test_env_kek_leaves_the_proxy_environment(pg: devcluster.Cluster,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The `env` provider's KEK is gone from /proc/<pid>/environ (which shows the block
    the process started with) once the proxy has read it; a reload still has the key."""
    from keys.providers.env import generate_env_value
    from tests.integration.encryption_env import keys_cli, setup_sql

    kek = generate_env_value()
    monkeypatch.setenv("STRONGROOM_TEST_ENV_KEK", kek)
    setup_sql(pg, "CREATE TABLE envkek_t (id int, secret bytea)")
    p = ProxyProcess(pg, {
        "keys": {"provider": "env", "env_var": "STRONGROOM_TEST_ENV_KEK",
                 "keyring": "keyring.json"},
        "protect": {"public.envkek_t.secret": {"type": "text"}},
    })
    try:
        p.write_config()
        res = keys_cli(p, "init")
        assert res.returncode == 0, res.stderr
        p.start()
        assert p.proc is not None
        environ = Path(f"/proc/{p.proc.pid}/environ").read_bytes()
        # Booleans, so a failure does not print the key.
        named, valued = b"STRONGROOM_TEST_ENV_KEK" in environ, kek.encode() in environ
        assert not named and not valued, "the KEK variable is in /proc/<pid>/environ"
        assert b"PATH=" in environ  # the rest of the environment is still there
        p.signal(signal.SIGHUP)
        wait_log(p, "configuration reloaded")
        with psycopg.connect(p.conninfo(), autocommit=True) as conn:
            conn.execute("INSERT INTO envkek_t VALUES (1, 'env-kek-value')")
            assert conn.execute("SELECT secret FROM envkek_t").fetchone() == ("env-kek-value",)
    finally:
        p.stop()
        setup_sql(pg, "DROP TABLE envkek_t")
