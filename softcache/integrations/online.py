"""Online (and self-) distillation with the loss of the offline path: a live teacher inside the training step.

:class:`OnlineTeacher` runs a teacher model under ``torch.no_grad`` on a batch of tokens and adds what a cache would
have given the batch: ``target_ids`` / ``target_logprobs`` at the loss temperature, from
:func:`softcache.sparse_targets` (the :class:`~softcache.sparsify.Sparsifier` a build uses, tempered by the kind's
rule, exact at that temperature), on the batch's device. The same :class:`~softcache.integrations.loss.DistillationLoss`
then trains the student (fused with its output layer), so a trainer given ``teacher=`` and one given a cache built
from that teacher over the same batches compute the same loss, up to the cache's quantisation (≤ 1/64 nat per
log-prob at T = 1).

The teacher sees the batch's ``input_ids``, ``attention_mask`` (and ``position_ids``, when packed); its targets at
padding (``attention_mask == 0``) are empty, as a collated cache batch's are. Its full logits of one batch exist once,
in its dtype, while the targets are computed from them in fp32 row chunks. Batches need no target columns:
:func:`collate_inputs` pads token items (and is :func:`softcache.collate` for items that have targets).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from softcache.data import collate
from softcache.sparsify import sparse_targets


def _vocab_size(model) -> int:
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    weight = getattr(head, "weight", None)
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) else int(model.config.vocab_size)


@dataclass
class OnlineTeacher:
    """A frozen teacher that gives a batch the targets a cache would.

    Attributes:
        model: the teacher, a causal LM (put in eval mode, its parameters frozen).
        k, targets, samples: as a cache's: ``targets="topk"`` keeps the ``k`` largest logits, ``"sampled"`` draws
            ``samples`` tokens (``k`` ≥ ``samples``) from a stream seeded by (``seed``, call, sequence), so each step
            draws afresh, reproducibly.
        seed: seed of the sampled draws.
    """

    model: torch.nn.Module
    k: int = 64
    targets: str = "topk"
    samples: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.model, torch.nn.Module) or not callable(getattr(self.model, "forward", None)):
            raise ValueError(f"teacher must be a causal LM (a torch module), got {type(self.model).__name__}")
        self.model.eval()
        self.model.requires_grad_(False)
        self.vocab_size = _vocab_size(self.model)
        self.calls = 0

    def check_student(self, student) -> int | None:
        """The ``vocab_size`` the loss needs for ``student``: None when its vocabulary is the teacher's, the
        teacher's when the student's is padded larger; a smaller one is a ValueError."""
        own = _vocab_size(student)
        if own < self.vocab_size:
            raise ValueError(
                f"the student has {own} logits but the teacher {self.vocab_size}: the teacher's targets may name ids "
                "the student cannot predict; distil between models with the same vocabulary"
            )
        return self.vocab_size if own > self.vocab_size else None

    @torch.no_grad()
    def add_targets(self, batch: dict, temperature: float) -> dict:
        """``batch`` with ``target_ids`` (B, T, k) int32 and ``target_logprobs`` (B, T, k) float32 at ``temperature``
        on its device (a new dict; the batch's own targets, if any, are replaced)."""
        input_ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        device = next(self.model.parameters()).device
        inputs = {"input_ids": input_ids.to(device), "use_cache": False}
        if mask is not None:
            inputs["attention_mask"] = mask.to(device)
        if batch.get("position_ids") is not None:
            inputs["position_ids"] = batch["position_ids"].to(device)
        if self.model.training:  # e.g. Lightning's train() reached it: dropout would make the targets random
            self.model.eval()
        logits = self.model(**inputs).logits
        seed = int(np.random.SeedSequence([self.seed, self.calls]).generate_state(1, np.uint64)[0] >> 1)
        self.calls += 1
        ids, logprobs = sparse_targets(logits, k=self.k, temperature=temperature, kind=self.targets,
                                       samples=self.samples, seed=seed)  # fmt: skip
        del logits
        if mask is not None:  # padding holds no targets, as in a collated cache batch
            pad = mask.to(ids.device) == 0
            ids = ids.masked_fill(pad[..., None], -1)
            logprobs = logprobs.masked_fill(pad[..., None], 0.0)
        return {**batch, "target_ids": ids.to(input_ids.device), "target_logprobs": logprobs.to(input_ids.device)}


_PAD = {"input_ids": 0, "attention_mask": 0, "labels": -100, "position_ids": 0}


def collate_inputs(items) -> dict[str, torch.Tensor]:
    """Pads token items (``input_ids``; ``attention_mask``, ``labels`` and ``position_ids`` optional, defaulting to
    ones and input_ids) on the right, as :func:`softcache.collate` does; items with targets go to it."""
    if len(items) and "target_ids" in items[0]:
        return collate(items)
    if not len(items):
        raise ValueError("collate_inputs got no items")
    rows = [{key: torch.as_tensor(np.asarray(item[key])).long() for key in _PAD if item.get(key) is not None}
            for item in items]  # fmt: skip
    for row in rows:
        row.setdefault("attention_mask", torch.ones_like(row["input_ids"]))
        row.setdefault("labels", row["input_ids"].clone())
    width = max(len(row["input_ids"]) for row in rows)
    keys = [key for key in _PAD if key in rows[0]]
    out = {key: torch.full((len(rows), width), _PAD[key], dtype=torch.long) for key in keys}
    for r, row in enumerate(rows):
        for key in keys:
            out[key][r, : len(row[key])] = row[key]
    return out
