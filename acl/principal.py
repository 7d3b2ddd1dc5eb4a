"""Who is asking: a frozen principal naming its agent, team, swarm and project."""

from __future__ import annotations

from dataclasses import dataclass

from acl.errors import ValidationError
from acl.levels import Level, as_level
from acl.text import encodes_utf8

__all__ = ["MAX_ID_CHARS", "Principal"]

MAX_ID_CHARS = 128


def _check_id(field: str, value: object, *, required: bool) -> None:
    if value is None and not required:
        return
    if not isinstance(value, str):
        raise ValidationError(f"Principal.{field} must be a str, got {type(value).__name__}")
    if not value.strip():
        hint = "" if required else " (use None for 'not a member of any')"
        raise ValidationError(f"Principal.{field} must not be empty{hint}")
    if len(value) > MAX_ID_CHARS:
        raise ValidationError(f"Principal.{field} is longer than {MAX_ID_CHARS} characters")
    if any(ch < " " for ch in value):
        raise ValidationError(f"Principal.{field} must not contain control characters")
    if not encodes_utf8(value):  # it becomes part of scopes, Redis keys and stream entries
        raise ValidationError(f"Principal.{field} must be valid Unicode (no lone surrogates)")


@dataclass(frozen=True, slots=True)
class Principal:
    """An agent and the groups it belongs to; the only input to access decisions.

    dualmem authorizes, it does not authenticate: the host process that builds a
    ``Principal`` vouches for it. Each principal belongs to at most one team, swarm
    and project, so it has exactly one scope per level it may use.

    >>> coder = Principal(agent_id="coder-1", team="backend", swarm="s1", project="shop")
    >>> coder.scope(Level.PRIVATE), coder.scope(Level.TEAM), coder.scope(Level.SYSTEM)
    ('agent:coder-1', 'team:backend', None)
    """

    agent_id: str
    team: str | None = None
    swarm: str | None = None
    project: str | None = None
    system: bool = False

    def __post_init__(self) -> None:
        _check_id("agent_id", self.agent_id, required=True)
        _check_id("team", self.team, required=False)
        _check_id("swarm", self.swarm, required=False)
        _check_id("project", self.project, required=False)
        if not isinstance(self.system, bool):
            raise ValidationError("Principal.system must be a bool")

    def scope(self, level: Level | int | str) -> str | None:
        """The scope this principal owns at ``level`` (anything :func:`acl.as_level`
        takes), or ``None`` if it has none there.

        >>> Principal(agent_id="root", system=True).scope(1)
        'agent:root'
        """
        if not isinstance(level, Level):
            level = as_level(level)  # an int compared with `is` below fell through to SYSTEM
        if level is Level.PRIVATE:
            return f"agent:{self.agent_id}"
        if level is Level.TEAM:
            return None if self.team is None else f"team:{self.team}"
        if level is Level.SWARM:
            return None if self.swarm is None else f"swarm:{self.swarm}"
        if level is Level.PROJECT:
            return None if self.project is None else f"project:{self.project}"
        return "system" if self.system else None
