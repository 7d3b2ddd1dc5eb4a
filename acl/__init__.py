"""Access levels, principals, access policy and envelope crypto; no storage in here."""

from acl.crypto import Codec, JsonSerializer, Keyring, Lz4Compressor, envelope_key_id
from acl.errors import (
    AccessDenied,
    ConfigurationError,
    DualMemError,
    MissingKey,
    TamperedRecord,
    ValidationError,
)
from acl.levels import ENCRYPTED_LEVELS, Level, as_level
from acl.policy import level_of_scope, readable_scopes, resolve_scope
from acl.principal import Principal

__all__ = [
    "ENCRYPTED_LEVELS",
    "AccessDenied",
    "Codec",
    "ConfigurationError",
    "DualMemError",
    "JsonSerializer",
    "Keyring",
    "Level",
    "Lz4Compressor",
    "MissingKey",
    "Principal",
    "TamperedRecord",
    "ValidationError",
    "as_level",
    "envelope_key_id",
    "level_of_scope",
    "readable_scopes",
    "resolve_scope",
]
