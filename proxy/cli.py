"""The `strongroom` command: serve, check-config, demo."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from proxy import settings as settings_mod

EXAMPLE_CONFIG = Path(__file__).resolve().parent.parent / "config" / "strongroom.example.yaml"


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        import json

        return json.dumps(
            {
                "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
                "level": record.levelname.lower(),
                "logger": record.name,
                "msg": record.getMessage(),
            }
        )


def setup_logging(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def root_warning(euid: int) -> str | None:
    """The warning `serve` logs when run as root, or None. Root is not refused (a
    container may have no other user), but the proxy holds every column key and needs
    no privilege, so whoever runs it as root should hear that a bug in it is then a
    bug with root's powers."""
    if euid != 0:
        return None
    return ("running as root (uid 0): strongroom needs no privileges and holds every "
            "column key; run it as an unprivileged user that owns its config and keys")


def cmd_serve(args: argparse.Namespace) -> int:
    from proxy.hardening import harden_process
    from proxy.server import serve

    # Before anything secret is read: no core file, no same-user ptrace.
    harden_process()
    try:
        cfg = settings_mod.load(args.config)
    except settings_mod.ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return 1
    overrides = {}
    if args.port is not None:
        overrides["port"] = args.port
    if overrides:
        import dataclasses

        cfg = dataclasses.replace(cfg, listen=dataclasses.replace(cfg.listen, **overrides))
    setup_logging(args.log_level or cfg.log_level, cfg.log_format)
    try:
        # Build the gate once before listening: keys that cannot be unwrapped or a policy
        # that cannot be built stop the start with a message, not a traceback.
        from proxy import observability
        from proxy.gate import Gate

        Gate(cfg)
        if observability.audit_settings(cfg) is not None:
            observability.load_audit_key(cfg)
        # Once the start can no longer fail on the config: a refusal stays one line.
        warning = root_warning(os.geteuid())
        if warning:
            logging.getLogger("strongroom").warning("%s", warning)
        return serve(cfg, args.config)
    except settings_mod.ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return 1


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        cfg = settings_mod.load(args.file)
    except settings_mod.ConfigError as exc:
        for line in exc.problems:
            print(line)
        return 1
    from proxy.observability import audit_key_mode_problem

    protect = cfg.raw.get("protect") or {}
    live = bool(args.live or args.dsn)
    key_problem = audit_key_mode_problem(cfg)  # serve refuses it: say so before it does
    problems: list[str] = [key_problem] if key_problem else []
    problems += _keyring_mode_problems(args.file, cfg)  # ditto, and needs no KEK
    if protect and live and not problems:
        problems = _check_keys(args.file, cfg) or _check_live(args, cfg)
    if problems:
        for line in problems:
            print(line)
        return 1
    note = ""
    if protect:
        note = (", keys unwrap and protected columns match the live database" if live
                else "; keys and protected columns not checked (add --live)")
    print(f"{args.file}: OK (listen {cfg.listen.host}:{cfg.listen.port}, "
          f"upstream {cfg.upstream.host}:{cfg.upstream.port}{note})")
    return 0


def _keyring_mode_problems(path: str, cfg: settings_mod.Settings) -> list[str]:
    """A keyring file or directory that group or others may write (serve refuses it)."""
    from keys import keyring as kr
    from proxy.encryption import resolve

    keys_cfg = cfg.raw.get("keys") or {}
    if not cfg.raw.get("protect") or not keys_cfg.get("keyring"):
        return []
    try:
        kr.check_permissions(resolve(str(Path(path).resolve().parent), keys_cfg["keyring"]))
    except kr.KeyringError as exc:
        return [f"{path}:{settings_mod.line_in_file(path, ['keys', 'keyring'])}: keys.keyring: "
                f"{exc}"]
    return []


def _passwords(args: argparse.Namespace) -> list[str]:
    """Passwords a direct connection may have been given (--password, $PGPASSWORD, the
    DSN's), to keep them out of printed errors."""
    from urllib.parse import urlsplit

    found = [getattr(args, "password", None) or "", os.environ.get("PGPASSWORD", "")]
    for dsn in (getattr(args, "dsn", None), getattr(args, "anchor", None)):  # audit --anchor
        if dsn:
            try:
                found.append(urlsplit(dsn).password or "")
            except ValueError:
                pass
    return [p for p in found if p]


def _check_keys(path: str, cfg: settings_mod.Settings) -> list[str]:
    """The keyring must unwrap with the configured KEK for every protected column."""
    from proxy.encryption import Encryption

    try:
        Encryption(cfg.raw["protect"], cfg.raw.get("keys") or {},
                   str(Path(path).resolve().parent), None)
    except settings_mod.ConfigError as exc:
        line = settings_mod.line_in_file(path, ["keys"])
        return [f"{path}:{line}: {p}" for p in exc.problems]
    except KeyError as exc:
        return [f"{path}:{settings_mod.line_in_file(path, ['keys'])}: keys: missing {exc}"]
    return []


