"""``BatchGroupedSampler``: a shuffled order for :class:`SoftTargetDataset` that decodes each stored batch once."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler


class BatchGroupedSampler(Sampler[int]):
    """Shuffled sequence indices, grouped by the batches they are stored in.

    A plain random order reads a random stored batch for every sequence: with ``b`` sequences per stored
    batch the reader decodes each batch up to ``b`` times (it keeps only its last few decoded batches).
    This sampler permutes the stored batches with ``(seed, epoch)`` and then the sequences within each run
    of ``group`` consecutive batches, so each batch is decoded once per epoch in one process. ``group``
    should not exceed the reader's cache of decoded batches (4). Every sequence appears once per epoch.

    Use as ``DataLoader(dataset, sampler=BatchGroupedSampler(dataset), ...)``; call :meth:`set_epoch`
    each epoch. With DataLoader workers or ranks that split batches of this order, each stored batch is
    decoded by at most every worker that receives one of its sequences.
    """

    def __init__(self, dataset, seed: int = 0, group: int = 4) -> None:
        if not isinstance(group, (int, np.integer)) or group < 1:
            raise ValueError(f"group must be a positive integer, got {group!r}")
        counts = [n for shard in dataset.cache.manifest.shards for n in shard.batches]
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.seed, self.group, self.epoch = int(seed), int(group), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        batches = rng.permutation(len(self.starts) - 1)
        for g in range(0, len(batches), self.group):
            members = [np.arange(self.starts[b], self.starts[b + 1]) for b in batches[g : g + self.group]]
            yield from rng.permutation(np.concatenate(members)).tolist()
