"""What both datasets share: the cache handle (reopened in each process), targets at one temperature, items.

An *item* is one sequence as a training loop wants it: ``input_ids``, ``attention_mask`` (ones), ``labels``
(= ``input_ids``, the Hugging Face convention: the model or trainer shifts; −100 at tokens a cache's loss mask
does not train) and ``target_ids`` /
``target_logprobs`` at the dataset's temperature. Position ``t`` of the targets is the teacher's distribution
of token ``t+1``, i.e. what the student's logits at ``t`` predict, exactly as stored in the cache. A masked-LM cache
(``--objective mlm``, :attr:`CacheSource.causal` False) gives the corrupted ``input_ids``, ``labels`` = the original
token at the masked positions (−100 elsewhere) and targets of token ``t`` at position ``t``, none shifted.
"""

from __future__ import annotations

import os

import numpy as np

from ..reader import Cache, open_cache
from .checks import check_student


class Tempering:
    """Turns stored log-probs into log-probs at ``temperature``; chosen once, from what the cache captured.

    * topk at a captured temperature τ: exact, ``lp/τ − n_τ`` (as ``Cache.targets``); the tail mass
      ``1 − Σ p`` is the teacher's.
    * topk at any other temperature with ``retemper=True``: ``log_softmax(lp/τ)`` over the stored ids. The
      tail beyond the top-k is lost (the kept ids sum to 1), which is why it must be asked for.
    * sampled: only at the capture temperature (``log(count/N)``); no re-tempering of a sample is valid.
    """

    def __init__(self, cache: Cache, temperature: float, retemper: bool) -> None:
        temperature = float(temperature)
        if not (np.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a positive number, got {temperature}")
        self.temperature = temperature
        self.kind = cache.kind
        self.column: int | None = None
        self.retemper = False
        captured = cache.captured_column(temperature)
        if captured is not None:
            self.column = captured
        elif not cache.kind.can_retemper:
            raise ValueError(
                f"temperature={temperature}: the sampled cache {cache.url} was drawn at temperature "
                f"{cache.temperatures[0]} and can only be used there (retemper does not apply to samples); "
                f"use temperature={cache.temperatures[0]}, or rebuild the cache with --temperatures {temperature}"
            )
        elif retemper:
            self.retemper = True
        else:
            raise ValueError(
                f"temperature={temperature} was not captured in {cache.url}; the captured temperatures are "
                f"{cache.temperatures}. Either rebuild the cache with --temperatures including {temperature} "
                "(exact), or pass retemper=True to renormalise the stored top-k at that temperature (the tail "
                "beyond the top-k is lost)"
            )

    def __call__(self, target_ids: np.ndarray, target_logprobs: np.ndarray, lognorm: np.ndarray) -> np.ndarray:
        """Log-probs (L, k) float32 at the temperature, 0 at padding (id −1); a new array."""
        if self.column is not None:
            return self.kind.tempered(target_ids, target_logprobs, lognorm[:, self.column], self.temperature)
        pad = target_ids < 0
        scaled = np.where(pad, -np.inf, target_logprobs / np.float32(self.temperature))
        top = np.max(scaled, axis=1, keepdims=True)
        top[~np.isfinite(top)] = 0
        with np.errstate(divide="ignore"):
            out = scaled - top - np.log(np.exp(scaled - top).sum(1, keepdims=True))
        out[pad] = 0
        return out


class CacheSource:
    """A cache opened once per process, plus the temperature and truncation of the items made from it."""

    def __init__(self, cache_or_url, temperature: float, max_length: int | None, retemper: bool, storage_options,
                 allow_incomplete: bool = False):  # fmt: skip
        if isinstance(cache_or_url, Cache):
            self._cache = cache_or_url
            self.url = cache_or_url.url
            self.storage_options = storage_options or getattr(cache_or_url.fs, "storage_options", None)
        else:
            self.url = str(cache_or_url)
            self.storage_options = storage_options
            self._cache = open_cache(self.url, storage_options=storage_options)
        state = self._cache.manifest.build_state
        if state is not None and not state.complete and not allow_incomplete:
            raise ValueError(
                f"the cache {self.url} is incomplete: its build was interrupted after {len(self._cache):,} sequences "
                "(softcache info: complete: no). Rerun the same softcache build command to finish it, or pass "
                "allow_incomplete=True to train on the sequences written so far"
            )
        self._pid = os.getpid()
        if max_length is not None and (not isinstance(max_length, (int, np.integer)) or max_length < 1):
            raise ValueError(f"max_length must be a positive integer or None, got {max_length!r}")
        self.max_length = None if max_length is None else int(max_length)
        self.tempering = Tempering(self._cache, temperature, retemper)

    @property
    def cache(self) -> Cache:
        """The cache; reopened in a new process (a forked DataLoader worker must not share file handles)."""
        if self._cache is None or self._pid != os.getpid():
            self._cache = open_cache(self.url, storage_options=self.storage_options)
            self._pid = os.getpid()
        return self._cache

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": None}

    @property
    def causal(self) -> bool:
        """False for a masked-LM cache (``--objective mlm``): its labels and targets are not shifted."""
        return not any(extra.name == "mlm_labels" for extra in self.cache.extras)

    @property
    def temperature(self) -> float:
        return self.tempering.temperature

    @property
    def vocab_size(self) -> int:
        return self.cache.vocab_size

    @property
    def k(self) -> int:
        return self.cache.k

    def check_student(self, model=None, *, vocab_size: int | None = None, tokenizer=None) -> int:
        """Start-up checks against the student; returns the number of extra student logits. See
        :func:`softcache.data.check_student`."""
        return check_student(self.cache, model, vocab_size=vocab_size, tokenizer=tokenizer)

    def item(self, i: int) -> dict[str, np.ndarray]:
        """Sequence ``i`` of the cache as an item."""
        cache = self.cache
        shard, batch, j = cache.locate(i)
        return self.item_from_batch(cache.decoded_batch(shard, batch), j)

    def item_from_batch(self, decoded: dict[str, np.ndarray], j: int) -> dict[str, np.ndarray]:
        """Sequence ``j`` of a decoded batch as an item (with ``teacher_hidden`` / ``teacher_attentions`` when the
        cache stores them)."""
        a, b = int(decoded["offsets"][j]), int(decoded["offsets"][j + 1])
        if self.max_length is not None:
            b = min(b, a + self.max_length)
        input_ids = decoded["input_ids"][a:b].copy()
        target_ids = decoded["target_ids"][a:b].copy()
        labels = input_ids.copy()
        if "loss_mask" in decoded:  # untrained tokens: −100, so the soft and the hard term both skip them
            labels[~decoded["loss_mask"][a:b]] = -100
        if "mlm_labels" in decoded:  # masked LM: the original token where masked, −100 elsewhere (not shifted)
            labels = np.where(decoded["mlm_labels"][a:b] >= 0, decoded["mlm_labels"][a:b], -100)
        item = {
            "input_ids": input_ids,
            "attention_mask": np.ones_like(input_ids),
            "labels": labels,
            "target_ids": target_ids,
            "target_logprobs": self.tempering(target_ids, decoded["target_logprobs"][a:b], decoded["lognorm"][a:b]),
        }
        for extra in self.cache.extras:
            if extra.name not in ("loss_mask", "mlm_labels"):  # features (copies: the decoded batch is shared)
                for key, value in extra.item(decoded, j, a, b).items():
                    item[key] = {layer: array.copy() for layer, array in value.items()}
        return item
