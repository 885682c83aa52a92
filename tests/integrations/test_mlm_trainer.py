"""Masked-LM caches through the trainers: no label shift, the logits path, chosen from the dataset's cache; the loss
equals a float64 hand computation of (1 − α)·CE + α·T²·KL(bucket) over the masked positions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

import softcache
from softcache.extras import MLMLabels
from softcache.integrations.hf import DistillationTrainer
from softcache.integrations.lightning import DistillationModule
from softcache.integrations.loss import DistillationLoss

V, K, T, ALPHA = 57, 5, 2.0, 0.6


@pytest.fixture(scope="module")
def mlm_cache(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("mlm") / "cache")
    rng = np.random.default_rng(3)
    extra = MLMLabels(0.3)
    with softcache.CacheWriter(path, vocab_size=V, k=K, temperatures=(1.0, T), extras=[extra]) as writer:
        for n, length in enumerate((11, 7, 14, 9)):
            ids = rng.integers(5, V, length)
            corrupted, labels = extra.corrupt(ids, mask_id=4, vocab_size=V, special_ids=range(5), seed=0, index=n,
                                              copy=0)  # fmt: skip
            labels[1] = ids[1]  # at least one masked position per sequence
            writer.write_logits(corrupted, (rng.standard_normal((length, V)) * 3).astype(np.float32),
                                extras={"mlm_labels": labels})  # fmt: skip
    return path


def student():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=48, max_position_embeddings=32)  # fmt: skip
    return transformers.BertForMaskedLM(config).eval()


def reference(model, batch) -> torch.Tensor:
    """float64, by hand, unshifted: rows with a label and targets; bucket forward KL at T, CE at 1."""
    with torch.no_grad():
        z = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    labels, ids, lp = batch["labels"], batch["target_ids"].long(), batch["target_logprobs"].double()
    total, rows = 0.0, 0
    for b, t in zip(*torch.nonzero(labels != -100, as_tuple=True), strict=True):
        keep = ids[b, t] >= 0
        if not keep.any():
            continue
        logq = torch.log_softmax(z[b, t] / T, -1)
        p, q = lp[b, t][keep].exp(), logq[ids[b, t][keep]].exp()
        p_tail, q_tail = (1 - p.sum()).clamp_min(0), 1 - q.sum()
        kl = (p * (p.log() - q.log())).sum() + (p_tail * (p_tail.log() - q_tail.log()) if p_tail > 0 else 0.0)
        ce = -torch.log_softmax(z[b, t], -1)[labels[b, t]]
        total += (1 - ALPHA) * ce + ALPHA * T * T * kl
        rows += 1
    return total / rows


def test_items_and_the_hf_trainer_loss(mlm_cache, tmp_path):
    ds = softcache.SoftTargetDataset(mlm_cache, temperature=T)
    assert ds.causal is False
    cache = softcache.open_cache(mlm_cache)
    for i in range(len(ds)):
        item, rec = ds[i], cache[i]
        masked = rec["mlm_labels"] >= 0
        np.testing.assert_array_equal(item["labels"], np.where(masked, rec["mlm_labels"], -100))
        assert ((item["target_ids"] >= 0).any(1) == masked).all()  # targets at the masked positions only
    batch = softcache.collate([ds[i] for i in range(len(ds))])
    model = student()
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True,
                                          save_strategy="no", disable_tqdm=True, max_steps=1)  # fmt: skip
    trainer = DistillationTrainer(model=model, args=args, train_dataset=ds, alpha=ALPHA)
    assert trainer.distillation.causal is False and trainer.distillation.temperature == T
    expected = reference(model, batch)
    assert trainer.compute_loss(model, batch).item() == pytest.approx(expected.item(), rel=1e-4)
    n = int(((batch["labels"] != -100) & (batch["target_ids"] >= 0).any(-1)).sum())
    assert int(trainer.distillation.count(batch)) == n
    # the causal loss on the same batch shifts, and differs
    causal, _, _ = DistillationLoss(temperature=T, alpha=ALPHA, fused=False)(model, batch)
    assert abs(causal.item() - expected.item()) > 1e-3


def test_lightning_and_options(mlm_cache):
    ds = softcache.SoftTargetDataset(mlm_cache, temperature=T)
    model = student()
    module = DistillationModule(model, dataset=ds, alpha=ALPHA)
    batch = softcache.collate([ds[i] for i in range(len(ds))])
    loss, _ = module.distillation_loss(batch)
    assert loss.item() == pytest.approx(reference(model, batch).item(), rel=1e-4)
    with pytest.raises(ValueError, match="masked LM"):
        DistillationLoss(causal=False, fused=True)


def test_decoded_hf_dataset_needs_causal_false(mlm_cache, tmp_path):
    view = softcache.to_hf_dataset(mlm_cache, temperature=T, decoded=True)
    model = student()
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True,
                                          save_strategy="no", disable_tqdm=True, max_steps=1)  # fmt: skip
    trainer = DistillationTrainer(model=model, args=args, train_dataset=view, alpha=ALPHA, temperature=T, causal=False)
    batch = softcache.collate([view[i] for i in range(len(view))])
    assert trainer.compute_loss(model, batch).item() == pytest.approx(reference(model, batch).item(), rel=1e-4)
    with pytest.raises(ValueError, match="masked-LM cache"):
        DistillationTrainer(model=model, args=args, train_dataset=softcache.SoftTargetDataset(mlm_cache, temperature=T),
                            causal=True)
