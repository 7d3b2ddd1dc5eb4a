"""Checks on text shared by ``acl`` and ``dualmem`` (``acl`` imports nothing of dualmem)."""

from __future__ import annotations

__all__ = ["encodes_utf8"]


def encodes_utf8(text: str) -> bool:
    """Whether ``text`` encodes to UTF-8: ``False`` only for a str holding a lone surrogate
    (``"\\ud800"``, as ``json.loads`` or ``os.fsdecode`` can make), which every Redis key,
    stream field, SQLite parameter and file name it may become refuses.

    >>> encodes_utf8("coder-1"), encodes_utf8("é"), encodes_utf8("a\\ud800")
    (True, True, False)
    """
    if text.isascii():  # a flag of the str in CPython: the common case, without a copy
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
