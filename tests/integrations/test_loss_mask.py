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
            writer.write_logits(
                rng.integers(0, V, length), (rng.standard_normal((length, V)) * 3).astype(np.float32), loss_mask=mask
            )
            masks.append(mask)
    return path, masks


def assert_labels_follow_the_masks(seen, path, masks) -> None:
    """Every row the trainer saw: labels −100 exactly off its sequence's mask, and at the padding."""
    cache = softcache.open_cache(path)
    by_tokens = {tuple(cache[i]["input_ids"]): masks[i] for i in range(len(cache))}
    rows = 0
    for input_ids, labels in seen:
        for row_ids, row_labels in zip(input_ids.numpy(), labels.numpy(), strict=True):
            n = next(len(ids) for ids in by_tokens if tuple(row_ids[: len(ids)]) == ids)
            np.testing.assert_array_equal(row_labels[:n] != -100, by_tokens[tuple(row_ids[:n])])
            assert (row_labels[n:] == -100).all()  # padding
            rows += 1
    assert rows == 4  # 2 steps of 2


class Recording(DistillationTrainer):
    seen: list = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        Recording.seen.append((inputs["input_ids"].clone(), inputs["labels"].clone()))
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


@pytest.mark.parametrize("streaming", [False, True])
def test_the_trainer_sees_labels_only_on_masked_in_tokens(masked_cache, student, arguments, tmp_path, streaming):
    path, masks = masked_cache
    dataset = (
        softcache.StreamingSoftTargetDataset(path, temperature=2.0, shuffle=False)
        if streaming
        else softcache.SoftTargetDataset(path, temperature=2.0)
    )
    Recording.seen = []
    trainer = Recording(
        model=student(vocab=V),
        args=arguments(tmp_path, max_steps=2, per_device_train_batch_size=2),
        train_dataset=dataset,
        alpha=0.5,
    )
    trainer.train()
    assert_labels_follow_the_masks(Recording.seen, path, masks)


def test_trl_sft_trainer_through_the_mixin_sees_the_mask(masked_cache, student, tmp_path):
    trl = pytest.importorskip("trl")
    from transformers import AutoTokenizer

    from softcache.demo import teacher_path
    from softcache.integrations.hf import DistillationMixin

    seen = []

    class DistillSFTTrainer(DistillationMixin, trl.SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            seen.append((inputs["input_ids"].clone(), inputs["labels"].clone()))
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    path, masks = masked_cache
    config = trl.SFTConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        dataset_kwargs={"skip_prepare_dataset": True},
    )
    with pytest.warns(UserWarning, match="records no tokenizer fingerprint"):
        trainer = DistillSFTTrainer(
            model=student(vocab=V),
            args=config,
            train_dataset=softcache.to_hf_dataset(path, temperature=2.0),
            processing_class=AutoTokenizer.from_pretrained(teacher_path()),
            alpha=0.5,
        )
    trainer.train()
    assert_labels_follow_the_masks(seen, path, masks)
