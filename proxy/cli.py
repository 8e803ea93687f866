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
    """Throwaway PostgreSQL + the proxy with the example config; Ctrl-C stops both."""
    from proxy import devcluster

    setup_logging("info")
    print("starting a throwaway PostgreSQL ...", flush=True)
    cluster = devcluster.create()
    cluster.psql("CREATE ROLE app LOGIN PASSWORD 'app-secret'")
    cluster.psql("CREATE DATABASE appdb OWNER app")
    workdir = Path(tempfile.mkdtemp(prefix="strongroom-demo-"))
    proxy_port = args.port or devcluster.free_port()
    text = EXAMPLE_CONFIG.read_text()
    cfg_path = workdir / "strongroom.yaml"
    cfg_path.write_text(
        text.replace("port: 6432", f"port: {proxy_port}").replace(
            "port: 5432", f"port: {cluster.port}"
        ).replace("port: 9187", "port: 0")
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "serve", "--config", str(cfg_path)],
        cwd=str(Path(__file__).resolve().parent.parent),
    )
    try:
        devcluster.wait_port("127.0.0.1", proxy_port)
        print(
            "\nStrongroom is up. Connect through it with:\n\n"
            f"  PGPASSWORD=app-secret psql -h 127.0.0.1 -p {proxy_port} -U app appdb\n\n"
            f"PostgreSQL itself listens on 127.0.0.1:{cluster.port}. Ctrl-C stops both.",
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
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        cluster.destroy()
        print("demo stopped", flush=True)
    return 0


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
    p.set_defaults(func=cmd_demo)

    args = parser.parse_args(argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