def _check_live(args: argparse.Namespace, cfg: settings_mod.Settings) -> list[str]:
    """Each protected column (and blind-index sibling) exists and is bytea."""
    import asyncio

    from proxy import live_check

    protect = cfg.raw["protect"]

    async def run() -> tuple[str, list[tuple[str, str]]]:
        conn: Any = await _direct_connection(args, cfg)
        try:
            database = await conn.fetchval("SELECT current_database()")
            catalog = await live_check.fetch_columns(conn, protect)
        finally:
            await conn.close()
        return database, live_check.column_problems(protect, catalog, database)

    try:
        _database, found = asyncio.run(run())
    except Exception as exc:  # no traceback; any password the driver quotes is masked
        line = settings_mod.line_in_file(args.file, ["upstream"])
        text = f"{type(exc).__name__}: {exc}"
        for secret in _passwords(args):
            text = text.replace(secret, "***")
        return [f"{args.file}:{line}: upstream: cannot connect to check the protected "
                f"columns: {text}"]
    return [f"{args.file}:{settings_mod.line_in_file(args.file, ['protect', name])}: "
            f"protect.{name}: {message}" for name, message in found]


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _install_stop_handlers() -> Callable[[], None]:
    """SIGINT, SIGTERM and SIGHUP raise KeyboardInterrupt once; returns the clean-up shield.

    Installed explicitly for SIGINT too: a non-interactive shell starts a background job
    (`cmd &`) with SIGINT ignored, Python then keeps it ignored, and `kill -INT` would not
    stop the demo. SIGHUP stays ignored when it was (`nohup`: the operator asked for it).
    Calling the returned function makes later signals no-ops, so that stopping PostgreSQL
    and removing the keys is not interrupted halfway by an impatient second Ctrl-C."""
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            raise KeyboardInterrupt

    def shield() -> None:
        nonlocal stopping
        stopping = True

    for sig in _STOP_SIGNALS:
        if sig == signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN:
            continue
        signal.signal(sig, stop)
    return shield


def _demo_config(workdir: Path, upstream_port: int, proxy_port: int,
                 metrics_port: int) -> dict[str, Any]:
    """The example configuration with the demo's ports, the audit log on and every path
    inside `workdir`: the same topology as compose, metrics and audit included."""
    import yaml

    cfg = yaml.safe_load(EXAMPLE_CONFIG.read_text())
    cfg["listen"]["port"] = proxy_port
    cfg["upstream"]["port"] = upstream_port
    cfg["metrics"]["port"] = metrics_port
    cfg["audit"] = {"path": str(workdir / "audit" / "audit.jsonl"),
                    "key_file": str(workdir / "keys" / "audit.key")}
    return cfg


def _check_port_free(port: int, option: str) -> None:
    """Refuse a port something already listens on: the proxy would fail to bind it, and
    the demo would take the other listener for the proxy and print working psql lines."""
    import socket

    from proxy import devcluster

    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio binds
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            raise devcluster.ClusterError(
                f"127.0.0.1:{port} is not free ({exc.strerror}); pass another {option}"
            ) from None


def _wait_for_proxy(proc: subprocess.Popen[bytes], port: int, timeout: float = 30) -> None:
    """Until the proxy listens; a proxy that exits during start-up is an error at once."""
    import socket

    from proxy import devcluster

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise devcluster.ClusterError(
                f"the proxy exited with status {proc.returncode} during start-up (see above)")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise devcluster.ClusterError(f"the proxy did not listen on port {port} within {timeout}s")


