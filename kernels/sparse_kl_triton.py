"""Triton kernels of the sparse distillation loss: one program per row, two streaming passes over V.

Pass 1 reads the row in blocks of ``BLOCK_V`` and keeps an online max/sum of ``s = z / T`` (and of ``z`` when a
hard cross-entropy at T = 1 is mixed in) in fp32 registers; with tail='bucket' also the sum of exp(s - max) over
the columns outside the target ids (the student's tail, exact; each block masks its few ids, found as one range of
the row's sorted ids). The K student logits at the target ids are gathered, and a handful of per-row scalars
follow from them (see ``sparse_kl.py`` for the math):
the divergence ``D``, the dense coefficients ``A`` (outside the support) and ``A_in``, ``b`` (at it) and the
per-slot fix-ups ``a_k``, so that (c_j = the slots holding id j; ``sparse_kl_torch.RowTerms``)

    dD/ds_j = -A * q_j                                             (j outside the support)
    dD/ds_j = -(A_in - b (1 - c_j)) * q_j + sum_{k: id_k = j} a_k   (j an id).

With tail='bucket', b = g_tail, which is large when the student's tail is far below the teacher's; the support's
coefficient is formed as one scalar before it multiplies q_j, so no two ~g_tail q_j terms cancel there.
Other tails: A_in = A, b = 0.

Pass 2 writes the gradient of the row in the logits' dtype: the dense part (-A q_j) block by block, then, after
a barrier, the K (+ label) positions with their exact values. The values at those positions are prepared in
fp32 *before* pass 2 into a small (N, K) scratch, so the gradient may overwrite the logits in place.
Duplicate ids are separate bins: the fix-ups of equal ids are summed and c_j counted (a K x K compare in
chunks), and every duplicate slot stores the same value.

A NaN or +inf logit makes the online sum of pass 1 NaN (exp(nan), or exp(+inf - +inf)), and that NaN is carried
into the row's log-normaliser and from there, explicitly, into its loss and gradient, as the torch backend's
log_softmax does; tail='restrict' without a cross-entropy needs no log-normaliser, so pass 1 only counts such
logits there. Rows that do not count skip pass 1 and write a gradient of exactly 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import EPS, LOG_EPS, LossConfig

MAX_BLOCK_V = 8192
# Globals read inside @triton.jit functions must be constexpr.
NEG_INF = tl.constexpr(float("-inf"))
POS_INF = tl.constexpr(float("inf"))
_EPS = tl.constexpr(EPS)
_LOG_EPS = tl.constexpr(LOG_EPS)


@triton.jit
def _bin_terms(p, lp, q, lq_raw, beta, KIND: tl.constexpr):
    """f(p, q) of one bin, g = df/dq and w = q * g (see sparse_kl_torch.bin_terms)."""
    lq = tl.maximum(lq_raw, _LOG_EPS)
    mq = tl.where(lq_raw > _LOG_EPS, 1.0, 0.0)
    if KIND == 0:
        f = p * (lp - lq)
        w = -p * mq
        g = w / tl.maximum(q, _EPS)
    elif KIND == 1:
        f = q * (lq - lp)
        g = lq - lp + mq
        w = q * g
    elif KIND == 2:
        m = beta * p + (1.0 - beta) * q
        lm = tl.log(tl.maximum(m, _EPS))
        f = beta * p * (lp - lm) + (1.0 - beta) * q * (lq - lm)
        g = (1.0 - beta) * (lq - lm + mq - tl.where(m > _EPS, 1.0, 0.0))
        w = q * g
    else:
        f = 0.5 * tl.abs(p - q)
        g = tl.where(p > q, -0.5, tl.where(p < q, 0.5, 0.0))
        w = q * g
    return f, g, w


@triton.jit
def _log_normaliser(m, d):
    """m + log(d) from an online max m and sum d: NaN where d is NaN or 0."""
    return tl.where(d != 0.0, m + tl.log(tl.where(d == 0.0, 1.0, d)), float("nan"))


@triton.jit
def _dense_grad(x, inv_t, lse_s, dense_c, lse_z, ce_c, NEED_S: tl.constexpr, HAS_CE: tl.constexpr):
    """Dense part of the gradient at logits x: dense_c * softmax(x / T) + ce_c * softmax(x)."""
    out = tl.zeros_like(x)
    if NEED_S:
        out += dense_c * tl.exp(x * inv_t - lse_s)
    if HAS_CE:
        out += ce_c * tl.exp(x - lse_z)
    return out


@triton.jit
def block_outside(srt_row, srt, start, offs, V, BLOCK_V: tl.constexpr):
    """1 - c_j over the block of columns ``offs`` (from ``start``): c_j = the row's slots holding id j. ``srt`` is
    the row's ids in ascending order (V past the end, also at ``srt_row`` in memory): the block's ids are one range."""
    outside = tl.full((BLOCK_V,), 1.0, tl.float32)
    lo = tl.sum((srt < start).to(tl.int32), axis=0)
    hi = tl.sum(((srt < start + BLOCK_V) & (srt < V)).to(tl.int32), axis=0)
    for j in range(lo, hi):
        outside -= tl.where(offs == tl.load(srt_row + j), 1.0, 0.0)
    return outside


@triton.jit
def _sparse_kl_kernel(
    x_ptr, x_stride, grad_ptr, grad_stride,
    ids_ptr, ids_stride, lp_ptr, lp_stride, labels_ptr, scale_ptr, sorted_ptr,
    loss_ptr, fix_ptr,
    V, K, inv_t, soft_w, ce_w, beta, ignore_index,
    KIND: tl.constexpr, TAIL: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_CE: tl.constexpr,
    NEED_S: tl.constexpr, SHARE_LSE: tl.constexpr, SCAN: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    TAIL_SUM: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK_K: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_stride
    offs_k = tl.arange(0, BLOCK_K)
    in_k = offs_k < K
    ids = tl.load(ids_ptr + row * ids_stride + offs_k, mask=in_k, other=-1).to(tl.int64)
    valid = in_k & (ids >= 0) & (ids < V)
    ids = tl.where(valid, ids, -1)
    counted = tl.sum(valid.to(tl.int32), axis=0) > 0
    label = -1
    label_ok = counted
    if HAS_LABELS:
        label = tl.load(labels_ptr + row).to(tl.int64)
        counted = counted & (label != ignore_index)
        label_ok = counted & (label >= 0) & (label < V)

    # Pass 1: online log-sum-exp of s = z / T (and of z at T = 1 for the cross-entropy); skipped when ignored.
    # SCAN (no log-sum-exp needed): count the NaN and +inf logits instead.
    m_s = NEG_INF
    d_s = 0.0
    m_z = NEG_INF
    d_z = 0.0
    n_bad = 0
    # TAIL_SUM (bucket): t_s sums exp(s_j - m) (1 - c_j) beside d_s, c_j = slots with id j, so that 1 - Q = t_s / d_s
    # is exact to the tail's own rounding. The row's ids, sorted, give each block its few ids as one range.
    t_s = 0.0
    if TAIL_SUM:
        srt_row = sorted_ptr + row * K
        srt = tl.load(srt_row + offs_k, mask=in_k, other=V)
    v_end = tl.where(counted, V, 0)
    for start in range(0, v_end, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        x = tl.load(x_row + offs, mask=offs < V, other=NEG_INF).to(tl.float32)
        if NEED_S:
            s = x * inv_t
            m_new = tl.maximum(m_s, tl.max(s, axis=0))
            m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)
            rescale = tl.exp(m_s - m_safe)
            e = tl.exp(s - m_safe)
            d_s = d_s * rescale + tl.sum(e, axis=0)
            m_s = m_new
            if TAIL_SUM:
                t_s = t_s * rescale + tl.sum(e * block_outside(srt_row, srt, start, offs, V, BLOCK_V), axis=0)
        if HAS_CE and not SHARE_LSE:
            m_new = tl.maximum(m_z, tl.max(x, axis=0))
            m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)
            d_z = d_z * tl.exp(m_z - m_safe) + tl.sum(tl.exp(x - m_safe), axis=0)
            m_z = m_new
        if SCAN:
            n_bad += tl.sum(((x != x) | (x == POS_INF)).to(tl.int32), axis=0)
    # +inf for rows that do not count: every exp(x - lse) below is then 0, never inf * 0. A NaN sum (a NaN or +inf
    # logit) must pass through: the guards compare with == / != (False / True for NaN), never clamp it away. A sum
    # of 0 (every logit -inf: no distribution) is NaN too, as torch's log_softmax gives.
    lse_s = float("inf")
    if NEED_S:
        lse_s = tl.where(counted, _log_normaliser(m_s, d_s), float("inf"))
    lse_z = float("inf")
    if SHARE_LSE:
        lse_z = lse_s
    elif HAS_CE:
        lse_z = tl.where(counted, _log_normaliser(m_z, d_z), float("inf"))
    # NaN when a NaN or +inf logit reached lse_s, or SCAN counted one; added to the loss and the gradient's scale
    # because the clamps of the bin terms (tl.maximum, like the GPU's max) would drop it. lse_z needs no such help.
    poison = 0.0
    if NEED_S:
        poison = tl.where(lse_s != lse_s, float("nan"), 0.0)
    if SCAN:
        poison = tl.where(n_bad > 0, float("nan"), 0.0)

    # Per-row scalars from the K gathered logits and teacher log-probs.
    z_k = tl.load(x_row + ids, mask=valid, other=NEG_INF).to(tl.float32)
    s_k = z_k * inv_t
    lp = tl.load(lp_ptr + row * lp_stride + offs_k, mask=valid, other=NEG_INF).to(tl.float32)
    lp = tl.where(valid, lp, NEG_INF)
    p = tl.where(valid, tl.exp(lp), 0.0)
    big_p = tl.sum(p, axis=0)
    if TAIL == 2:  # restrict: q / Q is a softmax over the gathered logits
        s_m = tl.where(valid, s_k, NEG_INF)
        mx = tl.max(s_m, axis=0)
        mx = tl.where(mx == NEG_INF, 0.0, mx)
        sum_e = tl.sum(tl.exp(s_m - mx), axis=0)
        lq_raw = s_m - tl.where(sum_e > 0, mx + tl.log(tl.maximum(sum_e, 1e-30)), 0.0)
    else:
        lq_raw = tl.where(valid, s_k - lse_s, NEG_INF)
    q = tl.exp(lq_raw)
    if TAIL == 0:  # bucket: K slots + tail bin
        f, g, w = _bin_terms(p, tl.maximum(lp, _LOG_EPS), q, lq_raw, beta, KIND)
        # 1 - P in float64 (K terms): in fp32 it would round away a teacher tail below ~1e-7
        p64 = tl.where(valid, tl.exp(lp.to(tl.float64)), 0.0)
        p_t = tl.maximum(1.0 - tl.sum(p64, axis=0), 0.0).to(tl.float32)
        q_t_raw = tl.where(d_s != 0.0, t_s / tl.where(d_s == 0.0, 1.0, d_s), 0.0)
        q_t = tl.maximum(q_t_raw, 0.0)
        f_t, g_t, w_t = _bin_terms(p_t, tl.log(tl.maximum(p_t, _EPS)), q_t, tl.log(q_t), beta, KIND)
        g_t = tl.where(q_t_raw > 0, g_t, 0.0)
        div = tl.sum(tl.where(valid, f, 0.0), axis=0) + f_t
        a = tl.where(valid, w, 0.0)
        big_w = tl.sum(a, axis=0)
        # A = W - g_t Q from the gathered Q (exact where the student is diffuse); A_in = W + g_t q_t, b = g_t
        big_a = big_w - g_t * tl.sum(q, axis=0)
        big_a_in = big_w + g_t * q_t
        b_in = g_t
    else:
        safe_p = tl.where(big_p > 0, big_p, 1.0)
        lpb = tl.maximum(lp - tl.log(safe_p), _LOG_EPS)
        f, g, w = _bin_terms(p / safe_p, lpb, q, lq_raw, beta, KIND)
        div = tl.sum(tl.where(valid, f, 0.0), axis=0)
        w = tl.where(valid, w, 0.0)
        if TAIL == 1:  # renormalize
            a = w
            big_a = tl.sum(a, axis=0)
        else:
            a = w - q * tl.sum(w, axis=0)
            big_a = 0.0
        big_a_in = big_a
        b_in = 0.0
    loss = soft_w * div + poison
    z_label = 0.0
    if HAS_CE:
        z_label = tl.load(x_row + label, mask=label_ok, other=0.0).to(tl.float32)
        loss += ce_w * (lse_z - z_label)
    tl.store(loss_ptr + row, tl.where(counted, loss, 0.0))

    if COMPUTE_GRAD:
        scale = tl.load(scale_ptr).to(tl.float32)
        soft_c = tl.where(counted, soft_w * scale * inv_t + poison, 0.0)
        dense_c = -big_a * soft_c
        delta = tl.where(valid, a * soft_c, 0.0)
        ce_c = tl.where(label_ok, ce_w * scale, 0.0)
        # Exact fp32 values at the target ids and the label, ready before pass 2 may overwrite the logits.
        for c in range(0, K, CHUNK_K):
            offs_c = c + tl.arange(0, CHUNK_K)
            in_c = offs_c < K
            ids_c = tl.load(ids_ptr + row * ids_stride + offs_c, mask=in_c, other=-1).to(tl.int64)
            valid_c = in_c & (ids_c >= 0) & (ids_c < V)
            ids_c = tl.where(valid_c, ids_c, -1)
            z_c = tl.load(x_row + ids_c, mask=valid_c, other=NEG_INF).to(tl.float32)
            same = (ids_c[:, None] == ids[None, :]) & valid[None, :]
            dense_in = dense_c
            if TAIL == 0:  # the support's own coefficient, one scalar per slot: -(A_in - b (1 - c_j)) soft
                n_same = tl.sum(same.to(tl.float32), axis=1)
                dense_in = -(big_a_in - b_in * (1.0 - n_same)) * soft_c
            val = _dense_grad(z_c, inv_t, lse_s, dense_in, lse_z, ce_c, NEED_S, HAS_CE)
            val += tl.sum(tl.where(same, delta[None, :], 0.0), axis=1)
            if HAS_CE:
                val -= tl.where(ids_c == label, ce_c, 0.0)
            tl.store(fix_ptr + row * K + offs_c, tl.where(counted, val, 0.0), mask=in_c)  # 0, not 0 * nan
        label_val = 0.0
        if HAS_CE:
            dense_lab = dense_c
            if TAIL == 0:  # a label in the support takes the support's coefficient
                n_lab = tl.sum((valid & (ids == label)).to(tl.float32), axis=0)
                dense_lab = tl.where(n_lab > 0, -(big_a_in - b_in * (1.0 - n_lab)) * soft_c, dense_c)
            label_val = _dense_grad(z_label, inv_t, lse_s, dense_lab, lse_z, ce_c, NEED_S, HAS_CE)
            label_val += tl.sum(tl.where(ids == label, delta, 0.0), axis=0) - ce_c

        # Pass 2: dense gradient, block by block, in the gradient's dtype.
        g_row = grad_ptr + row * grad_stride
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            msk = offs < V
            x = tl.load(x_row + offs, mask=msk, other=NEG_INF).to(tl.float32)
            out = tl.where(counted, _dense_grad(x, inv_t, lse_s, dense_c, lse_z, ce_c, NEED_S, HAS_CE), 0.0)
            tl.store(g_row + offs, out.to(grad_ptr.dtype.element_ty), mask=msk)
        tl.debug_barrier()  # the fix-ups below overwrite positions other threads just wrote
        for c in range(0, K, CHUNK_K):
            offs_c = c + tl.arange(0, CHUNK_K)
            in_c = offs_c < K
            ids_c = tl.load(ids_ptr + row * ids_stride + offs_c, mask=in_c, other=-1).to(tl.int64)
            valid_c = in_c & (ids_c >= 0) & (ids_c < V)
            val = tl.load(fix_ptr + row * K + offs_c, mask=valid_c, other=0.0)
            tl.store(g_row + ids_c, val.to(grad_ptr.dtype.element_ty), mask=valid_c)
        if HAS_CE:
            tl.store(g_row + label, label_val.to(grad_ptr.dtype.element_ty), mask=label_ok)


@triton.jit
def _scale_rows_kernel(grad_ptr, grad_stride, go_ptr, go_stride, V, BLOCK_V: tl.constexpr):
    """grad[row] *= grad_output[row * go_stride]; a no-op (one scalar load) when that factor is exactly 1."""
    row = tl.program_id(0).to(tl.int64)
    go = tl.load(go_ptr + row * go_stride).to(tl.float32)
    if go != 1.0:
        g_row = grad_ptr + row * grad_stride
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            msk = offs < V
            x = tl.load(g_row + offs, mask=msk, other=0.0).to(tl.float32)
            tl.store(g_row + offs, (x * go).to(grad_ptr.dtype.element_ty), mask=msk)


def launch_params(vocab: int) -> tuple[int, int]:
    block_v = min(MAX_BLOCK_V, triton.next_power_of_2(vocab))
    num_warps = 16 if block_v >= 8192 else (8 if block_v >= 2048 else 4)
    return block_v, num_warps


def sparse_kl_forward_triton(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    target_logprobs: torch.Tensor,
    labels: torch.Tensor | None,
    scale: torch.Tensor,
    cfg: LossConfig,
    grad: torch.Tensor | None,
) -> torch.Tensor:
    """Launch the forward kernel; returns per-row losses (N,) float32 and fills ``grad`` (may alias logits)."""
    n, vocab = logits.shape
    k = target_ids.shape[1]
    losses = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n == 0:
        return losses
    block_v, num_warps = launch_params(vocab)
    block_k = max(16, triton.next_power_of_2(k))
    chunk_k = max(1, min(block_k, 4096 // block_k))
    compute_grad = grad is not None
    fix = torch.empty((n, k) if compute_grad else (1,), dtype=torch.float32, device=logits.device)
    grad_arg = grad if compute_grad else logits
    labels_arg = labels if labels is not None else target_ids
    tail_sum = cfg.tail == 0
    sorted_ids = target_ids  # a placeholder pointer unless tail_sum
    if tail_sum:  # the row's valid ids in ascending order, V past the end: O(N K), no host sync
        ids = target_ids.long()
        sorted_ids = torch.where((ids >= 0) & (ids < vocab), ids, vocab).sort(-1).values.to(torch.int32)
    _sparse_kl_kernel[(n,)](
        logits, logits.stride(0), grad_arg, grad_arg.stride(0),
        target_ids, target_ids.stride(0), target_logprobs, target_logprobs.stride(0), labels_arg, scale, sorted_ids,
        losses, fix,
        vocab, k, 1.0 / cfg.temperature, cfg.soft_weight, cfg.ce_weight, cfg.beta, cfg.ignore_index,
        KIND=cfg.kind, TAIL=cfg.tail, HAS_LABELS=labels is not None, HAS_CE=cfg.has_ce,
        NEED_S=cfg.tail != 2, SHARE_LSE=cfg.tail != 2 and cfg.temperature == 1.0,
        SCAN=cfg.tail == 2 and not cfg.has_ce, COMPUTE_GRAD=compute_grad, TAIL_SUM=tail_sum,
        BLOCK_V=block_v, BLOCK_K=block_k, CHUNK_K=chunk_k, num_warps=num_warps,
    )  # fmt: skip
    return losses


def scale_rows_triton(grad: torch.Tensor, grad_output: torch.Tensor) -> None:
    """In place: grad (N, V) *= grad_output (a scalar, or one factor per row); no host sync."""
    n, vocab = grad.shape
    if n == 0:
        return
    go = grad_output.reshape(-1)
    block_v, num_warps = launch_params(vocab)
    _scale_rows_kernel[(n,)](grad, grad.stride(0), go, 0 if go.numel() == 1 else 1, vocab, BLOCK_V=block_v,
                             num_warps=num_warps)
