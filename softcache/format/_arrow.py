"""Arrow IPC shards: one file per shard, one record batch per batch, zstd-compressed buffers.

Each stream is a ``binary`` column holding one value; the header streams live, zstd-compressed, in
the schema metadata. Local shards are memory-mapped; other fsspec URLs are read through ``fs.open``.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
from fsspec.implementations.local import LocalFileSystem

from ..errors import CorruptShardError
from .base import Backend, ShardReader, ShardWriter, batch_crc

_HEADER_KEY = b"softcache.header"
_HEADER_CRC_KEY = b"softcache.header-crc32"  # the header is not covered by the per-batch CRC; zstd has no checksum


def _header_metadata(header: dict[str, np.ndarray]) -> dict[bytes, bytes]:
    meta = {_HEADER_KEY: json.dumps({k: int(v.size) for k, v in header.items()}).encode()}
    meta[_HEADER_CRC_KEY] = str(batch_crc(header)).encode()
    for key, value in header.items():
        data = np.ascontiguousarray(value, np.uint8)
        meta[f"softcache.header.{key}".encode()] = pa.compress(data, "zstd", asbytes=True)
    return meta


def _read_header(metadata: dict[bytes, bytes] | None) -> dict[str, np.ndarray]:
    if not metadata or _HEADER_KEY not in metadata:
        raise ValueError("schema metadata lacks the softcache header")
    sizes = json.loads(metadata[_HEADER_KEY])
    header = {
        key: np.frombuffer(pa.decompress(metadata[f"softcache.header.{key}".encode()], size, "zstd"), np.uint8)
        for key, size in sizes.items()
    }
    if str(batch_crc(header)).encode() != metadata.get(_HEADER_CRC_KEY):
        raise ValueError("the header fails its checksum")
    return header


def _value(column: pa.BinaryArray) -> np.ndarray:
    """The one value of a binary column as a uint8 view of its data buffer (``column[0].as_buffer()`` copies)."""
    _, offsets, data = column.buffers()
    start, end = np.frombuffer(offsets, np.int32, 2, column.offset * 4)
    return np.frombuffer(data, np.uint8, int(end - start), int(start)) if end > start else np.zeros(0, np.uint8)


class ArrowShardWriter(ShardWriter):
    def __init__(self, fs, root, name, header, streams) -> None:
        super().__init__(fs, root, name)
        self.streams = list(streams)
        schema = pa.schema([(s, pa.binary()) for s in self.streams] + [("crc32", pa.uint32())])
        self._schema = schema.with_metadata(_header_metadata(header))
        self._file = fs.open(self.tmp_path, "wb")
        self._writer = ipc.new_file(
            self._file,
            self._schema,
            options=ipc.IpcWriteOptions(compression="zstd"),
        )

    def _write(self, streams, crc) -> None:
        columns = [pa.array([np.ascontiguousarray(streams[s], np.uint8).tobytes()], pa.binary()) for s in self.streams]
        batch = pa.record_batch(columns + [pa.array([crc], pa.uint32())], schema=self._schema)
        self._writer.write_batch(batch)

    def _finish(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._file.close()
            self._writer = None


class ArrowShardReader(ShardReader):
    def __init__(self, fs, root, name) -> None:
        super().__init__(fs, root, name)
        try:
            if isinstance(fs, LocalFileSystem):
                self._source = pa.memory_map(fs._strip_protocol(self.path))
            else:
                self._source = fs.open(self.path, "rb")
            self._reader = ipc.open_file(self._source)
            self.header = _read_header(self._reader.schema.metadata)
            self.num_batches = self._reader.num_record_batches
            self._columns = [n for n in self._reader.schema.names if n != "crc32"]
        except Exception as e:
            raise CorruptShardError(f"shard {name}: cannot be opened as Arrow IPC ({type(e).__name__}: {e})") from e

    def _read(self, index):
        batch = self._reader.get_batch(index)
        batch.validate(full=True)  # IPC reads are not validated: a damaged offset would crash the process
        return {n: _value(batch.column(n)) for n in self._columns}, batch.column("crc32")[0].as_py()

    def close(self) -> None:
        self._source.close()


class ArrowBackend(Backend):
    name = "arrow"
    suffix = ".arrow"
    writer = ArrowShardWriter
    reader = ArrowShardReader
