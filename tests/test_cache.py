"""CacheWriter / open_cache end to end, both backends, local paths and memory://, against float64 references."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap
import uuid
import zlib
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch

from softcache import CacheFormatError, CacheWriter, CorruptShardError, open_cache

BACKENDS = ["arrow", "zarr"]
SUFFIX = {"arrow": ".arrow", "zarr": ".zarr"}
V = 997  # odd, not a power of two
K = 7
TEMPS = (1.0, 2.0, 0.7)
STEP = 1 / 64


# ---------------------------------------------------------------------------------------------
# references and fixtures


def log_softmax64(z) -> np.ndarray:
    z = np.asarray(z, np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def make_root(tmp_path):
    """Factory of fresh cache roots; ``make_root("memory")`` gives a unique memory:// URL."""
    made = []

    def make(kind="local"):
        if kind == "memory":
            url = f"memory://softcache-test-{uuid.uuid4().hex}"
            made.append(url)
            return url
        return str(tmp_path / f"cache-{uuid.uuid4().hex[:8]}")

    yield make
    fs = fsspec.filesystem("memory")
    for url in made:
        path = url[len("memory://") :]
        if fs.exists(path):
            fs.rm(path, recursive=True)


def random_sequences(rng, n, vocab=V, max_len=40, scale=3.0):
    """n sequences of odd-ish random lengths with float32 logits (the reference uses these exact values)."""
    lengths = rng.integers(1, max_len, size=n)
    ids = [rng.integers(0, vocab, size=int(L)) for L in lengths]
    logits = [(rng.standard_normal((int(L), vocab)) * scale).astype(np.float32) for L in lengths]
    return ids, logits


def check_topk(cache, i, ids, z, k=K, temps=TEMPS, step=STEP):
    """cache[i] and cache.targets(i, τ) against the exact float64 teacher distribution of logits z."""
    rec = cache[i]
    z = np.asarray(z, np.float64)
    L = len(ids)
    assert np.array_equal(rec["input_ids"], ids)
    assert rec["target_ids"].shape == (L, k) and rec["target_ids"].dtype == np.int32
    assert rec["target_logprobs"].shape == (L, k)
    assert rec["lognorm"].shape == (L, len(temps))
    lp = log_softmax64(z)
    n_k = min(k, z.shape[1])
    top = rec["target_ids"][:, :n_k].astype(np.int64)
    assert top.min() >= 0
    # exact top-k: the reference log-probs at the stored ids are the k largest, in descending order
    # (equal to the id-for-id comparison for continuous logits; bf16/fp16 inputs have exact ties)
    assert np.array_equal(np.take_along_axis(lp, top, -1), -np.sort(-lp, axis=-1)[:, :n_k])
    assert all(len(set(row)) == n_k for row in top.tolist())
    assert np.all(rec["target_ids"][:, n_k:] == -1)
    got_lp = rec["target_logprobs"][:, :n_k].astype(np.float64)
    assert np.abs(got_lp - np.take_along_axis(lp, top, -1)).max() <= step / 2 + 1e-5
    for c, tau in enumerate(temps):
        exact_t = log_softmax64(z / tau)
        n_tau = np.log(np.exp(z / tau - (z / tau).max(-1, keepdims=True)).sum(-1)) + (z / tau).max(-1)
        n_tau = n_tau - (np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)) / tau
        assert np.abs(rec["lognorm"][:, c] - n_tau).max() <= step / (2 * tau) + 1e-5
        t_ids, t_lp = cache.targets(i, temperature=tau)
        assert np.array_equal(t_ids, rec["target_ids"])
        exact = np.take_along_axis(exact_t, top, -1)
        err = np.abs(t_lp[:, :n_k].astype(np.float64) - exact)
        assert err.max() <= step / tau + 1e-5, (tau, err.max())
        head = np.exp(t_lp[:, :n_k].astype(np.float64)).sum(-1)
        assert np.abs(head - np.exp(exact).sum(-1)).max() <= 1e-5, "tail mass at a captured τ must be exact"
        assert np.all(t_lp[:, n_k:] == 0)
    assert (rec["target_logprobs"].dtype, rec["lognorm"].dtype) == (np.float32, np.float32)


