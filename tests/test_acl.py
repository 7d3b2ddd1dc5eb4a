"""acl: levels, principals, scope decisions and envelopes, without any storage."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from acl import (
    AccessDenied,
    Codec,
    ConfigurationError,
    Keyring,
    Level,
    MissingKey,
    Principal,
    TamperedRecord,
    ValidationError,
    as_level,
    envelope_key_id,
    level_of_scope,
    readable_scopes,
    resolve_scope,
)

from .conftest import record_file_calls

CODER = Principal(agent_id="coder-1", team="backend", swarm="s1", project="shop")


def test_levels_are_fixed_numbers() -> None:
    assert [int(lv) for lv in Level] == [1, 2, 3, 4, 5]
    assert {lv for lv in Level if lv.encrypted} == {Level.PRIVATE, Level.TEAM, Level.SYSTEM}
    # A name in any case and with the spaces a command line or a config file leaves.
    assert [as_level(x) for x in ("private", " Team ", "SWARM\n", 4)] == list(Level)[:4]


@pytest.mark.parametrize("bad", [0, 6, -1, "ADMIN", None, True, 2.0])
def test_unknown_levels_are_validation_errors(bad: object) -> None:
    with pytest.raises(ValidationError):
        as_level(bad)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"agent_id": ""},
        {"agent_id": "   "},
        {"agent_id": "a", "team": ""},
        {"agent_id": "a\x00b"},
        {"agent_id": "a\nb"},  # a line break in a scope, a Redis key, an audit line
        {"agent_id": "a\x1fb"},
        {"agent_id": "a" * 129},
        {"agent_id": 7},
        {"agent_id": None},  # only the groups may be None ("not a member of any")
        {"agent_id": "a", "system": "yes"},
        # Every group is checked as the agent id is: it becomes part of a scope too.
        {"agent_id": "a", "swarm": "s\tt"},
        {"agent_id": "a", "project": ""},
        {"agent_id": "a", "project": "p\x00"},
        {"agent_id": "a", "project": 3},
    ],
)
def test_principal_rejects_empty_or_bad_ids(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        Principal(**kwargs)  # type: ignore[arg-type]


def test_scope_is_derived_from_the_principal() -> None:
    assert resolve_scope(CODER, Level.PRIVATE, action="write") == (Level.PRIVATE, "agent:coder-1")
    assert resolve_scope(CODER, 2, action="read")[1] == "team:backend"
    assert resolve_scope(CODER, "swarm", action="read")[1] == "swarm:s1"
    assert resolve_scope(CODER, 4, action="read", scope="project:shop")[1] == "project:shop"


def test_principal_scope_takes_a_level_as_an_int_or_a_name_too() -> None:
    # A plain int was compared with `is Level.X`, fell through to the SYSTEM branch, and a
    # system principal's scope(1) was "system" (None for anyone else).
    root = Principal(agent_id="root", team="t", swarm="s", project="p", system=True)
    expected = ["agent:root", "team:t", "swarm:s", "project:p", "system"]
    assert [root.scope(n) for n in range(1, 6)] == expected
    assert [root.scope(Level(n)) for n in range(1, 6)] == expected
    assert CODER.scope(1) == "agent:coder-1" and CODER.scope("team") == "team:backend"
    for bad in (0, 6, True, "admin", None):
        with pytest.raises(ValidationError):
            root.scope(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("level", "scope"),
    [
        (Level.PRIVATE, "agent:coder-2"),
        (Level.TEAM, "team:frontend"),
        (Level.SWARM, "swarm:s2"),
        (Level.PROJECT, "project:other"),
        (Level.PRIVATE, "team:backend"),
    ],
)
def test_naming_another_scope_is_denied(level: Level, scope: str) -> None:
    with pytest.raises(AccessDenied) as info:
        resolve_scope(CODER, level, action="read", scope=scope, key="k")
    assert info.value.agent_id == "coder-1"
    assert info.value.scope == scope
    assert info.value.action == "read"


@pytest.mark.parametrize(
    "scope",
    [
        "agent:coder",  # the start of the principal's own scope
        "agent:coder-10",  # another agent whose id starts with this one's
        "agent:Coder-1",  # another agent as far as every id comparison goes
        "agent:coder-1 ",  # an agent id may end with a space: another agent too
        "team:back",
        "team:backend-ops",
        "",
    ],
)
def test_a_scope_that_only_resembles_the_principals_own_is_denied(scope: str) -> None:
    # Only scopes unlike the principal's own were named: a comparison by prefix, either
    # way round, without case or spaces, or one that took an empty scope for none named,
    # let coder-1 name these without an AccessDenied (so without the audit of an attempt
    # on another scope) and read its own record as if it were the one named.
    level = Level.TEAM if scope.startswith("team") else Level.PRIVATE
    with pytest.raises(AccessDenied) as info:
        resolve_scope(CODER, level, action="read", scope=scope, key="k")
    assert info.value.scope == scope


def test_system_level_needs_a_system_principal() -> None:
    with pytest.raises(AccessDenied):
        resolve_scope(CODER, Level.SYSTEM, action="write")
    sysp = Principal(agent_id="orch", system=True)
    assert resolve_scope(sysp, Level.SYSTEM, action="write") == (Level.SYSTEM, "system")


def test_missing_membership_is_denied_not_defaulted() -> None:
    loner = Principal(agent_id="solo")
    for level in (Level.TEAM, Level.SWARM, Level.PROJECT, Level.SYSTEM):
        with pytest.raises(AccessDenied):
            resolve_scope(loner, level, action="read")
    assert readable_scopes(loner) == {Level.PRIVATE: "agent:solo"}
    assert readable_scopes(CODER, [Level.TEAM, 3]) == {
        Level.TEAM: "team:backend",
        Level.SWARM: "swarm:s1",
    }
    # One level, as a number or a name, is that level only (not every level, and a name
    # is not taken for an iterable of one-letter levels).
    assert readable_scopes(CODER, 3) == {Level.SWARM: "swarm:s1"}
    assert readable_scopes(CODER, "team") == {Level.TEAM: "team:backend"}
    # No level is no level, and 0 or "" is not a level: each was taken for "every level"
    # by a check for a false value instead of for None.
    assert readable_scopes(CODER, []) == {}
    for bad in (0, ""):
        with pytest.raises(ValidationError):
            readable_scopes(CODER, bad)


def test_level_of_scope() -> None:
    assert level_of_scope("agent:x") is Level.PRIVATE
    assert level_of_scope("system") is Level.SYSTEM
    # A scope is exactly what Principal.scope makes: a prefix matched without case, by its
    # start, or the system scope with spaces or a name after it was given a level (a
    # stream entry naming "system:x" passed as a SYSTEM record, ":x" as a PRIVATE one).
    for bad in (
        *("agent:", "nobody:x", "", "systems", "agents:x", "teamwork:x", "projects:p"),
        *("AGENT:x", "Team:t", "ag:x", ":x", "system:x", " system", "system\n"),
    ):
        with pytest.raises(ValueError):
            level_of_scope(bad)


def test_a_rows_level_column_must_be_its_scopes_level_either_way() -> None:
    # Raised or lowered: a column that disagrees with the scope was edited.
    from acl.policy import stored_level

    scopes = {
        Level.PRIVATE: "agent:x",
        Level.TEAM: "team:t",
        Level.SWARM: "swarm:s",
        Level.PROJECT: "project:p",
        Level.SYSTEM: "system",
    }
    for scope_level, scope in scopes.items():
        assert stored_level(scope, int(scope_level)) is scope_level
        for column in Level:
            if column is not scope_level:
                with pytest.raises(TamperedRecord, match="edited"):
                    stored_level(scope, int(column))
    with pytest.raises(TamperedRecord):
        stored_level("nobody:x", 3)


# -- envelopes -------------------------------------------------------------------------


@pytest.fixture
def codec() -> Codec:
    return Codec(Keyring.generate(), compress_threshold=64)


@pytest.mark.parametrize("level", list(Level))
@pytest.mark.parametrize("value", [None, 0, "text", {"a": [1, 2.5, "é"]}, ["x" * 5000]])
def test_round_trip_every_level(codec: Codec, level: Level, value: object) -> None:
    env = codec.seal(value, scope="s:x", key="k", level=level)
    assert codec.open(env, scope="s:x", key="k", level=level) == value
    assert (envelope_key_id(env) is not None) == level.encrypted


def test_encrypted_levels_hide_the_plaintext(codec: Codec) -> None:
    secret = "the-launch-code-0451"
    for level in Level:
        env = codec.seal({"v": secret}, scope="s:x", key="k", level=level)
        assert (secret.encode() in env) is (not level.encrypted)


def test_a_level_given_by_name_or_number_is_sealed_as_that_level(codec: Codec) -> None:
    # seal(level="PRIVATE") compared a str with ENCRYPTED_LEVELS and wrote plaintext;
    # level=9 or None was sealed as plaintext too, and open(level="PRIVATE") raised a bare
    # ValueError.
    for level in ("PRIVATE", "private", 1):
        env = codec.seal({"secret": "hunter2"}, scope="agent:a", key="k", level=level)  # type: ignore[arg-type]
        assert b"hunter2" not in env
        assert codec.open(env, scope="agent:a", key="k", level=level) == {"secret": "hunter2"}  # type: ignore[arg-type]
    for bad in (9, None, "root"):
        with pytest.raises(ValidationError):
            codec.seal({"v": 1}, scope="agent:a", key="k", level=bad)  # type: ignore[arg-type]
        with pytest.raises(ValidationError):
            codec.open(b"\x01\x00{}", scope="agent:a", key="k", level=bad)  # type: ignore[arg-type]


def test_compression_happens_before_encryption(codec: Codec) -> None:
    big = {"v": "abc" * 10_000}
    env = codec.seal(big, scope="s:x", key="k", level=Level.PRIVATE)
    assert len(env) < 2_000  # compressed first: ciphertext of random-looking data would not shrink
    assert env[1] & 0x01  # compressed flag


@pytest.mark.parametrize(
    "where",
    [
        {"scope": "agent:y", "key": "k", "level": Level.PRIVATE},
        {"scope": "agent:x", "key": "k2", "level": Level.PRIVATE},
        {"scope": "agent:x", "key": "k", "level": Level.TEAM},
        {"scope": "agent:x", "key": "k", "level": Level.SYSTEM},
    ],
)
def test_envelope_moved_elsewhere_fails(codec: Codec, where: dict[str, object]) -> None:
    env = codec.seal({"v": 1}, scope="agent:x", key="k", level=Level.PRIVATE)
    with pytest.raises(TamperedRecord):
        codec.open(env, **where)  # type: ignore[arg-type]


def test_every_flipped_bit_is_detected(codec: Codec) -> None:
    env = codec.seal({"v": "x" * 100}, scope="agent:x", key="k", level=Level.PRIVATE)
    for i in range(len(env) * 8):
        bad = bytearray(env)
        bad[i // 8] ^= 1 << (i % 8)
        with pytest.raises((TamperedRecord, MissingKey)):
            codec.open(bytes(bad), scope="agent:x", key="k", level=Level.PRIVATE)


def test_plaintext_planted_at_an_encrypted_level_is_rejected(codec: Codec) -> None:
    plain = codec.seal({"v": 1}, scope="agent:x", key="k", level=Level.SWARM)
    with pytest.raises(TamperedRecord):
        codec.open(plain, scope="agent:x", key="k", level=Level.PRIVATE)


@pytest.mark.parametrize(
    "junk",
    [
        b"",
        b"\x01",
        b"\x09\x00{}",
        b"\x01\x80{}",
        b"\x01\x02\x05ab",
        # A key id of length 0 is a malformed envelope, not a key this process lacks
        # (MissingKey, audited as such): nothing read it as an empty id before.
        b"\x01\x02\x00" + bytes(28),
    ],
)
def test_malformed_envelopes(codec: Codec, junk: bytes) -> None:
    with pytest.raises(TamperedRecord):
        codec.open(junk, scope="agent:x", key="k", level=Level.PRIVATE)


@pytest.mark.parametrize(
    "junk",
    [
        b"\x01\x04{}",  # a flag no version defines
        b"\x01\x81{}",
        b"\x02\x00{}",  # the sealed format without encryption
    ],
)
def test_malformed_plaintext_envelopes(codec: Codec, junk: bytes) -> None:
    # Only the encrypted level's cases were tested: at a plaintext level an unknown flag,
    # or the sealed version's byte on a plaintext payload, was read as the payload.
    with pytest.raises(TamperedRecord):
        codec.open(junk, scope="swarm:x", key="k", level=Level.SWARM)


def test_an_envelope_opens_only_where_its_scope_and_key_end_where_they_did(
    codec: Codec,
) -> None:
    # Scope and key are bound with their lengths: "team:ab" + "c" and "team:a" + "bc" are
    # the same bytes end to end, and a row moved from one to the other must not open.
    env = codec.seal({"v": 1}, scope="team:ab", key="c", level=Level.TEAM)
    assert codec.open(env, scope="team:ab", key="c", level=Level.TEAM) == {"v": 1}
    with pytest.raises(TamperedRecord):
        codec.open(env, scope="team:a", key="bc", level=Level.TEAM)


def test_a_writer_name_longer_than_its_header_field_is_a_validation_error(codec: Codec) -> None:
    # The header stores the writer's length in 2 bytes: a longer owner was an
    # OverflowError from int.to_bytes, not the library's error.
    with pytest.raises(ValidationError, match="owner is longer than 65535 bytes"):
        codec.seal(1, scope="agent:x", key="k", level=Level.PRIVATE, owner="w" * 65536)
    env = codec.seal(1, scope="agent:x", key="k", level=Level.PRIVATE, owner="w" * 65535)
    assert codec.open(env, scope="agent:x", key="k", level=Level.PRIVATE, owner="w" * 65535) == 1


def test_values_are_compressed_past_the_threshold_and_only_when_it_saves_bytes() -> None:
    # compress_threshold: values longer than it are compressed (one exactly that long is
    # not), and a value lz4 cannot shrink is stored as it is (a compressed copy larger
    # than the value went unnoticed: it opened all the same).
    codec = Codec(Keyring.generate(), compress_threshold=64)

    def compressed(value: str) -> bool:
        env = codec.seal(value, scope="swarm:x", key="k", level=Level.SWARM)
        assert codec.open(env, scope="swarm:x", key="k", level=Level.SWARM) == value
        return bool(env[1] & 0x01)

    assert [compressed("a" * n) for n in (62, 63)] == [False, True]  # JSON adds 2 quotes
    noise = base64.b64encode(os.urandom(3000)).decode()
    assert not compressed(noise)


def test_unknown_key_id_is_missing_key(codec: Codec) -> None:
    env = codec.seal(1, scope="agent:x", key="k", level=Level.PRIVATE)
    with pytest.raises(MissingKey):
        Codec(Keyring.generate()).open(env, scope="agent:x", key="k", level=Level.PRIVATE)


def test_no_keyring_never_means_plaintext() -> None:
    codec = Codec(None)
    with pytest.raises(ConfigurationError):
        codec.seal(1, scope="agent:x", key="k", level=Level.PRIVATE)
    assert (
        codec.open(
            codec.seal(1, scope="swarm:x", key="k", level=Level.SWARM),
            scope="swarm:x",
            key="k",
            level=Level.SWARM,
        )
        == 1
    )


@pytest.mark.parametrize("value", [{1, 2}, object(), float("nan"), b"bytes", {"a": float("inf")}])
def test_non_json_values_are_validation_errors(codec: Codec, value: object) -> None:
    with pytest.raises(ValidationError):
        codec.seal(value, scope="swarm:x", key="k", level=Level.SWARM)


def test_deep_json_is_a_validation_error(codec: Codec) -> None:
    deep: list[object] = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(ValidationError):
        codec.seal(deep, scope="swarm:x", key="k", level=Level.SWARM)


def test_value_size_limit() -> None:
    codec = Codec(Keyring.generate(), max_value_bytes=100)
    codec.seal("x" * 90, scope="swarm:x", key="k", level=Level.SWARM)
    with pytest.raises(ValidationError, match="limit"):
        codec.seal("x" * 200, scope="swarm:x", key="k", level=Level.SWARM)


def test_rotation_keeps_old_envelopes_readable(codec: Codec) -> None:
    assert codec.keyring is not None
    old = codec.seal({"v": 1}, scope="agent:x", key="k", level=Level.PRIVATE)
    rotated = Codec(codec.keyring.with_new_key())
    assert rotated.open(old, scope="agent:x", key="k", level=Level.PRIVATE) == {"v": 1}
    resealed = rotated.reseal(old, scope="agent:x", key="k", level=Level.PRIVATE)
    assert resealed is not None
    assert envelope_key_id(resealed) == rotated.keyring.active_id  # type: ignore[union-attr]
    assert rotated.reseal(resealed, scope="agent:x", key="k", level=Level.PRIVATE) is None
    assert rotated.open(resealed, scope="agent:x", key="k", level=Level.PRIVATE) == {"v": 1}


# -- key files ---------------------------------------------------------------------------


def test_key_file_is_private_and_reloads(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "keys.json")
    ring = Keyring.generate()
    ring.save(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again = Keyring.load(path)
    assert again.active_id == ring.active_id
    env = Codec(ring).seal(1, scope="agent:a", key="k", level=Level.PRIVATE)
    assert Codec(again).open(env, scope="agent:a", key="k", level=Level.PRIVATE) == 1


def test_key_file_is_never_overwritten_silently(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "keys.json")
    Keyring.generate().save(path)
    with pytest.raises(ConfigurationError, match="already exists"):
        Keyring.generate().save(path)


def test_key_file_readable_by_others_is_refused(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "keys.json")
    Keyring.generate().save(path)
    os.chmod(path, 0o644)
    with pytest.raises(ConfigurationError, match="chmod 600"):
        Keyring.load(path)


@pytest.mark.parametrize("text", ["", "{}", '{"format": "dualmem-keyring"}', "not json"])
def test_corrupt_key_files(text: str) -> None:
    with pytest.raises(ConfigurationError):
        Keyring.from_json(text)


def test_a_key_id_given_twice_is_a_configuration_error() -> None:
    # The second secret silently replaced the first: records the first sealed then
    # failed authentication, audited as tampering, instead of naming the key file.
    doc = json.loads(Keyring.generate().to_json())
    twin = dict(doc["keys"][0], key=base64.b64encode(os.urandom(32)).decode())
    doc["keys"].append(twin)
    with pytest.raises(ConfigurationError, match="appears twice"):
        Keyring.from_json(json.dumps(doc))


def test_a_new_key_never_reuses_an_id(monkeypatch: pytest.MonkeyPatch) -> None:
    ring = Keyring.generate()
    ids = iter([ring.active_id, ring.active_id, "kfresh001"])
    monkeypatch.setattr(Keyring, "_new_id", staticmethod(lambda: next(ids)))
    assert ring.with_new_key().ids == (ring.active_id, "kfresh001")


@pytest.mark.parametrize("content", [b"\xff\xfe not utf-8", b"[" * 100_000, None])
def test_a_key_file_that_cannot_be_read_is_a_configuration_error(
    tmp_path: Path, content: bytes | None
) -> None:
    # Raw UnicodeDecodeError, RecursionError and IsADirectoryError escaped: a running
    # process's key file watcher (which catches ConfigurationError) then failed every
    # write, and `dualmem doctor` died on the file it exists to report.
    path = tmp_path / "keys.json"
    if content is None:
        path.mkdir(mode=0o700)
    else:
        path.write_bytes(content)
        path.chmod(0o600)
    with pytest.raises(ConfigurationError, match=str(path)):
        Keyring.load(path)


def test_secret_from_environment_has_a_stable_id() -> None:
    import base64

    secret = base64.b64encode(b"k" * 32).decode()
    assert Keyring.from_secret(secret).active_id == Keyring.from_secret(secret).active_id
    with pytest.raises(ConfigurationError):
        Keyring.from_secret("not base64!!")
    with pytest.raises(ConfigurationError):
        Keyring.from_secret(base64.b64encode(b"short").decode())


def test_nonces_are_fresh_in_every_thread_and_after_fork() -> None:
    import multiprocessing
    import threading

    from acl.crypto import _next_nonce

    seen: list[bytes] = []
    lock = threading.Lock()

    def draw() -> None:
        mine = [_next_nonce() for _ in range(2000)]
        with lock:
            seen.extend(mine)

    threads = [threading.Thread(target=draw) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == len(set(seen)) == 8000
    assert all(len(n) == 12 for n in seen)
    # A forked child must not continue its parent's buffer.
    before = _next_nonce()  # the parent's buffer now has unread nonces
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        child = pool.apply(_nonce_in_child)
    assert child not in {*seen, before, _next_nonce()}


def _nonce_in_child() -> bytes:
    from acl.crypto import _next_nonce

    return _next_nonce()


def test_an_envelope_names_its_writer_and_a_reseal_keeps_it() -> None:
    # The writer and a write id are in the authenticated header: a row naming another
    # writer does not open, and a rotation's re-encryption keeps both, so the worker can
    # tell it from an older envelope of the record passed off as one.
    from acl.crypto import envelope_sealing

    codec = Codec(Keyring.generate())
    env = codec.seal({"v": 1}, scope="agent:a", key="k", level=Level.PRIVATE, owner="a")
    assert codec.open(env, scope="agent:a", key="k", level=Level.PRIVATE, owner="a") == {"v": 1}
    with pytest.raises(TamperedRecord, match="sealed by 'a', not by its recorded writer 'b'"):
        codec.open(env, scope="agent:a", key="k", level=Level.PRIVATE, owner="b")
    forged = env.replace(b"\x00\x01a", b"\x00\x01b")  # the writer edited in the header
    with pytest.raises(TamperedRecord, match="failed authentication"):
        codec.open(forged, scope="agent:a", key="k", level=Level.PRIVATE, owner="b")
    again = codec.seal({"v": 1}, scope="agent:a", key="k", level=Level.PRIVATE, owner="a")
    assert envelope_sealing(again) != envelope_sealing(env)  # a new write id per seal
    rotated = Codec(codec.keyring.with_new_key())  # type: ignore[union-attr]
    resealed = rotated.reseal(env, scope="agent:a", key="k", level=Level.PRIVATE)
    before, after = envelope_sealing(env), envelope_sealing(resealed)  # type: ignore[arg-type]
    assert before is not None and after is not None
    assert (after.write_id, after.writer) == (before.write_id, before.writer)
    assert after.generation == before.generation + 1
    assert rotated.open(resealed, scope="agent:a", key="k", level=Level.PRIVATE, owner="a") == {
        "v": 1
    }


def test_an_envelope_sealed_before_version_2_still_opens_and_stays_in_its_form() -> None:
    from acl.crypto import ENVELOPE_VERSION, envelope_sealing

    codec = Codec(Keyring.generate())
    legacy = codec._seal_legacy(b'{"v":1}', scope="agent:a", key="k", level=Level.PRIVATE)
    assert legacy[0] == ENVELOPE_VERSION and envelope_sealing(legacy) is None
    assert codec.open(legacy, scope="agent:a", key="k", level=Level.PRIVATE, owner="x") == {"v": 1}
    rotated = Codec(codec.keyring.with_new_key())  # type: ignore[union-attr]
    resealed = rotated.reseal(legacy, scope="agent:a", key="k", level=Level.PRIVATE)
    assert resealed is not None and resealed[0] == ENVELOPE_VERSION
    assert rotated.open(resealed, scope="agent:a", key="k", level=Level.PRIVATE) == {"v": 1}


def test_keyring_files_that_cannot_be_named_or_written_are_configuration_errors(
    tmp_path: Path,
) -> None:
    # Raw FileExistsError, IsADirectoryError, OSError (name too long), ValueError (NUL),
    # TypeError (None) and AttributeError came out of save, load and from_secret.
    ring = Keyring.generate()
    (tmp_path / "file").write_text("x")
    for bad in (
        "a\x00b.json",
        "k\ud800.json",
        None,
        tmp_path / "file" / "k.json",
        tmp_path / ("n" * 300),
    ):
        with pytest.raises(ConfigurationError):
            ring.save(bad)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError):
            Keyring.load(bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        Keyring.from_secret(None)  # type: ignore[arg-type]


def test_public_helpers_given_the_wrong_type_raise_validation_errors() -> None:
    # resolve_scope(None, ...) and readable_scopes(None) raised AttributeError from
    # .scope(), readable_scopes(p, 3.5) TypeError (not iterable), level_of_scope(5)
    # AttributeError from .partition(); a scope string it does not know was a bare
    # ValueError, outside the DualMemError hierarchy.
    with pytest.raises(ValidationError, match=r"principal must be an acl\.Principal, got NoneType"):
        resolve_scope(None, 1, action="read")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match=r"principal must be an acl\.Principal, got str"):
        readable_scopes("coder-1")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="levels must be None, a level or an iterable"):
        readable_scopes(CODER, 3.5)
    with pytest.raises(ValidationError, match="scope must be a str, got int"):
        level_of_scope(5)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="not a dualmem scope"):
        level_of_scope("nobody:x")


def test_a_codec_given_the_wrong_type_raises_a_dualmem_error(codec: Codec) -> None:
    # Codec("x") failed only at the first encrypted seal (AttributeError: active_id);
    # open(None) raised TypeError from len(); a None scope, key or owner raised
    # AttributeError from the AAD (or, at a plaintext level, was sealed without a word).
    with pytest.raises(ConfigurationError, match=r"keyring must be an acl\.Keyring or None"):
        Codec("keys.json")  # type: ignore[arg-type]
    assert Codec(None).keyring is None
    where = {"scope": "agent:a", "key": "k", "level": Level.PRIVATE}
    with pytest.raises(ValidationError, match="envelope must be bytes, got NoneType"):
        codec.open(None, **where)  # type: ignore[arg-type]
    env = codec.seal(1, **where)  # type: ignore[arg-type]
    for level in (Level.PRIVATE, Level.SWARM):
        for name in ("scope", "key"):
            bad = {**where, "level": level, name: None}
            with pytest.raises(ValidationError, match=f"{name} must be a str, got NoneType"):
                codec.seal(1, **bad)  # type: ignore[arg-type]
            with pytest.raises(ValidationError, match=f"{name} must be a str, got NoneType"):
                codec.open(env, **bad)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="owner must be a str, got NoneType"):
        codec.seal(1, **where, owner=None)  # type: ignore[arg-type]
    # An owner that is not a str was never equal to the envelope's writer: it read as a
    # tampered record (and a reader would audit it as one).
    with pytest.raises(ValidationError, match="owner must be a str, got int"):
        codec.open(env, **where, owner=5)  # type: ignore[arg-type]
    assert codec.open(env, **where, owner=None) == 1  # None: no writer to check
    # A str or None size failed at the first seal, as a TypeError from a compare.
    for name, bad_value in (
        ("compress_threshold", "512"),
        ("compress_threshold", -1),
        ("max_value_bytes", None),
        ("max_value_bytes", 0),
        ("max_value_bytes", True),
    ):
        with pytest.raises(ConfigurationError, match=f"Codec {name} must be an int"):
            Codec(None, **{name: bad_value})  # type: ignore[arg-type]


def test_one_utf8_check_serves_principal_ids_and_key_file_paths() -> None:
    # Principal's id check and acl.crypto's key file path check each had their own copy
    # of the encode test; both use acl.text.encodes_utf8, with their messages unchanged.
    from acl.text import encodes_utf8

    assert encodes_utf8("agent:coder-1") and encodes_utf8("équipe-ü")
    assert not encodes_utf8("t\ud800") and not encodes_utf8("é\udfff")
    assert Principal(agent_id="é", team="équipe").scope(Level.TEAM) == "team:équipe"
    with pytest.raises(
        ValidationError, match=r"^Principal\.team must be valid Unicode \(no lone surrogates\)$"
    ):
        Principal(agent_id="a", team="t\ud800")
    with pytest.raises(ConfigurationError, match="without NUL or lone surrogates"):
        Keyring.load("é\udc80.json")


# -- found by an acl/crypto.py mutation check ---------------------------------------------

_FIXED_KEY_FILE = (
    '{"format": "dualmem-keyring", "version": 1, "active": "kfixed01", "keys": [{"id": '
    '"kfixed01", "key": "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=", "created_at": ""}]}'
)


def test_envelopes_and_key_files_written_by_this_format_keep_opening() -> None:
    # Envelopes sealed and a key file written before an upgrade, as bytes: every other test
    # seals and opens with the same code, so an AAD laid out another way (a length
    # little-endian, the level moved, a length dropped), a renamed key file format or
    # another id for a DUALMEM_KEY secret passed them all, and every record already stored
    # would have stopped opening (TamperedRecord, MissingKey) after the upgrade.
    codec = Codec(Keyring.from_json(_FIXED_KEY_FILE), compress_threshold=64)
    sealed = bytes.fromhex(
        "0202086b666978656430313cd14a2bfb654e910000000000016122319f4cfd8affd00b1a8e268299"
        "3632b03c59e9f9a28f7e23368619a767340e9888d9"
    )
    assert codec.open(sealed, scope="agent:a", key="k", level=Level.PRIVATE, owner="a") == {"v": 1}
    compressed = bytes.fromhex(
        "0203086b666978656430311d9389d04a35766a000000000001614faa46760931c676950128b5a2db"
        "846faf0a2a757a96959cd26f08de5e1a93e0c1ceb10e6b5a0cb0f1eba32899"
    )
    assert codec.open(compressed, scope="team:t", key="notes/1", level=Level.TEAM) == "ab" * 100
    legacy = bytes.fromhex(
        "0102086b66697865643031043751231550667305b15be5d6bdf7246870dfae47eaacdf7f43b2ca34"
        "9ccdb8c90d05"
    )
    assert codec.open(legacy, scope="system", key="k", level=Level.SYSTEM) == {"v": 1}
    secret = base64.b64encode(bytes(range(32))).decode()
    assert Keyring.from_secret(secret).active_id == "e45f6987e"


def test_a_scope_and_key_whose_bytes_split_elsewhere_with_their_lengths_do_not_open() -> None:
    # Only the key's length was bound by a test ("team:ab"/"c" against "team:a"/"bc"
    # differ in it): without the scope's length, scope "x" with key "\0\0\0\x01y" and
    # scope "x\0\0\0\x05" with key "y" made the same additional data.
    codec = Codec(Keyring.generate())
    env = codec.seal(1, scope="x", key="\x00\x00\x00\x01y", level=Level.PRIVATE)
    with pytest.raises(TamperedRecord):
        codec.open(env, scope="x\x00\x00\x00\x05", key="y", level=Level.PRIVATE)


def _nonce(env: bytes) -> bytes:
    start = 3 + env[2]
    if env[0] == 2:  # write id, generation, writer's length and the writer
        start += 12 + 2 + int.from_bytes(env[start + 12 : start + 14], "big")
    return env[start : start + 12]


def test_every_seal_draws_a_fresh_nonce() -> None:
    # Two seals under one key with one nonce give away the XOR of their values and GCM's
    # authentication key; a nonce fixed at zero opened and round-tripped like any other.
    codec = Codec(Keyring.generate())
    where = {"scope": "agent:a", "key": "k", "level": Level.PRIVATE}
    nonces = {_nonce(codec.seal({"v": 1}, **where)) for _ in range(3)}  # type: ignore[arg-type]
    legacy = {_nonce(codec._seal_legacy(b"1", **where)) for _ in range(3)}  # type: ignore[arg-type]
    assert len(nonces) == len(legacy) == 3 and len(nonces | legacy) == 6
    # A re-encryption keeps its write's write id and generation: a nonce made of those
    # (fresh only because a new write's id is) repeated whenever one write was sealed
    # again with its sealing under the same key.
    from acl.crypto import Sealing

    sealing = Sealing(bytes(8), 1, "a")
    again = {_nonce(codec.seal_bytes(b"1", **where, sealing=sealing)) for _ in range(3)}  # type: ignore[arg-type]
    assert len(again) == 3


@pytest.mark.parametrize(
    ("key_id", "secret"),
    [("", bytes(32)), ("kl\u00e9", bytes(32)), ("k" * 33, bytes(32)), ("k1", bytes(16))],
)
def test_a_key_the_envelope_format_cannot_carry_is_refused(key_id: str, secret: bytes) -> None:
    # An empty key id sealed envelopes that never opened ("truncated"), a non-ASCII one
    # failed every seal with UnicodeEncodeError, and a 16-byte secret sealed with AES-128
    # where AES-256 is promised.
    doc = {
        "format": "dualmem-keyring",
        "active": key_id,
        "keys": [{"id": key_id, "key": base64.b64encode(secret).decode()}],
    }
    with pytest.raises(ConfigurationError):
        Keyring.from_json(json.dumps(doc))


def test_a_keyring_must_hold_its_active_key_and_keep_it() -> None:
    ring = Keyring.generate()
    doc = json.loads(ring.to_json())
    doc["active"] = "kother"
    with pytest.raises(ConfigurationError, match="active key id 'kother' is not in the keyring"):
        Keyring.from_json(json.dumps(doc))
    with pytest.raises(ConfigurationError, match="cannot drop the active key"):
        ring.without_key(ring.active_id)
    # A dropped key is gone: what only it sealed is a missing key, not still readable.
    env = Codec(ring).seal(1, scope="agent:a", key="k", level=Level.PRIVATE)
    rotated = ring.with_new_key()
    dropped = rotated.without_key(ring.active_id)
    assert dropped.ids == (rotated.active_id,)
    with pytest.raises(MissingKey):
        Codec(dropped).open(env, scope="agent:a", key="k", level=Level.PRIVATE)


def test_a_key_file_or_secret_that_is_not_exactly_that_is_refused() -> None:
    # Another program's JSON with keys and an active id was taken for a key file, and a
    # secret with stray characters had them dropped silently.
    doc = json.loads(Keyring.generate().to_json())
    doc["format"] = "other-keyring"
    with pytest.raises(ConfigurationError, match="not a dualmem key file"):
        Keyring.from_json(json.dumps(doc))
    with pytest.raises(ConfigurationError, match="not valid base64"):
        Keyring.from_secret("*" + base64.b64encode(bytes(32)).decode())
    # A key file's secrets are read as strictly: a stray character was dropped there too,
    # and the key loaded as if the file were intact.
    doc = json.loads(Keyring.generate().to_json())
    doc["keys"][0]["key"] = "*" + doc["keys"][0]["key"]
    with pytest.raises(ConfigurationError, match="unreadable key file"):
        Keyring.from_json(json.dumps(doc))


@pytest.mark.parametrize("mode", [0o640, 0o620, 0o610, 0o604, 0o602, 0o601])
def test_a_key_file_any_group_or_other_bit_is_set_on_is_refused(tmp_path: Path, mode: int) -> None:
    # Only 0644 was tried: a group-readable file (0640) was loaded, and a group- or
    # world-writable one lets someone else replace the keys new records are sealed with.
    path = tmp_path / "keys.json"
    Keyring.generate().save(path)
    path.chmod(mode)
    with pytest.raises(ConfigurationError, match="chmod 600"):
        Keyring.load(path)


def test_saving_a_key_file_leaves_no_second_copy_and_overwrite_replaces_it(
    tmp_path: Path,
) -> None:
    # The temp file holding the keys was left beside the key file after a save (a copy a
    # rotation's drop never removes); save(overwrite=True), which rotate-keys uses, must
    # replace the file, and a failed write must take its temp file with it.
    path = tmp_path / "keys.json"
    first = Keyring.generate()
    first.save(path)
    assert os.listdir(tmp_path) == ["keys.json"]
    second = first.with_new_key()
    second.save(path, overwrite=True)
    assert os.listdir(tmp_path) == ["keys.json"]
    # The file names the new key active: rotate-keys saves before it re-seals anything.
    assert Keyring.load(path).ids == second.ids
    assert Keyring.load(path).active_id == second.active_id != first.active_id

    class Broken(Keyring):
        def to_json(self) -> str:
            raise OSError("disk full")

    broken = Broken([first._keys[first.active_id]], first.active_id)
    with pytest.raises(OSError, match="disk full"):
        broken.save(tmp_path / "k2.json")
    assert os.listdir(tmp_path) == ["keys.json"]


def test_a_key_file_another_process_creates_while_this_one_writes_wins(tmp_path: Path) -> None:
    # The existence check comes before the write: a key file created in between (another
    # `dualmem keygen`, the embedded default of a second process) must be kept, or the
    # records it sealed lose their key.
    path = tmp_path / "keys.json"
    theirs = Keyring.generate()

    class Racing(Keyring):
        def to_json(self) -> str:
            theirs.save(path)  # lands after this save's check, before its link
            return super().to_json()

    mine = Keyring.generate()
    racing = Racing([mine._keys[mine.active_id]], mine.active_id)
    with pytest.raises(ConfigurationError, match="already exists"):
        racing.save(path)
    assert Keyring.load(path).ids == theirs.ids
    assert os.listdir(tmp_path) == ["keys.json"]


def test_a_key_file_is_on_disk_before_it_is_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without the fsync before the link a power loss could leave an empty key file in
    # place, and without the directory's fsync after it none at all, while records sealed
    # with its key are committed: they could never be read again.
    events = record_file_calls(monkeypatch)
    path = tmp_path / "keys.json"
    ring = Keyring.generate()
    ring.save(path)
    ring.with_new_key().save(path, overwrite=True)
    for step, done in enumerate(("link", "replace")):
        written, placed, synced = events[3 * step : 3 * step + 3]
        assert written[0] == "fsync" and written[1].startswith(str(tmp_path / ".keys.json."))
        assert placed == (done, written[1], str(path))  # the file fsynced just before
        assert synced == ("fsync", str(tmp_path))
    assert len(events) == 6


def test_size_limits_hold_at_their_bounds_and_a_forged_size_is_refused() -> None:
    # A value exactly max_value_bytes long is accepted and opens (compressed too); a
    # compressed payload claiming one byte more is refused before lz4 allocates it, and
    # a payload too short for its size or that does not decompress is a tampered record
    # (raw struct.error and LZ4BlockError escaped).
    codec = Codec(None, compress_threshold=0, max_value_bytes=102)
    value = "a" * 100  # 102 bytes with its quotes
    env = codec.seal(value, scope="swarm:x", key="k", level=Level.SWARM)
    assert env[1] & 0x01
    assert codec.open(env, scope="swarm:x", key="k", level=Level.SWARM) == value
    with pytest.raises(ValidationError, match="limit is 102"):
        codec.seal(value + "a", scope="swarm:x", key="k", level=Level.SWARM)
    where = {"scope": "swarm:x", "key": "k", "level": Level.SWARM}
    forged = b"\x01\x01" + (103).to_bytes(4, "little") + env[6:]
    with pytest.raises(TamperedRecord, match="claims 103 bytes, over the limit"):
        codec.open(forged, **where)  # type: ignore[arg-type]
    for junk in (b"\x01\x01abc", b"\x01\x01" + (10).to_bytes(4, "little") + b"\xff\xff"):
        with pytest.raises(TamperedRecord):
            codec.open(junk, **where)  # type: ignore[arg-type]


def test_json_nesting_is_limited_at_exactly_max_depth() -> None:
    from acl.crypto import MAX_JSON_DEPTH

    codec = Codec(None)
    for wrap in (lambda v: [v], lambda v: {"k": v}):
        value: object = 1
        for _ in range(MAX_JSON_DEPTH):
            value = wrap(value)
        env = codec.seal(value, scope="swarm:x", key="k", level=Level.SWARM)
        assert codec.open(env, scope="swarm:x", key="k", level=Level.SWARM) == value
        with pytest.raises(ValidationError, match="nested deeper than 100"):
            codec.seal(wrap(value), scope="swarm:x", key="k", level=Level.SWARM)


@pytest.mark.parametrize(
    "junk", [b"\x01\x00{", b"\x01\x00" + b"[" * 100_000 + b"]" * 100_000, b"\x00\x00{}"]
)
def test_a_plaintext_envelope_that_is_not_one_of_ours_is_a_tampered_record(junk: bytes) -> None:
    # Malformed or too deep JSON escaped as JSONDecodeError or RecursionError, and a
    # version 0 byte was read as a plaintext envelope.
    with pytest.raises(TamperedRecord):
        Codec(None).open(junk, scope="swarm:x", key="k", level=Level.SWARM)


def test_malformed_encrypted_headers_are_tampered_records_not_a_missing_key() -> None:
    # A header cut after its flags raised IndexError; a key id or writer that is not text
    # was reported as a key to load (MissingKey) instead of a tampered record; an
    # encrypted envelope at a plaintext level is refused for its level.
    codec = Codec(Keyring.generate())
    where = {"scope": "agent:a", "key": "k", "level": Level.PRIVATE}
    kid = codec.keyring.active_id.encode()  # type: ignore[union-attr]
    good = codec.seal(1, **where, owner="a")  # type: ignore[arg-type]
    bad_writer = bytes((2, 2, len(kid))) + kid + bytes(12) + b"\x00\x01\xff" + bytes(40)
    for junk in (
        b"\x01\x02",
        b"\x02\x02",
        b"\x01\x02\x01\xff" + bytes(40),
        b"\x02\x02\x01\xff" + bytes(60),
        bad_writer,
        good[:-1][: 3 + len(kid) + 12 + 2 + 1 + 12],
    ):
        with pytest.raises(TamperedRecord):
            codec.open(junk, **where)  # type: ignore[arg-type]
    with pytest.raises(TamperedRecord, match="does not match the level's encryption"):
        codec.open(good, scope="agent:a", key="k", level=Level.SWARM)
    with pytest.raises(TamperedRecord, match="not by its recorded writer ''"):
        codec.open(good, **where, owner="")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="no keyring is configured"):
        Codec(None).open(good, **where)  # type: ignore[arg-type]


def test_header_readers_name_nothing_for_a_header_cut_short() -> None:
    from acl.crypto import envelope_sealing, may_be_sealed_by

    assert envelope_key_id(b"\x01\x02") is None
    assert envelope_sealing(b"\x02\x02\x00" + bytes(40)) is None  # no key id
    assert envelope_sealing(b"\x02\x02\x01k" + bytes(12) + b"\xff\xff" + bytes(8)) is None
    assert may_be_sealed_by(b"\x02\x02", b"") is False
    # A writer whose name starts with the one asked about is another writer.
    env = Codec(Keyring.generate()).seal(1, scope="agent:ab", key="k", level=1, owner="ab")
    assert may_be_sealed_by(env, b"ab") is True
    assert may_be_sealed_by(env, b"a") is False
    # Plaintext and pre-version-2 envelopes name no writer: nothing for this check to
    # refuse (False sent every plaintext put down the worker's slow path).
    legacy = Codec(Keyring.generate())._seal_legacy(b"1", scope="agent:ab", key="k", level=1)
    assert may_be_sealed_by(b"\x01\x00{}", b"b") is True
    assert may_be_sealed_by(legacy, b"b") is True


def test_a_sealing_the_header_cannot_hold_is_refused() -> None:
    # seal_bytes(sealing=...) with a write id of another length wrote a header every
    # reader parses at the wrong offsets; a generation past 32 bits raised OverflowError.
    from acl.crypto import Sealing

    codec = Codec(Keyring.generate())
    for bad in (
        Sealing(bytes(7), 1, "a"),
        Sealing(bytes(9), 1, "a"),
        Sealing(bytes(8), 1 << 32, "a"),
    ):
        with pytest.raises(ValueError, match="not a valid sealing"):
            codec.seal_bytes(b"1", scope="agent:a", key="k", level=Level.PRIVATE, sealing=bad)
    top = Sealing(bytes(8), (1 << 32) - 1, "a")
    env = codec.seal_bytes(b"1", scope="agent:a", key="k", level=Level.PRIVATE, sealing=top)
    assert codec.open(env, scope="agent:a", key="k", level=Level.PRIVATE, owner="a") == 1


def test_a_rotation_reseals_only_encrypted_levels_each_at_its_own_level() -> None:
    # A SWARM record handed to reseal was encrypted (and then refused at its level); a
    # TEAM or SYSTEM record was opened as PRIVATE; a record sealed before version 2 lost
    # its compression when re-sealed.
    old = Codec(Keyring.generate(), compress_threshold=64)
    rotated = Codec(old.keyring.with_new_key(), compress_threshold=64)  # type: ignore[union-attr]
    plain = old.seal(1, scope="swarm:s", key="k", level=Level.SWARM)
    assert rotated.reseal(plain, scope="swarm:s", key="k", level=Level.SWARM) is None
    for level, scope in ((Level.TEAM, "team:t"), (Level.SYSTEM, "system")):
        env = old.seal({"v": 1}, scope=scope, key="k", level=level, owner="a")
        again = rotated.reseal(env, scope=scope, key="k", level=level)
        assert again is not None
        assert rotated.open(again, scope=scope, key="k", level=level, owner="a") == {"v": 1}
        # One sealed before version 2 is re-sealed bound to its own level too (bound to
        # PRIVATE, a rotation made every old TEAM and SYSTEM record unreadable).
        legacy = old._seal_legacy(b'{"v":2}', scope=scope, key="k", level=level)
        again = rotated.reseal(legacy, scope=scope, key="k", level=level)
        assert again is not None
        assert rotated.open(again, scope=scope, key="k", level=level) == {"v": 2}
    big = json.dumps("ab" * 500).encode()
    legacy = old._seal_legacy(big, scope="agent:a", key="k", level=Level.PRIVATE)
    assert legacy[1] & 0x01 and len(legacy) < 200
    again = rotated.reseal(legacy, scope="agent:a", key="k", level=Level.PRIVATE)
    assert again is not None and again[1] & 0x01 and len(again) < 200
    assert rotated.open(again, scope="agent:a", key="k", level=Level.PRIVATE) == "ab" * 500


_WHERE = {"scope": "agent:a", "key": "k", "level": Level.PRIVATE}


def _saved_secrets(text: str) -> dict[str, str]:
    return {item["id"]: item["key"] for item in json.loads(text)["keys"]}


def test_every_generated_or_rotated_in_key_is_a_new_secret() -> None:
    # Keys were only told apart by their ids: a generate() that made the same secret every
    # time, or a rotation that put the old secret under a new id, sealed and opened like
    # any other; a record then opened with another keyring's secret, and a rotation away
    # from a leaked key changed nothing for whoever held it.
    first = Keyring.generate()
    env = Codec(first).seal(1, **_WHERE)  # type: ignore[arg-type]
    for other in (Keyring.generate(), first.with_new_key()):
        secret = _saved_secrets(other.to_json())[other.active_id]
        impostor = Keyring.from_secret(secret, key_id=first.active_id)
        with pytest.raises(TamperedRecord, match="failed authentication"):
            Codec(impostor).open(env, **_WHERE)  # type: ignore[arg-type]


def test_a_key_file_keeps_each_key_under_its_own_id_and_each_id_seals_with_its_own_key(
    tmp_path: Path,
) -> None:
    # The key file tests compared ids only: a keyring that sealed under the new id with
    # the first key's cipher, or a key file written (or read back) with one secret under
    # both ids after a rotation, passed them; the reloaded file then failed every record
    # sealed before or since the rotation, or the new key alone (its line of the file, or
    # the same secret as DUALMEM_KEY) did not open what was sealed under its id.
    first = Keyring.generate()
    rotated = first.with_new_key()
    path = tmp_path / "keys.json"
    rotated.save(path)
    old_env = Codec(first).seal("old", **_WHERE)  # type: ignore[arg-type]
    new_env = Codec(rotated).seal("new", **_WHERE)  # type: ignore[arg-type]
    loaded = Codec(Keyring.load(path))
    assert loaded.open(old_env, **_WHERE) == "old"  # type: ignore[arg-type]
    assert loaded.open(new_env, **_WHERE) == "new"  # type: ignore[arg-type]
    saved = _saved_secrets(path.read_text())
    for env, key_id, value in (
        (old_env, first.active_id, "old"),
        (new_env, rotated.active_id, "new"),
    ):
        alone = Codec(Keyring.from_secret(saved[key_id], key_id=key_id))
        assert alone.open(env, **_WHERE) == value  # type: ignore[arg-type]
