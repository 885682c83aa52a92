"""Test configuration: Triton kernels run on the CPU through the interpreter (CI has no GPU)."""

import os

# Must be set before triton is imported anywhere.
os.environ.setdefault("TRITON_INTERPRET", "1")
