"""Envelopes: serialize (JSON) -> compress (lz4) -> encrypt (AES-256-GCM), and a keyring.

An envelope is the only form a value takes outside the caller's process: in the Redis
cache, in the command stream and in SQLite. Its layout::

    byte 0      version: 1 plaintext (or an encrypted envelope sealed before version 2),
                2 encrypted
    byte 1      flags: 0x01 compressed, 0x02 encrypted
    encrypted:  byte 2 = key id length n, n bytes key id (ASCII),
                (version 2) 8-byte write id, 4-byte big-endian generation, 2-byte
                big-endian length m, m bytes writer (UTF-8), then a 12-byte nonce and the
                ciphertext with its 16-byte GCM tag
    plaintext:  the (possibly compressed) JSON bytes

The GCM additional data is the header (everything before the nonce) plus the record's
scope, key and level, each length-prefixed, so a sealed envelope opens only at the place
it was sealed for: copied to another key, scope or level it raises
:class:`TamperedRecord`. Version 2 also binds the **writer** (the agent id that put the
value: a row that names another writer does not open), a random **write id**, which a
key rotation's re-encryption keeps, and a **generation**, which each re-encryption counts
up: the worker accepts a re-sealed envelope only for the write its row holds and only at
a higher generation (or the same one under the same key: a redelivery), so neither an
older envelope of the record nor the record's own envelope from before a rotation can be
passed off as one.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import secrets
import stat
import struct
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import lz4.block
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from acl.errors import ConfigurationError, MissingKey, TamperedRecord, ValidationError
from acl.levels import ENCRYPTED_LEVELS, Level, as_level
from acl.text import encodes_utf8

__all__ = [
    "DEFAULT_COMPRESS_THRESHOLD",
    "DEFAULT_MAX_VALUE_BYTES",
    "ENVELOPE_VERSION",
    "MAX_JSON_DEPTH",
    "Codec",
    "JsonSerializer",
    "Keyring",
    "Lz4Compressor",
    "Sealing",
    "envelope_key_id",
    "envelope_sealing",
    "fsync_dir",
    "may_be_sealed_by",
]

ENVELOPE_VERSION = 1
#: The version of an encrypted envelope that names its writer and write id.
SEALED_VERSION = 2
WRITE_ID_BYTES = 8
#: Bytes between a version-2 header's key id and its writer's length: write id, generation.
SEALING_BYTES = WRITE_ID_BYTES + 4
FLAG_COMPRESSED = 0x01
FLAG_ENCRYPTED = 0x02
NONCE_BYTES = 12
KEY_BYTES = 32
TAG_BYTES = 16
DEFAULT_COMPRESS_THRESHOLD = 512
DEFAULT_MAX_VALUE_BYTES = 1024 * 1024
MAX_JSON_DEPTH = 100
_KEY_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,32}$")
_KEYRING_FORMAT = "dualmem-keyring"


#: ``json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)``, made
#: once: ``dumps`` builds a new encoder per call when given options (1 µs of a put).
#: ``encode`` keeps no state between calls, so threads share it.
_COMPACT_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


class JsonSerializer:
    """Step 1: a JSON value to compact UTF-8 bytes and back.

    Only values that come back equal are accepted: object keys must be strings (``json``
    would turn ``{1: "a", "1": "b"}`` into ``{"1": "b"}``), and nesting is limited to
    ``MAX_JSON_DEPTH`` (deeper values serialize, but parsing them again can exhaust the
    reader's stack and look like a tampered record).

    >>> JsonSerializer().encode({"a": [1, 2.5, None]})
    b'{"a":[1,2.5,null]}'
    >>> JsonSerializer().encode({1: "a"})
    Traceback (most recent call last):
    ...
    acl.errors.ValidationError: value is not JSON-serializable: object keys must be str, got int
    """

    def encode(self, value: object) -> bytes:
        """Serialize ``value``; anything JSON cannot represent exactly is a ValidationError."""
        if isinstance(value, (dict, list, tuple)):
            _check_shape(value)
        try:
            return _COMPACT_JSON.encode(value).encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise ValidationError(f"value is not JSON-serializable: {exc}") from exc
        except RecursionError as exc:
            raise ValidationError("value is nested too deeply to serialize") from exc

    def decode(self, data: bytes) -> Any:
        """Parse bytes produced by :meth:`encode`."""
        return json.loads(data)


def _check_shape(value: object) -> None:
    """String keys only, nesting at most ``MAX_JSON_DEPTH`` (iterative: no recursion)."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ValidationError(
                f"value is nested deeper than {MAX_JSON_DEPTH} levels (or refers to itself)"
            )
        if isinstance(item, dict):
            for k, v in item.items():
                if not isinstance(k, str):
                    raise ValidationError(
                        f"value is not JSON-serializable: object keys must be str, "
                        f"got {type(k).__name__}"
                    )
                if isinstance(v, (dict, list, tuple)):
                    stack.append((v, depth + 1))
        elif isinstance(item, (list, tuple)):
            stack.extend((v, depth + 1) for v in item if isinstance(v, (dict, list, tuple)))


