"""The target kinds a cache can hold, as objects: what each stores, checks, encodes, decodes and how it tempers.

Every place that used to ask "topk or sampled?" asks the cache's kind instead. A kind knows

* its **streams** (the encoded streams of a batch besides ``seq_lengths`` and ``input_ids``);
* its **settings rules** (``check_settings``: e.g. sampled needs ``samples`` and one temperature);
* its **write-time checks** (``check_targets``: the values a caller hands to ``CacheWriter.write_targets``);
* its **codec** (``encode`` / ``decode`` through :mod:`softcache.codec`);
* its **tempering rule** (``tempered``: the teacher log-probs at a temperature, or a clear error).

Adding a kind is one subclass here, its codec streams, and its logits → targets rule in :mod:`softcache.sparsify`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import codec

TOKEN_STREAMS = ("seq_lengths", "input_ids")
"""Streams every batch holds, whatever the kind: sequence lengths and input ids."""


@dataclass(frozen=True)
class Settings:
    """What fixes how a cache's targets are computed and decoded (the manifest's top-level keys)."""

    k: int
    vocab_size: int
    temperatures: tuple[float, ...]
    samples: int | None
    params: codec.CodecParams


class TargetKind:
    """One kind of sparse teacher target. Subclasses fill in the class attributes and the methods."""

    name: str
    streams: tuple[str, ...]
    values_name: str
    """What ``write_targets`` takes beside the ids: ``target_logprobs`` or ``counts``."""
    can_retemper: bool
    """Whether stored targets may be renormalised at a temperature that was not captured (``retemper=True``)."""

    def check_settings(self, k: int, vocab_size: int, temperatures: list[float], samples) -> None:
        raise NotImplementedError

    def check_targets(self, target_ids: np.ndarray, values, lognorm, settings: Settings):
        """Validate what a caller gives ``write_targets`` → (values, lognorm) as stored."""
        raise NotImplementedError

    def encode(self, target_ids, values, lognorm, settings: Settings, order: codec.IdOrder) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def decode(self, streams, n_tokens: int, settings: Settings, order: codec.IdOrder) -> dict[str, np.ndarray]:
        """→ target_ids (L, k) int32, target_logprobs (L, k) float32, lognorm (L, n_temps) float32 (+ extras)."""
        raise NotImplementedError

    def tempered(self, target_ids, target_logprobs, lognorm_column, temperature: float) -> np.ndarray:
        """Teacher log-probs at a captured ``temperature`` (the caller found its ``lognorm`` column), 0 at padding.
        numpy arrays or torch tensors (``softcache.sparse_targets`` tempers live targets on their device)."""
        raise NotImplementedError

    def not_captured(self, temperature: float, temperatures: list[float], where: str) -> str:
        """The error message for a temperature that was not captured."""
        return (
            f"temperature {temperature} was not captured in {where}; its captured temperatures are {temperatures}. "
            "Use one of those, or rebuild the cache with --temperatures including it"
        )

    def __repr__(self) -> str:
        return f"<target kind {self.name}>"


class TopK(TargetKind):
    """The k ids with the largest teacher logits, their log-probs at T = 1, and the exact normaliser ``n_τ`` of
    every captured temperature, so that ``lp/τ − n_τ`` and the tail mass are exact at each."""

    name = "topk"
    streams = ("n_targets", "target_codes", "q_head", "q_delta", "q_escape", "lognorm")
    values_name = "target_logprobs"
    can_retemper = True

    def check_settings(self, k, vocab_size, temperatures, samples) -> None:
        if samples is not None:
            raise ValueError("samples= only applies to targets='sampled'")

    def check_targets(self, target_ids, values, lognorm, settings):
        length = target_ids.shape[0]
        temps = list(settings.temperatures)
        if values is None:
            raise ValueError("top-k caches need target_logprobs (teacher log-probs at temperature 1)")
        lp = as_array(values, "target_logprobs", np.floating).astype(np.float64)
        _same_shape(lp, target_ids, "target_logprobs")
        real = target_ids >= 0
        if np.isnan(lp[real]).any() or (lp[real] > 1e-4).any():
            raise ValueError("target_logprobs must be log-probabilities (≤ 0, not NaN) at every id ≥ 0")
        if lognorm is None:
            if temps != [1.0]:
                raise ValueError(
                    f"lognorm (L, {len(temps)}) is required for temperatures {temps}: "
                    "n_τ = logsumexp(z/τ) − logsumexp(z)/τ from the full logits"
                )
            lognorm = np.zeros((length, 1))
        lognorm = as_array(lognorm, "lognorm", np.floating).astype(np.float64)
        if lognorm.shape != (length, len(temps)) or not np.isfinite(lognorm).all():
            raise ValueError(f"lognorm must be finite with shape ({length}, {len(temps)})")
        return np.minimum(lp, 0.0), lognorm

    def encode(self, target_ids, values, lognorm, settings, order):
        return codec.encode_topk(target_ids, values, lognorm, settings.temperatures, order, settings.params)

    def decode(self, streams, n_tokens, settings, order):
        ids, lp, lognorm = codec.decode_topk(
            streams, n_tokens, settings.k, len(settings.temperatures), order, settings.params
        )
        return {"target_ids": ids, "target_logprobs": lp, "lognorm": lognorm}

    def tempered(self, target_ids, target_logprobs, lognorm_column, temperature):
        out = target_logprobs / np.float32(temperature)
        out -= lognorm_column[:, None]
        out[target_ids < 0] = 0
        return out


class Sampled(TargetKind):
    """Random-Sampling KD: ``samples`` draws at one capture temperature, kept as unique ids and their counts;
    ``log(count/N)`` is the stored log-prob, valid only at that temperature."""

    name = "sampled"
    streams = ("n_targets", "target_codes", "q_head", "q_delta", "q_escape")
    values_name = "counts"
    can_retemper = False  # a sample drawn at one temperature says nothing exact about another

    def check_settings(self, k, vocab_size, temperatures, samples) -> None:
        if not isinstance(samples, (int, np.integer)) or samples < 1:
            raise ValueError(f"targets='sampled' needs samples= a positive integer, got {samples!r}")
        if len(temperatures) != 1:
            raise ValueError(f"sampled targets are drawn at one temperature; got temperatures={temperatures}")
        if k < min(samples, vocab_size):
            raise ValueError(
                f"k={k} < samples={samples}: a position can draw up to {min(samples, vocab_size)} unique ids; "
                f"set k ≥ {min(samples, vocab_size)} (storage is per id actually drawn, so a large k costs nothing)"
            )

    def check_targets(self, target_ids, values, lognorm, settings):
        if values is None:
            raise ValueError("sampled caches need counts= (the number of draws of each target id)")
        counts = as_array(values, "counts", np.integer)
        _same_shape(counts, target_ids, "counts")
        position = codec.invalid_count_row(target_ids, counts, settings.samples)
        if position is not None:  # checked now, so that a bad sequence never reaches a batch
            raise ValueError(
                f"counts at position {position}: each drawn id needs a count in [1, samples={settings.samples}] "
                f"and a position's counts may add up to at most {settings.samples}"
            )
        return counts, None

    def encode(self, target_ids, values, lognorm, settings, order):
        return codec.encode_sampled(target_ids, values, settings.samples, order)

    def decode(self, streams, n_tokens, settings, order):
        ids, counts = codec.decode_sampled(streams, n_tokens, settings.k, settings.samples, order)
        with np.errstate(divide="ignore"):
            lp = np.where(counts > 0, np.log(np.maximum(counts, 1) / settings.samples), 0).astype(np.float32)
        return {
            "target_ids": ids,
            "target_logprobs": lp,
            "lognorm": np.zeros((n_tokens, 1), np.float32),
            "target_counts": counts,
        }

    def tempered(self, target_ids, target_logprobs, lognorm_column, temperature):
        return target_logprobs * 1  # a copy, of a numpy array or a torch tensor

    def not_captured(self, temperature, temperatures, where):
        return (
            f"temperature {temperature} was not captured in {where}; its samples were drawn at {temperatures}. "
            "Use that temperature, or rebuild the cache with --temperatures including it"
        )


KINDS: dict[str, TargetKind] = {kind.name: kind for kind in (TopK(), Sampled())}


def get_kind(name: str) -> TargetKind:
    """The kind called ``name`` (a manifest's ``targets``)."""
    try:
        return KINDS[name]
    except (KeyError, TypeError):
        raise ValueError(f"targets must be one of {', '.join(map(repr, KINDS))}, got {name!r}") from None


def as_array(x, name: str, kind=None) -> np.ndarray:
    """``x`` (numpy, a list, or a torch tensor on any device) as a numpy array; ``kind`` (np.integer or
    np.floating) is checked when given."""
    if hasattr(x, "detach"):  # a torch tensor on any device
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if kind is not None and x.size and not np.issubdtype(x.dtype, kind):
        what = "integers" if kind is np.integer else "floats"
        raise TypeError(f"{name} must hold {what}, got dtype {x.dtype}")
    return x


def _same_shape(x: np.ndarray, like: np.ndarray, name: str) -> None:
    if x.shape != like.shape:
        raise ValueError(f"{name} must have the shape of target_ids {tuple(like.shape)}, got {tuple(x.shape)}")
