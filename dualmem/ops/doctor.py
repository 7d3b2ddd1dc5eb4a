"""``dualmem doctor``: configuration checks, each with how to fix what it finds."""

from __future__ import annotations

import os
import platform
import sqlite3
import stat
from dataclasses import dataclass
from pathlib import Path

import cryptography
import redis

from acl.crypto import Keyring
from acl.errors import ConfigurationError, DualMemError
from dualmem.layout import Layout
from dualmem.migrations import SCHEMA_VERSION, schema_version
from dualmem.ops.database import check_dualmem
from dualmem.redis_backend import connect, text, translate_errors
from dualmem.settings import Settings
from dualmem.sqlite_store import holds_sealed_rows

__all__ = [
    "MIN_REDIS",
    "MIN_SQLITE",
    "Finding",
    "check_database",
    "check_keys",
    "check_redis",
    "check_stream_ids",
    "check_versions",
    "run_doctor",
]

MIN_SQLITE = (3, 38, 0)  # JSON functions built in (json_valid in the mission tables)
MIN_REDIS = (6, 2, 0)  # XAUTOCLAIM, XADD ... MINID trimming


@dataclass(frozen=True, slots=True)
class Finding:
    """One check: ``status`` is ``ok``, ``warn`` or ``fail``; ``fix`` says what to do."""

    check: str
    status: str
    detail: str
    fix: str = ""


def _version(text_version: str) -> tuple[int, ...]:
    """The first three numbers of a version, each read up to its first non-digit (all of
    a part's digits read "0-rc2" as 2).

    >>> _version("6.2.0-rc2"), _version("3.45.1"), _version("7.2")
    ((6, 2, 0), (3, 45, 1), (7, 2))
    """
    parts = []
    for p in text_version.split(".")[:3]:
        digits = p[: len(p) - len(p.lstrip("0123456789"))]
        parts.append(int(digits or 0))
    return tuple(parts)


def check_versions() -> list[Finding]:
    """Python, dualmem and library versions; SQLite must be new enough."""
    from dualmem import __version__

    out = [
        Finding(
            "versions",
            "ok",
            f"dualmem {__version__}, Python {platform.python_version()}, redis-py "
            f"{redis.__version__}, cryptography {cryptography.__version__}",
        )
    ]
    if _version(sqlite3.sqlite_version) < MIN_SQLITE:
        out.append(
            Finding(
                "sqlite library",
                "fail",
                f"SQLite {sqlite3.sqlite_version} is older than {'.'.join(map(str, MIN_SQLITE))}",
                "use a Python built against a newer SQLite (3.38+), e.g. a current python.org "
                "or distribution build",
            )
        )
    else:
        out.append(Finding("sqlite library", "ok", f"SQLite {sqlite3.sqlite_version}"))
    return out


def check_redis(settings: Settings) -> list[Finding]:
    """Reachability, version, persistence (AOF) and eviction policy of the Redis."""
    if settings.embedded:
        return [
            Finding(
                "redis persistence",
                "warn",
                f"{settings.shown_url} is the embedded in-process server: commands the worker "
                "has not committed yet are lost if the process dies",
                "for anything that matters run a real Redis with AOF and pass "
                "--redis-url redis://host:6379/0",
            )
        ]
    out: list[Finding] = []
    try:
        client, _ = connect(settings)
        with translate_errors("doctor"):
            info = client.info("server")
    except DualMemError as exc:
        return [
            Finding(
                "redis",
                "fail",
                str(exc),
                "start Redis or fix --redis-url / DUALMEM_REDIS_URL",
            )
        ]
    try:
        version = str(info.get("redis_version", "0"))
        if _version(version) < MIN_REDIS:
            out.append(
                Finding(
                    "redis version",
                    "fail",
                    f"Redis {version}",
                    f"upgrade to Redis {'.'.join(map(str, MIN_REDIS))} or newer",
                )
            )
        else:
            out.append(Finding("redis version", "ok", f"Redis {version} at {settings.shown_url}"))
        out.extend(_redis_config(client))
        out.extend(check_stream_ids(client, settings))
    finally:
        client.close()
    return out


def _not_a_stream(stream: bytes, kind: str) -> Finding:
    # Every put fails (WRONGTYPE inside EXEC; the put then takes back the cache entry its
    # SET left, Redis having no rollback).
    return Finding(
        "stream ids",
        "fail",
        f"{stream.decode()} holds a {kind}, not a command stream: every put to its shard fails",
        f"another program wrote that key: move it away (redis-cli RENAME '{stream.decode()}' "
        "<new name>) or delete it; dualmem creates the stream again",
    )


#: Warn when a stream's ids run this far ahead of Redis's clock, ms.
_AHEAD_WARN_MS = 60_000


