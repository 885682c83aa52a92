"""Filesystem helpers shared by every layer: open a local path or fsspec URL, and name files inside a cache."""

from __future__ import annotations

import os
import stat

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ..errors import CacheFormatError


def open_fs(path_or_url, storage_options: dict | None = None):
    """→ (fsspec filesystem, root path without a trailing slash) for a local path or any fsspec URL."""
    fs, root = fsspec.core.url_to_fs(str(path_or_url), **(storage_options or {}))
    return fs, root.rstrip("/") or "/"


def join(root: str, name: str) -> str:
    """``root/name`` on an fsspec filesystem (always ``/``, whatever the OS)."""
    return f"{root.rstrip('/')}/{name}"


def tmp_name(name: str) -> str:
    """The name a file is written under until it is committed by a rename."""
    return f".{name}.tmp"


LOCK_NAME = ".softcache.lock"


def is_tmp_name(name: str) -> bool:
    """Whether a file name is one :func:`tmp_name` made (a file still being written)."""
    return name.startswith(".") and name.endswith(".tmp")


def is_temporary(name: str) -> bool:
    """Whether a file name inside a cache is one of softcache's own temporaries (a file being written, or the
    writer's lock): a folder holding only these is an empty cache folder (e.g. after a kill during the first write)."""
    return is_tmp_name(name) or name == LOCK_NAME


def holds_only_temporaries(fs, root: str) -> bool:
    """True when ``root`` is missing, empty, or holds nothing but softcache temporaries."""
    if not fs.exists(root):
        return True
    return all(is_temporary(path.rstrip("/").rsplit("/", 1)[-1]) for path in fs.ls(root, detail=False))


def _local_kind(path: str) -> str:
    """'file', 'directory', 'symlink' or 'special' for a local path, without following a symlink."""
    mode = os.lstat(path).st_mode
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "directory"
    return "special"


def check_plain_file(fs, path: str, where: str, directory: bool = False) -> int:
    """Refuse anything at ``path`` but a regular file (or, with ``directory``, a directory tree of regular files):
    no symlinks (they could point out of the cache or at a device), no FIFOs or devices (reading them hangs or never
    ends). Returns the total size in bytes. A CacheFormatError names the path."""
    if not isinstance(fs, LocalFileSystem):  # object stores and memory:// have no links or special files
        info = fs.info(path)
        if info["type"] == "directory" and directory:
            return sum(f["size"] for f in fs.find(path, detail=True).values())
        if info["type"] != "file":
            raise CacheFormatError(f"{where}: {path} is a {info['type']}, not a file")
        return int(info["size"])
    local = fs._strip_protocol(path)
    kind = _local_kind(local)
    if kind == "directory" and directory:
        total = 0
        for top, dirs, files in os.walk(local):
            for name in dirs + files:
                inner = os.path.join(top, name)
                inner_kind = _local_kind(inner)
                if inner_kind == "file":
                    total += os.lstat(inner).st_size
                elif inner_kind != "directory":
                    raise CacheFormatError(f"{where}: {inner} is a {inner_kind}; a cache holds only regular files")
        return total
    if kind != "file":
        raise CacheFormatError(f"{where}: {path} is a {kind}; a cache holds only regular files (no links or devices)")
    return os.lstat(local).st_size
