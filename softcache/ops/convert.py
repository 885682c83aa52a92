"""``softcache convert``: a lossless copy of a cache to the other backend (encoded batches move as they are), with the
files beside the shards that the manifest records (``softcache generate``'s ``generations.jsonl``)."""

from __future__ import annotations

import copy

from ..errors import CacheFormatError
from ..format import get_backend, join
from ..format.fs import tmp_name
from ..reader import Cache, open_cache
from ..writer import CacheWriter
from .recorded import hash_file, recorded_files


def convert(src, dst, backend: str, storage_options: dict | None = None, progress=None) -> Cache:
    """Copy the cache at ``src`` to a new cache at ``dst`` stored with ``backend``, losslessly: the
    encoded batches are moved as they are (and their checksums checked on the way), the files the manifest
    records beside them (``generations.jsonl``) byte for byte, and a build's state once every shard is in."""
    get_backend(backend)
    cache = open_cache(src, storage_options=storage_options)
    files = recorded_files(cache, then="convert")  # checked before anything is written
    writer = CacheWriter.like(cache.manifest, dst, backend=backend, storage_options=storage_options)
    problem = None
    if writer.manifest.fixed()["codec"] != cache.manifest.codec:
        problem = f"{src}: codec parameters {cache.manifest.codec} cannot be reproduced by this softcache"
    elif writer.manifest.shards:
        problem = f"{dst} already holds a cache; convert needs a new or empty destination"
    if problem is not None:
        writer.abort()  # (releases the destination's lock)
        raise CacheFormatError(problem)
    with writer:
        for name, sha256 in files:  # under a temporary name, then renamed: never half a file under its own name
            tmp = join(writer.root, tmp_name(name))
            if hash_file(cache.fs, join(cache.root, name), writer.fs, tmp) != sha256:
                writer.fs.rm(tmp)
                raise CacheFormatError(f"{join(cache.root, name)} changed while it was copied; convert again")
            writer.fs.mv(tmp, join(writer.root, name))
        writer.copy_shards(cache.encoded_shards(), progress=progress)
        if cache.manifest.build_state is not None:  # a build's state (finished or not, what it skipped) travels too
            writer.manifest.build_state = copy.deepcopy(cache.manifest.build_state)
            writer.save_manifest()
    cache.close()
    return open_cache(dst, storage_options=storage_options)