def _stop_proxy(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _destroy_cluster(base: Path | None) -> None:
    """Stop the PostgreSQL in `base` if one was started there, and remove the directory
    (also when start-up was interrupted half-way, before `devcluster.create` returned)."""
    import shutil

    from proxy import devcluster

    if base is None:
        return
    if (base / "data").exists():  # no-op if the server never started
        devcluster.Cluster(base=base, port=0).stop("immediate")
    shutil.rmtree(base, ignore_errors=True)


def _demo_banner(cfg_path: Path, cfg: dict[str, Any], cluster_base: Path,
                 cluster_port: int) -> str:
    proxy_port = cfg["listen"]["port"]
    metrics_port = cfg["metrics"]["port"]
    audit = cfg["audit"]
    metrics = (f"http://127.0.0.1:{metrics_port}/metrics" if metrics_port
               else "off (--metrics-port 0)")
    return (
        f"\nStrongroom is up (config: {cfg_path}). Connect through it:\n\n"
        f"  PGPASSWORD=app-secret psql -h 127.0.0.1 -p {proxy_port} -U app app\n"
        f"  PGPASSWORD=support-secret psql -h 127.0.0.1 -p {proxy_port} -U support_agent app\n"
        f"  PGPASSWORD=etl-secret psql -h 127.0.0.1 -p {proxy_port} -U etl_backup app\n\n"
        "Try, as app:\n"
        "  INSERT INTO customers (name, tax_id) VALUES ('Ann', 'DE123') RETURNING id;\n"
        "  INSERT INTO cards (customer_id, pan, expiry) VALUES (1, '4111111111111111',"
        " '2030-01-31');\n"
        "  SELECT * FROM cards WHERE pan = '4111111111111111';\n"
        "then SELECT * FROM cards; as support_agent (pan masked; its WHERE pan = ... is\n"
        "refused: a masked view is no equality oracle) and as etl_backup (ciphertext),\n"
        f"and directly: psql -h {cluster_base} -p {cluster_port} -U postgres app "
        "(only ciphertext at rest).\n\n"
        f"metrics: {metrics}\n"
        f"audit log: {audit['path']}\n"
        f"  verify: strongroom audit verify {audit['path']} --key-file {audit['key_file']}\n"
        "Ctrl-C (or SIGTERM) stops both."
    )


def cmd_demo(args: argparse.Namespace) -> int:
    """Throwaway PostgreSQL with a sample fintech schema, keys, and the proxy running the
    example configuration (encryption + policy + metrics + audit). Ctrl-C stops both.

    Everything it creates (the KEK and keyring included) is removed on any exit, a
    start-up error or a signal included, unless --keep."""
    import shutil

    import yaml

    from keys import cli_ops
    from proxy import devcluster
    from proxy.encryption import protect_columns_for_keys

    setup_logging("info")
    shield = _install_stop_handlers()
    workdir: Path | None = None
    pg_base: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    status = 0
    try:
        workdir = Path(tempfile.mkdtemp(prefix="strongroom-demo-"))
        print(f"demo directory (config, KEK, keyring, audit log): {workdir} "
              f"({'kept on exit' if args.keep else 'removed on exit; --keep keeps it'})",
              flush=True)
        pg_base = Path(tempfile.mkdtemp(prefix="strongroom-pg-"))
        print(f"starting a throwaway PostgreSQL in {pg_base} ...", flush=True)
        cluster = devcluster.create(base=pg_base)
        cluster.psql("CREATE DATABASE app")
        schema_sql = Path(__file__).resolve().parent.parent / "docker" / "init" / "01-schema.sql"
        cluster.psql(schema_sql.read_text(), db="app")
        proxy_port = args.port or devcluster.free_port()
        metrics_port = (devcluster.free_port() if args.metrics_port is None
                        else args.metrics_port)
        _check_port_free(proxy_port, "--port")
        if metrics_port:
            _check_port_free(metrics_port, "--metrics-port")
        cfg = _demo_config(workdir, cluster.port, proxy_port, metrics_port)
        cfg_path = workdir / "strongroom.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        (workdir / "keys").mkdir(mode=0o700)
        (workdir / "audit").mkdir(mode=0o700)
        cli_ops.init(workdir / "keys" / "dev.kek", workdir / "keys" / "keyring.json",
                     protect_columns_for_keys(cfg["protect"]))
        _init_audit_key(settings_mod.load(str(cfg_path)))
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "serve", "--config", str(cfg_path)],
            cwd=str(Path(__file__).resolve().parent.parent),
        )
        _wait_for_proxy(proc, cfg["listen"]["port"])
        print(_demo_banner(cfg_path, cfg, cluster.base, cluster.port), flush=True)
        deadline = time.monotonic() + args.seconds if args.seconds else None
        while proc.poll() is None and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.2)
        if proc.poll() not in (None, 0):
            print(f"the proxy exited with status {proc.returncode}", file=sys.stderr)
            status = 1
    except KeyboardInterrupt:
        pass
    except (devcluster.ClusterError, settings_mod.ConfigError) as exc:
        problems = exc.problems if isinstance(exc, settings_mod.ConfigError) else [str(exc)]
        print("\n".join(f"demo: {p}" for p in problems), file=sys.stderr, flush=True)
        status = 1
    finally:
        shield()
        _stop_proxy(proc)
        _destroy_cluster(pg_base)
        if workdir is not None and args.keep:
            print(f"kept {workdir} (holds the demo's KEK and keyring: delete it when done)",
                  flush=True)
        elif workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
        print("demo stopped", flush=True)
    return status


