"""Hidden states and attention maps in a cache: exact for bf16/fp16 (to the stored value), within absmax/254 for int8,
on both backends, through convert and verify; a damaged feature stream is an error naming the shard."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import softcache
from softcache.errors import CorruptShardError
from softcache.extras import Attentions, HiddenStates
from softcache.format import get_backend
from softcache.format.manifest import canonical_digest
from softcache.ops import convert, verify

V, K, H = 53, 4, 24


def to_bf16(x: np.ndarray) -> np.ndarray:
    """Round to bfloat16 with torch (an implementation independent of the codec's bit arithmetic)."""
    return torch.from_numpy(np.asarray(x, np.float32)).to(torch.bfloat16).float().numpy()


def write(path, dtype, backend, rng, lengths=(7, 12, 3, 9)):
    hidden = HiddenStates([0, 3], H, dtype)
    data = []
    with softcache.CacheWriter(path, vocab_size=V, k=K, backend=backend, batch_tokens=10, shard_tokens=15,
                               extras=[hidden, Attentions([1], 2)]) as w:  # fmt: skip
        for n in lengths:
            h = {0: rng.normal(size=(n, H)) * 3, 3: rng.normal(size=(n, H)) * 1e-3}
            h[3][0] = 0  # an all-zero row (int8 scale 0)
            a = rng.random((2, n, n))
            a /= a.sum(-1, keepdims=True)
            w.write_logits(rng.integers(0, V, n), rng.normal(size=(n, V)).astype(np.float32),
                           extras={"hidden_states": h, "attentions": {1: a}})  # fmt: skip
            data.append((h, a))
    return data


def check(cache, data, dtype):
    for i, (h, a) in enumerate(data):
        rec = cache[i]
        for layer, want in h.items():
            got = rec["teacher_hidden"][layer]
            if dtype == "bf16":
                np.testing.assert_array_equal(got, to_bf16(want))
            elif dtype == "fp16":
                np.testing.assert_array_equal(got, want.astype(np.float32).astype(np.float16).astype(np.float32))
            else:
                bound = np.abs(want).max(-1, keepdims=True) / 254 * (1 + 1e-6)
                assert (np.abs(got - want) <= bound + 1e-12).all()
        np.testing.assert_array_equal(rec["teacher_attentions"][1], to_bf16(a))


@pytest.mark.parametrize("backend", ["arrow", "zarr"])
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "int8"])
def test_features_round_trip(dtype, backend, tmp_path):
    rng = np.random.default_rng(["bf16", "fp16", "int8"].index(dtype) * 2 + (backend == "zarr"))
    data = write(tmp_path / "c", dtype, backend, rng)
    cache = softcache.open_cache(tmp_path / "c")
    assert len(cache.manifest.shards) > 1 and verify(str(tmp_path / "c")).ok
    check(cache, data, dtype)
    other = "zarr" if backend == "arrow" else "arrow"
    check(convert(str(tmp_path / "c"), str(tmp_path / "o"), other), data, dtype)


def test_truncated_items_keep_the_top_left_attention_block(tmp_path):
    rng = np.random.default_rng(0)
    data = write(tmp_path / "c", "bf16", "arrow", rng)
    item = softcache.SoftTargetDataset(tmp_path / "c", max_length=5)[1]
    np.testing.assert_array_equal(item["teacher_attentions"][1], to_bf16(data[1][1])[:, :5, :5])
    np.testing.assert_array_equal(item["teacher_hidden"][0], to_bf16(data[1][0][0])[:5])


def test_a_feature_stream_of_the_wrong_size_is_an_error(tmp_path):
    """Checksums consistent, but a hidden-state stream two bytes short: an error naming the shard, not a crash."""
    rng = np.random.default_rng(1)
    root = tmp_path / "c"
    write(root, "bf16", "arrow", rng)
    cache = softcache.open_cache(root)
    entry, header, batches = next(cache.encoded_shards())
    short = [(n, {k: (v[:-2] if k == "hidden_0" else v) for k, v in streams.items()}) for n, streams in batches]
    cache.close()
    (root / entry.file).unlink()
    writer = get_backend("arrow").create(cache.fs, cache.root, entry.file, header, list(short[0][1]))
    for n, streams in short:
        writer.write_batch(streams, n)
    size, digest = writer.commit()
    manifest = json.loads((root / "softcache.json").read_text())
    manifest["shards"][0].update(bytes=size, sha256=digest)
    manifest["manifest_sha256"] = canonical_digest(manifest)
    (root / "softcache.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptShardError, match="shard-00000.arrow: batch 0 does not decode"):
        softcache.open_cache(root)[0]


def test_writer_checks_the_features(tmp_path):
    with softcache.CacheWriter(tmp_path / "c", vocab_size=V, k=K, extras=[HiddenStates([2], H)]) as w:
        z = np.zeros((4, V), np.float32)
        with pytest.raises(ValueError, match="stores hidden_states: pass extras"):
            w.write_logits(np.arange(4), z)
        with pytest.raises(ValueError, match=r"hidden_states\[2\] must have shape \(4, 24\)"):
            w.write_logits(np.arange(4), z, extras={"hidden_states": {2: np.zeros((4, 5))}})
        with pytest.raises(ValueError, match="a dict of layers"):
            w.write_logits(np.arange(4), z, extras={"hidden_states": {1: np.zeros((4, H))}})
        with pytest.raises(ValueError, match="NaN"):
            w.write_logits(np.arange(4), z, extras={"hidden_states": {2: np.full((4, H), np.nan)}})
    with pytest.raises(ValueError, match="at most 512 tokens"):
        with softcache.CacheWriter(tmp_path / "d", vocab_size=V, k=K, extras=[Attentions([0], 1)]) as w:
            w.write_logits(np.zeros(600, int), np.zeros((600, V), np.float32),
                           extras={"attentions": {0: np.zeros((1, 600, 600))}})  # fmt: skip


def test_projection_matrix_is_seeded_and_orthonormal():
    a = HiddenStates.projection_matrix(3, 40, 8)
    np.testing.assert_array_equal(a, HiddenStates.projection_matrix(3, 40, 8))
    np.testing.assert_allclose(a.T @ a, np.eye(8), atol=1e-5)
    assert not np.array_equal(a, HiddenStates.projection_matrix(4, 40, 8))


@pytest.mark.parametrize("backend", ["arrow", "zarr"])
def test_flipped_bytes_never_give_other_features(backend, tmp_path):
    """Flip bytes anywhere in a feature cache's shards: every read is the original record or a CorruptShardError."""
    rng = np.random.default_rng(7)
    root = tmp_path / "c"
    write(root, "int8", backend, rng)
    reference = softcache.open_cache(root)
    original = [reference[i] for i in range(len(reference))]
    reference.close()
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != "softcache.json")
    caught = 0
    for f in files:
        data = f.read_bytes()
        for pos in sorted({0, len(data) // 2, len(data) - 1, *rng.integers(0, len(data), 3).tolist()}):
            flipped = bytearray(data)
            flipped[pos] ^= 0x24
            f.write_bytes(bytes(flipped))
            try:
                cache = softcache.open_cache(root)
                for i, want in enumerate(original):
                    got = cache[i]
                    for layer, h in want["teacher_hidden"].items():
                        np.testing.assert_array_equal(got["teacher_hidden"][layer], h)
                    np.testing.assert_array_equal(got["teacher_attentions"][1], want["teacher_attentions"][1])
            except CorruptShardError:
                caught += 1
            f.write_bytes(data)
    assert caught > len(files)  # most of a shard is data: most flips must be caught
