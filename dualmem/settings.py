"""The one place settings come from: arguments, then ``DUALMEM_*`` environment variables."""

from __future__ import annotations

import dataclasses
import difflib
import errno
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, overload
from urllib.parse import unquote, urlsplit

from redis.connection import parse_url

from acl.crypto import DEFAULT_COMPRESS_THRESHOLD, DEFAULT_MAX_VALUE_BYTES, Keyring
from acl.errors import ConfigurationError, ValidationError
from dualmem.commands import MAX_TTL_SECONDS, check_text

__all__ = [
    "ENV_PREFIX",
    "MAX_TOMBSTONE_TTL",
    "MAX_WAIT_SECONDS",
    "WORKER_SCHED",
    "Settings",
    "check_seconds",
    "load_keyring",
]

log = logging.getLogger(__name__)

ENV_PREFIX = "DUALMEM_"
#: The longest timeout or interval a setting (or ``close(timeout=...)``) may ask for: 11.6
#: days, far below what threading and sockets accept, with room for what waits add to it.
MAX_WAIT_SECONDS = 1_000_000
#: Values of ``Settings.worker_sched``.
WORKER_SCHED = ("batch", "normal")
#: The longest ``tombstone_ttl`` (and ``dualmem purge --tombstone-ttl``), in seconds.
MAX_TOMBSTONE_TTL = 10**12
#: The largest value of each integer setting that reaches Redis or SQLite as a number, or
#: sizes something per unit. Past these a value was accepted, and then the worker (or every
#: put) failed later, again and again, or the construction never ended.
_MOST = {
    # One stream per shard, each in every worker read and in per-shard lists of every
    # process: DualMemory(shards=2**40) never finished building them.
    "shards": 1024,
    # The COUNT of XREADGROUP/XAUTOCLAIM and the rows of one SQLite transaction: at 2**63
    # Redis refused every read and claim, and the worker retried forever.
    "batch_size": 100_000,
    # Stored in the dead letter's row: past 2**63-1 SQLite refused the row, forever.
    "max_deliveries": 10_000,
    # Every attempt may wait a connect and a socket timeout; the key lease's expiry is
    # computed from it, and at 2**63 Redis refused it (every put failed).
    "redis_retries": 100,
    # PRAGMA cache_size is a 32-bit count of KiB: past this it wrapped (2**31 MiB gave 0).
    "sqlite_cache_mb": 2**21,
    # Purge's cut-off is now minus this, in ms: past ~9.2e15 s the SQLite parameter
    # overflowed and every purge failed. 10**12 s (about 31,700 years) leaves room for
    # "keep tombstones for good" and stays far from the overflow.
    "tombstone_ttl": MAX_TOMBSTONE_TTL,
    # The command pool builds its queue of slots up front: 10**9 never finished.
    "max_connections": 10_000,
}


