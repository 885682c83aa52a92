"""Teacher logits → sparse targets, on the logits' device, in row chunks of bounded size.

top-k: the k ids with the largest logits, their log-probs at T=1 and, for each capture temperature τ,
``n_τ = logsumexp(z/τ) − logsumexp(z)/τ``. sampled: ``samples`` draws with replacement from
``softmax(z/τ)``, reduced to unique ids and counts. Both return numpy arrays on the CPU.
"""

from __future__ import annotations

import numpy as np
import torch


def _as_tensor(logits) -> torch.Tensor:
    return logits if isinstance(logits, torch.Tensor) else torch.from_numpy(np.asarray(logits))


def _chunks(logits: torch.Tensor, chunk_elements: int, where: str):
    if not (logits.is_floating_point()):
        raise TypeError(f"{where}: logits must be floating point, got {logits.dtype}")
    rows = max(1, chunk_elements // max(1, logits.shape[-1]))
    for start in range(0, logits.shape[0], rows):
        z = logits[start : start + rows].float()
        bad = torch.isnan(z) | (z == float("inf"))
        dead = torch.isneginf(z).all(-1)
        if bool(bad.any() | dead.any()):  # one sync per chunk; the encode needs the values on the host anyway
            row = int(torch.nonzero(bad.any(-1) | dead)[0, 0]) + start
            raise ValueError(
                f"{where}, position {row}: teacher logits are NaN, +inf or all -inf; "
                "check the teacher's dtype (fp16 overflow) and inputs"
            )
        yield z


def topk_targets(logits, k: int, temperatures, chunk_elements: int = 1 << 26, where: str = "sequence"):
    """→ ids (L, k) int64 (−1 where the logit is −inf), log-probs (L, k) float64, lognorm (L, n_temps)."""
    logits = _as_tensor(logits)
    ids, lps, norms = [], [], []
    for z in _chunks(logits, chunk_elements, where):
        lse = torch.logsumexp(z, -1)
        vals, idx = torch.topk(z, k, dim=-1)
        lp = vals - lse[:, None]
        idx = torch.where(torch.isneginf(vals), -1, idx)
        n = torch.stack([torch.logsumexp(z / t, -1) - lse / t for t in temperatures], -1)
        ids.append(idx.cpu())
        lps.append(lp.cpu())
        norms.append(n.cpu())
    return (
        torch.cat(ids).numpy().astype(np.int64),
        torch.cat(lps).double().numpy(),
        torch.cat(norms).double().numpy(),
    )


def sampled_targets(
    logits,
    k: int,
    temperature: float,
    samples: int,
    seed: tuple[int, int],
    chunk_elements: int = 1 << 26,
    where: str = "sequence",
):
    """→ unique ids (L, k) int64 with −1 padding and their counts (L, k) out of ``samples`` draws.

    Draws come from a generator seeded by ``seed`` (e.g. (user seed, sequence index)), so a sequence
    gets the same samples whatever it is batched with.
    """
    logits = _as_tensor(logits)
    gen = torch.Generator(device=logits.device)
    gen.manual_seed(int(np.random.SeedSequence(list(seed)).generate_state(1, np.uint64)[0] >> 1))
    ids, counts = [], []
    for z in _chunks(logits, chunk_elements, where):
        probs = torch.softmax(z / temperature, -1)
        draws = torch.multinomial(probs, samples, replacement=True, generator=gen)
        tally = torch.zeros_like(z, dtype=torch.int32).scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.int32))
        c, idx = torch.topk(tally, min(k, z.shape[-1]), dim=-1)
        idx = torch.where(c > 0, idx, -1)
        ids.append(idx.cpu())
        counts.append(c.cpu())
    return torch.cat(ids).numpy().astype(np.int64), torch.cat(counts).numpy().astype(np.int64)
