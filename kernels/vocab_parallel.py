"""Vocab-parallel sparse distillation loss: a student whose logits are sharded over the vocabulary.

Megatron-style tensor parallelism: each rank of ``process_group`` holds a contiguous column slice
``[vocab_start, vocab_start + V_local)`` of the full (N, V) logits, or of the output layer's weight (the fused form);
target ids and labels are global ids and the same on every rank. The loss (replicated on every rank) and each rank's
gradients equal those of the unsharded loss on the concatenated logits. The full logits are never gathered.

Per call there are exactly two all-reduces, each of O(N * K) elements:

1. MAX of the row maxima of the local logits (the shift of the row log-sum-exp);
2. SUM of, per row, the exp-sums (of z / T, and of z when a cross-entropy at T != 1 needs its own), rescaled from
   the local maximum to the global one, the student logits at the K target ids (each id lives on one rank; the
   others add 0), the logit at the label, and, for tail='bucket', the student mass outside the support
   sum_j exp(s_j - m) (1 - c_j) (as in the unsharded dense pass, exact where 1 - sum_S q would round a small tail).

One pass over the local logits computes the local maxima and sums together (online, rescaled after the MAX), so the
logits (or, fused, the chunks of ``hidden @ weight_local.T``) are read twice per call: once for these statistics and
once for the gradient. After the all-reduces every rank holds all per-row quantities (log-sum-exp, log q at the
targets, Q's tail) and computes the row losses and the gradient coefficients redundantly (O(N * K), the row math of
``sparse_kl_torch.row_terms``); the gradient of its own columns needs no further communication.

- :func:`sparse_kl_loss` with ``process_group``: the gradient is computed in forward (backward only scales it);
  torch passes here, Triton ones in ``vocab_parallel_triton.py``.
- :func:`fused_linear_sparse_kl_loss` with ``process_group``: ``vocab_parallel_fused.py``. dH is a sum over the ranks'
  vocabulary slices: one all-reduce of (N, H) in backward, the one any column-parallel output layer needs
  (``reduce_hidden_grad=False`` leaves it to the caller, e.g. Megatron's copy-to-tensor-parallel region).

Every kind and tail is supported (tail='restrict' gathers only the K logits, but still reads the row's exp-sum so a
NaN or +inf logit anywhere makes the loss NaN, as in the unsharded loss). Not traceable by torch.compile (the
collectives run inside a plain autograd.Function).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ._backend import use_triton_for, vocab_parallel_triton
from ._common import LossParams, check_targets, counted_rows, keep_grad_and_reduce, row_scale
from .sparse_kl_torch import CHUNK_ELEMENTS, RowTerms, dense_coefficients, outside_counts, row_terms, tail_mass


@dataclass(frozen=True)
class VocabParallelParams(LossParams):
    """``LossParams`` plus the shard layout and the options of the two losses that apply here."""

    vocab_start: int  # first global column this rank holds
    vocab_size: int  # the full vocabulary V
    check_ids: bool
    check_inputs: bool
    inplace_grad: bool = False  # sparse_kl_loss: write the gradient over the local logits
    reduce_hidden_grad: bool = True  # the fused form: all-reduce dH over the group in backward


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


def prepare(x: torch.Tensor, local: int, ids2d, labels1d, cfg, *, reduction: str, backend: str, num_items_in_batch,
            process_group, vocab_start, vocab_size, **options) -> tuple[VocabParallelParams, torch.Tensor]:
    """The params and the mean's scale of a vocab-parallel call (``x``: the logits or hidden states; ``local``: the
    rank's V_local); ``options``: check_ids, check_inputs and the form's own (inplace_grad, reduce_hidden_grad)."""
    use_triton = use_triton_for(backend, x.device)
    if use_triton and x.dtype == torch.float64:
        raise ValueError("the Triton backend takes float16, bfloat16 or float32; use backend='torch' for float64")
    start, total = shard_layout(local, process_group, vocab_start, vocab_size)
    params = VocabParallelParams(config=cfg, reduction=reduction, use_triton=use_triton, vocab_start=start,
                                 vocab_size=total, **{k: bool(v) for k, v in options.items()})  # fmt: skip
    scale = row_scale(reduction, counted_rows(total, ids2d, labels1d, cfg.ignore_index), num_items_in_batch)
    return params, scale


@dataclass
class RowState:
    """Per-row quantities after the two all-reduces (all O(N * K)), enough for the loss and the local gradient."""

    lse_s: torch.Tensor  # (N,) log-sum-exp of z / T over the full vocabulary
    lse1: torch.Tensor | None  # (N,) log-sum-exp of z (cross-entropy at T != 1), else None
    terms: RowTerms
    counted: torch.Tensor  # (N,) rows that count
    valid: torch.Tensor  # (N, K) slots with a real id
    mine: torch.Tensor  # (N, K) slots whose id is a local column
    loc_ids: torch.Tensor  # (N, K) local column of each slot (0 where not mine)
    lab_ok: torch.Tensor | None  # (N,) rows whose label is a real id (CE only)
    lab_mine: torch.Tensor | None  # (N,) rows whose label is a local column
    lab_loc: torch.Tensor | None  # (N, 1) its local column (0 where not mine)


def layout(target_ids, labels, cfg, vocab_start: int, local: int, vocab_size: int) -> dict:
    ids = target_ids.long()
    valid = (ids >= 0) & (ids < vocab_size)
    end = vocab_start + local
    mine = valid & (ids >= vocab_start) & (ids < end)
    out = dict(valid=valid, mine=mine, loc_ids=torch.where(mine, ids - vocab_start, torch.zeros_like(ids)))
    counted = valid.any(-1)
    lab_ok = lab_mine = lab_loc = None
    if labels is not None:
        lab = labels.long()
        counted = counted & (lab != cfg.ignore_index)
        lab_ok = counted & (lab >= 0) & (lab < vocab_size)
        lab_mine = lab_ok & (lab >= vocab_start) & (lab < end)
        lab_loc = torch.where(lab_mine, lab - vocab_start, torch.zeros_like(lab))[:, None]
    return dict(out, counted=counted, lab_ok=lab_ok, lab_mine=lab_mine, lab_loc=lab_loc)


def row_chunks(n: int, local: int):
    chunk = max(1, min(n, CHUNK_ELEMENTS // max(1, local)))
    for r0 in range(0, n, chunk):
        yield r0, min(n, r0 + chunk)


def local_sums(chunk_logits: Callable[[int, int], torch.Tensor], n: int, local: int, compute: torch.dtype,
               device: torch.device, cfg, lay: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """One pass over the local logits: this rank's partials ``(m_s, m_z, sums)`` (see ``reduce_partials``).

    ``chunk_logits(r0, r1)`` returns rows [r0, r1) of the local logits (any float dtype; read once).
    """
    inv_t = 1.0 / cfg.temperature
    sep_ce = cfg.has_ce and inv_t != 1.0  # the cross-entropy (T = 1) needs its own exp-sum
    mine, loc_ids = lay["mine"], lay["loc_ids"]
    k = loc_ids.shape[1]
    zero = torch.zeros((), dtype=compute, device=device)
    m = torch.empty(n, dtype=compute, device=device)
    sums = torch.zeros(n, k + 4, dtype=compute, device=device)
    for r0, r1 in row_chunks(n, local):
        x = chunk_logits(r0, r1).to(compute)
        m_loc = x.amax(-1)
        m[r0:r1] = m_loc
        shift = torch.where(m_loc == float("-inf"), zero, m_loc)[:, None]  # an all -inf slice sums to 0
        s = x * inv_t if inv_t != 1.0 else x
        e = torch.exp(s - shift * inv_t)
        sums[r0:r1, 0] = e.sum(-1)
        mk = mine[r0:r1]
        sums[r0:r1, 1 : 1 + k] = torch.where(mk, x.gather(1, loc_ids[r0:r1]), zero)
        if cfg.tail == 0:
            sums[r0:r1, 1 + k] = tail_mass(e, outside_counts(e, loc_ids[r0:r1], mk))
        if sep_ce:
            sums[r0:r1, 2 + k] = torch.exp(x - shift).sum(-1)
        if cfg.has_ce:
            z_lab = x.gather(1, lay["lab_loc"][r0:r1])[:, 0]
            sums[r0:r1, 3 + k] = torch.where(lay["lab_mine"][r0:r1], z_lab, zero)
        del x, s, e
    return m * inv_t, m, sums


def reduce_partials(m_s: torch.Tensor, m_z: torch.Tensor, sums: torch.Tensor, group) -> tuple[torch.Tensor, ...]:
    """The two all-reduces: every rank's partials → the row's, in place in ``sums``; returns the global (m_s, m_z).

    Partials of a rank, per row: ``m_s`` the max of its z / T (-inf for an all -inf slice), ``m_z`` the max of its z
    (used only by column 2 + K), and ``sums`` (N, K + 4): [0] sum exp(z / T - m_s), [1:1+K] z at the target ids it
    holds (0 at the others), [1+K] the bucket's tail mass on the scale of [0], [2+K] sum exp(z - m_z) (cross-entropy
    at T != 1), [3+K] z at the label if it holds it. MAX of the maxima, each rank's sums rescaled to them, SUM.
    """
    k = sums.shape[1] - 4
    m_loc = torch.stack([m_s, m_z])
    m = m_loc.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    # a slice of -inf logits holds 0 (its rescale must not be exp(+inf) * 0)
    rescale = torch.where(m_loc == float("-inf"), torch.zeros_like(m), torch.exp(m_loc - m))
    sums[:, 0] *= rescale[0]
    sums[:, 1 + k] *= rescale[0]
    sums[:, 2 + k] *= rescale[1]
    dist.all_reduce(sums, group=group)
    return m[0], m[1]


def row_state(
    local_pass: Callable[[dict], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    local: int,
    target_ids: torch.Tensor,
    target_logprobs: torch.Tensor,
    labels: torch.Tensor | None,
    params: VocabParallelParams,
    group,
) -> tuple[torch.Tensor, RowState]:
    """Per-row losses (N,) float32 (replicated) and the row state.

    ``local_pass(layout)`` makes this rank's partials (``local_sums`` or its Triton form), ``reduce_partials``
    combines them, then the row math.
    """
    cfg = params.config
    inv_t = 1.0 / cfg.temperature
    sep_ce = cfg.has_ce and inv_t != 1.0
    k = target_ids.shape[1]
    lay = layout(target_ids, labels, cfg, params.vocab_start, local, params.vocab_size)
    m_s, m_z, sums = local_pass(lay)
    m_s, m_z = reduce_partials(m_s, m_z, sums, group)
    lse_s = m_s + sums[:, 0].log()
    s_k = sums[:, 1 : 1 + k] * inv_t
    restrict = cfg.tail == 2
    lq_k = None if restrict else s_k - lse_s[:, None]
    q_tail = sums[:, 1 + k] / sums[:, 0] if cfg.tail == 0 else None
    terms = row_terms(s_k, lq_k, target_logprobs.to(sums.dtype), lay["valid"], cfg, q_tail)
    if restrict:  # its loss reads only s_k: a NaN or +inf logit elsewhere in the row shows in the exp-sum
        poison = torch.where(torch.isnan(lse_s), float("nan"), 0.0).to(sums.dtype)
        terms = RowTerms(terms.d + poison, terms.big_a, terms.a + poison[:, None], terms.big_a_in, terms.b)
    row = cfg.soft_weight * terms.d
    lse1 = None
    if cfg.has_ce:
        lse1 = (m_z + sums[:, 2 + k].log()) if sep_ce else lse_s
        row = row - cfg.ce_weight * (sums[:, 3 + k] - lse1)
    losses = torch.where(lay["counted"], row, torch.zeros_like(row)).float()
    state = RowState(lse_s=lse_s, lse1=lse1 if sep_ce else None, terms=terms, **lay)
    return losses, state


def local_grad(x: torch.Tensor, r0: int, r1: int, st: RowState, scale: torch.Tensor, params: VocabParallelParams):
    """The gradient (compute dtype) of ``sum_n scale_n * loss_n`` w.r.t. rows [r0, r1) of the local logits ``x``.

    ``scale`` is (1,) or (N,) (1/denominator for 'mean', times grad_output when the fused form recomputes).
    """
    cfg = params.config
    inv_t = 1.0 / cfg.temperature
    compute = st.lse_s.dtype
    x = x.to(compute)
    sl = slice(r0, r1)
    counted, mine, loc_ids = st.counted[sl], st.mine[sl], st.loc_ids[sl]
    zero = torch.zeros((), dtype=compute, device=x.device)
    sc = scale.to(compute) if scale.numel() == 1 else scale[sl].to(compute)
    soft = torch.where(counted, sc * (cfg.soft_weight * inv_t), zero)
    terms = RowTerms(*(t[sl] for t in st.terms))
    if cfg.tail == 2:  # restrict: no dense soft term
        g = torch.zeros_like(x)
    else:
        s = x * inv_t if inv_t != 1.0 else x
        g = torch.exp(s - st.lse_s[sl, None])  # q over the local columns
        del s
        outside = outside_counts(g, loc_ids, mine) if cfg.tail == 0 else None
        g.mul_(dense_coefficients(terms, soft, outside))
        del outside
    if cfg.has_ce:
        ce_c = torch.where(st.lab_ok[sl], sc * cfg.ce_weight, zero)
        lse1 = st.lse1[sl] if st.lse1 is not None else st.lse_s[sl]
        g.add_(torch.exp(x - lse1[:, None]).mul_(ce_c[:, None]))
        g.scatter_add_(1, st.lab_loc[sl], -torch.where(st.lab_mine[sl], ce_c, zero)[:, None])
    g.scatter_add_(1, loc_ids, torch.where(mine, terms.a * soft[:, None], zero))
    g.masked_fill_(~counted[:, None], 0.0)  # their coefficients are 0, but 0 * nan = nan
    return g


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class VocabParallelSparseKLFunction(torch.autograd.Function):
    """Loss in forward (two all-reduces), with the local gradient computed there too; backward only scales it."""

    @staticmethod
    def forward(ctx, logits, target_ids, target_logprobs, labels, scale, params: VocabParallelParams, group):
        check_targets(params.vocab_size, target_ids, target_logprobs, labels, params.config.ignore_index,
                      ids=params.check_ids, logprobs=params.check_inputs)  # fmt: skip
        n, local = logits.shape
        compute = compute_dtype(logits.dtype)
        if params.use_triton:
            triton_ops = vocab_parallel_triton()
            local_pass = lambda lay: triton_ops.local_sums(logits, lay, params.config, compute)
        else:
            local_pass = lambda lay: local_sums(
                lambda r0, r1: logits[r0:r1], n, local, compute, logits.device, params.config, lay
            )
        losses, st = row_state(local_pass, local, target_ids, target_logprobs, labels, params, group)
        grad = None
        if ctx.needs_input_grad[0]:
            grad = logits if params.inplace_grad else torch.empty_like(logits)
            if params.use_triton:
                triton_ops.local_grad(logits, grad, st, scale, params.config)
            else:
                for r0, r1 in row_chunks(n, local):
                    grad[r0:r1] = local_grad(logits[r0:r1], r0, r1, st, scale, params)
        ctx.use_triton = params.use_triton
        return keep_grad_and_reduce(ctx, losses, grad, scale, params.reduction)

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        torch.ops.softcache.scale_grad_(grad, grad_output.float().contiguous(), ctx.use_triton)
        return grad, None, None, None, None, None, None