@dataclass(frozen=True)
class Settings:
    """Every dualmem setting, its default and its environment variable (``DUALMEM_<NAME>``).

    >>> s = Settings.load({"shards": "4"}, environ={"DUALMEM_BATCH_SIZE": "200"})
    >>> s.shards, s.batch_size, s.redis_url
    (4, 200, 'memory://')
    >>> Settings.load({"shards": 0})
    Traceback (most recent call last):
    ...
    acl.errors.ConfigurationError: setting shards must be >= 1 (got 0)
    """

    #: ``memory://[name]`` for the in-process fakeredis server, or ``redis://host:port/db``.
    redis_url: str = "memory://"
    #: SQLite database file (created with its directory when missing).
    db_path: str = "dualmem.db"
    #: Key file from ``dualmem keygen``. Embedded default: ``<db_path>.keys`` is created.
    keyring: str | None = None
    #: Base64 AES-256 key, an alternative to ``keyring`` (keep it out of shell history).
    key: str | None = field(default=None, repr=False)
    #: Prefix of every Redis key, so several deployments can share a Redis.
    namespace: str = "dualmem"
    #: Number of command streams; a record's shard is a stable hash of (scope, key).
    shards: int = 1
    #: Start an in-process worker thread (False: run ``dualmem worker`` processes).
    worker: bool = True
    #: Consumer group of the command streams.
    group: str = "persist"
    #: Consumer name of this process's worker (default: host-pid-random).
    consumer: str | None = None
    #: Largest batch the worker reads and commits in one SQLite transaction.
    batch_size: int = 500
    #: How long one XREADGROUP blocks waiting for new commands (real Redis), ms.
    block_ms: int = 100
    #: A pending entry idle this long belongs to a dead consumer and is claimed, ms.
    claim_idle_ms: int = 30_000
    #: Deliveries after which a failing entry goes to ``dead_letters``.
    max_deliveries: int = 3
    #: Commands waiting in one shard's stream beyond which ``put`` raises Backpressure.
    #: A writer reads the length with one write in 64, and with every write once it is
    #: within 64 of the bound: alone it stops exactly there, several writers together can
    #: pass it by at most 64 commands each (63 writes between two reads, and the one that
    #: reads it).
    max_backlog: int = 100_000
    #: Largest serialized value, bytes.
    max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES
    #: Values longer than this (serialized) are lz4-compressed, bytes.
    compress_threshold: int = DEFAULT_COMPRESS_THRESHOLD
    #: Expiry of a cache entry written without a ttl, seconds (0: never expires).
    cache_ttl: int = 3600
    #: Redis socket read/write timeout, seconds.
    socket_timeout: float = 0.25
    #: Redis connect timeout, seconds.
    connect_timeout: float = 0.25
    #: Retries of a failed Redis call (exponential backoff, capped at 50 ms).
    redis_retries: int = 1
    #: Most connections one Redis client (a ``DualMemory``'s commands, its worker's) opens;
    #: a thread finding them all busy waits up to ``socket_timeout`` for one, then
    #: ``StoreUnavailable``. Pub/sub connections (``Subscriber``) are not counted.
    max_connections: int = 100
    #: SQLite busy timeout, ms.
    busy_timeout_ms: int = 5_000
    #: ``close()`` waits at most this long for the worker to drain, seconds.
    close_timeout: float = 10.0
    #: How often the worker snapshots latency metrics into SQLite, seconds.
    metrics_interval: float = 60.0
    #: How often the worker purges expired rows, seconds.
    purge_interval: float = 5.0
    #: Deleted rows keep a tombstone this long so a late, older command cannot revive them, s.
    tombstone_ttl: int = 86_400
    #: How often a process checks its key file for a new active key (``rotate-keys``), s.
    keyring_reload_interval: float = 1.0
    #: SQLite ``synchronous``: NORMAL (a commit survives a process crash) or FULL (it also
    #: survives a power loss or OS crash, at an fsync per worker batch).
    sqlite_synchronous: str = "NORMAL"
    #: Page cache of the worker's SQLite write connection, MiB (SQLite's default is 2).
    #: A batch of new keys touches index pages all over the file; once the database
    #: outgrows the cache each of them is read back from the OS on every batch.
    sqlite_cache_mb: int = 64
    #: CPU scheduling of a ``dualmem worker`` process (Linux): ``batch`` (SCHED_BATCH) or
    #: ``normal``. Persistence is background work; as a batch task the worker still gets
    #: its fair share of the CPUs, but a worker woken by new commands no longer preempts
    #: a writer or redis-server mid-request. On 2 CPUs that took put p95 from ~560 to
    #: ~220-300 µs, lag unchanged (bench/). The embedded worker thread is never changed.
    worker_sched: str = "batch"

    @classmethod
    def load(
        cls,
        overrides: Mapping[str, Any] | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        keyring_object: bool = False,
    ) -> Settings:
        """Build settings: explicit ``overrides`` win, then ``DUALMEM_*`` variables, then defaults.

        ``None`` in ``overrides`` means "not given". Unknown names are a ConfigurationError.
        ``key`` and ``keyring`` are one choice: an argument for either one drops the
        environment's other one, and both given as arguments (or both set in the
        environment) is a ConfigurationError naming both. ``keyring_object`` says the
        caller holds the keyring as a ``Keyring`` object, which is no setting but an
        argument for ``keyring`` all the same.
        A ``DUALMEM_*`` variable that names no setting (a typo) is logged as a warning,
        with the setting it most resembles, once per process; it is not an error, since the
        environment is shared with other programs.
        """
        env = os.environ if environ is None else environ
        known = {f.name: f for f in fields(cls)}
        _warn_unknown(env, known)
        from_env: dict[str, Any] = {}
        for name, f in known.items():
            raw = env.get(ENV_PREFIX + name.upper())
            if raw is not None and raw != "":
                from_env[name] = _parse(name, str(f.type).replace(" | None", ""), raw)
        given: dict[str, Any] = {}
        for name, value in (overrides or {}).items():
            if name not in known:
                raise ConfigurationError(
                    f"unknown setting {name!r}; known settings: {', '.join(sorted(known))}"
                )
            if name in ("key", "keyring") and value == "":
                continue  # not given, as an empty DUALMEM_KEY(RING) is not set
            if value is not None:
                if isinstance(value, os.PathLike):
                    value = os.fspath(value)  # noqa: PLW2901
                given[name] = _coerce(name, str(known[name].type), value)
        _choose_key_source(from_env, given, keyring_object=keyring_object)
        settings = cls(**{**from_env, **given})
        settings.validate()
        return settings

    def replace(self, **changes: Any) -> Settings:
        """A validated copy with ``changes`` applied."""
        new = dataclasses.replace(self, **changes)
        new.validate()
        return new

    @property
    def embedded(self) -> bool:
        """True when Redis is the in-process fakeredis server."""
        return self.redis_url.startswith("memory://")

    @property
    def default_keyring_path(self) -> Path:
        """Where the embedded default keeps its key file: beside the database."""
        return Path(self.db_path + ".keys")

    def default_key_file_exists(self) -> bool:
        """Whether :attr:`default_keyring_path` exists; ``ConfigurationError`` when it
        cannot even be looked up (only "no such file" is False: a name too long for the
        file system, say, raised a bare OSError).

        >>> Settings(db_path="/nonexistent/mem.db").default_key_file_exists()
        False
        """
        path = self.default_keyring_path
        try:
            return path.exists()
        except OSError as exc:
            why = f"cannot use the key file {path} beside db_path {self.db_path}: "
            if exc.errno == errno.ENAMETOOLONG:
                # A db_path name of up to NAME_MAX (255 bytes) is a valid file, but
                # "<name>.keys" is 5 bytes longer: the database could be made, its key
                # file never.
                why += (
                    "its name is too long for the file system (db_path's file name plus "
                    "'.keys'); use a shorter db_path, or pass keyring= / key="
                )
            else:
                why += str(exc.strerror or exc)
            raise ConfigurationError(why) from exc

    @property
    def keyring_file(self) -> Path | None:
        """The key file the keyring is loaded from, if it comes from one (not ``key``)."""
        if self.keyring:
            return Path(self.keyring)
        if self.key:
            return None
        return self.default_keyring_path if self.embedded else None

    @property
    def shown_url(self) -> str:
        """``redis_url`` fit to print or log: a password in it (before the host, or as a
        ``password`` query parameter) is replaced by ``***``.

        >>> Settings(redis_url="redis://:s3cret@db:6379/0").shown_url
        'redis://:***@db:6379/0'
        >>> Settings(redis_url="rediss://app:s3cret@db/1").shown_url
        'rediss://app:***@db/1'
        >>> Settings(redis_url="unix:///run/redis.sock?db=0&password=s3cret").shown_url
        'unix:///run/redis.sock?db=0&password=***'
        """
        return _redacted_url(self.redis_url)

    def __repr__(self) -> str:
        """Every field but ``key``, with ``redis_url`` as :attr:`shown_url` shows it."""
        shown = {f.name: getattr(self, f.name) for f in fields(self) if f.repr}
        shown["redis_url"] = self.shown_url
        return f"Settings({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    def validate(self) -> None:
        """Raise ConfigurationError naming the first bad setting."""
        self._validate_numbers()
        self._validate_text()

    def _validate_numbers(self) -> None:
        for name in (
            "shards",
            "batch_size",
            "max_deliveries",
            "max_backlog",
            "max_value_bytes",
            "sqlite_cache_mb",
            "max_connections",
            # 0 made an idle worker read without blocking in a busy loop (30,000 reads in
            # 3 s, 0.65 of a CPU); Redis's own BLOCK 0 would wait forever instead.
            "block_ms",
        ):
            if getattr(self, name) < 1:
                raise ConfigurationError(f"setting {name} must be >= 1 (got {getattr(self, name)})")
        for name in (
            "claim_idle_ms",
            "compress_threshold",
            "cache_ttl",
            "redis_retries",
            "busy_timeout_ms",
            "tombstone_ttl",
        ):
            if getattr(self, name) < 0:
                raise ConfigurationError(f"setting {name} must be >= 0 (got {getattr(self, name)})")
        for name in (
            "socket_timeout",
            "connect_timeout",
            "close_timeout",
            "metrics_interval",
            "purge_interval",
            "keyring_reload_interval",
        ):
            value = getattr(self, name)
            # Finite, with room for what waits add to it (inf or 1e400 passed here and then
            # raised OverflowError from close() or the first connect).
            if not 0 < value <= MAX_WAIT_SECONDS:
                raise ConfigurationError(
                    f"setting {name} must be > 0 and at most {MAX_WAIT_SECONDS:,} seconds "
                    f"(got {value})"
                )
        for name in ("block_ms", "claim_idle_ms", "busy_timeout_ms"):
            value = getattr(self, name)
            # The same bound in milliseconds: beyond it XREADGROUP's BLOCK, XAUTOCLAIM's
            # min-idle-time or a time_t overflowed and the worker failed or spun.
            if value > MAX_WAIT_SECONDS * 1000:
                raise ConfigurationError(
                    f"setting {name} must be at most {MAX_WAIT_SECONDS * 1000:,} ms (got {value})"
                )
        for name, most in _MOST.items():
            if getattr(self, name) > most:
                raise ConfigurationError(
                    f"setting {name} must be at most {most:,} (got {getattr(self, name)})"
                )
        if self.cache_ttl > MAX_TTL_SECONDS:
            # Beyond it Redis refuses the cache entry's PX inside the put's transaction,
            # after the XADD beside it has run: an error for a write that happened.
            raise ConfigurationError(
                f"setting cache_ttl must be <= {MAX_TTL_SECONDS} seconds (got {self.cache_ttl})"
            )

    def _validate_text(self) -> None:
        self._validate_redis_url()
        if not self.namespace or any(c in self.namespace for c in "{}: \t\n"):
            raise ConfigurationError(
                f"setting namespace={self.namespace!r} must be non-empty without '{{}}:' or spaces"
            )
        if self.sqlite_synchronous.upper() not in ("NORMAL", "FULL", "EXTRA"):
            raise ConfigurationError(
                f"setting sqlite_synchronous={self.sqlite_synchronous!r} must be NORMAL, FULL "
                "or EXTRA"
            )
        if not self.db_path:
            raise ConfigurationError("setting db_path must not be empty")
        if self.key and self.keyring:
            raise ConfigurationError("settings key and keyring are both set: give one")
        for name in ("namespace", "group", "consumer", "db_path", "key", "keyring"):
            # Names of Redis keys and files: a lone surrogate or a NUL passed here and then
            # raised UnicodeEncodeError or ValueError later (a consumer's killed the worker).
            try:
                check_text(name, getattr(self, name), optional=True)
            except ValidationError:
                raise ConfigurationError(
                    f"setting {name} must be valid Unicode without NUL characters"
                ) from None
        if not self.group:
            raise ConfigurationError("setting group must not be empty")
        for name in ("group", "consumer"):
            # They name the worker in its log lines: a line break there forged a line.
            if _CONTROL.search(getattr(self, name) or ""):
                raise ConfigurationError(
                    f"setting {name} must hold no control characters (line breaks, escapes)"
                )
        if self.worker_sched not in WORKER_SCHED:
            raise ConfigurationError(
                f"setting worker_sched={self.worker_sched!r} must be one of "
                f"{', '.join(WORKER_SCHED)}"
            )

    def _validate_redis_url(self) -> None:
        if not (self.redis_url.startswith(("memory://", "redis://", "rediss://", "unix://"))):
            raise ConfigurationError(
                f"setting redis_url={self.shown_url!r} must start with memory://, redis://, "
                "rediss:// or unix://"
            )
        if not self.embedded:
            try:
                parse_url(self.redis_url)  # type: ignore[no-untyped-call]
            except ValueError as exc:
                # urllib's message may quote a piece of the URL, a password's first part
                # as the port: a quote from inside a password is masked.
                secrets = [self.redis_url[a:b] for a, b in _password_spans(self.redis_url)]
                why = re.sub(
                    r"'([^']*)'",
                    lambda m: "'***'" if any(m[1] and m[1] in s for s in secrets) else m[0],
                    str(exc),
                )
                raise ConfigurationError(f"setting redis_url={self.shown_url!r}: {why}") from None
            # redis-py reads the path as the database number and ignores one that is not a
            # number ("/1O" was database 0; a password's unescaped "/" made its first part
            # the port and the rest a path): refused, not a write to the wrong place.
            if self.redis_url.startswith(("redis://", "rediss://")) and not re.fullmatch(
                r"/?(?:[0-9]+/?)?", unquote(urlsplit(self.redis_url).path)
            ):
                raise ConfigurationError(
                    f"setting redis_url={self.shown_url!r}: the path after the host must be a "
                    "database number (redis://host:6379/0); write a '/' in a password as %2F"
                )