def records_equal(a, b) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[key], b[key]) for key in a)


def all_records(cache):
    return [cache[i] for i in range(len(cache))]


def shard_files(root):
    return sorted(p for p in os.listdir(root) if p.startswith("shard-"))


# ---------------------------------------------------------------------------------------------
# topk through write_logits


@pytest.mark.parametrize("location", ["local", "memory"])
def test_topk_write_logits_round_trip(backend, location, make_root):
    rng = np.random.default_rng(101)
    root = make_root(location)
    ids, logits = random_sequences(rng, 9)
    ids[3] = ids[3][:1]
    logits[3] = logits[3][:1]  # a one-token sequence
    # mixed input types: numpy float32, torch float32, torch bfloat16 (reference on the rounded values),
    # numpy float16, torch int64 ids
    refs = []
    with CacheWriter(
        root,
        vocab_size=V,
        k=K,
        temperatures=TEMPS,
        backend=backend,
        batch_tokens=23,
        shard_tokens=61,
        metadata={"teacher": "unit-test"},
    ) as w:
        for j, (s, z) in enumerate(zip(ids, logits, strict=True)):
            if j % 4 == 1:
                zt = torch.from_numpy(z).to(torch.bfloat16)
                w.write_logits(torch.from_numpy(s), zt)
                refs.append(zt.double().numpy())
            elif j % 4 == 2:
                w.write_logits(s.astype(np.int32), z.astype(np.float16))
                refs.append(z.astype(np.float16).astype(np.float64))
            elif j % 4 == 3:
                w.write_logits(torch.from_numpy(s), torch.from_numpy(z))
                refs.append(z.astype(np.float64))
            else:
                w.write_logits(s, z)
                refs.append(z.astype(np.float64))
    cache = open_cache(root)
    assert len(cache) == len(ids)
    assert cache.num_tokens == sum(len(s) for s in ids)
    m = cache.manifest
    assert (m["targets"], m["k"], m["vocab_size"], m["backend"], m["samples"]) == ("topk", K, V, backend, None)
    assert m["temperatures"] == list(TEMPS)
    assert m["format_version"] == 1  # no extra streams: still readable by softcache from before they existed
    assert m["codec"]["logprob_step"] == STEP
    assert m["metadata"] == {"teacher": "unit-test"}
    assert len(m["shards"]) > 1 and any(len(s["batches"]) > 1 for s in m["shards"])
    assert sum(s["sequences"] for s in m["shards"]) == len(ids)
    assert sum(s["tokens"] for s in m["shards"]) == cache.num_tokens
    for s in m["shards"]:
        assert "/" not in s["file"] and s["file"].endswith(SUFFIX[backend])
        assert s["bytes"] > 0 and len(s["sha256"]) == 64
    for i in range(len(ids)):
        check_topk(cache, i, ids[i], refs[i])
    with pytest.raises(ValueError, match="not captured"):
        cache.targets(0, temperature=1.5)
    with pytest.raises(IndexError):
        cache[len(ids)]
    assert records_equal(cache[-1], cache[len(ids) - 1])
    # random access in random order (fresh reader: no warm batch cache) equals sequential reading
    sequential = all_records(cache)
    fresh = open_cache(root)
    for i in rng.permutation(len(ids)):
        assert records_equal(fresh[int(i)], sequential[i])
    assert all(records_equal(a, b) for a, b in zip(fresh, sequential, strict=True))


def test_topk_k_larger_than_finite_support(backend, make_root):
    """Logits that are −inf outside a few ids: top-k holds the finite ones, then −1 padding."""
    rng = np.random.default_rng(5)
    root = make_root()
    z = np.full((6, 31), -np.inf, np.float32)
    for r in range(6):
        z[r, rng.choice(31, size=r + 1, replace=False)] = rng.standard_normal(r + 1)
    ids = rng.integers(0, 31, size=6)
    with CacheWriter(root, vocab_size=31, k=5, temperatures=(1.0, 3.0), backend=backend) as w:
        w.write_logits(ids, z)
    rec = open_cache(root)[0]
    lp = log_softmax64(np.where(np.isfinite(z), z, -1e30))
    for r in range(6):
        n = min(r + 1, 5)
        assert rec["target_ids"][r, :n].tolist() == np.argsort(-lp[r])[:n].tolist()
        assert np.all(rec["target_ids"][r, n:] == -1) and np.all(rec["target_logprobs"][r, n:] == 0)
        _, t = open_cache(root).targets(0, temperature=3.0)
        if r < 5:  # the whole support is kept: the head mass at every captured τ is 1
            assert abs(np.exp(t[r, :n].astype(np.float64)).sum() - 1) <= 1e-5


