"""The Zarr v3 backend passes the shard conformance suite, and its streams may span many chunks and shard files."""

import pytest

import softcache.format._zarr as zarr_backend
from softcache.errors import CorruptShardError
from softcache.format import get_backend, join
from softcache.format.testing import (
    HEADER,
    ShardBackendTests,
    assert_batches,
    flip,
    make_batches,
    read_everything,
    same,
    write_shard,
)


class TestZarr(ShardBackendTests):
    backend_name = "zarr"

    def is_metadata(self, file: str) -> bool:
        return file.rsplit("/", 1)[-1] == "zarr.json"

    def test_streams_span_many_chunks_and_shard_files(self, fsroot, monkeypatch):
        """Batches that straddle chunk and shard-file boundaries; losing or damaging any shard file is an error."""
        monkeypatch.setattr(zarr_backend, "_CHUNK", 256)
        monkeypatch.setattr(zarr_backend, "_CHUNKS_PER_SHARD", 4)
        fs, root = fsroot
        backend = get_backend(self.backend_name)
        name, batches, _ = write_shard(backend, fs, root, batches=make_batches(12, 8))
        reader = backend.open(fs, root, name)
        assert_batches(reader, batches)
        data_files = [f for f in fs.find(join(root, name) + "/streams/0") if "/c/" in f]
        assert len(data_files) > 3  # several shard files, each holding up to 4 chunks
        for f in (data_files[0], data_files[len(data_files) // 2], data_files[-1]):
            original = fs.cat_file(f)
            fs.rm(f)
            with pytest.raises(CorruptShardError, match=name):
                read_everything(backend, fs, root, name, len(batches))
            fs.pipe_file(f, original)
            flip(fs, f, len(original) // 3)
            with pytest.raises(CorruptShardError, match=name):
                read_everything(backend, fs, root, name, len(batches))
            fs.pipe_file(f, original)
        assert same(*read_everything(backend, fs, root, name, len(batches)), HEADER, batches)
