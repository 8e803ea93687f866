"""First start of a container: create the keys a configuration needs and does not have yet.

`docker/entrypoint.sh` runs `python -m proxy.bootstrap` before it execs `strongroom serve`,
so `docker compose up` on empty volumes starts instead of crash-looping on a missing
keyring or audit key. Each action is said on stdout, one line each, so the first start is
visible in `docker compose logs`.

What it does, and why it stops there:

* The keyring exists: it is used as it is. If the configured local KEK file is missing
  next to it, nothing is created and the start fails: a new KEK could not unwrap the
  existing data keys, and inventing one would hide a lost volume until the first read.
* The keyring is missing: with the `local` provider the KEK file is created when absent
  (0600, directory 0700) - the only provider whose KEK this process may create; `env`,
  `pkcs11` and `aws_kms` keep their KEK outside and must already provide it. Then a keyring
  with one key per protected column is written.
* `audit:` is configured and its key file is missing: a fresh key is written (0600).

Nothing that exists is ever replaced.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from proxy import settings as settings_mod

DEFAULT_CONFIG = "/etc/strongroom/strongroom.yaml"


class BootstrapError(Exception):
    """The configured state cannot be completed without risking data; one line for ops."""


def _private_dir(path: Path) -> None:
    """Create a key directory readable by its owner only (an existing one is left as is)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


def _keys(cfg: settings_mod.Settings, base: Path) -> list[str]:
    from keys import cli_ops
    from proxy.encryption import make_provider, protect_columns_for_keys, resolve

    keys_cfg = cfg.raw.get("keys") or {}
    if not keys_cfg:
        return []
    keyring = Path(resolve(str(base), keys_cfg["keyring"]))
    local = keys_cfg.get("provider", "local") == "local"
    kek = Path(resolve(str(base), keys_cfg["path"])) if local else None
    if keyring.exists():
        if kek is not None and not kek.exists():
            raise BootstrapError(
                f"keyring {keyring} exists but its KEK file {kek} does not: restore the KEK "
                "(from the volume's backup); a new KEK could not unwrap the keyring, so none "
                "is created"
            )
        return [f"keyring {keyring} exists: keys reused"]
    done = []
    if kek is not None:
        _private_dir(kek.parent)
        provider, created = cli_ops.local_provider(kek)
        done.append(f"created KEK {kek} (mode 0600)" if created else f"KEK {kek} exists: reused")
    else:
        provider = make_provider(keys_cfg, str(base))
        done.append(f"KEK from provider {keys_cfg['provider']} (never created here)")
    _private_dir(keyring.parent)
    rows = cli_ops.init(kek, keyring, protect_columns_for_keys(cfg.raw.get("protect") or {}),
                        provider=provider)
    done.append(f"created keyring {keyring} ({len(rows)} data keys)")
    return done


def _audit_key(cfg: settings_mod.Settings) -> list[str]:
    from proxy import observability

    path = observability.audit_key_path(cfg)
    if path is None:
        return []
    _private_dir(path.parent)
    if observability.create_key_file(path):
        return [f"created audit key {path} (mode 0600; `strongroom audit verify` needs it)"]
    return [f"audit key {path} exists: reused"]


def first_start(config: str | os.PathLike[str]) -> list[str]:
    """Create the missing KEK (local), keyring and audit key of `config`; what was done."""
    cfg = settings_mod.load(config)
    base = Path(config).resolve().parent
    return _keys(cfg, base) + _audit_key(cfg)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m proxy.bootstrap [--config FILE]`: 0 ready to serve, 1 not (one line why)."""
    ap = argparse.ArgumentParser(
        prog="python -m proxy.bootstrap",
        description="Create the local KEK, keyring and audit key a configuration needs when "
        "they do not exist yet (container first start); never replaces anything.",
    )
    ap.add_argument("--config", "-c", default=os.environ.get("STRONGROOM_CONFIG", DEFAULT_CONFIG),
                    help="configuration file (default: $STRONGROOM_CONFIG or %(default)s)")
    args = ap.parse_args(argv)
    from keys.keyring import KeyringError
    from keys.providers.base import ProviderError

    try:
        done = first_start(args.config)
    except settings_mod.ConfigError as exc:
        for line in exc.problems:
            print(f"strongroom bootstrap: {line}", file=sys.stderr)
        return 1
    except (BootstrapError, KeyringError, ProviderError, OSError) as exc:
        print(f"strongroom bootstrap: {exc}", file=sys.stderr)
        return 1
    for line in done:
        print(f"strongroom bootstrap: {line}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