def test_records_are_not_shared_with_the_reader(make_root):
    """Mutating a returned record must not change what the cache returns next time."""
    rng = np.random.default_rng(9)
    root = make_root()
    ids, logits = random_sequences(rng, 3)
    with CacheWriter(root, vocab_size=V, k=K) as w:
        for s, z in zip(ids, logits, strict=True):
            w.write_logits(s, z)
    cache = open_cache(root)
    before = {key: value.copy() for key, value in cache[1].items()}
    rec = cache[1]
    try:
        rec["target_logprobs"] *= 2
        rec["target_ids"][:] = 0
    except ValueError:
        pass  # read-only arrays are a fine answer too
    assert records_equal(cache[1], before)


# ---------------------------------------------------------------------------------------------
# batched input with attention masks


def _batch(rng, seqs, logits, left: bool):
    """Pad to (B, Lmax, V) with NaN logits at masked positions (they must be ignored)."""
    B, Lmax = len(seqs), max(len(s) for s in seqs)
    ids = np.zeros((B, Lmax), np.int64)
    mask = np.zeros((B, Lmax), np.int64)
    z = np.full((B, Lmax, logits[0].shape[1]), np.nan, np.float32)
    for b, (s, zz) in enumerate(zip(seqs, logits, strict=True)):
        sl = slice(Lmax - len(s), Lmax) if left else slice(0, len(s))
        ids[b, sl], mask[b, sl], z[b, sl] = s, 1, zz
    return ids, z, mask


@pytest.mark.parametrize("kind", ["topk", "sampled"])
@pytest.mark.parametrize("left", [True, False], ids=["left-pad", "right-pad"])
def test_batched_equals_one_by_one(backend, kind, left, make_root):
    rng = np.random.default_rng(202 + left)
    seqs, logits = random_sequences(rng, 7, max_len=19)
    opts = dict(vocab_size=V, backend=backend, batch_tokens=29, shard_tokens=50, seed=3)
    opts.update(k=K, temperatures=TEMPS) if kind == "topk" else opts.update(
        k=17, targets="sampled", samples=16, temperatures=(1.5,)
    )
    one, batched = make_root(), make_root()
    with CacheWriter(one, **opts) as w:
        for s, z in zip(seqs, logits, strict=True):
            w.write_logits(s, z)
    with CacheWriter(batched, **opts) as w:
        ids, z, mask = _batch(rng, seqs[:4], logits[:4], left)
        w.write_logits(torch.from_numpy(ids), torch.from_numpy(z), attention_mask=torch.from_numpy(mask))
        ids, z, mask = _batch(rng, seqs[4:], logits[4:], left)
        w.write_logits(ids, z, attention_mask=mask)
    a, b = open_cache(one), open_cache(batched)
    assert len(a) == len(b) == len(seqs)
    for i in range(len(seqs)):
        assert records_equal(a[i], b[i]), f"sequence {i} differs between batched and one-by-one writes"
        if kind == "topk":
            check_topk(b, i, seqs[i], logits[i])


# ---------------------------------------------------------------------------------------------
# sampled


def _write_sampled(root, seqs, logits, seed=0, backend="arrow", **kw):
    opts = dict(
        vocab_size=logits[0].shape[1],
        k=17,
        targets="sampled",
        samples=16,
        temperatures=(2.0,),
        seed=seed,
        backend=backend,
        batch_tokens=31,
        shard_tokens=70,
    )
    opts.update(kw)
    with CacheWriter(root, **opts) as w:
        for s, z in zip(seqs, logits, strict=True):
            w.write_logits(s, z)
    return open_cache(root)


