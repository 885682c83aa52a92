"""Teacher logits → sparse targets: the one implementation, for ``CacheWriter.write_logits`` and ``softcache build``.

Per row of fp32 logits ``z`` (on any device):

* **topk**: the k ids with the largest logits (−1 where the logit is −inf, or so far below the row's largest that its
  probability is 0 in fp32), their log-probs at T = 1 (0 at −1), and for each capture temperature τ the normaliser
  ``n_τ = logsumexp(z/τ) − logsumexp(z)/τ`` (``n_1 = 0`` exactly), all computed on the row minus its maximum.
* **sampled**: ``samples`` draws with replacement from ``softmax(z/τ)`` by inverse CDF (float64 CDF) from float64
  uniforms generated on the CPU by one generator per sequence, seeded by (seed, sequence index), and consumed one
  row after another. The draws therefore depend on neither the batching, the chunking nor the device. They are
  reduced to unique ids by count (descending) and their counts.

One NaN policy: a row whose logits hold NaN or +inf, or are all −inf, is *broken*. :meth:`Sparsifier.rows` reports
broken rows (and computes them from zeros); the caller decides: ``write_logits`` raises naming the position,
``softcache build`` marks the sequence bad (an error, or skipped with ``--skip-bad``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .kinds import Sampled, TargetKind, TopK


@dataclass(frozen=True)
class Sparsifier:
    """The targets of one kind, with the cache's ``k``, capture ``temperatures``, ``samples`` and draw ``seed``."""

    kind: TargetKind
    k: int
    temperatures: tuple[float, ...]
    samples: int | None = None
    seed: int = 0

    def uniforms(self, lengths: list[int], seq_index: list[int], device) -> torch.Tensor | None:
        """The uniforms of the draws of these sequences, row after row (None for kinds that do not sample)."""
        if not isinstance(self.kind, Sampled):
            return None
        out = []
        for length, index in zip(lengths, seq_index, strict=True):
            gen = torch.Generator(device="cpu")
            gen.manual_seed(int(np.random.SeedSequence([self.seed, index]).generate_state(1, np.uint64)[0] >> 1))
            out.append(torch.rand((length, self.samples), generator=gen, dtype=torch.float64))
        return torch.cat(out).to(device)

    def rows(self, z: torch.Tensor, u: torch.Tensor | None = None):
        """Targets of a chunk of fp32 logits (rows, V) → (ids int32, values, lognorm or None, broken (rows,) bool).

        ``values`` are log-probs (float32, topk) or counts (int32, sampled); ``u`` the chunk's rows of
        :meth:`uniforms`. Everything stays on ``z``'s device.
        """
        broken = torch.isnan(z).any(-1) | torch.isposinf(z).any(-1) | torch.isneginf(z).all(-1)
        if bool(broken.any()):  # one sync per chunk; the callers need the values on the host anyway
            z = torch.where(broken[:, None], torch.zeros_like(z), z)
        if isinstance(self.kind, TopK):
            return (*self._topk(z), broken)
        return (*self._sample(z, u), None, broken)

    def _topk(self, z: torch.Tensor):
        # Every output is invariant to shifting a row, and computing after the shift keeps n_τ exact for logits
        # far from 0 (in fp32, logsumexp(z/τ) − logsumexp(z)/τ loses its digits when both are large).
        z = z - z.max(-1, keepdim=True).values
        lse = torch.logsumexp(z, -1)
        vals, idx = torch.topk(z, self.k, dim=-1)
        idx = torch.where(torch.isneginf(vals), -1, idx).int()
        lp = torch.where(idx >= 0, vals - lse[:, None], 0.0)
        n = torch.stack(
            [torch.zeros_like(lse) if t == 1.0 else torch.logsumexp(z / t, -1) - lse / t for t in self.temperatures], -1
        )  # n_1 = 0 by definition: one pass over V saved
        return idx, lp, n

    def _sample(self, z: torch.Tensor, u: torch.Tensor):
        cdf = torch.cumsum(torch.softmax(z.double() / self.temperatures[0], -1), -1)
        draws = torch.searchsorted(cdf, u * cdf[:, -1:]).clamp_(max=z.shape[-1] - 1)
        tally = torch.zeros(z.shape, dtype=torch.int32, device=z.device)
        tally.scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.int32))
        counts, idx = torch.topk(tally, min(self.k, z.shape[-1]), dim=-1)
        return torch.where(counts > 0, idx, -1).int(), counts

    def sequence(self, logits, index: int, chunk_elements: int = 1 << 26):
        """Targets of one sequence's logits (L, V) (a tensor on any device, or numpy), in row chunks of at most
        ``chunk_elements`` fp32 values. → numpy (ids (L, k) int32, values, lognorm or None, broken rows (L,) bool)."""
        logits = logits if isinstance(logits, torch.Tensor) else torch.from_numpy(np.asarray(logits))
        if not logits.is_floating_point():
            raise TypeError(f"logits must be floating point, got {logits.dtype}")
        u = self.uniforms([logits.shape[0]], [index], logits.device)
        step = max(1, chunk_elements // max(1, logits.shape[-1]))
        parts = []
        for a in range(0, logits.shape[0], step):
            chunk_u = None if u is None else u[a : a + step]
            ids, values, lognorm, broken = self.rows(logits[a : a + step].float(), chunk_u)
            parts.append((ids.cpu(), values.cpu(), None if lognorm is None else lognorm.cpu(), broken.cpu()))
        cat = lambda j: torch.cat([p[j] for p in parts]).numpy()  # noqa: E731
        return cat(0), cat(1), None if parts[0][2] is None else cat(2).astype(np.float64), cat(3)


def sparse_targets(logits: torch.Tensor, *, k: int = 64, temperature: float = 1.0, kind: str = "topk",
                   samples: int | None = None, seed: int = 0, chunk_elements: int = 1 << 26):
    """Live teacher logits → sparse targets at ``temperature``, on the logits' device: online distillation with the
    loss and the targets of a cache.

    ``logits`` (..., L, V) (any float dtype; rows are computed in fp32, ``chunk_elements`` values at a time) →
    ``(target_ids (..., L, k) int32, target_logprobs (..., L, k) float32)`` with −1 / 0 at padding: exactly what
    ``SoftTargetDataset(cache, temperature=temperature)`` yields for a cache built from the same logits, minus the
    cache's quantisation. ``kind="topk"``: the k largest logits, captured at ``temperature`` and tempered by the
    kind's rule (``lp/τ − n_τ``, exact: the tail mass is ``1 − Σ p``). ``kind="sampled"``: ``samples`` draws at
    ``temperature`` (``k`` ≥ ``samples``), log-probs ``log(count/samples)``; sequence ``b`` of the batch draws from
    the stream seeded by ``(seed, b)``, as sequence ``b`` of a cache written with that seed. NaN, +inf or all −inf
    rows are a ValueError naming the position.
    """
    from .kinds import get_kind

    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.ndim < 1:
        got = getattr(logits, "dtype", type(logits).__name__)
        raise TypeError(f"logits must be a floating-point torch tensor (..., V), got {got}")
    target_kind = get_kind(kind)
    vocab = logits.shape[-1]
    if not isinstance(k, int) or not 1 <= k <= vocab:
        raise ValueError(f"k must be an integer in [1, {vocab}] (the logits' vocabulary), got {k!r}")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    target_kind.check_settings(k, vocab, [float(temperature)], samples)
    sparsifier = Sparsifier(target_kind, k, (float(temperature),), samples, seed)
    shape = logits.shape
    rows = logits.reshape(-1, vocab)
    if rows.shape[0] == 0:
        empty = torch.empty((*shape[:-1], k), device=logits.device)
        return empty.int(), empty.float()
    length = shape[-2] if logits.ndim > 1 else 1
    n_seqs = rows.shape[0] // length
    u = sparsifier.uniforms([length] * n_seqs, list(range(n_seqs)), logits.device)
    step = max(1, chunk_elements // vocab)
    ids, values = [], []
    for a in range(0, rows.shape[0], step):
        i, v, n, broken = sparsifier.rows(rows[a : a + step].float(), None if u is None else u[a : a + step])
        if bool(broken.any()):
            at = a + int(torch.nonzero(broken)[0, 0])
            where = tuple(int(x) for x in np.unravel_index(at, shape[:-1])) if logits.ndim > 1 else ()
            raise ValueError(f"teacher logits at position {where} are NaN, +inf or all -inf; check the teacher's dtype")
        if n is None:  # sampled: the estimate log(c/N) at the capture temperature, as the cache decodes it
            v = torch.where(v > 0, torch.log(v.clamp(min=1).double() / samples), 0.0).float()
        ids.append(i)
        values.append(target_kind.tempered(i, v, None if n is None else n[:, 0], float(temperature)).float())
    return torch.cat(ids).reshape(*shape[:-1], k), torch.cat(values).reshape(*shape[:-1], k)
