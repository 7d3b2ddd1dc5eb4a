"""Attacks and bad input of issue 6 (9, 10, 12, 13; 11 is in test_attacks_rotation.py).

Every storage test runs on fakeredis and a real redis-server (the ``redis_url`` fixture).
"""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from acl import Level, Principal
from dualmem import DualMemory
from dualmem.layout import Layout

MakeMem = Callable[..., DualMemory]

# Names made of few characters, ':' and '%' among them, so that different scopes and keys
# collide wherever a layout is not injective.
NAME = st.text(alphabet="ab:%", min_size=1, max_size=4)


@settings(max_examples=200, deadline=None)
@given(
    scopes=st.tuples(
        st.sampled_from(["agent", "team", "swarm", "project"]).map(lambda k: k + ":") | st.just(""),
        NAME,
    ),
    key=NAME,
    other=st.tuples(st.sampled_from(["agent:", "swarm:", ""]), NAME, NAME),
    shard=st.integers(0, 3),
)
def test_cache_keys_name_exactly_one_record(
    scopes: tuple[str, str], key: str, other: tuple[str, str, str], shard: int
) -> None:
    lay = Layout("ns", shards=4)
    scope = scopes[0] + scopes[1] if scopes[0] else "system"
    name = lay.cache_key(shard, scope, key)
    assert lay.split_cache_key(name) == (shard, scope, key)
    other_scope = other[0] + other[1] if other[0] else "system"
    if (other_scope, other[2]) != (scope, key):
        assert lay.cache_key(shard, other_scope, other[2]) != name


def test_a_scope_with_a_colon_cannot_read_another_scopes_cache_entry(make_mem: MakeMem) -> None:
    # Found by the suite: cache keys were "c:<scope>:<key>", so swarm "x" key "y:z" and
    # swarm "x:y" key "z" shared one entry and a fresh read crossed scopes.
    mem = make_mem()
    victim = Principal(agent_id="v", swarm="x:y")
    attacker = Principal(agent_id="m", swarm="x")
    mem.sync(mem.put("z", {"secret": "swarm x:y only"}, level=Level.SWARM, principal=victim))
    assert mem.get("y:z", level=Level.SWARM, principal=attacker, fresh=True) is None
    mem.sync(mem.put("y:z", {"mine": 1}, level=Level.SWARM, principal=attacker))
    assert mem.get("z", level=Level.SWARM, principal=victim, fresh=True) == {
        "secret": "swarm x:y only"
    }
    assert mem.get("y:z", level=Level.SWARM, principal=attacker, fresh=True) == {"mine": 1}
