"""The demo shipped with softcache: a small teacher trained on CPython's standard library, and that corpus.

``softcache build`` with no ``--teacher``/``--data`` builds a cache from them (see ``DEMO_BUILD``).
``benchmarks/train_demo_teacher.py`` made both; licences are in ``LICENSES.md`` next to this file.
"""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent

DEMO_BUILD = {
    "k": 32,
    "temperatures": (1.0, 2.0, 4.0),
    "max_length": 1024,
    "pack": False,
    "batch_tokens": 8192,
    "shard_tokens": 1 << 13,
}
"""Build options of the demo cache: the first 1024 tokens of each of the 18 held-out stdlib modules (~18k tokens),
a few seconds of teacher time on 2 CPU cores."""


def teacher_path() -> Path:
    """Folder of the demo teacher (config, safetensors weights, tokenizer), loadable with ``from_pretrained``."""
    return _HERE / "teacher"


def corpus_path(split: str = "validation") -> Path:
    """Parquet file of one split ("train" or "validation") of the demo corpus: columns ``path`` and ``text``."""
    if split not in ("train", "validation"):
        raise ValueError(f"the demo corpus has splits 'train' and 'validation', not {split!r}")
    return _HERE / "corpus" / f"{split}.parquet"
