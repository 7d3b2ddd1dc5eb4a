"""Access decisions: which scope a principal may name at a level, decided before any I/O."""

from __future__ import annotations

from collections.abc import Iterable

from acl.errors import AccessDenied, TamperedRecord, ValidationError
from acl.levels import Level, as_level
from acl.principal import Principal

__all__ = ["level_of_scope", "readable_scopes", "resolve_scope", "stored_level"]

_WHY_NONE = {
    Level.TEAM: "it belongs to no team",
    Level.SWARM: "it belongs to no swarm",
    Level.PROJECT: "it belongs to no project",
    Level.SYSTEM: "it is not a system principal",
}


def resolve_scope(
    principal: Principal,
    level: object,
    *,
    action: str,
    scope: str | None = None,
    key: str | None = None,
) -> tuple[Level, str]:
    """Return ``(level, scope)`` the principal may use for ``action``, or raise ``AccessDenied``.

    The scope is derived from the principal; naming another one is denied, so there is no
    path where a row is read first and filtered afterwards.

    >>> p = Principal(agent_id="coder-1", team="backend")
    >>> resolve_scope(p, 2, action="read")
    (<Level.TEAM: 2>, 'team:backend')
    >>> resolve_scope(p, 1, action="read", scope="agent:coder-2")
    Traceback (most recent call last):
    ...
    acl.errors.AccessDenied: coder-1 may not read scope 'agent:coder-2' at level PRIVATE
    """
    if not isinstance(principal, Principal):  # None raised AttributeError from .scope()
        raise ValidationError(f"principal must be an acl.Principal, got {type(principal).__name__}")
    lvl = as_level(level)
    own = principal.scope(lvl)
    if own is None:
        why = f"{principal.agent_id} may not {action} level {lvl.name}: {_WHY_NONE[lvl]}"
    elif scope is not None and scope != own:
        why = f"{principal.agent_id} may not {action} scope {scope!r} at level {lvl.name}"
    else:
        return lvl, own
    raise AccessDenied(
        why, agent_id=principal.agent_id, action=action, level=int(lvl), scope=scope, key=key
    )


def readable_scopes(principal: Principal, levels: object = None) -> dict[Level, str]:
    """Every ``{level: scope}`` the principal may read, restricted to ``levels`` if given.

    ``levels`` is ``None`` (all), one level, or an iterable of levels. Levels where the
    principal has no scope are left out rather than denied: a query over "everything I
    can see" is not an attempt on someone else's scope.

    >>> readable_scopes(Principal(agent_id="a", swarm="s"))
    {<Level.PRIVATE: 1>: 'agent:a', <Level.SWARM: 3>: 'swarm:s'}
    """
    if not isinstance(principal, Principal):
        raise ValidationError(f"principal must be an acl.Principal, got {type(principal).__name__}")
    if levels is None:
        wanted: list[Level] = list(Level)
    elif isinstance(levels, (int, str)):
        wanted = [as_level(levels)]
    else:
        if not isinstance(levels, Iterable):  # 3.5 raised TypeError: not iterable
            raise ValidationError(
                "levels must be None, a level or an iterable of levels, "
                f"got {type(levels).__name__}"
            )
        wanted = [as_level(level) for level in levels]
    scopes: dict[Level, str] = {}
    for lvl in sorted(set(wanted)):
        own = principal.scope(lvl)
        if own is not None:
            scopes[lvl] = own
    return scopes


def level_of_scope(scope: str) -> Level:
    """The level a scope string belongs to (a scope's prefix fixes its level).

    ``ValidationError`` (a ``ValueError``) for anything else.

    >>> level_of_scope("swarm:phase-1")
    <Level.SWARM: 3>
    """
    if not isinstance(scope, str):  # 5 raised AttributeError from .partition()
        raise ValidationError(f"scope must be a str, got {type(scope).__name__}")
    if scope == "system":
        return Level.SYSTEM
    prefix, sep, rest = scope.partition(":")
    if sep and rest:
        for lvl, name in (
            (Level.PRIVATE, "agent"),
            (Level.TEAM, "team"),
            (Level.SWARM, "swarm"),
            (Level.PROJECT, "project"),
        ):
            if prefix == name:
                return lvl
    raise ValidationError(f"not a dualmem scope: {scope!r}")


def stored_level(scope: str, level: int) -> Level:
    """The level to open a stored row of ``scope`` with: its scope's level.

    The row's own level column must agree; ``TamperedRecord`` if it does not (edited: a
    plaintext level on an encrypted scope would let a planted plaintext value be read).

    >>> stored_level("agent:alice", 1)
    <Level.PRIVATE: 1>
    >>> stored_level("agent:alice", 3)
    Traceback (most recent call last):
    ...
    acl.errors.TamperedRecord: agent:alice: stored at level 3, but its scope is at level 1 (edited)
    """
    try:
        expected = level_of_scope(scope)
    except ValueError as exc:
        raise TamperedRecord(f"stored under {scope!r}: {exc}") from None
    if level != int(expected):
        raise TamperedRecord(
            f"{scope}: stored at level {level}, but its scope is at level {int(expected)} (edited)"
        )
    return expected