def test_sampled_round_trip(backend, make_root):
    rng = np.random.default_rng(303)
    seqs, logits = random_sequences(rng, 6, scale=2.0)
    for z in logits:
        z[:, :100] = -np.inf  # never drawn
    cache = _write_sampled(make_root(), seqs, logits, seed=11, backend=backend)
    again = _write_sampled(make_root(), seqs, logits, seed=11, backend=backend)
    other = _write_sampled(make_root(), seqs, logits, seed=12, backend=backend)
    assert cache.manifest["samples"] == 16 and cache.manifest["targets"] == "sampled"
    differs = False
    for i, s in enumerate(seqs):
        rec = cache[i]
        assert np.array_equal(rec["input_ids"], s)
        ids, counts = rec["target_ids"], rec["target_counts"]
        assert ids.shape == (len(s), 17) and ids.dtype == np.int32
        assert np.all(counts.sum(-1) == 16), "counts add up to the number of draws at every position"
        for r in range(len(s)):
            real = ids[r] >= 0
            n = int(real.sum())
            assert real.tolist() == [True] * n + [False] * (17 - n)
            assert len(set(ids[r, :n].tolist())) == n, "unique ids"
            assert np.all(ids[r, :n] >= 100) and np.all(ids[r, :n] < V)
            assert np.all(np.diff(counts[r, :n]) <= 0) and np.all(counts[r, n:] == 0)
        expected_lp = np.where(ids >= 0, np.log(np.maximum(counts, 1) / 16.0), 0)
        assert np.allclose(rec["target_logprobs"], expected_lp, atol=1e-6)
        t_ids, t_lp = cache.targets(i, temperature=2.0)
        assert np.array_equal(t_ids, ids) and np.allclose(t_lp, expected_lp, atol=1e-6)
        assert records_equal(rec, again[i]), "same seed → identical cache"
        differs |= not records_equal(rec, other[i])
    assert differs, "a different seed should draw different samples"
    with pytest.raises(ValueError, match="not captured"):
        cache.targets(0, temperature=1.0)


def test_sampled_distribution_approaches_tempered_softmax(make_root):
    """Pool the draws of many positions with the same logits: frequencies ≈ softmax(z/T), not softmax(z)."""
    vocab, temperature = 13, 2.0
    z = np.linspace(-3, 3, vocab).astype(np.float32)
    L = 401
    cache = _write_sampled(
        make_root(),
        [np.zeros(L, np.int64)],
        [np.tile(z, (L, 1))],
        seed=1,
        k=13,
        samples=50,
        temperatures=(temperature,),
    )
    rec = cache[0]
    freq = np.bincount(
        rec["target_ids"][rec["target_ids"] >= 0], weights=rec["target_counts"][rec["target_ids"] >= 0], minlength=vocab
    ) / (50 * L)
    p_t = np.exp(log_softmax64(z / temperature))
    p_1 = np.exp(log_softmax64(z))
    tv_t, tv_1 = 0.5 * np.abs(freq - p_t).sum(), 0.5 * np.abs(freq - p_1).sum()
    assert tv_t < 0.02, tv_t
    assert tv_1 > 0.1, "draws must be at the capture temperature"


# ---------------------------------------------------------------------------------------------
# write_targets


