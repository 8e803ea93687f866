"""The proxy's configuration: an immutable Settings object built from YAML.

Loading validates against `config/strongroom.schema.json` and reports every problem as
`file:line: message`, so ops can fix a broken file without guessing. A reload (SIGHUP)
builds a new Settings and swaps it in whole; a broken file leaves the old one in force.
"""

from __future__ import annotations

import json
import os
import re
import ssl
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import yaml

# Shipped inside the package (package data) so an installed proxy finds it; in the source
# tree it is a symlink to config/strongroom.schema.json, the file people edit.
SCHEMA_PATH = Path(__file__).resolve().parent / "strongroom.schema.json"


class ConfigError(Exception):
    """A configuration file is invalid. `problems` holds `file:line: message` strings."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class ListenSettings:
    host: str = "127.0.0.1"
    port: int = 6432
    tls_cert: str | None = None
    tls_key: str | None = None
    # Refuse clients that did not negotiate TLS (like pg_hba's hostssl).
    tls_required: bool = False


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    host: str = "127.0.0.1"
    port: int = 5432
    database: str | None = None
    tls_mode: str = "disable"  # disable | require | verify-ca | verify-full
    tls_ca_file: str | None = None
    tls_server_name: str | None = None
    connect_timeout: float = 10.0


@dataclass(frozen=True, slots=True)
class LimitSettings:
    max_clients: int = 10000
    startup_timeout: float = 10.0
    # Sessions between accept and the server's AuthenticationOk hold an upstream
    # connection (and a server backend) while the client may never answer: bounded in
    # total and per client address, so unauthenticated clients cannot use up the
    # server's max_connections.
    max_startups: int = 100
    max_startups_per_ip: int = 20
    idle_timeout: float = 0.0
    idle_in_transaction_timeout: float = 0.0
    max_message_size: int = 256 * 1024 * 1024
    shutdown_grace: float = 30.0
    # Byte budget of each statement cache (analyses, decisions, plans, audit facts).
    statement_cache_bytes: int = 32 * 1024 * 1024
    # A protected value (its envelope) larger than this is refused with 54000 both ways:
    # converting one cell takes several copies of it at once (hex text, bytes, plaintext,
    # the client's format, the DataRow), about 10x, so 64 MiB keeps one such cell under
    # a GiB of transient memory while leaving room for documents and large JSON.
    max_cell_size: int = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    host: str = "127.0.0.1"
    port: int = 0  # 0 = metrics endpoint off


@dataclass(frozen=True, slots=True)
class Settings:
    listen: ListenSettings = field(default_factory=ListenSettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    allow_replication: bool = False
    log_level: str = "info"
    log_format: str = "text"
    workers: int = 1
    source: str = "<defaults>"
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def client_ssl_context(self) -> ssl.SSLContext | None:
        """Server-side TLS context for clients, or None to answer 'N' to SSLRequest."""
        if not self.listen.tls_cert:
            return None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.listen.tls_cert, self.listen.tls_key)
        return ctx

    def upstream_ssl_context(self) -> ssl.SSLContext | None:
        """TLS to the server, with libpq's `sslmode` semantics: `require` only encrypts,
        unless a CA is given: then, as libpq does with a root certificate present, the
        chain is verified against it (verify-ca), never silently ignored; `verify-ca`
        verifies the chain, `verify-full` the chain and the host name (`server_name`,
        else `upstream.host`). Without `ca_file` the verifying modes use the system CAs."""
        mode = self.upstream.tls_mode
        if mode == "disable":
            return None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ca = self.upstream.tls_ca_file
        if mode in ("verify-full", "verify-ca") or ca:
            ctx.check_hostname = mode == "verify-full"
            ctx.verify_mode = ssl.CERT_REQUIRED
            if ca:
                ctx.load_verify_locations(ca)
            else:
                ctx.load_default_certs()
        else:  # require without a CA: encrypted, not authenticated (libpq's sslmode=require)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx


# --------------------------------------------------------------------------- loading


class _MarkLoader(yaml.SafeLoader):
    """A YAML loader that remembers the line of every mapping key and value."""


def _construct_mapping(loader: _MarkLoader, node: yaml.MappingNode) -> dict[str, Any]:
    mapping = _LineDict()
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        mapping[key] = loader.construct_object(value_node, deep=True)
        mapping.lines[key] = key_node.start_mark.line + 1
    mapping.line = node.start_mark.line + 1
    return mapping


class _LineDict(dict):  # type: ignore[type-arg]
    """A dict that knows the source line of itself and of each key."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: dict[Any, int] = {}
        self.line = 1


_MarkLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,  # type: ignore[arg-type]
)


def _line_of(doc: Any, path: list[Any]) -> int:
    """Best line for a JSON-schema error path: the deepest key we can still find."""
    line = getattr(doc, "line", 1)
    node = doc
    for part in path:
        if isinstance(node, _LineDict) and part in node:
            line = node.lines.get(part, line)
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
            line = getattr(node, "line", line)
        else:
            break
    return line


def _schema() -> dict[str, Any]:
    with open(SCHEMA_PATH, encoding="utf-8") as fh:
        return json.load(fh)


_CREDENTIAL_KEYS = frozenset({"dsn", "anchor", "password"})
_CREDENTIAL_TEXT = re.compile(r"://[^/\s@]*:[^/\s@]*@|password\s*=", re.IGNORECASE)


def _holds_credential(value: object, depth: int = 0) -> bool:
    """Whether a configuration value is, or holds, text that may carry a password: a
    DSN (`audit.anchor.dsn`), a URI with user:password@, a `password=` keyword."""
    if depth > 20:
        return True
    if isinstance(value, str):
        return bool(_CREDENTIAL_TEXT.search(value))
    if isinstance(value, dict):
        return any(str(k).lower() in _CREDENTIAL_KEYS or _holds_credential(v, depth + 1)
                   for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_holds_credential(v, depth + 1) for v in value)
    return False


def _error_text(err: jsonschema.ValidationError) -> str:
    """jsonschema's message quotes the offending value (for `anyOf`, the whole mapping
    around it). Where that value may hold a credential, or sits under a key that does
    (`audit.anchor`), the message names only its type and the rule it breaks: config
    errors are printed by check-config and logged at start and on SIGHUP."""
    if not (_holds_credential(err.instance)
            or any(str(p).lower() in _CREDENTIAL_KEYS for p in err.path)):
        return err.message
    rule = err.validator_value if err.validator in ("type", "pattern", "minLength",
                                                    "exclusiveMinimum", "enum") else None
    return (f"invalid {type(err.instance).__name__} value (not shown: it may hold a "
            f"credential); fails {err.validator}" + (f" {rule!r}" if rule is not None else ""))


def parse_text(text: str, source: str = "<string>") -> Settings:
    """Validate YAML text and build Settings, or raise ConfigError with file:line messages."""
    try:
        doc = yaml.load(text, Loader=_MarkLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError([f"{source}:{line}: invalid YAML: {problem}"]) from None
    if doc is None:
        doc = _LineDict()
    if not isinstance(doc, dict):
        raise ConfigError([f"{source}:1: the top level must be a mapping"])
    validator = jsonschema.Draft202012Validator(_schema())
    problems = []
    for err in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.path))):
        where = ".".join(str(p) for p in err.path) or "(top level)"
        line = _line_of(doc, list(err.path))
        if err.validator == "additionalProperties" and isinstance(err.instance, _LineDict):
            # Point at each unknown key's own line, not at the mapping that holds it.
            allowed = sorted(err.schema.get("properties", {}))
            for key in err.instance:
                if key not in allowed:
                    name = ".".join([*map(str, err.path), str(key)])
                    problems.append(
                        f"{source}:{err.instance.lines.get(key, line)}: {name}: unknown key"
                        f" (allowed here: {', '.join(allowed)})"
                    )
            continue
        problems.append(f"{source}:{line}: {where}: {_error_text(err)}")
    problems += _check_files(doc, source)
    if not problems:
        problems += _check_upstream_tls(doc, source)
        problems += _check_protect(doc, source)
        problems += _check_policy(doc, source)
    if problems:
        raise ConfigError(problems)
    return _build(doc, source)


def _check_policy(doc: dict[str, Any], source: str) -> list[str]:
    """Roles, tables, kinds and column views: the policy model's own checks, with lines."""
    if not any(k in doc for k in ("roles", "default", "default_column_view")):
        return []
    from proxy.policy import Policy, PolicyError
    from proxy.policy.model import POLICY_KEYS

    try:
        Policy.from_dict(_plain({k: doc[k] for k in POLICY_KEYS if k in doc}))
    except PolicyError as exc:
        return [
            f"{source}:{_line_of(doc, list(issue.path))}: "
            f"{'.'.join(issue.path) or '(policy)'}: {issue.message}"
            for issue in exc.issues
        ]
    return []


