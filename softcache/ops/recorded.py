"""The files beside the shards that the manifest records by name and SHA-256 (``softcache generate``'s
``generations.jsonl``): checked by ``softcache verify``, checked and copied by ``softcache convert``."""

from __future__ import annotations

import hashlib

from ..errors import CacheFormatError
from ..format import join
from ..format.fs import check_plain_file
from ..format.manifest import check_shard_name
from ..reader import Cache

RECORDED_FILES = {"generated_text": "softcache generate"}
"""Keys of the manifest's metadata naming a file inside the cache, ``{"file": name, "sha256": digest, ...}``, that
belongs to the cache and travels with it → the command that writes it (again, when it is missing)."""


def hash_file(fs, path: str, out_fs=None, out_path: str | None = None) -> str:
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


def check_recorded_files(
    cache: Cache, then: str | None = None, progress=None
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Check every file beside the shards that the manifest records (:data:`RECORDED_FILES`): present, a regular file
    (no symlink) and of the recorded SHA-256. → (sound, problems): (name, SHA-256) of each sound file, and (name,
    message) of each missing, altered or replaced one, the message naming its path and the fix (``then``: what to do
    once it is written again, e.g. ``"convert"``). A record that names no plain file is a problem named
    ``metadata.<key>``. ``progress(i, name)`` is called before each file is checked."""
    sound, problems = [], []
    for key, command in RECORDED_FILES.items():
        record = cache.manifest.metadata.get(key)
        if record is None:
            continue
        where = f"{cache.url}: metadata.{key}"
        rewrite = f"rerun the {command} command that wrote {cache.url} to write it again"
        if then:
            rewrite += f", then {then}"
        try:
            name = check_shard_name(record.get("file") if isinstance(record, dict) else None, where)
        except CacheFormatError as e:
            problems.append((f"metadata.{key}", str(e)))
            continue
        if progress is not None:
            progress(len(sound) + len(problems), name)
        path = join(cache.root, name)
        try:
            check_plain_file(cache.fs, path, where)
        except FileNotFoundError:
            problems.append((name, f"{path} is missing ({where} records it); {rewrite}"))
            continue
        except CacheFormatError as e:  # a symlink, directory or device in its place
            problems.append((name, f"{e}; delete it and {rewrite}"))
            continue
        if hash_file(cache.fs, path) != record.get("sha256"):
            problems.append((name, f"{path} does not match the SHA-256 the manifest records ({where}): it was edited "
                                   f"or damaged; delete it and {rewrite}"))  # fmt: skip
            continue
        sound.append((name, record["sha256"]))
    return sound, problems


def recorded_files(cache: Cache, then: str | None = None) -> list[tuple[str, str]]:
    """(name, SHA-256) of the files beside the shards that the manifest records (:data:`RECORDED_FILES`), each checked
    by :func:`check_recorded_files`; a CacheFormatError names the first missing or altered one and the fix."""
    sound, problems = check_recorded_files(cache, then)
    if problems:
        raise CacheFormatError(problems[0][1])
    return sound
