"""A throwaway PostgreSQL cluster for the demo and the test suite.

initdb into a temporary directory, SCRAM authentication, a random free port, optional
TLS with a self-signed certificate made by `cryptography`. PostgreSQL refuses to run as
root, so when we are root every server command runs as the `postgres` user via runuser.
"""

from __future__ import annotations

import datetime
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


class ClusterError(RuntimeError):
    pass


def find_bindir() -> Path:
    """Directory holding initdb/pg_ctl: $PG_BINDIR, pg_config, or Debian's layout."""
    env = os.environ.get("PG_BINDIR")
    if env and (Path(env) / "initdb").exists():
        return Path(env)
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        cand = Path(out.stdout.strip())
        if (cand / "initdb").exists():
            return cand
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    if found:
        return Path(found[0]).parent
    if shutil.which("initdb"):
        return Path(shutil.which("initdb")).parent  # type: ignore[arg-type]
    raise ClusterError("PostgreSQL server binaries (initdb) not found; install postgresql")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_self_signed(directory: Path, common_name: str = "localhost") -> tuple[Path, Path]:
    """A CA-less self-signed certificate valid for localhost and 127.0.0.1."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    crt = directory / f"{common_name}.crt"
    key_path = directory / f"{common_name}.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    os.chmod(key_path, 0o600)
    return crt, key_path


@dataclass
class Cluster:
    """A running (or stopped) throwaway cluster. Superuser `postgres`, password below."""

    base: Path
    port: int
    password: str = "postgres-secret"
    tls: bool = False
    bindir: Path = field(default_factory=find_bindir)
    extra_conf: dict[str, str] = field(default_factory=dict)

    @property
    def datadir(self) -> Path:
        return self.base / "data"

    @property
    def logfile(self) -> Path:
        return self.base / "postgres.log"

    @property
    def cert(self) -> Path:
        return self.base / "localhost.crt"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if check and res.returncode != 0:
            raise ClusterError(f"{args[0]} failed: {res.stderr.strip() or res.stdout.strip()}")
        return res

    def init(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        pwfile = self.base / "pw"
        pwfile.write_text(self.password + "\n")
        if os.geteuid() == 0:
            shutil.chown(self.base, "postgres", "postgres")
            shutil.chown(pwfile, "postgres", "postgres")
        self._run(
            "initdb", "-D", str(self.datadir), "-U", "postgres", "--auth=scram-sha-256",
            f"--pwfile={pwfile}", "-E", "UTF8", "--locale=C", "--no-sync",
        )
        conf = {
            "port": str(self.port),
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{self.base}'",
            "max_connections": "300",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "shared_buffers": "128MB",
            "log_min_messages": "warning",
            "password_encryption": "'scram-sha-256'",
        }
        if self.tls:
            crt, key = make_self_signed(self.base)
            if os.geteuid() == 0:
                shutil.chown(crt, "postgres", "postgres")
                shutil.chown(key, "postgres", "postgres")
            conf |= {"ssl": "on", "ssl_cert_file": f"'{crt}'", "ssl_key_file": f"'{key}'"}
        conf |= self.extra_conf
        with open(self.datadir / "postgresql.conf", "a", encoding="utf-8") as fh:
            for k, v in conf.items():
                fh.write(f"{k} = {v}\n")
        hba = "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n"
        if os.geteuid() == 0:
            # runuser created the file as postgres; write through a fresh handle.
            pass
        (self.datadir / "pg_hba.conf").write_text(hba)

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.datadir), "-l", str(self.logfile), "-w",
                  "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "stop", check=False)

    def restart(self) -> None:
        self._run("pg_ctl", "-D", str(self.datadir), "-l", str(self.logfile), "-m", "fast",
                  "-w", "-t", "60", "restart")

    def psql(self, sql: str, db: str = "postgres") -> str:
        """Run SQL as superuser over the unix socket (trust), return stdout."""
        res = self._run("psql", "-h", str(self.base), "-p", str(self.port), "-U", "postgres",
                        "-d", db, "-v", "ON_ERROR_STOP=1", "-XAtqc", sql)
        return res.stdout

    def dsn(self, user: str = "postgres", password: str | None = None, db: str = "postgres",
            host: str = "127.0.0.1", port: int | None = None) -> str:
        pw = self.password if password is None else password
        return f"postgresql://{user}:{pw}@{host}:{port or self.port}/{db}"

    def log_tail(self, lines: int = 50) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)


def create(tls: bool = False, extra_conf: dict[str, str] | None = None,
           base: Path | None = None) -> Cluster:
    base = base or Path(tempfile.mkdtemp(prefix="strongroom-pg-"))
    os.chmod(base, 0o755)
    cluster = Cluster(base=base, port=free_port(), tls=tls, extra_conf=extra_conf or {})
    cluster.init()
    cluster.start()
    return cluster


def wait_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise ClusterError(f"{host}:{port} did not start listening within {timeout}s")
