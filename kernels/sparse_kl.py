r"""Sparse distillation loss: student logits over the full vocabulary vs cached sparse teacher targets.

Math (DESIGN.md, "Loss semantics"). Per row (leading dims flattened): student logits z in R^V,
s = z / T, log q = log_softmax(s). Teacher slots k with id_k >= 0 form the support S, p_k = exp(lp_k)
(teacher log-probs already at the loss temperature), P = sum_S p, Q = sum_S q_{id_k}.
Duplicate ids are separate bins. Tails choose the two distributions compared:

- ``bucket``: bins (p_1..p_K, max(0, 1 - P)) vs (q_1..q_K, 1 - Q). 1 - Q is summed in the dense pass as
  sum_j q_j (1 - c_j), c_j = the slots holding id j (the mass outside S, less the extra copies of duplicates;
  clamped at 0, which only duplicates can reach), and 1 - P in float64: both exact to the tail's own rounding
  where 1 - sum_S q in fp32 keeps nothing of a tail below ~1e-7.
- ``renormalize`` (forward_kl only): p / P over S vs the full-vocabulary q.
- ``restrict``: p / P vs q / Q, both over S (q / Q is the softmax of the K gathered logits).

Kinds over those bins: forward_kl sum p (log p - log q); reverse_kl sum q (log q - log p);
jsd beta KL(p||m) + (1-beta) KL(q||m), m = beta p + (1-beta) q; tvd 1/2 sum |p - q|.
Every log is clamped below at log(1e-12) (so 0 log 0 = 0 and no finite input gives inf or NaN); the clamp's
derivative is 0 below it. Row loss = alpha T^2 D + (1 - alpha) CE(z, label) (T^2 only with scale_by_t2).

Gradient. With g_b = dD/dq_b per bin and w_b = q_b g_b, the softmax Jacobian gives, w.r.t. s_j,

    dD/ds_j = -A q_j + sum_{k: id_k = j} a_k,

    bucket:       a_k = w_k - g_tail q_k,  A = sum_k a_k      (q_tail = 1 - Q)
    renormalize:  a_k = w_k,               A = sum_k a_k
    restrict:     a_k = w_k - q~_k sum_l w_l,  A = 0           (q~ = q / Q; no dense term)

and dz = ds / T. For forward_kl/bucket this is DESIGN's (1/T)[(P + p_tail) q_j - p_j 1(j in S)
- (p_tail / q_tail) q_j 1(j not in S)]. The cross-entropy adds (1 - alpha)(softmax(z)_j - 1(j = label)).
For bucket the kernels split the sum so that no large terms cancel (``sparse_kl_torch.RowTerms``): g_tail
(~ -p_tail / q_tail) is huge for a student tail far below the teacher's, and at an id both -A q_j and a_k are
~ g_tail q_j, so their difference would lose g_tail times fp32's rounding. With W = sum_k w_k, c_j = the slots
holding id j, and q_tail exact from the dense pass:

    j outside S:  dD/ds_j = -A q_j,                                                   A = W - g_tail (1 - q_tail)
    j in S:       dD/ds_j = -(A_in - g_tail (1 - c_j)) q_j + sum_{k: id_k = j} w_k,   A_in = W + g_tail q_tail

where the coefficient of q_j is formed as one scalar before it multiplies q_j. Either way the gradient is one
dense pass plus K (+1) sparse fix-ups: the structure of a cross-entropy kernel.

Forward computes the gradient already (scaled by 1/denominator for reduction='mean'); backward only
multiplies it by grad_output, and skips even that, on the device, when grad_output is exactly 1.

torch.compile: the forward and the backward scaling are registered as custom ops
(``torch.ops.softcache.sparse_kl_fwd`` / ``sparse_kl_fwd_inplace`` / ``scale_grad_``) with fake
implementations, and the autograd.Function around them is traceable, so compiled graphs hold the loss
without a graph break. The Function takes one frozen ``SparseKLParams``; the ops, whose schema allows only
plain scalars, take the fields of its ``LossConfig`` one by one. The input checks (one host read) run inside
the op and are invisible to the tracer, so they run in compiled graphs too.

Non-finite inputs. A NaN or +inf student logit in a row that counts makes that row's loss NaN (and its gradient
non-finite) on both backends, as the formulas do: log_softmax of such a row is NaN everywhere (+inf - +inf = NaN).
This holds for every tail, also tail='restrict', whose loss reads only the K gathered logits: a NaN elsewhere in
the row still means the student is broken, and a finite loss would hide it. A -inf logit is probability 0 and
allowed. Rows that do not count have loss 0 and a gradient of exactly 0 whatever their logits hold. Teacher
log-probs are checked (``check_inputs``), not propagated.
"""

from dataclasses import dataclass

import torch
from torch import nn

