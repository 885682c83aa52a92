"""Every public exception of softcache. Each message names the file, shard, row or option at fault and the fix.
All but :class:`CacheLockedError` (a conflict between writers, not a bad value) are ``ValueError`` subclasses."""

from __future__ import annotations


class CacheFormatError(ValueError):
    """The cache (its manifest or a shard) is not one this version of softcache can read."""


class CorruptShardError(CacheFormatError):
    """A shard is truncated, altered or unreadable; the message names it."""


class TeacherError(ValueError):
    """The teacher cannot be used as given; the message says why and what to change."""


class DataError(ValueError):
    """The dataset cannot be used as given; the message names the file, column or row and the fix."""


class BuildConflictError(ValueError):
    """``--out`` holds something this build must not write into."""


class CacheLockedError(RuntimeError):
    """Another writer holds the cache (one writer per cache); the message names it."""


__all__ = [
    "BuildConflictError",
    "CacheFormatError",
    "CacheLockedError",
    "CorruptShardError",
    "DataError",
    "TeacherError",
]
