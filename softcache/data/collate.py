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

    Returns ``input_ids``, ``attention_mask``, ``labels`` (int64, (B, L)), ``target_ids`` (int32, (B, L, k))
    and ``target_logprobs`` (float32, (B, L, k)), padded on the right to the longest item (rounded up to
    ``pad_to_multiple_of``): input_ids with 0 (attention_mask 0 there), labels with −100, target_ids with −1,
    target_logprobs with 0. Items may hold numpy arrays, lists or torch tensors; ``attention_mask`` and
    ``labels`` default to ones and ``input_ids``; ``position_ids`` are kept (padded with 0) when items have
    them; every other key is ignored. Each key is filled into one preallocated array (in shared memory inside
    a DataLoader worker, as torch's ``default_collate`` does); the tensors work with ``pin_memory=True``.

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

    def __call__(self, items: Sequence) -> dict[str, torch.Tensor]:
        if len(items) == 0:
            raise ValueError("collate got no items")
        seqs = [self._sequence(item) for item in items]
        k = seqs[0]["target_ids"].shape[1]
        if any(s["target_ids"].shape[1] != k or s["target_logprobs"].shape[1] != k for s in seqs):
            raise ValueError("items have targets of different widths k; batch items from one cache")
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
                out["target_ids"][r, at:end] = s["target_ids"]
                out["target_logprobs"][r, at:end] = s["target_logprobs"]
                if self.pack_length is not None:
                    out["position_ids"][r, at:end] = np.arange(lengths[i])
                    out["labels"][r, at] = -100
                elif "position_ids" in out:
                    out["position_ids"][r, at:end] = s["position_ids"]
                at = end
            for key, value in out.items():
                value[r, at:] = _KEYS[key][1]
        return tensors


collate = Collator()
"""Pads a list of items into a batch of torch tensors: :class:`Collator` with its defaults."""
