"""The row math of the fused output-layer loss: from a few numbers per row (log-normalisers, the logits at the
target ids and the label) to the losses and the coefficients of the gradient of the logits that the backward
kernel consumes (see ``fused_linear.py``). Shared by the fused loss and its vocab-parallel form.
"""

from __future__ import annotations

import torch

from ._backend import fused_linear_triton
from ._common import LossConfig
from .sparse_kl_torch import row_terms


def plan(cfg: LossConfig) -> tuple[bool, bool, bool]:
    """(need_s, need_z, shared): which log-normalisers the loss needs; shared = the CE reuses lse_s (T = 1)."""
    need_s = cfg.tail != 2
    shared = cfg.has_ce and need_s and cfg.temperature == 1.0
    return need_s, cfg.has_ce and not shared, shared


def extended_ids(target_ids, labels, vocab, cfg):
    """(N, K [+1]) int32 ids to gather and fix up: -1 where a slot is padding/out of range, the label last with CE."""
    ids = target_ids.long()
    ids = torch.where((ids >= 0) & (ids < vocab), ids, torch.full_like(ids, -1))
    if cfg.has_ce:
        lab = labels.long()
        ok = (lab >= 0) & (lab < vocab) & (lab != cfg.ignore_index) & (ids >= 0).any(-1)
        ids = torch.cat([ids, torch.where(ok, lab, torch.full_like(lab, -1))[:, None]], dim=1)
    return ids.to(torch.int32).contiguous()


def slot_counts(ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(N, K) float c_k: how many valid slots of the row hold id_k (1 without duplicates; O(N K log K))."""
    key = torch.where(valid, ids, torch.full_like(ids, -1))
    srt = key.sort(-1).values
    return (torch.searchsorted(srt, key, right=True) - torch.searchsorted(srt, key)).float()


def row_coefficients(zg, lse_s, lse_z, target_ids, target_logprobs, labels, vocab, scale, cfg, q_tail=None):
    """Per-row losses (N,) and the gradient coefficients: coef (N, K [+1]) at the extended ids, row (7, N) =
    (max_s, logsum_s, c_s, max_z, logsum_z, c_z, counted), where lse_* = (max, logsum) pairs from the forward kernel
    (logsumexp = max + logsum, kept apart for accuracy) and max = +inf on rows that do not count (their dense
    gradient is then exactly 0; backward reads their hidden states as 0), and cin (N, K), the coefficient of
    softmax(z / T) that replaces c_s at each target id (tail='bucket'; None for the other tails, where the two
    agree). When the loss needs no log-normaliser (tail='restrict' without CE), ``lse_s`` is still given: NaN
    log-sums mark rows with a NaN or +inf logit."""
    need_s, need_z, shared = plan(cfg)
    k = target_ids.shape[1]
    ids = target_ids.long()
    valid = (ids >= 0) & (ids < vocab)
    counted = valid.any(-1)
    if labels is not None:
        counted = counted & (labels.long() != cfg.ignore_index)
    inv_t = 1.0 / cfg.temperature
    s_k = zg[:, :k] * inv_t
    lq_k = (s_k - lse_s[0][:, None]) - lse_s[1][:, None] if need_s else None
    terms = row_terms(s_k, lq_k, target_logprobs.float(), valid, cfg, q_tail)
    d, a = terms.d, terms.a
    if not need_s and not need_z:  # no log-normaliser carries a NaN or +inf logit into the row: add it
        poison = torch.where(torch.isnan(lse_s[1]), float("nan"), 0.0)
        d, a = d + poison, a + poison[:, None]
    zero = torch.zeros_like(d)
    row = cfg.soft_weight * d
    soft = torch.where(counted, scale * (cfg.soft_weight * inv_t), zero)
    coef = torch.where(valid & counted[:, None], a * soft[:, None], torch.zeros_like(a))  # 0, not 0 * nan
    c_s = -terms.big_a * soft if need_s else zero
    cin = None
    if cfg.tail == 0:  # the support's own coefficient, formed before it meets softmax(z / T): nothing cancels
        outside = 1.0 - slot_counts(ids, valid)
        cin = -(terms.big_a_in[:, None] - terms.b[:, None] * outside) * soft[:, None]
    c_z = zero
    if cfg.has_ce:
        lab = labels.long()
        lab_ok = counted & (lab >= 0) & (lab < vocab)
        m_ce, l_ce = lse_s if shared else lse_z
        row = row + cfg.ce_weight * ((m_ce - zg[:, k]) + l_ce)
        ce_c = torch.where(lab_ok, scale * cfg.ce_weight, zero)
        coef = torch.cat([coef, -ce_c[:, None]], dim=1)
        if shared:
            c_s = c_s + ce_c
            cin = cin + ce_c[:, None] if cin is not None else None
        else:
            c_z = ce_c
    inf = torch.full_like(d, float("inf"))
    m_s, l_s = (torch.where(counted, lse_s[0], inf), torch.where(counted, lse_s[1], zero)) if need_s else (inf, zero)
    m_z, l_z = (torch.where(counted, lse_z[0], inf), torch.where(counted, lse_z[1], zero)) if need_z else (inf, zero)
    losses = torch.where(counted, row, zero)
    stacked = torch.stack([m_s, l_s, c_s, m_z, l_z, c_z, counted.to(d.dtype)])
    if cin is not None:
        cin = torch.where(valid & counted[:, None], cin, torch.zeros_like(cin)).contiguous()
    return losses, coef.contiguous(), stacked.contiguous(), cin


def triton_backward(hidden, weight, bias, ids_ext, coef, row, cin, go, cfg: LossConfig, needs, skip_eps: float,
                    fp32_dh: bool = False):  # fmt: skip
    """(dH, dW, db) from the coefficients of ``row_coefficients`` scaled by grad_output ``go`` ((1,) or (N,)),
    through the Triton backward kernel. ``fp32_dh``: return dH in float32 (to be summed over ranks before rounding)."""
    need_s, need_z, _ = plan(cfg)
    per_row = go[:, None] if go.numel() > 1 else go
    coef = coef * per_row
    cin = cin * per_row if cin is not None else None
    row = row.clone()
    row[2] *= go  # the two dense coefficients; maxima and log-sums stay
    row[5] *= go
    return fused_linear_triton().fused_backward_triton(
        hidden, weight, bias, ids_ext, coef, row, 1.0 / cfg.temperature, need_s, need_z, needs, skip_eps, cin,
        fp32_dh=fp32_dh,
    )  # fmt: skip
