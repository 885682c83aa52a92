"""``softcache.to_hf_dataset(cache, decoded=True)`` stores the decoded items as columns, so ``save_to_disk`` works and
``load_from_disk`` gives them back without softcache; the default view (decoded on access) keeps only the index."""

import datasets
import numpy as np
import pytest

import softcache


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("hf") / "cache")
    rng = np.random.default_rng(0)
    with softcache.CacheWriter(path, vocab_size=61, k=4, temperatures=(1.0, 2.0)) as w:
        for n in (7, 3, 12, 5):
            w.write_logits(rng.integers(0, 61, n), (rng.standard_normal((n, 61)) * 2).astype(np.float32))
    return path


def test_decoded_dataset_saves_and_loads(cache, tmp_path):
    expected = softcache.SoftTargetDataset(cache, temperature=2.0, max_length=10)
    ds = softcache.to_hf_dataset(cache, temperature=2.0, max_length=10, decoded=True)
    ds.save_to_disk(str(tmp_path / "saved"))
    back = datasets.load_from_disk(str(tmp_path / "saved"))
    assert back.features["target_ids"].feature.feature.dtype == "int32"
    assert back.features["target_logprobs"].feature.feature.dtype == "float32"
    assert len(back) == len(expected)
    for i in range(len(back)):
        for key, value in expected[i].items():
            np.testing.assert_array_equal(np.asarray(back[i][key], value.dtype), value, err_msg=f"sequence {i}, {key}")
    batch = softcache.collate([datasets.load_from_disk(str(tmp_path / "saved"))[i] for i in range(len(back))])
    np.testing.assert_array_equal(batch["target_ids"].numpy(), softcache.collate(list(expected))["target_ids"].numpy())
