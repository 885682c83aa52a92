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
from ._common import LossParams, check_targets, counted_rows, flatten_inputs, make_config, row_scale
from .fused_linear_torch import fused_linear_torch
from .fused_rows import extended_ids, plan, row_coefficients, triton_backward
from .vocab_parallel import prepare
from .vocab_parallel_fused import VocabParallelFusedLinearFunction


@dataclass(frozen=True)
class FusedLinearParams(LossParams):
    """``LossParams`` plus the option of :func:`fused_linear_sparse_kl_loss` that only this op has."""

    grad_skip_eps: float  # Triton backward: skip tiles whose probabilities are all below this (0: none)


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
            need_s, need_z, _ = plan(cfg)
            ids_ext = extended_ids(target_ids, labels, vocab, cfg)
            # need neither: lse_s is computed anyway, only to see NaN / +inf logits (the matmul dominates the cost)
            lse_s, lse_z, zg, q_tail = ops.fused_forward_triton(
                hidden, weight, bias, ids_ext, 1.0 / cfg.temperature, need_s or not need_z, need_z,
                target_ids.shape[1] if cfg.tail == 0 else None,
            )  # fmt: skip
            losses, coef, row, cin = row_coefficients(zg, lse_s, lse_z, target_ids, target_logprobs, labels,
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
            grads = triton_backward(hidden, weight, bias, ids_ext, coef, row, cin, go, ctx.params.config, ctx.needs,
                                    ctx.params.grad_skip_eps)  # fmt: skip
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
            local logits (torch: chunk by chunk; Triton: tile by tile). ``grad_skip_eps`` does not apply.
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
    params, scale = prepare(
        hidden2d, weight.shape[0], ids2d, labels1d, cfg, reduction=reduction, backend=backend,
        num_items_in_batch=num_items_in_batch, process_group=process_group, vocab_start=vocab_start,
        vocab_size=vocab_size, check_ids=check_ids, check_inputs=check_inputs, reduce_hidden_grad=reduce_hidden_grad,
    )  # fmt: skip
    check_targets(params.vocab_size, ids2d, lp2d, labels1d, cfg.ignore_index, ids=check_ids, logprobs=check_inputs)
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
