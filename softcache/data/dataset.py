"""``SoftTargetDataset``: a map-style (random access) torch dataset over a cache."""

from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset

from .source import CacheSource


class SoftTargetDataset(CacheSource, Dataset):
    """Sequence ``i`` of a cache as a training item (a dict of numpy arrays, ``L`` ≤ ``max_length``):

    ``input_ids`` int64 (L,), ``attention_mask`` int64 (L,) ones, ``labels`` int64 (L,) equal to input_ids
    (Hugging Face convention: the trainer shifts), ``target_ids`` int32 (L, k) with −1 padding and
    ``target_logprobs`` float32 (L, k) at ``temperature`` with 0 at padding. Position ``t`` of the targets
    predicts token ``t+1``, like the student's logits at ``t``. Batch items with :func:`softcache.collate`.

    Args:
        cache_or_url: a :class:`softcache.Cache`, or a path / fsspec URL for ``open_cache``.
        temperature: temperature of ``target_logprobs``. topk caches: exact at a captured temperature;
            any other is an error unless ``retemper=True``. Sampled caches: only the capture temperature.
        max_length: keep the first ``max_length`` positions of each sequence.
        retemper: allow a temperature the cache did not capture by renormalising the stored top-k at it
            (``log_softmax(lp/τ)`` over the kept ids). The teacher's tail mass is lost, so this is opt-in;
            captured temperatures stay exact.
        storage_options: fsspec options when ``cache_or_url`` is a URL.
        allow_incomplete: read a cache whose ``softcache build`` was interrupted (``softcache info`` says
            ``complete: no``); by default that is a ValueError, since it holds only part of the dataset.

    Each DataLoader worker reopens the cache in its own process.
    """

    def __init__(
        self,
        cache_or_url,
        temperature: float = 1.0,
        max_length: int | None = None,
        retemper: bool = False,
        storage_options: dict | None = None,
        allow_incomplete: bool = False,
    ) -> None:
        super().__init__(cache_or_url, temperature, max_length, retemper, storage_options, allow_incomplete)

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return self.item(i)

    def __repr__(self) -> str:
        return (
            f"SoftTargetDataset({self.url!r}, temperature={self.temperature}, max_length={self.max_length}, "
            f"sequences={len(self)})"
        )
