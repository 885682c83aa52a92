"""The datasets refuse a cache whose build was interrupted (the manifest's build_state says complete: false) unless
``allow_incomplete=True``: training on a partial cache without a word is the silent failure this prevents."""

import numpy as np
import pytest

import softcache
from softcache.format.manifest import BuildState


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("interrupted") / "cache")
    rng = np.random.default_rng(0)
    with softcache.CacheWriter(path, vocab_size=40, k=3, temperatures=(1.0,)) as w:
        for n in (6, 4):
            w.write_logits(rng.integers(0, 40, n), rng.standard_normal((n, 40)).astype(np.float32))
        w.manifest.build_state = BuildState(complete=False)
        w.save_manifest()
    return path


@pytest.mark.parametrize("make", [softcache.SoftTargetDataset, softcache.StreamingSoftTargetDataset,
                                  softcache.to_hf_dataset])  # fmt: skip
def test_datasets_refuse_an_interrupted_build(interrupted, make):
    with pytest.raises(ValueError, match="interrupted.*Rerun the same softcache build command.*allow_incomplete=True"):
        make(interrupted)
    ds = make(interrupted, allow_incomplete=True)
    assert len(list(iter(ds))) == 2
