"""Vocab-parallel sparse distillation loss (torch backend): a student whose logits are sharded over the vocabulary.

Megatron-style tensor parallelism: each rank of ``process_group`` holds a contiguous column slice
``[vocab_start, vocab_start + V_local)`` of the full (N, V) logits; target ids and labels are global ids and the
same on every rank. The loss (replicated on every rank) and each rank's gradient w.r.t. its local logits equal
those of the unsharded :func:`sparse_kl_loss` on the concatenated logits. The full logits are never gathered.

Per call there are exactly two all-reduces, each of O(N * K) elements:

1. MAX of the row maxima of the local logits (the shift of the row log-sum-exp);
2. SUM of, per row, the shifted exp-sums (of z / T, and of z when a cross-entropy at T != 1 needs its own),
   the student logits at the K target ids (each id lives on one rank; the others add 0), the logit at the label,
   and, for tail='bucket', the student mass outside the support sum_j exp(s_j - m) (1 - c_j) (as in the unsharded
   dense pass, exact where 1 - sum_S q would round away a small tail).

After them every rank holds all per-row quantities (log-sum-exp, log q at the targets, Q's tail), computes the
row losses and the per-slot coefficients redundantly (O(N * K)), and writes the gradient of its own columns:
``-A q_j + sum_{k: id_k = j} a_k`` for its j, plus the cross-entropy's softmax and -1 at a local label. The
gradient is computed in forward, so backward only scales it by grad_output: no communication in backward.

Rows are processed in chunks (three passes over the local logits: max, sums, gradient), so at most a few
chunk x V_local float32 buffers exist at once, and the number of collectives does not depend on N.

Supported: tail='bucket' with every kind (forward_kl, reverse_kl, jsd, tvd) and tail='renormalize' (forward_kl).
tail='restrict' raises NotImplementedError (it needs the row's NaN check and no dense term; not built yet).
Not traceable by torch.compile (the collectives run inside a plain autograd.Function).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ._common import TAILS, LossConfig, LossParams, check_targets, keep_grad_and_reduce
from .sparse_kl_torch import CHUNK_ELEMENTS, row_terms

SUPPORTED = "tail='bucket' (any kind) or tail='renormalize' (kind='forward_kl')"


@dataclass(frozen=True)
class VocabParallelParams(LossParams):
    """``LossParams`` plus the shard layout and the options of :func:`sparse_kl_loss` that apply here."""

    vocab_start: int  # first global column this rank holds
    vocab_size: int  # the full vocabulary V
    check_ids: bool
    check_inputs: bool
    inplace_grad: bool


def shard_layout(local_vocab: int, process_group, vocab_start: int | None, vocab_size: int | None) -> tuple[int, int]:
    """(vocab_start, vocab_size) of this rank's slice.

    Without ``vocab_start`` the vocabulary is split into equal slices in rank order: rank r holds columns
    [r * V_local, (r + 1) * V_local) and V = world_size * V_local (``vocab_size``, if given, must agree).
    With ``vocab_start`` (uneven slices, e.g. a padded vocabulary), ``vocab_size`` is required; the slices of the
    ranks must tile [0, vocab_size) without overlap (not checked: it would cost a collective).
    """
    if vocab_start is None:
        rank = dist.get_rank(process_group)
        world = dist.get_world_size(process_group)
        start, total = rank * local_vocab, world * local_vocab
        if vocab_size is not None and int(vocab_size) != total:
            raise ValueError(
                f"vocab_size={vocab_size} but equal slices of V_local={local_vocab} over {world} ranks give {total}; "
                "pass vocab_start for uneven slices"
            )
        return start, total
    if vocab_size is None:
        raise ValueError("vocab_start needs vocab_size (the full vocabulary) as well")
    start, total = int(vocab_start), int(vocab_size)
    if start < 0 or start + local_vocab > total:
        raise ValueError(f"the slice [{start}, {start + local_vocab}) is not inside [0, vocab_size={total})")
    return start, total


def check_supported(kind: str, tail: str) -> None:
    if tail not in ("bucket", "renormalize") or (tail == "renormalize" and kind != "forward_kl"):
        raise NotImplementedError(
            f"vocab-parallel sparse_kl_loss (process_group=...) supports {SUPPORTED}; got kind={kind!r}, tail={tail!r}"
        )


def vocab_parallel_forward(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    target_logprobs: torch.Tensor,
    labels: torch.Tensor | None,
    scale: torch.Tensor,
    cfg: LossConfig,
    grad: torch.Tensor | None,
    vocab_start: int,
    vocab_size: int,
    group,
) -> torch.Tensor:
    """Per-row losses (N,) float32 (replicated); fills ``grad`` (N, V_local) when given (may alias ``logits``)."""
    assert cfg.tail in (TAILS["bucket"], TAILS["renormalize"])
    n, local = logits.shape
    dev = logits.device
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    inv_t = 1.0 / cfg.temperature
    bucket = cfg.tail == TAILS["bucket"]
    sep_ce = cfg.has_ce and inv_t != 1.0  # the cross-entropy (T = 1) needs its own exp-sum
    k = target_ids.shape[1]
    chunk = max(1, min(n, CHUNK_ELEMENTS // max(1, local)))
    end = vocab_start + local

    ids = target_ids.long()
    valid = (ids >= 0) & (ids < vocab_size)
    mine = valid & (ids >= vocab_start) & (ids < end)
    loc_ids = torch.where(mine, ids - vocab_start, torch.zeros_like(ids))
    counted = valid.any(-1)
    if labels is not None:
        lab = labels.long()
        counted = counted & (lab != cfg.ignore_index)
        lab_ok = counted & (lab >= 0) & (lab < vocab_size)
        lab_mine = lab_ok & (lab >= vocab_start) & (lab < end)
        lab_loc = torch.where(lab_mine, lab - vocab_start, torch.zeros_like(lab))[:, None]

    # pass 1: row maxima of z (the max of z / T is the max of z times 1/T), all-reduced MAX
    m = torch.empty(n, dtype=compute, device=dev)
    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        m[r0:r1] = logits[r0:r1].to(compute).amax(-1)
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    m_s = m * inv_t

    # pass 2: shifted exp-sums, gathered target logits, label logit, bucket tail mass; one SUM all-reduce
    # columns: [0] sum exp(s - m_s), [1:1+k] s at the target ids, [1+k] tail mass, [2+k] sum exp(z - m), [3+k] z_label
    sums = torch.zeros(n, k + 4, dtype=compute, device=dev)
    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        x = logits[r0:r1].to(compute)
        s = x * inv_t if inv_t != 1.0 else x
        e = torch.exp(s - m_s[r0:r1, None])
        sums[r0:r1, 0] = e.sum(-1)
        mk = mine[r0:r1]
        sums[r0:r1, 1 : 1 + k] = torch.where(mk, s.gather(1, loc_ids[r0:r1]), torch.zeros((), dtype=compute))
        if bucket:
            outside = torch.ones_like(e).scatter_add_(1, loc_ids[r0:r1], -mk.to(compute))
            sums[r0:r1, 1 + k] = torch.linalg.vecdot(e, outside)
        if sep_ce:
            sums[r0:r1, 2 + k] = torch.exp(x - m[r0:r1, None]).sum(-1)
        if cfg.has_ce:
            z_lab = x.gather(1, lab_loc[r0:r1])[:, 0]
            sums[r0:r1, 3 + k] = torch.where(lab_mine[r0:r1], z_lab, torch.zeros((), dtype=compute))
        del x, s, e
    dist.all_reduce(sums, group=group)

    lse_s = m_s + sums[:, 0].log()
    s_k = sums[:, 1 : 1 + k]
    lq_k = s_k - lse_s[:, None]
    q_tail = sums[:, 1 + k] / sums[:, 0] if bucket else None
    d, big_a, a = row_terms(s_k, lq_k, target_logprobs.to(compute), valid, cfg, q_tail)
    row = cfg.soft_weight * d
    if cfg.has_ce:
        lse1 = (m + sums[:, 2 + k].log()) if sep_ce else lse_s
        row = row - cfg.ce_weight * (sums[:, 3 + k] - lse1)
    losses = torch.where(counted, row, torch.zeros_like(row)).float()
    if grad is None:
        return losses

    # pass 3: the gradient of the local columns
    zero = torch.zeros_like(d)
    sc = scale.to(compute)
    soft = torch.where(counted, sc * (cfg.soft_weight * inv_t), zero)
    dense_c = -big_a * soft
    ce_c = torch.where(lab_ok, sc * cfg.ce_weight, zero) if cfg.has_ce else zero
    fix = torch.where(mine, a * soft[:, None], torch.zeros_like(a))
    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        x = logits[r0:r1].to(compute)
        s = x * inv_t if inv_t != 1.0 else x
        g = torch.exp(s - lse_s[r0:r1, None])  # q over the local columns
        if cfg.has_ce and not sep_ce:
            g.mul_((dense_c + ce_c)[r0:r1, None])
        else:
            g.mul_(dense_c[r0:r1, None])
            if cfg.has_ce:
                g.add_(torch.exp(x - lse1[r0:r1, None]).mul_(ce_c[r0:r1, None]))
        del x, s
        g.scatter_add_(1, loc_ids[r0:r1], fix[r0:r1])
        if cfg.has_ce:
            g.scatter_add_(1, lab_loc[r0:r1], -torch.where(lab_mine[r0:r1], ce_c[r0:r1], zero[r0:r1])[:, None])
        g.masked_fill_(~counted[r0:r1, None], 0.0)  # their coefficients are 0, but 0 * nan = nan
        grad[r0:r1] = g
    return losses


class VocabParallelSparseKLFunction(torch.autograd.Function):
    """Loss in forward (two all-reduces), with the local gradient computed there too; backward only scales it."""

    @staticmethod
    def forward(ctx, logits, target_ids, target_logprobs, labels, scale, params: VocabParallelParams, group):
        compute_grad = ctx.needs_input_grad[0]
        check_targets(params.vocab_size, target_ids, target_logprobs, labels, params.config.ignore_index,
                      ids=params.check_ids, logprobs=params.check_inputs)  # fmt: skip
        if compute_grad:
            grad = logits if params.inplace_grad else torch.empty_like(logits)
        else:
            grad = None
        losses = vocab_parallel_forward(
            logits, target_ids, target_logprobs, labels, scale, params.config, grad, params.vocab_start,
            params.vocab_size, group,
        )  # fmt: skip
        return keep_grad_and_reduce(ctx, losses, grad, scale, params.reduction)

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        torch.ops.softcache.scale_grad_(grad, grad_output.float().contiguous(), False)
        return grad, None, None, None, None, None, None
