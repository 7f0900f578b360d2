"""Exceptions raised by colengine. All derive from ``ValueError`` or ``OSError`` so that
callers who already catch those keep working."""

from __future__ import annotations

__all__ = ["IndexFormatError", "DuplicateIdError", "UnknownIdError", "FilterError",
           "StaleIndexError", "LockTimeoutError"]


class IndexFormatError(OSError):
    """A path is not a colengine index, or the index on disk is truncated, tampered with,
    from another program, or from an incompatible format version."""


class DuplicateIdError(ValueError):
    """The same external document id was given twice, or is already in the index."""


class UnknownIdError(KeyError):
    """A document id passed to ``rerank`` or ``delete`` is not in the index."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "unknown id"


class FilterError(ValueError):
    """A metadata filter is malformed: unknown operator, bad field name, wrong value type."""


class StaleIndexError(OSError):
    """A save would overwrite a newer generation written by another writer since this copy
    was loaded: reload the index and apply the change again."""


class LockTimeoutError(TimeoutError):
    """Another process held an index's writer lock for longer than the timeout allowed."""