from ._backend import sparse_kl_triton, use_triton_for
from ._common import (
    LossConfig,
    LossParams,
    check_targets,
    counted_rows,
    flatten_inputs,
    keep_grad_and_reduce,
    make_config,
    row_scale,
)
from .sparse_kl_torch import sparse_kl_forward_torch
from .vocab_parallel import VocabParallelSparseKLFunction, prepare


@dataclass(frozen=True)
class SparseKLParams(LossParams):
    """``LossParams`` plus the options of :func:`sparse_kl_loss` that only this op has."""

    check_ids: bool  # validate ids inside the op (one host read, shared with check_inputs)
    check_inputs: bool  # validate teacher log-probs inside the op
    inplace_grad: bool  # write the gradient over the logits


def _forward_impl(logits, target_ids, target_logprobs, labels, scale, cfg, grad, use_triton, check, check_inputs):
    check_targets(logits.shape[1], target_ids, target_logprobs, labels, cfg.ignore_index, ids=check,
                  logprobs=check_inputs)  # fmt: skip
    forward = sparse_kl_triton().sparse_kl_forward_triton if use_triton else sparse_kl_forward_torch
    return forward(logits, target_ids, target_logprobs, labels, scale, cfg, grad)


def _config_scalars(cfg: LossConfig) -> tuple:
    """The fields of ``cfg`` in order, as the custom ops take them (``LossConfig(*scalars)`` rebuilds it)."""
    return cfg.kind, cfg.tail, cfg.temperature, cfg.beta, cfg.soft_weight, cfg.ce_weight, cfg.ignore_index