class Lz4Compressor:
    """Step 2: lz4 block compression above a size threshold, when it actually shrinks.

    The stored size prefix is checked against ``max_bytes`` before decompressing, so a
    forged header cannot make a reader allocate gigabytes.
    """

    def __init__(self, threshold: int, max_bytes: int) -> None:
        self.threshold = threshold
        self.max_bytes = max_bytes

    def encode(self, data: bytes) -> tuple[bytes, bool]:
        """Return ``(bytes, compressed)``."""
        if len(data) <= self.threshold:
            return data, False
        packed: bytes = lz4.block.compress(data, store_size=True)
        if len(packed) >= len(data):
            return data, False
        return packed, True

    def decode(self, data: bytes) -> bytes:
        """Inverse of :meth:`encode` for data that was compressed."""
        if len(data) < 4:
            raise TamperedRecord("compressed payload is truncated")
        (size,) = struct.unpack_from("<I", data)
        if size > self.max_bytes:
            raise TamperedRecord(f"compressed payload claims {size} bytes, over the limit")
        try:
            out: bytes = lz4.block.decompress(data)
        except lz4.block.LZ4BlockError as exc:
            raise TamperedRecord("compressed payload does not decompress") from exc
        return out


class _NonceSource:
    """Random 12-byte GCM nonces, drawn from a per-thread buffer of ``os.urandom`` output.

    ``os.urandom`` is a system call that releases the GIL: in a process with any other busy
    thread (the embedded worker, an application's own threads) each call could wait out
    the interpreter's 5 ms switch interval, and a seal made one per put. One call per
    ``batch`` nonces keeps the same source (the OS CSPRNG, 96 random bits per nonce) without
    that toll. A forked child must never reuse its parent's buffer (that would repeat
    nonces under the same key), so a fork invalidates every buffer.
    """

    def __init__(self, batch: int = 256) -> None:
        self.batch = batch
        self._local = threading.local()
        self._generation = 0
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._forked)

    def _forked(self) -> None:
        self._generation += 1

    def __call__(self) -> bytes:
        local = self._local
        buf: bytes | None = getattr(local, "buf", None)
        if buf is None or local.pos >= len(buf) or local.generation != self._generation:
            buf = local.buf = os.urandom(NONCE_BYTES * self.batch)
            local.pos = 0
            local.generation = self._generation
        pos: int = local.pos
        local.pos = pos + NONCE_BYTES
        return buf[pos : pos + NONCE_BYTES]


_next_nonce = _NonceSource()


def _aad(header: bytes, scope: str, key: str, level: int) -> bytes:
    s = scope.encode("utf-8")
    k = key.encode("utf-8")
    return b"".join(
        (header, struct.pack(">I", len(s)), s, struct.pack(">I", len(k)), k, bytes((level,)))
    )


