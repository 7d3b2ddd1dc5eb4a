"""``dualmem mirror``: one JSON file per record, kept in sync with the change feed.

Layout: ``DIR/<scope>/<key>.json`` (both percent-encoded, so any key is one safe file
name; a leading ``.`` too, as ``%2E``, so no record file is a hidden name; very long names
become ``~<sha256>.json``, the file holds the real key) and
``DIR/.dualmem-mirror.json``, the mirror's state: the journal ``seq`` it has applied and,
per file, the hash and stream id it last wrote, the stream ids of its imports still in
flight with the saves they carry, and those of imports reported lost. The state is saved
after every cycle, so a stopped mirror resumes from its position, its imports in flight
too. A cycle is all or nothing as far as hand edits go: it writes no file before its
imports and events are sent, and one whose send fails (``Backpressure``,
``StoreUnavailable``: nothing sent) leaves the files and the state as they were, so the
next cycle, of this mirror or a restarted one, does the same work again. The imports
and events being sent are in ``DIR/.dualmem-mirror-sending.json`` until the state names
them: a cycle that ended in between (killed, or a reply lost) is settled by the next one,
which finds them in the streams, committed or dead-lettered, and adopts the state that
cycle was about to save; files whose verdict it sent are rewritten, not judged again. Files are
written 0600 and the directories it creates are 0700 (levels 3 and 4 are in the clear;
so is the state's copy of the saves in flight).

Each cycle first looks for files edited by hand (their hash differs from the state):

* the record did not change in SQLite since the file was written: the edit is imported
  (through the stream, like any put; actor ``mirror``); the mirror's own imports of
  earlier edits of the file are no change (their stream ids are in the state), nor is the
  missing row of a new file whose first import has not committed yet; an edit
  may set ``expires_at`` in the past: the record expires, and its file goes once the
  import commits; an edit that puts back what SQLite holds is imported too while an
  earlier import of the file is in flight (the last save wins);
* it did change: **SQLite wins**, the file is rewritten from SQLite;
* the file is not valid (bad JSON, another scope/key/level, a value that does not seal):
  it is rejected and rewritten from SQLite (a new, untracked file is left alone);
* a tracked file that was deleted is restored (records are deleted through the API),
  from SQLite.

A file rewritten from SQLite keeps the ids of its imports still in flight: once they
commit, the rows they leave are the mirror's own, not changes to defend its next save
against. While imports of a file are in flight, the journal's changes to its record do
not rewrite it: it keeps the last save until the last of them is read (rewritten to an
earlier one, it would show an older save), and a save made meanwhile is checked against
the row the imports read so far left. An import that will never commit is in flight no
more: one the worker dead-lettered is a ``mirror.failed`` event (with the save, for
plaintext levels; ``dualmem dlq replay`` sends it again, and a replay is followed as the
import itself; the file keeps the ids of its last 16 failed imports, so a replay made
after the event, once read from the journal, is the mirror's own import too), and the
file is rewritten from SQLite once nothing else of it is in flight; one gone from the
stream that SQLite does not know either (Redis lost it) is a ``mirror.failed`` event
too, never sent again (a worker that still held it may commit it later: sent again, it
would be written twice). Each import in flight keeps the save it carries (``holds``, the
save itself for plaintext levels) through restores, rejections, conflicts and replays,
so the failed event has it whatever the file shows by then; a new record's file deleted
while its import is in flight keeps its entry (no file), and an import reported lost
that commits after all is the mirror's own, followed by the file.

Each import, conflict, rejection, restore and failed import is an audit event
``mirror.<kind>`` that the worker also records in ``sync_events`` (see
``dualmem.projection``); for plaintext levels the discarded file content is kept in the
event's detail. Then the cycle applies the journal changes since its position to the
files. Encrypted records are mirrored sealed (``envelope``, base64), never in the clear.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote

from acl.crypto import Codec, Sealing, envelope_sealing, fsync_dir
from acl.errors import ConfigurationError, DualMemError
from acl.levels import ENCRYPTED_LEVELS, Level
from acl.policy import level_of_scope, stored_level
from dualmem.errors import Backpressure, KeyDropped
from dualmem.ops.database import NO_PROGRESS, ProgressFn
from dualmem.ops.runtime import AuditEvent, Runtime, Write
from dualmem.ops.transfer import (
    LineError,
    check_projectable,
    line_envelope,
    line_expiry,
    line_identity,
)
from dualmem.ops.verify import Check
from dualmem.projection import SYNC_EVENT_PREFIX
from dualmem.redis_backend import text, translate_errors
from dualmem.sqlite_store import follow_replays
from dualmem.worker import last_entry_ids

__all__ = [
    "ACTOR",
    "STATE_FILE",
    "CycleReport",
    "Mirror",
    "MirrorState",
    "check_mirror",
    "record_path",
    "render_record",
]

STATE_FILE = ".dualmem-mirror.json"
#: A cycle's imports and events while it sends them (see ``Mirror._send``): written
#: before the send, removed once the state that names them is saved.
SENDING_FILE = ".dualmem-mirror-sending.json"
ACTOR = "mirror"
_STATE_FORMAT = "dualmem-mirror"
_SENDING_FORMAT = "dualmem-mirror-sending"
#: Stream entries read per XRANGE while a cycle's send is looked for (see _find_sent).
_SCAN_PAGE = 1000
_MAX_NAME = 200
_COLUMNS = "scope, key, level, owner, envelope, updated_at, expires_at, stream_id"
_LIVE = "envelope IS NOT NULL AND (expires_at IS NULL OR expires_at > ?)"
_ROW_SQL = f"SELECT {_COLUMNS} FROM memory WHERE scope = ? AND key = ? AND {_LIVE}"

Row = tuple[str, str, int, str, bytes, int, int | None, str]


def record_path(directory: Path, scope: str, key: str) -> Path:
    """Where the mirror keeps the record ``(scope, key)``.

    >>> record_path(Path("m"), "project:shop", "spec/login").as_posix()
    'm/project:shop/spec%2Flogin.json'

    A leading ``.`` is escaped too (``quote`` keeps it): a hidden name would be skipped
    by the mirror's own scan (``_files``) like its temporary files.

    >>> record_path(Path("m"), "project:shop", ".env").as_posix()
    'm/project:shop/%2Eenv.json'
    """
    name = quote(key, safe="") + ".json"
    if name.startswith("."):
        name = "%2E" + name[1:]
    if len(name.encode()) > _MAX_NAME:
        name = "~" + hashlib.sha256(key.encode()).hexdigest() + ".json"
    return directory / quote(scope, safe=":") / name


def render_record(row: Row, codec: Codec) -> bytes:
    """The file content of a row: its value in the clear, or sealed for encrypted levels."""
    scope, key, level_no, owner, envelope, updated_at, expires_at, stream_id = row
    level = stored_level(scope, level_no)  # TamperedRecord if the level column was edited
    doc: dict[str, Any] = {
        "scope": scope,
        "key": key,
        "level": int(level),
        "owner": owner,
        "updated_at": updated_at,
        "expires_at": expires_at,
        "stream_id": stream_id,
    }
    if level in ENCRYPTED_LEVELS:
        doc["envelope"] = base64.b64encode(bytes(envelope)).decode("ascii")
    else:
        doc["value"] = codec.open(bytes(envelope), scope=scope, key=key, level=level, owner=owner)
    return (json.dumps(doc, ensure_ascii=False, indent=2) + "\n").encode("utf-8")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class MirrorState:
    """What the mirror has applied: journal position and one entry per file it wrote."""

    seq: int = 0
    levels: list[int] = field(default_factory=list)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    #: When the state was last saved (ns): files stamped well before it are "settled".
    saved_ns: int = 0
    #: The newest audit row seen (a key rotation re-seals rows without a journal entry).
    audit_id: int = 0
    #: ``[scope, key]`` of records whose file a cycle decided to rewrite from SQLite and
    #: has not yet (saved before the files are written; a file saved again meanwhile is
    #: judged by the next cycle, then rewritten if it still must be).
    recheck: list[list[str]] = field(default_factory=list)
    #: Of those files, what the scan that decided it judged each to hold (its sha256;
    #: None: no file), its verdict (a conflict, a rejection, a restore) sent with the
    #: cycle: a file still holding that is rewritten without being judged, and reported,
    #: again.
    reported: dict[str, str | None] = field(default_factory=dict)

    @classmethod
    def load(cls, directory: Path) -> MirrorState | None:
        """The saved state, ``None`` for a directory that is not (yet) a mirror."""
        path = directory / STATE_FILE
        if not path.exists():
            return None
        try:
            return cls.from_doc(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise ConfigurationError(f"{path} is not a dualmem mirror state: {exc}") from exc

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> MirrorState:
        """The state a document of :meth:`to_doc` holds (``ValueError``, ``KeyError`` or
        ``TypeError`` for one that is not)."""
        if doc.get("format") != _STATE_FORMAT:
            raise ValueError(f"format is not {_STATE_FORMAT!r}")
        return cls(
            int(doc["seq"]),
            list(doc["levels"]),
            dict(doc["files"]),
            dict(doc.get("rejected", {})),
            int(doc.get("saved_ns", 0)),
            int(doc.get("audit_id", 0)),
            [[str(sc), str(k)] for sc, k in doc.get("recheck", [])],
            {str(rel): sha for rel, sha in doc.get("reported", {}).items()},
        )

    def to_doc(self, saved_ns: int) -> dict[str, Any]:
        """The state as the JSON document it is saved as, saved at ``saved_ns``."""
        return {
            "format": _STATE_FORMAT,
            "version": 1,
            "seq": self.seq,
            "levels": self.levels,
            "files": self.files,
            "rejected": self.rejected,
            "saved_ns": saved_ns,
            "audit_id": self.audit_id,
            "recheck": self.recheck,
            "reported": self.reported,
        }

    def save(self, directory: Path) -> None:
        """Write the state atomically (temp file, fsync, rename); ``saved_ns`` becomes
        the time of this save, as a mirror restarted from the file would see it."""
        now = time.time_ns()
        doc = self.to_doc(now)
        _atomic_write(
            directory / STATE_FILE,
            json.dumps(doc, indent=1, sort_keys=True).encode(),
            sync_dir=True,
        )
        self.saved_ns = now


def _atomic_write(path: Path, data: bytes, *, sync_dir: bool = False) -> None:
    # Only its owner can read a mirror, whatever the umask (as `backup` and `export`):
    # levels 3 and 4 are in the clear, and every key name is.
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with open(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    if sync_dir:
        # The rename too, for the mirror's own files (the state, the sending file): a
        # power loss after the send must not bring the old one back. A record's file
        # is rewritten from SQLite by the next cycle if it goes.
        fsync_dir(path.parent)


def _follow(
    conn: sqlite3.Connection, shard: int, sid: str
) -> tuple[str | None, tuple[int, str] | None]:
    """What became of the command ``sid`` of ``shard`` as the dead letters tell it:
    ``(id, None)``, in flight or committed under ``id`` (``sid``, or the replay of its dead
    letter, followed by ``follow_replays`` as ``Store.status`` follows it);
    ``(None, (letter, error))``, dead-lettered and not replayed; ``(None, None)``,
    replayed under an id not recorded (a replay older than schema 4)."""
    end = follow_replays(conn, shard, sid)
    if end.state == "dead":
        return None, end.letter
    if end.state == "unrecorded":
        return None, None
    return end.stream_id, None  # open, or the replay past the last letter followed


def _holds(entry: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The saves a file's imports in flight carry, by stream id: each its ``sha256`` and,
    for plaintext levels, the ``save`` itself (what a failed event reports as discarded
    when it never commits, whatever the file shows by then)."""
    holds = entry.get("holds")
    if not isinstance(holds, dict):
        # A state from before saves were kept per import: the id of the import of the
        # save the file holds, if any.
        holds = {holds: {"sha256": entry.get("sha256")}} if isinstance(holds, str) else {}
        entry["holds"] = holds
    return holds


