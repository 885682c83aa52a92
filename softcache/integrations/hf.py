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
  is an error, a larger (padded) one is sliced to the cache's in the loss; the trainer's ``processing_class`` (or
  ``tokenizer=``) must have the vocabulary the cache was built with (its recorded fingerprint), else a ValueError;
- gradient accumulation is exact: ``num_items_in_batch`` is the number of rows the loss counts (shifted label not
  -100 and at least one target id) over all micro-batches of the step (and all ranks, with the default
  ``average_tokens_across_devices=True``), each micro-batch's loss is its row sum over that number, and the
  Trainer does not divide it again; DDP's gradient mean is undone as the Trainer does for its own losses.
  So two micro-batches of 2 give exactly the gradient of one batch of 4.

Online distillation: ``DistillationTrainer(model=student, teacher=teacher, train_dataset=tokens, temperature=2.0)`` runs
``teacher`` under ``no_grad`` in each step and gives each batch the targets a cache of it would hold
(:class:`~softcache.integrations.online.OnlineTeacher`); the loss, the row count and everything else are as above.

Datasets: a :class:`~softcache.SoftTargetDataset` (also inside ``torch.utils.data.Subset``), a
``softcache.to_hf_dataset`` (its ``index`` column is kept), or any dataset of such items (a ``datasets.Dataset`` built
from them: pass ``temperature=`` and, for a padded student, ``vocab_size=``). Under ``torchrun`` give the Trainer a
map-style dataset, which it shards with a ``DistributedSampler``, or a ``StreamingSoftTargetDataset``: then every rank
reads the stream (same seed, same order) and keeps every ``world_size``-th batch (accelerate's
``dispatch_batches=False``, which the trainer sets; its default, rank 0 reading and broadcasting, fails on padded
batches of different lengths), so each sequence is trained on by one rank, at the cost of every rank decoding all.
Bound the run with ``max_steps`` (an iterable dataset has no length).

Evaluation (``trainer.evaluate()``) reports ``eval_loss``, the same loss averaged over evaluation batches. With
``compute_metrics`` on the fused path, the model's outputs hold only the last position's logits; pass
``fused=False`` if metrics need all logits. One process with several GPUs (``DataParallel``) is not supported: use
``torchrun``.

TRL: the loss lives in :class:`DistillationMixin`, so it combines with any ``Trainer`` subclass. TRL's SFTTrainer
takes only ``datasets`` datasets; ``softcache.to_hf_dataset`` gives one (tried with trl 1.16: bf16 autocast, logs) ::

    from trl import SFTConfig, SFTTrainer

    class DistillSFTTrainer(DistillationMixin, SFTTrainer):
        pass

    train = softcache.to_hf_dataset("cache/", temperature=2.0)
    trainer = DistillSFTTrainer(model=student, args=SFTConfig(..., dataset_kwargs={"skip_prepare_dataset": True}),
                                train_dataset=train, processing_class=tokenizer, alpha=0.5)

``skip_prepare_dataset`` keeps SFTTrainer from re-tokenising the cache's sequences; the data collator defaults to
``softcache.collate`` as above, and the loss replaces SFTTrainer's (its token-accuracy metrics are not logged).
"""

from __future__ import annotations

import torch
import transformers
from torch.utils.data import IterableDataset, Subset

from softcache.data import StreamingSoftTargetDataset, collate

from .loss import DistillationLoss, attach_projection
from .online import OnlineTeacher, collate_inputs

TARGET_COLUMNS = ("target_ids", "target_logprobs", "teacher_hidden", "teacher_attentions")


def _decoder(dataset):
    """The decoding transform of a ``softcache.to_hf_dataset`` (it knows the cache), or None."""
    transform = (getattr(dataset, "format", None) or {}).get("format_kwargs", {}).get("transform")
    return transform if callable(getattr(transform, "check_student", None)) else None


def _deal_iterable(trainer) -> None:
    """Under torchrun, an iterable train dataset is read by every rank and its batches dealt to the ranks.

    accelerate's default for iterable datasets (``dispatch_batches``: rank 0 reads, then broadcasts) fails on batches
    of different lengths, which padded batches are; with ``dispatch_batches=False`` each rank reads the dataset and
    keeps every ``world_size``-th batch (accelerate's ``IterableDatasetShard``, which also evens out the last batches so
    that no rank waits for the others). A ``StreamingSoftTargetDataset`` then reads the whole stream in every rank
    instead of sharding itself by rank (which would shard it twice and lose sequences)."""
    train = trainer.train_dataset
    if not isinstance(train, IterableDataset) or trainer.args.world_size <= 1:
        return
    if trainer.args.accelerator_config.dispatch_batches:
        raise ValueError(
            "accelerator_config dispatch_batches=True reads the iterable train dataset on rank 0 and broadcasts its "
            "batches, which fails on padded batches of different lengths; leave dispatch_batches unset (or False): "
            f"{type(trainer).__name__} then deals the batches each rank reads"
        )
    trainer.accelerator.dataloader_config.dispatch_batches = False
    if isinstance(train, StreamingSoftTargetDataset):
        if train.world_size is not None and train.world_size > 1:
            raise ValueError(
                f"the StreamingSoftTargetDataset was given rank={train.rank}, world_size={train.world_size}, but under "
                f"{type(trainer).__name__} accelerate deals its batches to the ranks; leave rank and world_size unset"
            )
        train.rank, train.world_size = 0, 1  # every rank reads the same stream; accelerate keeps its share


def _source(dataset):
    """What knows the cache's temperature and vocabulary: the dataset under ``Subset`` wrappers, or its decoder."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return _decoder(dataset) or dataset


