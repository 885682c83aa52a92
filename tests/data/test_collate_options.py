"""``softcache.collate`` takes the Collator's options: ``collate(pack_length=N)`` is a packing collate function, and
``collate(items, pack_length=N)`` packs those items."""

import numpy as np

import softcache
from softcache.data import Collator


def _items(lengths, k=3):
    rng = np.random.default_rng(0)
    return [{"input_ids": rng.integers(0, 50, n), "target_ids": rng.integers(0, 50, (n, k)).astype(np.int32),
             "target_logprobs": -rng.random((n, k)).astype(np.float32)} for n in lengths]  # fmt: skip


def test_collate_takes_the_collator_options():
    items = _items([3, 4, 6])
    packing = softcache.collate(pack_length=8)
    assert isinstance(packing, Collator) and packing.pack_length == 8
    expected = Collator(pack_length=8)(items)
    for got in (packing(items), softcache.collate(items, pack_length=8)):
        assert got.keys() == expected.keys()
        for key in got:
            assert np.array_equal(got[key].numpy(), expected[key].numpy()), key
    assert softcache.collate(items, pad_to_multiple_of=8)["input_ids"].shape == (3, 8)
    assert softcache.collate(items)["input_ids"].shape == (3, 6)  # the default collate is unchanged