def join_group_problem(spec: dict[str, Any]) -> str | None:
    """Why a protected column's `join_group` cannot be honoured, or None.

    A join group shares one deterministic key (`joingroup.<name>.deterministic`) between
    columns so equal values encrypt alike; a randomized column would instead be bound to
    that shared name rather than to its own column (its envelopes then open in any
    column of the group) while joining on it can never work. Refused, never ignored."""
    if spec.get("join_group") and spec.get("mode", "randomized") != "deterministic":
        return (f"join_group {spec['join_group']!r} needs mode: deterministic (this column "
                f"is {spec.get('mode', 'randomized')}); randomized columns cannot be joined "
                "on, remove join_group or make the column deterministic")
    return None


def _check_protect(doc: dict[str, Any], source: str) -> list[str]:
    """`protect:` options that are valid one by one but not together, with lines."""
    problems = []
    protect = doc.get("protect") or {}
    for name, spec in protect.items():
        why = join_group_problem(spec) if isinstance(spec, dict) else None
        if why:
            line = _line_of(doc, ["protect", name, "join_group"])
            problems.append(f"{source}:{line}: protect.{name}.join_group: {why}")
    return problems


def _check_upstream_tls(doc: dict[str, Any], source: str) -> list[str]:
    """A `ca_file` that would not be used, or that holds no usable CA, is refused: an
    operator who names a CA expects the server to be verified against it."""
    tls = (doc.get("upstream") or {}).get("tls") or {}
    ca = tls.get("ca_file")
    if not ca:
        return []
    line = _line_of(doc, ["upstream", "tls", "ca_file"])
    if tls.get("mode", "disable") == "disable":
        return [f"{source}:{line}: upstream.tls.ca_file: set, but upstream.tls.mode is disable "
                "(no TLS to the server, the CA would be ignored): use mode verify-full (or "
                "verify-ca), or remove ca_file"]
    base = Path(source).parent if source and not source.startswith("<") else Path.cwd()
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(_resolve(base, ca))
    except (ssl.SSLError, OSError) as exc:
        return [f"{source}:{line}: upstream.tls.ca_file: not a usable CA bundle (PEM): "
                f"{getattr(exc, 'reason', None) or exc.__class__.__name__}"]
    return []


