"""Every public exception of softcache. All are ``ValueError`` subclasses whose message names the file, shard,
row or option at fault and the fix."""

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


__all__ = ["BuildConflictError", "CacheFormatError", "CorruptShardError", "DataError", "TeacherError"]