@dataclass(frozen=True, slots=True)
class _Key:
    key_id: str
    secret: bytes = field(repr=False)  # never in a log line or a traceback
    created_at: str


class Keyring:
    """AES-256 keys by id; one is active for new seals, all of them open old envelopes.

    Keys live in a JSON key file (mode 0600) written by ``dualmem keygen``, or come from a
    base64 secret in an environment variable (see ``dualmem.settings``).

    >>> ring = Keyring.generate()
    >>> ring.active_id in ring.ids
    True
    >>> Keyring.from_json(ring.to_json()).active_id == ring.active_id
    True
    """

    def __init__(self, keys: Iterable[_Key], active_id: str) -> None:
        self._keys: dict[str, _Key] = {}
        for k in keys:
            if not _KEY_ID_RE.match(k.key_id):
                raise ConfigurationError(f"key id {k.key_id!r} must match {_KEY_ID_RE.pattern}")
            if len(k.secret) != KEY_BYTES:
                raise ConfigurationError(
                    f"key {k.key_id!r} is {len(k.secret)} bytes; AES-256 needs {KEY_BYTES}"
                )
            if k.key_id in self._keys:
                # Keeping one of two secrets under one id would make every record the
                # other sealed look tampered with.
                raise ConfigurationError(f"key id {k.key_id!r} appears twice in the keyring")
            self._keys[k.key_id] = k
        if active_id not in self._keys:
            raise ConfigurationError(f"active key id {active_id!r} is not in the keyring")
        self._active_id = active_id
        self._aeads: dict[str, AESGCM] = {kid: AESGCM(k.secret) for kid, k in self._keys.items()}

    @property
    def active_id(self) -> str:
        """Id of the key that seals new envelopes."""
        return self._active_id

    @property
    def ids(self) -> tuple[str, ...]:
        """All key ids, active or retired, that can open envelopes."""
        return tuple(self._keys)

    def aead(self, key_id: str) -> AESGCM:
        """The cipher for ``key_id``; ``MissingKey`` if the keyring lacks it."""
        try:
            return self._aeads[key_id]
        except KeyError:
            raise MissingKey(
                f"no key {key_id!r} in the keyring (it holds {', '.join(self._keys)}); "
                "load the key file that sealed this record"
            ) from None

    @staticmethod
    def _new_id() -> str:
        return "k" + secrets.token_hex(4)

    @classmethod
    def generate(cls) -> Keyring:
        """A keyring with one fresh random key (from the OS CSPRNG)."""
        key = _Key(cls._new_id(), AESGCM.generate_key(bit_length=256), _now_iso())
        return cls([key], key.key_id)

    @classmethod
    def from_secret(cls, secret_b64: str, key_id: str | None = None) -> Keyring:
        """A one-key keyring from a base64 secret (for example an environment variable).

        The default key id is derived from the secret's hash, so it is the same in every
        process that is given the same secret.
        """
        if not isinstance(secret_b64, str):
            raise ConfigurationError(
                f"the key secret must be base64 text, got {type(secret_b64).__name__}"
            )
        try:
            secret = base64.b64decode(secret_b64.strip(), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ConfigurationError("the key secret is not valid base64") from exc
        if key_id is None:
            from hashlib import sha256

            key_id = "e" + sha256(b"dualmem-key-id" + secret).hexdigest()[:8]
        return cls([_Key(key_id, secret, "")], key_id)

    def with_new_key(self) -> Keyring:
        """A copy of this keyring with a fresh key added and made active (for rotation)."""
        key_id = self._new_id()
        while key_id in self._keys:  # 32 random bits: a repeat is rare, never reused
            key_id = self._new_id()
        key = _Key(key_id, AESGCM.generate_key(bit_length=256), _now_iso())
        return Keyring([*self._keys.values(), key], key.key_id)

    def without_key(self, key_id: str) -> Keyring:
        """A copy without ``key_id`` (after rotation re-sealed everything it opened)."""
        if key_id == self._active_id:
            raise ConfigurationError("cannot drop the active key; rotate first")
        return Keyring([k for k in self._keys.values() if k.key_id != key_id], self._active_id)

    def to_json(self) -> str:
        """The key file's JSON text."""
        doc = {
            "format": _KEYRING_FORMAT,
            "version": 1,
            "active": self._active_id,
            "keys": [
                {
                    "id": k.key_id,
                    "key": base64.b64encode(k.secret).decode("ascii"),
                    "created_at": k.created_at,
                }
                for k in self._keys.values()
            ],
        }
        return json.dumps(doc, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "keyring") -> Keyring:
        """Parse a key file's text; ``ConfigurationError`` names what is wrong."""
        try:
            doc = json.loads(text)
            if not isinstance(doc, Mapping) or doc.get("format") != _KEYRING_FORMAT:
                raise ValueError(f"not a dualmem key file (format must be {_KEYRING_FORMAT!r})")
            keys = [
                _Key(
                    str(item["id"]),
                    base64.b64decode(item["key"], validate=True),
                    str(item.get("created_at", "")),
                )
                for item in doc["keys"]
            ]
            active = str(doc["active"])
        except (ValueError, KeyError, TypeError, binascii.Error, RecursionError) as exc:
            raise ConfigurationError(f"{source}: unreadable key file: {exc}") from exc
        return cls(keys, active)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Keyring:
        """Read a key file, refusing one that other users can read.

        >>> Keyring.load("/nonexistent/keys.json")
        Traceback (most recent call last):
        ...
        acl.errors.ConfigurationError: key file /nonexistent/keys.json does not exist: create it ...
        """
        p = _key_path(path)
        try:
            st = p.stat()
        except FileNotFoundError:
            raise ConfigurationError(
                f"key file {p} does not exist: create it with `dualmem keygen --out {p}`"
            ) from None
        except OSError as exc:
            raise ConfigurationError(f"key file {p} cannot be read: {exc}") from exc
        if os.name == "posix" and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            mode = stat.S_IMODE(st.st_mode)
            raise ConfigurationError(
                f"key file {p} is accessible by other users (mode {mode:o}): run chmod 600 {p}"
            )
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigurationError(f"{p}: unreadable key file: not UTF-8 text") from exc
        except OSError as exc:  # a directory, no permission, an I/O error
            raise ConfigurationError(f"key file {p} cannot be read: {exc}") from exc
        return cls.from_json(text, source=str(p))

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        """Write the key file with mode 0600, atomically (temp file + rename, each
        fsynced).

        Without ``overwrite`` an existing file is never replaced: losing a key loses every
        record it sealed.
        """
        p = _key_path(path)
        tmp = p.with_name(f".{p.name}.{secrets.token_hex(4)}.tmp")
        try:
            if p.exists() and not overwrite:
                raise ConfigurationError(f"key file {p} already exists; refusing to overwrite it")
            p.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:  # a file where a directory must be, no permission, too long
            raise ConfigurationError(f"key file {p} cannot be written: {exc}") from exc
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(self.to_json())
                fh.flush()
                os.fsync(fh.fileno())
            if overwrite:
                os.replace(tmp, p)
            else:
                # link() fails if another process created the file meanwhile: first writer wins.
                try:
                    os.link(tmp, p)
                except FileExistsError:
                    raise ConfigurationError(f"key file {p} already exists") from None
                finally:
                    os.unlink(tmp)
        except BaseException:
            if tmp.exists():
                tmp.unlink()
            raise
        fsync_dir(p.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename or link in the directory ``path`` durable: until its entry is on
    disk a power loss can take the new file away (a key file after records were sealed
    with its key, a backup after it was reported done). Best effort where the platform
    cannot open or fsync a directory."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _key_path(path: object) -> Path:
    """``path`` as a key file path; ``ConfigurationError`` for what cannot name a file
    (None, a NUL, a lone surrogate), which raised TypeError, ValueError or
    UnicodeEncodeError deep in the OS calls.

    >>> _key_path("a\\x00b")
    Traceback (most recent call last):
    ...
    acl.errors.ConfigurationError: a key file path must be text without NUL ...
    """
    text = os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
    if not isinstance(text, str) or "\x00" in text or not encodes_utf8(text):
        raise ConfigurationError(
            f"a key file path must be text without NUL or lone surrogates, got {path!r}"
        )
    return Path(text)


def _not_text(**given: object) -> ValidationError:
    """The error for the first of ``given`` (a codec argument) that is not a str; built
    only once a check failed, so the checks themselves stay inline on the hot path."""
    name, value = next((n, v) for n, v in given.items() if not isinstance(v, str))
    return ValidationError(f"{name} must be a str, got {type(value).__name__}")


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def envelope_key_id(envelope: bytes) -> str | None:
    """The key id an envelope was sealed with, or ``None`` for a plaintext envelope."""
    if (
        len(envelope) < 3
        or envelope[0] not in (ENVELOPE_VERSION, SEALED_VERSION)
        or not envelope[1] & FLAG_ENCRYPTED
    ):
        return None
    n = envelope[2]
    return envelope[3 : 3 + n].decode("ascii", "replace")


class Sealing(NamedTuple):
    """What a version-2 envelope's header binds besides its place (see the module doc)."""

    write_id: bytes
    generation: int
    writer: str


def envelope_sealing(envelope: bytes) -> Sealing | None:
    """The :class:`Sealing` of an encrypted envelope; ``None`` for a plaintext envelope,
    one sealed before version 2 (which names none) or a malformed header. Read without a
    key: authentic only once the envelope opens (:meth:`Codec.open`).

    >>> codec = Codec(Keyring.generate())
    >>> env = codec.seal(1, scope="agent:a", key="k", level=Level.PRIVATE, owner="a")
    >>> envelope_sealing(env).writer, envelope_sealing(env).generation
    ('a', 0)
    >>> envelope_sealing(codec.seal(1, scope="swarm:s", key="k", level=Level.SWARM)) is None
    True
    """
    parsed = _sealed_header(envelope)
    return None if parsed is None else parsed[1]


def may_be_sealed_by(envelope: bytes, writer: bytes) -> bool:
    """False only for a version-2 envelope whose header names another ``writer`` (UTF-8
    bytes) or is too short to name one: :func:`envelope_sealing`'s writer check on the
    raw bytes, for the worker's hot path, which takes anything else to the full check.

    >>> codec = Codec(Keyring.generate())
    >>> env = codec.seal(1, scope="agent:a", key="k", level=Level.PRIVATE, owner="a")
    >>> may_be_sealed_by(env, b"a"), may_be_sealed_by(env, b"b")
    (True, False)
    >>> may_be_sealed_by(b"\\x01\\x00{}", b"b")  # plaintext: nothing to check here
    True
    >>> may_be_sealed_by(b"", b"b")  # no envelope at all: the full check decides
    True
    """
    if not envelope or envelope[0] != SEALED_VERSION:
        return True
    if len(envelope) < 3:
        return False
    at = 3 + envelope[2] + SEALING_BYTES
    end = at + 2 + int.from_bytes(envelope[at : at + 2], "big")
    return envelope[at + 2 : end] == writer


def _writer_span(envelope: bytes) -> tuple[int, int] | None:
    """Where a version-2 envelope's writer starts and ends (the nonce follows), else
    ``None`` (another version, or a header cut short)."""
    if len(envelope) < 3 or envelope[0] != SEALED_VERSION or envelope[2] == 0:
        return None
    end = 3 + envelope[2] + SEALING_BYTES + 2
    if len(envelope) < end:
        return None
    stop = end + int.from_bytes(envelope[end - 2 : end], "big")
    return (end, stop) if len(envelope) >= stop else None


def _sealed_header(envelope: bytes) -> tuple[int, Sealing] | None:
    """``(nonce offset, sealing)`` of a version-2 envelope, else ``None``."""
    span = _writer_span(envelope)
    if span is None:
        return None
    end, stop = span
    try:
        writer = envelope[end:stop].decode("utf-8")
    except UnicodeDecodeError:
        return None
    at = 3 + envelope[2]
    write_id = envelope[at : at + WRITE_ID_BYTES]
    generation = int.from_bytes(envelope[at + WRITE_ID_BYTES : at + SEALING_BYTES], "big")
    return stop, Sealing(write_id, generation, writer)


def _where(scope: str, key: str, level: Level) -> str:
    """A record's place, as error messages name it (built only for an error)."""
    return f"{scope}/{key} at level {level.name}"


def _tampered(scope: str, key: str, level: Level, what: str) -> TamperedRecord:
    return TamperedRecord(f"envelope for {_where(scope, key, level)} {what}")


class Codec:
    """The fixed pipeline: serialize -> compress -> encrypt, and its inverse.

    Whether a level is encrypted is decided here and nowhere else. An encrypted level
    with no keyring is a ``ConfigurationError`` at seal time, never plaintext.

    >>> codec = Codec(Keyring.generate())
    >>> env = codec.seal({"confidence": 0.85}, scope="agent:a", key="k", level=Level.PRIVATE)
    >>> b"confidence" in env
    False
    >>> codec.open(env, scope="agent:a", key="k", level=Level.PRIVATE)
    {'confidence': 0.85}
    >>> codec.open(env, scope="agent:a", key="other", level=Level.PRIVATE)
    Traceback (most recent call last):
    ...
    acl.errors.TamperedRecord: envelope failed authentication for agent:a/other at level PRIVATE
    """

    def __init__(
        self,
        keyring: Keyring | None,
        *,
        compress_threshold: int = DEFAULT_COMPRESS_THRESHOLD,
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
    ) -> None:
        if keyring is not None and not isinstance(keyring, Keyring):
            # A path or a secret passed here failed only at the first encrypted seal, as an
            # AttributeError; DualMemory(keyring=...) is the one that takes those.
            raise ConfigurationError(
                f"Codec keyring must be an acl.Keyring or None, got {type(keyring).__name__}"
            )
        for name, number, low in (
            ("compress_threshold", compress_threshold, 0),
            ("max_value_bytes", max_value_bytes, 1),
        ):
            # A str or None here failed at the first seal, as a TypeError from a compare.
            if isinstance(number, bool) or not isinstance(number, int) or number < low:
                raise ConfigurationError(f"Codec {name} must be an int >= {low}, got {number!r}")
        self.keyring = keyring
        self.max_value_bytes = max_value_bytes
        self.serializer = JsonSerializer()
        self.compressor = Lz4Compressor(compress_threshold, max_value_bytes)

    def seal(
        self, value: object, *, scope: str, key: str, level: Level | int | str, owner: str = ""
    ) -> bytes:
        """Encode ``value`` into an envelope bound to ``(scope, key, level)`` and, at the
        encrypted levels, to its writer ``owner`` (the agent id its row will name)."""
        data = self.serializer.encode(value)
        if len(data) > self.max_value_bytes:
            raise ValidationError(
                f"value is {len(data)} bytes serialized; the limit is {self.max_value_bytes} "
                "(setting max_value_bytes)"
            )
        return self.seal_bytes(data, scope=scope, key=key, level=level, owner=owner)

    def seal_bytes(
        self,
        data: bytes,
        *,
        scope: str,
        key: str,
        level: Level | int | str,
        owner: str = "",
        sealing: Sealing | None = None,
    ) -> bytes:
        """Compress and (for encrypted levels) encrypt already-serialized JSON bytes.

        ``sealing`` is for re-encryption only (:meth:`reseal`: the original's write id and
        writer, the next generation); a new write gets a random write id, generation 0.
        """
        if not isinstance(scope, str) or not isinstance(key, str):
            # None went into the AAD as an AttributeError, or (plaintext) was not noticed.
            raise _not_text(scope=scope, key=key)
        if not isinstance(level, Level):
            level = as_level(level)  # "PRIVATE" was not in ENCRYPTED_LEVELS: plaintext
        payload, compressed = self.compressor.encode(data)
        flags = FLAG_COMPRESSED if compressed else 0
        if level not in ENCRYPTED_LEVELS:
            return bytes((ENVELOPE_VERSION, flags)) + payload
        ring = self.keyring
        if ring is None:
            raise ConfigurationError(
                f"level {level.name} is encrypted but no keyring is configured: "
                "set keyring= (a file from `dualmem keygen`) or DUALMEM_KEY"
            )
        if sealing is None:
            if not isinstance(owner, str):
                raise _not_text(owner=owner)
            sealing = Sealing(_next_nonce()[:WRITE_ID_BYTES], 0, owner)
        writer = sealing.writer.encode("utf-8")
        if len(writer) > 0xFFFF:
            raise ValidationError("owner is longer than 65535 bytes")
        if len(sealing.write_id) != WRITE_ID_BYTES or not 0 <= sealing.generation < 1 << 32:
            raise ValueError(f"not a valid sealing: {sealing!r}")
        kid = ring.active_id.encode("ascii")
        header = b"".join(
            (
                bytes((SEALED_VERSION, flags | FLAG_ENCRYPTED, len(kid))),
                kid,
                sealing.write_id,
                sealing.generation.to_bytes(4, "big"),
                len(writer).to_bytes(2, "big"),
                writer,
            )
        )
        nonce = _next_nonce()
        sealed = ring.aead(ring.active_id).encrypt(nonce, payload, _aad(header, scope, key, level))
        return header + nonce + sealed

    def open_bytes(
        self,
        envelope: bytes,
        *,
        scope: str,
        key: str,
        level: Level | int | str,
        owner: str | None = None,
    ) -> bytes:
        """Authenticate, decrypt and decompress an envelope to its JSON bytes.

        With ``owner`` (the writer the record's row names), an envelope sealed by another
        writer raises :class:`TamperedRecord`: whoever can change a row or a stream entry
        cannot make a value look written by someone else. Envelopes sealed before
        version 2 name no writer and are not checked.
        """
        if not isinstance(envelope, bytes):  # None raised TypeError from len()
            raise ValidationError(f"envelope must be bytes, got {type(envelope).__name__}")
        if not isinstance(scope, str) or not isinstance(key, str):
            raise _not_text(scope=scope, key=key)
        if owner is not None and not isinstance(owner, str):
            raise _not_text(owner=owner)  # never equal to a writer: it looked tampered with
        if not isinstance(level, Level):
            level = as_level(level)
        if len(envelope) < 2 or envelope[0] not in (ENVELOPE_VERSION, SEALED_VERSION):
            raise _tampered(scope, key, level, "has an unknown format")
        flags = envelope[1]
        if flags & ~(FLAG_COMPRESSED | FLAG_ENCRYPTED):
            raise _tampered(scope, key, level, "has unknown flags")
        encrypted = bool(flags & FLAG_ENCRYPTED)
        if encrypted != (level in ENCRYPTED_LEVELS):
            # A plaintext envelope planted at an encrypted level (or the reverse) is an
            # attack on the level, not a format we accept.
            raise _tampered(scope, key, level, "does not match the level's encryption")
        if envelope[0] == SEALED_VERSION and not encrypted:
            raise _tampered(scope, key, level, "has an unknown format")
        payload = self._decrypt(envelope, scope, key, level, owner) if encrypted else envelope[2:]
        if flags & FLAG_COMPRESSED:
            return self.compressor.decode(payload)
        return payload

    def _decrypt(
        self,
        envelope: bytes,
        scope: str,
        key: str,
        level: Level,
        owner: str | None,
    ) -> bytes:
        """The (possibly compressed) payload of an encrypted envelope, authenticated."""
        if len(envelope) < 3:
            raise _tampered(scope, key, level, "is truncated")
        n = envelope[2]
        start = 3 + n
        if envelope[0] == SEALED_VERSION:
            span = _writer_span(envelope)
            if span is None:
                raise _tampered(scope, key, level, "is truncated")
            try:
                writer = envelope[span[0] : span[1]].decode("utf-8")
            except UnicodeDecodeError:
                raise _tampered(scope, key, level, "is truncated") from None
            start = span[1]
            if owner is not None and writer != owner:
                raise _tampered(
                    scope,
                    key,
                    level,
                    f"was sealed by {writer!r}, not by its recorded writer {owner!r}",
                )
        if n == 0 or len(envelope) < start + NONCE_BYTES + TAG_BYTES:
            raise _tampered(scope, key, level, "is truncated")
        try:
            kid = envelope[3 : 3 + n].decode("ascii")
        except UnicodeDecodeError as exc:
            raise _tampered(scope, key, level, "has a malformed key id") from exc
        if self.keyring is None:
            raise ConfigurationError(
                f"record {_where(scope, key, level)} is encrypted but no keyring is configured"
            )
        aead = self.keyring.aead(kid)
        nonce = envelope[start : start + NONCE_BYTES]
        aad = _aad(envelope[:start], scope, key, level)
        try:
            return aead.decrypt(nonce, envelope[start + NONCE_BYTES :], aad)
        except InvalidTag:
            raise TamperedRecord(
                f"envelope failed authentication for {_where(scope, key, level)}"
            ) from None

    def open(
        self,
        envelope: bytes,
        *,
        scope: str,
        key: str,
        level: Level | int | str,
        owner: str | None = None,
    ) -> Any:
        """Inverse of :meth:`seal`: the value, or ``TamperedRecord`` / ``MissingKey``
        (``owner``: see :meth:`open_bytes`)."""
        data = self.open_bytes(envelope, scope=scope, key=key, level=level, owner=owner)
        try:
            return self.serializer.decode(data)
        except (ValueError, RecursionError) as exc:
            raise TamperedRecord(f"envelope for {scope}/{key} holds malformed JSON") from exc

    def reseal(self, envelope: bytes, *, scope: str, key: str, level: Level) -> bytes | None:
        """Re-encrypt under the active key; ``None`` if already sealed with it (rotation).

        The new envelope keeps the original's writer and write id, at the next
        generation, so the worker can tell it re-encrypts that write, later than the row's
        envelope; one sealed before version 2 stays in that form.
        """
        if level not in ENCRYPTED_LEVELS or self.keyring is None:
            return None
        if envelope_key_id(envelope) == self.keyring.active_id:
            return None
        data = self.open_bytes(envelope, scope=scope, key=key, level=level)
        was = envelope_sealing(envelope)
        if was is None:
            return self._seal_legacy(data, scope=scope, key=key, level=level)
        nxt = was._replace(generation=was.generation + 1)
        return self.seal_bytes(data, scope=scope, key=key, level=level, sealing=nxt)

    def _seal_legacy(self, data: bytes, *, scope: str, key: str, level: Level) -> bytes:
        # A version-1 envelope re-encrypted as one: it names no writer to keep, and a
        # version 2 with a new write id would not pass as a re-encryption of its write.
        assert self.keyring is not None
        payload, compressed = self.compressor.encode(data)
        flags = (FLAG_COMPRESSED if compressed else 0) | FLAG_ENCRYPTED
        kid = self.keyring.active_id.encode("ascii")
        header = bytes((ENVELOPE_VERSION, flags, len(kid))) + kid
        nonce = _next_nonce()
        aead = self.keyring.aead(self.keyring.active_id)
        return header + nonce + aead.encrypt(nonce, payload, _aad(header, scope, key, level))
