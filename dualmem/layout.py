"""Redis key names: every key of a shard carries one hash tag, so a put touches one slot."""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

__all__ = ["Layout"]


@dataclass(frozen=True, slots=True)
class Layout:
    """Names of the streams, cache keys and channels of one namespace.

    >>> lay = Layout("dualmem", shards=4)
    >>> lay.stream(2)
    b'dm:{dualmem:2}:cmd'
    >>> lay.cache_key(2, "agent:a", "k")
    b'dm:{dualmem:2}:c:agent:a:k'
    >>> lay.shard_of("agent:a", "k") == lay.shard_of("agent:a", "k")
    True
    """

    namespace: str
    shards: int = 1

    def shard_of(self, scope: str, key: str) -> int:
        """Stable shard of a record: all commands on one key stay in one stream, in order."""
        if self.shards == 1:
            return 0
        return zlib.crc32(f"{scope}\x00{key}".encode()) % self.shards

    def _tag(self, shard: int) -> str:
        return f"dm:{{{self.namespace}:{shard}}}"

    def stream(self, shard: int) -> bytes:
        """The command stream of ``shard``."""
        return f"{self._tag(shard)}:cmd".encode()

    def streams(self) -> list[bytes]:
        """Every shard's stream, in shard order."""
        return [self.stream(i) for i in range(self.shards)]

    def stream_shards(self) -> dict[bytes, int]:
        """Every shard's stream mapped to its shard."""
        return {self.stream(i): i for i in range(self.shards)}

    def shard_of_stream(self, name: bytes) -> int:
        """Inverse of :meth:`stream`."""
        text = name.decode()
        inner = text[text.index("{") + 1 : text.index("}")]
        return int(inner.rsplit(":", 1)[1])

    def cache_key(self, shard: int, scope: str, key: str) -> bytes:
        """The cache entry holding a record's current envelope.

        The name part of the scope has ``%`` and ``:`` escaped, so the scope ends at the
        first ``:`` after it and no two records share an entry: unescaped, swarm ``x:y``
        key ``z`` and swarm ``x`` key ``y:z`` were both ``c:swarm:x:y:z``, and a member of
        swarm ``x`` read the other swarm's value with ``get(..., fresh=True)``.

        >>> Layout("ns").cache_key(0, "swarm:x:y", "z")
        b'dm:{ns:0}:c:swarm:x%3Ay:z'
        """
        kind, sep, name = scope.partition(":")
        if sep:
            scope = f"{kind}:{name.replace('%', '%25').replace(':', '%3A')}"
        return f"{self._tag(shard)}:c:{scope}:{key}".encode()

    def split_cache_key(self, name: bytes) -> tuple[int, str, str] | None:
        """Inverse of :meth:`cache_key`: ``(shard, scope, key)``, or ``None`` if ``name``
        is not one of this namespace's cache keys.

        >>> lay = Layout("ns")
        >>> lay.split_cache_key(lay.cache_key(0, "agent:a:b", "k:1"))
        (0, 'agent:a:b', 'k:1')
        """
        try:
            text = name.decode("utf-8")
            tag, sep, rest = text.partition("}:c:")
            prefix = f"dm:{{{self.namespace}:"
            if not sep or not tag.startswith(prefix):
                return None
            shard = int(tag[len(prefix) :])
        except (UnicodeDecodeError, ValueError):
            return None
        kind, _, tail = rest.partition(":")
        if kind == "system":
            scope, key = "system", tail
        else:
            encoded, sep, key = tail.partition(":")
            if kind not in ("agent", "team", "swarm", "project") or not sep or not encoded:
                return None
            scope = f"{kind}:{encoded.replace('%3A', ':').replace('%25', '%')}"
        if not key or self.cache_key(shard, scope, key) != name:
            return None
        return shard, scope, key

    def cache_pattern(self, shard: int) -> bytes:
        """SCAN pattern matching every cache key of ``shard``, and no other namespace's.

        A namespace may hold glob characters: each is escaped ("n?" matched "nx"'s keys,
        "n[1" none of its own).

        >>> Layout("n[1?").cache_pattern(0)
        b'dm:\\\\{n\\\\[1\\\\?:0\\\\}:c:*'
        """
        literal = f"{self._tag(shard)}:c:".encode()
        return re.sub(rb"[\\*?\[\]{}]", lambda m: b"\\" + m[0], literal) + b"*"

    def anchor_key(self, chain: str) -> bytes:
        """Where the worker leaves the newest ``"<id>:<hash hex>"`` of a hash chain
        (``journal`` or ``audit_log``), so ``dualmem verify`` can tell a chain whose end
        was cut off from one that merely ends. A sorted set scored by the id that keeps
        only its highest member: with several workers, one that sends its anchor late
        cannot move it back."""
        return f"dm:{{{self.namespace}:anchor}}:{chain}:top".encode()

    def channel(self, scope: str) -> bytes:
        """Pub/sub channel of change notifications for ``scope``."""
        return f"dm:{self.namespace}:ev:{scope}".encode()
