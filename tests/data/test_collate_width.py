"""Batches are padded to the widest target row present in the batch, not to the cache's k: a sampled cache built with
``--samples 20`` (k 64 slots) gives batches at most 20 wide, and narrower when its rows are."""

import numpy as np
import pytest

import softcache
from softcache.data import Collator


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sampled") / "cache")
    rng = np.random.default_rng(0)
    with softcache.CacheWriter(path, vocab_size=300, k=64, targets="sampled", samples=20, temperatures=(1.0,)) as w:
        for n in (9, 14, 5, 11):
            w.write_logits(rng.integers(0, 300, n), (rng.standard_normal((n, 300)) * 4).astype(np.float32))
    return path


def _widest(items):
    return max(int((item["target_ids"] >= 0).sum(1).max()) for item in items)


def test_sampled_batches_are_as_wide_as_their_widest_row(sampled):
    ds = softcache.SoftTargetDataset(sampled)
    assert ds[0]["target_ids"].shape[1] == 64
    items = [ds[i] for i in range(len(ds))]
    batch = softcache.collate(items)
    width = _widest(items)
    assert width <= 20 and batch["target_ids"].shape[-1] == width == batch["target_logprobs"].shape[-1]
    for b, item in enumerate(items):  # nothing stored is lost
        n = len(item["input_ids"])
        np.testing.assert_array_equal(batch["target_ids"][b, :n].numpy(), item["target_ids"][:, :width])
        np.testing.assert_array_equal(batch["target_logprobs"][b, :n].numpy(), item["target_logprobs"][:, :width])
        assert (item["target_ids"][:, width:] == -1).all()
    one = softcache.collate(items[2:3])
    assert one["target_ids"].shape[-1] == _widest(items[2:3])


def test_any_items_and_packed_rows_are_trimmed_alike():
    rng = np.random.default_rng(1)
    items = [{"input_ids": rng.integers(0, 9, n), "target_ids": np.full((n, 6), -1, np.int32),
              "target_logprobs": np.zeros((n, 6), np.float32)} for n in (3, 4)]  # fmt: skip
    items[0]["target_ids"][:, :2] = 1
    items[1]["target_ids"][1, :4] = 2
    assert softcache.collate(items)["target_ids"].shape == (2, 4, 4)
    assert Collator(pack_length=8)(items)["target_ids"].shape == (1, 7, 4)
    items[1]["target_ids"][:] = -1
    items[0]["target_ids"][:] = -1  # no targets at all (every position outside a loss mask): one padding column
    assert softcache.collate(items)["target_ids"].shape == (2, 4, 1)
