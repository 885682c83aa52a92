"""Which implementation runs a loss: Triton (CUDA, or the CPU under ``TRITON_INTERPRET=1``) or PyTorch.

The Triton modules are imported lazily, on the first call that asks for them, so that importing
``softcache.kernels`` never needs triton.
"""

from __future__ import annotations

import os

import torch

_TRITON = None  # the sparse_kl_triton module once imported, False when triton is unavailable


def sparse_kl_triton():
    """The ``sparse_kl_triton`` module, or False when triton does not import here."""
    global _TRITON
    if _TRITON is None:
        try:
            from . import sparse_kl_triton as module

            _TRITON = module
        except ImportError:
            _TRITON = False
    return _TRITON


def fused_linear_triton():
    """The ``fused_linear_triton`` module, or None when triton does not import here."""
    if not sparse_kl_triton():
        return None
    from . import fused_linear_triton as module

    return module


def vocab_parallel_triton():
    """The ``vocab_parallel_triton`` module, or None when triton does not import here."""
    if not sparse_kl_triton():
        return None
    from . import vocab_parallel_triton as module

    return module


def triton_available() -> bool:
    """True when triton imports (Linux with a working triton; on CPU it also needs TRITON_INTERPRET=1)."""
    return bool(sparse_kl_triton())


def use_triton_for(backend: str, device: torch.device) -> bool:
    """Resolve ``backend`` ('auto', 'triton' or 'torch') for tensors on ``device``; ValueError when it cannot run."""
    if backend == "torch":
        return False
    if backend == "auto":
        return device.type == "cuda" and triton_available()
    if backend != "triton":
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if not triton_available():
        raise ValueError("backend='triton' but triton is not importable here; use backend='torch' or 'auto'")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"backend='triton' with tensors on {device} needs TRITON_INTERPRET=1 set before triton is imported "
            "(the interpreter is slow and meant for tests); use backend='auto' or 'torch' on the CPU"
        )
    return True
