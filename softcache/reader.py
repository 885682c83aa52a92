"""``open_cache``: random access to the sequences of a cache.

Finding sequence ``i`` is two binary searches over arrays built from the manifest (shard, then batch
within the shard) and one batch read; the last few decoded batches are kept, so reading sequences in
order decodes each batch once.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

import numpy as np

from . import codec
from .format import CacheFormatError, CorruptShardError, get_backend, load_manifest
from .writer import open_fs


class Cache:
    """A read-only view of a cache. ``len(cache)`` sequences, ``cache[i]`` a dict of numpy arrays."""

    def __init__(self, path_or_url, storage_options: dict | None = None, max_cached_batches: int = 4) -> None:
        self.url = str(path_or_url)
        self.fs, self.root = open_fs(path_or_url, storage_options)
        self.manifest = load_manifest(self.fs, self.root)
        m = self.manifest
        self.targets_kind: str = m["targets"]
        self.k: int = m["k"]
        self.vocab_size: int = m["vocab_size"]
        self.temperatures: list[float] = list(m["temperatures"])
        self.samples: int | None = m.get("samples")
        self.params = codec.CodecParams(**m["codec"])
        self.backend = get_backend(m["backend"])
        shards = m["shards"]
        self._shard_start = np.cumsum([0] + [s["sequences"] for s in shards])
        self._batch_start = [np.cumsum([0] + list(s["batches"])) for s in shards]
        self._readers: dict[int, object] = {}
        self._orders: dict[int, codec.IdOrder] = {}
        self._decoded: OrderedDict = OrderedDict()
        self._max_cached = max(1, max_cached_batches)

    # -- sizes ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._shard_start[-1])

    @property
    def num_tokens(self) -> int:
        return sum(s["tokens"] for s in self.manifest["shards"])

    @property
    def num_bytes(self) -> int:
        return sum(s["bytes"] for s in self.manifest["shards"])

    def __repr__(self) -> str:
        return (
            f"Cache({self.url!r}, targets={self.targets_kind}, k={self.k}, vocab_size={self.vocab_size}, "
            f"sequences={len(self)}, tokens={self.num_tokens})"
        )

    # -- access ----------------------------------------------------------------------------------

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        """Sequence ``i``: input_ids (L,) int64, target_ids (L, k) int32 (−1 padding), target_logprobs
        (L, k) float32 (teacher log-probs at T=1 for topk, log(count/N) for sampled; 0 at padding),
        lognorm (L, n_temps) float32, and target_counts (L, k) int32 for sampled caches."""
        shard, batch, j = self._locate(i)
        decoded = self._decode(shard, batch)
        a, b = decoded["offsets"][j], decoded["offsets"][j + 1]
        # Copies: callers may modify records, the decoded batch is shared by later reads.
        return {key: value[a:b].copy() for key, value in decoded.items() if key != "offsets"}

    def targets(self, i: int, temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """Target ids (L, k) and teacher log-probs at ``temperature`` (L, k), 0 at padding.

        topk: exact at every captured temperature, ``lp/τ − n_τ``. sampled: only at the capture
        temperature. Any other temperature is an error.
        """
        rec = self[i]
        col = self.temperature_index(temperature)
        if self.targets_kind == "sampled":
            return rec["target_ids"], rec["target_logprobs"]
        ids = rec["target_ids"]
        return ids, tempered(ids, rec["target_logprobs"], rec["lognorm"][:, col], temperature)

    def captured_column(self, temperature: float) -> int | None:
        """The column of ``lognorm`` for ``temperature``, or None when it was not captured."""
        for col, t in enumerate(self.temperatures):
            if abs(t - float(temperature)) <= 1e-6 * t:
                return col
        return None

    def temperature_index(self, temperature: float) -> int:
        """:meth:`captured_column`, with a clear error when the temperature was not captured."""
        col = self.captured_column(temperature)
        if col is not None:
            return col
        what = "samples were drawn at" if self.targets_kind == "sampled" else "captured temperatures are"
        raise ValueError(
            f"temperature {temperature} was not captured in {self.url}; its {what} {self.temperatures}. "
            "Use one of those, or rebuild the cache with --temperatures including it"
        )

    def to_hf_dataset(self, temperature: float = 1.0, max_length: int | None = None, retemper: bool = False):
        """A ``datasets.Dataset`` of this cache's sequences as training items, decoded on access; see
        :func:`softcache.data.hf_datasets.to_hf_dataset`."""
        from .data.hf_datasets import to_hf_dataset

        return to_hf_dataset(self, temperature=temperature, max_length=max_length, retemper=retemper)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for i in range(len(self)):
            yield self[i]

    def iter_raw_batches(self) -> Iterator[tuple[int, dict, int, dict]]:
        """(shard index, shard header, sequences in batch, encoded streams) for every batch, in order."""
        for s, shard in enumerate(self.manifest["shards"]):
            reader = self._reader(s)
            for b, n in enumerate(shard["batches"]):
                yield s, reader.header, n, reader.read_batch(b)

    # -- internals -------------------------------------------------------------------------------

    def _locate(self, i: int) -> tuple[int, int, int]:
        n = len(self)
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"cache indices must be integers, got {type(i).__name__}")
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sequence {i} out of range for a cache of {n} sequences")
        shard = int(np.searchsorted(self._shard_start, i, side="right")) - 1
        within = i - int(self._shard_start[shard])
        batch = int(np.searchsorted(self._batch_start[shard], within, side="right")) - 1
        return shard, batch, within - int(self._batch_start[shard][batch])

    def _reader(self, shard: int):
        if shard not in self._readers:
            name = self.manifest["shards"][shard]["file"]
            expected = self.manifest["shards"][shard]["bytes"]
            path = f"{self.root}/{name}"
            if not self.fs.exists(path):
                raise CorruptShardError(f"shard {name} is missing from {self.url}")
            if not self.fs.isdir(path) and self.fs.size(path) != expected:
                raise CorruptShardError(
                    f"shard {name} has {self.fs.size(path)} bytes, the manifest says {expected}: truncated or altered"
                )
            reader = self.backend.open(self.fs, self.root, name)
            if reader.num_batches != len(self.manifest["shards"][shard]["batches"]):
                raise CorruptShardError(f"shard {name} holds {reader.num_batches} batches, the manifest says otherwise")
            self._readers[shard] = reader
        return self._readers[shard]

    def _order(self, shard: int) -> codec.IdOrder:
        if shard not in self._orders:
            name = self.manifest["shards"][shard]["file"]
            try:
                self._orders[shard] = codec.IdOrder.from_bytes(self._reader(shard).header["id_order"], self.vocab_size)
            except (KeyError, ValueError) as e:
                raise CorruptShardError(f"shard {name}: bad id order header ({e})") from e
        return self._orders[shard]

    def _decode(self, shard: int, batch: int) -> dict[str, np.ndarray]:
        key = (shard, batch)
        if key in self._decoded:
            self._decoded.move_to_end(key)
            return self._decoded[key]
        name = self.manifest["shards"][shard]["file"]
        streams = self._reader(shard).read_batch(batch)
        n_seqs = self.manifest["shards"][shard]["batches"][batch]
        try:
            decoded = decode_batch(streams, n_seqs, self, self._order(shard))
        except (ValueError, IndexError) as e:
            raise CorruptShardError(f"shard {name}: batch {batch} does not decode ({e})") from e
        self._decoded[key] = decoded
        if len(self._decoded) > self._max_cached:
            self._decoded.popitem(last=False)
        return decoded

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()
        self._decoded.clear()

    def __enter__(self) -> Cache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def tempered(target_ids: np.ndarray, target_logprobs: np.ndarray, lognorm: np.ndarray, temperature: float):
    """Exact teacher log-probs at a captured ``temperature``: ``lp/τ − n_τ`` (L, k) float32, 0 at padding (id −1).

    ``target_logprobs`` are the stored T=1 log-probs (L, k), ``lognorm`` the (L,) column of ``n_τ``; a new array.
    """
    out = target_logprobs / np.float32(temperature)
    out -= lognorm[:, None]
    out[target_ids < 0] = 0
    return out


def decode_batch(streams: dict, n_seqs: int, cache: Cache, order: codec.IdOrder) -> dict[str, np.ndarray]:
    """Encoded streams of one batch → flat arrays over its tokens plus per-sequence ``offsets``."""
    lengths = codec.decode_tokens(streams["seq_lengths"], n_seqs)
    n_tokens = int(lengths.sum())
    out = {
        "offsets": np.concatenate([[0], np.cumsum(lengths)]),
        "input_ids": codec.decode_tokens(streams["input_ids"], n_tokens),
    }
    if cache.targets_kind == "topk":
        ids, lp, lognorm = codec.decode_topk(
            streams, n_tokens, cache.k, len(cache.temperatures), order, cache.params
        )
        out.update(target_ids=ids, target_logprobs=lp, lognorm=lognorm)
    else:
        ids, counts = codec.decode_sampled(streams, n_tokens, cache.k, cache.samples, order)
        with np.errstate(divide="ignore"):
            lp = np.where(counts > 0, np.log(np.maximum(counts, 1) / cache.samples), 0).astype(np.float32)
        out.update(
            target_ids=ids,
            target_logprobs=lp,
            lognorm=np.zeros((n_tokens, 1), np.float32),
            target_counts=counts,
        )
    return out


def open_cache(path_or_url, *, storage_options: dict | None = None) -> Cache:
    """Open the cache at a local path or fsspec URL (``memory://``, ``s3://``, ...)."""
    try:
        return Cache(path_or_url, storage_options=storage_options)
    except FileNotFoundError as e:
        raise CacheFormatError(f"{path_or_url}: not found ({e})") from None
