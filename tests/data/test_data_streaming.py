"""StreamingSoftTargetDataset: items, rank × worker sharding, epochs, even split, exact resumption."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from torch.utils.data import DataLoader

import softcache
from softcache import SoftTargetDataset, StreamingSoftTargetDataset


@pytest.fixture(scope="module")
def cache(tmp_path_factory, make_cache):
    """About 40 batches in several shards."""
    return make_cache(str(tmp_path_factory.mktemp("stream") / "c"), seed=3, n=90, max_len=40)[0]


def ident(item) -> bytes:
    return np.asarray(item["input_ids"]).tobytes() + np.asarray(item["target_ids"]).tobytes()


def index_of(cache) -> dict[bytes, int]:
    table = {ident(cache[i]): i for i in range(len(cache))}
    assert len(table) == len(cache)
    return table


def read(ds, num_workers=0, epoch=0) -> list[int]:
    """Cache indices of the sequences ``ds`` yields through a DataLoader, in order."""
    ds.set_epoch(epoch)
    table = index_of(ds.cache)
    loader = DataLoader(ds, batch_size=None, num_workers=num_workers)
    return [table[ident(item)] for item in loader]


@pytest.mark.parametrize("backend", ["arrow", "zarr"])
def test_unshuffled_stream_equals_the_map_style_items(make_cache, tmp_path, backend):
    cache = make_cache(str(tmp_path / "c"), seed=4, n=17, backend=backend)[0]
    stream = StreamingSoftTargetDataset(cache.url, temperature=0.5, max_length=9, shuffle=False)
    assert (stream.vocab_size, stream.k, stream.temperature) == (cache.vocab_size, cache.k, 0.5)
    ds = SoftTargetDataset(cache, temperature=0.5, max_length=9)
    got = list(stream)
    assert len(got) == len(ds)
    for i, item in enumerate(got):
        ref = ds[i]
        assert item.keys() == ref.keys() and all(np.array_equal(item[k], ref[k]) for k in ref)
        assert all(item[k].dtype == ref[k].dtype for k in ref)


def test_two_ranks_two_workers_each_sequence_once_per_epoch(cache):
    orders = {}
    for epoch in (0, 1):
        per_rank = [read(StreamingSoftTargetDataset(cache, rank=r, world_size=2, shuffle_buffer=8, seed=5), 2, epoch)
                    for r in range(2)]  # fmt: skip
        assert all(per_rank) and sorted(per_rank[0] + per_rank[1]) == list(range(len(cache)))
        orders[epoch] = per_rank
    assert orders[0] != orders[1] and set(orders[0][0]) != set(orders[1][0])  # units move between ranks too
    again = read(StreamingSoftTargetDataset(cache, rank=0, world_size=2, shuffle_buffer=8, seed=5), 2, 1)
    assert again == orders[1][0]
    other_seed = read(StreamingSoftTargetDataset(cache, rank=0, world_size=2, shuffle_buffer=8, seed=6), 2, 1)
    assert other_seed != orders[1][0]


def test_rank_from_the_environment(cache, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert read(StreamingSoftTargetDataset(cache, seed=2)) == read(
        StreamingSoftTargetDataset(cache, seed=2, rank=1, world_size=3)
    )
    for bad in ({"rank": 1}, {"world_size": 2}):
        with pytest.raises(ValueError, match="rank and world_size"):
            StreamingSoftTargetDataset(cache, **bad)
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        list(StreamingSoftTargetDataset(cache, rank=2, world_size=2))


def test_unshuffled_single_reader_keeps_stored_order(cache):
    assert read(StreamingSoftTargetDataset(cache, shuffle=False), num_workers=0) == list(range(len(cache)))


def test_even_gives_every_rank_the_same_batches(cache):
    world, workers, batch = 3, 2, 4
    seen, steps = [], []
    for r in range(world):
        ds = StreamingSoftTargetDataset(cache, rank=r, world_size=world, even=True, shuffle_buffer=5, seed=1)
        ds.set_epoch(3)
        loader = DataLoader(ds, batch_size=batch, num_workers=workers, collate_fn=softcache.collate)
        table = index_of(cache)
        batches = list(loader)
        steps.append(len(batches))
        for b in batches:
            for row in range(b["input_ids"].shape[0]):
                L = int(b["attention_mask"][row].sum())
                item = {"input_ids": b["input_ids"][row, :L].numpy(), "target_ids": b["target_ids"][row, :L].numpy()}
                seen.append(table[ident(item)])
    assert len(set(steps)) == 1, steps
    assert len(seen) == len(set(seen)) and len(seen) > 0.8 * len(cache)
    # the surplus a plain (uneven) split leaves on some ranks is what was dropped
    plain = [len(read(StreamingSoftTargetDataset(cache, rank=r, world_size=world, seed=1), 0, 3)) for r in range(world)]
    assert sum(plain) == len(cache)


def test_even_refuses_readers_without_batches(make_cache, tmp_path):
    small = make_cache(str(tmp_path / "c"), n=2, max_len=5)[0]
    with pytest.raises(ValueError, match="too few for 2 ranks"):
        list(StreamingSoftTargetDataset(small, rank=0, world_size=2, even=True))


@pytest.mark.parametrize("shuffle_buffer", [0, 6, 1024])
def test_resume_continues_with_the_same_remaining_order(cache, shuffle_buffer):
    def make():
        ds = StreamingSoftTargetDataset(cache, shuffle_buffer=shuffle_buffer, seed=11, rank=1, world_size=2)
        ds.set_epoch(2)
        return ds

    table = index_of(cache)
    full = [table[ident(x)] for x in make()]
    for stop in (0, 1, 5, len(full) // 2, len(full) - 1, len(full)):
        ds = make()
        it = iter(ds)
        head = [table[ident(next(it))] for _ in range(stop)]
        state = json.loads(json.dumps(ds.state_dict()))  # plain values only
        assert len(json.dumps(state)) < 400 + 16 * min(shuffle_buffer, len(full))
        resumed = make()
        resumed.set_epoch(0)  # the loaded state's epoch wins
        resumed.load_state_dict(state)
        tail = [table[ident(x)] for x in resumed]
        assert head + tail == full, stop
        assert [table[ident(x)] for x in resumed] == full  # the state is used once; then a whole epoch-2 pass


def test_set_epoch_drops_a_state_of_another_epoch(cache):
    ds = StreamingSoftTargetDataset(cache, seed=3)
    it = iter(ds)
    next(it)
    state = ds.state_dict()
    fresh = StreamingSoftTargetDataset(cache, seed=3)
    fresh.load_state_dict(state)
    fresh.set_epoch(1)
    assert read(fresh, epoch=1) == read(StreamingSoftTargetDataset(cache, seed=3), epoch=1)


def test_resume_with_other_readers_is_an_error(cache):
    ds = StreamingSoftTargetDataset(cache, rank=0, world_size=2)
    next(iter(ds))
    other = StreamingSoftTargetDataset(cache, rank=1, world_size=2)
    other.load_state_dict(ds.state_dict())
    with pytest.raises(ValueError, match="same ranks and DataLoader workers"):
        iter(other)
    with pytest.raises(ValueError, match="missing"):
        other.load_state_dict({"epoch": 0})


@pytest.mark.parametrize("num_workers", [0, 2])
def test_stateful_dataloader_resumes_mid_epoch(cache, num_workers):
    StatefulDataLoader = pytest.importorskip("torchdata.stateful_dataloader").StatefulDataLoader
    table = index_of(cache)

    def loader():
        ds = StreamingSoftTargetDataset(cache, shuffle_buffer=7, seed=9, rank=0, world_size=2)
        ds.set_epoch(4)
        return StatefulDataLoader(ds, batch_size=3, num_workers=num_workers, collate_fn=softcache.collate)

    def rows(batch):
        out = []
        for r in range(batch["input_ids"].shape[0]):
            L = int(batch["attention_mask"][r].sum())
            out.append(table[ident({k: batch[k][r, :L].numpy() for k in ("input_ids", "target_ids")})])
        return out

    full = [rows(b) for b in loader()]
    for stop in (1, len(full) // 2):
        first = loader()
        it = iter(first)
        head = [rows(next(it)) for _ in range(stop)]
        state = pickle.loads(pickle.dumps(first.state_dict()))
        del it
        second = loader()
        second.load_state_dict(state)
        assert head + [rows(b) for b in second] == full


def test_streams_a_sampled_cache_from_an_fsspec_url(make_cache):
    import uuid

    import fsspec

    url = f"memory://softcache-stream-{uuid.uuid4().hex}"
    try:
        cache = make_cache(url, seed=8, n=21, targets="sampled")[0]
        ds = SoftTargetDataset(url, temperature=2.0)
        stream = StreamingSoftTargetDataset(url, temperature=2.0, shuffle_buffer=4, seed=1)
        loader = DataLoader(stream, batch_size=None, num_workers=2)  # forked workers see the memory filesystem
        table = index_of(cache)
        got = [(table[ident(item)], item) for item in loader]
        assert sorted(i for i, _ in got) == list(range(len(ds)))
        for i, item in got:
            assert all(np.array_equal(item[k], ds[i][k]) for k in item)
    finally:
        fsspec.filesystem("memory").rm(url[len("memory://") :], recursive=True)
