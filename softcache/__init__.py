"""softcache: offline knowledge distillation with compact, exact teacher caches.

Run the teacher once (``softcache build`` or :class:`CacheWriter`), then train students from the cache
(:func:`open_cache`, ``softcache.kernels.sparse_kl_loss``).
"""

from ._version import __version__
from .data import SoftTargetDataset, StreamingSoftTargetDataset, collate, to_hf_dataset
from .errors import CacheFormatError, CorruptShardError
from .reader import Cache, open_cache
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
    "open_cache",
    "to_hf_dataset",
]
