"""The README's configuration table and the JSON schema name the same keys, each described.

An operator reads the table, the loader enforces the schema: a key in one and not the
other is either undocumented (it works but nobody knows) or a documented key the loader
rejects. Nested objects are compared key by key (`limits.max_clients`, `keys.path`,
`audit.key_file`, `protect.*.mode` for the entries of a mapping), so a new key anywhere
fails here until both sides have it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent
SCHEMA = ROOT / "config" / "strongroom.schema.json"


def _schema() -> dict[str, Any]:
    return json.loads(SCHEMA.read_text())


def _children(node: dict[str, Any], prefix: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(dotted key, schema) of the keys directly under `node`; the entries of a mapping
    whose values are objects with known keys (`protect`) are named with `*`."""
    for name, sub in (node.get("properties") or {}).items():
        yield prefix + name, sub
    entry = node.get("additionalProperties")
    if isinstance(entry, dict) and entry.get("properties"):
        for name, sub in entry["properties"].items():
            yield f"{prefix}*.{name}", sub


def schema_keys(node: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every key of the configuration, depth first, containers included."""
    for key, sub in _children(node, prefix):
        yield key, sub
        yield from schema_keys(sub, key + ".")


def schema_leaves(node: dict[str, Any]) -> set[str]:
    """What the table lists: every key except objects of named keys (`limits`, whose keys
    are listed instead); mappings such as `protect` are listed with their entries' keys."""
    return {key for key, sub in schema_keys(node) if not sub.get("properties")}


def readme_keys(text: str) -> set[str]:
    """Keys of the table under "## Configuration reference". A first cell lists
    `a.b.c`, `d`, `e`: `d` and `e` are siblings of `c` unless written with a dot."""
    section = text.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    keys: set[str] = set()
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        names = re.findall(r"`([^`]+)`", line.split(" | ", 1)[0])
        parent = names[0].rpartition(".")[0]
        keys.add(names[0])
        keys.update(n if "." in n else f"{parent}.{n}".lstrip(".") for n in names[1:])
    return keys


def test_readme_table_lists_exactly_the_schema_keys() -> None:
    documented = readme_keys((ROOT / "README.md").read_text())
    schema = schema_leaves(_schema())
    assert {"default_column_view", "expand_views", "limits.max_clients", "keys.path",
            "audit.key_file", "protect.*.mode"} <= schema
    assert schema - documented == set(), "in the schema, missing from the README table"
    assert documented - schema == set(), "in the README table, unknown to the schema"


def test_every_schema_key_has_a_description() -> None:
    schema = _schema()
    missing = [key for key, sub in schema_keys(schema) if not sub.get("description")]
    view = schema["$defs"]["column_views"]["additionalProperties"]["oneOf"][1]["properties"]
    missing += [f"column_views.{k}" for k, sub in view.items() if not sub.get("description")]
    assert missing == []


def test_readme_parser_reads_sibling_shorthand() -> None:
    """The shorthand the table uses, so the comparison above reads what a person reads."""
    table = ("## Configuration reference\n| key | meaning |\n| --- | --- |\n"
             "| `listen.tls.cert_file`, `key_file` | x |\n| `workers` | y |\n"
             "| `a.b`, `c.d` | z |\n## Next\n| `ignored` | no |\n")
    assert readme_keys(table) == {"listen.tls.cert_file", "listen.tls.key_file", "workers",
                                  "a.b", "c.d"}
