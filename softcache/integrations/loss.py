"""The distillation loss of a causal LM on a softcache batch, shared by the trainer integrations.

A batch is what :func:`softcache.collate` returns: ``input_ids``, ``attention_mask``, ``labels`` (HF convention,
unshifted; optional) and ``target_ids`` / ``target_logprobs`` at the loss temperature, position t holding the
teacher's distribution of token t + 1. The labels are shifted here to the token each position predicts, so the
last position and ignored tokens do not count. A row (position) counts when its shifted label is not
``ignore_index`` (if the batch has labels) and it has at least one target id: :meth:`DistillationLoss.count`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from softcache.kernels import counted_rows, fused_linear_sparse_kl_loss, sparse_kl_loss
from softcache.kernels.hf import final_hidden_states, output_layer, shift_labels


def supports_fused(model) -> bool:
    """True when ``model`` is a causal LM whose loss can be fused with its output layer (no (B, T, V) logits)."""
    if not all(callable(getattr(model, name, None)) for name in ("get_decoder", "get_output_embeddings")):
        return False
    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return False
    try:
        output_layer(model)
    except ValueError:  # soft-capped or unusual output layer: the logits path handles it
        return False
    return True


@dataclass
class DistillationLoss:
    """Sparse KL of a causal LM against a softcache batch: ``loss, terms = DistillationLoss(...)(model, batch)``.

    Attributes:
        temperature, alpha, kind, tail, beta, ignore_index: options of ``softcache.kernels.sparse_kl_loss``; the
            batch's target_logprobs must already be at ``temperature`` (SoftTargetDataset tempers them).
        fused: True (the loss from the final hidden states and the output layer, no (B, T, V) logits), False (the
            model's logits and ``sparse_kl_loss``) or "auto" (fused when :func:`supports_fused`).
        vocab_size: the cache's vocabulary size when the student's is padded larger: the extra logits (output
            rows) are left out of the loss, as if the student's vocabulary were the cache's.
    """

    temperature: float = 1.0
    alpha: float = 1.0
    kind: str = "forward_kl"
    tail: str = "bucket"
    beta: float = 0.5
    ignore_index: int = -100
    fused: bool | str = "auto"
    vocab_size: int | None = None

    def __post_init__(self):
        if self.fused not in (True, False, "auto"):
            raise ValueError(f"fused must be True, False or 'auto', got {self.fused!r}")

    @classmethod
    def for_datasets(cls, model, datasets, *, temperature=None, vocab_size=None, **options) -> DistillationLoss:
        """The loss for training ``model`` on ``datasets`` (train and eval; ``None`` entries are skipped).

        The temperature is the datasets' (they temper the targets): ``temperature`` given and different is a
        ValueError, and so are datasets at different temperatures; without either it is 1.0. Datasets with
        ``check_student`` (SoftTargetDataset, the ``softcache.to_hf_dataset`` decoder) check ``model``'s vocabulary;
        a student padded larger gets ``vocab_size`` = the cache's, so its extra logits are left out. ``vocab_size``
        given: the cache's size, for datasets that cannot tell it; it must agree with theirs.
        """
        datasets = [ds for ds in datasets if ds is not None]
        own = {float(ds.temperature) for ds in datasets if getattr(ds, "temperature", None) is not None}
        if len(own) > 1:
            raise ValueError(
                f"the train and eval datasets have different temperatures {sorted(own)}; their targets must be at "
                "the loss temperature, so build them with the same temperature="
            )
        own = own.pop() if own else None
        if temperature is not None and own is not None and abs(float(temperature) - own) > 1e-6 * own:
            raise ValueError(
                f"temperature={temperature} but the dataset's targets are at temperature {own}; the dataset tempers "
                f"them, so build it with SoftTargetDataset(..., temperature={temperature}) or leave temperature unset"
            )
        temperature = float(temperature if temperature is not None else own if own is not None else 1.0)
        for ds in datasets:
            if callable(getattr(ds, "check_student", None)):
                extra = ds.check_student(model)
                if vocab_size is not None and int(vocab_size) != ds.vocab_size:
                    raise ValueError(
                        f"vocab_size={vocab_size} but the dataset's cache has vocab_size={ds.vocab_size}; leave "
                        "vocab_size unset, the dataset gives it"
                    )
                vocab_size = ds.vocab_size if extra else None
        return cls(temperature=temperature, vocab_size=vocab_size, **options)

    def shifted_labels(self, batch) -> torch.Tensor | None:
        """The label each position predicts (labels[t + 1]), or None when the batch has no labels."""
        labels = batch.get("labels")
        return None if labels is None else shift_labels(labels, self.ignore_index)

    def count(self, batch) -> torch.Tensor:
        """How many rows of ``batch`` count in the loss (an int64 scalar tensor on the batch's device)."""
        ids = batch["target_ids"]
        vocab = self.vocab_size if self.vocab_size is not None else torch.iinfo(ids.dtype).max
        return counted_rows(vocab, ids, self.shifted_labels(batch), self.ignore_index).sum()

    def __call__(self, model, batch, *, num_items_in_batch=None, forward=None, with_terms=True):
        """The loss of ``model`` on ``batch``.

        Args:
            model: the (unwrapped) causal LM.
            batch: dict of tensors as from :func:`softcache.collate`.
            num_items_in_batch: denominator of the mean (rows counted over all micro-batches of an accumulated
                step, and over all ranks); default: the rows counted in this batch.
            forward: the callable that runs the model, e.g. its ``DistributedDataParallel`` wrapper; default model.
            with_terms: compute the soft and hard terms (with 0 < alpha < 1).

        Returns:
            (loss, terms, outputs): the scalar loss; ``terms`` = detached ``soft_loss`` (alpha-free T^2 D term) and
            ``hard_loss`` (cross-entropy) with the same denominator, so that ``loss = alpha * soft + (1 - alpha) *
            hard``, only when 0 < alpha < 1 (costs one more gradient-free loss pass); the model's outputs.
        """
        fused = supports_fused(model) if self.fused == "auto" else self.fused
        labels = self.shifted_labels(batch)
        options = dict(temperature=self.temperature, kind=self.kind, tail=self.tail, beta=self.beta, labels=labels,
                       ignore_index=self.ignore_index, num_items_in_batch=num_items_in_batch)  # fmt: skip
        ids, logprobs, mask = batch["target_ids"], batch["target_logprobs"], batch.get("attention_mask")
        if fused:
            hidden, weight, bias, outputs = final_hidden_states(
                model, batch["input_ids"], attention_mask=mask, forward=forward
            )
            if self.vocab_size is not None:
                weight, bias = weight[: self.vocab_size], None if bias is None else bias[: self.vocab_size]
            loss_of = lambda a, h, w, b: fused_linear_sparse_kl_loss(h, w, ids, logprobs, b, alpha=a, **options)
            args = (hidden, weight, bias)
        else:
            outputs = (forward or model)(input_ids=batch["input_ids"], attention_mask=mask, use_cache=False)
            logits = outputs.logits if self.vocab_size is None else outputs.logits[..., : self.vocab_size]
            loss_of = lambda a, z: sparse_kl_loss(z, ids, logprobs, alpha=a, **options)
            args = (logits,)
        loss = loss_of(self.alpha, *args)
        terms = {}
        if with_terms and 0.0 < self.alpha < 1.0:
            with torch.no_grad():
                hard = loss_of(0.0, *(a.detach() if a is not None else None for a in args))
            total = loss.detach()
            terms = {"soft_loss": (total - (1.0 - self.alpha) * hard) / self.alpha, "hard_loss": hard}
        return loss, terms, outputs
