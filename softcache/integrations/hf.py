"""Distillation from a softcache cache with the Hugging Face ``Trainer`` (and TRL's trainers).

    from softcache import SoftTargetDataset
    from softcache.integrations.hf import DistillationTrainer

    train = SoftTargetDataset("cache/", temperature=2.0, max_length=1024)
    trainer = DistillationTrainer(model=student, args=TrainingArguments(...), train_dataset=train, alpha=0.5)
    trainer.train()

What it changes in ``transformers.Trainer``:

- the loss: :class:`~softcache.integrations.loss.DistillationLoss` (fused with the output layer when the model
  supports it, so the (B, T, V) logits are never made; otherwise the model's logits and ``sparse_kl_loss``); labels
  are shifted t -> t + 1; ``temperature`` defaults to the dataset's (the dataset tempers the targets, so a different
  one is an error); with ``alpha < 1`` the logs hold ``soft_loss`` and ``hard_loss`` beside ``loss``;
- ``softcache.collate`` is the default data collator, and ``target_ids`` / ``target_logprobs`` survive
  ``remove_unused_columns=True`` (for ``datasets.Dataset`` and torch datasets alike);
- the student is checked at start-up (``SoftTargetDataset.check_student``): a vocabulary smaller than the cache's
  is an error, a larger (padded) one is sliced to the cache's in the loss;
- gradient accumulation is exact: ``num_items_in_batch`` is the number of rows the loss counts (shifted label not
  -100 and at least one target id) over all micro-batches of the step (and all ranks, with the default
  ``average_tokens_across_devices=True``), each micro-batch's loss is its row sum over that number, and the
  Trainer does not divide it again; DDP's gradient mean is undone as the Trainer does for its own losses.
  So two micro-batches of 2 give exactly the gradient of one batch of 4.

Datasets: a :class:`~softcache.SoftTargetDataset` (also inside ``torch.utils.data.Subset``), a
``softcache.to_hf_dataset`` (its ``index`` column is kept), or any dataset of such items (a ``datasets.Dataset`` built
from them: pass ``temperature=`` and, for a padded student, ``vocab_size=``). Under ``torchrun`` give the Trainer a
map-style dataset, which it shards with a ``DistributedSampler``; ``StreamingSoftTargetDataset`` shards itself by
rank, and accelerate shards iterable datasets again (or, with ``dispatch_batches``, reads them on rank 0 only), so
use it with the Trainer in one process only.

Evaluation (``trainer.evaluate()``) reports ``eval_loss``, the same loss averaged over evaluation batches. With
``compute_metrics`` on the fused path, the model's outputs hold only the last position's logits; pass
``fused=False`` if metrics need all logits. One process with several GPUs (``DataParallel``) is not supported: use
``torchrun``.

TRL: the loss lives in :class:`DistillationMixin`, so it combines with any ``Trainer`` subclass. TRL's SFTTrainer
takes only ``datasets`` datasets; ``softcache.to_hf_dataset`` gives one (tried with trl 1.16: bf16 autocast, logs) ::

    from trl import SFTConfig, SFTTrainer

    class DistillSFTTrainer(DistillationMixin, SFTTrainer):
        pass

    train = softto_hf_dataset(cache, "cache/", temperature=2.0)
    trainer = DistillSFTTrainer(model=student, args=SFTConfig(..., dataset_kwargs={"skip_prepare_dataset": True}),
                                train_dataset=train, processing_class=tokenizer, alpha=0.5)

``skip_prepare_dataset`` keeps SFTTrainer from re-tokenising the cache's sequences; the data collator defaults to
``softcache.collate`` as above, and the loss replaces SFTTrainer's (its token-accuracy metrics are not logged).
"""

from __future__ import annotations

import torch
import transformers
from torch.utils.data import Subset

from softcache.data import collate

from .loss import DistillationLoss

TARGET_COLUMNS = ("target_ids", "target_logprobs")


def _decoder(dataset):
    """The decoding transform of a ``softcache.to_hf_dataset`` (it knows the cache), or None."""
    transform = (getattr(dataset, "format", None) or {}).get("format_kwargs", {}).get("transform")
    return transform if callable(getattr(transform, "check_student", None)) else None


