"""A group- or world-readable audit key is refused, not warned about (issue 17, section 3).

Whoever can read the audit key can recompute every MAC of the chain, so a key other
local users can read means a trail they can rewrite unnoticed. `serve` does not start,
and `check-config` says so first, with the file and line of `audit.key_file`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from proxy import observability as obs
from proxy.settings import ConfigError, load
from tests.conftest import ROOT

CONFIG = """\
listen: {host: 127.0.0.1, port: 1}
upstream: {host: 127.0.0.1, port: 1}
audit:
  path: audit.jsonl
  key_file: audit.key
"""


def layout(tmp_path: Path, mode: int) -> tuple[Path, Path]:
    cfg = tmp_path / "s.yaml"
    cfg.write_text(CONFIG, encoding="utf-8")
    key = tmp_path / "audit.key"
    assert obs.create_key_file(key)
    key.chmod(mode)
    return cfg, key


def strongroom(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "proxy.cli", *args], cwd=str(cwd),
                          capture_output=True, text=True, timeout=60, env=env)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o650, 0o666])
def test_a_key_others_can_reach_is_refused(tmp_path: Path, mode: int) -> None:
    cfg, key = layout(tmp_path, mode)
    with pytest.raises(ConfigError) as exc:
        obs.build_audit(load(cfg))
    assert exc.value.problems == [
        f"{cfg}:5: audit.key_file: {key} is accessible by group or others (mode "
        f"{mode:04o}): anyone who can read it can rewrite the audit trail unnoticed; "
        f"chmod 600 {key}"
    ]
    assert not (tmp_path / "audit.jsonl").exists()  # nothing written under that key


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_a_private_key_is_used(tmp_path: Path, mode: int) -> None:
    cfg, _ = layout(tmp_path, mode)
    log = obs.build_audit(load(cfg))
    assert log is not None
    log.close()


def test_serve_does_not_start_and_check_config_says_so(tmp_path: Path) -> None:
    cfg, key = layout(tmp_path, 0o644)
    expected = f"{cfg}:5: audit.key_file: {key} is accessible by group or others"
    res = strongroom("check-config", str(cfg), cwd=tmp_path)
    assert res.returncode == 1, res.stdout + res.stderr
    assert res.stdout.startswith(expected), res.stdout
    res = strongroom("serve", "-c", str(cfg), cwd=tmp_path)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    assert res.stderr.startswith(expected), res.stderr
    assert not (tmp_path / "audit.jsonl").exists()
    key.chmod(0o600)
    res = strongroom("check-config", str(cfg), cwd=tmp_path)
    assert res.returncode == 0 and ": OK (" in res.stdout, res.stdout + res.stderr
