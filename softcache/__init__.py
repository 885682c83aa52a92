"""softcache: offline knowledge distillation with compact, exact teacher caches.

Run the teacher once (``softcache build`` or :class:`CacheWriter`; :func:`generate` for its answers to prompts with
its targets at every generated token), then train students from the cache (:func:`open_cache`,
``softcache.kernels.sparse_kl_loss``); :func:`sparse_targets` gives the same targets from live logits (online KD).
"""

from ._version import __version__
from .build.generate import generate
from .data import SoftTargetDataset, StreamingSoftTargetDataset, collate, to_hf_dataset
from .errors import CacheFormatError, CorruptShardError
from .reader import Cache, open_cache
from .sparsify import sparse_targets
from .writer import CacheWriter

__all__ = [
    "Cache",
    "CacheFormatError",
    "CacheWriter",
    "CorruptShardError",
    "SoftTargetDataset",
    "StreamingSoftTargetDataset",
    "__version__",
    "collate",
    "generate",
    "open_cache",
    "sparse_targets",
    "to_hf_dataset",
]
