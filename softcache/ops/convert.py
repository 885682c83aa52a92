"""``softcache convert``: a lossless copy of a cache to the other backend (encoded batches move as they are), with the
files beside the shards that the manifest records (``softcache generate``'s ``generations.jsonl``)."""

from __future__ import annotations

import copy
import hashlib

from ..errors import CacheFormatError
from ..format import get_backend, join
from ..format.fs import check_plain_file, tmp_name
from ..format.manifest import check_shard_name
from ..reader import Cache, open_cache
from ..writer import CacheWriter

RECORDED_FILES = {"generated_text": "softcache generate"}
"""Keys of the manifest's metadata naming a file inside the cache, ``{"file": name, "sha256": digest, ...}``, that
belongs to the cache and travels with it → the command that writes it (again, when it is missing)."""


def recorded_files(cache: Cache) -> list[tuple[str, str]]:
    """(name, SHA-256) of the files beside the shards that the manifest records (:data:`RECORDED_FILES`), each checked
    present, a regular file and of the recorded digest; a CacheFormatError names a missing or altered one."""
    out = []
    for key, command in RECORDED_FILES.items():
        record = cache.manifest.metadata.get(key)
        if record is None:
            continue
        where = f"{cache.url}: metadata.{key}"
        name = check_shard_name(record.get("file") if isinstance(record, dict) else None, where)
        path = join(cache.root, name)
        if not cache.fs.exists(path):
            raise CacheFormatError(f"{path} is missing ({where} records it); rerun the {command} command that wrote "
                                   f"{cache.url} to write it again, then convert")  # fmt: skip
        check_plain_file(cache.fs, path, where)
        if _copy(cache.fs, path) != record.get("sha256"):
            raise CacheFormatError(f"{path} does not match the SHA-256 the manifest records ({where}): it was edited "
                                   f"or damaged; delete it and rerun the {command} command that wrote {cache.url} to "
                                   "write it again, then convert")  # fmt: skip
        out.append((name, record["sha256"]))
    return out


def _copy(fs, path: str, out_fs=None, out_path: str | None = None) -> str:
    """SHA-256 of the file ``path``, copied on the way to ``out_path`` on ``out_fs`` if given."""
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        out = out_fs.open(out_path, "wb") if out_fs is not None else None
        try:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
                if out is not None:
                    out.write(chunk)
        finally:
            if out is not None:
                out.close()
    return digest.hexdigest()


def convert(src, dst, backend: str, storage_options: dict | None = None, progress=None) -> Cache:
    """Copy the cache at ``src`` to a new cache at ``dst`` stored with ``backend``, losslessly: the
    encoded batches are moved as they are (and their checksums checked on the way), the files the manifest
    records beside them (``generations.jsonl``) byte for byte, and a build's state once every shard is in."""
    get_backend(backend)
    cache = open_cache(src, storage_options=storage_options)
    files = recorded_files(cache)  # checked before anything is written
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
            if _copy(cache.fs, join(cache.root, name), writer.fs, tmp) != sha256:
                writer.fs.rm(tmp)
                raise CacheFormatError(f"{join(cache.root, name)} changed while it was copied; convert again")
            writer.fs.mv(tmp, join(writer.root, name))
        writer.copy_shards(cache.encoded_shards(), progress=progress)
        if cache.manifest.build_state is not None:  # a build's state (finished or not, what it skipped) travels too
            writer.manifest.build_state = copy.deepcopy(cache.manifest.build_state)
            writer.save_manifest()
    cache.close()
    return open_cache(dst, storage_options=storage_options)