# C0 and C1 control characters and DEL.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Up to the last "@" before the path's query or fragment, as urllib splits userinfo (a
# password may hold "@" unescaped, and redis-py accepts it; one holding "/" is masked as
# well, though redis-py refuses it: urllib ends the host at the "/").
_USERINFO_PASSWORD = re.compile(r"(://[^:/@?#]*:)[^?#]*@")
# Else up to the last "@" at all: a password with an unescaped "?" or "#" ends the host
# for urllib, so redis-py refuses the URL, and the error quoting it showed the password.
# (An "@" in a query then masks more than the password: "redis://db:***@b", never less.)
_USERINFO_PASSWORD_BROKEN = re.compile(r"(://[^:/@?#]*:).*@")
# Any case: redis-py reads only "password=", but "PASSWORD=" is a secret to hide too.
_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&#]*", re.IGNORECASE)


@overload
def check_seconds(
    name: str, value: object, *, positive: bool = ..., optional: Literal[False] = ...
) -> float: ...
@overload
def check_seconds(
    name: str, value: object, *, positive: bool = ..., optional: bool
) -> float | None: ...
def check_seconds(
    name: str, value: object, *, positive: bool = False, optional: bool = False
) -> float | None:
    """A wait passed by a caller (``sync``/``close``/``poll`` timeouts, the coordination
    helpers' timeouts and intervals): ``value`` as float seconds, else ``ValidationError``.

    A number (not a bool, not a str) from 0 (more than 0 when ``positive``: an interval
    of 0 would busy-loop) to ``MAX_WAIT_SECONDS``; ``None`` passes, as ``None``, when
    ``optional`` (wait without end). NaN compares false with every bound, so a wait on it
    never ended; inf or 10**400 overflowed in the wait itself.

    >>> check_seconds("timeout", 5)
    5.0
    >>> check_seconds("timeout", float("nan"))
    Traceback (most recent call last):
    ...
    acl.errors.ValidationError: timeout must be a number of seconds in [0, 1,000,000], got nan
    >>> check_seconds("poll_interval", 0, positive=True)
    Traceback (most recent call last):
    ...
    acl.errors.ValidationError: poll_interval must be a number of seconds in (0, 1,000,000], got 0
    >>> check_seconds("timeout", None, optional=True) is None
    True
    """
    if value is None and optional:
        return None
    if not isinstance(value, bool) and isinstance(value, (int, float)):
        try:
            seconds = float(value)
        except OverflowError:  # an int too large for a float: out of range like any other
            seconds = math.inf
        if (seconds > 0 if positive else seconds >= 0) and seconds <= MAX_WAIT_SECONDS:
            return seconds  # NaN fails both comparisons, so it falls through to the error
    low = "(0" if positive else "[0"
    none = "None or " if optional else ""
    raise ValidationError(
        f"{name} must be {none}a number of seconds in {low}, {MAX_WAIT_SECONDS:,}], got {value!r}"
    )


