"""`protect:` options that are valid one by one but not together (issue 17, section 5).

`join_group` shares one deterministic key between columns so that equal values join. On
a randomized column it used to be accepted, and the column was then keyed and bound (in
its associated data) to `joingroup.X.deterministic` instead of to itself: it cannot be
joined on, and its envelopes open in any other column of the group. It is refused at
load, with the file and line, by `check-config` and `serve` alike.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from proxy import settings
from proxy.encryption import Encryption, EncryptionConfigError
from tests.conftest import ROOT

CONFIG = """\
upstream: {{host: 127.0.0.1, port: 5432}}
keys: {{provider: local, path: keys/dev.kek, keyring: keys/keyring.json}}
protect:
  public.accounts.iban: {{type: text, mode: deterministic, join_group: iban}}
  public.transfers.iban:
    type: text
{mode}    join_group: iban
"""


@pytest.mark.parametrize("mode", ["    mode: randomized\n", ""], ids=["randomized", "default"])
def test_join_group_on_a_randomized_column_is_refused_with_its_line(mode: str) -> None:
    with pytest.raises(settings.ConfigError) as exc:
        settings.parse_text(CONFIG.format(mode=mode), "s.yaml")
    line = 7 + (1 if mode else 0)
    assert exc.value.problems == [
        f"s.yaml:{line}: protect.public.transfers.iban.join_group: join_group 'iban' needs"
        " mode: deterministic (this column is randomized); randomized columns cannot be"
        " joined on, remove join_group or make the column deterministic"
    ]


def test_join_group_on_deterministic_columns_loads() -> None:
    cfg = settings.parse_text(CONFIG.format(mode="    mode: deterministic\n"), "s.yaml")
    assert cfg.raw["protect"]["public.transfers.iban"]["join_group"] == "iban"


def test_encryption_refuses_it_before_touching_keys(tmp_path: Path) -> None:
    """A configuration built in code (no YAML lines) is refused too, before any key file
    is read (there is none here)."""
    protect = {"public.t.c": {"type": "text", "mode": "randomized", "join_group": "g"}}
    with pytest.raises(EncryptionConfigError) as exc:
        Encryption(protect, {"provider": "local", "path": str(tmp_path / "none.kek"),
                             "keyring": str(tmp_path / "none.json")}, str(tmp_path), None)
    assert exc.value.problems[0].startswith("protect.public.t.c.join_group: join_group 'g'")


def test_check_config_says_so(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(CONFIG.format(mode="    mode: randomized\n"), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-m", "proxy.cli", "check-config", str(path)],
                         cwd=str(tmp_path), capture_output=True, text=True, timeout=60,
                         env=env)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    assert res.stdout.startswith(f"{path}:8: protect.public.transfers.iban.join_group: "
                                 "join_group 'iban' needs mode: deterministic")
