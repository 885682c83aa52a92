"""Storage format: the manifest, shard naming and safety rules, and the Arrow / Zarr shard backends."""

from .backend import BACKENDS, Backend, ShardReader, ShardWriter, get_backend
from .manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    CacheFormatError,
    CorruptShardError,
    check_shard_name,
    load_manifest,
    save_manifest,
)

__all__ = [
    "BACKENDS",
    "Backend",
    "CacheFormatError",
    "CorruptShardError",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "ShardReader",
    "ShardWriter",
    "check_shard_name",
    "get_backend",
    "load_manifest",
    "save_manifest",
]
