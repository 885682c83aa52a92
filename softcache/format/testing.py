"""The conformance suite every shard backend passes, in the spirit of ``zarr.testing.store.StoreTests``.

A backend's tests subclass :class:`ShardBackendTests`, name the backend and, where its files differ, override the raw
hooks (which look at the files through the filesystem, never through the backend under test)::

    class TestArrow(ShardBackendTests):
        backend_name = "arrow"

Each test runs on a local path and on ``memory://``. The contract is that of :mod:`softcache.format.base`: bytes come
back exactly; the shard appears under its final name only on commit; and a damaged shard (a flipped byte, a truncated
or deleted file) raises :class:`~softcache.errors.CorruptShardError` naming the shard, never returns wrong bytes.
Needs pytest (the ``test`` extra); nothing else in softcache imports this module.
"""

from __future__ import annotations

import uuid

import fsspec
import numpy as np
import pytest

from ..errors import CorruptShardError
from . import get_backend
from .base import Backend, shard_digest
from .fs import join, tmp_name

STREAMS = ["ids", "logprobs", "lognorm", "tiny", "empty"]
HEADER = {"id_order": np.arange(300, dtype=np.uint16).view(np.uint8), "nothing": np.zeros(0, np.uint8)}


def make_batches(seed: int, n: int) -> list[dict[str, np.ndarray]]:
    """Random, incompressible streams of random sizes, zero included; ``tiny`` is 0 or 1 byte, ``empty`` 0."""
    rng = np.random.default_rng(seed)
    batches = []
    for i in range(n):
        sizes = {
            "ids": 0 if i % 7 == 3 else int(rng.integers(1, 4000)),
            "logprobs": int(rng.integers(0, 2000)),
            "lognorm": int(rng.choice([0, 1, 8, 64])),
            "tiny": i % 2,
            "empty": 0,
        }
        batches.append({s: rng.integers(0, 256, sizes[s], dtype=np.uint8) for s in STREAMS})
    return batches


def random_bytes(rng, most: int) -> np.ndarray:
    """A random stream of 0 to ``most − 1`` bytes."""
    return rng.integers(0, 256, int(rng.integers(0, most)), dtype=np.uint8)


def write_shard(backend: Backend, fs, root, name=None, batches=None, header=None, streams=STREAMS):
    name = name or f"shard-00000{backend.suffix}"
    batches = make_batches(0, 12) if batches is None else batches
    fs.makedirs(root, exist_ok=True)
    writer = backend.create(fs, root, name, HEADER if header is None else header, streams)
    for batch in batches:
        writer.write_batch(batch, n_sequences=1)
    return name, batches, writer.commit()


def assert_batches(reader, batches):
    assert reader.num_batches == len(batches)
    for i in np.random.default_rng(1).permutation(len(batches)):
        got = reader.read_batch(int(i))
        assert set(got) == set(batches[i])
        for key, value in batches[i].items():
            assert got[key].dtype == np.uint8 and got[key].ndim == 1, key
            np.testing.assert_array_equal(got[key], value, err_msg=f"batch {i} stream {key}")


def assert_header(reader, header):
    assert set(reader.header) == set(header)
    for key, value in header.items():
        np.testing.assert_array_equal(reader.header[key], np.ascontiguousarray(value, np.uint8).reshape(-1))


def read_everything(backend: Backend, fs, root, name, n_batches=None):
    """Open the shard and read the header and every batch (what a damaged shard must fail at).

    Like ``open_cache``, compare the batch count with the manifest's (``n_batches``): an Arrow footer whose
    batch count is damaged lists fewer batches, each intact, which only the manifest can tell.
    """
    reader = backend.open(fs, root, name)
    try:
        if n_batches is not None and reader.num_batches != n_batches:
            raise CorruptShardError(f"shard {name} holds {reader.num_batches} batches, the manifest says {n_batches}")
        return reader.header, [reader.read_batch(i) for i in range(reader.num_batches)]
    finally:
        reader.close()


def same(header, batches, want_header, want_batches) -> bool:
    def eq(a, b):
        return set(a) == set(b) and all(np.array_equal(a[k], np.asarray(b[k], np.uint8).reshape(-1)) for k in a)

    return eq(header, want_header) and len(batches) == len(want_batches) and all(map(eq, batches, want_batches))


