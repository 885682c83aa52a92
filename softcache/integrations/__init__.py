"""Trainer integrations: train a student from a softcache cache with a framework's own loop.

- :mod:`softcache.integrations.hf`: ``DistillationTrainer`` (a ``transformers.Trainer``) and ``DistillationMixin``
  (for TRL's ``SFTTrainer`` and other ``Trainer`` subclasses).
- :mod:`softcache.integrations.lightning`: ``DistillationModule``, a ``LightningModule`` around a causal LM.
- :mod:`softcache.integrations.loss`: ``DistillationLoss``, the loss both use, for hand-written loops too.
- :mod:`softcache.integrations.online`: ``OnlineTeacher``, a live teacher's targets in place of a cache's (both
  trainers take ``teacher=``), and ``collate_inputs`` for batches of tokens only.

Each module imports its framework only when imported itself.
"""

from .loss import DistillationLoss, supports_fused
from .online import OnlineTeacher, collate_inputs

__all__ = ["DistillationLoss", "OnlineTeacher", "collate_inputs", "supports_fused"]
