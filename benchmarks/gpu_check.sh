#!/usr/bin/env bash
# One command for an H100/H200 machine, under 6 minutes: the kernel tests on CUDA (Triton compiled, not
# interpreted), then the fused-linear benchmark, then the kernel benchmark, whose table is printed last.
#   bash benchmarks/gpu_check.sh            (uses .venv/bin/python when present, else python; PYTHON=... overrides)
# Worst case by the timeouts: 140 + 90 + 110 s = 340 s.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi
export TRITON_INTERPRET=0  # tests/conftest.py only sets it when unset

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi not found"
"$PY" -c "import torch, triton; assert torch.cuda.is_available(), 'no CUDA device'; \
print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" || exit 1

echo "== kernel tests on CUDA (sparse_kl and fused linear; timeout 140 s)"
timeout 140 "$PY" -m pytest tests/kernels -q -p no:cacheprovider \
  -W ignore::RuntimeWarning
tests_rc=$?
echo "== kernel tests rc=$tests_rc (0 = all passed, 124 = timed out)"

echo "== fused-linear benchmark, N=8192 H=4096 V=128256 bf16 (timeout 90 s)"
timeout 90 "$PY" benchmarks/fused_linear.py
fused_rc=$?
[ "$fused_rc" -ne 0 ] && echo "== fused-linear benchmark rc=$fused_rc (124 = timed out)"

echo "== kernel benchmark (new sizes stop after 60 s; timeout 110 s)"
timeout 110 "$PY" benchmarks/kernels.py --budget-s 60 "$@"
bench_rc=$?
[ "$bench_rc" -ne 0 ] && echo "== benchmark rc=$bench_rc (124 = timed out)"
exit $(( tests_rc != 0 || fused_rc != 0 || bench_rc != 0 ))
