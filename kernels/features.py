"""Feature distillation losses: hidden states (DistilBERT's cosine, TinyBERT's MSE) and attention maps (TinyBERT).

Plain PyTorch: next to the vocabulary loss they are cheap. Positions are weighted by ``mask`` (B, L) (1 = a real
token; padding 0); every loss is a mean over the real positions, so padding never counts.

* ``hidden_state_loss(s, t, kind="mse")``: ``s`` (B, L, Hs) the student's hidden states, mapped by ``projection`` (a
  module, e.g. TinyBERT's learned ``W_h``: ``nn.Linear(Hs, Ht, bias=False)``) when the widths differ; ``t`` (B, L, Ht)
  the teacher's. ``mse``: mean over real positions of the mean over features of ``(s − t)²`` (TinyBERT).
  ``cosine``: mean over real positions of ``1 − cos(s, t)`` (DistilBERT's ``CosineEmbeddingLoss`` with target 1).
* ``attention_loss(s, t, kind="mse")``: ``s``, ``t`` (B, heads, L, L) attention probabilities of one layer each (same
  number of heads, as TinyBERT requires), e.g. ``output_attentions=True``. A mean over heads and real query positions
  of a per-row loss over the real key positions. ``mse``: the mean of ``(s − t)²`` (TinyBERT's loss, on probabilities
  rather than its pre-softmax scores, which Hugging Face models do not return). ``kl``: ``KL(t ‖ s) = Σ_j t_j (log t_j −
  log s_j)`` (MiniLM's self-attention distribution transfer), both clamped at ``eps`` inside the logs so that keys of
  probability 0 (causally masked or padded) give finite values and gradients. For ``kl`` each teacher row is first
  renormalised to sum to 1 over the real keys: cached maps are stored in bf16, and a sequence truncated by
  ``max_length`` loses the keys past it (a bidirectional teacher's rows then sum to less than 1); the student's rows
  are used as they are.
* ``uniform_layer_map(student_layers, teacher_layers)``: TinyBERT's ``g(m) = m · teacher_layers / student_layers``
  for m = 0 (embeddings) … student_layers, as ``{student index: teacher index}`` of ``output_hidden_states``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _weights(mask: torch.Tensor | None, shape: tuple[int, int], device) -> torch.Tensor:
    if mask is None:
        return torch.ones(shape, device=device)
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"mask must have shape {tuple(shape)} (batch, positions), got {tuple(mask.shape)}")
    return mask.to(device=device, dtype=torch.float32)


def hidden_state_loss(student: torch.Tensor, teacher: torch.Tensor, *, kind: str = "mse", projection=None,
                      mask: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """The hidden-state loss of one layer pair (see the module docstring)."""
    if projection is not None:
        student = projection(student)
    if student.shape != teacher.shape:
        raise ValueError(
            f"student hidden states {tuple(student.shape)} and the teacher's {tuple(teacher.shape)} differ; give a "
            "projection (e.g. torch.nn.Linear(student width, teacher width, bias=False)) when the widths differ"
        )
    s, t = student.float(), teacher.to(student.device).float()
    w = _weights(mask, s.shape[:2], s.device)
    if kind == "mse":
        per_position = (s - t).pow(2).mean(-1)
    elif kind == "cosine":
        per_position = 1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)
    else:
        raise ValueError(f"kind must be 'mse' or 'cosine', got {kind!r}")
    return (per_position * w).sum() / w.sum().clamp_min(1.0)


ATTENTION_KINDS = ("mse", "kl")


def attention_loss(student: torch.Tensor, teacher: torch.Tensor, *, kind: str = "mse", mask: torch.Tensor | None = None,
                   eps: float = 1e-12) -> torch.Tensor:  # fmt: skip
    """The attention-map loss of one layer pair (see the module docstring); float64 inputs are computed in float64."""
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"kind must be one of {ATTENTION_KINDS}, got {kind!r}")
    if student.shape != teacher.shape:
        raise ValueError(f"student attentions {tuple(student.shape)} and the teacher's {tuple(teacher.shape)} differ")
    dtype = torch.promote_types(student.dtype, torch.float32)
    s, t = student.to(dtype), teacher.to(device=student.device, dtype=dtype)
    b, heads, n, _ = s.shape
    w = _weights(mask, (b, n), s.device).to(dtype)
    real_keys = w[:, None, None, :]
    if kind == "mse":
        keys = w.sum(-1).clamp_min(1.0)  # real key positions per sequence
        per_query = ((s - t).pow(2) * real_keys).sum(-1) / keys[:, None, None]  # (B, heads, L)
    else:
        t = t * real_keys
        t = t / t.sum(-1, keepdim=True).clamp_min(eps)  # each row a distribution over the real keys
        log_ratio = t.clamp_min(eps).log() - s.clamp_min(eps).log()
        per_query = (t * log_ratio).sum(-1)  # (B, heads, L); keys with t = 0 (padding among them) add 0
    weight = w[:, None, :].expand(b, heads, n)
    return (per_query * weight).sum() / weight.sum().clamp_min(1.0)


def uniform_layer_map(student_layers: int, teacher_layers: int) -> dict[int, int]:
    """``{m: m · teacher_layers // student_layers}`` for m = 0 … student_layers (0 = the embeddings)."""
    counts = (student_layers, teacher_layers)
    if not all(isinstance(n, int) for n in counts) or not 0 < student_layers <= teacher_layers:
        raise ValueError(f"need 0 < student_layers ≤ teacher_layers, got {student_layers} and {teacher_layers}")
    return {m: m * teacher_layers // student_layers for m in range(student_layers + 1)}
