"""The manifest ``softcache.json``: what a cache holds, and the rules that keep reading it safe.

The manifest is the commit point of a cache: a shard exists for readers only once the manifest names
it, and the manifest is replaced atomically (written under a temporary name, then renamed), so a
writer killed at any moment leaves the previous, consistent manifest behind.
"""

from __future__ import annotations

import json
import posixpath
import re

FORMAT_VERSION = 1
MANIFEST_NAME = "softcache.json"
_SHARD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_REQUIRED = ("format_version", "targets", "k", "vocab_size", "temperatures", "backend", "codec", "shards")


class CacheFormatError(ValueError):
    """The cache (its manifest or a shard) is not one this version of softcache can read."""


class CorruptShardError(CacheFormatError):
    """A shard is truncated, altered or unreadable; the message names it."""


def check_shard_name(name: object, where: str = MANIFEST_NAME) -> str:
    """A shard's file name must be a plain name inside the cache: no separators, no ``..``, not absolute."""
    if not isinstance(name, str) or not _SHARD_NAME.fullmatch(name) or ".." in name or posixpath.isabs(name):
        raise CacheFormatError(
            f"{where}: shard file name {name!r} is not a plain file name inside the cache "
            "(no '/', '\\', '..' or absolute paths); the manifest was altered or written by another tool"
        )
    return name


def _validate(manifest: object, where: str) -> dict:
    if not isinstance(manifest, dict):
        raise CacheFormatError(f"{where}: the manifest must be a JSON object")
    if manifest.get("format") != "softcache":
        raise CacheFormatError(f"{where}: not a softcache manifest (missing \"format\": \"softcache\")")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise CacheFormatError(f"{where}: invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise CacheFormatError(
            f"{where}: format version {version} is newer than this softcache reads ({FORMAT_VERSION}); "
            "upgrade softcache (pip install -U softcache)"
        )
    missing = [key for key in _REQUIRED if key not in manifest]
    if missing:
        raise CacheFormatError(f"{where}: manifest lacks {', '.join(missing)}")
    if manifest["targets"] not in ("topk", "sampled"):
        raise CacheFormatError(f"{where}: unknown target kind {manifest['targets']!r}")
    for i, shard in enumerate(manifest["shards"]):
        if not isinstance(shard, dict):
            raise CacheFormatError(f"{where}: shard entry {i} is not an object")
        check_shard_name(shard.get("file"), where)
        for key in ("sequences", "tokens", "bytes", "batches"):
            if key not in shard:
                raise CacheFormatError(f"{where}: shard {shard['file']} lacks {key!r}")
        if sum(shard["batches"]) != shard["sequences"]:
            raise CacheFormatError(f"{where}: shard {shard['file']}: batch sizes do not add up to its sequences")
    return manifest


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"


def load_manifest(fs, root: str) -> dict:
    """Read and validate the manifest of the cache at ``root`` on filesystem ``fs``."""
    path = _join(root, MANIFEST_NAME)
    if not fs.exists(path):
        what = "does not exist" if not fs.exists(root) else f"has no {MANIFEST_NAME}"
        raise CacheFormatError(f"{root} {what}: not a softcache cache (build one with `softcache build`)")
    try:
        manifest = json.loads(fs.cat_file(path))
    except (ValueError, UnicodeDecodeError) as e:
        raise CacheFormatError(f"{path}: manifest is not valid JSON ({e})") from None
    return _validate(manifest, path)


def save_manifest(fs, root: str, manifest: dict) -> None:
    """Atomically replace the manifest: write a temporary file, then rename it over the old one."""
    _validate(manifest, "manifest to save")
    path = _join(root, MANIFEST_NAME)
    tmp = _join(root, f".{MANIFEST_NAME}.tmp")
    with fs.open(tmp, "wb") as f:
        f.write(json.dumps(manifest, indent=1, sort_keys=True).encode())
    fs.mv(tmp, path)