def flip(fs, path, pos):
    data = bytearray(fs.cat_file(path))
    data[pos] ^= 0x5A
    fs.pipe_file(path, bytes(data))


class ShardBackendTests:
    """Subclass with ``backend_name`` set; pytest collects the subclass (named ``Test...``)."""

    backend_name: str

    # -- raw hooks: the files of a shard as the filesystem sees them --------------------------------------------

    def shard_files(self, fs, path) -> list[str]:
        """Every file a committed shard consists of."""
        return sorted(fs.find(path)) if fs.isdir(path) else [path]

    def is_metadata(self, file: str) -> bool:
        """Whether ``file`` is format metadata that the backend may legitimately recreate or tolerate losing
        (flips in it are sampled, not exhaustive); data files are never."""
        return False

    # -- fixtures -----------------------------------------------------------------------------------------------

    @pytest.fixture
    def backend(self) -> Backend:
        return get_backend(self.backend_name)

    @pytest.fixture(params=["local", "memory"])
    def fsroot(self, request, tmp_path):
        if request.param == "local":
            yield fsspec.filesystem("file"), str(tmp_path / "cache")
            return
        fs = fsspec.filesystem("memory")
        root = f"/softcache-test-{uuid.uuid4().hex}"
        fs.makedirs(root, exist_ok=True)
        try:
            yield fs, root
        finally:
            if fs.exists(root):
                fs.rm(root, recursive=True)

    @pytest.fixture
    def local(self, tmp_path):
        return fsspec.filesystem("file"), str(tmp_path / "cache")

    # --------------------------------------------------------------------------------------------- round trips


    def test_round_trip(self, backend, fsroot):
        fs, root = fsroot
        name, batches, _ = write_shard(backend, fs, root, batches=make_batches(2, 60))
        reader = backend.open(fs, root, name)
        assert_batches(reader, batches)
        assert_header(reader, HEADER)
        reader.close()


    def test_empty_header_and_zero_batches(self, backend, fsroot):
        fs, root = fsroot
        name, _, _ = write_shard(backend, fs, root, batches=[], header={})
        reader = backend.open(fs, root, name)
        assert reader.num_batches == 0 and reader.header == {}
        with pytest.raises(CorruptShardError, match=name):
            reader.read_batch(0)
        reader.close()


    def test_all_streams_empty(self, backend, fsroot):
        fs, root = fsroot
        batches = [{s: np.zeros(0, np.uint8) for s in STREAMS} for _ in range(3)]
        name, _, _ = write_shard(backend, fs, root, batches=batches, header={"h": np.zeros(0, np.uint8)})
        reader = backend.open(fs, root, name)
        assert_batches(reader, batches)
        assert_header(reader, {"h": np.zeros(0, np.uint8)})


    def test_all_zero_bytes(self, backend, fsroot):
        """Zero bytes equal Zarr's fill value; they must still be stored and read back."""
        fs, root = fsroot
        batches = [{s: np.zeros(n, np.uint8) for s in STREAMS} for n in (1, 5000, 0, 3)]
        name, _, _ = write_shard(backend, fs, root, batches=batches, header={"z": np.zeros(10, np.uint8)})
        assert_batches(backend.open(fs, root, name), batches)


    def test_stream_names_preserved(self, backend, fsroot):
        fs, root = fsroot
        streams = ["zeta", "a.b", "with space", "ünïcode", "0", "alpha"]
        rng = np.random.default_rng(3)
        batches = [{s: random_bytes(rng, 50) for s in streams} for _ in range(4)]
        name, _, _ = write_shard(backend, fs, root, batches=batches, streams=streams)
        reader = backend.open(fs, root, name)
        assert_batches(reader, batches)
        assert set(reader.read_batch(0)) == set(streams)


    def test_tmp_name_until_commit(self, backend, fsroot):
        fs, root = fsroot
        name = f"shard-00007{backend.suffix}"
        fs.makedirs(root, exist_ok=True)
        writer = backend.create(fs, root, name, HEADER, STREAMS)
        for batch in make_batches(4, 5):
            writer.write_batch(batch, n_sequences=2)
        assert writer.path == join(root, name) and writer.tmp_path == join(root, tmp_name(name))
        assert writer.tmp_path != writer.path
        assert not fs.exists(writer.path)
        assert writer.batches == [2] * 5
        size, digest = writer.commit()
        assert fs.exists(writer.path) and not fs.exists(writer.tmp_path)
        assert (size, digest) == shard_digest(fs, writer.path)
        assert size == sum(fs.size(f) for f in self.shard_files(fs, writer.path))
        assert len(digest) == 64
        assert [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)] == [name]


    def test_abort_removes_tmp(self, backend, fsroot):
        fs, root = fsroot
        fs.makedirs(root, exist_ok=True)
        writer = backend.create(fs, root, f"shard-00001{backend.suffix}", HEADER, STREAMS)
        for batch in make_batches(5, 3):
            writer.write_batch(batch, n_sequences=1)
        writer.abort()
        assert not fs.exists(writer.tmp_path) and not fs.exists(writer.path)
        assert fs.ls(root, detail=False) == []


    def test_commit_replaces_orphan_and_stale_tmp(self, backend, fsroot):
        """A run killed after the rename (orphan final shard) or before it (stale tmp) must not leak into a rewrite."""
        fs, root = fsroot
        name = f"shard-00002{backend.suffix}"
        old_header = {"a": np.ones(3, np.uint8), "b": HEADER["id_order"]}
        write_shard(backend, fs, root, name, batches=make_batches(6, 9), header=old_header)
        killed = backend.create(fs, root, name, {"c": np.ones(2, np.uint8)}, STREAMS)
        for batch in make_batches(7, 4):
            killed.write_batch(batch, n_sequences=1)
        killed._finish()  # everything written under the temporary name, then the process dies
        assert fs.exists(killed.tmp_path)

        batches = make_batches(8, 3)
        _, _, result = write_shard(backend, fs, root, name, batches=batches)
        reader = backend.open(fs, root, name)
        assert_batches(reader, batches)
        assert_header(reader, HEADER)
        reader.close()
        assert not fs.exists(killed.tmp_path)
        # byte-identical to the same shard written into a clean directory
        _, _, fresh = write_shard(backend, fs, root + "/clean", name, batches=batches)
        assert result == fresh


    def test_batch_out_of_range(self, backend, fsroot):
        fs, root = fsroot
        name, batches, _ = write_shard(backend, fs, root, batches=make_batches(9, 3))
        reader = backend.open(fs, root, name)
        for index in (-1, 3, 100):
            with pytest.raises(CorruptShardError, match=name):
                reader.read_batch(index)


    def test_missing_shard(self, backend, fsroot):
        fs, root = fsroot
        fs.makedirs(root, exist_ok=True)
        with pytest.raises(CorruptShardError, match="shard-00009"):
            backend.open(fs, root, f"shard-00009{backend.suffix}")


    # --------------------------------------------------------------------------------------------- damage


    def test_flipped_byte_anywhere_is_never_silent(self, backend, local):
        """Flip single bytes at several positions of every file: an error naming the shard, or the exact bytes."""
        fs, root = local
        name, batches, _ = write_shard(backend, fs, root)
        path = join(root, name)
        rng = np.random.default_rng(10)
        raised = tried = 0
        for f in self.shard_files(fs, path):
            size = fs.size(f)
            positions = {0, size // 2, size - 1, *rng.integers(0, size, 6).tolist()} if size else set()
            for pos in sorted(positions):
                flip(fs, f, pos)
                tried += 1
                try:
                    header, got = read_everything(backend, fs, root, name, len(batches))
                except CorruptShardError as e:
                    assert name in str(e)
                    raised += 1
                else:
                    assert same(header, got, HEADER, batches), f"silently wrong bytes after flipping {f}@{pos}"
                flip(fs, f, pos)  # restore
        assert tried and raised  # most of a shard is data; some flips must be caught
        header, got = read_everything(backend, fs, root, name, len(batches))
        assert same(header, got, HEADER, batches)


    def test_every_byte_of_a_small_shard(self, backend, local):
        """Flip every byte of the data files of a small shard (a sample of Zarr's JSON metadata): never silent.

        Catches what a sample misses, e.g. an Arrow offset that is not validated on read and crashes the process.
        """
        fs, root = local
        rng = np.random.default_rng(14)
        batches = [{s: random_bytes(rng, 12) for s in STREAMS} for _ in range(3)]
        header = {"id_order": np.arange(16, dtype=np.uint8), "nothing": np.zeros(0, np.uint8)}
        name, batches, _ = write_shard(backend, fs, root, batches=batches, header=header)
        raised = 0
        for f in self.shard_files(fs, join(root, name)):
            original = fs.cat_file(f)
            positions = range(len(original))
            if self.is_metadata(f):
                positions = rng.choice(len(original), 8, replace=False)
            for pos in positions:
                data = bytearray(original)
                data[pos] ^= 0x81
                fs.pipe_file(f, bytes(data))
                try:
                    got_header, got = read_everything(backend, fs, root, name, len(batches))
                except CorruptShardError:
                    raised += 1
                else:
                    assert same(got_header, got, header, batches), f"silently wrong bytes after flipping {f}@{pos}"
            fs.pipe_file(f, original)
        assert raised
        assert same(*read_everything(backend, fs, root, name, len(batches)), header, batches)


    def test_flipped_data_byte_raises(self, backend, fsroot):
        """Incompressible payload is stored verbatim (zstd raw blocks); a flip inside it must raise, on every fs."""
        fs, root = fsroot
        header = {"id_order": np.random.default_rng(13).integers(0, 256, 200, dtype=np.uint8)}
        name, batches, _ = write_shard(backend, fs, root, header=header)
        files = self.shard_files(fs, join(root, name))
        hits = 0
        needles = [batches[i]["ids"][100:132].tobytes() for i in (0, 5, len(batches) - 1)] + [
            header["id_order"][50:82].tobytes()
        ]
        for needle in needles:
            for f in files:
                pos = fs.cat_file(f).rfind(needle)  # Arrow: the footer copy of the schema is the one read
                if pos < 0:
                    continue
                hits += 1
                flip(fs, f, pos + 7)
                with pytest.raises(CorruptShardError, match=name):
                    read_everything(backend, fs, root, name, len(batches))
                flip(fs, f, pos + 7)
        assert hits >= len(needles)
        read_everything(backend, fs, root, name, len(batches))


    def test_truncated_file(self, backend, fsroot):
        fs, root = fsroot
        name, batches, _ = write_shard(backend, fs, root)
        target = max(self.shard_files(fs, join(root, name)), key=fs.size)  # the data file
        original = fs.cat_file(target)
        for keep in (0, 1, len(original) // 2, len(original) - 1):
            fs.pipe_file(target, original[:keep])
            with pytest.raises(CorruptShardError, match=name):
                read_everything(backend, fs, root, name, len(batches))
        fs.pipe_file(target, original)
        read_everything(backend, fs, root, name, len(batches))


    def test_truncated_any_file_is_never_silent(self, backend, local):
        fs, root = local
        name, batches, _ = write_shard(backend, fs, root)
        for f in self.shard_files(fs, join(root, name)):
            original = fs.cat_file(f)
            for keep in {0, len(original) // 3, len(original) - 1} - {len(original)}:
                fs.pipe_file(f, original[: max(keep, 0)])
                try:
                    header, got = read_everything(backend, fs, root, name, len(batches))
                except CorruptShardError:
                    pass
                else:
                    assert same(header, got, HEADER, batches), f"silently wrong bytes after truncating {f} to {keep}"
            fs.pipe_file(f, original)


    def test_deleted_file(self, backend, fsroot):
        """Zarr reads a missing chunk as its fill value; a shard that lost any data file must raise instead."""
        fs, root = fsroot
        batches = make_batches(11, 6)
        for batch in batches:  # a stream of nothing but fill-value bytes: only a strict store notices its loss
            batch["tiny"] = np.zeros_like(batch["tiny"])
        name, batches, _ = write_shard(backend, fs, root, batches=batches)
        path = join(root, name)
        for f in self.shard_files(fs, path):
            original = fs.cat_file(f)
            fs.rm(f)
            is_metadata = self.is_metadata(f)
            try:
                header, got = read_everything(backend, fs, root, name, len(batches))
            except CorruptShardError as e:
                assert name in str(e)
            else:
                assert is_metadata, f"deleting {f} went unnoticed"
                assert same(header, got, HEADER, batches), f"silently wrong bytes after deleting {f}"
            fs.pipe_file(f, original)
        read_everything(backend, fs, root, name, len(batches))
