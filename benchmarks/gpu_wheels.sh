#!/usr/bin/env bash
# Run HERE (a machine that reaches PyPI), before benchmarks/gpu_check.sh goes to the device machine, which has no
# network: downloads into .whl/ (git-ignored; name it in the run's carry) the Python 3.12 x86-64 wheels that the
# device's python3 lacks, and checks that none of them needs a package that is neither there nor in .whl/.
#   bash benchmarks/gpu_wheels.sh           (PYTHON=... picks the python whose pip downloads; default .venv/bin/python)
#
# What the device lacks (its package list: /work/.library/device/KINDS.md, "Python packages already there"):
#   liger-kernel   the Liger-Kernel peers of benchmarks/kernels.py and benchmarks/fused_linear.py (pure Python; needs
#                  torch and triton, both there).
# Nothing else: `import softcache, softcache.kernels` loads only torch, triton, numpy, fsspec and tqdm (zarr, datasets,
# click, pyyaml are imported lazily, by the cache formats and the CLI), and `pytest tests/kernels` adds pytest,
# hypothesis and transformers, all there; softcache itself is put on the path by gpu_check.sh (no install).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(liger-kernel==0.8.5)
KINDS=${KINDS_MD:-/work/.library/device/KINDS.md}
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi

rm -rf .whl
mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d .whl "${WHEELS[@]}"

# Each wheel's requirements (extras left out) must be on the device or among the wheels.
"$PY" - "$KINDS" .whl/*.whl <<'EOF'
import re, sys, zipfile
from pathlib import Path

kinds, wheels = Path(sys.argv[1]), sys.argv[2:]
norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
if kinds.is_file():
    text = kinds.read_text()
    listed = text[text.index("## Python packages already there"):].split("Packages:", 1)[1].split("\n", 1)[0]
    device = {norm(n.strip(" .")) for n in listed.split(",")}
else:
    print(f"{kinds} not found: checking against the few names this check needs")
    device = {"torch", "triton", "numpy", "transformers", "packaging", "typing-extensions"}
names = {norm(Path(w).name.split("-")[0]) for w in wheels}
bad = 0
for w in wheels:
    with zipfile.ZipFile(w) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    for req in re.findall(r"^Requires-Dist: (.+)$", meta, re.M):
        if "extra ==" in req:
            continue
        name = norm(re.match(r"[A-Za-z0-9._-]+", req).group())
        where = "device" if name in device else "wheel" if name in names else None
        print(f"  {Path(w).name}: needs {req.strip()} ({where or 'MISSING'})")
        bad += where is None
for n in names & device:
    print(f"  note: {n} is on the device already; the wheel replaces it under PYTHONPATH")
sys.exit(1 if bad else 0)
EOF

ls -l .whl
total=$(du -cb .whl/*.whl | tail -1 | cut -f1)
echo "total: $total bytes ($(( (total + 1048575) / 1048576 )) MiB) in $(find .whl -type f -name '*.whl' | wc -l) wheel(s)"
git check-ignore -q .whl/ || echo "WARNING: .whl/ is not git-ignored"
