"""Storage format: the manifest, the filesystem helpers and the shard backends.

``base`` defines the interface every backend implements, ``_arrow`` and ``_zarr`` implement it, and this module is
their registry (it imports them; they never import it). ``testing`` holds the conformance suite every backend's tests
subclass.
"""

from __future__ import annotations

from .base import BACKENDS, Backend, ShardReader, ShardWriter, shard_digest
from .fs import join, open_fs
from .manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    BuildState,
    Manifest,
    ShardEntry,
    check_shard_name,
    load_manifest,
    save_manifest,
)


def get_backend(name: str) -> Backend:
    """The backend called ``name``; each is imported only when asked for (zarr is slow to import)."""
    if name == "arrow":
        from ._arrow import ArrowBackend

        return ArrowBackend()
    if name == "zarr":
        from ._zarr import ZarrBackend

        return ZarrBackend()
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


__all__ = [
    "BACKENDS",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "Backend",
    "BuildState",
    "Manifest",
    "ShardEntry",
    "ShardReader",
    "ShardWriter",
    "check_shard_name",
    "get_backend",
    "join",
    "load_manifest",
    "open_fs",
    "save_manifest",
    "shard_digest",
]
