"""Feature distillation losses: hidden states (DistilBERT's cosine, TinyBERT's MSE) and attention maps (TinyBERT).

Plain PyTorch: next to the vocabulary loss they are cheap. Positions are weighted by ``mask`` (B, L) (1 = a real
token; padding 0); every loss is a mean over the real positions, so padding never counts.

* ``hidden_state_loss(s, t, kind="mse")``: ``s`` (B, L, Hs) the student's hidden states, mapped by ``projection`` (a
  module, e.g. TinyBERT's learned ``W_h``: ``nn.Linear(Hs, Ht, bias=False)``) when the widths differ; ``t`` (B, L, Ht)
  the teacher's. ``mse``: mean over real positions of the mean over features of ``(s − t)²`` (TinyBERT).
  ``cosine``: mean over real positions of ``1 − cos(s, t)`` (DistilBERT's ``CosineEmbeddingLoss`` with target 1).
* ``attention_loss(s, t)``: ``s``, ``t`` (B, heads, L, L) attention probabilities of one layer each (same number of
  heads, as TinyBERT requires). Mean over heads and real query positions of the mean over real key positions of
  ``(s − t)²``.
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


def attention_loss(student: torch.Tensor, teacher: torch.Tensor, *, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The attention-map loss of one layer pair (see the module docstring)."""
    if student.shape != teacher.shape:
        raise ValueError(f"student attentions {tuple(student.shape)} and the teacher's {tuple(teacher.shape)} differ")
    s, t = student.float(), teacher.to(student.device).float()
    b, heads, n, _ = s.shape
    w = _weights(mask, (b, n), s.device)
    keys = w.sum(-1).clamp_min(1.0)  # real key positions per sequence
    per_query = ((s - t).pow(2) * w[:, None, None, :]).sum(-1) / keys[:, None, None]  # (B, heads, L)
    weight = w[:, None, :].expand(b, heads, n)
    return (per_query * weight).sum() / weight.sum().clamp_min(1.0)


def uniform_layer_map(student_layers: int, teacher_layers: int) -> dict[int, int]:
    """``{m: m · teacher_layers // student_layers}`` for m = 0 … student_layers (0 = the embeddings)."""
    counts = (student_layers, teacher_layers)
    if not all(isinstance(n, int) for n in counts) or not 0 < student_layers <= teacher_layers:
        raise ValueError(f"need 0 < student_layers ≤ teacher_layers, got {student_layers} and {teacher_layers}")
    return {m: m * teacher_layers // student_layers for m in range(student_layers + 1)}
