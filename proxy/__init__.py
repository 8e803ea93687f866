"""Strongroom: a transparent encryption and access-control proxy for PostgreSQL."""

__version__ = "0.1.0"  # keep equal to pyproject.toml (tests/unit/test_cli.py checks)