def _keys_context(config: str) -> tuple[settings_mod.Settings, str, str | None, object]:
    """Settings, keyring path, local KEK path and provider for the `keys` commands."""
    from proxy.encryption import make_provider, resolve

    cfg = settings_mod.load(config)
    keys_cfg = cfg.raw.get("keys") or {}
    if not keys_cfg:
        raise CliError(f"{config}: no `keys:` section; add one (see "
                       "config/strongroom.example.yaml)")
    base = str(Path(config).resolve().parent)
    keyring = resolve(base, keys_cfg["keyring"])
    kek = resolve(base, keys_cfg["path"]) if keys_cfg.get("provider", "local") == "local" else None
    provider = None if kek else make_provider(keys_cfg, base)
    return cfg, keyring, kek, provider


def _print_keys(rows: list[dict]) -> None:
    print(f"{'id':>10}  {'column':40} {'purpose':12} {'state':13} created")
    for r in rows:
        print(f"{r['id']:>10}  {r['column']:40} {r['purpose']:12} {r['state']:13} "
              f"{r['created_at']}")


def cmd_keys(args: argparse.Namespace) -> int:
    """Key management. Key bytes are never printed."""
    from keys import cli_ops
    from keys import keyring as kr
    from proxy.encryption import make_provider, protect_columns_for_keys

    cfg, keyring, kek, provider = _keys_context(args.config)
    if args.keys_command == "init":
        for path in (keyring, kek):
            if path is not None and _make_private_dir(Path(path).parent):
                print(f"created directory {Path(path).parent} (mode 0700)")
        columns = protect_columns_for_keys(cfg.raw.get("protect") or {})
        _print_keys(cli_ops.init(kek, keyring, columns, provider=provider))  # type: ignore[arg-type]
        _init_audit_key(cfg)
        return 0
    # A missing, malformed or group/world-writable keyring is said first (no KEK needed);
    # every command below authenticates it with the KEK before using or changing it.
    kr.load_unverified(keyring)
    if provider is None:
        provider = make_provider(cfg.raw["keys"], str(Path(args.config).resolve().parent))
    if args.keys_command == "show":
        if args.unverified:
            print("NOT AUTHENTICATED: the keyring file as it is, MAC not checked",
                  file=sys.stderr)
            _print_keys(cli_ops.show(keyring))
        else:
            _print_keys(cli_ops.show(keyring, provider))  # type: ignore[arg-type]
        return 0
    if args.keys_command == "seal":
        if cli_ops.seal(keyring, provider):  # type: ignore[arg-type]
            print(f"{keyring}: every key unwraps with KEK {provider.key_id}; "  # type: ignore[attr-defined]
                  "keyring authenticated (MAC added)")
        else:
            print(f"{keyring}: already authenticated, MAC verifies")
        return 0
    if args.keys_command == "unretire":
        cli_ops.unretire(keyring, args.key_id, provider)  # type: ignore[arg-type]
        print(f"key {args.key_id} is decrypt-only again; promote it if it should write "
              "(then reload every proxy)")
        return 0
    if args.keys_command == "retire":
        return cmd_keys_retire(args, keyring, provider)
    if args.keys_command == "rewrap":
        return _rewrap(keyring, provider, args.to)
    if args.keys_command == "add":
        key_id = cli_ops.add(keyring, provider, args.column, args.purpose)  # type: ignore[arg-type]
        print(f"added key {key_id} for {args.column} ({args.purpose}), decrypt-only; "
              "reload every proxy, then promote it")
    elif args.keys_command == "promote":
        cli_ops.promote(keyring, args.key_id, provider)  # type: ignore[arg-type]
        print(f"key {args.key_id} is now primary; reload every proxy (SIGHUP)")
    return 0


def _make_private_dir(path: Path) -> bool:
    """Create a directory for key files (mode 0700) if it is missing; True if created."""
    if path.is_dir():
        return False
    path.mkdir(mode=0o700, parents=True)
    path.chmod(0o700)  # mkdir's mode is filtered by the umask
    return True


def cmd_keys_retire(args: argparse.Namespace, keyring: str, provider: Any) -> int:
    """`keys retire`: refused while the database still holds values or blind indexes
    under the key (counted per column, printed); there is no --force. A retired key still
    decrypts, so even a later restore of an older backup reads."""
    import asyncio

    from keys import cli_ops, usage
    from keys import keyring as kr
    from proxy import migrate

    ring = kr.load(keyring, provider)
    ring.retire(args.key_id)  # primary, unknown or already retired: refused before any I/O
    entry = ring.get(args.key_id)

    async def count() -> list[usage.Use]:
        cfg, enc, _ = _migration_context(args)
        conn: Any = await _direct_connection(args, cfg)
        try:
            bar = migrate.progress_bar(args.progress_every)
            return await usage.key_usage(conn, enc, ring, args.key_id, bar)
        finally:
            await conn.close()

    uses = asyncio.run(count())
    where = f"database {uses[0].database}" if uses else "the database"
    busy = [u for u in uses if u.count]
    if busy:
        column = busy[0].column
        raise CliError(
            f"key {args.key_id} ({entry.column}, {entry.purpose.value}) is still in use in "
            f"{where}: {'; '.join(u.describe() for u in busy)}; run `strongroom keys rotate "
            f"--column {column}` (once every proxy has reloaded since the promote), then "
            "retire again")
    cli_ops.retire(keyring, args.key_id, provider)
    print(f"checked {where}: {'; '.join(u.describe() for u in uses)}")
    print(f"key {args.key_id} retired (it still opens old envelopes, e.g. from a restored "
          "backup; `strongroom keys unretire` undoes this); reload every proxy (SIGHUP)")
    return 0


