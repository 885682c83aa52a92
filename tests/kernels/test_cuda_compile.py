"""The Triton kernels compile for a Hopper GPU on this CPU-only machine (see compile_for_cuda.py)."""

import os
import subprocess
import sys

import pytest
import torch


def test_kernels_compile_for_cuda(tmp_path):
    """Every Triton kernel variant the losses launch compiles for sm_90 (H100/H200) with ptxas, no GPU needed: what
    the interpreter cannot show (a construct that runs in Python but does not lower, e.g. a loop-carried value that
    changes type). tests/kernels/compile_for_cuda.py does the work in a process where the kernels are jitted."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("on a GPU the kernel tests compile and run them")
    script = os.path.join(os.path.dirname(__file__), "compile_for_cuda.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile, do not reuse
    out = subprocess.run([sys.executable, script, "--quick"], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert " 0 failed" in out.stdout and "_local_grad_kernel" in out.stdout, out.stdout[-2000:]
