"""softcache.kernels: distillation losses between full-vocabulary student logits and sparse teacher targets.

Depends on torch, and on triton when it is importable (CUDA; CPU tests use TRITON_INTERPRET=1);
without triton everything runs on the chunked PyTorch implementation. ``fused_linear_sparse_kl_loss`` takes the
student's final hidden states and output layer instead of logits and never materialises the (N, V) logits;
``softcache.kernels.hf`` applies it to Hugging Face causal LMs (importing transformers only when called).
``counted_rows`` tells which rows a loss counts (the denominator of reduction='mean'). ``hidden_state_loss``,
``attention_loss`` and ``uniform_layer_map`` are the feature-distillation losses (plain PyTorch).
"""

from ._backend import triton_available
from ._common import counted_rows
from .features import attention_loss, hidden_state_loss, uniform_layer_map
from .fused_linear import FusedLinearSparseKLLoss, fused_linear_sparse_kl_loss
from .sparse_kl import SparseKLLoss, sparse_kl_loss

__all__ = [
    "FusedLinearSparseKLLoss",
    "SparseKLLoss",
    "attention_loss",
    "counted_rows",
    "fused_linear_sparse_kl_loss",
    "hidden_state_loss",
    "sparse_kl_loss",
    "triton_available",
    "uniform_layer_map",
]
