"""Filesystem helpers shared by every layer: open a local path or fsspec URL, and name files inside a cache."""

from __future__ import annotations

import fsspec


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
