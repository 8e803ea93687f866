"""The `strongroom` command as an operator meets it (issue 12, "The CLI").

Ordinary mistakes (no keyring yet, an unknown key id, the primary retired, a missing
directory, a wrong option) are one line on stderr and exit status 1, or 2 for usage
errors; a traceback only with --debug. Every subcommand is found by walking the argparse
parser, so a subcommand added later is covered without touching this file (a new
required argument needs a value in REQUIRED_VALUES, and the test says so).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import proxy
from proxy.cli import build_parser
from tests.conftest import ROOT

EXAMPLE = ROOT / "config" / "strongroom.example.yaml"


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """`strongroom ARGS` from this checkout's code, whatever the working directory."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "proxy.cli", *args], cwd=str(cwd),
                          capture_output=True, text=True, timeout=60, env=env)


def leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = (),
           ) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """(command words, parser) of every runnable subcommand."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [(path, parser)]
    out = []
    for name, child in subs[0].choices.items():
        out += leaves(child, (*path, name))
    return out


def all_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    out = [parser]
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for child in a.choices.values():
                out += all_parsers(child)
    return out


def one_line_error(res: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in res.stdout + res.stderr, res.stderr
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    return lines[0]


@pytest.fixture
def fresh(tmp_path: Path) -> Path:
    """The example configuration in an empty directory: no keys/ directory, no keyring."""
    shutil.copy(EXAMPLE, tmp_path / "s.yaml")
    return tmp_path / "s.yaml"


# ----------------------------------------------------------------- every subcommand


def test_every_subcommand_is_found() -> None:
    names = {" ".join(p) for p, _ in leaves(build_parser())}
    assert {"serve", "check-config", "demo", "keys init", "keys retire", "keys unretire",
            "keys seal",
            "keys rotate", "encrypt-column", "audit verify", "audit keygen"} <= names


@pytest.mark.parametrize("words", [p for p, _ in leaves(build_parser())], ids=" ".join)
def test_every_subcommand_rejects_an_unknown_option_without_a_traceback(
        words: tuple[str, ...]) -> None:
    res = run(*words, "--no-such-option")
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    assert "unrecognized arguments" in res.stderr or "required" in res.stderr


# A value per required argument, all pointing at missing setup: the example
# configuration without its keys, an unknown key id, a file that is not a config.
REQUIRED_VALUES = {
    "config": "{cfg}", "to": "{cfg}", "column": "public.cards.pan", "key_id": "99999",
    "file": "{junk}", "files": "{junk}", "key_file": "{dir}/no-such.key",
}
EXPECTED_STATUS = {("keys", "init"): 0}  # init is the setup: it succeeds


def _required(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.dest != "help"
            and (a.required or (not a.option_strings and a.nargs != 0))]


def test_only_the_demo_runs_without_arguments() -> None:
    """The missing-setup test below needs a required argument to point at missing setup;
    a command with none must be looked at (the demo needs no setup at all)."""
    assert [w for w, p in leaves(build_parser()) if not _required(p)] == [("demo",)]


def _arguments(words: tuple[str, ...], parser: argparse.ArgumentParser,
               values: dict[str, str]) -> list[str]:
    args: list[str] = []
    for a in _required(parser):
        assert a.dest in REQUIRED_VALUES, (
            f"`strongroom {' '.join(words)}` has a new required argument {a.dest!r}: add a "
            "missing-setup value for it to REQUIRED_VALUES")
        value = REQUIRED_VALUES[a.dest].format(**values)
        args += [a.option_strings[0], value] if a.option_strings else [value]
    return args


@pytest.mark.parametrize("words", [w for w, p in leaves(build_parser()) if _required(p)],
                         ids=" ".join)
def test_every_subcommand_on_missing_setup_says_one_line(
        words: tuple[str, ...], fresh: Path) -> None:
    parser = dict(leaves(build_parser()))[words]
    junk = fresh.parent / "junk.txt"
    junk.write_text("this is not a configuration: [\n")
    args = _arguments(words, parser, {"cfg": str(fresh), "junk": str(junk),
                                      "dir": str(fresh.parent)})
    res = run(*words, *args)
    assert "Traceback" not in res.stdout + res.stderr, res.stderr
    assert res.returncode == EXPECTED_STATUS.get(words, 1), (res.stdout, res.stderr)
    errors = res.stderr.strip().splitlines()
    assert len(errors) <= 1, res.stderr


# ---------------------------------------------------------------- the reported cases


def test_keys_show_before_init(fresh: Path) -> None:
    line = one_line_error(run("keys", "show", "-c", str(fresh)))
    assert "does not exist" in line and "keys init" in line


def test_keys_init_creates_the_keys_directory_0700(fresh: Path) -> None:
    res = run("keys", "init", "-c", str(fresh))
    assert res.returncode == 0, res.stderr
    keys = fresh.parent / "keys"
    assert keys.is_dir() and keys.stat().st_mode & 0o777 == 0o700
    assert (keys / "keyring.json").exists() and (keys / "dev.kek").exists()
    assert "created directory" in res.stdout


def test_unknown_key_and_the_primary(fresh: Path) -> None:
    assert run("keys", "init", "-c", str(fresh)).returncode == 0
    line = one_line_error(run("keys", "promote", "-c", str(fresh), "99999"))
    assert "no key with id 99999" in line and "keys show" in line
    shown = run("keys", "show", "-c", str(fresh)).stdout
    primary = re.search(r"(\d+)\s+public\.cards\.pan\s+encrypt\s+active", shown)
    assert primary is not None, shown
    # refused before any database connection: the example's upstream is not running
    line = one_line_error(run("keys", "retire", "-c", str(fresh), primary.group(1)))
    assert "is the primary" in line and "promote another key" in line
    line = one_line_error(run("keys", "unretire", "-c", str(fresh), primary.group(1)))
    assert "not retired" in line


def test_keys_seal_migrates_an_unauthenticated_keyring(fresh: Path) -> None:
    """A keyring written before keyring MACs (format 1) is refused with a pointer to
    `keys seal`; `keys show --unverified` shows it; `keys seal` authenticates it once."""
    import json

    assert run("keys", "init", "-c", str(fresh)).returncode == 0
    ring = fresh.parent / "keys" / "keyring.json"
    doc = json.loads(ring.read_text())
    doc["format"] = 1
    del doc["mac"], doc["mac_key"]
    ring.write_text(json.dumps(doc))
    line = one_line_error(run("keys", "show", "-c", str(fresh)))
    assert "not authenticated" in line and "keys seal" in line
    shown = run("keys", "show", "--unverified", "-c", str(fresh))
    assert shown.returncode == 0 and "NOT AUTHENTICATED" in shown.stderr
    assert "public.cards.pan" in shown.stdout
    res = run("keys", "seal", "-c", str(fresh))
    assert res.returncode == 0 and "MAC added" in res.stdout, res.stderr
    assert run("keys", "show", "-c", str(fresh)).stdout == shown.stdout
    res = run("keys", "seal", "-c", str(fresh))
    assert res.returncode == 0 and "already authenticated" in res.stdout


def test_debug_shows_the_traceback(fresh: Path) -> None:
    res = run("--debug", "keys", "show", "-c", str(fresh))
    assert res.returncode == 1 and "Traceback" in res.stderr and "KeyringError" in res.stderr


# ------------------------------------------------------------------------ help, version


def test_version_matches_the_package() -> None:
    res = run("--version")
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert res.returncode == 0 and res.stdout.strip() == f"strongroom {version}"
    assert proxy.__version__ == version


def test_every_option_and_subcommand_has_help_text() -> None:
    missing = []
    for parser in all_parsers(build_parser()):
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                for choice in a._choices_actions:
                    if not (choice.help or "").strip():
                        missing.append(f"{parser.prog} {choice.dest}")
                continue
            if not (a.help or "").strip() or a.help == argparse.SUPPRESS:
                missing.append(f"{parser.prog} {'/'.join(a.option_strings) or a.dest}")
    assert missing == []


def test_audit_help_lists_its_subcommands() -> None:
    res = run("audit", "--help")
    assert res.returncode == 0
    assert "verify" in res.stdout and "keygen" in res.stdout


def test_audit_keygen_help_prints_help_and_creates_nothing(tmp_path: Path) -> None:
    res = run("audit", "keygen", "--help", cwd=tmp_path)
    assert res.returncode == 0 and "usage: strongroom audit keygen" in res.stdout
    assert list(tmp_path.iterdir()) == []


def test_audit_keygen_and_verify(tmp_path: Path) -> None:
    key = tmp_path / "a.key"
    assert run("audit", "keygen", str(key)).returncode == 0
    assert key.stat().st_mode & 0o777 == 0o600
    line = one_line_error(run("audit", "keygen", str(key)))
    assert "exists" in line
    line = one_line_error(run("audit", "verify", str(tmp_path / "none.jsonl"),
                              "--key-file", str(tmp_path / "none.key")))
    assert "none.key" in line


def test_keys_init_refuses_a_keyring_whose_kek_is_missing(tmp_path: Path) -> None:
    """A new KEK could not open the existing keyring: init must not make one quietly."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text((ROOT / "config" / "strongroom.example.yaml").read_text())
    first = run("keys", "init", "-c", str(cfg))
    assert first.returncode == 0, first.stderr
    kek = tmp_path / "keys" / "dev.kek"
    ring = (tmp_path / "keys" / "keyring.json").read_bytes()
    kek.unlink()
    again = run("keys", "init", "-c", str(cfg))
    assert again.returncode == 1, again.stdout
    assert "KEK" in again.stderr and "Traceback" not in again.stderr
    assert not kek.exists()
    assert (tmp_path / "keys" / "keyring.json").read_bytes() == ring
