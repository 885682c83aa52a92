"""softcache: offline knowledge distillation with compact, exact teacher caches.

Run the teacher once (``softcache build`` or :class:`CacheWriter`), then train students from the cache
(:func:`open_cache`, ``softcache.kernels.sparse_kl_loss``).
"""

__version__ = "0.1.0"

from .data import SoftTargetDataset, StreamingSoftTargetDataset, collate  # noqa: E402
from .format import CacheFormatError, CorruptShardError  # noqa: E402
from .reader import Cache, open_cache  # noqa: E402
from .writer import CacheWriter  # noqa: E402

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
]
