"""SoftTargetDataset, collate and check_student against the cache and float64 references.

The caches come from conftest's ``make_cache``, made in the shape below (``SHAPE``).
"""

from __future__ import annotations

import pickle
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import softcache
from softcache import CacheWriter, SoftTargetDataset, reader
from softcache.data import BatchGroupedSampler, Collator
from softcache.identity import vocab_fingerprint

V = 101  # odd
K = 7  # odd
TEMPS = (1.0, 2.0, 0.5)
STEP = 1 / 64  # the writer's default logprob_step: decoded lp/τ − n_τ is within STEP/τ of exact
SAMPLES = 9
SHAPE = dict(vocab=V, k=K, temperatures=TEMPS, samples=SAMPLES)


def log_softmax64(z) -> np.ndarray:
    z = np.asarray(z, np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


@pytest.fixture(scope="module", params=["arrow", "zarr"])
def topk(request, tmp_path_factory, make_cache):
    return make_cache(str(tmp_path_factory.mktemp("topk") / "c"), seed=1, backend=request.param, **SHAPE)


@pytest.fixture(scope="module")
def sampled(tmp_path_factory, make_cache):
    return make_cache(str(tmp_path_factory.mktemp("sampled") / "c"), seed=2, targets="sampled", **SHAPE)


def check_item(item, cache, i, temperature, z, length=None):
    """An item against cache[i], cache.targets(i, τ) (bit for bit) and log_softmax(z/τ) in float64."""
    rec = cache[i]
    L = len(rec["input_ids"]) if length is None else length
    assert {k: (v.dtype, v.shape) for k, v in item.items()} == {
        "input_ids": (np.int64, (L,)),
        "attention_mask": (np.int64, (L,)),
        "labels": (np.int64, (L,)),
        "target_ids": (np.int32, (L, K)),
        "target_logprobs": (np.float32, (L, K)),
    }
    assert np.array_equal(item["input_ids"], rec["input_ids"][:L])
    assert np.array_equal(item["labels"], rec["input_ids"][:L])
    assert np.all(item["attention_mask"] == 1)
    ids, lp = cache.targets(i, temperature)
    assert np.array_equal(item["target_ids"], ids[:L])
    assert np.array_equal(item["target_logprobs"], lp[:L])
    exact = np.take_along_axis(log_softmax64(np.asarray(z[:L], np.float64) / temperature), ids[:L].astype(int), 1)
    assert np.abs(item["target_logprobs"] - exact).max() <= STEP / temperature + 1e-5


# ---------------------------------------------------------------------------------------------
# items


@pytest.mark.parametrize("temperature", TEMPS)
def test_items_equal_cache_targets_and_reference(topk, temperature):
    cache, ids, logits = topk
    ds = SoftTargetDataset(cache, temperature=temperature)
    assert (len(ds), ds.vocab_size, ds.k, ds.temperature, ds.cache) == (len(cache), V, K, temperature, cache)
    for i in range(len(ds)):
        check_item(ds[i], cache, i, temperature, logits[i])
    check_item(ds[-1], cache, len(ds) - 1, temperature, logits[-1])


def test_max_length_truncates_every_key(topk):
    cache, ids, logits = topk
    ds = SoftTargetDataset(cache.url, temperature=2.0, max_length=5)
    for i in range(len(ds)):
        check_item(ds[i], cache, i, 2.0, logits[i], length=min(5, len(ids[i])))
    with pytest.raises(ValueError, match="max_length"):
        SoftTargetDataset(cache, max_length=0)


def test_uncaptured_temperature_is_an_error_naming_the_fixes(topk):
    cache, _, _ = topk
    with pytest.raises(ValueError, match=r"1\.5 was not captured.*\[1\.0, 2\.0, 0\.5\].*--temperatures.*retemper=True"):
        SoftTargetDataset(cache, temperature=1.5)


@pytest.mark.parametrize("temperature", [1.5, 0.7])
def test_retemper_renormalises_the_kept_ids(topk, temperature):
    cache, ids, logits = topk
    ds = SoftTargetDataset(cache, temperature=temperature, retemper=True)
    for i in range(len(ds)):
        item = ds[i]
        stored = item["target_ids"].astype(int)
        assert np.array_equal(item["target_ids"], cache[i]["target_ids"])
        # reference: softmax of z/τ restricted to the stored ids, in float64 from the written logits
        kept = np.take_along_axis(np.asarray(logits[i], np.float64), stored, 1) / temperature
        ref = log_softmax64(kept)
        assert np.abs(item["target_logprobs"] - ref).max() <= STEP / temperature + 1e-5
        assert np.allclose(np.exp(item["target_logprobs"].astype(np.float64)).sum(1), 1, atol=1e-5)
        # the exact tempered distribution keeps a tail: retempering moves mass onto the kept ids
        exact = np.take_along_axis(log_softmax64(np.asarray(logits[i], np.float64) / temperature), stored, 1)
        assert (1 - np.exp(exact).sum(1)).max() > 1e-2


def test_retemper_keeps_captured_temperatures_exact(topk):
    cache, _, _ = topk
    exact, opted = SoftTargetDataset(cache, 2.0), SoftTargetDataset(cache, 2.0, retemper=True)
    for i in range(len(exact)):
        assert np.array_equal(exact[i]["target_logprobs"], opted[i]["target_logprobs"])


def test_retemper_with_padding_slots(tmp_path):
    """Rows with fewer than k ids (written with −1 padding) keep 0 at padding and renormalise the rest."""
    rng = np.random.default_rng(5)
    lp = log_softmax64(rng.standard_normal((6, V)) * 2)
    top = np.argsort(-lp, 1)[:, :K]
    ids = top.copy()
    ids[::2, 4:] = -1
    vals = np.where(ids >= 0, np.take_along_axis(lp, top, 1), 0)
    with CacheWriter(str(tmp_path / "c"), vocab_size=V, k=K, temperatures=(1.0,)) as w:
        w.write_targets(rng.integers(0, V, 6), ids, vals, lognorm=np.zeros((6, 1)))
    item = SoftTargetDataset(str(tmp_path / "c"), temperature=3.0, retemper=True)[0]
    got = item["target_logprobs"]
    pad = item["target_ids"] < 0
    assert pad.sum() == 3 * 3 and np.all(got[pad] == 0)
    for row in range(6):
        keep = ~pad[row]
        ref = log_softmax64(np.sort(vals[row][ids[row] >= 0])[::-1] / 3.0)
        assert np.abs(np.sort(got[row][keep])[::-1] - ref).max() <= STEP / 3 + 1e-5


def test_sampled_only_at_its_capture_temperature(sampled):
    cache, _, _ = sampled
    ds = SoftTargetDataset(cache, temperature=2.0)
    for i in range(len(ds)):
        rec = cache[i]
        item = ds[i]
        assert np.array_equal(item["target_ids"], rec["target_ids"])
        counts = rec["target_counts"].astype(np.float64)
        ref = np.where(counts > 0, np.log(np.maximum(counts, 1) / SAMPLES), 0)
        assert np.allclose(item["target_logprobs"], ref, atol=1e-6)
    for retemper in (False, True):
        with pytest.raises(ValueError, match=r"drawn at temperature 2\.0.*retemper does not apply"):
            SoftTargetDataset(cache, temperature=1.0, retemper=retemper)


def test_dataset_pickles_and_reopens(topk):
    cache, _, _ = topk
    ds = SoftTargetDataset(cache, temperature=0.5, max_length=11)
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.cache is not cache
    for i in (0, 7, len(ds) - 1):
        a, b = ds[i], clone[i]
        assert all(np.array_equal(a[key], b[key]) for key in a)


# ---------------------------------------------------------------------------------------------
# collate


def check_batch(batch, items, width):
    B = len(items)
    assert {k: (v.dtype, tuple(v.shape)) for k, v in batch.items()} == {
        "input_ids": (torch.int64, (B, width)),
        "attention_mask": (torch.int64, (B, width)),
        "labels": (torch.int64, (B, width)),
        "target_ids": (torch.int32, (B, width, K)),
        "target_logprobs": (torch.float32, (B, width, K)),
    }
    for b, item in enumerate(items):
        L = len(item["input_ids"])
        for key in batch:
            assert np.array_equal(batch[key][b, :L].numpy(), np.asarray(item[key])), key
        assert torch.all(batch["input_ids"][b, L:] == 0) and torch.all(batch["attention_mask"][b, L:] == 0)
        assert torch.all(batch["labels"][b, L:] == -100) and torch.all(batch["target_ids"][b, L:] == -1)
        assert torch.all(batch["target_logprobs"][b, L:] == 0)


@pytest.mark.parametrize("temperature", TEMPS)
def test_collate_pads_each_key(topk, temperature):
    cache, _, logits = topk
    ds = SoftTargetDataset(cache, temperature=temperature)
    items = [ds[i] for i in (3, 0, 9, 4, 17)]
    width = max(len(it["input_ids"]) for it in items)
    check_batch(softcache.collate(items), items, width)
    check_batch(Collator(pad_to_multiple_of=8)(items), items, -(-width // 8) * 8)
    for b, i in enumerate((3, 0, 9, 4, 17)):  # after collate, still the reference
        check_item({k: v[b, : len(items[b]["input_ids"])].numpy() for k, v in softcache.collate(items).items()},
                   cache, i, temperature, logits[i])  # fmt: skip


def test_collate_takes_lists_tensors_and_ignores_other_keys(topk):
    cache, _, _ = topk
    ds = SoftTargetDataset(cache)
    items = [ds[i] for i in range(4)]
    mixed = [
        {k: v.tolist() for k, v in items[0].items()} | {"text": "ignored"},
        {k: torch.from_numpy(v) for k, v in items[1].items()},
        {"input_ids": items[2]["input_ids"], "target_ids": items[2]["target_ids"],
         "target_logprobs": items[2]["target_logprobs"]},  # no mask or labels: ones and input_ids
        items[3] | {"lognorm": np.zeros(3)},
    ]  # fmt: skip
    batch = softcache.collate(mixed)
    check_batch(batch, items, max(len(it["input_ids"]) for it in items))
    with pytest.raises(ValueError, match="lacks target_ids"):
        softcache.collate([{"input_ids": [1, 2]}])
    with pytest.raises(ValueError, match="target_ids"):
        softcache.collate([items[0] | {"target_ids": items[0]["target_ids"][:-1]}])


def test_collate_keeps_position_ids(topk):
    ds = SoftTargetDataset(topk[0])
    items = [ds[i] | {"position_ids": np.arange(len(ds[i]["input_ids"])) + 3} for i in (1, 2)]
    batch = softcache.collate(items)
    for b, it in enumerate(items):
        L = len(it["input_ids"])
        assert np.array_equal(batch["position_ids"][b, :L].numpy(), it["position_ids"])
        assert torch.all(batch["position_ids"][b, L:] == 0)


@pytest.mark.parametrize("pack_length", [1, 13, 29, 64])
def test_packing_aligns_positions_labels_and_targets(topk, pack_length):
    cache, ids, _ = topk
    ds = SoftTargetDataset(cache, temperature=2.0)
    order = [5, 1, 12, 0, 7, 3, 19, 2, 22]
    items = [ds[i] for i in order]
    batch = Collator(pack_length=pack_length)(items)
    assert batch["input_ids"].shape[1] <= pack_length
    # walk the rows: each sequence (truncated to pack_length) appears whole, in order, greedy rows
    seq, row_used, rows = 0, [], batch["input_ids"].shape[0]
    for r in range(rows):
        at = 0
        while seq < len(items) and at + min(len(items[seq]["input_ids"]), pack_length) <= pack_length:
            it = items[seq]
            L = min(len(it["input_ids"]), pack_length)
            sl = slice(at, at + L)
            assert np.array_equal(batch["input_ids"][r, sl].numpy(), it["input_ids"][:L])
            assert np.array_equal(batch["position_ids"][r, sl].numpy(), np.arange(L))
            assert np.array_equal(batch["target_ids"][r, sl].numpy(), it["target_ids"][:L])
            assert np.array_equal(batch["target_logprobs"][r, sl].numpy(), it["target_logprobs"][:L])
            assert torch.all(batch["attention_mask"][r, sl] == 1)
            labels = it["labels"][:L].copy()
            labels[0] = -100
            assert np.array_equal(batch["labels"][r, sl].numpy(), labels)
            at, seq = at + L, seq + 1
        row_used.append(at)
        assert torch.all(batch["attention_mask"][r, at:] == 0) and torch.all(batch["labels"][r, at:] == -100)
        assert torch.all(batch["target_ids"][r, at:] == -1) and torch.all(batch["target_logprobs"][r, at:] == 0)
    assert seq == len(items)
    # greedy: the next sequence did not fit in the row before
    lengths = [min(len(ids[i]), pack_length) for i in order]
    assert max(row_used) == batch["input_ids"].shape[1] and sum(row_used) == sum(lengths)


def test_collator_argument_errors():
    for bad in ({"pad_to_multiple_of": 0}, {"pack_length": -1}, {"pack_length": 2.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Collator(**bad)
    with pytest.raises(ValueError, match="no items"):
        softcache.collate([])


def test_dataloader_two_workers_each_sequence_once(topk):
    cache, ids, _ = topk
    ds = SoftTargetDataset(cache.url, temperature=0.5)
    loader = DataLoader(ds, batch_size=4, shuffle=True, num_workers=2, collate_fn=softcache.collate)
    seen = []
    for batch in loader:
        for b in range(batch["input_ids"].shape[0]):
            L = int(batch["attention_mask"][b].sum())
            seen.append(tuple(batch["input_ids"][b, :L].tolist()))
    assert sorted(seen) == sorted(tuple(i.tolist()) for i in ids)


def test_batch_grouped_sampler_decodes_each_batch_once(topk, monkeypatch):
    cache, _, _ = topk
    ds = SoftTargetDataset(cache.url)
    sampler = BatchGroupedSampler(ds, seed=4)
    n_batches = sum(len(s["batches"]) for s in cache.manifest["shards"])
    decoded = []
    real = reader.Cache._decode
    monkeypatch.setattr(reader.Cache, "_decode", lambda *a: decoded.append(1) or real(*a))
    orders = {}
    for epoch in (0, 1, 0):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert sorted(order) == list(range(len(ds))) and len(sampler) == len(ds)
        assert orders.setdefault(epoch, order) == order
        decoded.clear()
        fresh = SoftTargetDataset(cache.url)
        items = [fresh[i] for i in order]
        assert len(decoded) == n_batches
        assert all(np.array_equal(it["input_ids"], ds[i]["input_ids"]) for it, i in zip(items, order, strict=True))
    assert orders[0] != orders[1] and orders[0] != sorted(orders[0])
    decoded.clear()
    fresh = SoftTargetDataset(cache.url)
    for i in np.random.default_rng(0).permutation(len(ds)):
        fresh[int(i)]
    assert len(decoded) > n_batches  # what the sampler saves
    with pytest.raises(ValueError, match="group"):
        BatchGroupedSampler(ds, group=0)


# ---------------------------------------------------------------------------------------------
# check_student


class FakeTokenizer:
    def __init__(self, vocab):
        self.vocab = vocab
        self.name_or_path = "fake"

    def get_vocab(self):
        return dict(self.vocab)


def test_check_student_vocab_sizes(make_cache, tmp_path):
    import transformers

    ds = SoftTargetDataset(make_cache(str(tmp_path / "c"), n=3, **SHAPE)[0])
    config = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2)  # fmt: skip
    for student, extra in ((V, 0), (128, 27)):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=student, **config))
        assert ds.check_student(model) == extra
    assert ds.check_student(vocab_size=V + 3) == 3
    assert ds.check_student(SimpleNamespace(config=SimpleNamespace(vocab_size=V + 1))) == 1
    small = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=64, **config))
    with pytest.raises(ValueError, match=rf"vocab_size={V} but the student has 64 logits.*resize_token_embeddings"):
        ds.check_student(small)
    with pytest.raises(ValueError, match="model= or vocab_size="):
        ds.check_student()
    with pytest.raises(ValueError, match="pass vocab_size="):
        ds.check_student(SimpleNamespace())


def test_check_student_tokenizer(make_cache, tmp_path):
    tok = FakeTokenizer({f"t{i}": i for i in range(V)})
    meta = {"tokenizer": {"vocab_sha256": vocab_fingerprint(tok), "size": V}}
    with_fp, _, _ = make_cache(str(tmp_path / "fp"), n=3, metadata=meta, **SHAPE)
    without, _, _ = make_cache(str(tmp_path / "none"), n=3, **SHAPE)
    ds = SoftTargetDataset(with_fp)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ds.check_student(vocab_size=V, tokenizer=tok) == 0
    other = FakeTokenizer({f"t{i}": (i + 1) % V for i in range(V)})
    with pytest.raises(ValueError, match=rf"tokenizer mismatch.*{vocab_fingerprint(tok)[:16]}.*'fake'.*"
                                         rf"{vocab_fingerprint(other)[:16]}"):  # fmt: skip
        ds.check_student(vocab_size=V, tokenizer=other)
    with pytest.warns(UserWarning, match="no tokenizer fingerprint"):
        assert SoftTargetDataset(without).check_student(vocab_size=V, tokenizer=tok) == 0
