"""Argument checking and the small per-call plan shared by the Triton and PyTorch backends.

Nothing here touches the (N, V) logits beyond shape and dtype, and nothing here imports triton.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

EPS = 1e-12
LOG_EPS = math.log(EPS)  # every log inside a loss term is clamped below at this value

KINDS = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2, "tvd": 3}
TAILS = {"bucket": 0, "renormalize": 1, "restrict": 2}
REDUCTIONS = ("mean", "sum", "none")
LOGIT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class LossConfig:
    """Scalars that select and weight the loss; the same for every row of one call."""

    kind: int
    tail: int
    temperature: float
    beta: float
    soft_weight: float  # alpha * T^2 (or alpha when not scale_by_t2), multiplies the divergence D
    ce_weight: float  # 1 - alpha, multiplies the hard cross-entropy (0 when no labels)
    ignore_index: int

    @property
    def has_ce(self) -> bool:
        return self.ce_weight != 0.0


@dataclass(frozen=True)
class LossParams:
    """The non-tensor arguments of one loss call, passed whole through ``autograd.Function.apply`` (like Cut
    Cross-Entropy's ``CCEParams``). Each op's Function takes a subclass that adds its own options."""

    config: LossConfig
    reduction: str  # 'mean' | 'sum' | 'none'; the mean's 1/denominator travels as the tensor ``scale``
    use_triton: bool


def make_config(
    *,
    temperature: float,
    kind: str,
    tail: str,
    beta: float,
    has_labels: bool,
    alpha: float,
    ignore_index: int,
    reduction: str,
    scale_by_t2: bool,
) -> LossConfig:
    """Validate the scalar arguments of ``sparse_kl_loss`` and fold them into a ``LossConfig``."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {sorted(TAILS)}, got {tail!r}")
    if tail == "renormalize" and kind != "forward_kl":
        raise ValueError(
            f"tail='renormalize' compares p/P with the full-vocabulary student q and is defined for "
            f"kind='forward_kl' only, got kind={kind!r}; use tail='restrict' or tail='bucket' for {kind}"
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    temperature = float(temperature)
    if not (temperature > 0.0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    beta = float(beta)
    if kind == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"kind='jsd' needs 0 < beta < 1, got beta={beta}")
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if alpha < 1.0 and not has_labels:
        raise ValueError(
            f"alpha={alpha} < 1 mixes in a hard cross-entropy term, which needs labels; pass labels=... or alpha=1.0"
        )
    t2 = temperature * temperature if scale_by_t2 else 1.0
    return LossConfig(
        kind=KINDS[kind],
        tail=TAILS[tail],
        temperature=temperature,
        beta=beta,
        soft_weight=alpha * t2,
        ce_weight=(1.0 - alpha) if has_labels else 0.0,
        ignore_index=int(ignore_index),
    )


def flatten_inputs(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    target_logprobs: torch.Tensor,
    labels: torch.Tensor | None,
    name: str = "logits",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Check shapes, dtypes and devices; return (N, V) logits, (N, K) targets and (N,) labels.

    ``name`` is what error messages call the first tensor (``hidden`` for the fused loss, whose last dim is H).
    """
    last = "H" if name == "hidden" else "V"
    if not isinstance(logits, torch.Tensor) or logits.dim() < 1:
        raise ValueError(f"{name} must be a tensor of shape (..., {last})")
    if logits.dtype not in LOGIT_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {logits.dtype}")
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    if target_ids.dtype.is_floating_point or target_ids.dtype == torch.bool:
        raise ValueError(f"target_ids must be an integer tensor, got {target_ids.dtype}")
    if target_ids.dim() < 1 or target_ids.shape[:-1] != lead:
        raise ValueError(
            f"target_ids must have shape (..., K) with the leading dims of {name} {tuple(lead)}, "
            f"got {tuple(target_ids.shape)}"
        )
    if target_logprobs.shape != target_ids.shape:
        raise ValueError(
            f"target_logprobs must have the shape of target_ids {tuple(target_ids.shape)}, "
            f"got {tuple(target_logprobs.shape)}"
        )
    if not target_logprobs.dtype.is_floating_point:
        raise ValueError(f"target_logprobs must be a float tensor, got {target_logprobs.dtype}")
    k = target_ids.shape[-1]
    if k == 0 or vocab == 0:
        raise ValueError(f"need {last} >= 1 and K >= 1, got {last}={vocab}, K={k}")
    tensors = [("target_ids", target_ids), ("target_logprobs", target_logprobs)]
    if labels is not None:
        if labels.shape != lead:
            raise ValueError(f"labels must have the leading shape of {name} {tuple(lead)}, got {tuple(labels.shape)}")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
        tensors.append(("labels", labels))
    for t_name, t in tensors:
        if t.device != logits.device:
            raise ValueError(f"{t_name} is on {t.device} but {name} is on {logits.device}; move them to one device")
    n = math.prod(lead)
    logits2d = logits.reshape(n, vocab)
    if logits2d.stride(-1) != 1:
        logits2d = logits2d.contiguous()
    ids2d = target_ids.reshape(n, k)
    lp2d = target_logprobs.reshape(n, k)
    if ids2d.stride(-1) != 1:
        ids2d = ids2d.contiguous()
    if lp2d.stride(-1) != 1:
        lp2d = lp2d.contiguous()
    labels1d = labels.reshape(n).contiguous() if labels is not None else None
    return logits2d, ids2d, lp2d, labels1d


LOGPROB_TOL = 1e-4  # log(1) may round slightly above 0; the cache writer allows the same


def check_targets(
    vocab: int,
    target_ids: torch.Tensor,
    target_logprobs: torch.Tensor,
    labels: torch.Tensor | None,
    ignore_index: int,
    *,
    ids: bool = True,
    logprobs: bool = True,
) -> None:
    """Raise ValueError naming the first bad row of (N, K) targets / (N,) labels; a no-op when both are False.

    ``ids``: target ids outside [-1, V), labels outside [0, V) that are not ``ignore_index``.
    ``logprobs``: teacher log-probs at real ids (in [0, V)) that are NaN, +inf or above ``LOGPROB_TOL``; -inf
    (probability 0) is a log-probability, and padding slots (id -1) may hold anything.
    One fused device reduction and one host read (a sync on CUDA), whichever checks are on.
    """
    if not (ids or logprobs):
        return
    bad_id = bad_lab = bad_lp = None
    if ids:
        bad_id = (target_ids < -1) | (target_ids >= vocab)
        if labels is not None:
            bad_lab = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
    if logprobs:
        # ~(lp <= tol) is also true for NaN, which every ordered comparison answers False
        bad_lp = (target_ids >= 0) & (target_ids < vocab) & ~(target_logprobs <= LOGPROB_TOL)
    slots = bad_lp if bad_id is None else (bad_id if bad_lp is None else bad_id | bad_lp)
    bad = slots.any(-1) if bad_lab is None else slots.any(-1) | bad_lab
    if not bool(bad.any()):
        return
    if bad_id is not None and bad_id.any():
        row, slot = (int(i) for i in bad_id.nonzero()[0])
        raise ValueError(
            f"target_ids[{row}, {slot}] = {int(target_ids[row, slot])} (row index after flattening leading dims) "
            f"is outside [-1, V={vocab}); ids must be < vocab_size and padding must be -1"
        )
    if bad_lab is not None and bad_lab.any():
        row = int(bad_lab.nonzero()[0, 0])
        raise ValueError(
            f"labels[{row}] = {int(labels[row])} is outside [0, V={vocab}) and is not ignore_index={ignore_index}"
        )
    row, slot = (int(i) for i in bad_lp.nonzero()[0])
    raise ValueError(
        f"target_logprobs[{row}, {slot}] = {float(target_logprobs[row, slot])} at target id "
        f"{int(target_ids[row, slot])} (row index after flattening leading dims) is not a log-probability: teacher "
        f"log-probs must be <= 0 (up to {LOGPROB_TOL} of rounding) or -inf, never NaN or +inf. Fix the targets where "
        "they are made (the teacher's logits, the tempering), or set that row's target_ids to -1 to drop it; "
        "check_inputs=False skips this check"
    )


def keep_grad_and_reduce(ctx, losses: torch.Tensor, grad: torch.Tensor | None, scale: torch.Tensor, reduction: str):
    """The end of a loss Function's forward: keep the gradient it computed (``grad``, or None) for backward, which
    only scales it; → the per-row ``losses`` (reduction='none') or their sum times ``scale`` as a scalar."""
    if grad is not None:
        ctx.save_for_backward(grad)
    if reduction == "none":
        return losses
    return (losses.sum() * scale).reshape(())


def counted_rows(
    vocab: int, target_ids: torch.Tensor, labels: torch.Tensor | None, ignore_index: int
) -> torch.Tensor:
    """Which rows count in the loss: bool of the leading dims of ``target_ids`` (..., K).

    A row counts when it has a target id in [0, vocab) and, when ``labels`` (...) are given, its label is not
    ``ignore_index``; the denominator of reduction='mean' is their number. Device-side, no host sync.
    """
    counted = ((target_ids >= 0) & (target_ids < vocab)).any(dim=-1)
    if labels is not None:
        counted = counted & (labels != ignore_index)
    return counted


def row_scale(
    reduction: str,
    counted: torch.Tensor,
    num_items_in_batch: int | float | torch.Tensor | None,
) -> torch.Tensor:
    """The (1,) float32 factor each row's loss and gradient carry: 1/denominator for 'mean', else 1.

    Computed on the device (no host sync); 0 when the denominator is 0, so nothing counted gives 0, not NaN.
    """
    device = counted.device
    if reduction != "mean":
        if num_items_in_batch is not None:
            raise ValueError(
                f"num_items_in_batch is the denominator of reduction='mean'; it has no meaning with "
                f"reduction={reduction!r}"
            )
        return torch.ones(1, dtype=torch.float32, device=device)
    if num_items_in_batch is None:
        denom = counted.sum(dtype=torch.float32).reshape(1)
    elif isinstance(num_items_in_batch, torch.Tensor):
        denom = num_items_in_batch.detach().to(device=device, dtype=torch.float32).reshape(1)
    else:
        denom = torch.full((1,), float(num_items_in_batch), dtype=torch.float32, device=device)
    return torch.where(denom > 0, 1.0 / denom.clamp_min(1e-30), torch.zeros_like(denom))
