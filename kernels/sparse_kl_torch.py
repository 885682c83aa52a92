"""PyTorch implementation of the sparse distillation loss (CPU, ``backend="torch"``, and the no-triton fallback).

Same math as the Triton kernel (see ``sparse_kl.py`` for the formulas), processed in chunks of rows so that
at most a few ``chunk x V`` float32 buffers exist at once. The gradient is computed in the forward pass and
written into ``grad`` (which may be ``logits`` itself), so backward only has to scale it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._common import EPS, LOG_EPS, LossConfig

# Rows per chunk are chosen so that one float32 chunk x V buffer holds about this many elements (16 MiB).
CHUNK_ELEMENTS = 1 << 22


def bin_terms(p, lp, q, lq_raw, beta: float, kind: int):
    """Per-bin divergence term f(p, q), its derivative g = df/dq, and w = q * g.

    ``lp`` is the teacher log already clamped at log(1e-12); ``lq_raw`` the unclamped student log (may be -inf).
    The clamp's derivative is 0 below log(1e-12), which is what the masks carry.
    """
    lq = lq_raw.clamp_min(LOG_EPS)
    mq = (lq_raw > LOG_EPS).to(q.dtype)
    if kind == 0:  # forward KL: p (log p - log q)
        f = p * (lp - lq)
        w = -p * mq
        g = w / q.clamp_min(EPS)
    elif kind == 1:  # reverse KL: q (log q - log p)
        f = q * (lq - lp)
        g = lq - lp + mq
        w = q * g
    elif kind == 2:  # JSD(beta) with m = beta p + (1 - beta) q
        m = beta * p + (1.0 - beta) * q
        lm = m.clamp_min(EPS).log()
        f = beta * p * (lp - lm) + (1.0 - beta) * q * (lq - lm)
        g = (1.0 - beta) * (lq - lm + mq - (m > EPS).to(q.dtype))
        w = q * g
    else:  # total variation: |p - q| / 2
        f = 0.5 * (p - q).abs()
        g = -0.5 * torch.sign(p - q)
        w = q * g
    return f, g, w


class RowTerms(NamedTuple):
    """The row math's result: the divergence and the coefficients of its gradient w.r.t. s = z / T.

    ``dD/ds_j = -big_a * q_j`` for a column j outside the support, and, for j = id_k in the support,
    ``dD/ds_j = -(big_a_in - b * (1 - c_j)) * q_j + sum_{k: id_k = j} a_k`` (c_j = the slots holding j).

    Both describe one gradient, ``-A q_j + sum_k a~_k`` with ``a~_k = a_k - b q_k`` and ``A = sum_k a~_k``, split
    so that no large terms cancel: with tail='bucket' and a student tail q_t far below the teacher's p_t, the tail
    bin's g_t = dD/dq_t (~ -p_t / q_t) is large, and computing a support column as the difference of
    ``-A q_j`` and ``a~_k`` (each ~ g_t q_j) loses g_t times fp32's rounding: at q_t = 1e-6, p_t = 0.1 the
    gradient of the support came out 17 % (torch) to 140 % (Triton) wrong. ``big_a_in = sum_k a_k + b q_t`` and
    ``b = g_t`` are small or exact where it matters. Other tails: ``big_a_in = big_a``, ``b = 0``.
    """

    d: torch.Tensor  # (R,) divergence
    big_a: torch.Tensor  # (R,) dense coefficient outside the support
    a: torch.Tensor  # (R, K) per-slot fix-ups (0 at invalid slots)
    big_a_in: torch.Tensor  # (R,) dense coefficient at the support, less b (1 - c_j)
    b: torch.Tensor  # (R,) coefficient of q_j (1 - c_j) at the support


def row_terms(s_k, lq_k, lp, valid, cfg: LossConfig, q_tail=None) -> RowTerms:
    """Per-row divergence and gradient coefficients (see ``RowTerms``), all w.r.t. s = z / T.

    Shapes (R, K): s_k = z / T at the target ids (used by tail='restrict'), lq_k = log_softmax(s) there
    (other tails; None for 'restrict'), teacher log-probs lp, and the mask of valid slots.
    ``q_tail`` (R,): the bucket's student tail 1 - Q summed in the dense pass (see ``tail_mass``); without it
    1 - Q = -expm1(log Q) from the gathered q, which loses the tail's bits once 1 - Q nears fp32 rounding of 1.
    """
    zero = torch.zeros((), dtype=s_k.dtype, device=s_k.device)
    ninf = torch.full((), float("-inf"), dtype=s_k.dtype, device=s_k.device)
    lp = torch.where(valid, lp, ninf)
    p = torch.where(valid, lp.exp(), zero)
    big_p = p.sum(-1)
    if cfg.tail == 2:  # restrict: student q / Q over the support
        s_m = torch.where(valid, s_k, ninf)
        lse_s = torch.logsumexp(s_m, dim=-1)
        lse_s = torch.where(torch.isfinite(lse_s), lse_s, zero)
        lq_raw = s_m - lse_s[:, None]
    else:
        lq_raw = torch.where(valid, lq_k, ninf)
    q = lq_raw.exp()
    if cfg.tail == 0:  # bucket: K slots plus one tail bin
        f, _, w = bin_terms(p, lp.clamp_min(LOG_EPS), q, lq_raw, cfg.beta, cfg.kind)
        # 1 - P in float64 from the K log-probs: in fp32 it would round away a teacher tail below ~1e-7
        p_t = (1.0 - lp.double().exp().sum(-1)).clamp_min(0.0).to(p.dtype)
        big_q = q.sum(-1)
        q_t_raw = -torch.expm1(big_q.log()) if q_tail is None else q_tail
        q_t = q_t_raw.clamp_min(0.0)
        f_t, g_t, _ = bin_terms(p_t, p_t.clamp_min(EPS).log(), q_t, q_t.log(), cfg.beta, cfg.kind)
        g_t = torch.where(q_t_raw > 0, g_t, zero)
        d = torch.where(valid, f, zero).sum(-1) + f_t
        a = torch.where(valid, w, zero)
        big_w = a.sum(-1)
        # A = sum_k (w_k - g_t q_k) = W - g_t Q from the gathered Q: where the student is diffuse (Q small), 1 - q_t
        # would lose Q's bits to the rounding of the V-term tail sum
        return RowTerms(d, big_w - g_t * big_q, a, big_w + g_t * q_t, g_t)
    safe_p = torch.where(big_p > 0, big_p, torch.ones_like(big_p))
    pb = p / safe_p[:, None]
    lpb = (lp - safe_p.log()[:, None]).clamp_min(LOG_EPS)
    f, _, w = bin_terms(pb, lpb, q, lq_raw, cfg.beta, cfg.kind)
    d = torch.where(valid, f, zero).sum(-1)
    w = torch.where(valid, w, zero)
    if cfg.tail == 1:  # renormalize: p / P against the full-vocabulary q
        a = w
        big_a = a.sum(-1)
    else:  # restrict: q / Q is a softmax over the K gathered logits, so there is no dense term
        a = w - q * w.sum(-1, keepdim=True)
        big_a = torch.zeros_like(d)
    return RowTerms(d, big_a, a, big_a, torch.zeros_like(d))


def outside_counts(like: torch.Tensor, ids_safe: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(R, V) 1 - c_j: 1 outside the support, 0 at an id held once, 1 - c at an id held c times."""
    return torch.ones_like(like).scatter_add_(1, ids_safe, -valid.to(like.dtype))