def _rewrap(keyring: str, old: object, to: str) -> int:
    """`keys rewrap`: the keyring re-wrapped for the KEK that `to`'s keys: section names."""
    from keys import cli_ops

    _, new_keyring, new_kek, new_provider = _keys_context(to)
    if new_provider is None:
        assert new_kek is not None
        new_provider, created = cli_ops.local_provider(new_kek)
        if created:
            print(f"created KEK file {new_kek} (mode 0600)")
    kek_id = cli_ops.rewrap(keyring, old, new_provider, new_keyring)  # type: ignore[arg-type]
    print(f"{new_keyring}: every key re-wrapped by KEK {kek_id}; switch each proxy to {to} "
          "(SIGHUP), then retire the old KEK")
    return 0


def _init_audit_key(cfg: settings_mod.Settings) -> None:
    """With `audit:` configured, create its HMAC key file (hex, 0600) unless it exists."""
    from proxy import observability

    path = observability.audit_key_path(cfg)
    if path is not None and observability.create_key_file(path):
        print(f"created audit key {path} (mode 0600; `strongroom audit verify` needs it)")


def cmd_audit_verify(args: argparse.Namespace) -> int:
    """`audit verify`: 0 complete and intact, 1 tampered, cut (--anchor) or an unusable key,
    3 intact but not provably complete (older files missing, a recorded anchor gap)."""
    from proxy.audit import read_key_file, verify_command

    key = read_key_file(args.key_file)  # OSError: one line, exit 1
    if not key:
        raise CliError(f"key file {args.key_file} is empty")
    return verify_command(args, key)