def _redacted_url(url: str) -> str:
    """``url`` with its password masked, whether before the host or as ``?password=``;
    never raises, even on a URL too broken to parse (it goes into error messages).

    >>> _redacted_url("redis://app:s3cret@[::1/0"), _redacted_url("nonsense")
    ('redis://app:***@[::1/0', 'nonsense')
    """
    shown, end = [], 0
    for start, stop in _password_spans(url):
        shown += [url[end:start], "***"]
        end = stop
    return "".join([*shown, url[end:]])


def _password_spans(url: str) -> list[tuple[int, int]]:
    """Where ``url`` holds a password (before the host, as ``password=`` queries), sorted,
    overlaps merged: a query password holding "@" overlaps a userinfo match that ends
    inside it, and both together are masked."""
    spans = [(m.end(1), m.end()) for m in _QUERY_PASSWORD.finditer(url)]
    userinfo = _USERINFO_PASSWORD.search(url) or _USERINFO_PASSWORD_BROKEN.search(url)
    if userinfo:
        spans.append((userinfo.end(1), userinfo.end() - 1))
    merged: list[tuple[int, int]] = []
    for start, stop in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(stop, merged[-1][1]))
        else:
            merged.append((start, stop))
    return merged


def _coerce(name: str, type_name: str, value: Any) -> Any:
    """Check an explicit argument's type (strings are parsed as the environment would be)."""
    base = type_name.replace(" | None", "")
    if isinstance(value, str) and base != "str":
        return _parse(name, base, value, argument=True)
    if name == "key" and isinstance(value, bytes):
        # base64.b64encode() gives bytes: the natural way to pass a key.
        try:
            return value.decode("ascii")
        except UnicodeDecodeError:
            raise ConfigurationError("setting key must be base64 text") from None
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
    }.get(base, True)
    if not ok:
        # A secret (the key, a password in the URL) is never quoted back.
        shown = type(value).__name__ if name in _SECRET_SETTINGS else repr(value)
        raise ConfigurationError(f"setting {name} must be {_a(base)}, got {shown}")
    if base != "float":
        return value
    try:
        return float(value)
    except OverflowError:  # an int past a float's range (10**400)
        raise ConfigurationError(f"setting {name} must be a finite number, got {value!r}") from None