def check_stream_ids(client: redis.Redis, settings: Settings) -> list[Finding]:
    """Stream ids against Redis's clock.

    Redis gives ``XADD *`` the larger of its clock and the stream's last id. A last id
    far ahead of the clock (the clock stepped back, a restored Redis, the floor set after
    Redis lost its data) means every new command shares that millisecond: dualmem orders
    them correctly (its ordering id holds any stream id), but the clock needs looking at.
    """
    try:
        with translate_errors("doctor stream ids"):
            now_s, now_us = client.time()
            now_ms = int(now_s) * 1000 + int(now_us) // 1000
            worst: tuple[int, int, bytes] | None = None
            for stream in Layout(settings.namespace, settings.shards).streams():
                kind = text(client.type(stream))
                if kind == "none":
                    continue
                if kind != "stream":
                    return [_not_a_stream(stream, kind)]
                last = text(client.xinfo_stream(stream)["last-generated-id"])
                ms_text, _, seq_text = last.partition("-")
                ahead = (int(ms_text) - now_ms, int(seq_text or 0), stream)
                if worst is None or ahead > worst:
                    worst = ahead
    except DualMemError as exc:
        return [Finding("stream ids", "warn", f"cannot read the streams ({exc})")]
    if worst is None:
        return [Finding("stream ids", "ok", "no command stream yet")]
    ahead_ms, seq, stream = worst
    if ahead_ms > _AHEAD_WARN_MS:
        return [
            Finding(
                "stream ids",
                "warn",
                f"{stream.decode()}: last id {ahead_ms / 1000:,.0f} s ahead of Redis's clock; "
                f"new commands share one millisecond (sequence {seq:,} so far)",
                "check the Redis host's clock (NTP); a restored Redis resolves itself once "
                "its clock passes the stream's last id",
            )
        ]
    return [Finding("stream ids", "ok", f"within {max(ahead_ms, 0) / 1000:.0f} s of Redis's clock")]


def _redis_config(client: redis.Redis) -> list[Finding]:
    try:
        with translate_errors("doctor config"):
            conf = {
                text(k): text(v)
                for name in ("appendonly", "appendfsync", "maxmemory-policy")
                for k, v in client.config_get(name).items()
            }
    except DualMemError as exc:
        return [
            Finding(
                "redis persistence",
                "warn",
                f"cannot read CONFIG ({exc})",
                "check in your provider's settings that AOF is on (appendfsync everysec) "
                "and maxmemory-policy is noeviction",
            )
        ]
    out: list[Finding] = []
    fix_aof = (
        "redis-cli CONFIG SET appendonly yes; redis-cli CONFIG SET appendfsync everysec; "
        "then redis-cli CONFIG REWRITE (or set both in redis.conf)"
    )
    if conf.get("appendonly") != "yes":
        out.append(
            Finding(
                "redis persistence",
                "warn",
                "AOF is off (appendonly no): a Redis restart loses every command the worker "
                "has not committed yet",
                fix_aof,
            )
        )
    elif conf.get("appendfsync") == "no":
        out.append(
            Finding(
                "redis persistence",
                "warn",
                "appendonly yes but appendfsync no: the OS decides when the AOF reaches disk",
                fix_aof,
            )
        )
    else:
        out.append(
            Finding(
                "redis persistence",
                "ok",
                f"appendonly yes, appendfsync {conf.get('appendfsync', '?')}",
            )
        )
    policy = conf.get("maxmemory-policy", "noeviction")
    if policy != "noeviction":
        # volatile-* evicts only keys with a ttl: never a command stream, but the cache
        # entry of a put not yet committed (it has cache_ttl), which a fresh read needs.
        what = (
            "the cache entries of writes not yet committed, and a fresh read then answers "
            "SQLite's older value"
            if policy.startswith("volatile")
            else "the command stream itself, and with it commands not yet committed"
        )
        out.append(
            Finding(
                "redis eviction",
                "fail",
                f"maxmemory-policy {policy}: Redis may evict {what}",
                "redis-cli CONFIG SET maxmemory-policy noeviction (dualmem bounds the stream "
                "with max_backlog instead)",
            )
        )
    else:
        out.append(Finding("redis eviction", "ok", "maxmemory-policy noeviction"))
    return out


def _key_source(settings: Settings) -> Path | Finding:
    """The key file to check, or the finding when there is none to check."""
    if settings.keyring:
        return Path(settings.keyring)
    if settings.key:
        try:
            Keyring.from_secret(settings.key)
        except ConfigurationError as exc:
            return Finding("key", "fail", f"DUALMEM_KEY: {exc}", "dualmem keygen --out keys.json")
        return Finding("key", "ok", "from DUALMEM_KEY (keep it out of shell history and logs)")
    if settings.embedded:
        path = settings.default_keyring_path
        try:
            exists = settings.default_key_file_exists()
        except ConfigurationError as exc:
            return Finding("key", "fail", str(exc), "use a shorter --db, or pass --keyring")
        return path if exists else _missing_embedded_key(settings, path)
    return Finding(
        "key",
        "fail",
        "no key configured: levels PRIVATE, TEAM and SYSTEM cannot be written",
        "dualmem keygen --out keys.json, then --keyring keys.json or DUALMEM_KEYRING",
    )