def cmd_audit_keygen(args: argparse.Namespace) -> int:
    from proxy.observability import create_key_file

    if not create_key_file(args.file):
        raise CliError(f"{args.file} exists; not overwritten")
    print(f"created audit key {args.file} (mode 0600)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand and option; tests walk it (help texts, no tracebacks)."""
    from proxy import __version__

    parser = argparse.ArgumentParser(prog="strongroom", description=__doc__)
    parser.add_argument("--version", action="version", version=f"strongroom {__version__}",
                        help="print the version and exit")
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of an error (default: one line)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the proxy")
    p.add_argument("--config", "-c", required=True, help="configuration file (YAML)")
    p.add_argument("--port", type=int, help="override listen.port")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                   help="override log_level")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("check-config", help="validate a config file")
    p.add_argument("file", help="configuration file (YAML)")
    p.add_argument("--live", action="store_true",
                   help="also check that the keyring unwraps with the KEK and that every "
                   "protected column exists and is bytea in the database (direct "
                   "connection to the upstream, or --dsn)")
    p.add_argument("--dsn", help="connect here for --live (implies --live)")
    p.add_argument("--user", "-U", help="role for --live (default $PGUSER)")
    p.add_argument("--password", help="prefer $PGPASSWORD: arguments are visible in ps")
    p.add_argument("--database", "-d", help="database for --live (default: upstream.database)")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("demo", help="throwaway PostgreSQL + proxy with the example config")
    p.add_argument("--port", type=int, default=0, help="proxy port (default: a free one)")
    p.add_argument("--seconds", type=float, default=0, help="stop after N seconds")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="Prometheus /metrics port (default: a free one; 0: off)")
    p.add_argument("--keep", action="store_true",
                   help="keep the demo directory (config, KEK, keyring, audit log) on exit")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("keys", help="manage data keys (never prints key bytes)")
    ksub = p.add_subparsers(dest="keys_command", required=True, metavar="KEYS_COMMAND")
    config_help = "configuration file whose keys: section names the KEK and keyring"
    for name, text in (("init", "create the KEK (local) and one key per protected column"),
                       ("show", "list key ids, columns, states and creation times (after "
                        "checking the keyring's MAC with the KEK)"),
                       ("seal", "authenticate (MAC) a keyring written before keyrings "
                        "carried one; check its states with `keys show --unverified` first")):
        kp = ksub.add_parser(name, help=text)
        kp.add_argument("--config", "-c", required=True, help=config_help)
        if name == "show":
            kp.add_argument("--unverified", action="store_true",
                            help="show the file as it is without checking its MAC (an "
                            "unsealed or refused keyring); says so on stderr")
    kp = ksub.add_parser("add", help="add a decrypt-only key to a column")
    kp.add_argument("--config", "-c", required=True, help=config_help)
    kp.add_argument("--column", required=True,
                    help="schema.table.column as in protect: (or joingroup.NAME.deterministic)")
    kp.add_argument("--purpose", choices=["encrypt", "blind_index"], default="encrypt",
                    help="what the key is for (default: encrypt)")
    kp = ksub.add_parser("promote", help="make a decrypt-only key its column's primary")
    kp.add_argument("--config", "-c", required=True, help=config_help)
    kp.add_argument("key_id", type=int, help="key id (`strongroom keys show`)")
    kp = ksub.add_parser("retire", help="retire a decrypt-only key once no stored value or "
                         "blind index uses it (checked in the database; it still decrypts)")
    _direct_connection_args(kp)
    kp.add_argument("key_id", type=int, help="key id (`strongroom keys show`)")
    kp.add_argument("--progress-every", type=float, default=5.0, metavar="SECONDS",
                    help="without a terminal, log progress this often (default 5)")
    kp = ksub.add_parser("unretire", help="make a retired key decrypt-only again (a retire "
                         "made by mistake)")
    kp.add_argument("--config", "-c", required=True, help=config_help)
    kp.add_argument("key_id", type=int, help="key id (`strongroom keys show`)")
    kp = ksub.add_parser("rewrap", help="re-wrap every data key under another KEK (KEK "
                         "rotation or a provider move); stored values are untouched")
    kp.add_argument("--config", "-c", required=True, help="the current configuration")
    kp.add_argument("--to", required=True, metavar="NEW_CONFIG",
                    help="configuration whose keys: section names the new KEK provider and "
                    "the keyring file to write (a local KEK file is created if missing)")
    p.set_defaults(func=cmd_keys)
    _add_migration_commands(sub, ksub)

    p = sub.add_parser("audit", help="audit log tools (verify, keygen)")
    asub = p.add_subparsers(dest="audit_command", required=True, metavar="AUDIT_COMMAND")
    ap = asub.add_parser("verify", help="verify the HMAC chain of audit log files")
    from proxy.audit import add_verify_arguments

    add_verify_arguments(ap)
    ap.set_defaults(func=cmd_audit_verify)
    ap = asub.add_parser("keygen", help="create a new audit key file (hex, mode 0600)")
    ap.add_argument("file", metavar="FILE", help="where to write the key; never overwritten")
    ap.set_defaults(func=cmd_audit_keygen)
    return parser