#: Ids of imports reported lost kept per file, known as the mirror's own if a worker that
#: still held one commits it after all.
_MAX_LOST = 16


def _in_flight(entry: dict[str, Any] | None, seen: Collection[str]) -> dict[str, Any]:
    """What of a file's state ``entry`` stays with the file whatever it shows now (a
    restore, a conflict, a rejection, a new save): its imports still in flight (not read
    from the journal: not in ``seen``), the saves they carry, and the imports reported
    lost. Once they commit, the rows they leave are the mirror's own, not changes in SQLite
    to defend the file's next save against; if they never do, the failed event has the
    save."""
    if not entry:
        return {}
    kept: dict[str, Any] = {}
    sent = [i for i in entry.get("sent", ()) if i not in seen]
    if sent:
        kept["sent"] = sent
        holds = _holds(entry)
        kept["holds"] = {i: holds[i] for i in sent if i in holds}
    lost = [i for i in entry.get("lost", ()) if i not in seen]
    if lost:
        kept["lost"] = lost
    if entry.get("failed"):
        kept["failed"] = list(entry["failed"])
    return kept


def _sent_as(
    fields: Mapping[bytes, bytes],
    stamp: bytes,
    where: Mapping[tuple[str, str, str, str], int],
) -> int | None:
    """Which of a send's commands (its index in ``where``) a stream entry's ``fields``
    are: a put or an audit event with the send's time ``stamp`` on one of its records;
    ``None`` for any other."""
    if fields.get(b"t") != stamp:
        return None
    op = fields.get(b"op", b"").decode(errors="replace")
    event = fields.get(b"ev", b"").decode(errors="replace") if op == "audit" else ""
    scope, key = fields.get(b"s", b""), fields.get(b"k", b"")
    return where.get((op, event, scope.decode(errors="replace"), key.decode(errors="replace")))


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _current(path: Path) -> str | None:
    """The sha256 of the file at ``path`` now; None when there is none."""
    try:
        return _sha(path.read_bytes())
    except FileNotFoundError:
        return None


_STAMP = ("mtime_ns", "size")
_RACY_NS = 1_000_000_000


def _stamp(path: Path) -> dict[str, int]:
    """What a file's stat says about its content: unchanged stamp, unchanged file."""
    st = path.stat()
    return {"mtime_ns": st.st_mtime_ns, "size": st.st_size}


def _files(directory: Path) -> Iterator[Path]:
    for scope_dir in sorted(p for p in directory.iterdir() if p.is_dir()):
        for f in sorted(scope_dir.iterdir()):
            if f.is_file() and f.suffix == ".json" and not f.name.startswith("."):
                yield f


@dataclass
class CycleReport:
    """What one mirror cycle did."""

    seq: int = 0
    written: int = 0
    removed: int = 0
    imported: int = 0
    conflicts: int = 0
    rejected: int = 0
    restored: int = 0
    #: Imports in flight the worker dead-lettered (each a ``mirror.failed`` event).
    failed: int = 0
    events: list[str] = field(default_factory=list)
    #: Of the imports and of the events (``sync_events``), for ``Runtime.wait``.
    receipts: list[Any] = field(default_factory=list)


