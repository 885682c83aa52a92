"""Compile every Triton kernel of softcache for a CUDA target on a machine without a GPU (run as a script).

The interpreter (TRITON_INTERPRET=1) runs the kernels' Python, not what the compiler makes of it: a construct that
interprets fine but does not lower (a float64 op the backend lacks, a dtype mismatch in a loop-carried value) only
shows on a GPU. Here, with TRITON_INTERPRET unset, each host function runs on small CPU tensors with the kernels'
launch replaced by a recorder; every recorded launch (its argument types, constexprs and num_warps) is then compiled
with ``triton.compile`` for ``--arch`` (ptxas included, which ships with triton). Prints one line per distinct
kernel variant and exits 1 if any failed. Nothing runs on a device and the numbers the host functions return are
meaningless (no kernel ran).

    python tests/kernels/compile_for_cuda.py [--arch 90] [--quick]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import traceback

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run with TRITON_INTERPRET unset: kernels must be jitted"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
          torch.int32: "i32", torch.int64: "i64", torch.int8: "i8", torch.bool: "i1"}  # fmt: skip
LAUNCHES: list[tuple[JITFunction, tuple, dict]] = []


def _record(self, *args, grid=None, warmup=False, **kwargs):
    LAUNCHES.append((self, args, kwargs))


def _signature(fn: JITFunction, args: tuple, kwargs: dict) -> tuple[dict, dict, int]:
    names = fn.arg_names
    values = dict(zip(names, args, strict=False))
    values.update({k: v for k, v in kwargs.items() if k in names})
    constexprs = {p.name: values[p.name] for p in fn.params if p.is_constexpr and p.name in values}
    sig = {}
    for name in names:
        v = values[name]
        if name in constexprs:
            sig[name] = "constexpr"
        elif isinstance(v, torch.Tensor):
            sig[name] = "*" + DTYPES[v.dtype]
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            sig[name] = "i32" if -(2**31) <= v < 2**31 else "i64"
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {name}={v!r}")
    return sig, constexprs, int(kwargs.get("num_warps", 4))


def _exercise(quick: bool) -> None:
    """Call each Triton host function with the configurations the losses launch (shapes kept tiny; ``quick``: bf16
    and fewer kinds, every tail and each kernel's constexpr branches still reached)."""
    from softcache.kernels import fused_linear_triton as flt
    from softcache.kernels import sparse_kl_triton as skt
    from softcache.kernels import vocab_parallel_triton as vpt
    from softcache.kernels._common import TAILS, make_config
    from softcache.kernels.sparse_kl_torch import RowTerms
    from softcache.kernels.vocab_parallel import RowState

    n, vocab, k, h = 5, 300, 4, 32
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (n, k), generator=g)
    lps = torch.log_softmax(torch.randn(n, k, generator=g), -1)
    labels = torch.randint(0, vocab, (n,), generator=g)
    scale = torch.ones(1)
    big = torch.randn(1, 128_256, generator=g).to(torch.bfloat16)  # the largest block and warp count
    cfg = make_config(temperature=2.0, kind="forward_kl", tail="bucket", beta=0.5, has_labels=False, alpha=1.0,
                      ignore_index=-100, reduction="mean", scale_by_t2=True)  # fmt: skip
    skt.sparse_kl_forward_triton(big, ids[:1], lps[:1], None, scale, cfg, torch.empty_like(big))
    for dtype in (torch.bfloat16,) if quick else (torch.bfloat16, torch.float32):
        z = torch.randn(n, vocab, generator=g).to(dtype)
        for kind in ("forward_kl",) if quick else ("forward_kl", "jsd"):
            for tail in TAILS:
                if tail == "renormalize" and kind != "forward_kl":
                    continue
                for alpha, t in ((1.0, 1.0), (0.5, 2.0), (0.5, 1.0)):
                    cfg = make_config(temperature=t, kind=kind, tail=tail, beta=0.5, has_labels=True, alpha=alpha,
                                      ignore_index=-100, reduction="mean", scale_by_t2=True)  # fmt: skip
                    skt.sparse_kl_forward_triton(z, ids, lps, labels, scale, cfg, torch.empty_like(z))
                    cin = torch.zeros(n, k) if tail == "bucket" else None
                    ids_ext = torch.cat([ids, labels[:, None]], 1).to(torch.int32) if alpha < 1 else ids.int()
                    hid, w = torch.randn(n, h).to(dtype), torch.randn(vocab, h).to(dtype)
                    flt.fused_forward_triton(hid, w, None, ids_ext, 1.0 / t, tail != "restrict", alpha < 1,
                                             k if tail == "bucket" else None)  # fmt: skip
                    row = torch.zeros(7, n)
                    flt.fused_backward_triton(hid, w, None, ids_ext, torch.zeros(n, ids_ext.shape[1]), row, 1.0 / t,
                                              tail != "restrict", alpha < 1 and t != 1.0, (True, True, False), 0.0,
                                              cin)  # fmt: skip
        skt.scale_rows_triton(z, torch.full((n,), 2.0))
        # the vocab-parallel passes over a slice
        mine = ids < vocab
        lay = dict(valid=mine, mine=mine, loc_ids=ids, counted=torch.ones(n, dtype=torch.bool), lab_ok=mine[:, 0],
                   lab_mine=mine[:, 0], lab_loc=labels[:, None])  # fmt: skip
        for tail, alpha, t in (("bucket", 0.5, 2.0), ("restrict", 1.0, 1.0)):
            cfg = make_config(temperature=t, kind="forward_kl", tail=tail, beta=0.5, has_labels=True, alpha=alpha,
                              ignore_index=-100, reduction="mean", scale_by_t2=True)  # fmt: skip
            vpt.local_sums(z, lay, cfg, torch.float32)
            zeros = torch.zeros(n)
            terms = RowTerms(zeros, zeros, torch.zeros(n, k), zeros, zeros)
            st = RowState(lse_s=zeros, lse1=zeros if t != 1.0 else None, terms=terms, **lay)
            vpt.local_grad(z, torch.empty_like(z), st, scale, cfg)


