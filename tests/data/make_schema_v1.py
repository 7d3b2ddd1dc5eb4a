"""How ``schema_v1.db`` was made: by the core's first schema (commit d9fd650), kept for the
migration test. Running it again only works on that commit (it checks SCHEMA_VERSION == 1).

The encrypted rows are sealed with :data:`FIXTURE_SECRET`, a test-only key: the migration
test opens them after upgrading, proving the envelopes survived the migration untouched.
"""

from __future__ import annotations

import base64
import sqlite3
import sys

__all__ = ["FIXTURE_KEY_ID", "FIXTURE_SECRET", "main"]

FIXTURE_SECRET = base64.b64encode(b"dualmem-v1-fixture-test-only-key").decode()
FIXTURE_KEY_ID = "v1fixture"


def main(path: str = "schema_v1.db") -> int:
    """Write the fixture database at ``path`` with the code of schema version 1."""
    from acl import Keyring, Level, Principal
    from dualmem import DualMemory
    from dualmem.migrations import SCHEMA_VERSION

    if SCHEMA_VERSION != 1:
        print("this fixture must be made by schema version 1 code", file=sys.stderr)
        return 1
    ring = Keyring.from_secret(FIXTURE_SECRET, key_id=FIXTURE_KEY_ID)
    coder = Principal(agent_id="coder-1", team="backend", swarm="phase-1-auth", project="shop")
    system = Principal(agent_id="orchestrator", system=True)
    with DualMemory(redis_url="memory://v1fix", db_path=path, keyring=ring) as mem:
        p = {"principal": coder}
        receipts = [
            mem.put("confidence/auth/1", {"confidence": 0.85}, level=Level.PRIVATE, **p),
            mem.put("plan/auth", {"owner": "backend", "steps": ["login", "tokens"]}, level=2, **p),
            mem.put("consensus/auth", {"votes": 3, "agreed": True}, level=Level.SWARM, **p),
            mem.put("spec/login", {"text": "é ünïcode ✓", "n": 1}, level=Level.PROJECT, **p),
            mem.put("spec/login", {"text": "é ünïcode ✓", "n": 2}, level=Level.PROJECT, **p),
            mem.put("config/limits", {"max_agents": 12}, level=Level.SYSTEM, principal=system),
            mem.put("scratch/tmp", "gone soon", level=Level.SWARM, **p),
            mem.delete("scratch/tmp", level=Level.SWARM, **p),
            mem.audit("fixture_created", principal=system, risk="low", detail={"schema": 1}),
        ]
        for r in receipts:
            mem.sync(r, timeout=5)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(*sys.argv[1:]))