_WARNED: set[str] = set()
#: Settings whose values may hold a secret: error messages name their type only.
_SECRET_SETTINGS = frozenset({"key", "redis_url"})


def _warn_unknown(env: Mapping[str, str], known: Mapping[str, object]) -> None:
    names = sorted(name.upper() for name in known)
    for var in env:
        rest = var[len(ENV_PREFIX) :]
        if var.startswith(ENV_PREFIX) and rest not in names and var not in _WARNED:
            _WARNED.add(var)
            close = difflib.get_close_matches(rest, names, n=1)
            hint = f" (did you mean {ENV_PREFIX}{close[0]}?)" if close else ""
            log.warning("ignoring %s: dualmem has no such setting%s", var, hint)


def _choose_key_source(
    from_env: dict[str, Any], given: dict[str, Any], *, keyring_object: bool
) -> None:
    """Leave at most one of ``key`` and ``keyring`` in ``from_env`` and ``given`` together.

    They are two ways to name one thing, the keyring: an argument for either one must win
    over the environment's other one (the keyring in use decides which records open), so
    a choice of both is refused rather than resolved in silence.

    >>> env = {"keyring": "env.json"}
    >>> _choose_key_source(env, {"key": "a2V5"}, keyring_object=False); env
    {}
    >>> _choose_key_source({}, {"key": "a2V5", "keyring": "k.json"}, keyring_object=False)
    Traceback (most recent call last):
    ...
    acl.errors.ConfigurationError: key and keyring are both given as arguments: pass one
    """
    if keyring_object and "key" in given:
        raise ConfigurationError(
            "key and keyring are both given as arguments (keyring as a Keyring): pass one"
        )
    if "key" in given and "keyring" in given:
        raise ConfigurationError("key and keyring are both given as arguments: pass one")
    if keyring_object or "key" in given or "keyring" in given:
        from_env.pop("key", None)
        from_env.pop("keyring", None)
    elif "key" in from_env and "keyring" in from_env:
        raise ConfigurationError(
            f"{ENV_PREFIX}KEY and {ENV_PREFIX}KEYRING are both set: unset one (they are "
            "two ways to give the one keyring)"
        )