class CliError(Exception):
    """An expected failure of a command: one line on stderr, exit status 1."""


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Failures an operator causes (wrong id, missing file, no database): reported as one
    line. Their messages name files, columns and ids, never values or key bytes."""
    import asyncpg

    from keys.keyring import KeyringError
    from keys.providers.base import ProviderError, UnwrapError
    from keys.usage import UsageUnknown
    from proxy.encryption import DatabaseNotBindable
    from proxy.migrate import MigrationError

    return (CliError, KeyringError, ProviderError, UnwrapError, UsageUnknown, MigrationError,
            DatabaseNotBindable, OSError, asyncpg.InterfaceError)


def _error_line(exc: BaseException, args: argparse.Namespace) -> str:
    """One line for stderr. PostgreSQL errors: the primary message only (DETAIL is where
    the server quotes row values). Passwords the command was given are masked."""
    import asyncpg

    if isinstance(exc, settings_mod.ConfigError):
        text = "; ".join(exc.problems)
    elif isinstance(exc, asyncpg.PostgresError):
        text = f"PostgreSQL error {exc.sqlstate}: {exc.args[0] if exc.args else exc}"
    elif isinstance(exc, OSError) and exc.strerror and exc.filename:
        text = f"{exc.filename}: {exc.strerror}"
    else:
        text = str(exc) or type(exc).__name__
    for secret in _passwords(args):
        text = text.replace(secret, "***")
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    """Run one command. Expected errors are one line on stderr and exit status 1; usage
    errors exit 2 (argparse); a traceback is shown only with --debug."""
    import asyncpg

    args = build_parser().parse_args(argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    name = " ".join(x for x in (args.command, getattr(args, "keys_command", None),
                                getattr(args, "audit_command", None)) if x)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"strongroom {name}: interrupted", file=sys.stderr)
        return 130
    except (settings_mod.ConfigError, asyncpg.PostgresError, *_expected_errors()) as exc:
        if args.debug:
            raise
        print(f"strongroom {name}: {_error_line(exc, args)}", file=sys.stderr)
        return 1
    except Exception as exc:
        if args.debug:
            raise
        # an unexpected failure: its message may quote anything, so only its type
        print(f"strongroom {name}: internal error ({type(exc).__name__}); rerun with --debug "
              "for the traceback and report it", file=sys.stderr)
        return 1


# ------------------------------------------------------------ column migration / rotation


def _direct_connection_args(p: argparse.ArgumentParser) -> None:
    """Options of the commands that connect to PostgreSQL directly (never via the proxy)."""
    p.add_argument("--config", "-c", required=True,
                   help="configuration file (protect:, keys:, upstream:)")
    p.add_argument("--dsn", help="connect here (default: the config's upstream host/port)")
    p.add_argument("--user", "-U", help="role for the direct connection (default $PGUSER)")
    p.add_argument("--password", help="prefer $PGPASSWORD: arguments are visible in ps")
    p.add_argument("--database", "-d", help="database (default: upstream.database)")


def _add_migration_commands(sub: argparse._SubParsersAction, ksub: argparse._SubParsersAction,
                            ) -> None:
    """`encrypt-column`, `decrypt-column` and `keys rotate` (proxy/migrate.py, keys/rotation.py).

    Kept out of build_parser() so the three commands are wired by one line there."""

    def connection_args(p: argparse.ArgumentParser) -> None:
        _direct_connection_args(p)
        p.add_argument("--batch", type=int, default=1000, help="rows per transaction")
        p.add_argument("--lock-timeout", type=float, default=10.0,
                       help="seconds to wait for table locks (DDL, swap)")
        p.add_argument("--max-batches", type=int, metavar="N",
                       help="stop after N batches (work in slices); a rerun continues")
        p.add_argument("--progress-every", type=float, default=5.0, metavar="SECONDS",
                       help="without a terminal, log progress this often (default 5)")

    for name, text in (
        ("encrypt-column", "convert a live plaintext column to the encrypted layout"),
        ("decrypt-column", "convert an encrypted column back to its logical type"),
    ):
        p = sub.add_parser(name, help=text)
        connection_args(p)
        p.add_argument("column", help="schema.table.column, as in protect:")
        p.add_argument("--vacuum-full", action="store_true",
                       help="VACUUM FULL the table after the swap (removes old values from "
                       "the heap; takes an exclusive lock for the rewrite)")
        p.set_defaults(func=cmd_migrate_column, encrypt=name == "encrypt-column")
    kp = ksub.add_parser("rotate", help="re-encrypt a column's values under its primary key")
    connection_args(kp)
    kp.add_argument("--column", required=True, help="schema.table.column, as in protect:")
    kp.add_argument("--reindex", action="store_true",
                    help="recompute every blind index (automatic while the column has more "
                    "than one live blind-index key)")
    kp.set_defaults(func=cmd_keys_rotate)


def _migration_context(args: argparse.Namespace) -> tuple[settings_mod.Settings, object, str]:
    """Settings, an Encryption built from the config's keyring, and the config's directory."""
    from proxy.encryption import Encryption

    cfg = settings_mod.load(args.config)
    keys_cfg = cfg.raw.get("keys") or {}
    if not keys_cfg:
        raise CliError(f"{args.config}: no `keys:` section; add one (see "
                       "config/strongroom.example.yaml)")
    base = str(Path(args.config).resolve().parent)
    return cfg, Encryption(cfg.raw.get("protect") or {}, keys_cfg, base, None), base


async def _direct_connection(args: argparse.Namespace, cfg: settings_mod.Settings) -> object:
    """asyncpg connection straight to PostgreSQL (never through the proxy)."""
    from proxy import migrate

    if args.dsn:
        return await migrate.connect(args.dsn, user=args.user, password=args.password,
                                     database=args.database)
    database = args.database or cfg.upstream.database
    if not database:
        raise migrate.MigrationError("no database: pass --database or --dsn")
    return await migrate.connect(
        host=cfg.upstream.host, port=cfg.upstream.port, user=args.user,
        password=args.password or os.environ.get("PGPASSWORD"), database=database,
        ssl=cfg.upstream_ssl_context() or False, timeout=cfg.upstream.connect_timeout,
    )


def _run_migration_tool(args: argparse.Namespace, body: object) -> int:
    """Runs a migration coroutine. A deliberate stop (--max-batches) exits 3, Ctrl-C 130;
    every other error reaches main()'s one-line report."""
    import asyncio

    from proxy import migrate

    try:
        return int(asyncio.run(body))  # type: ignore[arg-type]
    except migrate.Interrupted as exc:
        print(f"interrupted: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted; committed batches are kept, rerun to continue", file=sys.stderr)
        return 130


