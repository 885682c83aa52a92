"""Training data from a cache: datasets (map-style and streaming), collate, start-up checks.

``SoftTargetDataset`` (random access) and ``StreamingSoftTargetDataset`` (sequential reads, DDP and worker
sharding, resumable) yield items with ``input_ids``, ``attention_mask``, ``labels`` and ``target_ids`` /
``target_logprobs`` at the dataset's temperature; ``collate`` pads them into torch tensors.
``BatchGroupedSampler`` shuffles a ``SoftTargetDataset`` without decoding a stored batch more than once.
``to_hf_dataset`` gives the same items as a ``datasets.Dataset``.
"""

from .checks import check_student
from .collate import Collator, collate
from .dataset import SoftTargetDataset
from .hf_datasets import to_hf_dataset
from .sampler import BatchGroupedSampler
from .streaming import StreamingSoftTargetDataset

__all__ = [
    "BatchGroupedSampler",
    "Collator",
    "SoftTargetDataset",
    "StreamingSoftTargetDataset",
    "check_student",
    "collate",
    "to_hf_dataset",
]