def _tokenizer(trainer):
    """The student's tokenizer the trainer was given (``processing_class``, or ``tokenizer=`` in older
    transformers; a processor's own tokenizer), or None."""
    given = getattr(trainer, "processing_class", None) or getattr(trainer, "tokenizer", None)
    if given is not None and not callable(getattr(given, "get_vocab", None)):
        given = getattr(given, "tokenizer", None)  # a multimodal processor wraps the tokenizer
    return given if callable(getattr(given, "get_vocab", None)) else None


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
        teacher: online distillation: a causal LM run under ``no_grad`` in each step, whose targets (at the loss
            temperature, default 1.0) replace a cache's; the datasets then need only tokens, and the default collator
            is :func:`~softcache.integrations.online.collate_inputs`. ``teacher_k``, ``teacher_targets``,
            ``teacher_samples``: the targets it gives, as a cache's ``k``, ``targets``, ``samples``
            (:class:`~softcache.integrations.online.OnlineTeacher`).
        alpha_hidden, alpha_attention, hidden_kind, attention_kind, layer_map, projection: the feature terms for
            caches with hidden states / attention maps (see :class:`~softcache.integrations.loss.DistillationLoss`);
            ``projection`` is attached to the model (``distillation_projection``) so the optimizer trains it. Logged
            as ``hidden_loss`` / ``attention_loss``.
        causal: False trains a masked LM without the label shift (masked-LM caches, ``--objective mlm``); default:
            from the datasets (give it for datasets that cannot tell, e.g. ``to_hf_dataset(..., decoded=True)``).
    """

    def __init__(self, *args, temperature=None, alpha=1.0, kind="forward_kl", tail="bucket", beta=0.5, fused="auto",
                 vocab_size=None, teacher=None, teacher_k=64, teacher_targets="topk", teacher_samples=None,
                 alpha_hidden=0.0, alpha_attention=0.0, hidden_kind="mse", attention_kind="mse", layer_map=None,
                 projection=None, causal=None, **kwargs):  # fmt: skip
        if kwargs.get("data_collator") is None:
            kwargs["data_collator"] = collate if teacher is None else collate_inputs
        super().__init__(*args, **kwargs)
        self.teacher = None
        if teacher is not None:
            self.teacher = OnlineTeacher(teacher, k=teacher_k, targets=teacher_targets, samples=teacher_samples,
                                         seed=self.args.seed)  # fmt: skip
            if getattr(teacher, "hf_device_map", None) is None:  # a teacher spread over devices stays where it is
                teacher.to(self.args.device)
            if vocab_size is None:
                vocab_size = self.teacher.check_student(self.accelerator.unwrap_model(self.model))
        if self.args.n_gpu > 1:
            raise ValueError(
                f"{type(self).__name__} does not support DataParallel over {self.args.n_gpu} GPUs in one process; "
                "run one process per GPU with torchrun (DistributedDataParallel)"
            )
        _deal_iterable(self)
        evals = self.eval_dataset.values() if isinstance(self.eval_dataset, dict) else [self.eval_dataset]
        datasets = [_source(ds) for ds in (self.train_dataset, *evals) if ds is not None]
        self.distillation = DistillationLoss.for_datasets(
            self.accelerator.unwrap_model(self.model), datasets, temperature=temperature, vocab_size=vocab_size,
            tokenizer=_tokenizer(self), alpha=alpha, kind=kind, tail=tail, beta=beta, fused=fused,
            alpha_hidden=alpha_hidden, alpha_attention=alpha_attention, hidden_kind=hidden_kind,
            attention_kind=attention_kind, layer_map=layer_map, projection=projection,
            **({} if causal is None else {"causal": causal}),
        )  # fmt: skip
        if projection is not None:
            attach_projection(self.accelerator.unwrap_model(self.model), projection, self.args.device)
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
        if self.teacher is not None:  # online: the teacher's targets, before the count that needs them
            for i, batch in enumerate(batch_samples):
                batch_samples[i] = self.teacher.add_targets(batch, self.distillation.temperature)
        count = sum(self.distillation.count(batch).to(device) for batch in batch_samples)
        if self._across_ranks():
            count = self.accelerator.gather(count.reshape(1)).sum()
        return batch_samples, count

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The distillation loss; in training its row sum over ``num_items_in_batch`` (from get_batch_samples)."""
        if not model.training:  # evaluation: a per-batch mean (the Trainer's own label count would not match)
            num_items_in_batch = None
        if self.teacher is not None and "target_ids" not in inputs:  # (training batches got them in get_batch_samples)
            inputs = self.teacher.add_targets(inputs, self.distillation.temperature)
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
