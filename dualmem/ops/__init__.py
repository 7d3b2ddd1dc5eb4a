"""Operations: verify, migrate, export/import, mirror, backup, purge, dlq, doctor, metrics.

The library functions behind the ``dualmem`` maintenance commands (``dualmem.ops.cli``
registers the commands). Writes that change records go through the command stream like
any put (``dualmem.ops.runtime``); the few direct SQLite writes are offline maintenance
and say why in their docstrings.
"""

from dualmem.ops.backup import BackupResult, backup_database
from dualmem.ops.database import open_database
from dualmem.ops.dlq import describe, replay
from dualmem.ops.doctor import Finding, run_doctor
from dualmem.ops.exporter import Exporter, start_server
from dualmem.ops.maintenance import migrate_database, plan_migration, purge_database
from dualmem.ops.mirror import Mirror, check_mirror
from dualmem.ops.runtime import Runtime, Write
from dualmem.ops.transfer import export_records, plan_import
from dualmem.ops.verify import Check, check_redis_parity, verify_database

__all__ = [
    "BackupResult",
    "Check",
    "Exporter",
    "Finding",
    "Mirror",
    "Runtime",
    "Write",
    "backup_database",
    "check_mirror",
    "check_redis_parity",
    "describe",
    "export_records",
    "migrate_database",
    "open_database",
    "plan_import",
    "plan_migration",
    "purge_database",
    "replay",
    "run_doctor",
    "start_server",
    "verify_database",
]
