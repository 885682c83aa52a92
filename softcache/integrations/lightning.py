"""Distillation from a softcache cache with PyTorch Lightning.

    import lightning as L
    from softcache import SoftTargetDataset, collate
    from softcache.integrations.lightning import DistillationModule

    train = SoftTargetDataset("cache/", temperature=2.0)
    module = DistillationModule(student, dataset=train, alpha=0.5, learning_rate=1e-3)
    L.Trainer(max_steps=1000).fit(module, DataLoader(train, batch_size=8, collate_fn=collate, shuffle=True))

:class:`DistillationModule` wraps a causal LM; its ``training_step`` / ``validation_step`` compute
:class:`~softcache.integrations.loss.DistillationLoss` (the same loss as the HF integration: fused with the output
layer when the model supports it, labels shifted t -> t + 1) and log ``train_loss`` / ``val_loss`` (plus
``train_soft_loss`` and ``train_hard_loss`` with ``alpha < 1``). Subclass it to change the optimizer
(``configure_optimizers``) or to add terms (call ``self.distillation_loss(batch)``).

Each batch's loss is its own mean over counted rows; Lightning's ``accumulate_grad_batches`` and DDP then average
those means, which weights rows of short micro-batches more than one large batch would. For exact row weighting
across micro-batches use the HF integration (or pass ``num_items_in_batch`` to ``distillation_loss`` yourself).
"""

from __future__ import annotations

import lightning as L
import torch

from .loss import DistillationLoss, attach_projection
from .online import OnlineTeacher


class DistillationModule(L.LightningModule):
    """A LightningModule training ``model`` (a causal LM) on softcache batches.

    Args:
        model: the student, e.g. a transformers ``*ForCausalLM``.
        dataset: the training SoftTargetDataset (optional): gives the temperature and checks the student's
            vocabulary at construction (``dataset.check_student``); a padded-larger vocabulary is sliced in the loss.
        temperature: loss temperature; default the dataset's (1.0 without one); given and different: ValueError.
        alpha, kind, tail, beta, fused: options of :class:`~softcache.integrations.loss.DistillationLoss`.
        learning_rate, weight_decay: of the default AdamW optimizer.
        teacher: online distillation: a causal LM run under ``no_grad`` in each step, whose targets (at the loss
            temperature) replace a cache's, so batches need only tokens (collate them with
            :func:`~softcache.integrations.online.collate_inputs`). It is a frozen submodule (moved with the module,
            kept in eval mode, not optimised). ``teacher_k``, ``teacher_targets``, ``teacher_samples``, ``seed``: the
            targets it gives (:class:`~softcache.integrations.online.OnlineTeacher`).
        alpha_hidden, alpha_attention, hidden_kind, attention_kind, layer_map, projection: the feature terms for
            caches with hidden states / attention maps (:class:`~softcache.integrations.loss.DistillationLoss`);
            ``projection`` becomes a submodule of ``model`` so the optimizer trains it.
    """

    def __init__(self, model, *, dataset=None, temperature=None, alpha=1.0, kind="forward_kl", tail="bucket",
                 beta=0.5, fused="auto", learning_rate=1e-3, weight_decay=0.0, teacher=None, teacher_k=64,
                 teacher_targets="topk", teacher_samples=None, seed=0, alpha_hidden=0.0, alpha_attention=0.0,
                 hidden_kind="mse", attention_kind="mse", layer_map=None, projection=None):  # fmt: skip
        super().__init__()
        self.model = model
        self.teacher = teacher
        self.online = None
        vocab_size = None
        if teacher is not None:
            self.online = OnlineTeacher(teacher, k=teacher_k, targets=teacher_targets, samples=teacher_samples,
                                        seed=seed)  # fmt: skip
            vocab_size = self.online.check_student(model)
        self.distillation = DistillationLoss.for_datasets(model, [dataset], temperature=temperature, alpha=alpha,
                                                          kind=kind, tail=tail, beta=beta, fused=fused,
                                                          vocab_size=vocab_size, alpha_hidden=alpha_hidden,
                                                          alpha_attention=alpha_attention, hidden_kind=hidden_kind,
                                                          attention_kind=attention_kind,
                                                          layer_map=layer_map, projection=projection)  # fmt: skip
        if projection is not None:
            attach_projection(model, projection)
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay

    def distillation_loss(self, batch, num_items_in_batch=None, with_terms=True):
        """(loss, terms): the loss on ``batch`` and, with 0 < alpha < 1, its detached soft and hard terms."""
        if self.online is not None and "target_ids" not in batch:
            batch = self.online.add_targets(batch, self.distillation.temperature)
        loss, terms, _ = self.distillation(self.model, batch, num_items_in_batch=num_items_in_batch,
                                           with_terms=with_terms)  # fmt: skip
        return loss, terms

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # dropout in the teacher would make its targets random
        return self

    def training_step(self, batch, batch_idx):
        loss, terms = self.distillation_loss(batch)
        size = batch["input_ids"].shape[0]
        self.log("train_loss", loss, prog_bar=True, batch_size=size)
        for name, value in terms.items():
            self.log(f"train_{name}", value, batch_size=size)
        return loss

    def validation_step(self, batch, batch_idx):
        loss, _ = self.distillation_loss(batch, with_terms=False)
        self.log("val_loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.model.parameters(), lr=self.learning_rate, weight_decay=self.weight_decay)