def test_write_targets_topk_and_sampled(backend, make_root):
    rng = np.random.default_rng(404)
    L, kp, vocab, temps = 11, 4, 211, (1.0, 2.5)
    z = rng.standard_normal((L, vocab)) * 2
    lp = log_softmax64(z)
    top = np.argsort(-lp, -1)[:, :kp]
    kept = rng.integers(0, kp + 1, size=L)
    kept[0] = kp
    t_ids = np.where(np.arange(kp) < kept[:, None], top, -1)
    perm = np.argsort(rng.random((L, kp)), -1)
    t_ids = np.take_along_axis(t_ids, perm, -1)  # any column order
    t_lp = np.where(t_ids >= 0, np.take_along_axis(lp, np.maximum(t_ids, 0), -1), 0.0)
    zt = [z / t for t in temps]
    lse = [np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1) for x in zt]
    lognorm = np.stack([lse[c] - lse[0] / t for c, t in enumerate(temps)], -1)
    input_ids = rng.integers(0, vocab, size=L)
    root = make_root()
    with CacheWriter(root, vocab_size=vocab, k=K, temperatures=temps, backend=backend) as w:
        w.write_targets(input_ids, t_ids, t_lp.astype(np.float32), lognorm=lognorm)
        w.write_targets(
            torch.from_numpy(input_ids),
            torch.from_numpy(t_ids),
            torch.from_numpy(t_lp),
            lognorm=torch.from_numpy(lognorm),
        )
    cache = open_cache(root)
    assert len(cache) == 2 and cache.num_tokens == 2 * L
    for i in range(2):
        rec = cache[i]
        assert rec["target_ids"].shape == (L, K)
        assert np.all(rec["target_ids"][:, kp:] == -1)
        for r in range(L):
            n = int(kept[r])
            assert rec["target_ids"][r, :n].tolist() == top[r, :n].tolist()
            assert np.all(rec["target_ids"][r, n:] == -1)
        for tau in temps:
            ids, tl = cache.targets(i, temperature=tau)
            exact = log_softmax64(z / tau)
            real = ids >= 0
            got = tl[real].astype(np.float64)
            ref = exact[np.nonzero(real)[0], ids[real]]
            assert np.abs(got - ref).max() <= STEP / tau + 1e-5
            head = np.where(real, np.exp(tl.astype(np.float64)), 0).sum(-1)
            head_ref = np.where(real, np.exp(exact[np.arange(L)[:, None], np.maximum(ids, 0)]), 0).sum(-1)
            assert np.abs(head - head_ref).max() <= 1e-5

    # sampled, k' < k
    root = make_root()
    ids = np.array([[5, 9, -1], [-1, -1, 7], [1, 2, 3]])
    counts = np.array([[3, 7, 0], [0, 0, 10], [1, 4, 5]])
    with CacheWriter(
        root, vocab_size=vocab, k=11, targets="sampled", samples=10, temperatures=(1.0,), backend=backend
    ) as w:
        w.write_targets(np.array([1, 2, 3]), ids, counts=counts)
    rec = open_cache(root)[0]
    assert rec["target_ids"].tolist() == [[9, 5] + [-1] * 9, [7] + [-1] * 10, [3, 2, 1] + [-1] * 8]
    assert rec["target_counts"].tolist() == [[7, 3] + [0] * 9, [10] + [0] * 10, [5, 4, 1] + [0] * 8]
    assert np.allclose(rec["target_logprobs"][0, :2], np.log([0.7, 0.3]))


# ---------------------------------------------------------------------------------------------
# append, interrupted writers


def _write_all(root, seqs, logits, kind, backend, start=0, stop=None):
    opts = dict(vocab_size=V, backend=backend, batch_tokens=25, shard_tokens=60, seed=4)
    opts.update(k=K, temperatures=TEMPS) if kind == "topk" else opts.update(
        k=17, targets="sampled", samples=16, temperatures=(1.3,)
    )
    with CacheWriter(root, **opts) as w:
        for s, z in list(zip(seqs, logits, strict=True))[start:stop]:
            w.write_logits(s, z)
    return opts


@pytest.mark.parametrize("kind", ["topk", "sampled"])
def test_append_continues(backend, kind, make_root):
    rng = np.random.default_rng(505)
    seqs, logits = random_sequences(rng, 8, max_len=25)
    whole, parts = make_root(), make_root("memory")
    _write_all(whole, seqs, logits, kind, backend)
    _write_all(parts, seqs, logits, kind, backend, 0, 3)
    _write_all(parts, seqs, logits, kind, backend, 3, 5)
    opts = _write_all(parts, seqs, logits, kind, backend, 5)
    a, b = open_cache(whole), open_cache(parts)
    assert len(b) == 8 and b.num_tokens == a.num_tokens
    assert all(records_equal(x, y) for x, y in zip(a, b, strict=True))
    for change in [
        dict(k=opts["k"] + 2),
        dict(vocab_size=V + 2),
        dict(temperatures=(1.0, 4.0) if kind == "topk" else (2.0,)),
        dict(logprob_step=1 / 32),
        dict(backend="zarr" if backend == "arrow" else "arrow"),
        dict(targets="topk", samples=None, temperatures=(1.3,))
        if kind == "sampled"
        else dict(targets="sampled", samples=5, temperatures=(1.0,), k=K),
    ]:
        with pytest.raises(CacheFormatError):
            CacheWriter(parts, **{**opts, **change})
    assert len(open_cache(parts)) == 8  # a refused writer leaves the cache alone


