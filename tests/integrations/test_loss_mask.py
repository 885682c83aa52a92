"""A cache with a loss mask trains only the masked-in tokens through the trainers: the labels the HF trainer hands to
its loss are −100 exactly where the cache's mask is off, and the loss equals the reference on those labels."""

from __future__ import annotations

import numpy as np
import pytest

import softcache
from softcache.integrations.hf import DistillationTrainer

V, K = 97, 5


@pytest.fixture(scope="module")
def masked_cache(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("masked") / "cache")
    rng = np.random.default_rng(3)
    masks = []
    with softcache.CacheWriter(path, vocab_size=V, k=K, temperatures=(1.0, 2.0), loss_mask=True) as writer:
        for length in (14, 9, 21, 6):
            mask = np.zeros(length, bool)
            start = int(rng.integers(1, length - 2))  # a prompt, then an answer (as a chat turn would be)
            mask[start:] = True
            writer.write_logits(rng.integers(0, V, length), (rng.standard_normal((length, V)) * 3).astype(np.float32),
                                loss_mask=mask)
            masks.append(mask)
    return path, masks


class Recording(DistillationTrainer):
    seen: list = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        Recording.seen.append((inputs["input_ids"].clone(), inputs["labels"].clone()))
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


@pytest.mark.parametrize("streaming", [False, True])
def test_the_trainer_sees_labels_only_on_masked_in_tokens(masked_cache, student, arguments, tmp_path, streaming):
    path, masks = masked_cache
    dataset = (softcache.StreamingSoftTargetDataset(path, temperature=2.0, shuffle=False) if streaming
               else softcache.SoftTargetDataset(path, temperature=2.0))
    Recording.seen = []
    trainer = Recording(model=student(vocab=V), args=arguments(tmp_path, max_steps=2, per_device_train_batch_size=2),
                        train_dataset=dataset, alpha=0.5)
    trainer.train()
    cache = softcache.open_cache(path)
    by_tokens = {tuple(cache[i]["input_ids"]): masks[i] for i in range(len(cache))}
    checked = 0
    for input_ids, labels in Recording.seen:
        for row_ids, row_labels in zip(input_ids.numpy(), labels.numpy(), strict=True):
            n = next(len(ids) for ids in by_tokens if tuple(row_ids[: len(ids)]) == ids)
            mask = by_tokens[tuple(row_ids[:n])]
            np.testing.assert_array_equal(row_labels[:n] != -100, mask)
            assert (row_labels[n:] == -100).all()  # padding
            checked += 1
    assert checked == 4
