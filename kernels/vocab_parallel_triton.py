"""Triton kernels of the vocab-parallel loss (``vocab_parallel.py``): the two passes over this rank's logit slice.

``_local_sums_kernel`` (one program per row) reads the slice once and keeps an online max of z with the sums
sum exp(z / T - m / T), for tail='bucket' the part of it outside the support (each block's few local ids, found as
one range of the row's sorted ids, as in ``sparse_kl_triton``), and sum exp(z - m) for a cross-entropy at T != 1.
The all-reduces and the row math between the passes run in PyTorch on O(N * K) numbers.

``_local_grad_kernel`` writes the gradient of the slice in one pass: per column the factor of q_j is selected, not
summed (outside the support -A soft, at an id held c_j times -(A_in - b (1 - c_j)) soft; see ``RowTerms``), the
slots' fix-ups w_k soft are added at their ids, and the cross-entropy's softmax(z)_j - 1(j = label). No scratch, no
barrier, and duplicate ids need no special case (each slot adds its own fix-up and counts once in c_j).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .sparse_kl_triton import block_outside, launch_params

NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _local_sums_kernel(
    x_ptr, x_stride, srt_ptr, counted_ptr, out_ptr, V, K, inv_t,
    TAIL_SUM: tl.constexpr, SEP_CE: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_stride
    srt_row = srt_ptr + row * K
    offs_k = tl.arange(0, BLOCK_K)
    srt = tl.load(srt_row + offs_k, mask=offs_k < K, other=V)
    m = NEG_INF
    d_s = 0.0
    t_s = 0.0
    d_z = 0.0
    v_end = tl.where(tl.load(counted_ptr + row) != 0, V, 0)
    for start in range(0, v_end, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        x = tl.load(x_row + offs, mask=offs < V, other=NEG_INF).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)
        rescale = tl.exp((m - m_safe) * inv_t)
        e = tl.exp((x - m_safe) * inv_t)
        d_s = d_s * rescale + tl.sum(e, axis=0)
        if TAIL_SUM:
            t_s = t_s * rescale + tl.sum(e * block_outside(srt_row, srt, start, offs, V, BLOCK_V), axis=0)
        if SEP_CE:
            d_z = d_z * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), axis=0)
        m = m_new
    tl.store(out_ptr + row * 4 + 0, m)
    tl.store(out_ptr + row * 4 + 1, d_s)
    tl.store(out_ptr + row * 4 + 2, t_s)
    tl.store(out_ptr + row * 4 + 3, d_z)


@triton.jit
def _local_grad_kernel(
    x_ptr, x_stride, g_ptr, g_stride, srt_ptr, fix_ptr, coef_ptr, lab_ptr, V, K, inv_t,
    NEED_S: tl.constexpr, HAS_CE: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_stride
    g_row = g_ptr + row * g_stride
    srt_row = srt_ptr + row * K
    fix_row = fix_ptr + row * K
    offs_k = tl.arange(0, BLOCK_K)
    srt = tl.load(srt_row + offs_k, mask=offs_k < K, other=V)
    # coef row: lse_s, lse_z, c_out, c_in, b_soft, ce_c, counted
    c = coef_ptr + row * 7
    lse_s = tl.load(c + 0)
    lse_z = tl.load(c + 1)
    c_out = tl.load(c + 2)
    c_in = tl.load(c + 3)
    b_soft = tl.load(c + 4)
    ce_c = tl.load(c + 5)
    counted = tl.load(c + 6) != 0.0
    label = tl.load(lab_ptr + row).to(tl.int64)  # local column, -1 when not on this rank
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        msk = offs < V
        x = tl.load(x_row + offs, mask=msk, other=NEG_INF).to(tl.float32)
        outside = tl.full((BLOCK_V,), 1.0, tl.float32)
        fix = tl.zeros((BLOCK_V,), tl.float32)
        lo = tl.sum((srt < start).to(tl.int32), axis=0)
        hi = tl.sum(((srt < start + BLOCK_V) & (srt < V)).to(tl.int32), axis=0)
        for j in range(lo, hi):
            hit = offs == tl.load(srt_row + j)
            outside -= tl.where(hit, 1.0, 0.0)
            fix += tl.where(hit, tl.load(fix_row + j), 0.0)
        out = fix
        if NEED_S:
            factor = tl.where(outside == 1.0, c_out, c_in + b_soft * outside)
            out += factor * tl.exp(x * inv_t - lse_s)
        if HAS_CE:
            out += ce_c * tl.exp(x - lse_z) - tl.where(offs == label, ce_c, 0.0)
        out = tl.where(counted, out, 0.0)  # rows that do not count: 0, also where their logits are NaN
        tl.store(g_row + offs, out.to(g_ptr.dtype.element_ty), mask=msk)


def _sorted_local(loc_ids: torch.Tensor, mine: torch.Tensor, local: int, values: torch.Tensor | None = None):
    """The row's local ids in ascending order (``local`` past the end, for slots not on this rank), int32, and
    ``values`` (N, K) permuted alike."""
    keyed = torch.where(mine, loc_ids, local)
    srt, order = keyed.sort(-1)
    vals = values.gather(1, order).contiguous() if values is not None else None
    return srt.to(torch.int32).contiguous(), vals


def local_sums(logits: torch.Tensor, st_layout: dict, cfg, compute: torch.dtype) -> tuple[torch.Tensor, ...]:
    """This rank's partials (m_s, m_z, sums) as ``vocab_parallel.local_sums`` computes them, with one kernel launch
    for the dense sums; the gathered columns (K target logits and the label's) are read by PyTorch (O(N * K))."""
    n, local = logits.shape
    k = st_layout["loc_ids"].shape[1]
    inv_t = 1.0 / cfg.temperature
    mine, loc_ids = st_layout["mine"], st_layout["loc_ids"]
    out = torch.empty(n, 4, dtype=torch.float32, device=logits.device)
    sums = torch.zeros(n, k + 4, dtype=compute, device=logits.device)
    if n == 0:
        m = out[:, 0].to(compute)
        return m, m, sums
    srt, _ = _sorted_local(loc_ids, mine, local)
    block_v, num_warps = launch_params(local)
    _local_sums_kernel[(n,)](
        logits, logits.stride(0), srt, st_layout["counted"].to(torch.int8), out, local, k, inv_t,
        TAIL_SUM=cfg.tail == 0, SEP_CE=cfg.has_ce and inv_t != 1.0,
        BLOCK_V=block_v, BLOCK_K=max(16, triton.next_power_of_2(k)), num_warps=num_warps,
    )  # fmt: skip
    out = out.to(compute)
    zero = torch.zeros((), dtype=compute, device=logits.device)
    sums[:, 0], sums[:, 1 + k], sums[:, 2 + k] = out[:, 1], out[:, 2], out[:, 3]
    sums[:, 1 : 1 + k] = torch.where(mine, logits.gather(1, loc_ids).to(compute), zero)
    if cfg.has_ce:
        z_lab = logits.gather(1, st_layout["lab_loc"])[:, 0].to(compute)
        sums[:, 3 + k] = torch.where(st_layout["lab_mine"], z_lab, zero)
    return out[:, 0] * inv_t, out[:, 0], sums


def local_grad(logits: torch.Tensor, grad: torch.Tensor, st, scale: torch.Tensor, cfg) -> None:
    """Write the gradient of ``sum_n scale_n * loss_n`` w.r.t. the local logits into ``grad`` (may alias them)."""
    n, local = logits.shape
    if n == 0:
        return
    inv_t = 1.0 / cfg.temperature
    f32 = torch.float32
    zero = torch.zeros((), dtype=f32, device=logits.device)
    sc = scale.to(f32)
    counted = st.counted
    soft = torch.where(counted, sc * (cfg.soft_weight * inv_t), zero)
    t = st.terms
    ce_c = torch.where(st.lab_ok, sc * cfg.ce_weight, zero) if cfg.has_ce else torch.zeros_like(soft)
    lse_z = st.lse1 if st.lse1 is not None else st.lse_s
    coef = torch.stack([st.lse_s.to(f32), lse_z.to(f32), -t.big_a.to(f32) * soft, -t.big_a_in.to(f32) * soft,
                        t.b.to(f32) * soft, ce_c, counted.to(f32)], dim=1).contiguous()  # fmt: skip
    fix = torch.where(st.mine, t.a.to(f32) * soft[:, None], zero)
    srt, fix = _sorted_local(st.loc_ids, st.mine, local, fix)
    label = torch.where(st.lab_mine, st.lab_loc[:, 0], -1) if cfg.has_ce else torch.full((n,), -1, device=soft.device)
    k = srt.shape[1]
    block_v, num_warps = launch_params(local)
    _local_grad_kernel[(n,)](
        logits, logits.stride(0), grad, grad.stride(0), srt, fix, coef, label.to(torch.int64).contiguous(), local, k,
        inv_t, NEED_S=cfg.tail != 2, HAS_CE=cfg.has_ce,
        BLOCK_V=block_v, BLOCK_K=max(16, triton.next_power_of_2(k)), num_warps=num_warps,
    )  # fmt: skip