class Mirror:
    """Keeps ``directory`` in sync with the database of ``runtime``."""

    def __init__(
        self,
        runtime: Runtime,
        directory: str | Path,
        *,
        levels: Collection[Level] | None = None,
    ) -> None:
        self.runtime = runtime
        self.codec = runtime.codec
        self.dir = Path(directory)
        if self.dir.exists() and not self.dir.is_dir():
            raise ConfigurationError(f"{self.dir} exists and is not a directory")
        for d in [*reversed(self.dir.parents), self.dir]:
            if not d.exists():  # every directory the mirror creates is 0700, parents too
                d.mkdir(mode=0o700, exist_ok=True)
        wanted = sorted(int(lv) for lv in (levels or Level))
        state = MirrorState.load(self.dir)
        if state is not None and levels and state.levels != wanted:
            raise ConfigurationError(
                f"{self.dir} mirrors levels {state.levels}, not {wanted}: use the same "
                "--level options or another directory"
            )
        self.state = state or MirrorState(levels=wanted)
        self.fresh = state is None

    # -- one cycle ------------------------------------------------------------------

    def cycle(self, now_ms: int, progress: ProgressFn = NO_PROGRESS) -> CycleReport:
        """Import hand edits, apply journal changes, drop expired files, save the state.

        All or nothing as far as hand edits go: the files are first written once the
        cycle's imports and events are sent, and the state is saved right after the
        send. A cycle that fails before (a send refused: ``Backpressure``,
        ``StoreUnavailable``) leaves the files as they were and the state as last saved,
        so the next cycle (this object, or a restarted mirror) does the same work again:
        no save overwritten, every event sent. A cycle that ends after its send and before
        that state save (a kill, a reply lost) leaves its imports and events in
        ``SENDING_FILE``: the next cycle looks for them first and, found, takes the state
        this one was about to save (see ``_settle_sending``), so nothing is sent twice. A file saved
        again after the scan judged it is not rewritten: the next cycle judges that
        save."""
        self._sent = False
        try:
            return self._cycle(now_ms, progress)
        except BaseException:
            if not self._sent:
                # Nothing of this cycle reached the stream: forget what it changed in
                # memory (ids dropped from ``sent``, hashes of edited files, ...).
                self.state = MirrorState.load(self.dir) or MirrorState(levels=self.state.levels)
            raise

    def _cycle(self, now_ms: int, progress: ProgressFn) -> CycleReport:
        # Edits are sealed with the active key: learn a rotation's new key first.
        self.runtime.refresh_keys()
        self._settle_sending()
        report = CycleReport()
        writes: list[Write] = []
        events: list[AuditEvent] = []
        # Each import's file, its state entry before, its event and the save it carries
        # (``_hold``): undone if refused.
        self._imports: list[tuple[str, dict[str, Any] | None, AuditEvent, dict[str, Any]]] = []
        # The files the scan rewrites from SQLite (conflicts, rejections, restores):
        # rewritten once the cycle's events are sent, never before (a failed send would
        # leave a conflicting save overwritten and in no event).
        self._later: list[Callable[[], None]] = []
        self._later_keys: set[tuple[str, str]] = set()
        # What the scan judged each file to hold (its sha256; absent: None): a file
        # rewritten after the send is first checked against it (see _refresh).
        self._judged: dict[str, str | None] = {}
        path = self.runtime.settings.db_path
        conn = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True)
        try:
            conn.execute("BEGIN")  # one read snapshot for the whole cycle
            head = int(conn.execute("SELECT COALESCE(MAX(seq), 0) FROM journal").fetchone()[0])
            audit_head = int(
                conn.execute("SELECT COALESCE(MAX(id), 0) FROM audit_log").fetchone()[0]
            )
            changed = self._changed(conn, head)
            self._seen: dict[tuple[str, str], set[str]] = changed
            self._own: dict[tuple[str, str], set[str]] = {}
            failed = self._settle_imports(conn, changed, events, report)
            self._scan_edits(conn, now_ms, changed, writes, events, report)
            # Every file this cycle decided to rewrite from SQLite, until it is: saved
            # with the state before any file is written, so a cycle that ends in between
            # (a full disk, a kill) leaves them to the next one.
            recheck = {(sc, k) for sc, k in self.state.recheck} | failed | self._later_keys
            self.state.recheck = sorted([sc, k] for sc, k in recheck)
            for sc, k in self._later_keys:
                rel = self._rel(sc, k)
                self.state.reported[rel] = self._judged.get(rel)
            if writes or events:
                self._send(writes, events, report)
                # Saved before any file is written: a file write that fails now (a full
                # disk) ends the cycle, and the next one must know what was sent, not
                # send it again. (The journal position stays: the next cycle reads the
                # same changes, which rewrites nothing twice.)
                self.state.save(self.dir)
                _unlink(self.dir / SENDING_FILE)  # the state names the imports' ids now
            self._sent = True
            for rewrite in self._later:
                rewrite()
            targets = set(changed) | recheck
            if self.fresh or self._rotated(conn, audit_head):
                # Besides the records the journal changed: one deleted since is not
                # live, and its file must go.
                targets |= self._all_live(conn, now_ms)
            # A file imported in this cycle keeps its hand edit until the import commits
            # (a later cycle writes it back from SQLite): refreshed now, a refused send
            # (KeyDropped) would leave the edit overwritten and lost.
            targets = targets - {(w.scope, w.key) for w in writes}
            self._apply(conn, sorted(targets), changed, now_ms, report, progress)
            self._expire(conn, now_ms, report, skip={rel for rel, *_ in self._imports})
            self._forget_read(changed)
            conn.execute("COMMIT")
        finally:
            conn.close()
        self.state.seq = report.seq = head
        self.state.audit_id = audit_head
        self.state.save(self.dir)
        self.fresh = False
        return report

    def _send(self, writes: list[Write], events: list[AuditEvent], report: CycleReport) -> None:
        """Send the cycle's imports and events (``Runtime.send``: all or none)."""
        # Their stream ids exist only once Redis has added the commands: a cycle that
        # ends between the send and the state save that names them (a kill, a reply
        # lost) would not know its imports, nor that its events went. So the imports,
        # the events, the time their commands carry and the state to adopt once they
        # are found go to a file first; the next cycle looks for them
        # (_settle_sending) if the state was not saved.
        now_us = time.time_ns() // 1000
        self._write_sending(writes, events, now_us)
        try:
            # The events' receipts too: waiting on them means the sync_events rows
            # are committed as well as the imports.
            report.receipts = self.runtime.send(
                writes, audits=events, audit_receipts=True, now_us=now_us
            )
        except Backpressure:
            _unlink(self.dir / SENDING_FILE)  # refused before anything was written
            raise
        except KeyDropped as exc:
            _unlink(self.dir / SENDING_FILE)  # refused before anything was written
            # Sealed under a key a rotation is dropping: nothing was sent. The imports
            # are undone (the next cycle reads the same edits again and seals them
            # with the key file's active key); everything else this cycle did to the
            # files (conflicts, rejections, restores) stands, with its events.
            refused = {id(event) for _, _, event, _ in self._imports}
            for rel, before, _, _ in reversed(self._imports):
                if before is None:
                    self.state.files.pop(rel, None)
                else:
                    self.state.files[rel] = before
            report.imported = 0
            report.events.append(f"edits not sent ({exc}); the next cycle seals them again")
            kept = [e for e in events if id(e) not in refused]
            report.receipts = []
            if kept:
                # A send of its own, recorded as the first was: a reply lost now must
                # not leave the next cycle to send these events a second time.
                now_us = time.time_ns() // 1000
                self._write_sending([], kept, now_us, imports=[])
                report.receipts = self.runtime.send(
                    [], audits=kept, audit_receipts=True, now_us=now_us
                )
            return
        self._sent = True
        # Each import's stream id: when it commits, the journal entry and the row
        # it leaves are the mirror's own, not a change in SQLite to defend the
        # file's next edit against.
        sent = report.receipts[: len(writes)]
        for (rel, _, _, hold), receipt in zip(self._imports, sent, strict=True):
            # The entry is the import's own (nothing after _edited replaces it);
            # tolerate one that is not: the imports are sent, the state must be saved.
            entry = self.state.files.get(rel)
            if entry is not None:
                entry.setdefault("sent", []).append(receipt.stream_id)
                # The save the import carries: if it never commits, that save is
                # what the failed event reports, whatever the file shows by then.
                _holds(entry)[receipt.stream_id] = hold

    def _write_sending(
        self,
        writes: list[Write],
        events: list[AuditEvent],
        now_us: int,
        *,
        imports: list[tuple[str, dict[str, Any] | None, AuditEvent, dict[str, Any]]] | None = None,
    ) -> None:
        """Before the send: each import (its file, record, writer, the file's state entry
        before this cycle and the save it carries) and each event, the time their
        commands carry, and the state as it will be saved once the send is done, but for
        the imports' ids. ``imports``: the cycle's (``_imports``) unless given."""
        sending = [
            {
                "file": rel,
                "scope": w.scope,
                "key": w.key,
                "actor": w.actor,
                "before": before,
                "hold": hold,
            }
            for (rel, before, _, hold), w in zip(
                self._imports if imports is None else imports, writes, strict=True
            )
        ]
        records = [(w.scope, w.key) for w in writes] + [
            (e.scope or "", e.key or "") for e in events
        ]
        doc = {
            "format": _SENDING_FORMAT,
            "version": 1,
            "now_us": now_us,
            "after": self._stream_tops(records),
            "imports": sending,
            "events": [
                {"event": e.event, "scope": e.scope or "", "key": e.key or ""} for e in events
            ],
            "state": self.state.to_doc(time.time_ns()),
        }
        _atomic_write(
            self.dir / SENDING_FILE, json.dumps(doc, sort_keys=True).encode(), sync_dir=True
        )

    def _streams_of(self, records: Iterable[tuple[str, str]]) -> list[bytes]:
        """The command streams that commands on ``records`` (scope, key) go to."""
        layout = self.runtime.layout
        return sorted({layout.stream(layout.shard_of(sc, k)) for sc, k in records})

    def _stream_tops(self, records: list[tuple[str, str]]) -> dict[str, str]:
        """Before a send: the id of the last entry of each stream the send writes to
        (``"0-0"``: empty or absent). Every entry the send adds comes after it (a
        stream's ids only grow), so a look for the send (``_find_sent``) reads from there
        instead of the whole stream, which holds the whole backlog while a worker is
        down. One round trip; raises ``StoreUnavailable`` (nothing sent) when Redis is
        unavailable."""
        streams = self._streams_of(records)
        with translate_errors("mirror: read the streams before a send"):
            tops = last_entry_ids(self.runtime.client, streams)
        return {text(s): top or "0-0" for s, top in zip(streams, tops, strict=True)}

    def _settle_sending(self) -> None:
        """Finish the send of a cycle that ended before the state naming what it sent was
        saved (the mirror killed right after the send, or a send whose reply was lost).

        Its commands (imports and events, one transaction: all arrived or none) are
        looked for where a command can be: in its stream, committed (the journal, the
        sync events), or dead-lettered (:meth:`_find_sent`). Found: the state that cycle
        was about to save is adopted, with the imports' stream ids, as if it had saved
        it. Not found: nothing arrived, and the state saved before stands, so this cycle
        does that work again.
        """
        path = self.dir / SENDING_FILE
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            if doc.get("format") != _SENDING_FORMAT:
                raise ValueError(f"format is not {_SENDING_FORMAT!r}")
            now_us = int(doc["now_us"])
            imports = list(doc["imports"])
            commands = [("put", "", imp["scope"], imp["key"]) for imp in imports] + [
                ("audit", e["event"], e["scope"], e["key"]) for e in doc.get("events", [])
            ]
            state = MirrorState.from_doc(doc["state"])
            # Absent in a file written before it was recorded: the whole stream is read.
            after = {str(k): str(v) for k, v in dict(doc.get("after", {})).items()}
        except FileNotFoundError:
            return
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise ConfigurationError(
                f"{path} is not a dualmem mirror send in progress: {exc}"
            ) from exc
        found = self._find_sent(commands, [imp["actor"] for imp in imports], now_us, after)
        if any(found):
            for imp, stream_id in zip(imports, found[: len(imports)], strict=True):
                rel = imp["file"]
                if stream_id is None:
                    # Not arrived although the transaction that carried it did: its
                    # file's entry goes back to what it was, and the next scan imports
                    # the save again.
                    if imp["before"] is None:
                        state.files.pop(rel, None)
                    else:
                        state.files[rel] = imp["before"]
                    continue
                entry = state.files.get(rel)
                if entry is not None:
                    entry.setdefault("sent", []).append(stream_id)
                    _holds(entry)[stream_id] = imp["hold"]
            self.state = state
            self.fresh = False
            self.state.save(self.dir)
        path.unlink()

    def _find_sent(
        self,
        commands: list[tuple[str, str, str, str]],
        actors: list[str],
        now_us: int,
        after: Mapping[str, str],
    ) -> list[str | None]:
        """Where each of a send's ``commands`` (``(op, event, scope, key)``: the imports'
        puts, whose writers are ``actors``, then the events) is: its stream id, or
        ``None`` where it is nowhere (an event found committed has no id here: ``"sync
        event"``).

        The streams are read first, each past the id ``after`` names for it (its last
        entry before the send; from the start where none is named): an entry leaves its
        stream only once it is committed or dead-lettered (acked, then trimmed), so one
        not found there, if it arrived at all, is found next committed (a put in the
        journal by scope, key, writer and millisecond; an event in the sync events by
        scope, key, kind and millisecond) or among the dead letters."""
        found: list[str | None] = [None] * len(commands)
        where = {c: i for i, c in enumerate(commands)}
        stamp = str(now_us).encode()
        self._sent_in_streams(where, stamp, found, after)
        if None in found:
            self._sent_committed(commands, actors, now_us // 1000, found)
        if None in found:
            for letter in self.runtime.store.dead_letters(include_replayed=True):
                i = _sent_as(letter.fields, stamp, where)
                if i is not None and found[i] is None:
                    found[i] = letter.stream_id
        return found

    def _sent_in_streams(
        self,
        where: dict[tuple[str, str, str, str], int],
        stamp: bytes,
        found: list[str | None],
        after: Mapping[str, str],
    ) -> None:
        client: Any = self.runtime.client  # redis-py's xrange is loosely typed
        with translate_errors("mirror: look for a send"):
            for stream in self._streams_of((sc, k) for _, _, sc, k in where):
                top = after.get(text(stream))
                start = "-" if top is None else f"({top}"
                while True:
                    page = client.xrange(stream, min=start, max="+", count=_SCAN_PAGE)
                    for sid, fields in page:
                        i = _sent_as(fields, stamp, where)
                        if i is not None:
                            found[i] = text(sid)
                    if len(page) < _SCAN_PAGE:
                        break
                    start = "(" + text(page[-1][0])

    def _sent_committed(
        self,
        commands: list[tuple[str, str, str, str]],
        actors: list[str],
        ts_ms: int,
        found: list[str | None],
    ) -> None:
        uri = f"{Path(self.runtime.settings.db_path).resolve().as_uri()}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as conn:
            for i, (op, event, scope, key) in enumerate(commands):
                if found[i] is not None:
                    continue
                if op == "put":
                    row = conn.execute(
                        "SELECT stream_id FROM journal WHERE scope = ? AND key = ? AND ts = ? "
                        "AND actor = ? AND op = 'put' ORDER BY seq DESC LIMIT 1",
                        (scope, key, ts_ms, actors[i]),
                    ).fetchone()
                    if row is not None:
                        found[i] = str(row[0])
                elif event.startswith(SYNC_EVENT_PREFIX):
                    row = conn.execute(
                        "SELECT 1 FROM sync_events WHERE scope = ? AND key = ? AND ts = ? "
                        "AND kind = ? LIMIT 1",
                        (scope, key, ts_ms, event[len(SYNC_EVENT_PREFIX) :]),
                    ).fetchone()
                    if row is not None:
                        found[i] = "sync event"

    def _changed(self, conn: sqlite3.Connection, head: int) -> dict[tuple[str, str], set[str]]:
        """The records the journal changed since the last cycle, each with the stream ids
        of those changes."""
        if self.fresh:
            return {}
        marks = ",".join("?" * len(self.state.levels))
        rows = conn.execute(
            f"SELECT scope, key, stream_id FROM journal WHERE seq > ? AND seq <= ? "
            f"AND level IN ({marks})",
            (self.state.seq, head, *self.state.levels),
        )
        changed: dict[tuple[str, str], set[str]] = {}
        for scope, key, stream_id in rows:
            changed.setdefault((str(scope), str(key)), set()).add(str(stream_id))
        return changed

    def _rotated(self, conn: sqlite3.Connection, audit_head: int) -> bool:
        """Whether a key rotation ran since the last cycle: it re-seals rows in place,
        with no journal entry, so the sealed files must be compared again."""
        row = conn.execute(
            "SELECT 1 FROM audit_log WHERE id > ? AND id <= ? AND event = 'key_rotation' LIMIT 1",
            (self.state.audit_id, audit_head),
        ).fetchone()
        return row is not None

    def _all_live(self, conn: sqlite3.Connection, now_ms: int) -> set[tuple[str, str]]:
        marks = ",".join("?" * len(self.state.levels))
        rows = conn.execute(
            f"SELECT scope, key FROM memory WHERE envelope IS NOT NULL AND level IN ({marks}) "
            "AND (expires_at IS NULL OR expires_at > ?)",
            (*self.state.levels, now_ms),
        )
        return {(str(s), str(k)) for s, k in rows}

    def _row(self, conn: sqlite3.Connection, scope: str, key: str, now_ms: int) -> Row | None:
        r = conn.execute(_ROW_SQL, (scope, key, now_ms)).fetchone()
        return None if r is None or r[2] not in self.state.levels else r

    def _refresh(
        self, conn: sqlite3.Connection, scope: str, key: str, now_ms: int, report: CycleReport
    ) -> None:
        """Make the file of ``(scope, key)`` match SQLite (write it, or remove it)."""
        path = record_path(self.dir, scope, key)
        rel = path.relative_to(self.dir).as_posix()
        row = self._row(conn, scope, key, now_ms)
        before = self.state.files.get(rel)
        if _current(path) != self._judged.get(rel):
            # Saved by hand after the scan judged it (while the cycle sent, say): the
            # next cycle judges that save (read, whatever its stamp says), then rewrites
            # the file if it still must (it stays in ``recheck``); rewritten now, the
            # save would be lost.
            report.events.append(f"{rel}: saved during the cycle; the next cycle reads it")
            if before is not None:
                before.pop("mtime_ns", None)
            if [scope, key] not in self.state.recheck:
                self.state.recheck = sorted([*self.state.recheck, [scope, key]])
            return
        # Its imports still in flight stay in the entry, whatever the file shows now (a
        # restore, a conflict, a rejection): see _in_flight.
        kept = _in_flight(before, self._seen.get((scope, key), set()))
        if row is None:
            if path.exists():
                path.unlink()
                report.removed += 1
            self._judged[rel] = None
            if before is not None and kept.get("sent"):
                # A new record's file whose import is in flight: no row yet, no file,
                # but the import is still the file's (its commit brings the file back).
                self.state.files[rel] = {
                    "scope": scope,
                    "key": key,
                    "sha256": None,  # no file: not to be restored
                    "stream_id": before.get("stream_id"),
                    "expires_at": before.get("expires_at"),
                    **kept,
                }
            else:
                self.state.files.pop(rel, None)
            self._rechecked(scope, key)
            return
        try:
            data = render_record(row, self.codec)
        except DualMemError as exc:
            # An edited row: its file is left as it is (never replaced by what the row
            # says), and `dualmem mirror --check` reports the row.
            report.events.append(f"{rel}: not mirrored: {exc}")
            self._rechecked(scope, key)
            return
        if not path.is_file() or path.read_bytes() != data:
            _atomic_write(path, data)
            report.written += 1
        self._judged[rel] = _sha(data)
        self._rechecked(scope, key)
        self.state.files[rel] = {
            "scope": scope,
            "key": key,
            "sha256": _sha(data),
            "stream_id": row[7],
            "expires_at": row[6],
            **_stamp(path),
            **kept,
        }
        self.state.rejected.pop(rel, None)

    def _rechecked(self, scope: str, key: str) -> None:
        """The file of ``(scope, key)`` matches SQLite now: out of ``recheck``."""
        if [scope, key] in self.state.recheck:
            self.state.recheck = [r for r in self.state.recheck if r != [scope, key]]
        self.state.reported.pop(self._rel(scope, key), None)

    def _apply(
        self,
        conn: sqlite3.Connection,
        targets: list[tuple[str, str]],
        changed: dict[tuple[str, str], set[str]],
        now_ms: int,
        report: CycleReport,
        progress: ProgressFn,
    ) -> None:
        """Rewrite the files of ``targets`` from SQLite, but those held for imports."""
        for i, (scope, key) in enumerate(targets, start=1):
            if not self._held(conn, scope, key, changed, now_ms):
                self._refresh(conn, scope, key, now_ms, report)
            if i % 500 == 0:
                progress("mirror", i, len(targets))

    def _forget_read(self, changed: dict[tuple[str, str], set[str]]) -> None:
        """The imports read from the journal in this cycle are in flight no more (where
        one left the newest row, ``_held`` or ``_refresh`` made it the file's base), nor
        are those reported lost that a worker committed after all (no change in SQLite
        of anyone else's: the file follows it)."""
        for entry in self.state.files.values():
            seen = changed.get((entry["scope"], entry["key"]), set())
            for name in ("sent", "lost"):
                if entry.get(name):
                    entry[name] = [i for i in entry[name] if i not in seen]
                if name in entry and not entry[name]:
                    del entry[name]
            if "holds" in entry:
                holds = _holds(entry)
                entry["holds"] = {i: holds[i] for i in entry.get("sent", ()) if i in holds}
                if not entry["holds"]:
                    del entry["holds"]

    def _held(
        self,
        conn: sqlite3.Connection,
        scope: str,
        key: str,
        changed: dict[tuple[str, str], set[str]],
        now_ms: int,
    ) -> bool:
        """Whether the file of ``(scope, key)`` waits for imports of it still in flight
        instead of being rewritten from SQLite: rewritten to an earlier import read from
        the journal now, it would show an older save than the user's last one, and a save
        made before the later imports are read would be checked against that row.

        The row one of its imports left, read now, becomes the file's base: the next save
        is checked against it, not against the row the import was checked against."""
        entry = self.state.files.get(self._rel(scope, key))
        if entry is None:
            return False
        sent = entry.get("sent", ())
        seen = changed.get((scope, key), set())
        if all(i in seen for i in sent):
            return False
        row = self._row(conn, scope, key, now_ms)
        if row is not None and row[7] in sent:
            entry["stream_id"] = row[7]
        return True

    # -- imports that never commit ----------------------------------------------------

    def _settle_imports(
        self,
        conn: sqlite3.Connection,
        changed: dict[tuple[str, str], set[str]],
        events: list[AuditEvent],
        report: CycleReport,
    ) -> set[tuple[str, str]]:
        """Take out of the files' ``sent`` the imports that will never commit, and
        return the records left with no import in flight, whose files are rewritten from
        SQLite (what the record is, with those imports gone).

        * Dead-lettered by the worker: each is a ``mirror.failed`` event (with the save it
          carried), and `dualmem dlq replay` can send it again. A dead letter replayed
          since is followed to its replay, in flight in its place with its save.
        * Gone from the stream with no trace in SQLite (Redis lost it): a
          ``mirror.failed`` event too, never sent again. A worker may still hold it
          (read before Redis lost its data) and commit it later: sent again, it would be
          written twice, the second time over any write made in between. Its id is kept
          (``lost``): if it commits after all, the row it leaves is the mirror's own.
        """
        touched: list[dict[str, Any]] = []
        # Not read from the journal and not dead-lettered: (rel, entry, shard, id) to
        # look for in the stream.
        unread: list[tuple[str, dict[str, Any], int, str]] = []
        for rel, entry in self.state.files.items():
            scope, key = entry["scope"], entry["key"]
            seen = changed.get((scope, key), set())
            if any(i in seen for i in entry.get("lost", ())):
                report.events.append(
                    f"{rel}: an import reported lost from Redis was committed after all"
                )
            shard = self.runtime.layout.shard_of(scope, key)
            if entry.get("failed") and seen:
                self._replays(conn, rel, entry, shard, seen, report)
            if not entry.get("sent"):
                continue
            holds = _holds(entry)
            kept: list[str] = []
            for sid in entry["sent"]:
                current, dead = (sid, None) if sid in seen else _follow(conn, shard, sid)
                hold = holds.pop(sid, None)
                if dead is not None:
                    letter, error = dead
                    report.events.append(
                        f"{rel}: its import was dead-lettered ({error}); "
                        f"`dualmem dlq replay {letter}` sends it again"
                    )
                    detail = {"stream_id": sid, "error": error, "dead_letter": letter}
                    self._failed(rel, entry, hold, detail, events, report)
                    # Replayed later (as the event advises), its commit is the mirror's.
                    entry["failed"] = [*entry.get("failed", ()), sid][-_MAX_LOST:]
                    touched.append(entry)
                elif current is not None:
                    kept.append(current)
                    if hold is not None:
                        holds[current] = hold  # the replay carries the save
                    if current not in seen:
                        unread.append((rel, entry, shard, current))
            entry["sent"] = kept
        for rel, entry, sid in self._lost(unread):
            entry["sent"].remove(sid)
            entry["lost"] = [*entry.get("lost", ()), sid][-_MAX_LOST:]
            error = "lost from Redis before it was committed (not in the stream, not "
            error += "committed, not dead-lettered); not sent again"
            report.events.append(f"{rel}: its import was {error}")
            hold = _holds(entry).pop(sid, None)
            self._failed(rel, entry, hold, {"stream_id": sid, "error": error}, events, report)
            touched.append(entry)
        return {(e["scope"], e["key"]) for e in touched if not e["sent"]}

    def _replays(
        self,
        conn: sqlite3.Connection,
        rel: str,
        entry: dict[str, Any],
        shard: int,
        seen: set[str],
        report: CycleReport,
    ) -> None:
        """The imports of ``rel`` reported failed (dead-lettered) whose dead letter was
        replayed since (``dualmem dlq replay``) and whose replay this cycle reads from the
        journal: that commit is the mirror's own import (``_own``), not a change in SQLite
        that makes the file's next save a conflict. Looked up only for records the journal
        changed, so a cycle costs no more for files with old failures."""
        left = []
        for sid in entry["failed"]:
            current, _ = _follow(conn, shard, sid)
            if current is not None and current != sid and current in seen:
                self._own.setdefault((entry["scope"], entry["key"]), set()).add(current)
                report.events.append(f"{rel}: the replay of its failed import was committed")
            else:
                left.append(sid)
        if left:
            entry["failed"] = left
        else:
            del entry["failed"]

    def _lost(
        self, unread: list[tuple[str, dict[str, Any], int, str]]
    ) -> list[tuple[str, dict[str, Any], str]]:
        """The imports of ``unread`` that neither the stream nor SQLite knows: lost."""
        if not unread:
            return []
        with translate_errors("mirror"):
            pipe = self.runtime.client.pipeline(transaction=False)
            for _, _, shard, sid in unread:
                pipe.xrange(self.runtime.layout.stream(shard), min=sid, max=sid, count=1)
            found = pipe.execute()
        lost = []
        for (rel, entry, shard, sid), there in zip(unread, found, strict=True):
            # Gone from the stream: acknowledged, so committed or dead-lettered, both in
            # SQLite before the acknowledgement (and read by the next cycle); or lost, if
            # SQLite does not know it either. Asked after the stream, so a commit that
            # raced this cycle's snapshot is seen.
            if not there and self.runtime.store.status(shard, sid) is None:
                lost.append((rel, entry, sid))
        return lost

    def _failed(
        self,
        rel: str,
        entry: dict[str, Any],
        hold: dict[str, Any] | None,
        detail: dict[str, Any],
        events: list[AuditEvent],
        report: CycleReport,
    ) -> None:
        """Record an import of ``rel`` that will never commit: a ``mirror.failed`` event
        with the save it carried (``hold``; plaintext levels), or, from a state that did
        not keep it, the file's content if it still holds that save."""
        scope, key = entry["scope"], entry["key"]
        saved = None
        if hold is not None and isinstance(hold.get("save"), str):
            saved = hold["save"].encode("utf-8")
        elif hold is not None:
            path = self.dir / rel
            data = path.read_bytes() if path.is_file() else b""
            saved = data if _sha(data) == hold.get("sha256") else None
        detail = {"path": rel, **detail}
        events.append(self._event("failed", scope, key, level_of_scope(scope), detail, saved))
        report.failed += 1

    def _expire(
        self, conn: sqlite3.Connection, now_ms: int, report: CycleReport, skip: set[str]
    ) -> None:
        """Remove (or rewrite) the files whose recorded expiry has passed. Not the files
        imported in ``skip`` (this cycle) or earlier and still in flight (``sent``): their
        expiry is the hand edit's, not yet SQLite's (an edit may set it in the past, to
        expire the record); the file is refreshed once the import's journal entry is read."""
        for rel, entry in list(self.state.files.items()):
            if rel in skip or entry.get("sent"):
                continue
            if entry.get("expires_at") is not None and entry["expires_at"] <= now_ms:
                self._refresh(conn, entry["scope"], entry["key"], now_ms, report)

    # -- hand edits -----------------------------------------------------------------

    def _scan_edits(
        self,
        conn: sqlite3.Connection,
        now_ms: int,
        changed: dict[tuple[str, str], set[str]],
        writes: list[Write],
        events: list[AuditEvent],
        report: CycleReport,
    ) -> None:
        present: set[str] = set()
        for path in _files(self.dir):
            rel = path.relative_to(self.dir).as_posix()
            present.add(rel)
            entry = self.state.files.get(rel)
            if entry is not None and self._settled(path, entry):
                self._judged[rel] = entry.get("sha256")
                continue  # untouched since the mirror wrote it: no need to read it
            data = path.read_bytes()
            digest = self._judged[rel] = _sha(data)
            if entry is not None and entry.get("sha256") == digest:
                entry.update(_stamp(path))
                continue
            if entry is None and self.state.rejected.get(rel) == digest:
                continue
            if self._reported(rel, digest):
                continue  # recheck rewrites it
            self._edited(conn, now_ms, path, rel, data, entry, changed, writes, events, report)
        for rel in [rel for rel in self.state.rejected if rel not in present]:
            del self.state.rejected[rel]  # gone: a file saved there later is judged afresh
        for rel, entry in list(self.state.files.items()):
            scope, key = entry["scope"], entry["key"]
            if rel not in present and rel != self._rel(scope, key):
                self._later.append(partial(self._rename, conn, rel, entry, now_ms, report))
            elif rel not in present and entry.get("sha256") is not None:
                # Deleted by hand: records are deleted through the API, so put it back
                # (keeping its imports in flight, see _refresh) once the events are sent.
                row = self._row(conn, scope, key, now_ms)
                if self._reported(rel, None):
                    pass  # its restore was sent by a cycle that ended before it rewrote it
                elif row is not None and self._renders(row):
                    report.restored += 1
                    events.append(self._event("restored", scope, key, None, {"path": rel}))
                elif row is None and _in_flight(entry, changed.get((scope, key), ())).get("sent"):
                    report.events.append(
                        f"{rel}: deleted while the import that creates its record is in "
                        "flight; the file comes back once it commits"
                    )
                self._rewrite(conn, scope, key, now_ms, report)

    def _reported(self, rel: str, digest: str | None) -> bool:
        """Whether the file ``rel`` still holds ``digest`` (None: no file), what a cycle
        that ended before it rewrote the file judged it to hold, that verdict sent; saved
        (or deleted) since, it is judged afresh."""
        if rel not in self.state.reported:
            return False
        if self.state.reported[rel] == digest:
            return True
        del self.state.reported[rel]
        return False

    def _rewrite(
        self, conn: sqlite3.Connection, scope: str, key: str, now_ms: int, report: CycleReport
    ) -> None:
        """``_refresh`` the file of ``(scope, key)`` once the cycle's events are sent."""
        self._later_keys.add((scope, key))
        self._later.append(partial(self._refresh, conn, scope, key, now_ms, report))

    def _renders(self, row: Row) -> bool:
        """Whether ``_refresh`` writes a file for ``row`` (an edited row does not open)."""
        try:
            render_record(row, self.codec)
        except DualMemError:
            return False
        return True

    def _rel(self, scope: str, key: str) -> str:
        return record_path(self.dir, scope, key).relative_to(self.dir).as_posix()

    def _rename(
        self,
        conn: sqlite3.Connection,
        rel: str,
        entry: dict[str, Any],
        now_ms: int,
        report: CycleReport,
    ) -> None:
        """A file an older dualmem named otherwise (a key's leading ``.`` unescaped: a
        hidden name the scan skips) gets its current name. The old file goes if it is
        what the mirror wrote; a hand edit in it (never seen: hidden) is left there."""
        self.state.files.pop(rel)
        old = self.dir / rel
        if old.is_file():
            if _sha(old.read_bytes()) == entry.get("sha256"):
                old.unlink()
            else:
                report.events.append(f"{rel}: edited, left as it is; the record has a new name")
        self._refresh(conn, entry["scope"], entry["key"], now_ms, report)

    def _edited(
        self,
        conn: sqlite3.Connection,
        now_ms: int,
        path: Path,
        rel: str,
        data: bytes,
        entry: dict[str, Any] | None,
        changed: dict[tuple[str, str], set[str]],
        writes: list[Write],
        events: list[AuditEvent],
        report: CycleReport,
    ) -> None:
        digest = _sha(data)
        try:
            scope, key, level, envelope, payload, expires, writer = self._parse(
                conn, data, rel, now_ms
            )
        except LineError as exc:
            report.rejected += 1
            sc = entry["scope"] if entry else ""
            k = entry["key"] if entry else ""
            why = {"path": rel, "sha256": digest, "error": str(exc)}
            lvl = level_of_scope(sc) if sc else None
            events.append(self._event("rejected", sc, k, lvl, why, data))
            report.events.append(f"rejected {rel}: {exc}")
            if entry is None:
                self.state.rejected[rel] = digest  # not ours: leave it, report it once
            else:
                self._rewrite(conn, sc, k, now_ms, report)  # SQLite wins
            return
        row = self._row(conn, scope, key, now_ms)
        same = row is not None and row[6] == expires and self._same(row, envelope, payload)
        detail: dict[str, Any] = {"path": rel, "sha256": digest}
        # The mirror's own imports of earlier edits of this file (sent, maybe committed
        # since, or reported lost and committed after all) are no change in SQLite; any
        # other write since the file was checked is.
        sent = set(entry.get("sent", ())) if entry else set()
        mine = sent | set(entry.get("lost", ()) if entry else ())
        mine |= self._own.get((scope, key), set())  # replays of its failed imports
        # Those not committed yet (no journal entry read for them): the row is not what
        # the record will hold once they commit.
        pending = sent - changed.get((scope, key), set())
        if same and not pending:
            self._rewrite(conn, scope, key, now_ms, report)  # adopt (formatting only)
            return
        # The same as SQLite while an earlier import of the file is in flight (an edit
        # put back): imported too, so the last save wins over that import. Nothing in
        # SQLite to defend: the file holds what SQLite holds.
        moved = (
            entry is None
            or row is None
            or (row[7] != entry.get("stream_id") and row[7] not in mine)
            or bool(changed.get((scope, key), set()) - mine)
        )
        if row is not None and moved and not same:
            report.conflicts += 1
            detail["sqlite_stream_id"] = row[7]
            events.append(self._event("conflict", scope, key, level, detail, data))
            report.events.append(f"conflict {rel}: SQLite changed too; SQLite wins")
            self._rewrite(conn, scope, key, now_ms, report)
            return
        # A file that created its record (no row when its first save was checked) has no
        # row until the import of that save commits: while no journal entry for the record
        # is read (its import in flight, or it never committed: dead-lettered or lost in
        # this cycle), the record was not deleted. Once one is read, the file is
        # rewritten from SQLite and its entry has the row's id.
        in_flight = (
            entry is not None and entry.get("stream_id") is None and not changed.get((scope, key))
        )
        if row is None and entry is not None and not in_flight:
            # Deleted (or expired) in SQLite since the file was written: SQLite wins.
            report.conflicts += 1
            events.append(self._event("conflict", scope, key, level, detail, data))
            report.events.append(f"conflict {rel}: the record was deleted; SQLite wins")
            self._rewrite(conn, scope, key, now_ms, report)
            return
        writes.append(Write(scope, key, level, writer, envelope, expires))
        imported = self._event("imported", scope, key, level, detail)
        events.append(imported)
        hold: dict[str, Any] = {"sha256": digest}
        if level not in ENCRYPTED_LEVELS:  # as _event: no save of an encrypted record
            hold["save"] = data.decode("utf-8", "replace")
        self._imports.append((rel, self.state.files.get(rel), imported, hold))
        report.imported += 1
        report.events.append(f"imported {rel}")
        seen = changed.get((scope, key), set())
        self.state.files[rel] = {
            "scope": scope,
            "key": key,
            "sha256": digest,
            # The row this edit was checked against, and the imports of this file still
            # in flight (those committed since the last cycle are in ``seen``): cycle()
            # adds this one's stream id once it is sent.
            "stream_id": None if row is None else row[7],
            "sent": [],
            **_in_flight(entry, seen),
            "expires_at": expires,
            **_stamp(path),
        }
        self.state.rejected.pop(rel, None)

    def _parse(
        self, conn: sqlite3.Connection, data: bytes, rel: str, now_ms: int
    ) -> tuple[str, str, Level, bytes, bytes, int | None, str]:
        """A file's ``(scope, key, level, envelope, payload, expiry, writer)``. The writer
        is the mirror's own for a value it seals, and the sealed writer of an envelope
        kept as it is (an edit of the expiry alone): an envelope opens only under the
        writer it names. Any other envelope (an older write of the record pasted in) is
        refused: imported, it would be a write its writer never made."""
        try:
            obj = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise LineError(f"not valid JSON: {exc}") from None
        except RecursionError:
            # Nested deeper than the parser's recursion limit: it ended the mirror.
            raise LineError("not valid JSON: nested too deeply") from None
        if not isinstance(obj, dict):
            raise LineError("expected a JSON object")
        scope, key, level = line_identity(obj)
        if self._rel(scope, key) != rel:
            raise LineError(f"scope/key {scope}/{key} do not belong at {rel}")
        if int(level) not in self.state.levels:
            raise LineError(f"level {level.name} is not mirrored here")
        if ("value" in obj) == ("envelope" in obj):
            raise LineError("a file needs exactly one of 'value' and 'envelope'")
        expires = line_expiry(obj, int(time.time() * 1000))
        writer = ACTOR
        sealing = None
        if isinstance(obj.get("envelope"), str):
            with contextlib.suppress(binascii.Error, ValueError):  # line_envelope says why
                sealing = envelope_sealing(base64.b64decode(obj["envelope"], validate=True))
        if sealing is not None:
            writer, current = self._kept_writer(conn, scope, key, now_ms, sealing)
            # The row's own envelope, not the file's: a key rotation may have re-sealed
            # the write since the file was written, and the file's copy would put the row
            # back under the retired key.
            obj = {**obj, "envelope": base64.b64encode(current).decode("ascii")}
        envelope, payload = line_envelope(obj, self.codec, scope, key, level, writer)
        check_projectable(scope, key, level, writer, envelope, expires)
        return scope, key, level, envelope, payload, expires, writer

    def _kept_writer(
        self, conn: sqlite3.Connection, scope: str, key: str, now_ms: int, sealing: Sealing
    ) -> tuple[str, bytes]:
        """``(writer, the row's envelope)`` when a file's envelope is the record's current
        write (kept as it is, or re-encrypted by a rotation since), else ``LineError``."""
        row = self._row(conn, scope, key, now_ms)
        current = None if row is None else envelope_sealing(bytes(row[4]))
        if current is None or (current.write_id, current.writer) != (
            sealing.write_id,
            sealing.writer,
        ):
            raise LineError(
                "its envelope is not the record's current write: change 'value' (sealed "
                "on the way in), not 'envelope'"
            )
        assert row is not None
        return sealing.writer, bytes(row[4])

    def _same(self, row: Row, envelope: bytes, payload: bytes) -> bool:
        if bytes(row[4]) == envelope:
            return True
        try:
            current = self.codec.open_bytes(
                bytes(row[4]), scope=row[0], key=row[1], level=Level(row[2])
            )
        except DualMemError:
            return False
        return current == payload

    def _settled(self, path: Path, entry: dict[str, Any]) -> bool:
        """True when the file's stat is what the mirror recorded, and that stamp is older
        than the last state save by more than the clock's granularity.

        File times tick coarsely (milliseconds), so an edit in the same tick as the
        mirror's own write could keep the stamp; like git's "racily clean" entries,
        recent stamps are checked by content instead.
        """
        stamp = _stamp(path)
        if stamp != {k: entry.get(k) for k in _STAMP}:
            return False
        return stamp["mtime_ns"] < self.state.saved_ns - _RACY_NS

    @staticmethod
    def _event(
        kind: str,
        scope: str,
        key: str,
        level: Level | None,
        detail: dict[str, Any],
        discarded: bytes | None = None,
    ) -> AuditEvent:
        if discarded is not None and level is not None and level not in ENCRYPTED_LEVELS:
            # What lost is kept for plaintext levels only: an encrypted record's file
            # may hold a value someone meant to seal, and the audit log is not sealed.
            detail = {**detail, "discarded": discarded.decode("utf-8", "replace")}
        return AuditEvent(
            f"mirror.{kind}",
            ACTOR,
            detail,
            scope=scope or None,
            key=key or None,
            level=int(level) if level is not None else None,
            risk="low" if kind == "imported" else "medium",
        )


def _out_of_sync(
    out: int, expected: int, stale: int, edited: int, strays: int, sending: bool
) -> str:
    """The summary of a mirror out of sync: only what is wrong (a leftover sending file
    alone read "0 of N records out of sync (0 behind, 0 edited)").

    >>> _out_of_sync(0, 3, 0, 0, 1, True)
    '3 files match, 1 stray file, a cycle ended during its send'
    """
    summary = (
        f"{out} of {expected} records out of sync ({stale} behind, {edited} edited)"
        if out
        else f"{expected} files match"
    )
    if strays:
        summary += f", {strays} stray file{'s' if strays > 1 else ''}"
    if sending:
        summary += ", a cycle ended during its send"
    return summary


def check_mirror(conn: sqlite3.Connection, directory: str | Path, now_ms: int) -> Check:
    """Parity of a mirror directory with the database: every live record of the mirrored
    levels has its file with the current content, there is no other file, and no cycle
    ended during its send without the next one having settled it."""
    d = Path(directory)
    c = Check(f"mirror {d}")
    state = MirrorState.load(d) if d.is_dir() else None
    if state is None:
        c.problem(f"{d} is not a dualmem mirror (no {STATE_FILE})")
        c.fix = f"run `dualmem mirror --dir {d}`"
        return c
    codec = Codec(None)
    marks = ",".join("?" * len(state.levels))
    expected: dict[str, bytes | None] = {}
    for row in conn.execute(
        f"SELECT {_COLUMNS} FROM memory WHERE {_LIVE} AND level IN ({marks})",
        (now_ms, *state.levels),
    ):
        rel = record_path(d, row[0], row[1]).relative_to(d).as_posix()
        try:
            expected[rel] = render_record(row, codec)
        except DualMemError as exc:
            c.problem(f"{rel}: the SQLite row does not open: {exc}")
            expected[rel] = None
    sending = (d / SENDING_FILE).exists()
    if sending:
        c.problem(
            f"a mirror cycle ended during its send ({SENDING_FILE} is there): the state may "
            "not name imports that were sent; the next cycle finds them"
        )
    found = {p.relative_to(d).as_posix(): p for p in _files(d)}
    stale = edited = 0
    # The records out of sync (a problem is not one: a stray file, the sending file).
    out = {rel for rel, data in expected.items() if data is None}
    for rel, data in expected.items():
        path = found.get(rel)
        if path is None:
            out.add(rel)
            c.problem(f"{rel}: missing")
            continue
        content = path.read_bytes()
        if data is not None and content != data:
            out.add(rel)
            if state.files.get(rel, {}).get("sha256") == _sha(content):
                stale += 1
                c.problem(f"{rel}: behind SQLite (the mirror has not applied the newest change)")
            else:
                edited += 1
                c.problem(f"{rel}: differs from SQLite (edited by hand, not imported yet)")
    strays = sorted(found.keys() - expected.keys())
    for rel in strays:
        c.problem(f"{rel}: no live record in SQLite")
    c.summary = f"{len(expected)} files match (journal seq {state.seq})"
    if not c.ok:
        c.summary = _out_of_sync(len(out), len(expected), stale, edited, len(strays), sending)
        c.fix = f"run `dualmem mirror --dir {d} --once`"
    return c