def _a(type_name: str) -> str:
    """``type_name`` with its article: ``an int``, ``a float``."""
    return f"{'an' if type_name[0] in 'aeiou' else 'a'} {type_name}"


def _parse(name: str, type_name: str, raw: str, *, argument: bool = False) -> Any:
    """``raw`` as the setting's type; the error names the argument when it is one (no
    environment variable is involved then), else the ``DUALMEM_*`` variable.

    >>> _parse("batch_size", "int", "five hundred", argument=True)
    Traceback (most recent call last):
    ...
    acl.errors.ConfigurationError: setting batch_size must be an int, got 'five hundred'
    """
    var = ENV_PREFIX + name.upper()
    try:
        if type_name == "bool":
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true/false")
        if type_name == "int":
            return int(raw)
        if type_name == "float":
            return float(raw)
    except ValueError as exc:
        if argument:
            hint = " (true/false, yes/no, on/off or 1/0)" if type_name == "bool" else ""
            raise ConfigurationError(
                f"setting {name} must be {_a(type_name)}{hint}, got {raw!r}"
            ) from exc
        raise ConfigurationError(f"{var}={raw!r} is not a valid {type_name}: {exc}") from exc
    return raw


def load_keyring(settings: Settings) -> Keyring | None:
    """The configured keyring, or ``None`` when no key is configured (never creates one:
    ``DualMemory`` creates the embedded default's key file, operator tools never do).

    A key file that others can read, or that does not exist, is a ``ConfigurationError``.

    >>> load_keyring(Settings(redis_url="redis://127.0.0.1:6379/0")) is None
    True
    """
    if settings.keyring:
        return Keyring.load(settings.keyring)
    if settings.key:
        return Keyring.from_secret(settings.key)
    if settings.embedded and settings.default_key_file_exists():
        return Keyring.load(settings.default_keyring_path)
    return None
