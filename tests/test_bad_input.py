"""Bad input gets a clear exception that names the problem (never a silent write or a bare numpy error)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from softcache import CacheFormatError, CacheWriter, open_cache
from softcache.format.manifest import canonical_digest

BACKENDS = ["arrow", "zarr"]
V, K = 101, 5


@pytest.fixture
def writer(tmp_path):
    with CacheWriter(tmp_path / "c", vocab_size=V, k=K, temperatures=(1.0, 2.0)) as w:
        yield w


def logits(L, v=V, seed=0):
    return np.random.default_rng(seed).standard_normal((L, v)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# write_logits


def test_logits_with_wrong_vocab(writer):
    with pytest.raises(ValueError, match=f"{V - 2}.*{V}|vocab"):
        writer.write_logits(np.arange(4), logits(4, V - 2))


def test_input_ids_2d_without_batch_logits(writer):
    with pytest.raises(ValueError, match="input_ids|shape"):
        writer.write_logits(np.zeros((2, 4), np.int64), logits(4))


def test_mismatched_lengths(writer):
    with pytest.raises(ValueError, match="5.*4|4.*5|shape"):
        writer.write_logits(np.arange(5), logits(4))
    with pytest.raises(ValueError, match="attention_mask"):
        writer.write_logits(np.zeros((2, 4), np.int64), np.zeros((2, 4, V), np.float32), attention_mask=np.ones((2, 3)))


def test_float_input_ids(writer):
    with pytest.raises(TypeError, match="input_ids"):
        writer.write_logits(np.arange(4, dtype=np.float32), logits(4))
    with pytest.raises(TypeError, match="input_ids"):
        writer.write_logits(torch.arange(4.0), torch.from_numpy(logits(4)))


def test_integer_logits(writer):
    with pytest.raises(TypeError, match="floating"):
        writer.write_logits(np.arange(4), np.zeros((4, V), np.int64))


def test_negative_input_ids(writer):
    with pytest.raises(ValueError, match="input_ids"):
        writer.write_logits(np.array([1, -3, 2]), logits(3))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_and_inf_logits_name_sequence_and_position(writer, bad):
    writer.write_logits(np.arange(3), logits(3))
    z = logits(6)
    z[4, 17] = bad
    with pytest.raises(ValueError, match=r"sequence 1.*position 4"):
        writer.write_logits(np.arange(6), z)


def test_all_neg_inf_row(writer):
    z = logits(3)
    z[2] = -np.inf
    with pytest.raises(ValueError, match="position 2"):
        writer.write_logits(np.arange(3), z)


def test_bad_sequence_in_a_batch_names_it(writer):
    z = np.stack([logits(4, seed=1), logits(4, seed=2)])
    z[1, 2, 0] = np.nan
    with pytest.raises(ValueError, match=r"sequence 1.*position 2"):
        writer.write_logits(np.zeros((2, 4), np.int64), z)


def test_empty_sequence(writer):
    with pytest.raises(ValueError, match="empty"):
        writer.write_logits(np.zeros(0, np.int64), np.zeros((0, V), np.float32))
    with pytest.raises(ValueError, match="empty"):  # a batch row that the mask removes entirely
        writer.write_logits(
            np.zeros((2, 3), np.int64), logits(6).reshape(2, 3, V), attention_mask=np.array([[1, 1, 0], [0, 0, 0]])
        )
    with pytest.raises(ValueError, match="empty"):
        writer.write_targets(
            np.zeros(0, np.int64), np.zeros((0, K), np.int64), np.zeros((0, K)), lognorm=np.zeros((0, 2))
        )


def test_rejected_input_does_not_write(tmp_path):
    root = tmp_path / "c"
    with CacheWriter(root, vocab_size=V, k=K) as w:
        w.write_logits(np.arange(3), logits(3))
        z = logits(3)
        z[1, 1] = np.nan
        with pytest.raises(ValueError):
            w.write_logits(np.arange(3), z)
        w.write_logits(np.arange(2), logits(2))
    assert len(open_cache(root)) == 2


# ---------------------------------------------------------------------------------------------
# settings


@pytest.mark.parametrize("k", [0, -1, V + 1])
def test_k_out_of_range(tmp_path, k):
    with pytest.raises(ValueError, match="k"):
        CacheWriter(tmp_path / "c", vocab_size=V, k=k)
    assert not (tmp_path / "c").exists() or not os.listdir(tmp_path / "c")


def test_bad_vocab_and_temperatures(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        CacheWriter(tmp_path / "c", vocab_size=0, k=1)
    for temps in [(), (0.0,), (-1.0,), (1.0, 1.0), (float("nan"),)]:
        with pytest.raises(ValueError, match="temperatures"):
            CacheWriter(tmp_path / "c", vocab_size=V, k=K, temperatures=temps)


def test_sampled_settings(tmp_path):
    with pytest.raises(ValueError, match="samples"):
        CacheWriter(tmp_path / "c", vocab_size=V, k=K, targets="sampled", temperatures=(1.0,))
    with pytest.raises(ValueError, match="k=5 < samples=50"):
        CacheWriter(tmp_path / "c", vocab_size=V, k=K, targets="sampled", samples=50, temperatures=(1.0,))
    with pytest.raises(ValueError, match="one temperature"):
        CacheWriter(tmp_path / "c", vocab_size=V, k=60, targets="sampled", samples=50, temperatures=(1.0, 2.0))
    with pytest.raises(ValueError, match="samples"):
        CacheWriter(tmp_path / "c", vocab_size=V, k=K, targets="topk", samples=50)
    with pytest.raises(ValueError, match="targets"):
        CacheWriter(tmp_path / "c", vocab_size=V, k=K, targets="soft")


def test_unknown_backend(tmp_path):
    with pytest.raises(ValueError, match="parquet"):
        CacheWriter(tmp_path / "c", vocab_size=V, k=K, backend="parquet")


def test_writer_refuses_non_cache_directory(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("mine")
    with pytest.raises(CacheFormatError, match="not empty"):
        CacheWriter(tmp_path / "d", vocab_size=V, k=K)
    assert os.listdir(tmp_path / "d") == ["notes.txt"]


# ---------------------------------------------------------------------------------------------
# write_targets


def test_write_targets_ids_out_of_range(writer):
    lp = np.log(np.full((2, 3), 0.1))
    for bad in (V, V + 7, -2):
        ids = np.array([[1, 2, 3], [4, bad, 6]])
        with pytest.raises(ValueError, match="target_ids"):
            writer.write_targets(np.arange(2), ids, lp, lognorm=np.zeros((2, 2)))


def test_write_targets_shapes(writer):
    ids = np.array([[1, 2, 3], [4, 5, 6]])
    lp = np.log(np.full((2, 3), 0.1))
    with pytest.raises(ValueError, match="target_ids"):
        writer.write_targets(np.arange(3), ids, lp, lognorm=np.zeros((3, 2)))  # L mismatch
    with pytest.raises(ValueError, match="target_ids"):
        writer.write_targets(
            np.arange(2), np.zeros((2, K + 1), np.int64), np.zeros((2, K + 1)), lognorm=np.zeros((2, 2))
        )  # k' > k
    with pytest.raises(ValueError, match="target_logprobs"):
        writer.write_targets(np.arange(2), ids, lp[:, :2], lognorm=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="lognorm"):
        writer.write_targets(np.arange(2), ids, lp)  # two temperatures need lognorm
    with pytest.raises(ValueError, match="lognorm"):
        writer.write_targets(np.arange(2), ids, lp, lognorm=np.zeros((2, 1)))
    with pytest.raises(ValueError, match="lognorm"):
        writer.write_targets(np.arange(2), ids, lp, lognorm=np.array([[0.0, np.nan], [0.0, 0.1]]))
    with pytest.raises(TypeError, match="target_ids"):
        writer.write_targets(np.arange(2), ids.astype(float), lp, lognorm=np.zeros((2, 2)))


def test_write_targets_bad_logprobs(writer):
    ids = np.array([[1, 2, 3]])
    with pytest.raises(ValueError, match="target_logprobs"):
        writer.write_targets(np.arange(1), ids, np.array([[-0.1, np.nan, -3.0]]), lognorm=np.zeros((1, 2)))
    with pytest.raises(ValueError, match="target_logprobs"):
        writer.write_targets(np.arange(1), ids, np.array([[0.5, -1.0, -3.0]]), lognorm=np.zeros((1, 2)))


def test_write_targets_sampled_bad_counts(tmp_path):
    """Counts are checked when the sequence is given, not at a later flush (where the error loses other data)."""
    root = tmp_path / "s"
    w = CacheWriter(root, vocab_size=V, k=12, targets="sampled", samples=10, temperatures=(1.0,))
    try:
        w.write_targets(np.arange(2), np.array([[7, 8], [9, -1]]), counts=np.array([[4, 6], [10, 0]]))
        ids = np.array([[1, 2, -1]])
        with pytest.raises(ValueError, match="counts"):
            w.write_targets(np.arange(1), ids)  # counts missing
        with pytest.raises(ValueError, match="counts"):
            w.write_targets(np.arange(1), ids, counts=np.array([[1, 2]]))
        for bad in ([[0, 3, 0]], [[11, 1, 0]], [[6, 5, 0]]):  # a drawn id with count 0; > samples; sum > samples
            with pytest.raises(ValueError, match="counts|samples"):
                w.write_targets(np.arange(1), ids, counts=np.array(bad))
        with pytest.raises(TypeError, match="counts"):
            w.write_targets(np.arange(1), ids, counts=np.array([[1.5, 2.0, 0.0]]))
        w.close()  # the valid sequence is kept
    finally:
        w.abort()
    assert len(open_cache(root)) == 1


def test_write_targets_duplicate_ids(tmp_path):
    with CacheWriter(tmp_path / "s", vocab_size=V, k=12, targets="sampled", samples=10, temperatures=(1.0,)) as w:
        with pytest.raises(ValueError, match="unique|duplicate"):
            w.write_targets(np.arange(1), np.array([[4, 4, -1]]), counts=np.array([[2, 3, 0]]))
    with CacheWriter(tmp_path / "t", vocab_size=V, k=K) as w:
        with pytest.raises(ValueError, match="unique|duplicate"):
            w.write_targets(np.arange(1), np.array([[4, 4, -1]]), np.log([[0.2, 0.3, 1.0]]))


def test_temperature_not_captured(tmp_path):
    root = tmp_path / "c"
    with CacheWriter(root, vocab_size=V, k=K, temperatures=(1.0, 2.0)) as w:
        w.write_logits(np.arange(3), logits(3))
    cache = open_cache(root)
    for t in (0.5, 1.5, 4.0):
        with pytest.raises(ValueError, match=rf"{t}.*not captured.*\[1\.0, 2\.0\]"):
            cache.targets(0, temperature=t)


def test_writing_after_close(tmp_path):
    w = CacheWriter(tmp_path / "c", vocab_size=V, k=K)
    w.close()
    with pytest.raises(RuntimeError, match="closed"):
        w.write_logits(np.arange(3), logits(3))


# ---------------------------------------------------------------------------------------------
# paths that are not caches, damaged manifests


def test_open_cache_on_non_caches(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CacheFormatError, match="softcache.json|not a softcache"):
        open_cache(tmp_path / "empty")
    with pytest.raises(CacheFormatError, match="does not exist|not found"):
        open_cache(tmp_path / "nowhere")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "data.bin").write_bytes(os.urandom(64))
    with pytest.raises(CacheFormatError, match="softcache.json|not a softcache"):
        open_cache(tmp_path / "other")
    with pytest.raises(CacheFormatError):
        open_cache(tmp_path / "other" / "data.bin")
    with pytest.raises(CacheFormatError):
        open_cache("memory://softcache-test-there-is-nothing-here")


@pytest.fixture(params=BACKENDS)
def cache_root(tmp_path, request):
    root = tmp_path / "c"
    with CacheWriter(root, vocab_size=V, k=K, backend=request.param) as w:
        w.write_logits(np.arange(3), logits(3))
    return root


def _edit_manifest(root, **changes):
    """Edit the manifest and re-sign it (its checksum matches the edit): the field checks must still refuse it."""
    path = root / "softcache.json"
    manifest = json.loads(path.read_text())
    for key, value in changes.items():
        if key == "file":
            manifest["shards"][0]["file"] = value
        else:
            manifest[key] = value
    manifest["manifest_sha256"] = canonical_digest(manifest)
    path.write_text(json.dumps(manifest))


def test_newer_format_version(cache_root):
    _edit_manifest(cache_root, format_version=99)
    with pytest.raises(CacheFormatError, match="99.*newer|newer.*99"):
        open_cache(cache_root)
    with pytest.raises(CacheFormatError, match="newer"):
        CacheWriter(cache_root, vocab_size=V, k=K)


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/b", "..", ".", "", "a\\b", "../../etc/passwd"])
def test_manifest_shard_names_must_be_plain(cache_root, name):
    _edit_manifest(cache_root, file=name)
    with pytest.raises(CacheFormatError, match="shard file name"):
        open_cache(cache_root)[0]
    with pytest.raises(CacheFormatError, match="shard file name"):
        CacheWriter(cache_root, vocab_size=V, k=K)


def test_manifest_not_json(cache_root):
    (cache_root / "softcache.json").write_text("{not json")
    with pytest.raises(CacheFormatError, match="JSON"):
        open_cache(cache_root)
    (cache_root / "softcache.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(CacheFormatError, match="JSON"):
        open_cache(cache_root)
    (cache_root / "softcache.json").write_text("[1, 2]")
    with pytest.raises(CacheFormatError, match="object"):
        open_cache(cache_root)


def test_manifest_missing_fields(cache_root):
    path = cache_root / "softcache.json"
    manifest = json.loads(path.read_text())
    del manifest["shards"]
    path.write_text(json.dumps(manifest))
    with pytest.raises(CacheFormatError, match="shards"):
        open_cache(cache_root)
