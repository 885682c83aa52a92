"""The distillation loss of a causal LM on a softcache batch, shared by the trainer integrations.

A batch is what :func:`softcache.collate` returns: ``input_ids``, ``attention_mask``, ``labels`` (HF convention,
unshifted; optional) and ``target_ids`` / ``target_logprobs`` at the loss temperature, position t holding the
teacher's distribution of token t + 1. The labels are shifted here to the token each position predicts, so the
last position and ignored tokens do not count. A row (position) counts when its shifted label is not
``ignore_index`` (if the batch has labels) and it has at least one target id: :meth:`DistillationLoss.count`.
Masked-LM caches (``softcache build --objective mlm``) are the exception: their labels and targets are aligned with the
input positions, so ``causal=False`` (chosen by :meth:`DistillationLoss.for_datasets`) shifts nothing.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from softcache.kernels import (
    attention_loss,
    counted_rows,
    fused_linear_sparse_kl_loss,
    hidden_state_loss,
    sparse_kl_loss,
)
from softcache.kernels.features import ATTENTION_KINDS
from softcache.kernels.hf import final_hidden_states, output_layer, shift_labels


def attach_projection(model, projection: torch.nn.Module, device=None) -> None:
    """Make ``projection`` a submodule of ``model`` (``distillation_projection``), so that the optimizer built from the
    model's parameters trains it and checkpoints save it; moved to ``device`` when given."""
    if not any(module is projection for module in model.modules()):
        model.add_module("distillation_projection", projection)
    if device is not None:
        projection.to(device)


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
        alpha_hidden, alpha_attention: weights of the feature terms, used when the batch has ``teacher_hidden`` /
            ``teacher_attentions`` (caches built with ``--hidden-states`` / ``--attentions``): the loss becomes
            ``KD + alpha_hidden · mean over layers of hidden_state_loss + alpha_attention · mean of attention_loss``.
        hidden_kind: ``mse`` (TinyBERT) or ``cosine`` (DistilBERT) for the hidden-state term.
        attention_kind: ``mse`` (TinyBERT, on probabilities) or ``kl`` (MiniLM: KL(teacher ‖ student) per query row)
            for the attention term (``softcache.kernels.attention_loss``).
        layer_map: ``{student layer: teacher layer}`` of ``output_hidden_states`` indices (attention layers use
            ``student − 1: teacher − 1``), e.g. ``softcache.kernels.uniform_layer_map``; the cache may store more
            layers than it uses. Default: every stored layer with the student's layer of the same index.
        projection: a module mapping student hidden states to the teacher's width (TinyBERT's ``W_h``) when they
            differ; it must be trained with the student (attach it to the model, which the trainers do).
        causal: False for masked-LM caches (``--objective mlm``): labels and targets are aligned with the input
            positions and not shifted, and the loss uses the model's logits (an MLM head is not fusable).
            :meth:`for_datasets` sets it from the datasets.
    Under gradient accumulation the feature terms of each micro-batch are weighted by its share of the counted rows,
    as the KD term is, so an accumulated step weighs them as one large batch would (exactly when every position
    counts).
    """

    temperature: float = 1.0
    alpha: float = 1.0
    kind: str = "forward_kl"
    tail: str = "bucket"
    beta: float = 0.5
    ignore_index: int = -100
    fused: bool | str = "auto"
    vocab_size: int | None = None
    alpha_hidden: float = 0.0
    alpha_attention: float = 0.0
    hidden_kind: str = "mse"
    attention_kind: str = "mse"
    layer_map: dict | None = None
    projection: torch.nn.Module | None = None
    causal: bool = True

    def __post_init__(self):
        if self.fused not in (True, False, "auto"):
            raise ValueError(f"fused must be True, False or 'auto', got {self.fused!r}")
        if not self.causal and self.fused is True:
            raise ValueError("fused=True is for causal LMs; a masked LM (causal=False) trains on its logits")
        if self.attention_kind not in ATTENTION_KINDS:
            raise ValueError(f"attention_kind must be one of {ATTENTION_KINDS}, got {self.attention_kind!r}")

    @classmethod
    def for_datasets(cls, model, datasets, *, temperature=None, vocab_size=None, tokenizer=None,
                     **options) -> DistillationLoss:  # fmt: skip
        """The loss for training ``model`` on ``datasets`` (train and eval; ``None`` entries are skipped).

        The temperature is the datasets' (they temper the targets): ``temperature`` given and different is a
        ValueError, and so are datasets at different temperatures; without either it is 1.0. Datasets with
        ``check_student`` (SoftTargetDataset, the ``softcache.to_hf_dataset`` decoder) check ``model``'s vocabulary;
        a student padded larger gets ``vocab_size`` = the cache's, so its extra logits are left out. ``vocab_size``
        given: the cache's size, for datasets that cannot tell it; it must agree with theirs. ``causal`` comes from the
        datasets (False for masked-LM caches); given, it must agree with theirs. ``tokenizer`` given (the
        student's): its vocabulary fingerprint must be the one the cache recorded (a different tokenizer maps the same
        ids to other tokens): ValueError otherwise.
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
        kinds = {bool(ds.causal) for ds in datasets if getattr(ds, "causal", None) is not None}
        if len(kinds) > 1:
            raise ValueError("the datasets mix causal and masked-LM (--objective mlm) caches; train on one kind")
        if kinds:
            own_causal = kinds.pop()
            if options.get("causal", own_causal) != own_causal:
                raise ValueError(
                    f"causal={options['causal']} but the dataset's cache is "
                    f"{'a causal LM cache' if own_causal else 'a masked-LM cache (--objective mlm)'}; leave it unset"
                )
            options["causal"] = own_causal
        for ds in datasets:
            if callable(getattr(ds, "check_student", None)):
                extra = ds.check_student(model, tokenizer=tokenizer)
                if vocab_size is not None and int(vocab_size) != ds.vocab_size:
                    raise ValueError(
                        f"vocab_size={vocab_size} but the dataset's cache has vocab_size={ds.vocab_size}; leave "
                        "vocab_size unset, the dataset gives it"
                    )
                vocab_size = ds.vocab_size if extra else None
        return cls(temperature=temperature, vocab_size=vocab_size, **options)

    def shifted_labels(self, batch) -> torch.Tensor | None:
        """The label each position predicts (labels[t + 1]; labels[t] when not causal), or None without labels."""
        labels = batch.get("labels")
        if labels is None or not self.causal:
            return labels
        return shift_labels(labels, self.ignore_index)

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
        fused = self.causal and (supports_fused(model) if self.fused == "auto" else self.fused)
        labels = self.shifted_labels(batch)
        options = dict(temperature=self.temperature, kind=self.kind, tail=self.tail, beta=self.beta, labels=labels,
                       ignore_index=self.ignore_index, num_items_in_batch=num_items_in_batch)  # fmt: skip
        ids, logprobs, mask = batch["target_ids"], batch["target_logprobs"], batch.get("attention_mask")
        feature_kwargs = self._feature_kwargs(batch)
        if fused:
            hidden, weight, bias, outputs = final_hidden_states(
                model, batch["input_ids"], attention_mask=mask, forward=forward, model_kwargs=feature_kwargs
            )
            if self.vocab_size is not None:
                weight, bias = weight[: self.vocab_size], None if bias is None else bias[: self.vocab_size]
            loss_of = lambda a, h, w, b: fused_linear_sparse_kl_loss(h, w, ids, logprobs, b, alpha=a, **options)
            args = (hidden, weight, bias)
        else:
            outputs = (forward or model)(input_ids=batch["input_ids"], attention_mask=mask, use_cache=False,
                                         **feature_kwargs)
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
        if feature_kwargs:
            share = 1.0 if num_items_in_batch is None else self.count(batch) / num_items_in_batch
            for name, term in self._feature_terms(batch, outputs).items():
                weight = self.alpha_hidden if name == "hidden_loss" else self.alpha_attention
                loss = loss + weight * share * term
                terms[name] = (share * term).detach()  # summed over an accumulated step: its weighted mean
        return loss, terms, outputs

    def _feature_kwargs(self, batch) -> dict:
        kwargs = {}
        if self.alpha_hidden and "teacher_hidden" in batch:
            kwargs["output_hidden_states"] = True
        if self.alpha_attention and "teacher_attentions" in batch:
            kwargs["output_attentions"] = True
        return kwargs

    def _pairs(self, stored, offset: int = 0) -> list[tuple[int, int]]:
        """(student, teacher) layer pairs: the layer map's (hidden-state indices; attention layers are those − 1)
        whose teacher layer the batch holds, or every stored layer with itself. A cache may store more layers than
        the map uses; a mapped layer it lacks is an error."""
        stored = {int(t) for t in stored}
        if self.layer_map is None:
            return [(t, t) for t in sorted(stored)]
        pairs = [(s - offset, t - offset) for s, t in self.layer_map.items() if s >= offset and t >= offset]
        missing = sorted({t for _, t in pairs} - stored)
        if missing:
            raise ValueError(
                f"layer_map {self.layer_map} needs teacher layers {missing}, which the cache does not store (it has "
                f"{sorted(stored)}); rebuild with those layers or change the map"
            )
        return pairs

    def _feature_terms(self, batch, outputs) -> dict[str, torch.Tensor]:
        """The mean hidden-state and attention losses over the layers the batch holds."""
        mask, terms = batch.get("attention_mask"), {}
        if self.alpha_hidden and "teacher_hidden" in batch:
            states = outputs.hidden_states
            stored = batch["teacher_hidden"]
            losses = [
                hidden_state_loss(states[s], stored[t], kind=self.hidden_kind, projection=self.projection, mask=mask)
                for s, t in self._pairs(stored)
            ]
            terms["hidden_loss"] = torch.stack(losses).mean()
        if self.alpha_attention and "teacher_attentions" in batch:
            maps = outputs.attentions
            if maps is None or any(a is None for a in maps):
                raise ValueError("the student returned no attention maps; load it with attn_implementation='eager'")
            stored = batch["teacher_attentions"]
            losses = [
                attention_loss(maps[s], stored[t], kind=self.attention_kind, mask=mask)
                for s, t in self._pairs(stored, 1)
            ]
            terms["attention_loss"] = torch.stack(losses).mean()
        return terms
