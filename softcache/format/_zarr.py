"""Zarr v3 shards: one Zarr group (a directory) per shard, flat arrays instead of one record per batch.

Layout of a shard ``NAME`` (a Zarr v3 group)::

    zarr.json          group attributes ``softcache``: format, version, stream names (in order),
                       header names (in order) and the CRC-32 of the header
    streams/<j>        uint8 (total,)  stream j concatenated over all batches
    batch_offsets      int64 (n_batches + 1, n_streams)  where batch i of stream j starts and ends
    crc32              uint32 (n_batches,)  the per-batch CRC-32 that :class:`ShardReader` checks
    header/<j>         uint8 (size,)  header stream j

Arrays are named by position, so any stream name is allowed; the names live in the attributes.
Every array is zstd-compressed with a ``crc32c`` checksum per chunk and sharded (Zarr's ``shards=``),
so each array is one file (a few for very large streams) rather than thousands of chunk files.

One writer owns a whole shard: batches are buffered in memory and every array is written once, in
:meth:`ZarrShardWriter._finish` (appending to a sharded array would rewrite its shard files).

Zarr reads a missing chunk as its fill value. A shard that lost a file must be an error, so the reader
opens the group through :class:`_StrictStore`, which turns every missing key into an exception, and
checks the stored shapes, offsets and header checksum before it serves a batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import zarr
from fsspec.implementations.local import LocalFileSystem
from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec
from zarr.storage import FsspecStore, LocalStore, WrapperStore

from ..errors import CorruptShardError
from .base import Backend, ShardReader, ShardWriter, batch_crc

_FORMAT = "softcache-shard"
_VERSION = 1
_ATTR = "softcache"
_CHUNK = 1 << 20  # elements (bytes) per inner chunk of a stream array
_CHUNKS_PER_SHARD = 256  # so one shard file holds at most 256 MiB of a stream
_ZSTD_LEVEL = 3


def _store(fs, path: str, read_only: bool):
    """A Zarr store for ``path`` on the fsspec filesystem ``fs`` (local paths use Zarr's LocalStore)."""
    if isinstance(fs, LocalFileSystem):
        return LocalStore(fs._strip_protocol(path), read_only=read_only)
    afs = fs
    if not (fs.async_impl and fs.asynchronous):
        from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

        afs = AsyncFileSystemWrapper(fs, asynchronous=True)
    return FsspecStore(afs, path=fs._strip_protocol(path).rstrip("/"), read_only=read_only)


class _StrictStore(WrapperStore):
    """Read-only store view in which a missing key is an error, never Zarr's silent fill value."""

    async def get(self, key, prototype, byte_range=None):
        value = await self._store.get(key, prototype, byte_range)
        if value is None:
            raise FileNotFoundError(f"{key} is missing")
        return value

    async def get_partial_values(self, prototype, key_ranges: Iterable):
        key_ranges = list(key_ranges)
        values = await self._store.get_partial_values(prototype, key_ranges)
        for (key, _), value in zip(key_ranges, values, strict=True):
            if value is None:
                raise FileNotFoundError(f"{key} is missing")
        return values


def _create(group: zarr.Group, name: str, data: np.ndarray, chunks: tuple[int, ...]) -> None:
    """Write ``data`` as a zstd + crc32c array in one shard file per ``shards`` block, every chunk stored."""
    chunks = tuple(max(1, c) for c in chunks)
    if data.ndim == 1:
        n_chunks = max(1, math.ceil(data.shape[0] / chunks[0]))
        shards = (chunks[0] * min(n_chunks, _CHUNKS_PER_SHARD),)
    else:
        shards = chunks
    array = group.create_array(
        name,
        shape=data.shape,
        dtype=data.dtype,
        chunks=chunks,
        shards=shards,
        serializer=BytesCodec(),
        compressors=[ZstdCodec(level=_ZSTD_LEVEL), Crc32cCodec()],
        fill_value=0,
        config={"write_empty_chunks": True},  # an all-zero chunk is stored too, so absence means damage
    )
    if data.size:
        array[...] = data


def _stream_chunks(n: int) -> tuple[int]:
    return (min(_CHUNK, max(1, n)),)


class ZarrShardWriter(ShardWriter):
    def __init__(self, fs, root, name, header, streams) -> None:
        super().__init__(fs, root, name)
        self.streams = list(streams)
        if len(set(self.streams)) != len(self.streams):
            raise ValueError(f"shard {name}: stream names must be distinct, got {self.streams}")
        self.header = {k: np.ascontiguousarray(v, np.uint8).reshape(-1) for k, v in header.items()}
        self._parts: dict[str, list[np.ndarray]] = {s: [] for s in self.streams}
        self._lengths: list[list[int]] = []
        self._crcs: list[int] = []
        self._done = False
        if fs.exists(self.tmp_path):  # left by a killed run: its stale chunk files must not survive
            fs.rm(self.tmp_path, recursive=True)
        fs.makedirs(self.tmp_path, exist_ok=True)

    def _write(self, streams, crc) -> None:
        if self._done:
            raise RuntimeError(f"shard {self.name}: write after commit/abort")
        if set(streams) != set(self.streams):
            raise ValueError(f"shard {self.name}: batch has streams {sorted(streams)}, expected {sorted(self.streams)}")
        lengths = []
        for s in self.streams:
            data = np.ascontiguousarray(streams[s], np.uint8).reshape(-1).copy()
            self._parts[s].append(data)
            lengths.append(data.size)
        self._lengths.append(lengths)
        self._crcs.append(crc)

    def abort(self) -> None:
        self._done = True  # nothing to write: the base class removes the temporary directory
        super().abort()

    def _finish(self) -> None:
        if self._done:
            return
        self._done = True
        store = _store(self.fs, self.tmp_path, read_only=False)
        group = zarr.create_group(
            store,
            zarr_format=3,
            overwrite=True,
            attributes={
                _ATTR: {
                    "format": _FORMAT,
                    "version": _VERSION,
                    "streams": self.streams,
                    "header": list(self.header),
                    "header_crc32": batch_crc(self.header),
                }
            },
        )
        n_streams = len(self.streams)
        lengths = np.asarray(self._lengths, np.int64).reshape(-1, n_streams)
        offsets = np.zeros((lengths.shape[0] + 1, n_streams), np.int64)
        np.cumsum(lengths, axis=0, out=offsets[1:])
        _create(group, "batch_offsets", offsets, offsets.shape)
        _create(group, "crc32", np.asarray(self._crcs, np.uint32), (len(self._crcs),))
        for j, s in enumerate(self.streams):
            parts = self._parts.pop(s)
            data = np.concatenate(parts) if parts else np.zeros(0, np.uint8)
            _create(group, f"streams/{j}", data, _stream_chunks(data.size))
        for j, value in enumerate(self.header.values()):
            _create(group, f"header/{j}", value, _stream_chunks(value.size))


class ZarrShardReader(ShardReader):
    def __init__(self, fs, root, name) -> None:
        super().__init__(fs, root, name)
        try:
            self._open()
        except CorruptShardError:
            raise
        except Exception as e:
            raise CorruptShardError(f"shard {name}: cannot be opened as a Zarr shard ({type(e).__name__}: {e})") from e

    def _fail(self, what: str) -> None:
        raise CorruptShardError(f"shard {self.name}: {what}; the shard is corrupted (rebuild or restore it)")

    def _open(self) -> None:
        if not self.fs.isdir(self.path):
            self._fail("is not a directory (a Zarr shard is one)")
        store = _StrictStore(_store(self.fs, self.path, read_only=True))
        group = zarr.open_group(store, mode="r", zarr_format=3)
        attrs = group.attrs.get(_ATTR)
        if not isinstance(attrs, dict) or attrs.get("format") != _FORMAT:
            self._fail("lacks the softcache attributes")
        if attrs.get("version") != _VERSION:
            self._fail(f"has shard layout version {attrs.get('version')!r}, this softcache reads {_VERSION}")
        self._streams = list(attrs["streams"])
        header_names = list(attrs["header"])

        offsets = np.asarray(group["batch_offsets"][...])
        crcs = np.asarray(group["crc32"][...])
        n = crcs.shape[0] if crcs.ndim == 1 else -1
        if offsets.dtype != np.int64 or crcs.dtype != np.uint32 or offsets.shape != (n + 1, len(self._streams)):
            self._fail(f"has inconsistent batch tables (offsets {offsets.shape}, crc32 {crcs.shape})")
        if (offsets[0] != 0).any() or (np.diff(offsets, axis=0) < 0).any():
            self._fail("has invalid batch offsets")
        self._arrays = []
        for j in range(len(self._streams)):
            array = group[f"streams/{j}"]
            if array.dtype != np.uint8 or array.shape != (int(offsets[-1, j]),):
                self._fail(f"stream {self._streams[j]!r} holds {array.shape} bytes, offsets say {offsets[-1, j]}")
            self._arrays.append(array)
        header = {}
        for j, key in enumerate(header_names):
            array = group[f"header/{j}"]
            if array.dtype != np.uint8 or array.ndim != 1:
                self._fail(f"header {key!r} is not a 1-D uint8 array")
            header[key] = np.asarray(array[...])
        if batch_crc(header) != attrs["header_crc32"]:
            self._fail("header fails its checksum")
        self.header = header
        self._offsets, self._crcs = offsets, crcs
        self.num_batches = int(n)

    def _read(self, index):
        start, stop = self._offsets[index], self._offsets[index + 1]
        streams = {}
        for j, (s, array) in enumerate(zip(self._streams, self._arrays, strict=True)):
            a, b = int(start[j]), int(stop[j])
            streams[s] = np.asarray(array[a:b], np.uint8) if b > a else np.zeros(0, np.uint8)
        return streams, int(self._crcs[index])

    def close(self) -> None:
        self._arrays = []


class ZarrBackend(Backend):
    name = "zarr"
    suffix = ".zarr"
    writer = ZarrShardWriter
    reader = ZarrShardReader
