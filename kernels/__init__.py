"""softcache.kernels: distillation losses between full-vocabulary student logits and sparse teacher targets.

Depends on torch, and on triton when it is importable (CUDA; CPU tests use TRITON_INTERPRET=1);
without triton everything runs on the chunked PyTorch implementation.
"""

from .sparse_kl import SparseKLLoss, sparse_kl_loss, triton_available

__all__ = ["SparseKLLoss", "sparse_kl_loss", "triton_available"]
