"""PyTorch implementation of the fused output layer + sparse distillation loss (``backend="torch"``, CPU).

Rows are processed in chunks of ``CHUNK_ELEMENTS // V``: each chunk's logits ``h W^T + b`` are computed, handed to
the row math of ``sparse_kl_torch`` (which writes their gradient over them in place), and that gradient is
consumed at once into dH (rows of the chunk) and fp32 accumulators of dW and db. So at most one chunk x V of logits
(plus the few chunk x V float32 temporaries of the row math) exists at any time.
"""

from __future__ import annotations

import torch

from . import sparse_kl_torch
from ._common import LossConfig, counted_rows


def fused_linear_torch(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target_ids: torch.Tensor,
    target_logprobs: torch.Tensor,
    labels: torch.Tensor | None,
    scale: torch.Tensor,
    cfg: LossConfig,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor, tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]]:
    """Per-row losses (N,) float32 and the gradients (dH, dW, db) of ``sum_n scale_n * loss_n`` where ``needs``.

    ``scale`` is (1,) or (N,) (per-row factors: 1/denominator for 'mean', times grad_output when recomputing).
    """
    n = hidden.shape[0]
    vocab = weight.shape[0]
    need_dh, need_dw, need_db = needs
    want_grad = need_dh or need_dw or need_db
    acc_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
    dh = torch.empty_like(hidden) if need_dh else None
    dw = torch.zeros_like(weight, dtype=acc_dtype) if need_dw else None
    db = torch.zeros(vocab, dtype=acc_dtype, device=hidden.device) if need_db else None
    chunk = max(1, min(n, sparse_kl_torch.CHUNK_ELEMENTS // vocab))
    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        h = hidden[r0:r1]
        z = torch.addmm(bias, h, weight.t()) if bias is not None else h @ weight.t()
        sc = scale if scale.numel() == 1 else scale[r0:r1]
        lab = labels[r0:r1] if labels is not None else None
        grad = z if want_grad else None  # the row math overwrites the logits with their gradient
        losses[r0:r1] = sparse_kl_torch.sparse_kl_forward_torch(
            z, target_ids[r0:r1], target_logprobs[r0:r1], lab, sc, cfg, grad
        )
        if not want_grad:
            continue
        if need_dh:
            dh[r0:r1] = grad @ weight
        if need_dw:
            # the gradient rows of rows that do not count are 0, but their hidden states may be NaN: 0 * nan = nan
            live = counted_rows(vocab, target_ids[r0:r1], lab, cfg.ignore_index)
            dw.addmm_(grad.t().to(acc_dtype), h.masked_fill(~live[:, None], 0.0).to(acc_dtype))
        if need_db:
            db += grad.sum(0, dtype=acc_dtype)
    return losses, (
        dh,
        dw.to(weight.dtype) if dw is not None else None,
        db.to(bias.dtype) if db is not None else None,
    )
