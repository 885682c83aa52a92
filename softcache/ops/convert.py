"""``softcache convert``: a lossless copy of a cache to the other backend (encoded batches move as they are)."""

from __future__ import annotations

from ..errors import CacheFormatError
from ..format import get_backend
from ..reader import Cache, open_cache
from ..writer import CacheWriter


def convert(src, dst, backend: str, storage_options: dict | None = None, progress=None) -> Cache:
    """Copy the cache at ``src`` to a new cache at ``dst`` stored with ``backend``, losslessly: the
    encoded batches are moved as they are (and their checksums checked on the way)."""
    get_backend(backend)
    cache = open_cache(src, storage_options=storage_options)
    writer = CacheWriter.like(cache.manifest, dst, backend=backend, storage_options=storage_options)
    if writer.manifest.fixed()["codec"] != cache.manifest.codec:
        raise CacheFormatError(f"{src}: codec parameters {cache.manifest.codec} cannot be reproduced by this softcache")
    if writer.manifest.shards:
        raise CacheFormatError(f"{dst} already holds a cache; convert needs a new or empty destination")
    with writer:
        writer.copy_shards(cache.encoded_shards(), progress=progress)
    cache.close()
    return open_cache(dst, storage_options=storage_options)