def _column_key(encryption: object, column: str) -> tuple[str, str, str]:
    from proxy import migrate

    parts = tuple(column.split("."))
    if len(parts) != 3 or parts not in encryption.specs:  # type: ignore[attr-defined]
        raise migrate.MigrationError(
            f"{column} is not in the config's protect: section (schema.table.column); "
            "add it there and run `strongroom keys init` first"
        )
    return parts  # type: ignore[return-value]


async def _bound_runtime(conn: object, enc: object, key: tuple[str, str, str]) -> object:
    """The column as the proxy seals it in the database `conn` is connected to (the
    server's `current_database()`, mapped by `keys.database_binding.bind_as`), so what an
    offline tool writes opens through the proxy there and nowhere else."""
    from proxy.encryption import observed_database

    database = await observed_database(conn)
    return enc.columns_for(database, upgrading=True)[key]  # type: ignore[attr-defined]


def cmd_migrate_column(args: argparse.Namespace) -> int:
    """encrypt-column / decrypt-column: batches, resumable, swap in one transaction."""
    from proxy import migrate

    async def body() -> int:
        cfg, enc, _ = _migration_context(args)
        key = _column_key(enc, args.column)
        conn = await _direct_connection(args, cfg)
        try:
            rt = await _bound_runtime(conn, enc, key)
            run = migrate.encrypt_column if args.encrypt else migrate.decrypt_column
            out = await run(conn, rt, batch=args.batch,  # type: ignore[arg-type]
                            max_batches=args.max_batches,
                            bar=migrate.progress_bar(args.progress_every),
                            lock_timeout=args.lock_timeout, vacuum_full=args.vacuum_full)
        finally:
            await conn.close()  # type: ignore[attr-defined]
        verb = "encrypted" if args.encrypt else "decrypted"
        if out.already_done:
            print(f"{out.column} is already {verb}; nothing to do")
            return 0
        print(f"{out.column}: {verb}, {out.converted} rows converted by this run in "
              f"{out.batches} batches, swapped in")
        if args.encrypt:
            print("next: reload every proxy with this column in protect: (SIGHUP)")
        else:
            print("next: remove the column from protect: and reload every proxy (SIGHUP)")
        if not args.vacuum_full:
            print("old values remain in the table's pages until VACUUM FULL (or pg_repack), "
                  "and in WAL and backups until they expire", file=sys.stderr)
        return 0

    return _run_migration_tool(args, body())


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    """keys rotate: re-encrypt values not under the primary, recompute stale blind indexes."""
    from keys import keyring as kr
    from keys import rotation
    from proxy import migrate
    from proxy.encryption import key_name

    async def body() -> int:
        cfg, enc, _ = _migration_context(args)
        key = _column_key(enc, args.column)
        ident = key_name(key, enc.options[key])  # type: ignore[attr-defined]
        ring = enc.ring  # type: ignore[attr-defined]  # (authenticated when loaded)
        primary = ring.primary(ident, "encrypt")
        assert primary is not None  # Encryption() refused a column without one
        live_bidx = [e for e in ring.entries_for(ident, "blind_index")
                     if e.state is not kr.KeyState.RETIRED]
        reindex = args.reindex or len(live_bidx) > 1
        conn = await _direct_connection(args, cfg)
        try:
            rt = await _bound_runtime(conn, enc, key)
            out = await rotation.rotate_column(
                conn, rt, primary.id, batch=args.batch, reindex=reindex,  # type: ignore[arg-type]
                max_batches=args.max_batches, bar=migrate.progress_bar(args.progress_every),
            )
        finally:
            await conn.close()  # type: ignore[attr-defined]
        print(f"{out.column}: examined {out.examined}, rewrote {out.rewritten} in "
              f"{out.batches} batches; primary key {out.primary_id}")
        if out.remaining:
            print(f"{out.remaining} values are still under other keys or not bound to this "
                  "database (written by a proxy that has not reloaded or upgraded?); reload "
                  "every proxy and rerun", file=sys.stderr)
            return 1
        old = [e.id for e in ring.entries_for(ident, "encrypt")
               if e.state is kr.KeyState.DECRYPT_ONLY]
        if reindex:
            old += [e.id for e in live_bidx if e.state is kr.KeyState.DECRYPT_ONLY]
        if ident.startswith("joingroup."):
            others = sorted(".".join(k) for k in enc.specs  # type: ignore[attr-defined]
                            if k != key and key_name(k, enc.options[k]) == ident)  # type: ignore[attr-defined]
            if others:
                print(f"key {ident} is shared with {', '.join(others)}: rotate those too "
                      "before retiring", file=sys.stderr)
        if old:
            print(f"no value of {out.column} uses keys {', '.join(map(str, old))} any more: "
                  "`strongroom keys retire <id>` can follow (it checks every column "
                  "sharing the key first)")
        return 0

    return _run_migration_tool(args, body())


if __name__ == "__main__":
    sys.exit(main())
