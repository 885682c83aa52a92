"""``CacheWriter``: append sequences and their teacher targets to a cache, shard by shard.

Sequences are buffered into batches of about ``batch_tokens`` tokens (the unit of random access),
encoded by :mod:`softcache.codec` and appended to the open shard; a shard is committed (renamed to
its final name, then added to the manifest) once it holds ``shard_tokens`` tokens and when the writer
closes. A writer killed at any moment leaves every committed shard readable; opening the same path
again appends after them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence

import numpy as np

from . import codec
from .errors import CacheFormatError
from .extras import Extra, LossMask
from .format import (
    BACKENDS,
    MANIFEST_NAME,
    Manifest,
    ShardEntry,
    get_backend,
    join,
    load_manifest,
    open_fs,
    save_manifest,
)
from .format.fs import holds_only_temporaries, is_tmp_name
from .format.lock import CacheLock
from .format.manifest import MAX_K, MAX_VOCAB
from .kinds import TOKEN_STREAMS, as_array, get_kind
from .sparsify import Sparsifier


class CacheWriter:
    """Write a softcache cache. Use as a context manager::

        with softcache.CacheWriter("cache/", vocab_size=V, k=64, temperatures=(1.0, 2.0)) as w:
            w.write_logits(input_ids, logits)

    Args:
        path_or_url: local directory or fsspec URL. A new or empty directory starts a cache; an existing
            cache with the same settings is appended to; anything else is refused.
        vocab_size: teacher vocabulary size V (the logits' last dimension).
        k: top-k entries kept per position ("topk"), or the most unique ids per position ("sampled";
            must be ≥ ``samples`` so that no sampled id is ever dropped).
        targets: "topk" (exact top-k with normalisers) or "sampled" (Random-Sampling KD).
        temperatures: capture temperatures. topk: log-normalisers are stored for each, so that tempered
            distributions and their tail mass are exact at each. sampled: exactly one, the temperature
            samples are drawn at.
        samples: draws per position for "sampled" (e.g. 50).
        backend: "arrow" or "zarr".
        metadata: JSON-serialisable dict stored in the manifest (teacher identity, tokenizer, ...).
        batch_tokens / shard_tokens: tokens per batch (unit of random access) and per shard (file).
        logprob_step: quantisation step of stored log-probs in nats; decoded tempered log-probs are
            within ``logprob_step / T`` of exact.
        seed: seed of the sampled draws (each sequence draws from its own stream: deterministic and
            independent of batching).
        chunk_elements: the largest fp32 buffer ``write_logits`` materialises (rows × V).
        loss_mask: store which tokens are trained (``loss_mask=`` of the write methods; all when not given). Targets
            are then stored only where the next token is trained, and the datasets give ``labels = -100`` elsewhere.
        extras: other streams to store beside the targets (:class:`~softcache.extras.HiddenStates`,
            :class:`~softcache.extras.Attentions`), given per sequence through ``extras=`` of the write methods.
    """

    def __init__(
        self,
        path_or_url,
        *,
        vocab_size: int,
        k: int = 64,
        targets: str = "topk",
        temperatures: Sequence[float] = (1.0,),
        samples: int | None = None,
        backend: str = "arrow",
        metadata: dict | None = None,
        batch_tokens: int = 4096,
        shard_tokens: int = 1 << 20,
        logprob_step: float = 1.0 / 64,
        seed: int = 0,
        chunk_elements: int = 1 << 26,
        storage_options: dict | None = None,
        loss_mask: bool = False,
        extras: Sequence[Extra] = (),
    ) -> None:
        new = new_manifest(vocab_size, k, targets, temperatures, samples, backend, logprob_step, metadata or {})
        new.extras = {e.name: e.settings() for e in [*([LossMask()] if loss_mask else []), *extras]}
        if batch_tokens < 1 or shard_tokens < 1 or chunk_elements < 1:
            raise ValueError("batch_tokens, shard_tokens and chunk_elements must be positive")
        self.fs, self.root = open_fs(path_or_url, storage_options)
        self.url = str(path_or_url)
        self.backend = get_backend(backend)
        self.kind = new.kind
        self.settings = new.settings
        self.batch_tokens, self.shard_tokens = batch_tokens, shard_tokens
        self.chunk_elements = chunk_elements
        self.sparsifier = Sparsifier(self.kind, new.k, new.settings.temperatures, new.samples, seed)
        self.fs.makedirs(self.root, exist_ok=True)
        self._lock = CacheLock(self.fs, self.root, self.url)
        self._lock.acquire()
        try:
            self.manifest = self._open_manifest(new)
        except BaseException:
            self._lock.release()
            raise
        self.extras = self.manifest.configured_extras()
        self._pending: list[tuple] = []  # (input_ids, target_ids, values, lognorm, extras) per sequence
        self._pending_tokens = 0
        self._shard = None
        self._shard_stats = [0, 0, 0]  # sequences, tokens, target entries
        self._order: codec.IdOrder | None = None
        self._closed = False

    # -- setup ---------------------------------------------------------------------------------

    def _open_manifest(self, new: Manifest) -> Manifest:
        fs, root = self.fs, self.root
        if fs.exists(join(root, MANIFEST_NAME)):
            manifest = load_manifest(fs, root)
            old, want = manifest.fixed(), new.fixed()
            for key, value in want.items():
                if old[key] != value:
                    raise CacheFormatError(
                        f"{self.url} is a cache with {key}={old[key]!r}, not {value!r}; "
                        "write to a new path, or delete the old cache to replace it"
                    )
            self._remove_uncommitted(manifest)
            return manifest
        if not holds_only_temporaries(fs, root):
            raise CacheFormatError(
                f"{self.url} exists, is not empty and is not a softcache cache; choose an empty or new directory"
            )
        self._remove_uncommitted(new)  # e.g. the temporary manifest of a writer killed during its first write
        save_manifest(fs, root, new)
        return new

    def _remove_uncommitted(self, manifest: Manifest) -> None:
        """Delete what a killed writer left behind: temporary files and shards the manifest never named."""
        committed = {s.file for s in manifest.shards}
        for path in self.fs.ls(self.root, detail=False):
            name = path.rstrip("/").rsplit("/", 1)[-1]
            leftover = is_tmp_name(name)
            orphan = name.startswith("shard-") and name.endswith(self.backend.suffix) and name not in committed
            if leftover or orphan:
                self.fs.rm(path, recursive=True)

    # -- public writing API --------------------------------------------------------------------

    def write_logits(self, input_ids, logits, attention_mask=None, loss_mask=None, extras: dict | None = None) -> None:
        """Add sequences from the teacher's logits.

        ``input_ids`` (L,) with ``logits`` (L, V), or (B, L) with (B, L, V) and optionally
        ``attention_mask`` (B, L) (positions with mask 0 are dropped). torch tensors on any device or
        numpy arrays. Top-k, normalisers and samples are computed on the logits' device in row chunks,
        so no fp32 buffer larger than ``chunk_elements`` is created. ``loss_mask`` (shaped like ``input_ids``):
        which tokens are trained, for a writer made with ``loss_mask=True`` (see :class:`~softcache.extras.LossMask`).
        ``extras``: the other extra streams of one sequence, by name (e.g. ``{"hidden_states": {layer: (L, H)}}``).
        """
        self._check_open()
        ids, rows = _split_batch(input_ids, logits, attention_mask, self.settings.vocab_size)
        masks = _split_mask(loss_mask, input_ids, attention_mask, len(ids))
        if extras and len(ids) != 1:
            raise ValueError("extras= are given for one sequence: write batched sequences one at a time")
        for seq_ids, seq_logits, seq_mask in zip(ids, rows, masks, strict=True):
            index = self.num_sequences + len(self._pending)
            stored = self._check_extras(len(seq_ids), seq_mask, extras)  # before the teacher's rows are worked on
            t_ids, values, lognorm, broken = self.sparsifier.sequence(seq_logits, index, self.chunk_elements)
            if broken.any():
                raise ValueError(
                    f"sequence {index}, position {int(np.flatnonzero(broken)[0])}: teacher logits are NaN, +inf or "
                    "all -inf; check the teacher's dtype (fp16 overflow) and inputs"
                )
            self._add(seq_ids, t_ids, values, lognorm, stored)

    def write_targets(
        self, input_ids, target_ids, target_logprobs=None, lognorm=None, counts=None, loss_mask=None, extras=None
    ) -> None:
        """Add one sequence from precomputed targets.

        topk: ``target_ids`` (L, k') with k' ≤ k and −1 padding, ``target_logprobs`` (L, k') teacher
        log-probs at T=1, ``lognorm`` (L, n_temps) the exact n_τ (may be omitted when the only captured
        temperature is 1). sampled: ``target_ids`` and ``counts`` (L, k'). ``loss_mask`` (L,): as for
        :meth:`write_logits`; targets at positions whose next token is not trained are dropped.
        """
        values = counts if self.kind.values_name == "counts" else target_logprobs
        self.write_values(input_ids, target_ids, values, lognorm, extras, loss_mask=loss_mask)

    def write_values(self, input_ids, target_ids, values, lognorm=None, extras=None, loss_mask=None) -> None:
        """:meth:`write_targets` with the kind's values positional: log-probs (topk) or counts (sampled), then the
        normalisers and the extras (what ``softcache build`` computes per sequence, in that order)."""
        self._check_open()
        vocab_size, k = self.settings.vocab_size, self.settings.k
        input_ids = as_array(input_ids, "input_ids", np.integer)
        target_ids = as_array(target_ids, "target_ids", np.integer)
        length = _check_sequence(input_ids, vocab_size)
        if target_ids.ndim != 2 or target_ids.shape[0] != length or target_ids.shape[1] > k:
            raise ValueError(f"target_ids must have shape ({length}, ≤{k}), got {tuple(target_ids.shape)}")
        if target_ids.size and (target_ids.min() < -1 or target_ids.max() >= vocab_size):
            raise ValueError(f"target_ids must lie in [-1, vocab_size={vocab_size}); -1 marks padding")
        _check_unique(target_ids)
        values, lognorm = self.kind.check_targets(target_ids, values, lognorm, self.settings)
        self._add(input_ids, target_ids, values, lognorm, self._check_extras(length, loss_mask, extras))

    # -- buffering, encoding, commits ------------------------------------------------------------

    @property
    def num_sequences(self) -> int:
        """Sequences committed or buffered so far (the index the next sequence will have, minus buffered)."""
        return self.manifest.num_sequences + self._shard_stats[0]

    def _add(self, input_ids, target_ids, values, lognorm, stored: dict) -> None:
        """Buffer one checked sequence; ``stored``: its extras as :meth:`_check_extras` returned them."""
        drop = None
        if "loss_mask" in stored:
            drop = ~LossMask.targets_stored(stored["loss_mask"])
        if "mlm_labels" in stored:  # a masked-LM cache: targets only at the masked positions (unshifted)
            drop = stored["mlm_labels"] < 0
        if drop is not None:
            target_ids, values = target_ids.copy(), values.copy()
            target_ids[drop], values[drop] = -1, 0
            if lognorm is not None:
                lognorm = lognorm.copy()
                lognorm[drop] = 0
        k = self.settings.k
        pad = k - target_ids.shape[1]
        if pad:
            target_ids = np.pad(target_ids, ((0, 0), (0, pad)), constant_values=-1)
            values = np.pad(values, ((0, 0), (0, pad)))
        self._pending.append((np.asarray(input_ids, np.int64), target_ids, values, lognorm, stored))
        self._pending_tokens += len(input_ids)
        if self._pending_tokens >= self.batch_tokens:
            self._flush_batch()

    def _check_extras(self, length: int, loss_mask, extras: dict | None) -> dict:
        """What each of the cache's extras stores for this sequence; the loss mask defaults to every token."""
        given = dict(extras or {})
        if loss_mask is not None:
            given["loss_mask"] = loss_mask
        names = [e.name for e in self.extras]
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise ValueError(
                f"{self.url} stores no {', '.join(unknown)} (it stores {names or 'no extras'}); create the writer with "
                f"{'loss_mask=True' if unknown == ['loss_mask'] else 'extras=[...]'} to store it"
            )
        stored = {}
        for extra in self.extras:
            value = given.get(extra.name)
            if value is None and isinstance(extra, LossMask):
                value = np.ones(length, bool)
            elif value is None:
                raise ValueError(f"{self.url} stores {extra.name}: pass extras={{{extra.name!r}: ...}} with each one")
            stored[extra.name] = extra.check(value, length)
        return stored

    def _flush_batch(self) -> None:
        if not self._pending:
            return
        seqs = self._pending
        input_ids = np.concatenate([p[0] for p in seqs])
        target_ids = np.concatenate([p[1] for p in seqs])
        values = np.concatenate([p[2] for p in seqs])
        if self._shard is None:
            self._open_shard(target_ids)
        streams = {
            "seq_lengths": codec.encode_tokens([len(p[0]) for p in seqs]),
            "input_ids": codec.encode_tokens(input_ids),
        }
        lognorm = None if seqs[0][3] is None else np.concatenate([p[3] for p in seqs])
        streams.update(self.kind.encode(target_ids, values, lognorm, self.settings, self._order))
        lengths = np.array([len(p[0]) for p in seqs])
        for extra in self.extras:
            streams.update(extra.encode([p[4][extra.name] for p in seqs], lengths))
        self._shard.write_batch(streams, len(seqs))
        self._pending, self._pending_tokens = [], 0
        self._shard_stats[0] += len(seqs)
        self._shard_stats[1] += len(input_ids)
        self._shard_stats[2] += int(np.count_nonzero(target_ids >= 0))
        if self._shard_stats[1] >= self.shard_tokens:
            self._commit_shard()

    def _open_shard(self, first_targets: np.ndarray) -> None:
        self._order = codec.IdOrder.fit(first_targets, self.settings.vocab_size)
        settings = np.frombuffer(self.manifest.shard_settings(), np.uint8)  # what decodes it, checked on open
        header = {"id_order": self._order.to_bytes(), "settings": settings}
        self._shard = self.backend.create(self.fs, self.root, self._next_shard_name(), header, self._streams)

    def _next_shard_name(self) -> str:
        return f"shard-{len(self.manifest.shards):05d}{self.backend.suffix}"

    @property
    def _streams(self) -> list[str]:
        return [*TOKEN_STREAMS, *self.kind.streams, *(s for extra in self.extras for s in extra.streams())]

    def _commit_shard(self) -> None:
        shard, self._shard = self._shard, None
        sequences, tokens, entries = self._shard_stats
        self._shard_stats = [0, 0, 0]
        self._append_shard_entry(shard, sequences, tokens, entries)

    def _append_shard_entry(self, shard, sequences: int, tokens: int, entries: int) -> None:
        size, digest = shard.commit()
        entry = ShardEntry(shard.name, sequences, tokens, size, list(shard.batches), entries, digest)
        self.manifest.shards.append(entry)
        self.save_manifest()

    def save_manifest(self) -> None:
        """Replace the manifest on disk with :attr:`manifest` (after changing its metadata or build state)."""
        save_manifest(self.fs, self.root, self.manifest)

    @classmethod
    def like(cls, manifest: Manifest, path_or_url, **options) -> CacheWriter:
        """A writer with the settings and metadata of ``manifest`` (another cache's), e.g. to copy its shards;
        ``options`` (``backend=``, ``storage_options=``, ...) override."""
        return cls(
            path_or_url,
            vocab_size=manifest.vocab_size,
            k=manifest.k,
            targets=manifest.targets,
            temperatures=manifest.temperatures,
            samples=manifest.samples,
            backend=options.pop("backend", manifest.backend),
            metadata=options.pop("metadata", manifest.metadata),
            logprob_step=manifest.codec["logprob_step"],
            extras=manifest.configured_extras(),
            **options,
        )

    def copy_shards(self, shards: Iterable[tuple[ShardEntry, dict, Iterable[tuple[int, dict]]]], progress=None) -> None:
        """Append already-encoded shards unchanged: ``(entry, header, batches)`` as ``Cache.encoded_shards`` yields
        them (``softcache convert``, merging the ranks of a build). ``progress(i, name)`` is called per shard."""
        for i, (entry, header, batches) in enumerate(shards):
            if progress is not None:
                progress(i, entry.file)
            self.copy_shard(header, batches, entry)

    def copy_shard(self, header: dict, batches: Iterable[tuple[int, dict]], entry: ShardEntry) -> None:
        """Append an already-encoded shard (its header and ``(sequences, streams)`` batches) unchanged.

        For tools that move shards between backends without re-encoding (``softcache convert``); the
        writer must have nothing buffered.
        """
        self._check_open()
        if self._pending or self._shard is not None:
            raise RuntimeError("copy_shard needs a writer with nothing buffered; call flush() first")
        shard = self.backend.create(self.fs, self.root, self._next_shard_name(), header, self._streams)
        try:
            for n_seqs, streams in batches:
                shard.write_batch(streams, n_seqs)
        except BaseException:
            shard.abort()
            raise
        self._append_shard_entry(shard, entry.sequences, entry.tokens, entry.entries)

    def flush(self) -> None:
        """Encode buffered sequences and commit the open shard (a smaller shard than usual)."""
        self._check_open()
        self._flush_batch()
        if self._shard is not None:
            self._commit_shard()

    def close(self) -> None:
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            self._lock.release()

    def abort(self) -> None:
        """Drop buffered sequences and the open shard; committed shards stay."""
        self._pending, self._pending_tokens = [], 0
        if self._shard is not None:
            self._shard.abort()
            self._shard = None
        self._shard_stats = [0, 0, 0]
        self._closed = True
        self._lock.release()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"CacheWriter for {self.url} is closed")

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # On an error, sequences already accepted are valid: commit them so a rerun can continue.
        self.close()


# -- argument checking -----------------------------------------------------------------------------


def new_manifest(
    vocab_size, k, targets, temperatures, samples, backend, logprob_step=1.0 / 64, metadata=None
) -> Manifest:
    """The manifest of a new cache with these settings (``CacheWriter``'s), checked; a ValueError names the setting."""
    if not isinstance(vocab_size, (int, np.integer)) or not 1 <= vocab_size <= MAX_VOCAB:
        raise ValueError(f"vocab_size must be an integer in [1, {MAX_VOCAB}], got {vocab_size!r}")
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= min(vocab_size, MAX_K):
        raise ValueError(f"k must be an integer in [1, {min(vocab_size, MAX_K)}] (≤ vocab_size), got {k!r}")
    try:
        json.dumps(metadata, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"metadata must be JSON-serialisable (it is stored in the manifest): {e}") from None
    kind = get_kind(targets)
    if isinstance(temperatures, (int, float)):
        temperatures = [temperatures]
    try:
        temps = [float(t) for t in temperatures]
    except (TypeError, ValueError):
        raise ValueError(f"temperatures must be positive numbers, got {temperatures!r}") from None
    if not temps or any(not (math.isfinite(t) and t > 0) for t in temps) or len(set(temps)) != len(temps):
        raise ValueError(f"temperatures must be distinct positive numbers, got {temperatures!r}")
    kind.check_settings(k, vocab_size, temps, samples)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return Manifest(
        targets=kind.name,
        k=int(k),
        vocab_size=int(vocab_size),
        temperatures=temps,
        samples=None if samples is None else int(samples),
        backend=backend,
        codec=codec.CodecParams(logprob_step=logprob_step).to_dict(),
        metadata=metadata or {},
    )


def _check_sequence(input_ids: np.ndarray, vocab_size: int) -> int:
    if input_ids.ndim != 1:
        raise ValueError(f"input_ids must be 1-D (one sequence), got shape {tuple(input_ids.shape)}")
    if input_ids.size == 0:
        raise ValueError("empty sequence: input_ids has no tokens")
    if input_ids.min() < 0 or input_ids.max() >= vocab_size:
        bad = int(input_ids.min()) if input_ids.min() < 0 else int(input_ids.max())
        raise ValueError(f"input_ids must be token ids in [0, vocab_size={vocab_size}), found {bad}")
    return int(input_ids.shape[0])


def _check_unique(target_ids: np.ndarray) -> None:
    """Target ids of a position are distinct (padding aside)."""
    if target_ids.shape[1] < 2:
        return
    srt = np.sort(target_ids, axis=-1)
    dup = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
    if dup.any():
        pos = int(np.flatnonzero(dup.any(-1))[0])
        twice = int(srt[pos, 1:][dup[pos]][0])
        raise ValueError(f"target_ids at position {pos}: duplicate id {twice}; each id must be unique per position")


def _split_mask(loss_mask, input_ids, attention_mask, n: int) -> list:
    """``loss_mask`` cut like :func:`_split_batch` cuts the input ids (None for each sequence when not given)."""
    if loss_mask is None:
        return [None] * n
    mask = as_array(loss_mask, "loss_mask")
    shape = tuple(getattr(input_ids, "shape", np.shape(input_ids)))
    if mask.shape != shape:
        raise ValueError(f"loss_mask must have the shape of input_ids {shape}, got {tuple(mask.shape)}")
    if mask.ndim == 1:
        return [mask]
    keep = as_array(attention_mask, "attention_mask").astype(bool) if attention_mask is not None else None
    return [mask[b] if keep is None else mask[b, keep[b]] for b in range(n)]


def _split_batch(input_ids, logits, attention_mask, vocab_size):
    """Yield (input_ids (L,), logits (L, V)) per sequence; logits stay on their device."""
    ids = as_array(input_ids, "input_ids", np.integer)
    if ids.ndim == 1:
        ids, logits = ids[None], logits[None]
        if attention_mask is not None:
            attention_mask = as_array(attention_mask, "attention_mask")[None]
    if ids.ndim != 2 or tuple(logits.shape[:2]) != ids.shape or logits.ndim != 3:
        raise ValueError(
            f"expected input_ids (L,) with logits (L, V), or (B, L) with (B, L, V); "
            f"got {tuple(ids.shape)} and {tuple(logits.shape)}"
        )
    if logits.shape[-1] != vocab_size:
        raise ValueError(f"logits have {logits.shape[-1]} classes, the cache vocab_size is {vocab_size}")
    if attention_mask is not None:
        attention_mask = as_array(attention_mask, "attention_mask")
        if attention_mask.shape != ids.shape:
            raise ValueError(f"attention_mask must have shape {ids.shape}, got {attention_mask.shape}")
    out_ids, out_rows = [], []
    for b in range(ids.shape[0]):
        keep = np.flatnonzero(attention_mask[b]) if attention_mask is not None else np.arange(ids.shape[1])
        _check_sequence(ids[b, keep], vocab_size)
        out_ids.append(ids[b, keep])
        out_rows.append(logits[b, keep] if len(keep) != ids.shape[1] else logits[b])
    return out_ids, out_rows