def _source(dataset):
    """What knows the cache's temperature and vocabulary: the dataset under ``Subset`` wrappers, or its decoder."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return _decoder(dataset) or dataset


class DistillationMixin:
    """The distillation loss for a ``transformers.Trainer`` subclass: ``class X(DistillationMixin, SomeTrainer)``.

    Keyword args (the rest go to the trainer):
        temperature: the loss temperature; default the train dataset's ``temperature`` (1.0 if it has none). Given
            and different from the dataset's: ValueError (the dataset's targets are tempered at its temperature).
        alpha, kind, tail, beta: options of ``softcache.kernels.sparse_kl_loss``
            (loss per counted row = alpha T^2 D + (1 - alpha) CE).
        fused: True, False or "auto" (see :class:`~softcache.integrations.loss.DistillationLoss`).
        vocab_size: the cache's vocabulary size, for datasets without ``check_student`` (e.g. a
            ``datasets.Dataset``) and a student padded larger; SoftTargetDataset provides it.
    """

    def __init__(self, *args, temperature=None, alpha=1.0, kind="forward_kl", tail="bucket", beta=0.5, fused="auto",
                 vocab_size=None, **kwargs):  # fmt: skip
        if kwargs.get("data_collator") is None:
            kwargs["data_collator"] = collate
        super().__init__(*args, **kwargs)
        if self.args.n_gpu > 1:
            raise ValueError(
                f"{type(self).__name__} does not support DataParallel over {self.args.n_gpu} GPUs in one process; "
                "run one process per GPU with torchrun (DistributedDataParallel)"
            )
        evals = self.eval_dataset.values() if isinstance(self.eval_dataset, dict) else [self.eval_dataset]
        datasets = [_source(ds) for ds in (self.train_dataset, *evals) if ds is not None]
        self.distillation = DistillationLoss.for_datasets(
            self.accelerator.unwrap_model(self.model), datasets, temperature=temperature, vocab_size=vocab_size,
            alpha=alpha, kind=kind, tail=tail, beta=beta, fused=fused,
        )  # fmt: skip
        # compute_loss normalises by num_items_in_batch, so the Trainer must pass it and not rescale the loss.
        self.model_accepts_loss_kwargs = True
        self._terms: dict[str, torch.Tensor] = {}
        self._terms_since_step = 0

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            super()._set_signature_columns_if_needed()
            self._signature_columns += [c for c in TARGET_COLUMNS if c not in self._signature_columns]

    def _remove_unused_columns(self, dataset, description=None):
        if _decoder(dataset) is not None:  # items are decoded from its index column; collate keeps only their keys
            return dataset
        return super()._remove_unused_columns(dataset, description)

    def _across_ranks(self) -> bool:
        return bool(self.args.average_tokens_across_devices) and self.args.world_size > 1

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The next micro-batches of an optimizer step, and the rows the loss counts in all of them (all ranks)."""
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not batch_samples:
            return batch_samples, None
        count = sum(self.distillation.count(batch).to(device) for batch in batch_samples)
        if self._across_ranks():
            count = self.accelerator.gather(count.reshape(1)).sum()
        return batch_samples, count

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The distillation loss; in training its row sum over ``num_items_in_batch`` (from get_batch_samples)."""
        if not model.training:  # evaluation: a per-batch mean (the Trainer's own label count would not match)
            num_items_in_batch = None
        inner = self.accelerator.unwrap_model(model)
        loss, terms, outputs = self.distillation(inner, inputs, num_items_in_batch=num_items_in_batch, forward=model,
                                                 with_terms=model.training)  # fmt: skip
        if num_items_in_batch is not None and self._across_ranks():
            loss = loss * self.accelerator.num_processes  # DDP averages gradients over ranks; the count spans them
            terms = {name: value * self.accelerator.num_processes for name, value in terms.items()}
        if model.training:
            if terms and not self._terms:
                self._terms_since_step = self.state.global_step  # the optimizer steps done before these terms
            for name, value in terms.items():
                self._terms[name] = self._terms.get(name, 0.0) + value
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, *args, **kwargs):
        """Adds ``soft_loss`` and ``hard_loss``, averaged over the steps since the last log, to training logs."""
        if "loss" in logs and self._terms:
            steps = max(self.state.global_step - self._terms_since_step, 1)
            for name, value in self._terms.items():
                logs[name] = self.accelerator.gather(value.reshape(1)).mean().item() / steps
            self._terms = {}
        return super().log(logs, *args, **kwargs)


class DistillationTrainer(DistillationMixin, transformers.Trainer):
    """``transformers.Trainer`` training a student from a softcache cache; see the module docstring."""
