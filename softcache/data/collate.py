"""Batching items into padded (or packed) torch tensors."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import get_worker_info

# key → (dtype, padding value)
_KEYS = {
    "input_ids": (np.int64, 0),
    "attention_mask": (np.int64, 0),
    "labels": (np.int64, -100),
    "position_ids": (np.int64, 0),
    "target_ids": (np.int32, -1),
    "target_logprobs": (np.float32, 0),
}


def _empty(shape: tuple[int, ...], dtype) -> tuple[torch.Tensor, np.ndarray]:
    """An uninitialised tensor and its numpy view. In a DataLoader worker it is allocated in shared memory, as
    torch's default_collate does, so that sending it to the main process does not copy it once more."""
    dtype = torch.from_numpy(np.zeros(0, dtype)).dtype
    if get_worker_info() is None:
        tensor = torch.empty(shape, dtype=dtype)
    else:
        storage = torch.UntypedStorage._new_shared(int(np.prod(shape)) * dtype.itemsize)
        tensor = torch.empty(0, dtype=dtype).set_(storage, 0, shape)
    return tensor, tensor.numpy()


def _array(x, dtype) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


class Collator:
    """Pads items (from :class:`SoftTargetDataset`, a ``datasets`` dataset, ...) into a batch of torch tensors.

    Returns ``input_ids``, ``attention_mask``, ``labels`` (int64, (B, L)), ``target_ids`` (int32, (B, L, w))
    and ``target_logprobs`` (float32, (B, L, w)), padded on the right to the longest item (rounded up to
    ``pad_to_multiple_of``): input_ids with 0 (attention_mask 0 there), labels with −100, target_ids with −1,
    target_logprobs with 0. Items may hold numpy arrays, lists or torch tensors; ``attention_mask`` and
    ``labels`` default to ones and ``input_ids``; ``position_ids`` are kept (padded with 0) when items have
    them; ``teacher_hidden`` / ``teacher_attentions`` (dicts of layer → array, from caches that store them) are
    padded with zeros into dicts of tensors; every other key is ignored. Each key is filled into one preallocated
    array (in shared memory inside a DataLoader worker, as torch's ``default_collate`` does); the tensors work
    with ``pin_memory=True``. The target width ``w`` is the widest row present in the batch (at least 1), not
    the cache's ``k``: stored rows hold their entries first and −1 padding after, so the columns beyond ``w`` are
    padding in every row. A sampled cache (rows of at most ``samples`` distinct ids, often far fewer) gives narrow
    batches; a top-k cache gives ``k``.

    Packing (``pack_length=N``): whole sequences, in order, are concatenated greedily into rows of at most
    ``N`` tokens (a longer sequence is truncated to ``N``); ``position_ids`` restart at 0 for each sequence
    and ``labels`` is −100 at the first token of every packed sequence (as Hugging Face's
    ``DataCollatorWithFlattening`` does), so once the trainer shifts labels no position learns to predict
    across a boundary, even if rows are later flattened into one; targets stay aligned with their tokens.
    Packed rows need an attention implementation that honours ``position_ids`` (flash-attention varlen),
    otherwise tokens attend across sequences. Hugging Face models take that path only for a single row
    without ``attention_mask``: flatten the batch (``x.view(1, -1)`` per key) and drop ``attention_mask``
    (padding then forms sequences of its own, with labels −100 and no targets).
    """

    def __init__(self, pad_to_multiple_of: int | None = None, pack_length: int | None = None) -> None:
        for name, value in (("pad_to_multiple_of", pad_to_multiple_of), ("pack_length", pack_length)):
            if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pack_length = pack_length

    def __repr__(self) -> str:
        return f"Collator(pad_to_multiple_of={self.pad_to_multiple_of}, pack_length={self.pack_length})"

    def __call__(self, items: Sequence | None = None, **options):
        """``collate(items)`` → the batch. With options (``pad_to_multiple_of``, ``pack_length``): ``collate(items,
        pack_length=N)`` is the batch with those options, and ``collate(pack_length=N)`` the collate function with
        them (``DataLoader(..., collate_fn=softcache.collate(pack_length=2048))``)."""
        if options:
            unknown = set(options) - {"pad_to_multiple_of", "pack_length"}
            if unknown:
                raise TypeError(f"collate takes pad_to_multiple_of and pack_length, not {sorted(unknown)}")
            configured = Collator(**{"pad_to_multiple_of": self.pad_to_multiple_of, "pack_length": self.pack_length,
                                     **options})  # fmt: skip
            return configured if items is None else configured.collate(items)
        if items is None:
            raise TypeError("collate needs the items of a batch (or options, for a configured collate function)")
        return self.collate(items)

    def _sequence(self, item) -> dict[str, np.ndarray]:
        seq = {"input_ids": _array(item["input_ids"], np.int64)}
        for key in ("attention_mask", "labels", "position_ids", "target_ids", "target_logprobs"):
            if key in item and item[key] is not None:
                seq[key] = _array(item[key], _KEYS[key][0])
        if "target_ids" not in seq or "target_logprobs" not in seq:
            raise ValueError(f"an item lacks target_ids or target_logprobs (it has {sorted(item)})")
        if self.pack_length is not None:
            seq = {key: value[: self.pack_length] for key, value in seq.items()}
        length = len(seq["input_ids"])
        for key, value in seq.items():
            if len(value) != length or (key.startswith("target") and value.ndim != 2):
                raise ValueError(f"item {key} has shape {value.shape}; expected {length} positions like input_ids")
        return seq

    def _rows(self, lengths: Sequence[int]) -> list[list[int]]:
        if self.pack_length is None:
            return [[i] for i in range(len(lengths))]
        rows, used = [[]], 0
        for i, length in enumerate(lengths):
            if rows[-1] and used + length > self.pack_length:
                rows.append([])
                used = 0
            rows[-1].append(i)
            used += length
        return rows

    def collate(self, items: Sequence) -> dict[str, torch.Tensor]:
        """The batch of ``items``: see the class docstring."""
        if len(items) == 0:
            raise ValueError("collate got no items")
        seqs = [self._sequence(item) for item in items]
        k = seqs[0]["target_ids"].shape[1]
        if any(s["target_ids"].shape[1] != k or s["target_logprobs"].shape[1] != k for s in seqs):
            raise ValueError("items have targets of different widths k; batch items from one cache")
        used = np.zeros(k, bool)  # the columns holding an entry in some row (entries come first in every row)
        for s in seqs:
            used |= (s["target_ids"] >= 0).any(0)
        k = max(int(np.flatnonzero(used)[-1]) + 1 if used.any() else 0, 1)
        lengths = [len(s["input_ids"]) for s in seqs]
        rows = self._rows(lengths)
        width = max(sum(lengths[i] for i in row) for row in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        keys = ["input_ids", "attention_mask", "labels", "target_ids", "target_logprobs"]
        if self.pack_length is not None or "position_ids" in seqs[0]:
            keys.append("position_ids")
        tensors, out = {}, {}
        for key in keys:
            dtype = _KEYS[key][0]
            shape = (len(rows), width, k) if key.startswith("target") else (len(rows), width)
            tensors[key], out[key] = _empty(shape, dtype)
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                s, end = seqs[i], at + lengths[i]
                out["input_ids"][r, at:end] = s["input_ids"]
                out["attention_mask"][r, at:end] = s.get("attention_mask", 1)
                out["labels"][r, at:end] = s.get("labels", s["input_ids"])
                out["target_ids"][r, at:end] = s["target_ids"][:, :k]
                out["target_logprobs"][r, at:end] = s["target_logprobs"][:, :k]
                if self.pack_length is not None:
                    out["position_ids"][r, at:end] = np.arange(lengths[i])
                    out["labels"][r, at] = -100
                elif "position_ids" in out:
                    out["position_ids"][r, at:end] = s["position_ids"]
                at = end
            for key, value in out.items():
                value[r, at:] = _KEYS[key][1]
        tensors.update(self._features(items, rows, lengths, width))
        return tensors

    def _features(self, items: Sequence, rows: list[list[int]], lengths: list[int], width: int) -> dict:
        """``teacher_hidden`` (layer → (B, width, H)) and ``teacher_attentions`` (layer → (B, heads, width, width))
        when the items have them: zeros at padding; packed sequences sit on the diagonal of the attention blocks."""
        out = {}
        for key in ("teacher_hidden", "teacher_attentions"):
            if key not in items[0]:
                continue
            if any(set(item.get(key) or ()) != set(items[0][key]) for item in items):
                raise ValueError(f"items have different {key} layers; batch items from one cache")
            out[key] = {}
            for layer, first in items[0][key].items():
                hidden = key == "teacher_hidden"
                shape = (width, *np.shape(first)[1:]) if hidden else (np.shape(first)[0], width, width)
                tensor, array = _empty((len(rows), *shape), np.float32)
                array[:] = 0
                for r, row in enumerate(rows):
                    at = 0
                    for i in row:
                        n = lengths[i]
                        value = _array(items[i][key][layer], np.float32)
                        if hidden:
                            array[r, at : at + n] = value[:n]
                        else:
                            array[r, :, at : at + n, at : at + n] = value[:, :n, :n]
                        at += n
                out[key][layer] = tensor
        return out


collate = Collator()
"""Pads a list of items into a batch of torch tensors: :class:`Collator` with its defaults."""
