"""CacheWriter's loss mask: stored bit-packed beside the targets of any kind and backend, converted and verified."""

from __future__ import annotations

import numpy as np
import pytest

import softcache
from softcache.ops import convert, verify


def test_writer_loss_mask_round_trip_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    mask = rng.random(13) < 0.5
    with softcache.CacheWriter(tmp_path / "c", vocab_size=40, k=3, loss_mask=True, backend="zarr") as w:
        w.write_logits(np.arange(13), rng.normal(size=(13, 40)).astype(np.float32), loss_mask=mask)
        with pytest.raises(ValueError, match=r"loss_mask must have the shape of input_ids \(13,\)"):
            w.write_logits(np.arange(13), rng.normal(size=(13, 40)).astype(np.float32), loss_mask=mask[:5])
        w.write_logits(np.arange(4), rng.normal(size=(4, 40)).astype(np.float32))  # no mask given: all trained
    cache = softcache.open_cache(tmp_path / "c")
    np.testing.assert_array_equal(cache[0]["loss_mask"], mask)
    assert cache[1]["loss_mask"].all() and verify(str(tmp_path / "c")).ok
    converted = convert(str(tmp_path / "c"), str(tmp_path / "a"), "arrow")
    np.testing.assert_array_equal(converted[0]["loss_mask"], mask)
    with softcache.CacheWriter(tmp_path / "plain", vocab_size=40, k=3) as w:
        with pytest.raises(ValueError, match="create the writer with loss_mask=True"):
            w.write_logits(np.arange(3), np.zeros((3, 40), np.float32), loss_mask=np.ones(3, bool))