def _missing_embedded_key(settings: Settings, path: Path) -> Finding:
    """The embedded default's key file ``path`` does not exist: fine for a new database,
    a failure for one holding sealed records (DualMemory refuses it the same way: a new
    key would open none of them)."""
    try:
        sealed = holds_sealed_rows(settings.db_path)
    except ConfigurationError as exc:
        return Finding("key", "fail", str(exc), "check --db / DUALMEM_DB_PATH")
    if sealed:
        return Finding(
            "key",
            "fail",
            f"{settings.db_path} holds encrypted records but its key file {path} is "
            "missing: a new key would open none of them",
            f"restore {path} from its backup (or pass --keyring / DUALMEM_KEYRING)",
        )
    return Finding("key", "ok", f"{path} will be created on first use (embedded default)")


def _key_file(path: Path) -> Finding:
    if not path.exists():
        return Finding("key file", "fail", f"{path} does not exist", f"dualmem keygen --out {path}")
    mode = stat.S_IMODE(path.stat().st_mode)
    if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        return Finding(
            "key file",
            "fail",
            f"{path} has mode {mode:o}: other users can read the key",
            f"chmod 600 {path}",
        )
    try:
        ring = Keyring.load(path)
    except ConfigurationError as exc:
        return Finding("key file", "fail", str(exc), "restore the key file from its backup")
    return Finding(
        "key file", "ok", f"{path} (mode {mode:o}, {len(ring.ids)} key(s), active {ring.active_id})"
    )


def check_keys(settings: Settings) -> list[Finding]:
    """Where the key comes from, whether the key file is private, whether it loads."""
    source = _key_source(settings)
    return [source if isinstance(source, Finding) else _key_file(source)]


def check_database(settings: Settings) -> list[Finding]:
    """The database file: WAL, schema version, auto_vacuum, permissions."""
    db = Path(settings.db_path)
    if not db.exists():
        parent = db.parent if str(db.parent) else Path(".")
        ok = parent.exists() and os.access(parent, os.W_OK)
        return [
            Finding(
                "database",
                "ok" if ok else "fail",
                f"{db} does not exist yet; it is created on first use",
                "" if ok else f"make {parent} exist and writable",
            )
        ]
    if not db.is_file():
        return [
            Finding(
                "database",
                "fail",
                f"{db} is not a file (a directory?)",
                "point --db / DUALMEM_DB_PATH at the database file",
            )
        ]
    out: list[Finding] = []
    try:
        conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
        try:
            mode = str(conn.execute("PRAGMA journal_mode").fetchone()[0])
            version = schema_version(conn)
            vacuum = int(conn.execute("PRAGMA auto_vacuum").fetchone()[0])
            check_dualmem(conn, db)
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return [Finding("database", "fail", f"{db}: {exc}", "restore the newest backup")]
    except ConfigurationError as exc:
        # Another program's file (or an empty one): the other commands and `dualmem
        # migrate` refuse it, so no finding may suggest running them on it.
        return [
            Finding(
                "database",
                "fail",
                str(exc),
                "point --db / DUALMEM_DB_PATH at the dualmem database",
            )
        ]
    out.append(
        Finding("journal mode", "ok", "WAL")
        if mode.lower() == "wal"
        else Finding(
            "journal mode",
            "warn",
            f"{mode}: readers block the writer",
            "open it once with dualmem (it switches the file to WAL)",
        )
    )
    if version > SCHEMA_VERSION:
        out.append(
            Finding(
                "schema", "fail", f"version {version}, newer than this dualmem", "upgrade dualmem"
            )
        )
    elif version < SCHEMA_VERSION:
        out.append(
            Finding(
                "schema",
                "warn",
                f"version {version}; this dualmem uses {SCHEMA_VERSION}",
                f"dualmem migrate --db {db} (stop the workers first; it backs up)",
            )
        )
    else:
        out.append(Finding("schema", "ok", f"version {version}"))
    if vacuum != 2:
        out.append(
            Finding(
                "auto_vacuum",
                "warn",
                "not INCREMENTAL: purged pages are reused but the file never shrinks",
                f"dualmem purge --db {db} --vacuum (once; a full VACUUM blocks writers)",
            )
        )
    else:
        out.append(Finding("auto_vacuum", "ok", "INCREMENTAL"))
    fmode = stat.S_IMODE(db.stat().st_mode)
    if os.name == "posix" and fmode & stat.S_IROTH:
        out.append(
            Finding(
                "database permissions",
                "warn",
                f"{db} has mode {fmode:o}: any user can read the plaintext levels (3, 4)",
                f"chmod 600 {db} (and its -wal/-shm files)",
            )
        )
    else:
        out.append(Finding("database permissions", "ok", f"mode {fmode:o}"))
    return out


def run_doctor(settings: Settings) -> list[Finding]:
    """Every check, in the order the report shows them."""
    return [
        *check_versions(),
        *check_redis(settings),
        *check_keys(settings),
        *check_database(settings),
    ]
