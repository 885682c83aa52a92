"""Trainer integrations: train a student from a softcache cache with a framework's own loop.

- :mod:`softcache.integrations.hf`: ``DistillationTrainer`` (a ``transformers.Trainer``) and ``DistillationMixin``
  (for TRL's ``SFTTrainer`` and other ``Trainer`` subclasses).
- :mod:`softcache.integrations.lightning`: ``DistillationModule``, a ``LightningModule`` around a causal LM.
- :mod:`softcache.integrations.loss`: ``DistillationLoss``, the loss both use, for hand-written loops too.

Each module imports its framework only when imported itself.
"""

from .loss import DistillationLoss, supports_fused

__all__ = ["DistillationLoss", "supports_fused"]
