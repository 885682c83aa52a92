"""A Hugging Face ``datasets.Dataset`` view of a cache, decoded on access (``softcache.to_hf_dataset``)."""

from __future__ import annotations

import numpy as np

from .source import CacheSource

ITEM_KEYS = ("input_ids", "attention_mask", "labels", "target_ids", "target_logprobs")


class DecodeTransform(CacheSource):
    """The dataset's transform: rows of an ``index`` column → the items of those sequences.

    Other columns (e.g. added by ``map``) pass through; item keys always come from the cache.
    """

    def __call__(self, batch: dict) -> dict:
        if "index" not in batch:
            raise KeyError(
                "the 'index' column the cache items are decoded from was removed (the Hugging Face Trainer does "
                "this with remove_unused_columns=True); keep it, e.g. TrainingArguments(remove_unused_columns=False)"
            )
        items = [self.item(int(i)) for i in batch["index"]]
        return {**batch, **{key: [item[key] for item in items] for key in ITEM_KEYS}}


def to_hf_dataset(cache_or_url, temperature: float = 1.0, max_length: int | None = None, retemper: bool = False,
                  storage_options: dict | None = None, allow_incomplete: bool = False, decoded: bool = False):
    """A ``datasets.Dataset`` with one row per sequence of the cache (a :class:`~softcache.Cache`, a path or an
    fsspec URL), holding only its ``index``; a transform
    decodes each row on access into the item :class:`SoftTargetDataset` gives (same arguments).

    It takes 8 bytes per sequence in memory. ``map``, ``filter``, ``shuffle``, ``select`` and
    ``train_test_split`` work as usual (``map``/``filter`` functions see decoded items; the transform
    pickles as the cache URL, so ``num_proc`` works for caches every process can open). Setting another
    format (``with_format``/``set_format``) replaces the transform; removing the ``index`` column breaks it.
    This view cannot be saved with ``save_to_disk`` (its transform is code, not data).

    ``decoded=True``: the items themselves, decoded once and stored as columns (``index`` beside them) of a plain
    ``datasets.Dataset`` in memory (about ``tokens × k × 8`` bytes), which ``save_to_disk`` writes and
    ``datasets.load_from_disk`` reads back without softcache. Such a dataset no longer knows the cache: give the
    trainers ``temperature=`` (and ``vocab_size=`` for a padded student) yourself.
    """
    import datasets

    decode = DecodeTransform(cache_or_url, temperature, max_length, retemper, storage_options, allow_incomplete)
    view = datasets.Dataset.from_dict({"index": np.arange(len(decode.cache), dtype=np.int64)}).with_transform(decode)
    if not decoded:
        return view
    ints = lambda dtype: datasets.Sequence(datasets.Value(dtype))  # noqa: E731
    features = datasets.Features({
        "index": datasets.Value("int64"), "input_ids": ints("int64"), "attention_mask": ints("int64"),
        "labels": ints("int64"), "target_ids": datasets.Sequence(ints("int32")),
        "target_logprobs": datasets.Sequence(ints("float32")),
    })  # fmt: skip
    rows = view.map(lambda batch: {key: batch[key] for key in ("index", *ITEM_KEYS)}, batched=True, batch_size=256,
                    features=features, remove_columns=view.column_names, desc=None)  # fmt: skip
    return rows.with_format(None)
