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
from .errors import CacheFormatError, CorruptShardError
from .extras import Extra
from .format import Manifest, ShardEntry, ShardReader, get_backend, join, load_manifest, open_fs
from .format.fs import check_plain_file
from .kinds import TargetKind


class Cache:
    """A read-only view of a cache. ``len(cache)`` sequences, ``cache[i]`` a dict of numpy arrays."""

    def __init__(self, path_or_url, storage_options: dict | None = None, max_cached_batches: int = 4) -> None:
        self.url = str(path_or_url)
        self.fs, self.root = open_fs(path_or_url, storage_options)
        self.manifest: Manifest = load_manifest(self.fs, self.root)
        m = self.manifest
        self.kind: TargetKind = m.kind
        self.targets_kind: str = m.targets
        self.k: int = m.k
        self.vocab_size: int = m.vocab_size
        self.temperatures: list[float] = list(m.temperatures)
        self.samples: int | None = m.samples
        self.settings = m.settings
        self.extras: list[Extra] = m.configured_extras()
        self.params = self.settings.params
        self.backend = get_backend(m.backend)
        self._shard_start = np.cumsum([0] + [s.sequences for s in m.shards])
        self._batch_start = [np.cumsum([0] + list(s.batches)) for s in m.shards]
        self._readers: dict[int, ShardReader] = {}
        self._orders: dict[int, codec.IdOrder] = {}
        self._decoded: OrderedDict = OrderedDict()
        self._max_cached = max(1, max_cached_batches)

    # -- sizes ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._shard_start[-1])

    @property
    def num_tokens(self) -> int:
        return self.manifest.num_tokens

    @property
    def num_bytes(self) -> int:
        return self.manifest.num_bytes

    def __repr__(self) -> str:
        return (
            f"Cache({self.url!r}, targets={self.targets_kind}, k={self.k}, vocab_size={self.vocab_size}, "
            f"sequences={len(self)}, tokens={self.num_tokens})"
        )

    # -- access ----------------------------------------------------------------------------------

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        """Sequence ``i``: input_ids (L,) int64, target_ids (L, k) int32 (−1 padding), target_logprobs
        (L, k) float32 (teacher log-probs at T=1 for topk, log(count/N) for sampled; 0 at padding),
        lognorm (L, n_temps) float32, target_counts (L, k) int32 for sampled caches, and loss_mask (L,) bool for
        caches that store one (token t is trained; targets are stored where token t + 1 is)."""
        shard, batch, j = self.locate(i)
        return self.record(self.decoded_batch(shard, batch), j)

    def record(self, decoded: dict, j: int, max_length: int | None = None) -> dict:
        """Sequence ``j`` of a decoded batch (:meth:`decoded_batch`) as :meth:`__getitem__` gives it, cut to its
        first ``max_length`` tokens when given. Copies: callers may modify records, the batch is shared."""
        a, b = int(decoded["offsets"][j]), int(decoded["offsets"][j + 1])
        if max_length is not None:
            b = min(b, a + max_length)
        extra_keys = {key for extra in self.extras for key in extra.decoded_keys()}
        out = {key: value[a:b].copy() for key, value in decoded.items() if key != "offsets" and key not in extra_keys}
        for extra in self.extras:
            for key, value in extra.item(decoded, j, a, b).items():
                out[key] = {k: v.copy() for k, v in value.items()} if isinstance(value, dict) else value.copy()
        return out

    def targets(self, i: int, temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """Target ids (L, k) and teacher log-probs at ``temperature`` (L, k), 0 at padding.

        topk: exact at every captured temperature, ``lp/τ − n_τ``. sampled: only at the capture
        temperature. Any other temperature is an error.
        """
        rec = self[i]
        col = self.temperature_index(temperature)
        ids = rec["target_ids"]
        return ids, self.kind.tempered(ids, rec["target_logprobs"], rec["lognorm"][:, col], temperature)

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
        raise ValueError(self.kind.not_captured(temperature, self.temperatures, self.url))

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for i in range(len(self)):
            yield self[i]

    def encoded_shards(self) -> Iterator[tuple[ShardEntry, dict, Iterator[tuple[int, dict]]]]:
        """For every shard in order: its manifest entry, its header, and its batches as they are stored,
        ``(sequences, encoded streams)``, each checked against its CRC (what ``CacheWriter.copy_shards`` takes)."""
        for s, entry in enumerate(self.manifest.shards):
            reader = self.shard(s)
            yield entry, reader.header, ((n, reader.read_batch(b)) for b, n in enumerate(entry.batches))

    # -- seams for the data layer and the tools ----------------------------------------------------

    def locate(self, i: int) -> tuple[int, int, int]:
        """Sequence ``i`` → (shard, batch within the shard, sequence within the batch)."""
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

    def shard(self, s: int) -> ShardReader:
        """The reader of shard ``s``, opened once. Before anything is read, the shard must be regular files only
        (no links, devices or FIFOs) of the size the manifest records; then its batch count and the settings its
        header repeats must match the manifest's."""
        if s not in self._readers:
            entry = self.manifest.shards[s]
            path = join(self.root, entry.file)
            if not self.fs.exists(path):
                raise CorruptShardError(f"shard {entry.file} is missing from {self.url}")
            try:
                size = check_plain_file(self.fs, path, f"shard {entry.file}", directory=True)
            except CacheFormatError as e:
                raise CorruptShardError(str(e)) from None
            if size != entry.bytes:
                raise CorruptShardError(
                    f"shard {entry.file} has {size} bytes, the manifest says {entry.bytes}: truncated or altered"
                )
            reader = self.backend.open(self.fs, self.root, entry.file)
            if reader.num_batches != len(entry.batches):
                raise CorruptShardError(
                    f"shard {entry.file} holds {reader.num_batches} batches, the manifest says otherwise"
                )
            stored = reader.header.get("settings")
            if stored is not None and stored.tobytes() != self.manifest.shard_settings():
                raise CorruptShardError(
                    f"shard {entry.file} was encoded with {stored.tobytes().decode(errors='replace')}, but the "
                    f"manifest says {self.manifest.shard_settings().decode()}: the manifest or the shard was altered"
                )
            self._readers[s] = reader
        return self._readers[s]

    def _id_order(self, s: int) -> codec.IdOrder:
        if s not in self._orders:
            try:
                self._orders[s] = codec.IdOrder.from_bytes(self.shard(s).header["id_order"], self.vocab_size)
            except (KeyError, ValueError) as e:
                raise CorruptShardError(f"shard {self.manifest.shards[s].file}: bad id order header ({e})") from e
        return self._orders[s]

    def decoded_batch(self, shard: int, batch: int) -> dict[str, np.ndarray]:
        """Batch ``batch`` of shard ``shard`` decoded: flat arrays over its tokens plus per-sequence ``offsets``
        (shared with later reads: do not modify). The last few are kept, so reading in order decodes each once."""
        key = (shard, batch)
        if key in self._decoded:
            self._decoded.move_to_end(key)
            return self._decoded[key]
        entry = self.manifest.shards[shard]
        streams = self.shard(shard).read_batch(batch)
        try:
            decoded = self._decode(streams, entry, batch, self._id_order(shard))
        except KeyError as e:
            raise CorruptShardError(f"shard {entry.file}: batch {batch} lacks the stream {e}") from None
        except (ValueError, IndexError) as e:
            raise CorruptShardError(f"shard {entry.file}: batch {batch} does not decode ({e})") from e
        self._decoded[key] = decoded
        if len(self._decoded) > self._max_cached:
            self._decoded.popitem(last=False)
        return decoded

    def _decode(self, streams: dict, entry: ShardEntry, batch: int, order: codec.IdOrder) -> dict[str, np.ndarray]:
        lengths = codec.decode_tokens(streams["seq_lengths"], entry.batches[batch])
        n_tokens = int(lengths.sum())
        if n_tokens > entry.tokens or (lengths < 1).any():  # checked before anything of size tokens × k is made
            raise ValueError(f"sequence lengths {lengths.tolist()[:8]} do not fit the shard's {entry.tokens} tokens")
        out = {
            "offsets": np.concatenate([[0], np.cumsum(lengths)]),
            "input_ids": codec.decode_tokens(streams["input_ids"], n_tokens),
            **self.kind.decode(streams, n_tokens, self.settings, order),
        }
        for extra in self.extras:
            out.update(extra.decode(streams, lengths))
        return out

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()
        self._decoded.clear()

    def __enter__(self) -> Cache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_cache(path_or_url, *, storage_options: dict | None = None) -> Cache:
    """Open the cache at a local path or fsspec URL (``memory://``, ``s3://``, ...)."""
    try:
        return Cache(path_or_url, storage_options=storage_options)
    except FileNotFoundError as e:
        raise CacheFormatError(f"{path_or_url}: not found ({e})") from None