@torch.library.custom_op("softcache::sparse_kl_fwd", mutates_args=())
def _sparse_kl_fwd(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    target_logprobs: torch.Tensor,
    labels: torch.Tensor | None,
    scale: torch.Tensor,
    kind: int,
    tail: int,
    temperature: float,
    beta: float,
    soft_weight: float,
    ce_weight: float,
    ignore_index: int,
    compute_grad: bool,
    use_triton: bool,
    check: bool,
    check_inputs: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row losses (N,) float32 and the gradient (N, V) in the logits' dtype (empty if not compute_grad)."""
    cfg = LossConfig(kind, tail, temperature, beta, soft_weight, ce_weight, ignore_index)
    grad = torch.empty_like(logits) if compute_grad else None
    losses = _forward_impl(logits, target_ids, target_logprobs, labels, scale, cfg, grad, use_triton, check,
                           check_inputs)  # fmt: skip
    return losses, grad if grad is not None else logits.new_empty(0)


@_sparse_kl_fwd.register_fake
def _(logits, target_ids, target_logprobs, labels, scale, kind, tail, temperature, beta, soft_weight, ce_weight,
      ignore_index, compute_grad, use_triton, check, check_inputs):  # fmt: skip
    losses = logits.new_empty(logits.shape[0], dtype=torch.float32)
    return losses, torch.empty_like(logits) if compute_grad else logits.new_empty(0)


@torch.library.custom_op("softcache::sparse_kl_fwd_inplace", mutates_args=("logits",))
def _sparse_kl_fwd_inplace(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    target_logprobs: torch.Tensor,
    labels: torch.Tensor | None,
    scale: torch.Tensor,
    kind: int,
    tail: int,
    temperature: float,
    beta: float,
    soft_weight: float,
    ce_weight: float,
    ignore_index: int,
    use_triton: bool,
    check: bool,
    check_inputs: bool,
) -> torch.Tensor:
    """Per-row losses (N,); overwrites ``logits`` with the gradient."""
    cfg = LossConfig(kind, tail, temperature, beta, soft_weight, ce_weight, ignore_index)
    return _forward_impl(logits, target_ids, target_logprobs, labels, scale, cfg, logits, use_triton, check,
                         check_inputs)  # fmt: skip


@_sparse_kl_fwd_inplace.register_fake
def _(logits, target_ids, target_logprobs, labels, scale, kind, tail, temperature, beta, soft_weight, ce_weight,
      ignore_index, use_triton, check, check_inputs):  # fmt: skip
    return logits.new_empty(logits.shape[0], dtype=torch.float32)


@torch.library.custom_op("softcache::scale_grad_", mutates_args=("grad",))
def _scale_grad_(grad: torch.Tensor, grad_output: torch.Tensor, use_triton: bool) -> None:
    """In place: grad (N, V) *= grad_output (a scalar or (N,) per-row factors)."""
    if use_triton:
        sparse_kl_triton().scale_rows_triton(grad, grad_output)
    elif grad_output.numel() == 1:
        if grad.device.type == "cpu" and float(grad_output) == 1.0:  # free to check on the CPU
            return
        grad.mul_(grad_output.reshape(()))
    else:
        grad.mul_(grad_output.reshape(-1, 1))


@_scale_grad_.register_fake
def _(grad, grad_output, use_triton):
    return None


class SparseKLFunction(torch.autograd.Function):
    """Loss in forward, with the gradient computed there too; backward scales it by grad_output."""

    @staticmethod
    def forward(ctx, logits, target_ids, target_logprobs, labels, scale, params: SparseKLParams):
        """logits (N, V); targets (N, K); labels (N,) or None; scale (1,) = 1/denominator for 'mean'."""
        compute_grad = ctx.needs_input_grad[0]
        scalars = _config_scalars(params.config)
        if compute_grad and params.inplace_grad:
            losses = torch.ops.softcache.sparse_kl_fwd_inplace(
                logits, target_ids, target_logprobs, labels, scale, *scalars, params.use_triton, params.check_ids,
                params.check_inputs,
            )  # fmt: skip
            grad = logits
        else:
            losses, grad = torch.ops.softcache.sparse_kl_fwd(
                logits, target_ids, target_logprobs, labels, scale, *scalars, compute_grad, params.use_triton,
                params.check_ids, params.check_inputs,
            )  # fmt: skip
        ctx.use_triton = params.use_triton
        return keep_grad_and_reduce(ctx, losses, grad if compute_grad else None, scale, params.reduction)

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        torch.ops.softcache.scale_grad_(grad, grad_output.float().contiguous(), ctx.use_triton)
        return grad, None, None, None, None, None


def sparse_kl_loss(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    target_logprobs: torch.Tensor,
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
    inplace_grad: bool = False,
    process_group=None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Distillation loss between student ``logits`` (..., V) and sparse teacher targets (..., K).

    Args:
        logits: raw student logits (T = 1), float16/bfloat16/float32 (float64 on the torch backend).
        target_ids: (..., K) integer teacher token ids; -1 marks padding slots. Other ids must be in [0, V).
        target_logprobs: (..., K) teacher log-probabilities *at the loss temperature* (ignored in padding slots).
        temperature: T; the student is softened as z / T.
        kind: 'forward_kl' | 'reverse_kl' | 'jsd' | 'tvd'.
        tail: 'bucket' | 'renormalize' (forward_kl only) | 'restrict'.
        beta: the JSD mixing weight, 0 < beta < 1.
        labels: (...) hard labels for the cross-entropy term and for masking; ``ignore_index`` rows do not count.
        alpha: row loss = alpha * T^2 * D + (1 - alpha) * CE; alpha < 1 needs labels.
        reduction: 'mean' (sum over counted rows / (num_items_in_batch or their number); 0 if none count),
            'sum', or 'none' (per row, shape of the leading dims, 0 where a row does not count).
        num_items_in_batch: denominator for 'mean' (e.g. from HF Trainer under gradient accumulation).
        scale_by_t2: multiply the soft term by T^2.
        backend: 'auto' (Triton on CUDA, PyTorch elsewhere), 'triton' or 'torch'.
        check_ids: raise ValueError for ids outside [-1, V) and labels outside [0, V) (not ignore_index).
            Costs one device reduction and one host sync; with False, such ids are treated as padding.
        check_inputs: raise ValueError naming the first row whose teacher log-prob at a real id is NaN, +inf or
            above 1e-4 (rounding may put log(1) slightly above 0; -inf is probability 0 and fine; padding slots
            with id -1 may hold anything). Shares the one reduction and host sync of ``check_ids``; with both
            False the call has no host sync and no checking overhead. Runs inside the op, so also under
            torch.compile(fullgraph=True). NaN/+inf in ``logits`` are not checked: they make the row's loss NaN.
        inplace_grad: write the gradient over ``logits`` during forward, saving one (N, V) buffer. Safe only
            when nothing reads these logits afterwards (typical: ``logits = lm_head(h)`` used by this loss
            alone; the matmul's backward needs h and the weight, not its output). The values of ``logits``
            are destroyed; autograd raises if another op saved them for backward. Non-contiguous logits are
            copied first, which voids the saving.
        process_group: a ``torch.distributed`` group over which the student's logits are sharded by vocabulary
            (Megatron-style tensor parallelism; see ``vocab_parallel.py``). ``logits`` (..., V_local) is then this
            rank's contiguous column slice; target ids and labels are global and the same on every rank. The loss
            (the same on every rank) and the gradient of the local logits equal those of the unsharded loss, with
            two all-reduces per call and none in backward. Every kind and tail, on both backends
            (``vocab_parallel_triton.py`` for the two passes over the slice).
        vocab_start, vocab_size: the slice this rank holds is [vocab_start, vocab_start + V_local) of a vocabulary
            of vocab_size. Default: equal slices in rank order (rank r starts at r * V_local, V = world * V_local).
            Uneven slices pass both. Only with ``process_group``.

    Returns:
        float32 scalar (or per-row float32 for reduction='none'). Gradient flows to ``logits`` only.
        A row that counts and holds a NaN or +inf logit has loss NaN (so 'mean' and 'sum' are NaN) and a
        non-finite gradient on both backends; a -inf logit is probability 0. Rows that do not count give 0 and a
        zero gradient whatever their logits hold.
    """
    cfg = make_config(
        temperature=temperature, kind=kind, tail=tail, beta=beta, has_labels=labels is not None, alpha=alpha,
        ignore_index=ignore_index, reduction=reduction, scale_by_t2=scale_by_t2,
    )  # fmt: skip
    lead = logits.shape[:-1]
    logits2d, ids2d, lp2d, labels1d = flatten_inputs(logits, target_ids, target_logprobs, labels)
    if process_group is not None:
        out = _vocab_parallel_loss(
            logits2d, ids2d, lp2d, labels1d, cfg, reduction=reduction, backend=backend,
            num_items_in_batch=num_items_in_batch, check_ids=check_ids, check_inputs=check_inputs,
            inplace_grad=inplace_grad, process_group=process_group, vocab_start=vocab_start, vocab_size=vocab_size,
        )  # fmt: skip
        return out.reshape(lead) if reduction == "none" else out
    if vocab_start is not None or vocab_size is not None:
        raise ValueError("vocab_start and vocab_size describe a vocab-parallel shard; they need process_group")
    params = SparseKLParams(
        config=cfg, reduction=reduction, use_triton=use_triton_for(backend, logits.device),
        check_ids=bool(check_ids), check_inputs=bool(check_inputs), inplace_grad=bool(inplace_grad),
    )  # fmt: skip
    vocab = logits2d.shape[1]
    scale = row_scale(reduction, counted_rows(vocab, ids2d, labels1d, cfg.ignore_index), num_items_in_batch)
    out = SparseKLFunction.apply(logits2d, ids2d, lp2d.detach(), labels1d, scale, params)
    return out.reshape(lead) if reduction == "none" else out


def _vocab_parallel_loss(logits2d, ids2d, lp2d, labels1d, cfg, *, reduction, backend,
                         num_items_in_batch, check_ids, check_inputs, inplace_grad, process_group, vocab_start,
                         vocab_size):  # fmt: skip
    """:func:`sparse_kl_loss` with ``process_group``: the vocab-parallel torch path (``vocab_parallel.py``)."""
    params, scale = prepare(
        logits2d, logits2d.shape[1], ids2d, labels1d, cfg, reduction=reduction, backend=backend,
        num_items_in_batch=num_items_in_batch, process_group=process_group, vocab_start=vocab_start,
        vocab_size=vocab_size, check_ids=check_ids, check_inputs=check_inputs, inplace_grad=inplace_grad,
    )  # fmt: skip
    return VocabParallelSparseKLFunction.apply(logits2d, ids2d, lp2d.detach(), labels1d, scale, params, process_group)


class SparseKLLoss(nn.Module):
    """Module form of :func:`sparse_kl_loss`; the constructor takes its keyword options.

    ``forward(logits, target_ids, target_logprobs, labels=None, num_items_in_batch=None)``. With ``process_group``
    (and ``vocab_start``/``vocab_size`` for uneven slices) it is the vocab-parallel loss over this rank's slice.
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
        inplace_grad: bool = False,
        process_group=None,
        vocab_start: int | None = None,
        vocab_size: int | None = None,
    ) -> None:
        super().__init__()
        make_config(
            temperature=temperature, kind=kind, tail=tail, beta=beta, has_labels=True, alpha=alpha,
            ignore_index=ignore_index, reduction=reduction, scale_by_t2=scale_by_t2,
        )  # fmt: skip
        self.options = dict(
            temperature=temperature, kind=kind, tail=tail, beta=beta, alpha=alpha, ignore_index=ignore_index,
            reduction=reduction, scale_by_t2=scale_by_t2, backend=backend, check_ids=check_ids,
            check_inputs=check_inputs, inplace_grad=inplace_grad,
        )  # fmt: skip
        if process_group is not None:
            self.options.update(process_group=process_group, vocab_start=vocab_start, vocab_size=vocab_size)
        elif vocab_start is not None or vocab_size is not None:
            raise ValueError("vocab_start and vocab_size describe a vocab-parallel shard; they need process_group")

    def forward(
        self,
        logits: torch.Tensor,
        target_ids: torch.Tensor,
        target_logprobs: torch.Tensor,
        labels: torch.Tensor | None = None,
        num_items_in_batch: int | float | torch.Tensor | None = None,
    ) -> torch.Tensor:
        return sparse_kl_loss(
            logits, target_ids, target_logprobs, labels=labels, num_items_in_batch=num_items_in_batch, **self.options
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