@pytest.mark.parametrize("kind", ["topk", "sampled"])
@pytest.mark.parametrize("location", ["local", "memory"])
def test_killed_writer_then_resume(backend, kind, location, make_root):
    rng = np.random.default_rng(606)
    seqs, logits = random_sequences(rng, 10, max_len=25)
    whole = make_root()
    _write_all(whole, seqs, logits, kind, backend)
    root = make_root(location)
    opts = dict(vocab_size=V, backend=backend, batch_tokens=25, shard_tokens=60, seed=4)
    opts.update(k=K, temperatures=TEMPS) if kind == "topk" else opts.update(
        k=17, targets="sampled", samples=16, temperatures=(1.3,)
    )
    w = CacheWriter(root, **opts)
    for s, z in zip(seqs[:7], logits[:7], strict=True):
        w.write_logits(s, z)
    assert w._shard is not None or w._pending, "the simulated crash must leave uncommitted work"
    del w  # killed: no close, no abort
    gc.collect()
    fs, path = fsspec.core.url_to_fs(root)
    suffix = SUFFIX[backend]
    # leftovers of a crash: a temporary shard and a renamed shard the manifest never named
    fs.pipe(f"{path}/.shard-00003{suffix}.tmp", b"partial")
    if backend == "zarr":
        fs.makedirs(f"{path}/shard-00009{suffix}", exist_ok=True)
        fs.pipe(f"{path}/shard-00009{suffix}/zarr.json", b"{}")
    else:
        fs.pipe(f"{path}/shard-00009{suffix}", b"orphan")
    cache = open_cache(root)
    committed = len(cache)
    assert 0 < committed < 7
    reference = open_cache(whole)
    for i in range(committed):
        assert records_equal(cache[i], reference[i])
    with CacheWriter(root, **opts) as w:
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
        assert not any(n.endswith(".tmp") for n in names), names
        assert f"shard-00009{suffix}" not in names
        for s, z in zip(seqs[committed:], logits[committed:], strict=True):
            w.write_logits(s, z)
    final = open_cache(root)
    assert len(final) == len(seqs)
    assert all(records_equal(x, y) for x, y in zip(final, reference, strict=True))


# ---------------------------------------------------------------------------------------------
# corruption


def _small_cache(root, backend, n=4, batch_tokens=10**6, vocab=61, max_len=9):
    rng = np.random.default_rng(707)
    seqs, logits = random_sequences(rng, n, vocab=vocab, max_len=max_len)
    opts = dict(vocab_size=vocab, k=5, temperatures=(1.0, 2.0), backend=backend, batch_tokens=batch_tokens)
    with CacheWriter(root, **opts) as w:
        for s, z in zip(seqs, logits, strict=True):
            w.write_logits(s, z)
    return all_records(open_cache(root))


