r"""The sparse distillation loss fused with the output layer: ``sparse_kl_loss(hidden @ weight.T + bias, ...)``
without ever holding the (N, V) logits.

Math. Everything ``sparse_kl_loss`` needs from a row of logits z (see ``sparse_kl.py``) is

    lse_s = logsumexp(z / T)   (not for tail='restrict'),   lse_z = logsumexp(z)   (cross-entropy, T != 1),
    z at the K target ids and at the label.

From these few numbers per row the loss follows, and so do per-row coefficients (the row math of
``sparse_kl_torch.row_terms``) that give the gradient of the logits as

    dZ_j = c_s softmax(z / T)_j + c_z softmax(z)_j + sum_k coef_k 1(j = id_k)   (+ coef_label 1(j = label)),

where with tail='bucket' c_s at a target id is replaced (selected, never corrected by a difference) by that
slot's own coefficient cin_k (``RowTerms``: -(A_in - b (1 - c_k)) times the soft scale). Then dH = dZ W,
dW = dZ^T H and db = sum_rows dZ. The Triton backend (``fused_linear_triton.py``) computes the first list in one
tiled pass over ``H W^T`` (online log-sum-exp, Cut Cross-Entropy style), and in backward
recomputes each tile, forms dZ and consumes it at once into dH, dW and db with fp32 accumulation. Memory beyond
the inputs and their gradients: O(N K) for the per-row state, an fp32 (N, H) accumulator for dH and an fp32 slice
of dW (``SLICE_ELEMENTS``); no (N, V) buffer. Time: the forward matmul, then in backward the recompute plus the
dH and dW products.

The PyTorch backend (``fused_linear_torch.py``) processes chunks of rows (at most chunk x V logits at a time)
and computes the gradients in forward already when the reduction is 'mean' or 'sum' (backward only scales them by
grad_output); with reduction='none' the per-row grad_output is unknown in forward, so it recomputes in backward.

Non-finite inputs, as in ``sparse_kl.py``: a row that counts and whose logits hold a NaN or +inf (a NaN or inf
hidden state, or an overflow) has loss NaN and a non-finite gradient; as with materialised logits, that NaN then
reaches all of dW and db through the matmul. A row that does not count (ignored label, no target ids) stays
inert even when its hidden state is NaN (say a fully masked padding position): its loss is 0, its dH row is 0,
and its hidden state is read as 0 for dW, where the chain rule alone would give 0 * nan = nan.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ._backend import fused_linear_triton, use_triton_for
from ._common import LossConfig, LossParams, check_targets, counted_rows, flatten_inputs, make_config, row_scale
from .fused_linear_torch import fused_linear_torch
from .sparse_kl_torch import row_terms
from .vocab_parallel import VocabParallelFusedLinearFunction, VocabParallelParams, check_fused_backend, shard_layout


@dataclass(frozen=True)
class FusedLinearParams(LossParams):
    """``LossParams`` plus the option of :func:`fused_linear_sparse_kl_loss` that only this op has."""

    grad_skip_eps: float  # Triton backward: skip tiles whose probabilities are all below this (0: none)


def _plan(cfg: LossConfig) -> tuple[bool, bool, bool]:
    """(need_s, need_z, shared): which log-normalisers the loss needs; shared = the CE reuses lse_s (T = 1)."""
    need_s = cfg.tail != 2
    shared = cfg.has_ce and need_s and cfg.temperature == 1.0
    return need_s, cfg.has_ce and not shared, shared


def _extended_ids(target_ids, labels, vocab, cfg):
    """(N, K [+1]) int32 ids to gather and fix up: -1 where a slot is padding/out of range, the label last with CE."""
    ids = target_ids.long()
    ids = torch.where((ids >= 0) & (ids < vocab), ids, torch.full_like(ids, -1))
    if cfg.has_ce:
        lab = labels.long()
        ok = (lab >= 0) & (lab < vocab) & (lab != cfg.ignore_index) & (ids >= 0).any(-1)
        ids = torch.cat([ids, torch.where(ok, lab, torch.full_like(lab, -1))[:, None]], dim=1)
    return ids.to(torch.int32).contiguous()


def _slot_counts(ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(N, K) float c_k: how many valid slots of the row hold id_k (1 without duplicates; O(N K log K))."""
    key = torch.where(valid, ids, torch.full_like(ids, -1))
    srt = key.sort(-1).values
    return (torch.searchsorted(srt, key, right=True) - torch.searchsorted(srt, key)).float()


