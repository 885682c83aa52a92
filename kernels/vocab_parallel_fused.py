"""The fused output layer's vocab-parallel form: ``hidden @ weight_local.T + bias_local`` and the sparse loss, for a
rank that holds a row slice of the output layer (``fused_linear_sparse_kl_loss(..., process_group=...)``).

Forward makes this rank's partials without materialising its (N, V_local) logits, combines them with the two
all-reduces of ``vocab_parallel.reduce_partials`` and keeps an O(N * K) row state; backward recomputes the local
logits and consumes their gradient into dH (a partial sum: all-reduced over the group unless ``reduce_hidden_grad``
is False), dW_local and db_local, with no further communication.

- torch backend: chunks of rows, ``vocab_parallel.local_sums`` / ``local_grad`` (at most a chunk x V_local of logits).
- Triton backend: the fused kernels of ``fused_linear_triton`` on the local slice with local ids (a slot whose id
  another rank holds is -1 there), the row math of ``fused_rows`` on the combined (global) numbers.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ._backend import fused_linear_triton
from .fused_rows import plan, row_coefficients, triton_backward
from .vocab_parallel import (
    VocabParallelParams,
    compute_dtype,
    layout,
    local_grad,
    local_sums,
    reduce_partials,
    row_chunks,
    row_state,
)


def _triton_partials(hidden, weight, bias, lay: dict, cfg, k: int):
    """This rank's partials (m_s, m_z, sums) from the fused forward kernel, and the local ids it gathered."""
    need_z = plan(cfg)[1]
    ids = torch.where(lay["mine"], lay["loc_ids"], -1)
    if cfg.has_ce:
        ids = torch.cat([ids, torch.where(lay["lab_mine"], lay["lab_loc"][:, 0], -1)[:, None]], dim=1)
    ids = ids.to(torch.int32).contiguous()
    # lse_s also where the loss needs none: a NaN or +inf logit shows there (as in the unsharded fused loss)
    lse_s, lse_z, zg, q_tail = fused_linear_triton().fused_forward_triton(
        hidden, weight, bias, ids, 1.0 / cfg.temperature, True, need_z, k if cfg.tail == 0 else None
    )
    ninf = torch.full_like(lse_s[0], float("-inf"))
    sums = torch.zeros(hidden.shape[0], k + 4, dtype=torch.float32, device=hidden.device)
    sums[:, 0] = lse_s[1].exp()
    sums[:, 1 : 1 + k] = zg[:, :k]
    m_s = torch.where(sums[:, 0] > 0, lse_s[0], ninf)  # a NaN sum stays in sums[:, 0]
    m_z = m_s
    if q_tail is not None:
        sums[:, 1 + k] = q_tail * sums[:, 0]
    if need_z:
        sums[:, 2 + k] = lse_z[1].exp()
        m_z = torch.where(sums[:, 2 + k] > 0, lse_z[0], ninf)
    if cfg.has_ce:
        sums[:, 3 + k] = zg[:, k]
    return m_s, m_z, sums, ids


def _pair(m: torch.Tensor, total: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max, log of the sum at that max), the form ``row_coefficients`` takes (a finite max)."""
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m)), total.log()


class VocabParallelFusedLinearFunction(torch.autograd.Function):
    """Forward: partials, two all-reduces, row state; backward: recompute the local logits and consume them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target_ids, target_logprobs, labels, scale, params: VocabParallelParams,
                group):  # fmt: skip
        n, local = hidden.shape[0], weight.shape[0]
        cfg = params.config
        ctx.needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        ctx.params, ctx.group = params, group
        if params.use_triton:
            k = target_ids.shape[1]
            lay = layout(target_ids, labels, cfg, params.vocab_start, local, params.vocab_size)
            m_s, m_z, sums, ids = _triton_partials(hidden, weight, bias, lay, cfg, k)
            m_s, m_z = reduce_partials(m_s, m_z, sums, group)
            zg = torch.cat([sums[:, 1 : 1 + k], sums[:, 3 + k :]], dim=1) if cfg.has_ce else sums[:, 1 : 1 + k]
            lse_z = _pair(m_z, sums[:, 2 + k]) if plan(cfg)[1] else None
            q_tail = sums[:, 1 + k] / sums[:, 0] if cfg.tail == 0 else None
            losses, coef, row, cin = row_coefficients(zg, _pair(m_s, sums[:, 0]), lse_z, target_ids, target_logprobs,
                                                      labels, params.vocab_size, scale, cfg, q_tail)  # fmt: skip
            ctx.save_for_backward(hidden, weight, bias, ids, coef, row, cin)
        else:

            def chunk_logits(r0, r1):
                h = hidden[r0:r1]
                return torch.addmm(bias, h, weight.t()) if bias is not None else h @ weight.t()

            compute = compute_dtype(hidden.dtype)
            local_pass = lambda lay: local_sums(chunk_logits, n, local, compute, hidden.device, cfg, lay)
            losses, ctx.state = row_state(local_pass, local, target_ids, target_logprobs, labels, params, group)
            ctx.save_for_backward(hidden, weight, bias, scale)
        if params.reduction == "none":
            return losses
        return (losses.sum() * scale).reshape(())

    @staticmethod
    def backward(ctx, grad_output):
        params = ctx.params
        go = grad_output.float().reshape(-1)  # (1,) for 'mean'/'sum', (N,) for 'none'
        if params.use_triton:
            hidden, weight, bias, ids, coef, row, cin = ctx.saved_tensors
            dh, dw, db = triton_backward(hidden, weight, bias, ids, coef, row, cin, go, params.config, ctx.needs, 0.0,
                                         fp32_dh=True)  # fmt: skip
        else:
            hidden, weight, bias, scale = ctx.saved_tensors
            dh, dw, db = _torch_backward(hidden, weight, bias, ctx.state, scale * go, params, ctx.needs)
            ctx.state = None
        if dh is not None and params.reduce_hidden_grad:
            dist.all_reduce(dh, group=ctx.group)
        return (
            dh.to(hidden.dtype) if dh is not None else None,
            dw.to(weight.dtype) if dw is not None else None,
            db.to(bias.dtype) if db is not None else None,
            None, None, None, None, None, None,
        )  # fmt: skip


def _torch_backward(hidden, weight, bias, st, sc, params, needs):
    """(dH, dW, db) in the compute dtype: each chunk's local logits recomputed, their gradient consumed at once."""
    need_dh, need_dw, need_db = needs
    acc = compute_dtype(hidden.dtype)
    n, local = hidden.shape[0], weight.shape[0]
    dh = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if need_dh else None
    dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_dw else None
    db = torch.zeros(local, dtype=acc, device=weight.device) if need_db else None
    for r0, r1 in row_chunks(n, local):
        h = hidden[r0:r1]
        x = torch.addmm(bias, h, weight.t()) if bias is not None else h @ weight.t()
        g = local_grad(x, r0, r1, st, sc, params)
        del x
        if need_dh:
            dh[r0:r1] = g @ weight.to(acc)
        if need_dw:  # rows that do not count have a zero gradient but may hold NaN hidden states: 0 * nan = nan
            dw.addmm_(g.t(), h.masked_fill(~st.counted[r0:r1, None], 0.0).to(acc))
        if need_db:
            db += g.sum(0)
    return dh, dw, db