def _resources(cubin: bytes) -> str:
    """'REG:n STACK:n ...' of a cubin, from the cuobjdump that ships with triton."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:\d+ STACK:\d+", out)
    return found.group(0) if found else "resources: n/a"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 (H100/H200), 80 (A100)")
    ap.add_argument("--quick", action="store_true", help="bf16 and one kind: the variants a test can afford")
    ap.add_argument("--resources", action="store_true",
                    help="also print each variant's registers per thread and spill stack (cuobjdump on the cubin)")
    args = ap.parse_args()
    real_run = JITFunction.run
    JITFunction.run = _record
    try:
        _exercise(args.quick)
    finally:
        JITFunction.run = real_run
    target = GPUTarget("cuda", args.arch, 32)
    seen, failed = set(), 0
    for fn, fargs, fkwargs in LAUNCHES:
        sig, constexprs, warps = _signature(fn, fargs, fkwargs)
        key = (fn.__name__, tuple(sorted(sig.items())), tuple(sorted(constexprs.items())), warps)
        if key in seen:
            continue
        seen.add(key)
        label = f"{fn.__name__} {' '.join(f'{k}={v}' for k, v in constexprs.items())} num_warps={warps}"
        try:
            compiled = triton.compile(ASTSource(fn, sig, constexprs=constexprs), target=target,
                                      options={"num_warps": warps})  # fmt: skip
            usage = f"  [{_resources(compiled.asm['cubin'])}]" if args.resources else ""
            print("ok  ", label + usage, flush=True)
        except Exception:  # report every variant, then fail
            failed += 1
            print("FAIL", label, flush=True)
            traceback.print_exc()
    print(f"{len(seen)} kernel variants compiled for sm_{args.arch}, {failed} failed")
    return 1 if failed or not seen else 0


if __name__ == "__main__":
    sys.exit(main())
