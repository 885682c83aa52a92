"""``StreamingSoftTargetDataset``: sequential reads over the batches of a cache, sharded and resumable.

The unit of work is one stored batch (shard, batch). Each epoch permutes the units with
``(seed, epoch)``, deals them to DDP ranks (``units[rank::world_size]``) and then to DataLoader workers
(``[worker::num_workers]``), so every sequence is read exactly once per epoch by one reader. Each reader
decodes its units in order and passes their sequences through a shuffle buffer of ``shuffle_buffer``
sequences with its own random stream. Its position is a tiny state dict (epoch, unit, position in the
unit, references of the buffered sequences, random state), which is what torchdata's
``StatefulDataLoader`` saves per worker; a resumed reader yields exactly the sequences the uninterrupted
one would have yielded, in the same order.
"""

from __future__ import annotations

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from ..ranks import rank_world
from .source import CacheSource


class StreamingSoftTargetDataset(CacheSource, IterableDataset):
    """Items as :class:`SoftTargetDataset` makes them, read batch by batch; for DDP, workers and resumption.

    Args:
        cache_or_url, temperature, max_length, retemper, storage_options, allow_incomplete: as for
            :class:`SoftTargetDataset`.
        shuffle: permute the units each epoch and pass sequences through the shuffle buffer; ``False``
            reads the cache in stored order.
        shuffle_buffer: sequences held for shuffling per reader (memory: about
            ``shuffle_buffer × tokens per sequence × k × 8`` bytes).
        seed: with the epoch (:meth:`set_epoch`), fixes the order: the same seed and epoch give the same
            sequences in the same order on every run; each epoch gives another order.
        rank, world_size: this process's DDP rank; by default from ``torch.distributed`` if initialised,
            else the ``RANK``/``WORLD_SIZE`` environment variables, else a single process.
        even: ranks get whole batches, so their sequence counts can differ, and DDP deadlocks when one rank
            runs out of batches before the others. ``even=True`` drops the surplus (the last sequences of a
            rank's last units) so that every rank yields the same number of sequences from each of its
            DataLoader workers (hence the same number of batches); with ``even=False`` (default, every
            sequence exactly once per epoch) bound the epoch with the trainer's ``max_steps`` instead.

    With DataLoader workers, ``set_epoch`` reaches the workers only when they are created for the epoch
    (the default ``persistent_workers=False``). :meth:`state_dict` describes this process's reader (the
    worker's, when called inside a worker, as ``StatefulDataLoader`` does); a resumed run needs the same
    cache, seed, ranks and number of workers.
    """

    def __init__(
        self,
        cache_or_url,
        temperature: float = 1.0,
        max_length: int | None = None,
        retemper: bool = False,
        shuffle: bool = True,
        shuffle_buffer: int = 1024,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        storage_options: dict | None = None,
        even: bool = False,
        allow_incomplete: bool = False,
    ) -> None:
        super().__init__(cache_or_url, temperature, max_length, retemper, storage_options, allow_incomplete)
        if not isinstance(shuffle_buffer, (int, np.integer)) or shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be a non-negative integer, got {shuffle_buffer!r}")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if (rank is None) != (world_size is None):
            raise ValueError("pass both rank and world_size, or neither")
        self.shuffle, self.shuffle_buffer, self.seed = bool(shuffle), int(shuffle_buffer), int(seed)
        self.rank, self.world_size, self.even = rank, world_size, bool(even)
        self.epoch = 0
        self._resume: dict | None = None
        self._live: dict | None = None

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_live": None}

    def set_epoch(self, epoch: int) -> None:
        """Order of the next iteration; a loaded state for another epoch is dropped."""
        self.epoch = int(epoch)
        if self._resume is not None and self._resume["epoch"] != self.epoch:
            self._resume = None

    # -- the plan of one reader ------------------------------------------------------------------

    def _plan(self, epoch: int, slot: tuple[int, int, int, int]) -> list[tuple[int, int, int]]:
        """(shard, batch, sequences to take) for the reader ``slot`` = (rank, world, worker, workers)."""
        rank, world, worker, workers = slot
        shards = self.cache.manifest.shards
        units = [(s, b, n) for s, shard in enumerate(shards) for b, n in enumerate(shard.batches)]
        units = np.array(units, np.int64).reshape(-1, 3)
        if self.shuffle:
            units = units[np.random.default_rng([self.seed, epoch]).permutation(len(units))]
        slots = [units[r::world][worker::workers] for r in range(world)]
        mine = slots[rank].copy()
        if self.even:
            target = min(int(s[:, 2].sum()) for s in slots)
            if target == 0 and len(units):
                raise ValueError(
                    f"even=True: {self.url} has {len(units)} batches, too few for {world} ranks × {workers} "
                    "workers to get some each; use fewer workers, or write the cache with smaller batch_tokens"
                )
            surplus = int(mine[:, 2].sum()) - target
            for u in range(len(mine) - 1, -1, -1):
                cut = min(surplus, int(mine[u, 2]))
                mine[u, 2] -= cut
                surplus -= cut
        return [(int(s), int(b), int(n)) for s, b, n in mine]

    # -- iteration -------------------------------------------------------------------------------

    def __iter__(self):
        rank, world = rank_world(self.rank, self.world_size)
        info = get_worker_info()
        slot = (rank, world, info.id, info.num_workers) if info is not None else (rank, world, 0, 1)
        plan = self._plan(self.epoch, slot)
        state, self._resume = self._resume, None
        live = {"epoch": self.epoch, "slot": slot, "unit": 0, "position": 0, "refs": [], "items": []}
        live["rng"] = np.random.default_rng([self.seed, self.epoch, slot[0], slot[2]])
        if state is not None and state["rng"] is not None:
            if tuple(state["slot"]) != slot:
                raise ValueError(
                    f"the loaded state is for reader (rank, world_size, worker, num_workers) = {tuple(state['slot'])}, "
                    f"this one is {slot}: resume with the same ranks and DataLoader workers"
                )
            live.update(unit=state["unit"], position=state["position"], refs=[tuple(r) for r in state["buffer"]])
            live["rng"].bit_generator.state = state["rng"]
            live["items"] = self._items_at(plan, live["refs"])
        self._live = live
        return self._run(plan, live)

    def _items_at(self, plan, refs: list[tuple[int, int]]) -> list[dict]:
        """The items of buffered references (unit, sequence), each unit decoded once."""
        items: list = [None] * len(refs)
        for n in sorted(range(len(refs)), key=lambda n: refs[n]):
            unit, j = refs[n]
            items[n] = self.item_from_batch(self.cache.decoded_batch(*plan[unit][:2]), j)
        return items

    def _run(self, plan, live):
        size = self.shuffle_buffer if self.shuffle else 0
        rng, refs, items = live["rng"], live["refs"], live["items"]
        while live["unit"] < len(plan):
            shard, batch, take = plan[live["unit"]]
            decoded = self.cache.decoded_batch(shard, batch) if live["position"] < take else None
            while live["position"] < take:
                ref = (live["unit"], live["position"])
                item = self.item_from_batch(decoded, live["position"])
                live["position"] += 1
                if len(items) < size:
                    refs.append(ref)
                    items.append(item)
                    continue
                if size:
                    j = int(rng.integers(size))
                    item, items[j], refs[j] = items[j], item, ref
                yield item
            live["unit"] += 1
            live["position"] = 0
        while items:
            j = int(rng.integers(len(items)))
            item = items[j]
            items[j], refs[j] = items[-1], refs[-1]
            items.pop()
            refs.pop()
            yield item

    # -- state -----------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Where this process's reader stands: a small dict of plain Python values."""
        live = self._live
        if live is None:
            return {"epoch": self.epoch, "slot": None, "unit": 0, "position": 0, "buffer": [], "rng": None}
        return {
            "epoch": live["epoch"],
            "slot": list(live["slot"]),
            "unit": live["unit"],
            "position": live["position"],
            "buffer": [list(r) for r in live["refs"]],
            "rng": live["rng"].bit_generator.state,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` at the next iteration (its epoch becomes the current one)."""
        missing = {"epoch", "slot", "unit", "position", "buffer", "rng"} - set(state)
        if missing:
            raise ValueError(f"not a StreamingSoftTargetDataset state: missing {sorted(missing)}")
        self.epoch = int(state["epoch"])
        self._resume = state

    def __repr__(self) -> str:
        return (
            f"StreamingSoftTargetDataset({self.url!r}, temperature={self.temperature}, shuffle={self.shuffle}, "
            f"seed={self.seed}, epoch={self.epoch})"
        )
