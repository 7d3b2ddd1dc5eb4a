"""dualmem: Redis-first writes, SQLite-backed reads, five access levels, encrypted at rest."""

from acl.levels import Level
from acl.principal import Principal
from dualmem.commands import Receipt
from dualmem.errors import (
    AccessDenied,
    Backpressure,
    ConfigurationError,
    DualMemError,
    KeyDropped,
    MissingKey,
    NotPersisted,
    RotationBusy,
    StoreUnavailable,
    TamperedRecord,
    ValidationError,
)
from dualmem.memory import CloseReport, DualMemory, Record
from dualmem.metrics import Metrics
from dualmem.missions import MissionLog
from dualmem.settings import Settings
from dualmem.store import Change, Store
from dualmem.subscriber import Subscriber
from dualmem.worker import Worker

__all__ = [
    "AccessDenied",
    "Backpressure",
    "Change",
    "CloseReport",
    "ConfigurationError",
    "DualMemError",
    "DualMemory",
    "KeyDropped",
    "Level",
    "Metrics",
    "MissingKey",
    "MissionLog",
    "NotPersisted",
    "Principal",
    "Receipt",
    "Record",
    "RotationBusy",
    "Settings",
    "Store",
    "StoreUnavailable",
    "Subscriber",
    "TamperedRecord",
    "ValidationError",
    "Worker",
]

__version__ = "0.1.0"