def _largest_file(path: Path) -> Path:
    if path.is_file():
        return path
    return max((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_single_byte_flip_is_caught(backend, make_root):
    root = Path(make_root())
    _small_cache(root, backend)  # one shard, one batch
    name = open_cache(root).manifest["shards"][0]["file"]
    target = _largest_file(root / name)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x40
    target.write_bytes(bytes(data))
    cache = open_cache(root)
    for i in range(len(cache)):
        with pytest.raises(CorruptShardError, match=name):
            cache[i]


def test_truncated_and_missing_shard(backend, make_root):
    root = Path(make_root())
    _small_cache(root, backend)
    name = open_cache(root).manifest["shards"][0]["file"]
    target = _largest_file(root / name)
    data = target.read_bytes()
    target.write_bytes(data[: len(data) - 7])
    with pytest.raises(CorruptShardError, match=name):
        open_cache(root)[0]
    target.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptShardError, match=name):
        open_cache(root)[1]
    target.write_bytes(data)
    open_cache(root)[0]  # restored: fine again
    if (root / name).is_dir():
        target.unlink()  # one file of a directory shard lost
        with pytest.raises(CorruptShardError, match=name):
            open_cache(root)[0]
        import shutil

        shutil.rmtree(root / name)
    else:
        (root / name).unlink()
    with pytest.raises(CorruptShardError, match=name):
        open_cache(root)[0]


_SWEEP = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from softcache import CorruptShardError, open_cache

    root, name, ref_file, plan_file = sys.argv[1:5]
    ref = np.load(ref_file)
    plan = json.load(open(plan_file))
    results = {"same": 0, "corrupt": 0, "wrong": [], "other": [], "unnamed": []}
    for path, positions in plan:
        original = open(path, "rb").read()
        try:
            for pos in positions:
                print("AT", path, pos, flush=True)
                data = bytearray(original)
                data[pos] ^= 0xFF
                open(path, "wb").write(bytes(data))
                try:
                    cache = open_cache(root)
                    same = True
                    for i in range(len(cache)):
                        rec = cache[i]
                        same &= all(np.array_equal(v, ref[f"{i}/{k}"]) for k, v in rec.items())
                    if same:
                        results["same"] += 1
                    else:
                        results["wrong"].append([path, pos])
                except CorruptShardError as e:
                    results["corrupt"] += 1
                    if name not in str(e):
                        results["unnamed"].append([path, pos, str(e)[:200]])
                except Exception as e:
                    results["other"].append([path, pos, type(e).__name__ + ": " + str(e)[:200]])
        finally:
            open(path, "wb").write(original)
    print("RESULT", json.dumps(results))
    """
)


def _header_positions(path: Path, backend: str) -> list[int]:
    """Byte positions of the shard's id-order header (the copy a reader uses)."""
    if backend == "arrow":
        import pyarrow as pa
        import pyarrow.ipc as ipc

        data = path.read_bytes()
        meta = ipc.open_file(pa.py_buffer(data)).schema.metadata
        blob = meta[b"softcache.header.id_order"]
        start = data.rfind(blob)
        assert start > 0
        return list(range(start, start + len(blob)))
    return []


def test_byte_flip_sweep_never_returns_wrong_numbers(backend, make_root, tmp_path):
    """Flip bytes all over a shard (in a child process, so a crash is a failure, not a dead test run)."""
    root = Path(make_root())
    ref = _small_cache(root, backend, n=12, batch_tokens=60, vocab=V, max_len=30)  # a large id-order header
    name = open_cache(root).manifest["shards"][0]["file"]
    np.savez(tmp_path / "ref.npz", **{f"{i}/{k}": v for i, rec in enumerate(ref) for k, v in rec.items()})
    shard = root / name
    files = [shard] if shard.is_file() else sorted(p for p in shard.rglob("*") if p.is_file())
    total = sum(f.stat().st_size for f in files)
    stride = max(1, total // 150)
    plan = []
    for f in files:
        size = f.stat().st_size
        positions = set(range(zlib.crc32(f.name.encode()) % stride, size, stride)) | {size // 2, 0, size - 1}
        if f == shard:
            positions |= set(_header_positions(f, backend))
        plan.append([str(f), sorted(positions)])
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    (tmp_path / "sweep.py").write_text(_SWEEP)
    proc = subprocess.run(
        [
            sys.executable,
            str(tmp_path / "sweep.py"),
            str(root),
            name,
            str(tmp_path / "ref.npz"),
            str(tmp_path / "plan.json"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = proc.stdout.splitlines()
    result = [line for line in lines if line.startswith("RESULT ")]
    at = [line for line in lines if line.startswith("AT ")]
    assert result, f"reader crashed (rc={proc.returncode}) after flipping {at[-1:]}: {proc.stderr[-500:]}"
    res = json.loads(result[0][len("RESULT ") :])
    assert not res["wrong"], f"corrupted shard read back as different numbers: {res['wrong'][:5]}"
    assert not res["other"], f"corruption raised something else than CorruptShardError: {res['other'][:5]}"
    assert not res["unnamed"], f"CorruptShardError without the shard name: {res['unnamed'][:3]}"
    assert res["corrupt"] > 0
