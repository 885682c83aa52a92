"""Shared by the data-layer tests: ``make_cache``, a cache of random sequences to read back through the datasets."""

from __future__ import annotations

import numpy as np
import pytest

from softcache import CacheWriter, open_cache


def make_cache(root, seed=0, n=23, backend="arrow", targets="topk", max_len=30, metadata=None, *, vocab=101, k=7,
               temperatures=(1.0, 2.0, 0.5), samples=9):  # fmt: skip
    """A cache of ``n`` random sequences in several shards and batches → (cache, input ids, float32 logits).

    topk keeps ``k`` ids captured at ``temperatures``; sampled draws ``samples`` ids at T = 2."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_len, size=n)
    ids = [rng.integers(0, vocab, size=int(L)) for L in lengths]
    logits = [(rng.standard_normal((int(L), vocab)) * 3).astype(np.float32) for L in lengths]
    opts = {"temperatures": temperatures} if targets == "topk" else {"temperatures": (2.0,), "samples": samples}
    with CacheWriter(
        root,
        vocab_size=vocab,
        k=k if targets == "topk" else samples,
        targets=targets,
        backend=backend,
        batch_tokens=50,
        shard_tokens=160,
        metadata=metadata,
        **opts,
    ) as w:
        for i, z in zip(ids, logits, strict=True):
            w.write_logits(i, z)
    return open_cache(root), ids, logits


@pytest.fixture(name="make_cache", scope="session")
def fixture_make_cache():
    return make_cache