def _row_coefficients(zg, lse_s, lse_z, target_ids, target_logprobs, labels, vocab, scale, cfg, q_tail=None):
    """Per-row losses (N,) and the gradient coefficients: coef (N, K [+1]) at the extended ids, row (7, N) =
    (max_s, logsum_s, c_s, max_z, logsum_z, c_z, counted), where lse_* = (max, logsum) pairs from the forward kernel
    (logsumexp = max + logsum, kept apart for accuracy) and max = +inf on rows that do not count (their dense
    gradient is then exactly 0; backward reads their hidden states as 0), and cin (N, K), the coefficient of
    softmax(z / T) that replaces c_s at each target id (tail='bucket'; None for the other tails, where the two
    agree). When the loss needs no log-normaliser (tail='restrict' without CE), ``lse_s`` is still given: NaN
    log-sums mark rows with a NaN or +inf logit."""
    need_s, need_z, shared = _plan(cfg)
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
        outside = 1.0 - _slot_counts(ids, valid)
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


class FusedLinearSparseKLFunction(torch.autograd.Function):
    """Forward computes the loss (torch backend, 'mean'/'sum': also the gradients); backward recomputes or scales."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target_ids, target_logprobs, labels, scale, params: FusedLinearParams):
        """hidden (N, H), weight (V, H), bias (V,) or None, targets (N, K), labels (N,) or None, scale (1,)."""
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        any_grad = any(needs)
        vocab = weight.shape[0]
        cfg, reduction = params.config, params.reduction
        ctx.needs, ctx.params = needs, params
        if params.use_triton:
            ops = fused_linear_triton()
            need_s, need_z, _ = _plan(cfg)
            ids_ext = _extended_ids(target_ids, labels, vocab, cfg)
            # need neither: lse_s is computed anyway, only to see NaN / +inf logits (the matmul dominates the cost)
            lse_s, lse_z, zg, q_tail = ops.fused_forward_triton(
                hidden, weight, bias, ids_ext, 1.0 / cfg.temperature, need_s or not need_z, need_z,
                target_ids.shape[1] if cfg.tail == 0 else None,
            )  # fmt: skip
            losses, coef, row, cin = _row_coefficients(zg, lse_s, lse_z, target_ids, target_logprobs, labels,
                                                       vocab, scale, cfg, q_tail)  # fmt: skip
            ctx.mode = "triton"
            if any_grad:
                ctx.save_for_backward(hidden, weight, bias, ids_ext, coef, row, cin)
        elif any_grad and reduction != "none":
            losses, ctx.grads = fused_linear_torch(hidden, weight, bias, target_ids, target_logprobs, labels, scale,
                                                   cfg, needs)  # fmt: skip
            ctx.mode = "scale"
        else:
            losses, _ = fused_linear_torch(hidden, weight, bias, target_ids, target_logprobs, labels, scale, cfg,
                                           (False, False, False))  # fmt: skip
            ctx.mode = "recompute"
            if any_grad:
                ctx.save_for_backward(hidden, weight, bias, target_ids, target_logprobs, labels, scale)
        if reduction == "none":
            return losses
        return (losses.sum() * scale).reshape(())

    @staticmethod
    def backward(ctx, grad_output):
        go = grad_output.float().reshape(-1)  # (1,) for 'mean'/'sum', (N,) for 'none'
        if ctx.mode == "scale":
            grads = tuple(None if g is None else g * go.to(g.dtype) for g in ctx.grads)
            ctx.grads = None
        elif ctx.mode == "recompute":
            hidden, weight, bias, target_ids, target_logprobs, labels, scale = ctx.saved_tensors
            _, grads = fused_linear_torch(hidden, weight, bias, target_ids, target_logprobs, labels, scale * go,
                                          ctx.params.config, ctx.needs)  # fmt: skip
        else:
            hidden, weight, bias, ids_ext, coef, row, cin = ctx.saved_tensors
            cfg = ctx.params.config
            need_s, need_z, _ = _plan(cfg)
            coef = coef * (go[:, None] if go.numel() > 1 else go)
            if cin is not None:
                cin = cin * (go[:, None] if go.numel() > 1 else go)
            row = row.clone()
            row[2] *= go  # the two dense coefficients; maxima and log-sums stay
            row[5] *= go
            grads = fused_linear_triton().fused_backward_triton(
                hidden, weight, bias, ids_ext, coef, row, 1.0 / cfg.temperature, need_s, need_z, ctx.needs,
                ctx.params.grad_skip_eps, cin,
            )  # fmt: skip
        return (*grads, None, None, None, None, None)


def _check_head(hidden, weight, bias):
    h = hidden.shape[-1]
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != h:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must have shape (V, H={h}) like nn.Linear(H, V).weight, got {shape}")
    vocab = weight.shape[0]
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (vocab,)):
        shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"bias must have shape (V={vocab},), got {shape}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}; move them to one device")
        if t.dtype != hidden.dtype:
            raise ValueError(
                f"{name} is {t.dtype} but hidden is {hidden.dtype}; cast one of them, or run under torch.autocast, "
                "which casts all three to the autocast dtype"
            )


def fused_linear_sparse_kl_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target_ids: torch.Tensor,
    target_logprobs: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    kind: str = "forward_kl",
    tail: str = "bucket",
    beta: float = 0.5,
    labels: torch.Tensor | None = None,
    alpha: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | float | torch.Tensor | None = None,
    scale_by_t2: bool = True,
    backend: str = "auto",
    check_ids: bool = True,
    check_inputs: bool = True,
    grad_skip_eps: float = 0.0,
    process_group=None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    reduce_hidden_grad: bool = True,
) -> torch.Tensor:
    """``sparse_kl_loss(hidden @ weight.T + bias, target_ids, target_logprobs, ...)`` without the (N, V) logits.

    Args:
        hidden: (..., H) final hidden states of the student (after the final norm), e.g. (B, T, H).
        weight: (V, H) output-layer weight (``lm_head.weight``; tied input embeddings work as they are).
        target_ids, target_logprobs: (..., K) sparse teacher targets, as for :func:`sparse_kl_loss`.
        bias: optional (V,) output-layer bias.
        temperature, kind, tail, beta, labels, alpha, ignore_index, reduction, num_items_in_batch, scale_by_t2,
            backend, check_ids, check_inputs: exactly as for :func:`sparse_kl_loss` (``inplace_grad`` has no
            meaning here), except that the checks are skipped while torch.compile traces the call: they need a
            host read, which would break the graph (fullgraph=True fails on it). Run one eager step to check.
        grad_skip_eps: Triton backend only. When > 0, backward skips a (rows x vocab) tile whose softmax
            probabilities are all below this value and which holds no target id or label (the Cut Cross-Entropy
            filter; CCE uses eps(dtype) / 32, i.e. 2**-12 for bf16). Approximate: the dropped gradient is at most
            ``grad_skip_eps * tile size`` per row; 0 (default) computes every tile.
        process_group: a ``torch.distributed`` group over which the output layer is sharded by vocabulary
            (Megatron's column-parallel output layer; see ``vocab_parallel.py``): ``weight`` (V_local, H) and ``bias``
            (V_local,) are this rank's rows, ``hidden`` is the same on every rank, target ids and labels are global.
            The loss (the same on every rank) and the gradients of hidden and of the local weight and bias equal the
            unsharded ones, with two all-reduces of O(N K) in forward and no (N, V) buffer; backward recomputes the
            local logits chunk by chunk. Torch backend only; ``grad_skip_eps`` does not apply.
        vocab_start, vocab_size: as for :func:`sparse_kl_loss` (default: equal slices in rank order).
        reduce_hidden_grad: with ``process_group``, all-reduce the gradient of ``hidden`` over the group in backward
            (each rank's slice gives a partial sum), so that it equals the unsharded one. Pass False when the layer
            that produced ``hidden`` already all-reduces its gradient (Megatron's copy-to-tensor-parallel region).

    hidden, weight and bias must share one dtype (under ``torch.autocast`` they are cast to the autocast dtype)
    and one device. Gradients flow to hidden, weight and bias.

    Returns:
        float32 scalar (per-row float32 of shape ``hidden.shape[:-1]`` for reduction='none').
    """
    if isinstance(hidden, torch.Tensor) and torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    cfg = make_config(
        temperature=temperature, kind=kind, tail=tail, beta=beta, has_labels=labels is not None, alpha=alpha,
        ignore_index=ignore_index, reduction=reduction, scale_by_t2=scale_by_t2,
    )  # fmt: skip
    grad_skip_eps = float(grad_skip_eps)
    if not 0.0 <= grad_skip_eps < 1.0:
        raise ValueError(f"grad_skip_eps must be in [0, 1) (a probability threshold), got {grad_skip_eps}")
    lead = hidden.shape[:-1] if isinstance(hidden, torch.Tensor) else ()
    hidden2d, ids2d, lp2d, labels1d = flatten_inputs(hidden, target_ids, target_logprobs, labels, name="hidden")
    _check_head(hidden2d, weight, bias)
    if process_group is not None:
        out = _vocab_parallel_fused(
            hidden2d, weight.contiguous(), bias, ids2d, lp2d, labels1d, cfg, reduction=reduction, backend=backend,
            num_items_in_batch=num_items_in_batch, check_ids=check_ids, check_inputs=check_inputs,
            process_group=process_group, vocab_start=vocab_start, vocab_size=vocab_size,
            reduce_hidden_grad=reduce_hidden_grad,
        )  # fmt: skip
        return out.reshape(lead) if reduction == "none" else out
    if vocab_start is not None or vocab_size is not None:
        raise ValueError("vocab_start and vocab_size describe a vocab-parallel shard; they need process_group")
    params = FusedLinearParams(
        config=cfg, reduction=reduction, use_triton=use_triton_for(backend, hidden2d.device),
        grad_skip_eps=grad_skip_eps,
    )  # fmt: skip
    if params.use_triton and hidden2d.dtype == torch.float64:
        raise ValueError("the Triton backend takes float16, bfloat16 or float32; use backend='torch' for float64")
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    vocab = weight.shape[0]
    if not torch.compiler.is_compiling():
        check_targets(vocab, ids2d, lp2d, labels1d, cfg.ignore_index, ids=check_ids, logprobs=check_inputs)
    scale = row_scale(reduction, counted_rows(vocab, ids2d, labels1d, cfg.ignore_index), num_items_in_batch)
    out = FusedLinearSparseKLFunction.apply(hidden2d, weight, bias, ids2d, lp2d.detach(), labels1d, scale, params)
    return out.reshape(lead) if reduction == "none" else out


def _vocab_parallel_fused(hidden2d, weight, bias, ids2d, lp2d, labels1d, cfg, *, reduction, backend,
                          num_items_in_batch, check_ids, check_inputs, process_group, vocab_start, vocab_size,
                          reduce_hidden_grad):  # fmt: skip
    """:func:`fused_linear_sparse_kl_loss` with ``process_group`` (``vocab_parallel.py``)."""
    check_fused_backend(backend)
    start, total = shard_layout(weight.shape[0], process_group, vocab_start, vocab_size)
    check_targets(total, ids2d, lp2d, labels1d, cfg.ignore_index, ids=check_ids, logprobs=check_inputs)
    params = VocabParallelParams(
        config=cfg, reduction=reduction, use_triton=False, vocab_start=start, vocab_size=total,
        check_ids=bool(check_ids), check_inputs=bool(check_inputs), reduce_hidden_grad=bool(reduce_hidden_grad),
    )  # fmt: skip
    scale = row_scale(reduction, counted_rows(total, ids2d, labels1d, cfg.ignore_index), num_items_in_batch)
    return VocabParallelFusedLinearFunction.apply(hidden2d, weight, bias, ids2d, lp2d.detach(), labels1d, scale,
                                                  params, process_group)  # fmt: skip


class FusedLinearSparseKLLoss(nn.Module):
    """Module form of :func:`fused_linear_sparse_kl_loss`; the constructor takes its keyword options.

    ``forward(hidden, weight, target_ids, target_logprobs, bias=None, labels=None, num_items_in_batch=None)``.
    With ``process_group`` (``vocab_start``, ``vocab_size``, ``reduce_hidden_grad``) it is the vocab-parallel form.
    """

    def __init__(
        self,
        *,
        temperature: float = 1.0,
        kind: str = "forward_kl",
        tail: str = "bucket",
        beta: float = 0.5,
        alpha: float = 1.0,
        ignore_index: int = -100,
        reduction: str = "mean",
        scale_by_t2: bool = True,
        backend: str = "auto",
        check_ids: bool = True,
        check_inputs: bool = True,
        grad_skip_eps: float = 0.0,
        process_group=None,
        vocab_start: int | None = None,
        vocab_size: int | None = None,
        reduce_hidden_grad: bool = True,
    ) -> None:
        super().__init__()
        make_config(
            temperature=temperature, kind=kind, tail=tail, beta=beta, has_labels=True, alpha=alpha,
            ignore_index=ignore_index, reduction=reduction, scale_by_t2=scale_by_t2,
        )  # fmt: skip
        self.options = dict(
            temperature=temperature, kind=kind, tail=tail, beta=beta, alpha=alpha, ignore_index=ignore_index,
            reduction=reduction, scale_by_t2=scale_by_t2, backend=backend, check_ids=check_ids,
            check_inputs=check_inputs, grad_skip_eps=grad_skip_eps,
        )  # fmt: skip
        if process_group is not None:
            self.options.update(process_group=process_group, vocab_start=vocab_start, vocab_size=vocab_size,
                                reduce_hidden_grad=reduce_hidden_grad)  # fmt: skip
        elif vocab_start is not None or vocab_size is not None:
            raise ValueError("vocab_start and vocab_size describe a vocab-parallel shard; they need process_group")

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        target_ids: torch.Tensor,
        target_logprobs: torch.Tensor,
        bias: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        num_items_in_batch: int | float | torch.Tensor | None = None,
    ) -> torch.Tensor:
        return fused_linear_sparse_kl_loss(
            hidden, weight, target_ids, target_logprobs, bias, labels=labels, num_items_in_batch=num_items_in_batch,
            **self.options,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
