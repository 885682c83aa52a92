"""One interface for shard storage; Arrow IPC and Zarr v3 implement it (``_arrow.py``, ``_zarr.py``).

A shard is a sequence of *batches*; a batch is a dict of named 1-D ``uint8`` streams (the codec's
output) that the backend stores compressed. Each shard also holds a small *header* of named streams
(e.g. the id order). The backend stores and returns bytes exactly; this module adds what both share:
a CRC-32 per batch (checked on every read, so corruption is an error, never wrong numbers), a digest
per shard (recorded in the manifest and checked by ``softcache verify``), and the atomic commit
(write under a temporary name, then rename).
"""

from __future__ import annotations

import hashlib
import zlib
from abc import ABC, abstractmethod

import numpy as np

from ..errors import CorruptShardError
from .fs import join, tmp_name


def batch_crc(streams: dict[str, np.ndarray]) -> int:
    crc = 0
    for name in sorted(streams):
        crc = zlib.crc32(name.encode(), crc)
        crc = zlib.crc32(np.ascontiguousarray(streams[name], np.uint8).data, crc)
    return crc


def shard_digest(fs, path: str) -> tuple[int, str]:
    """Total bytes and SHA-256 of a shard, a file or a directory (relative names and contents, sorted)."""
    h = hashlib.sha256()
    if fs.isdir(path):
        files = sorted(fs.find(path))
        prefix = fs._strip_protocol(path).rstrip("/") + "/"
    else:
        files, prefix = [path], None
    total = 0
    for f in files:
        if prefix is not None:
            h.update(fs._strip_protocol(f)[len(prefix) :].encode() + b"\0")
        with fs.open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
                total += len(chunk)
    return total, h.hexdigest()


BACKENDS = ("arrow", "zarr")
"""The shard backends' names (the registry in :mod:`softcache.format` maps them to their classes)."""


class ShardWriter(ABC):
    """Writes one shard under a temporary name; :meth:`commit` makes it final."""

    def __init__(self, fs, root: str, name: str) -> None:
        self.fs, self.root, self.name = fs, root, name
        self.path = join(root, name)
        self.tmp_path = join(root, tmp_name(name))
        self.batches: list[int] = []

    def write_batch(self, streams: dict[str, np.ndarray], n_sequences: int) -> None:
        self._write(streams, batch_crc(streams))
        self.batches.append(n_sequences)

    def commit(self) -> tuple[int, str]:
        """Finish the file, rename it to its final name; returns (bytes, sha256)."""
        self._finish()
        size, digest = shard_digest(self.fs, self.tmp_path)
        if self.fs.exists(self.path):  # an orphan from a run killed between rename and manifest update
            self.fs.rm(self.path, recursive=True)
        self.fs.mv(self.tmp_path, self.path, recursive=True)
        return size, digest

    def abort(self) -> None:
        try:
            self._finish()
        finally:
            if self.fs.exists(self.tmp_path):
                self.fs.rm(self.tmp_path, recursive=True)

    @abstractmethod
    def _write(self, streams: dict[str, np.ndarray], crc: int) -> None: ...

    @abstractmethod
    def _finish(self) -> None: ...


class ShardReader(ABC):
    """Random access to the batches of one committed shard."""

    header: dict[str, np.ndarray]
    num_batches: int

    def __init__(self, fs, root: str, name: str) -> None:
        self.fs, self.name = fs, name
        self.path = join(root, name)

    def read_batch(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < self.num_batches:
            raise CorruptShardError(f"shard {self.name}: batch {index} is missing ({self.num_batches} stored)")
        try:
            streams, crc = self._read(index)
        except CorruptShardError:
            raise
        except Exception as e:  # any decoding failure of a damaged file
            raise CorruptShardError(f"shard {self.name}: batch {index} is unreadable ({type(e).__name__}: {e})") from e
        if batch_crc(streams) != crc:
            raise CorruptShardError(
                f"shard {self.name}: batch {index} fails its checksum; the file is corrupted "
                "(rebuild it, or restore it from a copy; `softcache verify` lists every damaged shard)"
            )
        return streams

    @abstractmethod
    def _read(self, index: int) -> tuple[dict[str, np.ndarray], int]: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


class Backend:
    """A storage backend: its name, its shard suffix, and the classes that write and read its shards."""

    name: str
    suffix: str
    writer: type[ShardWriter]
    reader: type[ShardReader]

    def create(self, fs, root: str, name: str, header: dict[str, np.ndarray], streams: list[str]) -> ShardWriter:
        return self.writer(fs, root, name, header, streams)

    def open(self, fs, root: str, name: str) -> ShardReader:
        return self.reader(fs, root, name)