def dense_coefficients(terms: RowTerms, soft: torch.Tensor, outside: torch.Tensor | None) -> torch.Tensor:
    """(R, V) the factor of q_j in the soft gradient: -A soft outside the support, -(A_in - b (1 - c_j)) soft in it.

    ``outside`` is ``outside_counts`` (tail='bucket'); None for the other tails, where both coefficients agree.
    """
    if outside is None:
        return (-terms.big_a * soft)[:, None]
    inside = (-terms.big_a_in * soft)[:, None] + (terms.b * soft)[:, None] * outside
    return torch.where(outside == 1.0, (-terms.big_a * soft)[:, None], inside)


def tail_mass(q: torch.Tensor, outside: torch.Tensor) -> torch.Tensor:
    """The bucket's student tail 1 - Q per row, summed over the vocabulary: sum_j q_j (1 - c_j), c_j = slots with id j.

    Outside the support c_j = 0, so this is the mass outside S, exact to the rounding of the tail's own terms
    (1 - sum_S q loses everything below fp32's rounding of 1: ~6e-8). Duplicate ids (c_j > 1) subtract their extra
    copies, as the separate bins of 1 - Q do. q (R, V) probabilities; ``outside`` from ``outside_counts``.
    """
    return torch.linalg.vecdot(q, outside)


def _log_softmax(x: torch.Tensor) -> torch.Tensor:
    """log_softmax over the last dim with an exact normaliser; a NaN or +inf logit makes its row NaN, as in torch's."""
    m = x.amax(-1, keepdim=True)
    return x - (m + torch.exp(x - m).sum(-1, keepdim=True).log())


