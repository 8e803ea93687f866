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
from pathlib import Path

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


def cmd_serve(args: argparse.Namespace) -> int:
    from proxy.server import serve

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
    return serve(cfg, args.config)


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        cfg = settings_mod.load(args.file)
    except settings_mod.ConfigError as exc:
        for line in exc.problems:
            print(line)
        return 1
    print(f"{args.file}: OK (listen {cfg.listen.host}:{cfg.listen.port}, "
          f"upstream {cfg.upstream.host}:{cfg.upstream.port})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Throwaway PostgreSQL with a sample fintech schema, keys, and the proxy running the
    example configuration (encryption + policy). Ctrl-C stops both."""
    import yaml

    from keys import cli_ops
    from proxy import devcluster
    from proxy.encryption import protect_columns_for_keys

    setup_logging("info")
    print("starting a throwaway PostgreSQL ...", flush=True)
    cluster = devcluster.create()
    workdir = Path(tempfile.mkdtemp(prefix="strongroom-demo-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        cluster.psql("CREATE DATABASE app")
        schema_sql = Path(__file__).resolve().parent.parent / "docker" / "init" / "01-schema.sql"
        cluster.psql(schema_sql.read_text(), db="app")
        proxy_port = args.port or devcluster.free_port()
        cfg = yaml.safe_load(EXAMPLE_CONFIG.read_text())
        cfg["listen"]["port"] = proxy_port
        cfg["upstream"]["port"] = cluster.port
        cfg["metrics"]["port"] = args.metrics_port
        cfg_path = workdir / "strongroom.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        (workdir / "keys").mkdir(mode=0o700)
        cli_ops.init(workdir / "keys" / "dev.kek", workdir / "keys" / "keyring.json",
                     protect_columns_for_keys(cfg["protect"]))
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "serve", "--config", str(cfg_path)],
            cwd=str(Path(__file__).resolve().parent.parent),
        )
        devcluster.wait_port("127.0.0.1", proxy_port, timeout=30)
        print(
            "\nStrongroom is up (config: " + str(cfg_path) + "). Connect through it:\n\n"
            f"  PGPASSWORD=app-secret psql -h 127.0.0.1 -p {proxy_port} -U app app\n"
            f"  PGPASSWORD=support-secret psql -h 127.0.0.1 -p {proxy_port} -U support_agent app\n"
            f"  PGPASSWORD=etl-secret psql -h 127.0.0.1 -p {proxy_port} -U etl_backup app\n\n"
            "Try, as app:\n"
            "  INSERT INTO customers (name, tax_id) VALUES ('Ann', 'DE123') RETURNING id;\n"
            "  INSERT INTO cards (customer_id, pan, expiry) VALUES (1, '4111111111111111',"
            " '2030-01-31');\n"
            "  SELECT * FROM cards WHERE pan = '4111111111111111';\n"
            "then the same SELECT as support_agent (masked) and etl_backup (ciphertext),\n"
            f"and directly: psql -h {cluster.base} -p {cluster.port} -U postgres app "
            "(only ciphertext at rest).\nCtrl-C stops both.",
            flush=True,
        )
        if args.seconds:
            time.sleep(args.seconds)
        else:
            while proc.poll() is None:
                time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        cluster.destroy()
        print("demo stopped", flush=True)
    return 0


def _keys_context(config: str) -> tuple[settings_mod.Settings, str, str | None, object]:
    """Settings, keyring path, local KEK path and provider for the `keys` commands."""
    from proxy.encryption import make_provider, resolve

    cfg = settings_mod.load(config)
    keys_cfg = cfg.raw.get("keys") or {}
    if not keys_cfg:
        raise SystemExit(f"{config}: no `keys:` section")
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
    from proxy.encryption import make_provider, protect_columns_for_keys

    try:
        cfg, keyring, kek, provider = _keys_context(args.config)
    except settings_mod.ConfigError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return 1
    if args.keys_command == "init":
        columns = protect_columns_for_keys(cfg.raw.get("protect") or {})
        _print_keys(cli_ops.init(kek, keyring, columns, provider=provider))  # type: ignore[arg-type]
        return 0
    if args.keys_command == "show":
        _print_keys(cli_ops.show(keyring))
        return 0
    if provider is None:
        provider = make_provider(cfg.raw["keys"], str(Path(args.config).resolve().parent))
    if args.keys_command == "add":
        key_id = cli_ops.add(keyring, provider, args.column, args.purpose)  # type: ignore[arg-type]
        print(f"added key {key_id} for {args.column} ({args.purpose}), decrypt-only; "
              "reload every proxy, then promote it")
    elif args.keys_command == "promote":
        cli_ops.promote(keyring, args.key_id)
        print(f"key {args.key_id} is now primary; reload every proxy (SIGHUP)")
    elif args.keys_command == "retire":
        cli_ops.retire(keyring, args.key_id)
        print(f"key {args.key_id} retired")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from proxy.audit import audit_verify_main

    rest = list(args.rest)
    if rest[:1] != ["verify"]:
        print("usage: strongroom audit verify FILE... --key-file K", file=sys.stderr)
        return 2
    return int(audit_verify_main(rest[1:]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="strongroom", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the proxy")
    p.add_argument("--config", "-c", required=True)
    p.add_argument("--port", type=int, help="override listen.port")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("check-config", help="validate a config file")
    p.add_argument("file")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("demo", help="throwaway PostgreSQL + proxy with the example config")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--seconds", type=float, default=0, help="stop after N seconds")
    p.add_argument("--metrics-port", type=int, default=0, help="Prometheus port (0: off)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("keys", help="manage data keys (never prints key bytes)")
    ksub = p.add_subparsers(dest="keys_command", required=True)
    for name, text in (("init", "create the KEK (local) and one key per protected column"),
                       ("show", "list key ids, columns, states and creation times")):
        kp = ksub.add_parser(name, help=text)
        kp.add_argument("--config", "-c", required=True)
    kp = ksub.add_parser("add", help="add a decrypt-only key to a column")
    kp.add_argument("--config", "-c", required=True)
    kp.add_argument("--column", required=True)
    kp.add_argument("--purpose", choices=["encrypt", "blind_index"], default="encrypt")
    for name in ("promote", "retire"):
        kp = ksub.add_parser(name, help=f"{name} a key")
        kp.add_argument("--config", "-c", required=True)
        kp.add_argument("key_id", type=int)
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("audit", help="audit log tools: `audit verify FILE... --key-file K`")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_audit)

    args = parser.parse_args(argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
