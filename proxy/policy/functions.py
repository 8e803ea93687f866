"""Which built-in functions are admin-only, per POLICY-SEMANTICS.md "Functions".

Read files, list directories, signal backends, reload config, or run SQL text the proxy
cannot see: each of these bypasses table policy, so each needs ``allow: [admin]``.  Beyond
the spec's list we also treat WAL, backup, replication-slot and statistics-reset functions
as admin (they change server state for everyone).

Large objects are data outside every table the policy names (``pg_largeobject``), readable
and writable by OID: they need ``allow: [large_objects]`` (or ``admin``). ``lo_import`` and
``lo_export`` read and write *server files*, so they stay admin; so does any other ``lo_*``
name (fail closed: a function PostgreSQL adds later is admin until listed here).
"""

from __future__ import annotations

from typing import Final

ADMIN_FUNCTIONS: Final = frozenset(
    {
        # spec: file access, signals, config
        "pg_read_file",
        "pg_read_binary_file",
        "pg_stat_file",
        "pg_terminate_backend",
        "pg_cancel_backend",
        "pg_reload_conf",
        "pg_rotate_logfile",
        # spec: run SQL text
        "ts_stat",
        "ts_rewrite",
        # fail-closed extras: server-wide state
        "pg_switch_wal",
        "pg_create_restore_point",
        "pg_promote",
        "pg_backup_start",
        "pg_backup_stop",
        "pg_start_backup",
        "pg_stop_backup",
        "pg_logical_emit_message",
        "pg_wal_replay_pause",
        "pg_wal_replay_resume",
        "pg_log_backend_memory_contexts",
        "pg_import_system_collations",
        "pg_copy_physical_replication_slot",
        "pg_copy_logical_replication_slot",
        "pg_drop_replication_slot",
        "pg_create_physical_replication_slot",
        "pg_create_logical_replication_slot",
        "pg_replication_slot_advance",
        "pg_current_logfile",
    }
)

ADMIN_PREFIXES: Final = (
    "lo_",  # every other lo_* (lo_import, lo_export: server files)
    "pg_ls_",  # pg_ls_dir and every pg_ls_*dir
    "query_to_xml",
    "table_to_xml",
    "schema_to_xml",
    "database_to_xml",
    "cursor_to_xml",
    "pg_logical_slot_",
    "pg_replication_origin_",
    "pg_stat_reset",
    "binary_upgrade_",
)


LARGE_OBJECT_FUNCTIONS: Final = frozenset(
    {
        "lo_creat", "lo_create", "lo_open", "lo_close", "loread", "lowrite", "lo_lseek",
        "lo_lseek64", "lo_tell", "lo_tell64", "lo_truncate", "lo_truncate64", "lo_unlink",
        "lo_get", "lo_put", "lo_from_bytea",
    }
)  # fmt: skip
"""The pg_catalog functions of the large-object interface that touch no server file:
``allow: [large_objects]``. libpq's client-side lo_* calls reach them by OID
(FunctionCall messages), which the gate checks by the same rules."""


def is_large_object_function(name: str) -> bool:
    """True for a pg_catalog function that needs ``allow: [large_objects]`` (or admin)."""
    return name in LARGE_OBJECT_FUNCTIONS


def is_admin_function(name: str) -> bool:
    """True for a pg_catalog function that needs ``allow: [admin]``."""
    if name in LARGE_OBJECT_FUNCTIONS:
        return False
    return name in ADMIN_FUNCTIONS or name.startswith(ADMIN_PREFIXES)
