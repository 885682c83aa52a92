"""softcache.to_hf_dataset: a datasets.Dataset whose items equal SoftTargetDataset's, through map/filter/shuffle."""

from __future__ import annotations

import pickle

import datasets
import numpy as np
import pytest
from torch.utils.data import DataLoader

import softcache
from softcache import SoftTargetDataset, to_hf_dataset

KEYS = ("input_ids", "attention_mask", "labels", "target_ids", "target_logprobs")


@pytest.fixture(scope="module")
def cache(tmp_path_factory, make_cache):
    return make_cache(str(tmp_path_factory.mktemp("hf") / "c"), seed=7, n=19)[0]


def same(row, item) -> bool:
    return all(np.asarray(row[k]).dtype == item[k].dtype and np.array_equal(row[k], item[k]) for k in KEYS)


def test_items_match_the_dataset(cache):
    hf = to_hf_dataset(cache, temperature=0.5, max_length=12)
    ref = SoftTargetDataset(cache, temperature=0.5, max_length=12)
    assert isinstance(hf, datasets.Dataset) and len(hf) == len(ref) and hf.column_names == ["index"]
    for i in range(len(hf)):
        assert same(hf[i], ref[i])
    rows = hf[3:7]
    for n, i in enumerate(range(3, 7)):
        assert same({k: rows[k][n] for k in KEYS}, ref[i])
    with pytest.raises(ValueError, match="not captured"):
        to_hf_dataset(cache, temperature=3.0)
    retempered = to_hf_dataset(cache, temperature=3.0, retemper=True)
    assert same(retempered[5], SoftTargetDataset(cache, temperature=3.0, retemper=True)[5])


def test_map_filter_shuffle_select_split(cache):
    hf = to_hf_dataset(cache, temperature=2.0)
    ref = SoftTargetDataset(cache, temperature=2.0)
    mapped = hf.map(lambda ex: {"n": len(ex["input_ids"]), "top": int(ex["target_ids"][0, 0])})
    for i in range(len(hf)):
        assert mapped[i]["n"] == len(ref[i]["input_ids"]) and mapped[i]["top"] == ref[i]["target_ids"][0, 0]
        assert same(mapped[i], ref[i])
    kept = hf.filter(lambda ex: len(ex["input_ids"]) > 10)
    expect = [i for i in range(len(ref)) if len(ref[i]["input_ids"]) > 10]
    assert 0 < len(kept) < len(hf) and [r["index"] for r in kept] == expect
    for view in (hf.shuffle(seed=1), hf.select([4, 0, 4]), *hf.train_test_split(test_size=5, seed=0).values()):
        assert len({r["index"] for r in view}) > 1
        for row in view:
            assert same(row, ref[row["index"]])


def test_multiprocess_map_and_pickling(cache):
    hf = to_hf_dataset(cache, temperature=1.0)
    ref = SoftTargetDataset(cache)
    mapped = hf.map(lambda ex: {"n": len(ex["input_ids"])}, num_proc=2)
    assert mapped["n"] == [len(ref[i]["input_ids"]) for i in range(len(ref))]
    clone = pickle.loads(pickle.dumps(hf))
    assert same(clone[8], ref[8])


def test_dataloader_and_removed_index(cache):
    hf = to_hf_dataset(cache)
    ref = SoftTargetDataset(cache)
    batch = next(iter(DataLoader(hf, batch_size=5, collate_fn=softcache.collate)))
    expect = softcache.collate([ref[i] for i in range(5)])
    assert all(np.array_equal(batch[k].numpy(), expect[k].numpy()) for k in expect)
    with pytest.raises(KeyError, match="remove_unused_columns=False"):
        hf.map(lambda ex: {"n": 1}).remove_columns("index")[0]