def sparse_kl_forward_torch(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    target_logprobs: torch.Tensor,
    labels: torch.Tensor | None,
    scale: torch.Tensor,
    cfg: LossConfig,
    grad: torch.Tensor | None,
) -> torch.Tensor:
    """Per-row losses (N,) float32 (0 where a row does not count); fills ``grad`` (N, V) when given.

    ``scale`` (1,) or (N,) multiplies every row's gradient (1/denominator for reduction='mean'; per-row factors
    when the fused output layer recomputes the gradient with grad_output folded in).
    ``grad`` may alias ``logits``: each chunk's logits are fully read before its gradient is written.
    """
    n, vocab = logits.shape
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    inv_t = 1.0 / cfg.temperature
    losses = torch.empty(n, dtype=torch.float32, device=logits.device)
    chunk = max(1, min(n, CHUNK_ELEMENTS // vocab))
    scale_c = scale.to(compute)
    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        ids = target_ids[r0:r1].long()
        valid = (ids >= 0) & (ids < vocab)
        ids_safe = torch.where(valid, ids, torch.zeros_like(ids))
        counted = valid.any(-1)
        if labels is not None:
            lab = labels[r0:r1].long()
            counted = counted & (lab != cfg.ignore_index)
            lab_ok = counted & (lab >= 0) & (lab < vocab)
            lab_safe = torch.where(lab_ok, lab, torch.zeros_like(lab))[:, None]
        x = logits[r0:r1].to(compute)
        s = x * inv_t if inv_t != 1.0 else x
        s_k = s.gather(1, ids_safe)
        # The log-probabilities' buffer later becomes the gradient (exp_ and mul_ in place). Not torch.log_softmax: on
        # the CPU its fp32 normaliser is off by ~2e-5 at V = 262,144 (the probabilities sum to 1 + 2e-5), a bias
        # every gradient column shares and the output layer's dH sums over V columns; logsumexp is exact to ~1e-7.
        logq = _log_softmax(s) if cfg.tail != 2 else None
        shared = cfg.has_ce and logq is not None and inv_t == 1.0
        logq1 = (logq if shared else _log_softmax(x)) if cfg.has_ce else None
        # log_softmax spreads a NaN or +inf logit over its row (+inf - +inf = nan); tail='restrict' without a
        # cross-entropy reads only the K gathered logits, so it looks at the row once (amax propagates NaN).
        poison = None
        if logq is None and logq1 is None:
            poison = torch.where(x.amax(-1) < float("inf"), 0.0, float("nan")).to(compute)
        del x, s
        lq_k = logq.gather(1, ids_safe) if logq is not None else None
        lq_label = logq1.gather(1, lab_safe)[:, 0] if cfg.has_ce else None
        q_tail = outside = None
        if cfg.tail == 0:  # from here on logq holds q (and so does logq1 when shared)
            outside = outside_counts(logq, ids_safe, valid)
            q_tail = tail_mass(logq.exp_(), outside)
        terms = row_terms(s_k, lq_k, target_logprobs[r0:r1].to(compute), valid, cfg, q_tail)
        d, a = terms.d, terms.a
        if poison is not None:
            d, a = d + poison, a + poison[:, None]
        row = cfg.soft_weight * d
        if cfg.has_ce:
            row = row - cfg.ce_weight * lq_label
        losses[r0:r1] = torch.where(counted, row, torch.zeros_like(row)).float()
        if grad is None:
            continue
        zero = torch.zeros_like(d)
        sc = scale_c if scale_c.numel() == 1 else scale_c[r0:r1]
        soft = torch.where(counted, sc * (cfg.soft_weight * inv_t), zero)
        ce_c = torch.where(lab_ok, sc * cfg.ce_weight, zero) if cfg.has_ce else zero
        if logq is None:
            g = torch.zeros((r1 - r0, vocab), dtype=compute, device=logits.device)
        else:
            q = logq if cfg.tail == 0 else logq.exp_()
            dense_c = dense_coefficients(terms, soft, outside)
            del outside
            g = q.mul_(dense_c + ce_c[:, None] if shared else dense_c)
        if cfg.has_ce and not shared:
            g.add_(logq1.exp_().mul_(ce_c[:, None]))
        g.scatter_add_(1, ids_safe, torch.where(valid, a * soft[:, None], torch.zeros_like(a)))
        if cfg.has_ce:
            g.scatter_add_(1, lab_safe, -ce_c[:, None])
        g.masked_fill_(~counted[:, None], 0.0)  # their coefficients are 0, but 0 * nan = nan
        grad[r0:r1] = g
    return losses
