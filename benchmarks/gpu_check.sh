#!/usr/bin/env bash
# One command for an H100/H200 machine, under 7 minutes: the kernel tests on CUDA (Triton compiled, not
# interpreted), then the fused-linear and vocab-parallel benchmarks, then the kernel benchmark, whose table is printed
# last.
#   bash benchmarks/gpu_check.sh [kernels.py args]
# Python: $PYTHON, else .venv/bin/python, else python3 (the device machine's, which holds torch and triton).
# Wheels in .whl/ (made here by benchmarks/gpu_wheels.sh, carried to the device) are installed into a folder on
# PYTHONPATH first. Where softcache is not installed, a folder of links under /tmp maps softcache.kernels and
# softcache.cli onto kernels/ and cli/ as pyproject's package-dir does, so nothing is installed and no dependency
# is resolved. With $OUT set, everything printed is also written to $OUT/gpu_check.log.
# GPU_CHECK_SMOKE=1 runs it all on a machine without CUDA (tests on the CPU, benchmarks --tiny): plumbing only.
# Worst case by the timeouts: 30 + 45 + 180 + 90 + 60 + 110 s = 515 s (plus 5 s grace for each kill).
set -uo pipefail
self="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$self")/.." || exit 1
export PYTHONUNBUFFERED=1

if [ -n "${OUT:-}" ] && [ -z "${GPU_CHECK_LOGGING:-}" ]; then
  mkdir -p "$OUT"
  GPU_CHECK_LOGGING=1 bash "$self" "$@" 2>&1 | tee "$OUT/gpu_check.log"
  exit "${PIPESTATUS[0]}"
fi

began=$SECONDS
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
elif command -v python3 >/dev/null; then PY=python3
else PY=python; fi
export TRITON_INTERPRET=0  # tests/conftest.py only sets it when unset
work=$(mktemp -d "${TMPDIR:-/tmp}/softcache-gpu-check.XXXXXX")
trap 'rm -rf "$work"' EXIT  # links and installed wheels only; rm does not follow the links

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi not found"

if compgen -G ".whl/*.whl" >/dev/null; then
  echo "== installing the wheels in .whl/ into $work/site: $(cd .whl && echo ./*.whl)"
  if timeout -k 5 30 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$work/site" .whl/*.whl; then
    export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "== WARNING: installing .whl/ failed; going on without those packages"
  fi
fi

# softcache without an install: the repo's own folders under the names pyproject gives them. The repo root must not
# come first on sys.path then (its softcache/ has no kernels/), so the Python calls that would put the current
# folder there (-c, -m) run with PYTHONSAFEPATH=1; scripts put their own folder there instead, which is harmless.
safe=()
if ! PYTHONSAFEPATH=1 "$PY" -c "import softcache.kernels" 2>/dev/null; then
  mkdir -p "$work/shim/softcache"
  ln -s "$PWD"/softcache/* "$work/shim/softcache/"
  ln -s "$PWD/kernels" "$work/shim/softcache/kernels"
  ln -s "$PWD/cli" "$work/shim/softcache/cli"
  export PYTHONPATH="$work/shim${PYTHONPATH:+:$PYTHONPATH}"
  safe=(env PYTHONSAFEPATH=1)
  echo "== softcache is not installed for $PY: using the repo through $work/shim"
fi

timeout -k 5 45 "${safe[@]}" "$PY" - <<'EOF' || { echo "== stopping: the environment check failed"; exit 1; }
import os, sys
import torch, triton
import softcache, softcache.kernels
try:
    import importlib.metadata as md, liger_kernel  # noqa: F401
    liger = md.version("liger-kernel")
except ImportError as exc:
    liger = f"missing ({exc})"
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "triton", triton.__version__, "liger-kernel", liger)
print("softcache", softcache.__version__, "from", os.path.dirname(softcache.__file__),
      "kernels from", os.path.dirname(softcache.kernels.__file__))
if not torch.cuda.is_available():
    if os.environ.get("GPU_CHECK_SMOKE") == "1":
        print("no CUDA device: GPU_CHECK_SMOKE=1, going on on the CPU (plumbing only, not a result)")
    else:
        sys.exit("no CUDA device")
else:
    print("device", torch.cuda.get_device_name())
EOF

smoke=()
[ "${GPU_CHECK_SMOKE:-}" = 1 ] && smoke=(--tiny)

echo "== kernel tests on CUDA (sparse_kl, fused linear, vocab-parallel; timeout 180 s)"
timeout -k 5 180 "${safe[@]}" "$PY" -m pytest tests/kernels -q -p no:cacheprovider \
  -W ignore::RuntimeWarning
tests_rc=$?
echo "== kernel tests rc=$tests_rc (0 = all passed, 124 = timed out)"

echo "== fused-linear benchmark, N=8192 H=4096 V=128256 bf16 (timeout 90 s)"
timeout -k 5 90 "$PY" benchmarks/fused_linear.py "${smoke[@]}"
fused_rc=$?
[ "$fused_rc" -ne 0 ] && echo "== fused-linear benchmark rc=$fused_rc (124 = timed out)"

echo "== vocab-parallel benchmark, one rank's slice N=16384 V_local=16032 H=4096 bf16 (timeout 60 s)"
timeout -k 5 60 "$PY" benchmarks/vocab_parallel.py "${smoke[@]}"
vp_rc=$?
[ "$vp_rc" -ne 0 ] && echo "== vocab-parallel benchmark rc=$vp_rc (124 = timed out)"

echo "== kernel benchmark (new sizes stop after 60 s; timeout 110 s)"
timeout -k 5 110 "$PY" benchmarks/kernels.py --budget-s 60 "${smoke[@]}" "$@"
bench_rc=$?
[ "$bench_rc" -ne 0 ] && echo "== benchmark rc=$bench_rc (124 = timed out)"
echo "== gpu_check: tests rc=$tests_rc, fused rc=$fused_rc, vocab-parallel rc=$vp_rc, bench rc=$bench_rc, $((SECONDS - began)) s${OUT:+; log in \$OUT/gpu_check.log}"
exit $(( tests_rc != 0 || fused_rc != 0 || vp_rc != 0 || bench_rc != 0 ))