def _check_files(doc: dict[str, Any], source: str) -> list[str]:
    """Files named in the config must exist: a typo should fail at load, not at first use."""
    problems = []
    base = Path(source).parent if source and not source.startswith("<") else Path.cwd()
    checks = [
        (("listen", "tls", "cert_file"),),
        (("listen", "tls", "key_file"),),
        (("upstream", "tls", "ca_file"),),
    ]
    for (path,) in checks:
        node: Any = doc
        for part in path[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and node.get(path[-1]):
            target = _resolve(base, node[path[-1]])
            if not os.path.isfile(target):
                line = _line_of(doc, list(path))
                problems.append(f"{source}:{line}: {'.'.join(path)}: no such file: {target}")
    return problems


def _resolve(base: Path, value: str) -> str:
    p = Path(os.path.expanduser(value))
    return str(p if p.is_absolute() else base / p)


def _build(doc: dict[str, Any], source: str) -> Settings:
    base = Path(source).parent if source and not source.startswith("<") else Path.cwd()
    listen = doc.get("listen") or {}
    ltls = listen.get("tls") or {}
    up = doc.get("upstream") or {}
    utls = up.get("tls") or {}
    limits = doc.get("limits") or {}
    metrics = doc.get("metrics") or {}
    d = LimitSettings()
    return Settings(
        listen=ListenSettings(
            host=listen.get("host", "127.0.0.1"),
            port=int(listen.get("port", 6432)),
            tls_cert=_resolve(base, ltls["cert_file"]) if ltls.get("cert_file") else None,
            tls_key=_resolve(base, ltls["key_file"]) if ltls.get("key_file") else None,
            tls_required=bool(ltls.get("required", False)),
        ),
        upstream=UpstreamSettings(
            host=up.get("host", "127.0.0.1"),
            port=int(up.get("port", 5432)),
            database=up.get("database"),
            tls_mode=utls.get("mode", "disable"),
            tls_ca_file=_resolve(base, utls["ca_file"]) if utls.get("ca_file") else None,
            tls_server_name=utls.get("server_name"),
            connect_timeout=float(up.get("connect_timeout", 10)),
        ),
        limits=LimitSettings(
            max_clients=int(limits.get("max_clients", d.max_clients)),
            startup_timeout=float(limits.get("startup_timeout", d.startup_timeout)),
            max_startups=int(limits.get("max_startups", d.max_startups)),
            max_startups_per_ip=int(limits.get("max_startups_per_ip", d.max_startups_per_ip)),
            idle_timeout=float(limits.get("idle_timeout", d.idle_timeout)),
            idle_in_transaction_timeout=float(
                limits.get("idle_in_transaction_timeout", d.idle_in_transaction_timeout)
            ),
            max_message_size=int(limits.get("max_message_size", d.max_message_size)),
            shutdown_grace=float(limits.get("shutdown_grace", d.shutdown_grace)),
            statement_cache_bytes=int(limits.get("statement_cache_bytes",
                                                 d.statement_cache_bytes)),
            max_cell_size=int(limits.get("max_cell_size", d.max_cell_size)),
        ),
        metrics=MetricsSettings(
            host=metrics.get("host", "127.0.0.1"), port=int(metrics.get("port", 0))
        ),
        allow_replication=bool(doc.get("allow_replication", False)),
        log_level=doc.get("log_level", "info"),
        log_format=doc.get("log_format", "text"),
        workers=int(doc.get("workers", 1)),
        source=source,
        raw=_plain(doc),
    )


def _plain(node: Any) -> Any:
    """Strip line bookkeeping so later consumers see ordinary dicts."""
    if isinstance(node, dict):
        return {k: _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node


def line_in_file(path: str | os.PathLike[str], keys: list[Any]) -> int:
    """The line of a key path (``["protect", "public.cards.pan"]``) in a config file, for
    problems found after loading (check-config's live checks); 1 if it cannot be told."""
    try:
        doc = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_MarkLoader)
    except (OSError, yaml.YAMLError):
        return 1
    return _line_of(doc, keys)


def _open_dirs(path: Path) -> list[Path]:
    """Directories above `path` (as named, then as resolved) that group or others may
    write without the sticky bit, nearest first: whoever may write one can rename what
    is in it and put another file (or directory, or symlink) in its place. A sticky
    directory (/tmp) lets no one rename what they do not own."""
    found: list[Path] = []
    named = Path(os.path.abspath(path))
    for start in (named, named.resolve()):
        for d in start.parents:
            if d in found:
                continue
            try:
                st_mode = os.stat(d).st_mode
            except OSError:
                continue  # reading the file reports the problem
            if st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st_mode & stat.S_ISVTX:
                found.append(d)
    return found


def writable_by_others(path: str | os.PathLike[str], kind: str = "config file") -> list[str]:
    """`file: message` problems for a config file (or, with `kind`, a keyring), or a
    directory on the way to it, that a group or everyone may write: whoever can write the
    config (or swap the file, or a directory above it, for their own) can give themselves
    any role's access, point `upstream` at their own server or name their own keys, so
    such a file is refused rather than trusted. Every directory up to the root counts, on
    the path as named (a symlink's own directory) and as resolved (what is read), as
    OpenSSH's StrictModes checks them; sticky directories are fine. A file that does not
    exist is skipped (reading it reports that); its directories are still checked."""
    p = Path(path)
    problems = []
    try:
        mode = stat.S_IMODE(os.stat(p).st_mode)
    except OSError:
        mode = 0  # reading it reports the problem
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        problems.append(f"{p}: {kind} is group- or world-writable (mode {mode:04o}); "
                        f"refusing it: `chmod go-w {p}`")
    parent = p.resolve().parent
    for d in _open_dirs(p):
        what = f"directory of the {kind}" if d == parent else f"a directory above the {kind}"
        mode = stat.S_IMODE(os.stat(d).st_mode)
        problems.append(f"{d}: {what} is group- or world-writable (mode {mode:04o}); "
                        f"refusing it: `chmod go-w {d}` (or make it sticky, `chmod +t`)")
    return problems


def load(path: str | os.PathLike[str]) -> Settings:
    p = Path(path)
    problems = writable_by_others(p)
    if problems:
        raise ConfigError(problems)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{p}:0: cannot read config: {exc.strerror}"]) from None
    return parse_text(text, str(p))
