"""`upstream.tls`: a named CA is used or refused, never ignored (issue 17, section 7).

libpq's sslmode=require verifies the server's chain when a root certificate is present
(it then behaves as verify-ca); Strongroom's `require` ignored `ca_file` silently. Now
`require` + `ca_file` verifies against it, `verify-ca` exists, and a `ca_file` that could
not take effect (mode disable, or not a CA bundle) is refused by the config check. The
handshake itself is tested against a real TLS PostgreSQL in test_protocol_startup.
"""

from __future__ import annotations

import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from proxy import devcluster, settings
from tests.conftest import ROOT


def _config(tmp_path: Path, tls: str) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text("listen: {host: 127.0.0.1, port: 6432}\n"
                    "upstream:\n  host: 127.0.0.1\n  port: 5432\n"
                    f"  tls: {tls}\n")
    return path


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    return devcluster.make_self_signed(tmp_path)[0]


@pytest.mark.parametrize(("mode", "hostname"), [("require", False), ("verify-ca", False),
                                                ("verify-full", True)])
def test_a_ca_file_makes_every_mode_verify_the_chain(tmp_path: Path, ca: Path, mode: str,
                                                     hostname: bool) -> None:
    cfg = settings.load(_config(tmp_path, f"{{mode: {mode}, ca_file: {ca}}}"))
    ctx = cfg.upstream_ssl_context()
    assert ctx is not None and ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.check_hostname is hostname
    assert len(ctx.get_ca_certs()) == 1  # the named CA, not the system's


def test_require_without_a_ca_only_encrypts(tmp_path: Path) -> None:
    ctx = settings.load(_config(tmp_path, "{mode: require}")).upstream_ssl_context()
    assert ctx is not None and ctx.verify_mode == ssl.CERT_NONE


def test_a_ca_file_with_mode_disable_is_refused_with_its_line(tmp_path: Path, ca: Path) -> None:
    path = _config(tmp_path, f"{{mode: disable, ca_file: {ca}}}")
    with pytest.raises(settings.ConfigError) as exc:
        settings.load(path)
    (line,) = exc.value.problems
    assert line.startswith(f"{path}:5: upstream.tls.ca_file:") and "mode is disable" in line
    res = subprocess.run([sys.executable, "-m", "proxy.cli", "check-config", str(path)],
                         cwd=str(ROOT), capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "mode is disable" in res.stdout, res.stdout


def test_a_ca_file_that_is_no_ca_bundle_is_refused(tmp_path: Path) -> None:
    bogus = tmp_path / "root.crt"
    bogus.write_text("not a certificate\n")
    with pytest.raises(settings.ConfigError) as exc:
        settings.load(_config(tmp_path, f"{{mode: require, ca_file: {bogus}}}"))
    assert "not a usable CA bundle" in exc.value.problems[0]
