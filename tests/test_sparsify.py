"""One logits → targets implementation: ``softcache build`` and ``CacheWriter.write_logits`` store the same targets.

The demo build runs with its teacher's logits recorded per sequence as the build computed them; the same logits are
then written through ``CacheWriter.write_logits`` with the same settings and seed, and every decoded record must be
identical, for top-k (with normalisers) and for sampled targets. The sampled draws must also not depend on the
chunk size (so neither on batching), and broken logits are refused the same way by both paths.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import softcache
from softcache.build import build_demo
from softcache.build.teacher import TeacherHead
from softcache.kinds import get_kind
from softcache.sparsify import Sparsifier

SETTINGS = {
    "topk": dict(k=16, targets="topk", temperatures=(1.0, 2.0, 4.0)),
    "sampled": dict(k=24, targets="sampled", samples=24, temperatures=(1.5,)),
}


def record_logits(monkeypatch) -> dict[int, torch.Tensor]:
    """Make every build in this test record the fp32 logits of each sequence it computes, by sequence index."""
    captured: dict[int, torch.Tensor] = {}
    batch_targets, logits = TeacherHead.batch_targets, TeacherHead.logits

    def recording_logits(self, h):
        z = logits(self, h)
        if getattr(self, "recorded", None) is not None:  # not the build's check against the full forward
            self.recorded.append(z.clone())
        return z

    def recording_batch_targets(self, input_ids, lengths, seq_index):
        self.recorded = []
        out = batch_targets(self, input_ids, lengths, seq_index)
        rows, self.recorded = torch.cat(self.recorded), None
        for index, end, length in zip(seq_index, np.cumsum(lengths), lengths, strict=True):
            captured[index] = rows[end - length : end]
        return out

    monkeypatch.setattr(TeacherHead, "logits", recording_logits)
    monkeypatch.setattr(TeacherHead, "batch_targets", recording_batch_targets)
    return captured


@pytest.mark.parametrize("kind", ["topk", "sampled"])
def test_build_and_write_logits_store_identical_targets(kind, tmp_path, monkeypatch):
    captured = record_logits(monkeypatch)
    built = build_demo(str(tmp_path / "built"), quiet=True, limit=4, max_length=96, seed=11, **SETTINGS[kind])
    cache = softcache.open_cache(built.out)
    assert len(cache) == len(captured) == 4
    with softcache.CacheWriter(tmp_path / "written", vocab_size=cache.vocab_size, seed=11, **SETTINGS[kind]) as w:
        for i in range(len(cache)):
            w.write_logits(cache[i]["input_ids"], captured[i])
    written = softcache.open_cache(tmp_path / "written")
    assert len(written) == len(cache)
    for i in range(len(cache)):
        a, b = cache[i], written[i]
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"sequence {i}, {key}")
    if kind == "sampled":  # a real check: the draws are not all the same few ids
        assert len(np.unique(cache[0]["target_ids"])) > 10


def test_sampled_draws_do_not_depend_on_chunking_or_the_logits_dtype_path():
    z = torch.randn(37, 301, dtype=torch.float64).float() * 3
    sparsifier = Sparsifier(get_kind("sampled"), k=50, temperatures=(0.7,), samples=50, seed=5)
    one = sparsifier.sequence(z, index=9, chunk_elements=301)  # one row per chunk
    whole = sparsifier.sequence(z.numpy(), index=9)  # numpy input, one chunk
    for x, y in zip(one, whole, strict=True):
        if x is not None:
            np.testing.assert_array_equal(x, y)
    other = sparsifier.sequence(z, index=10)
    assert not np.array_equal(one[0], other[0])  # another sequence index draws other samples


def test_sampled_draws_follow_the_teacher_distribution():
    """Inverse-CDF draws at τ reproduce softmax(z/τ): counts over many positions match the probabilities."""
    rows, v, tau, n = 4000, 7, 1.7, 8
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0, float("-inf")]).repeat(rows, 1)
    sparsifier = Sparsifier(get_kind("sampled"), k=v, temperatures=(tau,), samples=n, seed=1)
    ids, counts, lognorm, broken = sparsifier.sequence(logits, index=0)
    assert lognorm is None and not broken.any()
    tally = np.zeros(v)
    np.add.at(tally, ids[ids >= 0], counts[ids >= 0])
    expected = torch.softmax(logits[0].double() / tau, -1).numpy()
    assert tally[-1] == 0 and tally.sum() == rows * n
    np.testing.assert_allclose(tally / tally.sum(), expected, atol=4 * np.sqrt(expected.max() / (rows * n)))


def test_topk_matches_a_float64_reference():
    z = torch.randn(13, 97, dtype=torch.float64) * 4
    z[3, 5:] = float("-inf")  # only 5 finite logits: the rest of its top-k is padding
    sparsifier = Sparsifier(get_kind("topk"), k=9, temperatures=(1.0, 0.5, 3.0))
    ids, lp, lognorm, broken = sparsifier.sequence(z.float(), index=0)
    ref_lp = torch.log_softmax(z, -1)
    order = torch.argsort(z, -1, descending=True)[:, :9]
    finite = torch.isfinite(torch.gather(z, 1, order))
    np.testing.assert_array_equal(ids, torch.where(finite, order, -1).numpy())
    np.testing.assert_allclose(lp, torch.where(finite, torch.gather(ref_lp, 1, order), 0).numpy(), atol=1e-5)
    lse = torch.logsumexp(z, -1)
    ref_n = torch.stack([torch.logsumexp(z / t, -1) - lse / t for t in (1.0, 0.5, 3.0)], -1)
    np.testing.assert_allclose(lognorm, ref_n.numpy(), atol=2e-5)
    assert lognorm[:, 0].tolist() == [0.0] * 13 and not broken.any()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_broken_logits_are_refused_naming_the_position(bad, tmp_path):
    z = torch.randn(6, 40)
    z[4, 7] = bad
    with softcache.CacheWriter(tmp_path / "c", vocab_size=40, k=4) as w:
        with pytest.raises(ValueError, match="sequence 0, position 4: teacher logits are NaN"):
            w.write_logits(torch.arange(6), z)
    _, _, _, broken = Sparsifier(get_kind("topk"), k=4, temperatures=(1.0,)).sequence(z, index=0)
    assert broken.tolist() == [False, False, False, False, True, False]
